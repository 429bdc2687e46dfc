//! The routes of durable consumer groups, projections and semantic subscriptions.
//!
//! This module owns the HTTP face of `quiver-consumers`: `/v1/consumers…` (create, list,
//! inspect, delete, `next` with long-poll, ack, nack, parked, retry), the live per-library
//! statistics projection (`/v1/libraries/{id}/statistics`, `/v1/projections/library_stats…`)
//! and the `near` part of SSE streams and consumers (turning a query's vector or text into a
//! [`NearSpec`], and testing a frame's record against it). It reads events only from the log
//! (`FileLog::read_from`), filters them with the bus's [`EventFilter`] and renders them with
//! the bus's [`EventFrame`], so a consumer sees exactly the envelopes the stream shows.
//!
//! It must never answer `next` or an ack before the consumer's new state is on disk (an
//! acked event must never come back after a restart; a leased one may — at least once), never
//! block an async worker on disk I/O (reads and writes run on the blocking pool), never wait
//! without bound (`wait_ms` ≤ 30 s, and every long-poll ends with the bus), and never hide an
//! event that retention deleted first: the consumer counts it and says so.

use crate::bus::{Bus, EventFilter, EventFrame};
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiJson;
use crate::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use quiver_consumers::group::ConsumerConfig;
use quiver_consumers::limits::*;
use quiver_consumers::projection::RebuildReport;
use quiver_consumers::{
    Consumer, ConsumerError, LibraryStatsProjection, NearMatch, NearSpec, ProjectionRunner,
    Registry,
};
use quiver_engine::events::event_of;
use quiver_engine::Engine;
use quiver_log::{FileLog, LogError, Seq};
use quiver_model::time::{now_ms, rfc3339_ms};
use quiver_model::Record;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

/// Records one log read of a consumer scans.
pub const SCAN_PAGE_RECORDS: usize = 256;
/// About the most payload bytes of one scan read.
pub const SCAN_PAGE_BYTES: usize = 1 << 20;
/// Pages one `next` scans before it leases what it found (a long-poll then scans on).
pub const SCAN_PAGES_PER_ROUND: usize = 16;
/// Default `max` of `next`.
pub const NEXT_MAX_DEFAULT: usize = 10;
/// Most parked events one listing returns.
pub const PARKED_LIST_LIMIT: usize = 1000;
/// Longest a rebuild waits for the live projection to reach the current durable seq.
pub const PROJECTION_WAIT_MS: u64 = 5000;

/// The consumer registry and the projections of one server; shared through an
/// `Extension` so `AppState` keeps its shape.
pub struct Service {
    pub registry: Registry,
    pub library_stats: Arc<ProjectionRunner<LibraryStatsProjection>>,
}

impl Service {
    /// Loads the consumers of the engine's data directory and starts the library statistics
    /// projection; both stop with the bus. Must run inside a tokio runtime.
    pub fn start(engine: &Arc<Engine>, bus: &Arc<Bus>) -> Arc<Service> {
        let data_dir = engine.config().data_dir.clone();
        let registry = Registry::open(data_dir.join("consumers"));
        let library_stats =
            ProjectionRunner::open(Arc::clone(engine.log()), &data_dir.join("projections"));
        library_stats.start();
        // Stop with the bus (checked through a weak handle, so this task never keeps the bus
        // alive); the runner also stops by itself when the log closes.
        let stopper = Arc::clone(&library_stats);
        let bus = Arc::downgrade(bus);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                match bus.upgrade() {
                    Some(b) if b.is_running() => {}
                    _ => break,
                }
            }
            stopper.stop();
        });
        let service = Arc::new(Service {
            registry,
            library_stats,
        });
        // Log retention keeps what a consumer has not acked (within the reader limit).
        let weak = Arc::downgrade(&service);
        engine.set_retention_hold(
            "consumers",
            Box::new(move || weak.upgrade().and_then(|s| s.registry.oldest_needed())),
        );
        service
    }
}

/// The routes of this module, to merge into the main router (which adds the `Extension`).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/consumers", post(create).get(list))
        .route("/v1/consumers/{name}", get(inspect).delete(remove))
        .route("/v1/consumers/{name}/next", get(next))
        .route("/v1/consumers/{name}/ack", post(ack))
        .route("/v1/consumers/{name}/nack", post(nack))
        .route("/v1/consumers/{name}/parked", get(parked))
        .route("/v1/consumers/{name}/parked/{seq}/retry", post(retry))
        .route("/v1/libraries/{id}/statistics", get(library_statistics))
        .route("/v1/projections/library_stats", get(projection_state))
        .route("/v1/projections/library_stats/rebuild", post(rebuild))
}

type Svc = Extension<Arc<Service>>;

impl From<ConsumerError> for ApiError {
    fn from(e: ConsumerError) -> Self {
        let detail = e.to_string();
        match e {
            ConsumerError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "consumer_not_found", detail)
            }
            ConsumerError::Exists(_) => {
                ApiError::new(StatusCode::CONFLICT, "consumer_exists", detail)
            }
            ConsumerError::Invalid { code, .. } => ApiError::unprocessable(code, detail),
            ConsumerError::TooMany { .. } => {
                ApiError::new(StatusCode::CONFLICT, "too_many_consumers", detail)
            }
            ConsumerError::NotParked { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "not_parked", detail)
            }
            ConsumerError::Unreadable { .. } => {
                tracing::error!("{detail}");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "consumer_unreadable",
                    detail,
                )
            }
            ConsumerError::Expired(_) => ApiError::new(StatusCode::GONE, "events_expired", detail),
            ConsumerError::Log(_) | ConsumerError::Io { .. } => {
                tracing::error!("consumer storage failed: {detail}");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", detail)
            }
        }
    }
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
}

/// Runs blocking I/O on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ConsumerError> + Send + 'static,
) -> ApiResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("a storage task failed: {e}"),
        )),
    }
}

fn json_body(body: String) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

// ------------------------------------------------------------------ near

/// The wire shape of `near` in a consumer body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NearInput {
    #[serde(default)]
    embedding: Option<Vec<f32>>,
    #[serde(default)]
    embedding_b64: Option<String>,
    #[serde(default)]
    query: Option<String>,
    max_distance: Option<f32>,
    /// A metadata filter (the search filter language) a matching chunk must also pass.
    #[serde(default)]
    filter: Option<Value>,
}

/// Builds a [`NearSpec`] for a library: exactly one of a vector (`embedding`, or base64 of
/// little-endian f32), or a text `query` embedded by the engine's embedder; a finite
/// `max_distance`. The vector is checked against the library's dimension and normalised for
/// cosine, as search does.
pub fn near_spec(
    engine: &Engine,
    library_id: Option<&str>,
    input: NearInput,
) -> ApiResult<NearSpec> {
    let Some(library_id) = library_id else {
        return Err(ApiError::unprocessable(
            "near_requires_library",
            "a `near` subscription needs `library_id`: distances are measured in one library's vector space and metric",
        ));
    };
    let (info, _) = engine.library(library_id)?;
    let library = info.library;
    let max_distance = match input.max_distance {
        Some(d) if d.is_finite() => d,
        Some(_) => {
            return Err(ApiError::unprocessable(
                "invalid_max_distance",
                "max_distance must be a finite number",
            ))
        }
        None => {
            return Err(ApiError::unprocessable(
                "missing_max_distance",
                "`near` needs `max_distance` (the largest distance, under the library's metric, that is delivered)",
            ))
        }
    };
    let given = [
        input.embedding.is_some(),
        input.embedding_b64.is_some(),
        input.query.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if given != 1 {
        return Err(ApiError::unprocessable(
            "invalid_near",
            "`near` needs exactly one of `embedding`, `embedding_b64` or `query`",
        ));
    }
    let invalid = |i: quiver_model::validate::Invalid| ApiError::unprocessable(i.code, i.detail);
    let (vector, query) = match (input.embedding, input.embedding_b64, input.query) {
        (Some(v), _, _) => (v, None),
        (_, Some(b64), _) => (
            quiver_model::validate::vector_b64(&b64).map_err(invalid)?,
            None,
        ),
        (_, _, Some(text)) => (embed_query(engine, &library.id, &text)?, Some(text)),
        _ => unreachable!("exactly one is set, checked above"),
    };
    let embedding = quiver_model::validate::vector(vector, library.dimension, library.metric)
        .map_err(invalid)?;
    NearSpec::new(embedding, max_distance, library.metric, query)
        .with_filter(input.filter)
        .map_err(invalid)
}

/// Embeds `text` with the engine's embedder for `library` (its model, query purpose): with no
/// embedding model that answers 422 `embedding_unavailable`, as search does.
fn embed_query(engine: &Engine, library: &str, text: &str) -> ApiResult<Vec<f32>> {
    if text.trim().is_empty() {
        return Err(ApiError::unprocessable(
            "invalid_near",
            "near.query is empty",
        ));
    }
    Ok(engine.embed_query(library, text)?)
}

/// Parses `near_embedding=` of a stream: comma-separated floats, or base64 of f32 LE.
pub fn parse_near_embedding(text: &str) -> ApiResult<NearInput> {
    let text = text.trim();
    if text.contains(',') || text.parse::<f32>().is_ok() {
        let mut v = Vec::new();
        for (i, part) in text.split(',').enumerate() {
            if v.len() >= quiver_model::limits::DIMENSION_LIMIT {
                return Err(ApiError::unprocessable(
                    "invalid_vector",
                    format!(
                        "near_embedding has more than {} values",
                        quiver_model::limits::DIMENSION_LIMIT
                    ),
                ));
            }
            v.push(part.trim().parse::<f32>().map_err(|_| {
                ApiError::bad_request(
                    "invalid_near_embedding",
                    format!("near_embedding value {i} ({part:?}) is not a number"),
                )
            })?);
        }
        Ok(NearInput {
            embedding: Some(v),
            embedding_b64: None,
            query: None,
            max_distance: None,
            filter: None,
        })
    } else {
        Ok(NearInput {
            embedding: None,
            embedding_b64: Some(text.to_string()),
            query: None,
            max_distance: None,
            filter: None,
        })
    }
}

/// The `near` of an SSE stream from its query parameters, if any was given.
pub fn stream_near(
    engine: &Engine,
    library_id: Option<&str>,
    near_embedding: Option<&str>,
    near_query: Option<String>,
    max_distance: Option<f32>,
    near_filter: Option<&str>,
) -> ApiResult<Option<Arc<NearSpec>>> {
    let near_query = near_query.filter(|q| !q.is_empty());
    let near_embedding = near_embedding.filter(|e| !e.trim().is_empty());
    if near_embedding.is_none() && near_query.is_none() {
        if max_distance.is_some() || near_filter.is_some_and(|f| !f.trim().is_empty()) {
            return Err(ApiError::bad_request(
                "invalid_near",
                "max_distance and near_filter need near_embedding or near_query",
            ));
        }
        return Ok(None);
    }
    let mut input = match near_embedding {
        Some(e) => parse_near_embedding(e)?,
        None => NearInput {
            embedding: None,
            embedding_b64: None,
            query: None,
            max_distance: None,
            filter: None,
        },
    };
    input.query = near_query;
    input.max_distance = max_distance;
    input.filter = match near_filter.filter(|f| !f.trim().is_empty()) {
        None => None,
        Some(text) => Some(serde_json::from_str::<Value>(text).map_err(|e| {
            ApiError::bad_request("invalid_filter", format!("near_filter is not JSON: {e}"))
        })?),
    };
    near_spec(engine, library_id, input).map(|n| Some(Arc::new(n)))
}

/// Whether an event type can carry vectors (only these can be near anything).
fn may_be_near(event_type: &str) -> bool {
    matches!(
        event_type,
        "document.added" | "document.updated" | "chunk.added"
    )
}

/// Tests a frame of the live stream against `near`: reads its record again from the log
/// (frames do not keep vectors, so the live tail stays small) and returns the closest chunk
/// within the distance.
pub async fn near_check_frame(
    log: &Arc<FileLog>,
    near: &Arc<NearSpec>,
    frame: &EventFrame,
) -> Option<NearMatch> {
    if !may_be_near(frame.event_type()) {
        return None;
    }
    let (log, near, seq) = (Arc::clone(log), Arc::clone(near), frame.seq);
    tokio::task::spawn_blocking(move || {
        let records = log.read_from(seq, 1, 1).ok()?;
        let (got, payload) = records.into_iter().next()?;
        if got != seq {
            return None;
        }
        let record = Record::decode(&payload).ok()?;
        near.check(&record)
    })
    .await
    .ok()
    .flatten()
}

/// An envelope with extra members spliced in before its closing brace.
pub fn with_members(envelope: &str, members: &[(&str, Value)]) -> String {
    let Some(body) = envelope.strip_suffix('}') else {
        return envelope.to_string();
    };
    let mut out = String::with_capacity(envelope.len() + 64);
    out.push_str(body);
    for (k, v) in members {
        let _ = write!(out, ",\"{k}\":{v}");
    }
    out.push('}');
    out
}

// ------------------------------------------------------------------ create, list, inspect

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateConsumer {
    name: String,
    #[serde(default)]
    types: Option<Value>,
    #[serde(default)]
    library_id: Option<String>,
    #[serde(default)]
    start: Option<Value>,
    #[serde(default)]
    ack_wait_ms: Option<u64>,
    #[serde(default)]
    max_deliver: Option<u32>,
    #[serde(default)]
    near: Option<NearInput>,
}

fn types_text(types: Option<Value>) -> ApiResult<Option<String>> {
    match types {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Array(items)) => {
            let mut parts = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(s) if !s.contains(',') => parts.push(s),
                    _ => {
                        return Err(ApiError::unprocessable(
                            "invalid_types",
                            "types must be a list of type patterns (strings without commas) or one comma-separated string",
                        ))
                    }
                }
            }
            Ok(Some(parts.join(",")))
        }
        Some(_) => Err(ApiError::unprocessable(
            "invalid_types",
            "types must be a list of strings or a comma-separated string",
        )),
    }
}

fn start_seq(start: Option<Value>, log: &FileLog) -> ApiResult<Seq> {
    let durable = log.durable_seq();
    let first = log.first_seq().max(1);
    let bad = |what: String| {
        ApiError::unprocessable(
            "invalid_start",
            format!("start {what} is not \"beginning\", \"now\" or a seq (a whole number ≥ 1)"),
        )
    };
    let seq = match start {
        None | Some(Value::Null) => return Ok(durable + 1),
        Some(Value::String(s)) => match s.as_str() {
            "beginning" | "first" => return Ok(first),
            "now" | "new" | "end" => return Ok(durable + 1),
            other => other
                .parse::<Seq>()
                .map_err(|_| bad(format!("{other:?}")))?,
        },
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| bad(n.to_string()))?,
        Some(other) => return Err(bad(other.to_string())),
    };
    if seq == 0 {
        return Err(bad("0".into()));
    }
    if seq < first {
        return Err(ApiError::new(
            StatusCode::GONE,
            "events_expired",
            format!(
                "events from seq {seq} are no longer retained; the oldest available seq is {first}"
            ),
        ));
    }
    Ok(seq)
}

pub async fn create(
    State(s): State<AppState>,
    Extension(svc): Svc,
    ApiJson(req): ApiJson<CreateConsumer>,
) -> ApiResult<Response> {
    quiver_consumers::group::validate_name(&req.name)?;
    let types = types_text(req.types)?;
    let filter = crate::events::filter_of(&s, types.as_deref(), req.library_id)?;
    let near = match req.near {
        None => None,
        Some(n) => Some(near_spec(&s.engine, filter.library_id.as_deref(), n)?),
    };
    let start_seq = start_seq(req.start, s.bus.log())?;
    let config = ConsumerConfig {
        name: req.name,
        types: filter.types,
        library_id: filter.library_id,
        near,
        ack_wait_ms: req.ack_wait_ms.unwrap_or(ACK_WAIT_MS_DEFAULT),
        max_deliver: req.max_deliver.unwrap_or(MAX_DELIVER_DEFAULT),
        start_seq,
        created_at_ms: now_ms(),
    };
    config.validate()?;
    let svc2 = Arc::clone(&svc);
    let consumer = blocking(move || svc2.registry.create(config)).await?;
    Ok((
        StatusCode::CREATED,
        Json(info_json(&consumer, s.bus.log().durable_seq())),
    )
        .into_response())
}

fn info_json(c: &Consumer, last_seq: Seq) -> Value {
    let info = c.info(last_seq, now_ms());
    let mut v = serde_json::to_value(&info).unwrap_or_else(|_| json!({"name": c.name()}));
    if let Some(m) = v.as_object_mut() {
        m.remove("created_at_ms");
        m.insert("created_at".into(), json!(rfc3339_ms(info.created_at_ms)));
    }
    v
}

pub async fn list(State(s): State<AppState>, Extension(svc): Svc) -> Json<Value> {
    let last = s.bus.log().durable_seq();
    Json(json!({
        "consumers": svc.registry.list().iter().map(|c| info_json(c, last)).collect::<Vec<_>>(),
        "unreadable": svc.registry.broken(),
        "limit": CONSUMERS_LIMIT,
    }))
}

pub async fn inspect(
    State(s): State<AppState>,
    Extension(svc): Svc,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let c = svc.registry.get(&name)?;
    Ok(Json(info_json(&c, s.bus.log().durable_seq())))
}

pub async fn remove(Extension(svc): Svc, Path(name): Path<String>) -> ApiResult<StatusCode> {
    blocking(move || svc.registry.delete(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ------------------------------------------------------------------ next

#[derive(Deserialize, Default)]
pub struct NextQuery {
    max: Option<usize>,
    wait_ms: Option<u64>,
}

struct ScanPage {
    matched: Vec<Seq>,
    end_seq: Option<Seq>,
    decode_errors: u64,
}

fn scan_blocking(
    log: &FileLog,
    from: Seq,
    filter: &EventFilter,
    near: Option<&NearSpec>,
) -> Result<ScanPage, LogError> {
    let records = log.read_from(from, SCAN_PAGE_RECORDS, SCAN_PAGE_BYTES)?;
    let end_seq = records.last().map(|(seq, _)| *seq);
    let mut matched = Vec::new();
    let mut decode_errors = 0;
    for (seq, payload) in records {
        let record = match Record::decode(&payload) {
            Ok(r) => r,
            Err(error) => {
                tracing::error!(seq, %error, "a log record does not decode; its event is skipped");
                decode_errors += 1;
                continue;
            }
        };
        if filter.matches(record.change.event_type(), record.change.library_id())
            && near.is_none_or(|n| n.check(&record).is_some())
        {
            matched.push(seq);
        }
    }
    Ok(ScanPage {
        matched,
        end_seq,
        decode_errors,
    })
}

fn filter_of_consumer(c: &Consumer) -> EventFilter {
    EventFilter {
        types: c.config().types.clone(),
        library_id: c.config().library_id.clone(),
    }
}

/// Reads new events into the consumer's pending list while it has room (bounded rounds).
async fn fill(bus: &Bus, c: &Arc<Consumer>) -> ApiResult<()> {
    let log = Arc::clone(bus.log());
    for _ in 0..SCAN_PAGES_PER_ROUND {
        if c.room() == 0 {
            return Ok(());
        }
        let from = c.scan_position() + 1;
        if from > log.durable_seq() {
            return Ok(());
        }
        let first = log.first_seq();
        if from < first {
            c.skip_expired(first);
            bus.count_error("consumer_expired");
            continue;
        }
        let (log2, c2) = (Arc::clone(&log), Arc::clone(c));
        let scanned = tokio::task::spawn_blocking(move || {
            let filter = filter_of_consumer(&c2);
            scan_blocking(&log2, from, &filter, c2.config().near.as_ref())
        })
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the log reader task failed: {e}"),
            )
        })?;
        match scanned {
            Ok(page) => {
                for _ in 0..page.decode_errors {
                    bus.count_error("decode");
                }
                match page.end_seq {
                    Some(end) => c.offer(&page.matched, end),
                    None => return Ok(()),
                }
            }
            Err(LogError::Compacted {
                first_available, ..
            }) => {
                c.skip_expired(first_available);
                bus.count_error("consumer_expired");
            }
            Err(e) => return Err(ConsumerError::Log(e).into()),
        }
    }
    Ok(())
}

/// Rendered envelopes by seq, with the `near` match of each.
type Fetched = BTreeMap<Seq, (String, Option<NearMatch>)>;

/// Reads the records at `seqs` (ascending) and renders each envelope with `extra` members;
/// returns them and the seqs retention already deleted.
fn fetch_blocking(
    log: &FileLog,
    seqs: &[Seq],
    near: Option<&NearSpec>,
) -> Result<(Fetched, Vec<Seq>), LogError> {
    let mut found = BTreeMap::new();
    let mut expired = Vec::new();
    let mut i = 0;
    while i < seqs.len() {
        let from = seqs[i];
        // Read at most up to the last wanted seq within one page's reach.
        let mut j = i;
        while j + 1 < seqs.len() && seqs[j + 1] - from < SCAN_PAGE_RECORDS as Seq {
            j += 1;
        }
        let want = (seqs[j] - from + 1) as usize;
        match log.read_from(from, want, SCAN_PAGE_BYTES) {
            Ok(records) => {
                let Some(last) = records.last().map(|(s, _)| *s) else {
                    break;
                };
                for (seq, payload) in records {
                    if seqs[i..=j].binary_search(&seq).is_err() {
                        continue;
                    }
                    if let Ok(record) = Record::decode(&payload) {
                        let near_match = near.and_then(|n| n.check(&record));
                        let frame = EventFrame::new(event_of(seq, &record));
                        found.insert(seq, (frame.json.to_string(), near_match));
                    }
                }
                while i < seqs.len() && seqs[i] <= last {
                    i += 1;
                }
            }
            Err(LogError::Compacted {
                first_available, ..
            }) => {
                while i < seqs.len() && seqs[i] < first_available {
                    expired.push(seqs[i]);
                    i += 1;
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok((found, expired))
}

/// `GET /v1/consumers/{name}/next?max=&wait_ms=`: leases up to `max` events to this caller.
pub async fn next(
    State(s): State<AppState>,
    Extension(svc): Svc,
    Path(name): Path<String>,
    q: Result<Query<NextQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    let max = q.max.unwrap_or(NEXT_MAX_DEFAULT);
    if max == 0 || max > NEXT_MAX_LIMIT {
        return Err(ApiError::bad_request(
            "invalid_max",
            format!("max must be between 1 and {NEXT_MAX_LIMIT}"),
        ));
    }
    let wait_ms = q.wait_ms.unwrap_or(0);
    if wait_ms > WAIT_MS_LIMIT {
        return Err(ApiError::bad_request(
            "invalid_wait_ms",
            format!("wait_ms must be at most {WAIT_MS_LIMIT}"),
        ));
    }
    let c = svc.registry.get(&name)?;
    let log = Arc::clone(s.bus.log());
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    let mut durable_rx = log.watch_durable();
    let leases = loop {
        let notified = c.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        fill(&s.bus, &c).await?;
        let now = now_ms();
        let leases = c.lease(max, now);
        if !leases.is_empty() || tokio::time::Instant::now() >= deadline {
            break leases;
        }
        let scanned = c.scan_position();
        let has_room = c.room() > 0;
        if has_room && log.durable_seq() > scanned {
            continue;
        }
        let wake_at = match c.next_due_ms(now) {
            Some(t) => deadline.min(tokio::time::Instant::now() + Duration::from_millis(t - now)),
            None => deadline,
        };
        tokio::select! {
            r = durable_rx.wait_for(|d| *d > scanned), if has_room => {
                if r.is_err() { break leases; }
            }
            () = tokio::time::sleep_until(wake_at) => {}
            () = &mut notified => {}
            () = s.bus.stopped() => break leases,
        }
    };
    // The leases (and delivery counts) are on disk before anyone sees them.
    let c2 = Arc::clone(&c);
    blocking(move || c2.persist()).await?;
    let seqs: Vec<Seq> = leases.iter().map(|l| l.seq).collect();
    let (log2, c2) = (Arc::clone(&log), Arc::clone(&c));
    let (found, expired) = blocking(move || {
        fetch_blocking(&log2, &seqs, c2.config().near.as_ref()).map_err(ConsumerError::Log)
    })
    .await?;
    if !expired.is_empty() {
        c.expire_pending(&expired);
        s.bus.count_error("consumer_expired");
        let c2 = Arc::clone(&c);
        blocking(move || c2.persist()).await?;
    }
    let mut body =
        String::with_capacity(128 + found.values().map(|(j, _)| j.len() + 32).sum::<usize>());
    body.push_str("{\"events\":[");
    let mut first = true;
    for lease in &leases {
        let Some((envelope, near_match)) = found.get(&lease.seq) else {
            continue;
        };
        if !first {
            body.push(',');
        }
        first = false;
        let mut members = vec![("deliveries", json!(lease.deliveries))];
        if let Some(m) = near_match {
            members.push(("near", m.json()));
        }
        body.push_str(&with_members(envelope, &members));
    }
    let info = c.info(log.durable_seq(), now_ms());
    let _ = write!(
        body,
        "],\"consumer\":{},\"pending\":{},\"lag\":{},\"last_seq\":{},\"expired\":{}}}",
        json!(c.name()),
        info.pending,
        info.lag,
        info.last_seq,
        json!(expired)
    );
    Ok(json_body(body))
}

// ------------------------------------------------------------------ ack, nack

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckBody {
    seqs: Vec<Seq>,
    #[serde(default)]
    delay_ms: Option<u64>,
}

fn check_batch(seqs: &[Seq]) -> ApiResult<()> {
    if seqs.is_empty() || seqs.len() > ACK_BATCH_LIMIT {
        return Err(ApiError::unprocessable(
            "invalid_seqs",
            format!("seqs must hold 1 to {ACK_BATCH_LIMIT} seqs"),
        ));
    }
    Ok(())
}

/// `POST …/ack {seqs}`: answered once the acks are on disk.
pub async fn ack(
    Extension(svc): Svc,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<AckBody>,
) -> ApiResult<Json<Value>> {
    check_batch(&body.seqs)?;
    if body.delay_ms.is_some() {
        return Err(ApiError::unprocessable(
            "invalid_request",
            "delay_ms belongs to nack",
        ));
    }
    let c = svc.registry.get(&name)?;
    let outcome = c.ack(&body.seqs);
    let c2 = Arc::clone(&c);
    blocking(move || c2.persist()).await?;
    Ok(Json(
        json!({"acked": outcome.done, "not_pending": outcome.not_pending}),
    ))
}

/// `POST …/nack {seqs, delay_ms?}`: releases leases; the events fall due after the delay.
pub async fn nack(
    Extension(svc): Svc,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<AckBody>,
) -> ApiResult<Json<Value>> {
    check_batch(&body.seqs)?;
    let delay_ms = body.delay_ms.unwrap_or(0);
    if delay_ms > NACK_DELAY_MS_LIMIT {
        return Err(ApiError::unprocessable(
            "invalid_delay_ms",
            format!("delay_ms must be at most {NACK_DELAY_MS_LIMIT}"),
        ));
    }
    let c = svc.registry.get(&name)?;
    let outcome = c.nack(&body.seqs, delay_ms, now_ms());
    let c2 = Arc::clone(&c);
    blocking(move || c2.persist()).await?;
    Ok(Json(
        json!({"nacked": outcome.done, "not_pending": outcome.not_pending}),
    ))
}

// ------------------------------------------------------------------ parked

#[derive(Deserialize, Default)]
pub struct ParkedQuery {
    after: Option<Seq>,
    limit: Option<usize>,
}

/// `GET …/parked?after=&limit=`: parked events with their envelopes, oldest first.
pub async fn parked(
    State(s): State<AppState>,
    Extension(svc): Svc,
    Path(name): Path<String>,
    q: Result<Query<ParkedQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > PARKED_LIST_LIMIT {
        return Err(ApiError::bad_request(
            "invalid_limit",
            format!("limit must be between 1 and {PARKED_LIST_LIMIT}"),
        ));
    }
    let c = svc.registry.get(&name)?;
    let list = c.parked(q.after.unwrap_or(0), limit);
    let seqs: Vec<Seq> = list.iter().map(|(s, _)| *s).collect();
    let log = Arc::clone(s.bus.log());
    let (found, _) =
        blocking(move || fetch_blocking(&log, &seqs, None).map_err(ConsumerError::Log)).await?;
    let items: Vec<Value> = list
        .iter()
        .map(|(seq, e)| {
            json!({
                "seq": seq,
                "deliveries": e.deliveries,
                "parked_at": rfc3339_ms(e.parked_at_ms),
                "event": found
                    .get(seq)
                    .and_then(|(j, _)| serde_json::from_str::<Value>(j).ok()),
            })
        })
        .collect();
    Ok(Json(json!({
        "consumer": c.name(),
        "parked": items,
        "total": c.info(0, now_ms()).parked,
    })))
}

/// `POST …/parked/{seq}/retry`: the event is pending again with a fresh delivery count.
pub async fn retry(
    Extension(svc): Svc,
    Path((name, seq)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let seq: Seq = seq.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_seq",
            format!("{seq:?} is not a seq (a whole number)"),
        )
    })?;
    let c = svc.registry.get(&name)?;
    c.retry_parked(seq)?;
    let c2 = Arc::clone(&c);
    blocking(move || c2.persist()).await?;
    Ok(Json(json!({"seq": seq, "retried": true})))
}

// ------------------------------------------------------------------ projections

/// The projection's view of one library, resolving a name to its id like the other routes.
pub async fn library_statistics(
    State(s): State<AppState>,
    Extension(svc): Svc,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let library_id = match s.engine.library(&id) {
        Ok((info, _)) => info.library.id,
        Err(_) => id.clone(),
    };
    // Read-your-writes: wait (briefly) until the projection has applied what is durable.
    let durable = s.bus.log().durable_seq();
    svc.library_stats
        .wait_for(durable, Duration::from_millis(PROJECTION_WAIT_MS))
        .await;
    let error = svc.library_stats.error();
    svc.library_stats.read(|p, checkpoint| {
        let Some(stats) = p.get(&library_id) else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "library_not_found",
                format!("library {id:?} does not exist (as of seq {checkpoint})"),
            ));
        };
        let mut v = stats.to_json();
        v["seq"] = json!(checkpoint);
        v["projection_error"] = json!(error);
        Ok(Json(v))
    })
}

/// The whole projection, for statistics and for comparing a rebuild.
pub fn library_stats_json(svc: &Service) -> Value {
    let error = svc.library_stats.error();
    let decode_errors = svc.library_stats.decode_errors();
    svc.library_stats.read(|p, checkpoint| {
        json!({
            "checkpoint": checkpoint,
            "error": error,
            "decode_errors": decode_errors,
            "libraries": p.libraries.values().map(|l| (l.library_id.clone(), l.to_json())).collect::<serde_json::Map<_, _>>(),
        })
    })
}

pub async fn projection_state(State(s): State<AppState>, Extension(svc): Svc) -> Json<Value> {
    let durable = s.bus.log().durable_seq();
    svc.library_stats
        .wait_for(durable, Duration::from_millis(PROJECTION_WAIT_MS))
        .await;
    let mut v = library_stats_json(&svc);
    v["last_seq"] = json!(durable);
    Json(v)
}

/// `POST /v1/projections/library_stats/rebuild`: replays the log from seq 1 into a fresh
/// projection, compares it with the live one and replaces it.
pub async fn rebuild(State(s): State<AppState>, Extension(svc): Svc) -> ApiResult<Json<Value>> {
    let durable = s.bus.log().durable_seq();
    svc.library_stats
        .wait_for(durable, Duration::from_millis(PROJECTION_WAIT_MS))
        .await;
    let runner = Arc::clone(&svc.library_stats);
    let report: RebuildReport = blocking(move || runner.rebuild_blocking()).await?;
    let mut v = library_stats_json(&svc);
    v["rebuilt_through"] = json!(report.through);
    v["equal_to_live"] = json!(report.equal_to_live);
    Ok(Json(v))
}

// ------------------------------------------------------------------ statistics, metrics

/// Per consumer, for `/v1/events/statistics`.
pub fn consumers_stats_json(svc: &Service, last_seq: Seq) -> Value {
    let now = now_ms();
    Value::Array(
        svc.registry
            .list()
            .iter()
            .map(|c| {
                let i = c.info(last_seq, now);
                json!({
                    "name": i.name,
                    "filter": i.filter,
                    "position": i.ack_floor,
                    "next_seq": i.next_seq,
                    "lag": i.lag,
                    "pending": i.pending,
                    "leased": i.leased,
                    "parked": i.parked,
                    "delivered": i.counters.delivered,
                    "redelivered": i.counters.redelivered,
                    "acked": i.counters.acked,
                    "expired": i.counters.expired_unread + i.counters.expired_pending,
                    "last_error": i.last_error,
                })
            })
            .collect(),
    )
}

fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Consumer and projection figures in Prometheus text format.
pub fn write_metrics(out: &mut String, svc: &Service, last_seq: Seq) {
    let now = now_ms();
    let infos: Vec<_> = svc
        .registry
        .list()
        .iter()
        .map(|c| c.info(last_seq, now))
        .collect();
    let _ = writeln!(
        out,
        "# HELP quiver_consumers Durable consumer groups.\n# TYPE quiver_consumers gauge\nquiver_consumers {}",
        infos.len()
    );
    type Field = fn(&quiver_consumers::ConsumerInfo) -> u64;
    let series: [(&str, &str, &str, Field); 7] = [
        (
            "quiver_consumer_lag",
            "gauge",
            "Durable seqs past the consumer's ack floor.",
            |i| i.lag,
        ),
        (
            "quiver_consumer_pending",
            "gauge",
            "Events read and not yet acked.",
            |i| i.pending as u64,
        ),
        (
            "quiver_consumer_parked",
            "gauge",
            "Events parked after max_deliver.",
            |i| i.parked as u64,
        ),
        (
            "quiver_consumer_delivered_total",
            "counter",
            "Deliveries (leases) handed out.",
            |i| i.counters.delivered,
        ),
        (
            "quiver_consumer_redelivered_total",
            "counter",
            "Deliveries after the first.",
            |i| i.counters.redelivered,
        ),
        (
            "quiver_consumer_acked_total",
            "counter",
            "Events acked.",
            |i| i.counters.acked,
        ),
        (
            "quiver_consumer_expired_total",
            "counter",
            "Events retention deleted before the consumer finished them.",
            |i| i.counters.expired_unread + i.counters.expired_pending,
        ),
    ];
    for (name, kind, help, field) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for i in &infos {
            let _ = writeln!(
                out,
                "{name}{{consumer=\"{}\"}} {}",
                label(&i.name),
                field(i)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP quiver_projection_checkpoint_seq Seq a projection reflects.\n# TYPE quiver_projection_checkpoint_seq gauge\nquiver_projection_checkpoint_seq{{projection=\"library_stats\"}} {}",
        svc.library_stats.checkpoint()
    );
}
