//! The crate's error type.
//!
//! Owns the wording of every failure a caller can see. Messages must name the
//! file and byte offset for corruption so an operator can act on them; this
//! module must never hide an I/O error's source.

use crate::Seq;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("log file {} is corrupt at byte offset {offset}: {reason}", file.display())]
    Corrupt {
        file: PathBuf,
        offset: u64,
        reason: String,
    },

    #[error("record of {size_bytes} bytes exceeds the record size limit of {limit_bytes} bytes")]
    RecordTooLarge { size_bytes: usize, limit_bytes: u32 },

    #[error(
        "seq {requested} is no longer in the log; the oldest available seq is {first_available}"
    )]
    Compacted {
        requested: Seq,
        first_available: Seq,
    },

    #[error("the log writer failed and the log is unusable (restart the process): {0}")]
    Failed(String),

    #[error("the log is closed")]
    Closed,

    #[error("append was called with no payloads")]
    EmptyAppend,

    #[error("seq {requested} has not been assigned yet; the last assigned seq is {last_assigned}")]
    Unassigned { requested: Seq, last_assigned: Seq },

    #[error("invalid log configuration: {0}")]
    InvalidConfig(String),

    #[error("the log directory {} is locked by another process", dir.display())]
    Locked { dir: PathBuf },

    /// A commit does not fit in one JetStream message (a commit is one message, so that it is
    /// all or nothing).
    #[error("the change is {size_bytes} bytes once encoded; the NATS server's max_payload allows {limit_bytes}: raise max_payload in nats-server.conf (up to 64 MiB) or send smaller batches")]
    MessageTooLarge {
        size_bytes: usize,
        limit_bytes: usize,
    },

    /// The replicated log (JetStream) cannot be reached or refused the call; nothing was
    /// written by the call that failed.
    #[error("{0}")]
    Unavailable(String),
}

impl LogError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LogError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(
        file: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        LogError::Corrupt {
            file: file.into(),
            offset,
            reason: reason.into(),
        }
    }
}

/// Error from parsing an [`crate::FsyncPolicy`] or [`crate::Retention`] string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: {reason}")]
pub struct ParseError {
    pub what: &'static str,
    pub input: String,
    pub reason: String,
}
