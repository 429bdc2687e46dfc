//! `ConsumerError`: every way a consumer-group or projection operation can fail, one variant
//! per kind of answer the server gives (not found, conflict, invalid, too many, disk).

use quiver_log::{LogError, Seq};

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("consumer {0:?} does not exist")]
    NotFound(String),
    #[error("a consumer named {0:?} already exists")]
    Exists(String),
    #[error("{detail}")]
    Invalid { code: &'static str, detail: String },
    #[error("the server already has {limit} consumers; delete one first")]
    TooMany { limit: usize },
    #[error("seq {seq} is not parked in consumer {name:?}")]
    NotParked { name: String, seq: Seq },
    #[error("the state of consumer {name:?} cannot be read: {detail}")]
    Unreadable { name: String, detail: String },
    #[error("{0}")]
    Expired(String),
    #[error("{0}")]
    Log(#[from] LogError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl ConsumerError {
    pub fn invalid(code: &'static str, detail: impl Into<String>) -> Self {
        ConsumerError::Invalid {
            code,
            detail: detail.into(),
        }
    }

    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        ConsumerError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
