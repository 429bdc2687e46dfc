//! `quiver-log`: Quiver's durable change log, which IS the database and its
//! event stream. An append-only, segmented, checksummed file log with a single
//! writer thread and group commit.
//!
//! This crate owns the on-disk log format (segments of CRC-framed records with
//! gapless seqs), durability (the fsync policy), crash recovery, reads, and
//! retention. It knows nothing about what payloads mean.
//!
//! It must never acknowledge a record as durable before the fsync policy says
//! so, never return a record that fails its checksum or breaks seq
//! contiguity, and never silently drop data on recovery: only a torn tail of
//! the last segment may be cut. Anything else is reported as corruption with
//! file and byte offset, because a log that guesses is a database that lies.
//!
//! [`jetstream`] is the same log kept in a NATS JetStream stream, for servers
//! that run as replicas of one log (DESIGN principle 5): there each replica's
//! [`FileLog`] is its local copy of the stream, written under the same seqs.
//!
//! Limits are explicit (`*_limit` in [`LogConfig`], constants in [`config`]),
//! invariants are asserted on both sides of the disk boundary (before a frame
//! is written and after it is read), and units come last in names.

pub mod atomic;
pub mod config;
pub mod error;
pub mod frame;
pub mod jetstream;
mod log;
mod recent;
mod recovery;
pub mod segment;
mod writer;

/// A record's position in the log: gapless, starts at 1, survives restarts.
pub type Seq = u64;

pub use atomic::write_atomic;
pub use config::{FsyncPolicy, LogConfig, Retention};
pub use error::{LogError, ParseError};
pub use frame::DecodeResult;
pub use jetstream::{Envelope, JetStreamConfig, JetStreamLog, Published};
pub use log::{FileLog, LogStats, Recovery, LOCK_FILE_NAME};
pub use recent::{RECENT_BYTES_LIMIT_DEFAULT, RECENT_RECORDS_LIMIT};

#[cfg(test)]
mod tests {
    #[test]
    fn file_log_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<super::FileLog>();
    }
}
