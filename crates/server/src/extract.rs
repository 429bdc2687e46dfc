//! Request extractors that fail the Quiver way: a JSON body that is malformed (400), of the
//! wrong shape (422) or too large (413) gets a JSON error, never axum's plain-text rejection.
//! Also the write context (trace id, source) every write carries into its records.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use quiver_engine::WriteCtx;
use serde::de::DeserializeOwned;

/// A JSON body parsed into `T`.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let ApiBytes(bytes) = ApiBytes::from_request(req, state).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// A whole request body (within the body limit), for handlers that parse it off the async
/// workers; a body past the limit is a JSON 413.
pub struct ApiBytes(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state)
            .await
            .map(ApiBytes)
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        format!(
                            "the request body exceeds {} bytes",
                            quiver_model::limits::BODY_BYTES_LIMIT
                        ),
                    )
                } else {
                    ApiError::bad_request("bad_body", e.body_text())
                }
            })
    }
}

/// Parses JSON: syntax errors are 400, shape errors 422, each naming line and column.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(json_error)
}

/// A JSON error as an API error: syntax is 400, shape is 422.
pub fn json_error(e: serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => ApiError::unprocessable("invalid_request", e.to_string()),
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::bad_request("malformed_json", e.to_string())
        }
    }
}

/// The trace id of the request (set by the trace middleware) and its source.
pub struct Ctx(pub WriteCtx);

#[derive(Clone)]
pub struct TraceId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let trace_id = parts.extensions.get::<TraceId>().map(|t| t.0.clone());
        let source = parts
            .headers
            .get("x-quiver-source")
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty() && s.len() <= 256)
            .map(str::to_string)
            .or_else(|| Some("api".to_string()));
        Ok(Ctx(WriteCtx { trace_id, source }))
    }
}

/// The W3C `traceparent` trace id, else `X-Request-ID` (bounded, printable), else a new id.
pub fn trace_id_of(headers: &axum::http::HeaderMap) -> String {
    if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        let parts: Vec<&str> = tp.trim().split('-').collect();
        if parts.len() >= 4
            && parts[1].len() == 32
            && parts[1].bytes().all(|b| b.is_ascii_hexdigit())
        {
            return parts[1].to_ascii_lowercase();
        }
    }
    if let Some(id) = headers.get("x-request-id").and_then(|v| v.to_str().ok()) {
        let id = id.trim();
        if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) {
            return id.to_string();
        }
    }
    uuid_like()
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = quiver_model::time::now_ms();
    format!(
        "{:016x}{:016x}",
        t ^ 0x5157_5652,
        n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    )
}
