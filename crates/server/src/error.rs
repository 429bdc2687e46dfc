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
    pub fn body(&self) -> serde_json::Value {
        json!({"error": self.code, "detail": self.detail})
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::NotFound { what, .. } => {
                ApiError::new(StatusCode::NOT_FOUND, format!("{}_not_found", what), e.to_string())
            }
            EngineError::Conflict { code, detail } => ApiError::new(StatusCode::CONFLICT, code, detail),
            EngineError::Invalid(i) => {
                let status = if i.too_large { StatusCode::PAYLOAD_TOO_LARGE } else { StatusCode::UNPROCESSABLE_ENTITY };
                ApiError::new(status, i.code, i.detail)
            }
            EngineError::Unavailable { code, detail } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, detail),
            EngineError::Log(quiver_log::LogError::RecordTooLarge { size_bytes, limit_bytes }) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "record_too_large",
                format!("the change is {size_bytes} bytes once encoded; the log's record limit is {limit_bytes}"),
            ),
            other => {
                tracing::error!("internal error: {other}");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", other.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
