//! The webhook API: `/v1/webhooks…`. Owns request validation and response shapes; must never
//! render a secret except in the answer to create and rotate-secret.

use super::target::{self, ClientCache, Verdict};
use super::{
    lock, store, Endpoint, Registration, Status, WebhookError, Webhooks, DESCRIPTION_BYTES_LIMIT,
    MAX_ATTEMPTS_DEFAULT, MAX_ATTEMPTS_LIMIT, TYPES_LIMIT,
};
use crate::bus::FILTER_PATTERN_BYTES_LIMIT;
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiJson;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use quiver_model::time::{now_ms, rfc3339_ms};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

type Hooks = State<Arc<Webhooks>>;

/// The webhook routes, with their own state (merge into the app router).
pub fn router<S: Clone + Send + Sync + 'static>(hooks: Arc<Webhooks>) -> Router<S> {
    Router::new()
        .route("/v1/webhooks", post(create).get(list))
        .route("/v1/webhooks/{id}", get(read).patch(patch).delete(remove))
        .route("/v1/webhooks/{id}/pause", post(pause))
        .route("/v1/webhooks/{id}/resume", post(resume))
        .route("/v1/webhooks/{id}/rotate-secret", post(rotate_secret))
        .route("/v1/webhooks/{id}/test", post(test))
        .route("/v1/webhooks/{id}/deliveries", get(deliveries))
        .route(
            "/v1/webhooks/{id}/deliveries/{seq}/retry",
            post(retry_delivery),
        )
        .with_state(hooks)
}

fn view(reg: &Registration) -> Value {
    json!({
        "id": reg.id,
        "url": reg.url,
        "types": reg.types,
        "library_id": reg.library_id,
        "description": reg.description,
        "max_attempts": reg.max_attempts,
        "status": reg.status,
        "disabled_reason": reg.disabled_reason,
        "position": reg.position,
        "parked_count": reg.parked.len(),
        "created_at": rfc3339_ms(reg.created_at_ms),
        "updated_at": rfc3339_ms(reg.updated_at_ms),
    })
}

fn validate_types(types: &[String]) -> Result<(), WebhookError> {
    if types.is_empty() {
        return Err(WebhookError::Invalid(
            "types must name at least one event type pattern (\"*\" for all)".to_string(),
        ));
    }
    if types.len() > TYPES_LIMIT {
        return Err(WebhookError::Invalid(format!(
            "{} type patterns; the limit is {TYPES_LIMIT}",
            types.len()
        )));
    }
    for t in types {
        if t.trim().is_empty() || t.len() > FILTER_PATTERN_BYTES_LIMIT || t.contains(',') {
            return Err(WebhookError::Invalid(format!(
                "type pattern {t:?} must be 1 to {FILTER_PATTERN_BYTES_LIMIT} bytes without commas"
            )));
        }
    }
    Ok(())
}

fn validate_max_attempts(n: u32) -> Result<u32, WebhookError> {
    if n == 0 || n > MAX_ATTEMPTS_LIMIT {
        return Err(WebhookError::Invalid(format!(
            "max_attempts must be 1 to {MAX_ATTEMPTS_LIMIT}"
        )));
    }
    Ok(n)
}

fn validate_description(d: &Option<String>) -> Result<(), WebhookError> {
    if d.as_ref()
        .is_some_and(|d| d.len() > DESCRIPTION_BYTES_LIMIT)
    {
        return Err(WebhookError::Invalid(format!(
            "description is longer than {DESCRIPTION_BYTES_LIMIT} bytes"
        )));
    }
    Ok(())
}

fn validate_library_id(l: &Option<String>) -> Result<(), WebhookError> {
    if l.as_ref().is_some_and(|l| l.is_empty() || l.len() > 256) {
        return Err(WebhookError::Invalid(
            "library_id must be 1 to 256 bytes".to_string(),
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    url: String,
    types: Vec<String>,
    library_id: Option<String>,
    description: Option<String>,
    max_attempts: Option<u32>,
}

async fn create(State(hooks): Hooks, ApiJson(req): ApiJson<CreateWebhook>) -> ApiResult<Response> {
    let shared = &hooks.shared;
    let url = target::parse_url(&req.url)?;
    validate_types(&req.types)?;
    validate_description(&req.description)?;
    validate_library_id(&req.library_id)?;
    let max_attempts = validate_max_attempts(req.max_attempts.unwrap_or(MAX_ATTEMPTS_DEFAULT))?;
    target::check_registration(&url, shared.config.allow_private).await?;
    if *shared.shutdown.borrow() {
        return Err(WebhookError::Stopped.into());
    }
    let now = now_ms();
    let reg = Registration {
        id: uuid::Uuid::new_v4().to_string(),
        url: req.url,
        types: req.types,
        library_id: req.library_id,
        description: req.description,
        max_attempts,
        secret: target::new_secret(),
        status: Status::Active,
        disabled_reason: None,
        // From now: events durable before the endpoint existed are not delivered.
        position: shared.engine.log().durable_seq(),
        parked: Default::default(),
        created_at_ms: now,
        updated_at_ms: now,
    };
    let ep = Endpoint::new(reg.clone());
    {
        let mut eps = lock(&shared.endpoints);
        if eps.len() >= shared.config.endpoints_limit {
            return Err(WebhookError::TooMany(shared.config.endpoints_limit).into());
        }
        eps.insert(reg.id.clone(), Arc::clone(&ep));
    }
    if let Err(e) = store::save(shared, &ep).await {
        lock(&shared.endpoints).remove(&reg.id);
        return Err(e.into());
    }
    shared.spawn_worker(ep);
    let mut body = view(&reg);
    body["secret"] = Value::String(reg.secret.clone());
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn list(State(hooks): Hooks) -> Json<Value> {
    let eps: Vec<Arc<Endpoint>> = lock(&hooks.shared.endpoints).values().cloned().collect();
    let items: Vec<Value> = eps.iter().map(|e| view(&lock(&e.reg))).collect();
    Json(json!({"webhooks": items, "total": items.len()}))
}

async fn read(State(hooks): Hooks, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let ep = hooks.shared.endpoint(&id)?;
    let v = view(&lock(&ep.reg));
    Ok(Json(v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchWebhook {
    url: Option<String>,
    types: Option<Vec<String>>,
    #[serde(default, with = "double_option")]
    library_id: Option<Option<String>>,
    #[serde(default, with = "double_option")]
    description: Option<Option<String>>,
    max_attempts: Option<u32>,
}

/// `null` (clear) versus absent (keep) for optional fields.
mod double_option {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

async fn patch(
    State(hooks): Hooks,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<PatchWebhook>,
) -> ApiResult<Json<Value>> {
    let shared = &hooks.shared;
    let ep = shared.endpoint(&id)?;
    if let Some(u) = &req.url {
        let url = target::parse_url(u)?;
        target::check_registration(&url, shared.config.allow_private).await?;
    }
    if let Some(t) = &req.types {
        validate_types(t)?;
    }
    if let Some(d) = &req.description {
        validate_description(d)?;
    }
    if let Some(l) = &req.library_id {
        validate_library_id(l)?;
    }
    let max_attempts = req.max_attempts.map(validate_max_attempts).transpose()?;
    {
        let mut reg = lock(&ep.reg);
        if let Some(u) = req.url {
            reg.url = u;
        }
        if let Some(t) = req.types {
            reg.types = t;
        }
        if let Some(l) = req.library_id {
            reg.library_id = l;
        }
        if let Some(d) = req.description {
            reg.description = d;
        }
        if let Some(m) = max_attempts {
            reg.max_attempts = m;
        }
        reg.updated_at_ms = now_ms();
    }
    store::save(shared, &ep).await?;
    ep.changed();
    let v = view(&lock(&ep.reg));
    Ok(Json(v))
}

async fn remove(State(hooks): Hooks, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let shared = &hooks.shared;
    let ep = shared.endpoint(&id)?;
    store::remove(shared, &ep).await?;
    lock(&shared.endpoints).remove(&id);
    ep.changed();
    Ok(StatusCode::NO_CONTENT)
}

async fn set_status(hooks: &Webhooks, id: &str, status: Status) -> ApiResult<Json<Value>> {
    let shared = &hooks.shared;
    let ep = shared.endpoint(id)?;
    {
        let mut reg = lock(&ep.reg);
        reg.status = status;
        if status == Status::Active {
            reg.disabled_reason = None;
        }
        reg.updated_at_ms = now_ms();
    }
    store::save(shared, &ep).await?;
    ep.changed();
    let v = view(&lock(&ep.reg));
    Ok(Json(v))
}

async fn pause(State(hooks): Hooks, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    set_status(&hooks, &id, Status::Paused).await
}

/// Resumes a paused endpoint, or re-enables one a 410 disabled.
async fn resume(State(hooks): Hooks, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    set_status(&hooks, &id, Status::Active).await
}

async fn rotate_secret(State(hooks): Hooks, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let shared = &hooks.shared;
    let ep = shared.endpoint(&id)?;
    let secret = target::new_secret();
    {
        let mut reg = lock(&ep.reg);
        reg.secret = secret.clone();
        reg.updated_at_ms = now_ms();
    }
    store::save(shared, &ep).await?;
    Ok(Json(json!({"id": id, "secret": secret})))
}

/// Sends one `webhook.test` event now and reports how it went (not retried, not recorded in
/// the position; it does take a global delivery permit).
async fn test(State(hooks): Hooks, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let shared = &hooks.shared;
    let ep = shared.endpoint(&id)?;
    let (url, secret, library_id) = {
        let reg = lock(&ep.reg);
        (reg.url.clone(), reg.secret.clone(), reg.library_id.clone())
    };
    let now = now_ms();
    let msg_id = format!("test-{}", uuid::Uuid::new_v4());
    let body = json!({
        "specversion": "1.0",
        "id": msg_id,
        "source": "quiver",
        "type": "webhook.test",
        "time": rfc3339_ms(now),
        "subject": library_id,
        "datacontenttype": "application/json",
        "data": {"webhook_id": id},
    })
    .to_string();
    let result = {
        let _permit = shared
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::from(WebhookError::Stopped))?;
        let mut cache = ClientCache::default();
        target::send(
            &mut cache,
            &url,
            shared.config.allow_private,
            shared.config.request_timeout,
            &secret,
            &msg_id,
            body.as_bytes(),
        )
        .await
    };
    Ok(Json(json!({
        "success": result.verdict == Verdict::Delivered,
        "webhook_id": msg_id,
        "response_code": result.response_code,
        "latency_ms": result.latency_ms,
        "error": result.error,
    })))
}

async fn deliveries(State(hooks): Hooks, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let ep = hooks.shared.endpoint(&id)?;
    let items: Vec<Value> = lock(&ep.history).iter().rev().map(|d| json!(d)).collect();
    let (parked, position) = {
        let reg = lock(&ep.reg);
        (reg.parked.iter().copied().collect::<Vec<_>>(), reg.position)
    };
    Ok(Json(json!({
        "webhook_id": id,
        "position": position,
        "parked": parked,
        "deliveries": items,
    })))
}

async fn retry_delivery(
    State(hooks): Hooks,
    Path((id, seq)): Path<(String, String)>,
) -> ApiResult<Response> {
    let ep = hooks.shared.endpoint(&id)?;
    let seq: u64 = seq
        .parse()
        .map_err(|_| ApiError::bad_request("invalid_seq", format!("{seq:?} is not a seq")))?;
    if !lock(&ep.reg).parked.contains(&seq) {
        return Err(WebhookError::NotParked { id, seq }.into());
    }
    {
        let mut q = lock(&ep.retry_queue);
        if !q.contains(&seq) {
            q.push_back(seq);
        }
    }
    ep.changed();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"webhook_id": id, "seq": seq, "status": "queued"})),
    )
        .into_response())
}
