//! The engine's one error type. Each variant maps to exactly one HTTP status in the server,
//! so a caller can tell "you asked wrong" (4xx) from "we failed" (5xx) without guessing.

use quiver_model::validate::Invalid;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{what} {id:?} was not found")]
    NotFound { what: &'static str, id: String },
    #[error("{detail}")]
    Conflict { code: &'static str, detail: String },
    #[error("{0}")]
    Invalid(#[from] Invalid),
    /// A dependency (the embedding provider) cannot serve the request; nothing changed.
    #[error("{detail}")]
    Unavailable { code: &'static str, detail: String },
    #[error("log: {0}")]
    Log(#[from] quiver_log::LogError),
    /// The data directory holds something this build cannot trust (start-up only).
    #[error("{0}")]
    Corrupt(String),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl EngineError {
    pub fn not_found(what: &'static str, id: impl Into<String>) -> Self {
        EngineError::NotFound {
            what,
            id: id.into(),
        }
    }
    pub fn invalid(code: &'static str, detail: impl Into<String>) -> Self {
        EngineError::Invalid(Invalid::new(code, detail))
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
