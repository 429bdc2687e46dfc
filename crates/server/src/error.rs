//! `ApiError`: every failure the API returns, as `{"error": code, "detail": sentence}` with
//! the status that fits. Engine errors map one to one; nothing else builds error bodies.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use quiver_engine::EngineError;
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: impl Into<String>, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.into(),
            detail: detail.into(),
        }
    }
    pub fn bad_request(code: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }
    pub fn unprocessable(code: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
    }
    /// Status, code and detail of an engine error: the one mapping from engine errors to the
    /// API's statuses (by reference, so batch replies need not consume their outcomes).
    pub fn parts(e: &EngineError) -> (u16, String, String) {
        let (status, code): (StatusCode, String) = match e {
            EngineError::NotFound { what, .. } => {
                (StatusCode::NOT_FOUND, format!("{what}_not_found"))
            }
            EngineError::Conflict { code, .. } => (StatusCode::CONFLICT, code.to_string()),
            EngineError::Invalid(i) if i.too_large => {
                (StatusCode::PAYLOAD_TOO_LARGE, i.code.to_string())
            }
            EngineError::Invalid(i) => (StatusCode::UNPROCESSABLE_ENTITY, i.code.to_string()),
            EngineError::Unavailable { code, .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, code.to_string())
            }
            EngineError::Log(quiver_log::LogError::Unavailable(_)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "log_unavailable".to_string(),
            ),
            EngineError::Log(
                quiver_log::LogError::RecordTooLarge { .. }
                | quiver_log::LogError::MessageTooLarge { .. },
            ) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "record_too_large".to_string(),
            ),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal".to_string()),
        };
        let detail = match e {
            EngineError::Invalid(i) => i.detail.clone(),
            EngineError::Log(quiver_log::LogError::RecordTooLarge {
                size_bytes,
                limit_bytes,
            }) => {
                format!("the change is {size_bytes} bytes once encoded; the log's record limit is {limit_bytes}")
            }
            EngineError::Log(e @ quiver_log::LogError::MessageTooLarge { .. }) => e.to_string(),
            EngineError::Conflict { detail, .. } | EngineError::Unavailable { detail, .. } => {
                detail.clone()
            }
            other => other.to_string(),
        };
        (status.as_u16(), code, detail)
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": self.code, "detail": self.detail})
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let (status, code, detail) = ApiError::parts(&e);
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!("{code}: {e}");
        } else if status.is_server_error() {
            tracing::error!("internal error: {e}");
        }
        ApiError::new(status, code, detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
