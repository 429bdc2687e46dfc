//! # quiver-consumers — durable readers of the log
//!
//! This crate owns everything that reads the change log *on behalf of someone who must not
//! miss or repeat a change*: durable consumer groups (positions, leases, acks, redelivery,
//! the parked list, and their files under `<data_dir>/consumers/`), the [`Projection`] trait
//! with its runner (a read model whose checkpoint is stored atomically with its state), the
//! live per-library statistics projection, and the `near` test of semantic subscriptions.
//!
//! It must never write to the log or change the engine's state, never acknowledge an ack
//! before it is on disk (an acked event must never come back after a restart), never keep an
//! unbounded amount of anything (every collection has a limit in [`limits`]), and never skip
//! an event without saying so (retention that overtakes a consumer is counted and reported).
//! Why: a consumer group is only worth having if "acked" means "done, forever", and a read
//! model is only worth having if it equals a replay of the log.
//!
//! It knows nothing about HTTP: the server (`crates/server/src/consumers.rs`) reads the log,
//! filters with the bus's `EventFilter`, and calls in here.
//!
//! Layout:
//! - [`group`] — one consumer group: its config, its state machine (lease / ack / nack /
//!   park), and its file with coalesced atomic writes.
//! - [`registry`] — every consumer group of a data directory: create, load, list, delete.
//! - [`near`] — semantic subscriptions: is any chunk of this record within a distance?
//! - [`projection`] — the `Projection` trait, checkpoint files and the catch-up/follow runner.
//! - [`library_stats`] — the live per-library statistics projection.
//! - [`error`] — `ConsumerError`.

pub mod error;
pub mod group;
pub mod library_stats;
pub mod near;
pub mod projection;
pub mod registry;

pub use error::ConsumerError;
pub use group::{Consumer, ConsumerConfig, ConsumerInfo, Lease};
pub use library_stats::{LibraryStats, LibraryStatsProjection};
pub use near::{NearMatch, NearSpec};
pub use projection::{Projection, ProjectionRunner};
pub use registry::Registry;

/// Every bound of this crate, with its unit last in its name.
pub mod limits {
    /// Most consumer groups per data directory.
    pub const CONSUMERS_LIMIT: usize = 256;
    /// Longest consumer name, in bytes (`[A-Za-z0-9_.-]`, not starting with `.`).
    pub const NAME_BYTES_LIMIT: usize = 64;
    /// Most events one `next` leases.
    pub const NEXT_MAX_LIMIT: usize = 1000;
    /// Longest long-poll of one `next`, in milliseconds.
    pub const WAIT_MS_LIMIT: u64 = 30_000;
    /// Most events leased-or-waiting (not yet acked) per consumer; past it the consumer holds
    /// back reading new events until acks make room.
    pub const PENDING_LIMIT: usize = 10_000;
    /// Most parked events per consumer; past it a poison event stays pending (held, not
    /// delivered) and the consumer reports `parked_full`.
    pub const PARKED_LIMIT: usize = 10_000;
    /// Most seqs in one ack or nack request.
    pub const ACK_BATCH_LIMIT: usize = 10_000;
    /// Longest `ack_wait_ms` (one hour) and shortest (100 ms).
    pub const ACK_WAIT_MS_LIMIT: u64 = 3_600_000;
    pub const ACK_WAIT_MS_MIN: u64 = 100;
    pub const ACK_WAIT_MS_DEFAULT: u64 = 30_000;
    /// Largest `max_deliver`.
    pub const MAX_DELIVER_LIMIT: u32 = 1000;
    pub const MAX_DELIVER_DEFAULT: u32 = 5;
    /// Longest nack delay, in milliseconds.
    pub const NACK_DELAY_MS_LIMIT: u64 = 3_600_000;
    /// Largest consumer state file read at start-up, in bytes.
    pub const STATE_FILE_BYTES_LIMIT: u64 = 64 << 20;
}
