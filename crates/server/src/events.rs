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
use crate::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use futures::Stream;
use quiver_engine::{EngineError, Seq};
use quiver_model::time::parse_rfc3339_ms;
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
    let body = Sse::new(sse_events(subscription, format, near)).keep_alive(
        KeepAlive::new()
            .interval(Duration::from_millis(SSE_HEARTBEAT_INTERVAL_MS))
            .text("heartbeat"),
    );
    let mut response = body.into_response();
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

enum SseState {
    Start(Subscription),
    Live(Subscription),
    Done,
}

/// The SSE body: a `retry` hint, then one frame per matching event, produced only when hyper
/// polls for more (so a slow reader holds at most one frame here, plus the socket buffers).
fn sse_events(
    subscription: Subscription,
    format: Format,
    near: Option<(Arc<quiver_consumers::NearSpec>, Arc<quiver_log::FileLog>)>,
) -> impl Stream<Item = Result<sse::Event, Infallible>> {
    futures::stream::unfold(SseState::Start(subscription), move |state| {
        let near = near.clone();
        async move {
            match state {
                SseState::Done => None,
                SseState::Start(sub) => {
                    let hint = sse::Event::default().retry(Duration::from_millis(SSE_RETRY_MS));
                    Some((Ok(hint), SseState::Live(sub)))
                }
                SseState::Live(mut sub) => loop {
                    break match sub.next().await {
                        Ok(Some(frame)) => {
                            let event = match &near {
                                None => sse_frame(&frame, format),
                                // A semantic subscription: only events with a chunk within distance.
                                Some((spec, log)) => {
                                    match crate::consumers::near_check_frame(log, spec, &frame)
                                        .await
                                    {
                                        None => continue,
                                        Some(m) if format == Format::Envelope => {
                                            sse::Event::default()
                                                .id(frame.seq.to_string())
                                                .event(frame.event_type())
                                                .data(crate::consumers::with_members(
                                                    &frame.json,
                                                    &[("near", m.json())],
                                                ))
                                        }
                                        Some(_) => sse_frame(&frame, format),
                                    }
                                }
                            };
                            sub.delivered(&frame);
                            Some((Ok(event), SseState::Live(sub)))
                        }
                        Ok(None) => None,
                        Err(e) => {
                            // Headers are gone: say why in-band, then end the stream.
                            let mut body = json!({"error": "stream_failed", "detail": e.to_string(), "position": sub.position()});
                            if let BusError::Expired { first_seq, .. } = e {
                                body["error"] = json!("events_expired");
                                body["first_seq"] = json!(first_seq);
                            }
                            let event = sse::Event::default().event("error").data(body.to_string());
                            Some((Ok(event), SseState::Done))
                        }
                    };
                },
            }
        }
    })
}

fn sse_frame(frame: &EventFrame, format: Format) -> sse::Event {
    sse::Event::default()
        .id(frame.seq.to_string())
        .event(frame.event_type())
        .data(&**frame.rendered(format))
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

/// `POST /v1/events`: appends an application event; answers 201 once it is durable.
pub async fn publish(
    State(s): State<AppState>,
    Ctx(mut ctx): Ctx,
    ApiJson(req): ApiJson<PublishEvent>,
) -> ApiResult<Response> {
    if let Some(source) = req.source.filter(|x| !x.is_empty()) {
        if source.len() > SOURCE_BYTES_LIMIT {
            return Err(ApiError::unprocessable(
                "invalid_source",
                format!(
                    "source is {} bytes; the limit is {SOURCE_BYTES_LIMIT}",
                    source.len()
                ),
            ));
        }
        ctx.source = Some(source);
    }
    let data = req.data.unwrap_or_else(|| json!({}));
    let c = s
        .engine
        .append_event(&ctx, &req.event_type, req.library_id.as_deref(), data)?;
    s.engine.wait_durable(c.seq).await?;
    Ok((
        StatusCode::CREATED,
        [(crate::routes::SEQ_HEADER, HeaderValue::from(c.seq))],
        Json(json!({"seq": c.seq, "type": req.event_type})),
    )
        .into_response())
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
        "# HELP quiver_event_delivery_latency_ms Commit to delivery, over the last {} deliveries.\n# TYPE quiver_event_delivery_latency_ms summary",
        crate::bus::LATENCY_SAMPLES_LIMIT
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
