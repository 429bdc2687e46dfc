//! The event routes: the SSE change stream, pull with long-poll, publishing application
//! events, bus statistics and Prometheus metrics.
//!
//! This module owns the wire protocol of the stream (query parameters, `Last-Event-ID`, SSE
//! frames, the 410 for an expired resume point) on top of [`crate::bus`]. It must never read
//! events from anywhere but the bus (which reads the log), never buffer a stream without
//! bound (the SSE body is a stream that hyper pulls, so the next event is produced only when
//! the connection can take it), and never acknowledge a published event before it is durable.

use crate::bus::{
    BusError, BusStats, EventFilter, EventFrame, Format, SubscriberKind, Subscription,
};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, Ctx};
use crate::slots::Slots;
use crate::stream::NDJSON;
use crate::AppState;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use futures::Stream;
use quiver_engine::{AppEventInput, WriteCtx};
use quiver_engine::{EngineError, Seq};
use quiver_model::time::{now_ms, parse_rfc3339_ms};
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

/// The reconnection delay the SSE stream suggests to clients.
pub const SSE_RETRY_MS: u64 = 2000;
/// Interval of the SSE comment heartbeat.
pub const SSE_HEARTBEAT_INTERVAL_MS: u64 = 15_000;
/// Most bytes of ready events joined into one write to an SSE client.
pub const SSE_WRITE_BYTES_LIMIT: usize = 64 * 1024;
/// Largest `limit` of one pull.
pub const PULL_EVENTS_LIMIT: usize = 1000;
pub const PULL_EVENTS_DEFAULT: usize = 100;
/// Longest long-poll of one pull.
pub const PULL_WAIT_MS_LIMIT: u64 = 30_000;
/// Most records one pull scans (matching or not) before it answers; `next_seq` continues.
pub const PULL_SCAN_RECORDS_LIMIT: usize = 100_000;
/// Largest `source` a publisher may set, in bytes.
pub const SOURCE_BYTES_LIMIT: usize = 256;

/// The event routes, to merge into the main router.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/events", get(pull).post(publish))
        .route("/v1/events/stream", get(stream))
        .route("/v1/events/statistics", get(statistics))
        .route("/v1/events/stats", get(statistics))
        .route("/metrics", get(metrics))
}

impl From<BusError> for ApiError {
    fn from(e: BusError) -> Self {
        match e {
            BusError::Expired { .. } => {
                ApiError::new(StatusCode::GONE, "events_expired", e.to_string())
            }
            BusError::TooManySubscribers { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_subscribers",
                e.to_string(),
            ),
            BusError::Stopped => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                e.to_string(),
            ),
            BusError::Log(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            }
        }
    }
}

/// A 410 carries `first_seq` so the client knows where history now starts.
fn bus_error_response(e: BusError) -> Response {
    if let BusError::Expired { first_seq, .. } = e {
        let api = ApiError::from(e);
        let body = json!({"error": api.code, "detail": api.detail, "first_seq": first_seq});
        return (StatusCode::GONE, Json(body)).into_response();
    }
    ApiError::from(e).into_response()
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
}

/// Resolves a library id or name to its id. An unknown one is taken as an id, so a stream
/// can follow a library that is deleted (or not yet created) and resume after reconnects.
fn resolve_library(s: &AppState, library: Option<String>) -> ApiResult<Option<String>> {
    let Some(library) = library.filter(|l| !l.is_empty()) else {
        return Ok(None);
    };
    match s.engine.library(&library) {
        Ok((info, _)) => Ok(Some(info.library.id)),
        Err(EngineError::NotFound { .. }) => Ok(Some(library)),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn filter_of(
    s: &AppState,
    types: Option<&str>,
    library: Option<String>,
) -> ApiResult<EventFilter> {
    let library_id = resolve_library(s, library)?;
    EventFilter::parse(types, library_id).map_err(|d| ApiError::bad_request("invalid_types", d))
}

fn parse_since(since: Option<&str>) -> ApiResult<Option<u64>> {
    match since.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(text) => parse_rfc3339_ms(text).map(Some).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_since",
                format!("since {text:?} is not an RFC 3339 timestamp (e.g. 2026-01-31T12:00:00Z)"),
            )
        }),
    }
}

// ------------------------------------------------------------------ SSE

#[derive(Deserialize, Default)]
pub struct StreamQuery {
    types: Option<String>,
    library_id: Option<String>,
    from_seq: Option<Seq>,
    since: Option<String>,
    format: Option<String>,
    /// Semantic subscription: comma-separated floats or base64 of f32 LE.
    near_embedding: Option<String>,
    near_query: Option<String>,
    max_distance: Option<f32>,
    /// A metadata filter (JSON, the search filter language) for a semantic subscription.
    near_filter: Option<String>,
}

pub async fn stream(
    State(s): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<StreamQuery>, QueryRejection>,
) -> Response {
    match open_stream(&s, &headers, q).await {
        Ok(r) => r,
        Err(Rejected::Api(e)) => e.into_response(),
        Err(Rejected::Bus(e)) => bus_error_response(e),
    }
}

enum Rejected {
    Api(ApiError),
    Bus(BusError),
}

impl From<ApiError> for Rejected {
    fn from(e: ApiError) -> Self {
        Rejected::Api(e)
    }
}

impl From<BusError> for Rejected {
    fn from(e: BusError) -> Self {
        Rejected::Bus(e)
    }
}

async fn open_stream(
    s: &AppState,
    headers: &HeaderMap,
    q: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Response, Rejected> {
    let q = query(q)?;
    let format = Format::parse(q.format.as_deref())
        .map_err(|d| ApiError::bad_request("invalid_format", d))?;
    let filter = filter_of(s, q.types.as_deref(), q.library_id)?;
    let near = crate::consumers::stream_near(
        &s.engine,
        filter.library_id.as_deref(),
        q.near_embedding.as_deref(),
        q.near_query,
        q.max_distance,
        q.near_filter.as_deref(),
    )?;
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => {
            let text = v.to_str().unwrap_or("").trim();
            if text.is_empty() {
                None
            } else {
                Some(text.parse::<Seq>().map_err(|_| {
                    ApiError::bad_request(
                        "invalid_last_event_id",
                        format!("Last-Event-ID {text:?} is not a seq (this stream's ids are whole numbers)"),
                    )
                })?)
            }
        }
    };
    let from_seq = match (last_event_id, q.from_seq, parse_since(q.since.as_deref())?) {
        (Some(id), _, _) => Some(id.saturating_add(1)),
        (None, Some(seq), _) => Some(seq),
        (None, None, Some(since_ms)) => Some(s.bus.seq_at_time(since_ms).await?),
        (None, None, None) => None,
    };
    let subscription = s.bus.subscribe(SubscriberKind::Sse, from_seq, filter)?;
    let near = near.map(|n| (n, Arc::clone(s.bus.log())));
    let mut response = Response::new(Body::from_stream(sse_events(subscription, format, near)));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// The comment line sent when a stream has been quiet for [`SSE_HEARTBEAT_INTERVAL_MS`].
const SSE_HEARTBEAT: &[u8] = b": heartbeat\n\n";

enum SseState {
    Start(Subscription),
    Live(Subscription),
    Done,
}

/// The bytes of one write to an SSE client: one shared frame (no copy) or several joined.
#[derive(Default)]
struct SseChunk {
    first: Option<Bytes>,
    joined: Vec<u8>,
}

impl SseChunk {
    /// Adds a frame shared by every subscriber: referenced if it is the only one, else
    /// copied into the joined buffer (without touching its reference count).
    fn push_shared(&mut self, frame: &Bytes) {
        if self.first.is_none() && self.joined.is_empty() {
            self.first = Some(frame.clone());
            return;
        }
        if let Some(first) = self.first.take() {
            self.joined.extend_from_slice(&first);
        }
        self.joined.extend_from_slice(frame);
    }

    fn push(&mut self, frame: Bytes) {
        match self.first.take() {
            None if self.joined.is_empty() => self.first = Some(frame),
            first => {
                if let Some(first) = first {
                    self.joined.extend_from_slice(&first);
                }
                self.joined.extend_from_slice(&frame);
            }
        }
    }

    fn len(&self) -> usize {
        self.first.as_ref().map_or(self.joined.len(), Bytes::len)
    }

    fn into_bytes(self) -> Option<Bytes> {
        match self.first {
            Some(b) => Some(b),
            None if self.joined.is_empty() => None,
            None => Some(Bytes::from(self.joined)),
        }
    }
}

type Near = Option<(Arc<quiver_consumers::NearSpec>, Arc<quiver_log::FileLog>)>;

/// The SSE body: a `retry` hint, then the matching events, produced only when hyper polls
/// for more — so a slow reader holds at most one write's worth here, plus the socket
/// buffers, and falls behind the bus's live tail (to catch up from the log) instead of
/// growing a queue. Each event's frame is rendered once for all subscribers
/// ([`EventFrame::sse`]); every event that is ready when the client can take more goes into
/// one write (up to [`SSE_WRITE_BYTES_LIMIT`]), so a thousand subscribers cost a thousand
/// writes per burst of events, not per event.
fn sse_events(
    subscription: Subscription,
    format: Format,
    near: Near,
) -> impl Stream<Item = Result<Bytes, Infallible>> {
    let heartbeat = Duration::from_millis(SSE_HEARTBEAT_INTERVAL_MS);
    futures::stream::unfold(SseState::Start(subscription), move |state| {
        let near = near.clone();
        async move {
            let mut sub = match state {
                SseState::Done => return None,
                SseState::Start(sub) => {
                    let hint = Bytes::from(format!("retry: {SSE_RETRY_MS}\n\n"));
                    return Some((Ok(hint), SseState::Live(sub)));
                }
                SseState::Live(sub) => sub,
            };
            let quiet_until = tokio::time::Instant::now() + heartbeat;
            loop {
                // Many subscribers: wait for this stream's tick, by when the events since its
                // last write have gathered (see `bus::ticker`).
                let next = async {
                    if sub.coalesce_ms() > 0 {
                        sub.next_on_tick().await
                    } else {
                        sub.next().await
                    }
                };
                let first = match tokio::time::timeout_at(quiet_until, next).await {
                    Err(_) => {
                        let beat = Bytes::from_static(SSE_HEARTBEAT);
                        return Some((Ok(beat), SseState::Live(sub)));
                    }
                    Ok(Ok(Some(frame))) => frame,
                    Ok(Ok(None)) => return None,
                    Ok(Err(e)) => {
                        // Headers are gone: say why in-band, then end the stream.
                        let mut body = json!({"error": "stream_failed", "detail": e.to_string(), "position": sub.position()});
                        if let BusError::Expired { first_seq, .. } = e {
                            body["error"] = json!("events_expired");
                            body["first_seq"] = json!(first_seq);
                        }
                        let frame = format!("event: error\ndata: {body}\n\n");
                        return Some((Ok(Bytes::from(frame)), SseState::Done));
                    }
                };
                let mut chunk = SseChunk::default();
                let mut delivered: Vec<Arc<EventFrame>> = Vec::new();
                let mut next = Some(first);
                while let Some(frame) = next.take() {
                    if near.is_none() {
                        // The shared frame, copied only when joined to others.
                        chunk.push_shared(frame.sse(format));
                        delivered.push(frame);
                    } else if let Some(bytes) = sse_frame(&frame, format, &near).await {
                        chunk.push(bytes);
                        delivered.push(frame);
                    }
                    if chunk.len() < SSE_WRITE_BYTES_LIMIT {
                        next = sub.try_next();
                    }
                }
                // Counted once per write (a thousand subscribers counting each event on the
                // same counters would make those counters the fan-out's bottleneck).
                sub.delivered_all(&delivered, now_ms());
                if let Some(bytes) = chunk.into_bytes() {
                    return Some((Ok(bytes), SseState::Live(sub)));
                }
                // A semantic subscription passed over everything that was ready: wait on.
            }
        }
    })
}

/// The frame to send for `frame`, or `None` when a semantic subscription passes it over.
async fn sse_frame(frame: &EventFrame, format: Format, near: &Near) -> Option<Bytes> {
    let Some((spec, log)) = near else {
        return Some(frame.sse(format).clone());
    };
    // A semantic subscription: only events with a chunk within distance.
    let m = crate::consumers::near_check_frame(log, spec, frame).await?;
    Some(match format {
        Format::Envelope => crate::bus::sse_frame_bytes(
            frame.seq,
            frame.event_type(),
            &crate::consumers::with_members(&frame.json, &[("near", m.json())]),
        ),
        Format::CloudEvents => frame.sse(format).clone(),
    })
}

// ------------------------------------------------------------------ pull

#[derive(Deserialize, Default)]
pub struct PullQuery {
    from_seq: Option<Seq>,
    since: Option<String>,
    limit: Option<usize>,
    types: Option<String>,
    library_id: Option<String>,
    wait_ms: Option<u64>,
    format: Option<String>,
}

/// `GET /v1/events`: a page of events from `from_seq` (default: the oldest retained), with an
/// optional long-poll until at least one matching event is durable.
pub async fn pull(
    State(s): State<AppState>,
    q: Result<Query<PullQuery>, QueryRejection>,
) -> Response {
    match pull_inner(&s, q).await {
        Ok(r) => r,
        Err(Rejected::Api(e)) => e.into_response(),
        Err(Rejected::Bus(e)) => bus_error_response(e),
    }
}

async fn pull_inner(
    s: &AppState,
    q: Result<Query<PullQuery>, QueryRejection>,
) -> Result<Response, Rejected> {
    let q = query(q)?;
    let format = Format::parse(q.format.as_deref())
        .map_err(|d| ApiError::bad_request("invalid_format", d))?;
    let limit = q.limit.unwrap_or(PULL_EVENTS_DEFAULT);
    if limit == 0 || limit > PULL_EVENTS_LIMIT {
        return Err(ApiError::bad_request(
            "invalid_limit",
            format!("limit must be between 1 and {PULL_EVENTS_LIMIT}"),
        )
        .into());
    }
    let wait_ms = q.wait_ms.unwrap_or(0);
    if wait_ms > PULL_WAIT_MS_LIMIT {
        return Err(ApiError::bad_request(
            "invalid_wait_ms",
            format!("wait_ms must be at most {PULL_WAIT_MS_LIMIT}"),
        )
        .into());
    }
    let filter = filter_of(s, q.types.as_deref(), q.library_id)?;
    let log = Arc::clone(s.bus.log());
    let mut next = match (q.from_seq, parse_since(q.since.as_deref())?) {
        (Some(seq), _) => seq.max(1),
        (None, Some(since_ms)) => s.bus.seq_at_time(since_ms).await?,
        (None, None) => log.first_seq(),
    };
    if next < log.first_seq() {
        return Err(BusError::Expired {
            requested: next,
            first_seq: log.first_seq(),
        }
        .into());
    }
    let guard = s
        .bus
        .register(SubscriberKind::Pull, filter.clone(), next - 1)?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    let mut frames: Vec<Arc<EventFrame>> = Vec::new();
    let mut scanned = 0usize;
    let mut durable_rx = log.watch_durable();
    'scan: loop {
        let (page, end_seq) = s.bus.read_page(next).await?;
        let Some(end_seq) = end_seq else {
            // Caught up with the durable log.
            if !frames.is_empty() || tokio::time::Instant::now() >= deadline {
                break;
            }
            let target = next;
            let woke = tokio::select! {
                woke = tokio::time::timeout_at(deadline, durable_rx.wait_for(|d| *d >= target)) => woke,
                () = s.bus.stopped() => break,
            };
            match woke {
                Ok(Ok(_)) => continue,
                _ => break,
            }
        };
        for frame in page {
            if frames.len() >= limit {
                break 'scan;
            }
            next = frame.seq + 1;
            scanned += 1;
            if filter.matches_frame(&frame) {
                frames.push(frame);
            }
        }
        next = next.max(end_seq + 1);
        guard
            .slot
            .position
            .store(next - 1, std::sync::atomic::Ordering::Relaxed);
        if frames.len() >= limit || scanned >= PULL_SCAN_RECORDS_LIMIT {
            break;
        }
    }
    let mut body =
        String::with_capacity(64 + frames.iter().map(|f| f.json.len() + 1).sum::<usize>());
    body.push_str("{\"events\":[");
    for (i, frame) in frames.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(frame.rendered(format));
        s.bus.record_delivery(frame, false);
    }
    let _ = write!(
        body,
        "],\"next_seq\":{next},\"first_seq\":{},\"last_seq\":{}}}",
        log.first_seq(),
        log.durable_seq()
    );
    drop(guard);
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

// ------------------------------------------------------------------ publish

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishEvent {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    library_id: Option<String>,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    source: Option<String>,
}

/// `POST /v1/events`: appends an application event; answers 201 once it is durable. With
/// `Content-Type: application/x-ndjson` the body is a stream of such events, one per line,
/// answered line by line (see [`publish_stream`]).
pub async fn publish(State(s): State<AppState>, Ctx(ctx): Ctx, req: Request) -> Response {
    let ndjson = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with(NDJSON));
    let result = if ndjson {
        publish_stream(s, ctx, req.into_body())
    } else {
        match ApiJson::<PublishEvent>::from_request(req, &s).await {
            Ok(ApiJson(event)) => publish_one(&s, ctx, event).await,
            Err(rejection) => return rejection.into_response(),
        }
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Appends one event (not yet durable): its seq, or why it was refused.
fn append_one(s: &AppState, mut ctx: WriteCtx, req: PublishEvent) -> ApiResult<Seq> {
    ctx.source = event_source(&ctx, req.source)?;
    let data = req.data.unwrap_or_else(|| json!({}));
    let c = s
        .engine
        .append_event(&ctx, &req.event_type, req.library_id.as_deref(), data)?;
    Ok(c.seq)
}

async fn publish_one(s: &AppState, ctx: WriteCtx, req: PublishEvent) -> ApiResult<Response> {
    let event_type = req.event_type.clone();
    let s2 = s.clone();
    let seq = append_where_cheap(s, true, move || append_one(&s2, ctx, req))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e))??;
    s.engine.wait_durable(seq).await?;
    Ok((
        StatusCode::CREATED,
        [(crate::routes::SEQ_HEADER, HeaderValue::from(seq))],
        Json(json!({"seq": seq, "type": event_type})),
    )
        .into_response())
}

/// Most NDJSON event uploads in progress at once.
pub const EVENT_STREAMS_LIMIT: usize = 64;
static EVENT_STREAMS: Slots = Slots::new(EVENT_STREAMS_LIMIT);
/// Groups appended but not yet answered, per upload (the pipeline between appending a group
/// and replying once it is durable).
const EVENT_GROUPS_IN_FLIGHT_LIMIT: usize = 8;

/// Groups of up to this many lines are appended on the async task (about 200 µs of parsing
/// and encoding at most); larger ones on the blocking pool.
const INLINE_GROUP_LINES_LIMIT: usize = 128;

/// Runs an event append: on this task when the work is `small` and no other commit holds the
/// engine's write lock (`Engine::write_in_progress`), on the blocking pool otherwise. Why: a
/// hop to the blocking pool and back costs two thread switches, which at the small groups of a
/// pipelined publisher was most of the server's CPU; but a large group has much to parse, and
/// a batch into an HNSW library holds the lock for as long as its graph inserts take, and
/// neither may stall an async worker. `Err` only if the blocking task failed.
async fn append_where_cheap<T: Send + 'static>(
    s: &AppState,
    small: bool,
    append: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    if small && !s.engine.write_in_progress() {
        Ok(append())
    } else {
        tokio::task::spawn_blocking(append)
            .await
            .map_err(|e| format!("the append task failed: {e}"))
    }
}

/// One line's outcome: its number and its seq or its error (status, code, detail).
type LineOutcome = (u64, Result<Seq, (u16, String, String)>);

/// NDJSON publish: the pipelined publisher a broker client gives (many events in flight on
/// one connection, each acknowledged). Lines are read in groups (the ingest route's reader,
/// so the same line and group limits), each group appended while the previous one is being
/// made durable, and each line answered `{"line", "ok": true, "seq"}` once its record is
/// durable — never before — or `{"line", "ok": false, "error", "detail"}`; a bad line costs
/// only itself. A summary line ends the reply. Replies go through a bounded channel, so a
/// client that stops reading stops the server reading its body.
fn publish_stream(s: AppState, ctx: WriteCtx, body: Body) -> ApiResult<Response> {
    let slot = EVENT_STREAMS.try_acquire().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_uploads",
            format!(
                "{EVENT_STREAMS_LIMIT} NDJSON event uploads are already in progress; retry shortly"
            ),
        )
    })?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(crate::stream::REPLY_CHUNKS_LIMIT);
    tokio::spawn(async move {
        let _slot = slot;
        let started = std::time::Instant::now();
        let (raw_tx, mut raw_rx) =
            tokio::sync::mpsc::channel::<Vec<(u64, crate::stream::RawLine)>>(2);
        let (appended_tx, mut appended_rx) =
            tokio::sync::mpsc::channel::<Vec<LineOutcome>>(EVENT_GROUPS_IN_FLIGHT_LIMIT);
        let appender = {
            let s = s.clone();
            tokio::spawn(async move {
                while let Some(mut group) = raw_rx.recv().await {
                    // Groups that queued while the last append ran go into this one: with
                    // the body read as soon as it arrives, the groups are small under load,
                    // and an append per group would cost more than the events.
                    while group.len() < crate::stream::BATCH_LINES_LIMIT {
                        match raw_rx.try_recv() {
                            Ok(more) => group.extend(more),
                            Err(_) => break,
                        }
                    }
                    let small = group.len() <= INLINE_GROUP_LINES_LIMIT;
                    let (s2, ctx2) = (s.clone(), ctx.clone());
                    let appended =
                        append_where_cheap(&s, small, move || append_group(&s2, &ctx2, group));
                    let Ok(outcomes) = appended.await else {
                        return;
                    };
                    if appended_tx.send(outcomes).await.is_err() {
                        return;
                    }
                }
            })
        };
        let replier = {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut totals = PublishTotals::default();
                while let Some(mut outcomes) = appended_rx.recv().await {
                    // Every group already appended is answered with this one: one wait and
                    // one write for all of them.
                    while let Ok(more) = appended_rx.try_recv() {
                        outcomes.extend(more);
                    }
                    let last = outcomes.iter().filter_map(|(_, r)| r.as_ref().ok()).max();
                    if let Some(&seq) = last {
                        if s.engine.wait_durable(seq).await.is_err() {
                            return (Err("the log failed".to_string()), totals);
                        }
                    }
                    if tx
                        .send(publish_lines(&outcomes, &mut totals))
                        .await
                        .is_err()
                    {
                        return (
                            Err("the client stopped reading replies".to_string()),
                            totals,
                        );
                    }
                }
                (Ok(()), totals)
            })
        };
        // Flush as soon as the body has nothing more ready: a publisher waiting for its ack
        // sends nothing more, so waiting for a fuller group would only add latency.
        let read = crate::stream::read_lines(body, &raw_tx, Duration::ZERO).await;
        drop(raw_tx);
        let _ = appender.await;
        let (replied, totals) = replier.await.unwrap_or_else(|e| {
            (
                Err(format!("reply task failed: {e}")),
                PublishTotals::default(),
            )
        });
        let mut summary = json!({"summary": {
            "lines": totals.lines, "published": totals.published, "failed": totals.failed,
            "first_seq": totals.first_seq, "last_seq": totals.last_seq,
            "duration_ms": started.elapsed().as_secs_f64() * 1000.0,
        }});
        if let Err(e) = read.and(replied) {
            summary["summary"]["error"] = json!(e);
        }
        let mut line = summary.to_string().into_bytes();
        line.push(b'\n');
        let _ = tx.send(Bytes::from(line)).await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    let mut response = Response::new(Body::from_stream(stream));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    Ok(response)
}

/// Appends one group of NDJSON lines: every line that parses goes into one engine commit per
/// run of lines with the same `source` (usually the whole group), so a pipelined publisher
/// costs one log append per group, not per event. Outcomes come back in line order.
fn append_group(
    s: &AppState,
    ctx: &WriteCtx,
    group: Vec<(u64, crate::stream::RawLine)>,
) -> Vec<LineOutcome> {
    let mut outcomes: Vec<LineOutcome> = Vec::with_capacity(group.len());
    // Runs of consecutive good lines with one source.
    let mut runs: Vec<SourceRun> = Vec::new();
    for (n, raw) in group {
        let parsed = match raw {
            crate::stream::RawLine::TooLong => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "line_too_long",
                format!(
                    "line is longer than {} bytes",
                    crate::stream::LINE_BYTES_LIMIT
                ),
            )),
            crate::stream::RawLine::Text(text) => {
                serde_json::from_slice::<PublishEvent>(text.trim_ascii()).map_err(|e| {
                    if e.classify() == serde_json::error::Category::Data {
                        ApiError::unprocessable("invalid_event", e.to_string())
                    } else {
                        ApiError::bad_request("malformed_json", e.to_string())
                    }
                })
            }
        };
        let event = parsed.and_then(|req| {
            let source = event_source(ctx, req.source)?;
            Ok((
                source,
                AppEventInput {
                    event_type: req.event_type,
                    library_id: req.library_id,
                    data: req.data.unwrap_or_else(|| json!({})),
                },
            ))
        });
        match event {
            Ok((source, event)) => {
                let at = outcomes.len();
                outcomes.push((n, Ok(0)));
                match runs.last_mut() {
                    Some((run_source, events)) if *run_source == source => events.push((at, event)),
                    _ => runs.push((source, vec![(at, event)])),
                }
            }
            Err(e) => outcomes.push((n, Err((e.status.as_u16(), e.code, e.detail)))),
        }
    }
    for (source, events) in runs {
        let run_ctx = WriteCtx {
            trace_id: ctx.trace_id.clone(),
            source,
        };
        let (slots, events): (Vec<usize>, Vec<AppEventInput>) = events.into_iter().unzip();
        let results = s.engine.append_events(&run_ctx, events);
        assert_eq!(slots.len(), results.len(), "one outcome per event");
        for (at, result) in slots.into_iter().zip(results) {
            outcomes[at].1 = result.map_err(|e| {
                let e = ApiError::from(e);
                (e.status.as_u16(), e.code, e.detail)
            });
        }
    }
    outcomes
}

/// Consecutive good lines of an NDJSON publish that share one source: that source, and each
/// line's index among the outcomes with its event. One run is one commit.
type SourceRun = (Option<String>, Vec<(usize, AppEventInput)>);

/// The source a published event carries: its own (bounded) or the request's.
fn event_source(ctx: &WriteCtx, source: Option<String>) -> ApiResult<Option<String>> {
    match source.filter(|x| !x.is_empty()) {
        Some(source) if source.len() > SOURCE_BYTES_LIMIT => Err(ApiError::unprocessable(
            "invalid_source",
            format!(
                "source is {} bytes; the limit is {SOURCE_BYTES_LIMIT}",
                source.len()
            ),
        )),
        Some(source) => Ok(Some(source)),
        None => Ok(ctx.source.clone()),
    }
}

#[derive(Default)]
struct PublishTotals {
    lines: u64,
    published: u64,
    failed: u64,
    first_seq: Option<Seq>,
    last_seq: Option<Seq>,
}

/// The status lines of one durable group.
fn publish_lines(outcomes: &[LineOutcome], totals: &mut PublishTotals) -> Bytes {
    let mut out = Vec::with_capacity(outcomes.len() * 40);
    for (n, outcome) in outcomes {
        totals.lines += 1;
        let line = match outcome {
            Ok(seq) => {
                totals.published += 1;
                totals.first_seq.get_or_insert(*seq);
                totals.last_seq = Some(*seq);
                // The common line, written directly (two integers, no escaping needed).
                let _ = std::io::Write::write_fmt(
                    &mut out,
                    format_args!("{{\"line\":{n},\"ok\":true,\"seq\":{seq}}}\n"),
                );
                continue;
            }
            Err((status, code, detail)) => {
                totals.failed += 1;
                json!({"line": n, "ok": false, "status": status, "error": code, "detail": detail})
            }
        };
        // Serialising a Value into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, &line);
        out.push(b'\n');
    }
    Bytes::from(out)
}

// ------------------------------------------------------------------ statistics

fn stats_json(stats: &BusStats) -> Value {
    json!({
        "total_published": stats.total_published,
        "total_delivered": stats.total_delivered,
        "total_errors": stats.total_errors,
        "total_catch_ups": stats.total_catch_ups,
        "pending_events": stats.pending_events,
        "subscriber_count": stats.subscriber_count,
        "running": stats.running,
        "first_seq": stats.first_seq,
        "last_seq": stats.last_seq,
        "published_seq": stats.published_seq,
        "events_by_type": stats.events_by_type,
        "error_counts": stats.error_counts,
        "uptime_seconds": stats.uptime_seconds,
        "delivery_latency_ms": {
            "avg": stats.latency.avg_ms,
            "p50": stats.latency.p50_ms,
            "p99": stats.latency.p99_ms,
            "samples": stats.latency.samples,
        },
        "subscribers": stats.subscribers.iter().map(|s| json!({
            "id": s.id,
            "kind": s.kind.as_str(),
            "filter": s.filter.describe(),
            "position": s.position,
            "lag": s.lag,
            "connected_at": quiver_model::time::rfc3339_ms(s.connected_at_ms),
        })).collect::<Vec<_>>(),
    })
}

pub async fn statistics(
    State(s): State<AppState>,
    consumers: Option<Extension<Arc<crate::consumers::Service>>>,
) -> Json<Value> {
    let stats = s.bus.stats();
    let mut body = stats_json(&stats);
    // Which durable reader holds the log's retention back, from which seq.
    body["retention_hold"] = match s.engine.retention_hold() {
        Some((seq, reader)) => json!({"seq": seq, "reader": reader}),
        None => Value::Null,
    };
    if let Some(Extension(svc)) = consumers {
        body["consumers"] = crate::consumers::consumers_stats_json(&svc, stats.last_seq);
        body["consumer_count"] = json!(svc.registry.list().len());
        body["library_statistics"] = crate::consumers::library_stats_json(&svc);
    }
    Json(body)
}

// ------------------------------------------------------------------ metrics

/// Escapes a Prometheus label value.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// `GET /metrics`: Prometheus text exposition format 0.0.4.
pub async fn metrics(
    State(s): State<AppState>,
    consumers: Option<Extension<Arc<crate::consumers::Service>>>,
) -> Response {
    let stats = s.bus.stats();
    let engine = s.engine.stats();
    let log = s.engine.log().stats();
    let mut out = String::with_capacity(4096);
    metric(
        &mut out,
        "quiver_events_published_total",
        "counter",
        "Events the bus published to the live tail.",
        stats.total_published,
    );
    metric(
        &mut out,
        "quiver_events_delivered_total",
        "counter",
        "Events handed to subscriber connections.",
        stats.total_delivered,
    );
    metric(
        &mut out,
        "quiver_event_errors_total",
        "counter",
        "Errors of the event bus.",
        stats.total_errors,
    );
    metric(
        &mut out,
        "quiver_event_catch_ups_total",
        "counter",
        "Times a subscriber fell behind the live tail and read from disk.",
        stats.total_catch_ups,
    );
    metric(
        &mut out,
        "quiver_event_subscribers",
        "gauge",
        "Connected event subscribers.",
        stats.subscriber_count,
    );
    metric(
        &mut out,
        "quiver_event_pending",
        "gauge",
        "Events durable but not yet passed by subscribers (sum of lags).",
        stats.pending_events,
    );
    metric(
        &mut out,
        "quiver_event_bus_running",
        "gauge",
        "1 while the event tailer runs.",
        u8::from(stats.running),
    );
    let _ = writeln!(out, "# HELP quiver_events_by_type_total Events published, by type.\n# TYPE quiver_events_by_type_total counter");
    for (t, n) in &stats.events_by_type {
        let _ = writeln!(
            out,
            "quiver_events_by_type_total{{type=\"{}\"}} {n}",
            label(t)
        );
    }
    let _ = writeln!(out, "# HELP quiver_event_errors_by_kind_total Event bus errors, by kind.\n# TYPE quiver_event_errors_by_kind_total counter");
    for (k, n) in &stats.error_counts {
        let _ = writeln!(
            out,
            "quiver_event_errors_by_kind_total{{kind=\"{}\"}} {n}",
            label(k)
        );
    }
    let _ = writeln!(
        out,
        "# HELP quiver_event_delivery_latency_ms Commit to delivery over the last {}-{} s.\n# TYPE quiver_event_delivery_latency_ms summary",
        crate::bus::LATENCY_WINDOW_MS / 1000,
        2 * crate::bus::LATENCY_WINDOW_MS / 1000
    );
    let _ = writeln!(
        out,
        "quiver_event_delivery_latency_ms{{quantile=\"0.5\"}} {}",
        stats.latency.p50_ms
    );
    let _ = writeln!(
        out,
        "quiver_event_delivery_latency_ms{{quantile=\"0.99\"}} {}",
        stats.latency.p99_ms
    );
    let _ = writeln!(
        out,
        "quiver_event_delivery_latency_ms_sum {}",
        stats.latency.sum_ms
    );
    let _ = writeln!(
        out,
        "quiver_event_delivery_latency_ms_count {}",
        stats.latency.samples
    );
    metric(
        &mut out,
        "quiver_seq_durable",
        "gauge",
        "Highest durable seq.",
        engine.durable_seq,
    );
    metric(
        &mut out,
        "quiver_seq_applied",
        "gauge",
        "Highest seq applied to the state.",
        engine.applied_seq,
    );
    metric(
        &mut out,
        "quiver_seq_first",
        "gauge",
        "Oldest seq the log still holds.",
        engine.first_seq,
    );
    metric(
        &mut out,
        "quiver_seq_snapshot",
        "gauge",
        "Seq of the newest snapshot.",
        engine.last_snapshot_seq,
    );
    metric(
        &mut out,
        "quiver_log_size_bytes",
        "gauge",
        "Bytes of all log segment files.",
        engine.log_size_bytes,
    );
    metric(
        &mut out,
        "quiver_log_fsyncs_total",
        "counter",
        "fsync calls of the log.",
        log.fsyncs,
    );
    metric(
        &mut out,
        "quiver_log_appended_records_total",
        "counter",
        "Records appended to the log.",
        log.appended_records,
    );
    metric(
        &mut out,
        "quiver_log_group_commits_total",
        "counter",
        "Group commits of the log.",
        log.groups,
    );
    metric(
        &mut out,
        "quiver_libraries",
        "gauge",
        "Libraries.",
        engine.libraries,
    );
    metric(
        &mut out,
        "quiver_uptime_seconds",
        "gauge",
        "Seconds since the engine opened.",
        s.engine.started_at.elapsed().as_secs(),
    );
    if let Some(Extension(svc)) = consumers {
        crate::consumers::write_metrics(&mut out, &svc, stats.last_seq);
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        out,
    )
        .into_response()
}
