//! # quiver-server — the HTTP face of the engine
//!
//! This crate owns the v1 HTTP API (axum): routing, request parsing with JSON errors, limits
//! on bodies and concurrency, trace ids, and the rendering of responses. It must never hold
//! state of its own or change state except through the engine, and never answer a write
//! before the engine says its record is durable.
//!
//! Layout:
//! - [`routes`] — one handler per route of the contract.
//! - [`dashboard`] — the web page at `/dashboard`, a client of the same public API.
//! - [`stream`] — NDJSON ingest, export and streamed search.
//! - [`jobs`] — background jobs (`/v1/jobs`), run by the `quiver-jobs` crate.
//! - [`slots`] — bounds on long-lived work (WebSocket sessions, NDJSON uploads).
//! - [`ws`] — WebSocket sessions: requests and live events on one socket.
//! - [`consumers`] — durable consumer groups, projections, semantic (`near`) subscriptions.
//! - [`extract`] — JSON bodies with JSON errors; the write context (trace id, source).
//! - [`render`] — how libraries, documents and hits look on the wire.
//! - [`error`] — `ApiError` and the mapping from engine errors to statuses.
//! - [`webhooks`] — webhook endpoints: durable, signed, retried delivery of the stream.

pub mod bus;
pub mod consumers;
pub mod dashboard;
pub mod error;
pub mod events;
pub mod extract;
pub mod jobs;
pub mod render;
pub mod routes;
pub mod slots;
pub mod stream;
pub mod webhooks;
pub mod ws;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::Router;
use quiver_engine::Engine;
use std::future::Future;
use std::sync::Arc;

/// Most requests served at once; past it new requests wait for a slot (bounded by the
/// kernel's accept backlog), so load never turns into unbounded memory.
pub const CONCURRENT_REQUESTS_LIMIT: usize = 1024;

#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub bus: Arc<bus::Bus>,
}

/// The router over an engine, with its event bus and job workers (default configuration).
pub fn router(engine: Arc<Engine>) -> Result<Router, quiver_jobs::JobError> {
    let bus = bus::Bus::start(&engine);
    let jobs = quiver_jobs::Jobs::start(engine.clone(), quiver_jobs::JobsConfig::default())?;
    Ok(router_with_bus(engine, bus, jobs))
}

/// The router over an engine, an already started event bus (so the caller can stop the bus
/// at shutdown: SSE streams never end by themselves) and started job workers.
pub fn router_with_bus(
    engine: Arc<Engine>,
    bus: Arc<bus::Bus>,
    jobs: Arc<quiver_jobs::Jobs>,
) -> Router {
    app(engine, bus, jobs, None)
}

fn app(
    engine: Arc<Engine>,
    bus: Arc<bus::Bus>,
    jobs: Arc<quiver_jobs::Jobs>,
    hooks: Option<Arc<webhooks::Webhooks>>,
) -> Router {
    let consumers = consumers::Service::start(&engine, &bus);
    let jobs_state = jobs::JobsState {
        engine: engine.clone(),
        jobs,
    };
    let state = AppState { bus, engine };
    let extra = match hooks {
        Some(h) => webhooks::router(h),
        None => Router::new(),
    };
    Router::new()
        .route("/health", get(routes::health))
        .route(
            "/v1/libraries",
            post(routes::create_library).get(routes::list_libraries),
        )
        .route(
            "/v1/libraries/{id}",
            get(routes::get_library)
                .patch(routes::patch_library)
                .delete(routes::delete_library),
        )
        .route(
            "/v1/libraries/{id}/index",
            get(routes::get_index).put(routes::put_index),
        )
        .route(
            "/v1/libraries/{id}/documents",
            post(routes::upsert_document).get(routes::list_documents),
        )
        .route(
            "/v1/libraries/{id}/documents/batch",
            post(routes::upsert_batch),
        )
        .route(
            "/v1/libraries/{id}/documents/{doc_id}",
            get(routes::get_document).delete(routes::delete_document),
        )
        .route(
            "/v1/libraries/{id}/documents/{doc_id}/chunks",
            post(routes::add_chunks),
        )
        .route(
            "/v1/libraries/{id}/documents/{doc_id}/chunks/{chunk_id}",
            delete(routes::delete_chunk),
        )
        .route("/v1/libraries/{id}/search", post(routes::search))
        .route(
            "/v1/libraries/{id}/documents/stream",
            post(stream::ingest).get(stream::export),
        )
        .route("/v1/libraries/{id}/search/stream", post(stream::search))
        .route("/v1/libraries/{id}/ws", get(ws::upgrade))
        .merge(events::router())
        .merge(consumers::router())
        .layer(axum::Extension(consumers))
        .merge(extra)
        .merge(jobs::router(jobs_state))
        .merge(dashboard::router())
        .fallback(routes::not_found)
        .layer(middleware::from_fn(trace_layer))
        .layer(DefaultBodyLimit::max(
            quiver_model::limits::BODY_BYTES_LIMIT,
        ))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            CONCURRENT_REQUESTS_LIMIT,
        ))
        .with_state(state)
}

/// Gives every request a trace id (W3C `traceparent`, else `X-Request-ID`, else new), makes
/// it available to handlers (it becomes the `trace_id` of every record the request causes)
/// and echoes it on the response.
async fn trace_layer(mut req: Request, next: Next) -> Response {
    let trace_id = extract::trace_id_of(req.headers());
    let traceparent = req.headers().get("traceparent").cloned();
    req.extensions_mut()
        .insert(extract::TraceId(trace_id.clone()));
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&trace_id) {
        resp.headers_mut().insert("x-request-id", v.clone());
        resp.headers_mut().insert("x-trace-id", v);
    }
    if let Some(tp) = traceparent {
        resp.headers_mut().insert("traceparent", tp);
    }
    resp
}

/// Server settings beyond the engine's.
#[derive(Clone, Default)]
pub struct ServeOptions {
    pub webhooks: webhooks::WebhookConfig,
    /// Job workers already started (the binary starts them with its flags); `None` starts
    /// them in their default configuration.
    pub jobs: Option<Arc<quiver_jobs::Jobs>>,
}

/// Serves the API on `listener` until `shutdown` resolves, with job workers and webhooks in
/// their default configuration.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, engine, ServeOptions::default(), shutdown).await
}

/// Serves the API with `options` until `shutdown` resolves; returns once the webhook workers
/// have saved their positions and the job workers have stopped (running jobs stay running in
/// the log and resume at the next start), so the caller can close the engine.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let jobs = match options.jobs {
        Some(j) => j,
        None => quiver_jobs::Jobs::start(engine.clone(), quiver_jobs::JobsConfig::default())
            .map_err(std::io::Error::other)?,
    };
    let bus = bus::Bus::start(&engine);
    let hooks = webhooks::Webhooks::start(engine.clone(), bus.clone(), options.webhooks)
        .map_err(std::io::Error::other)?;
    let stopper = bus.clone();
    let hooks_stopper = hooks.clone();
    // Graceful shutdown waits for in-flight responses; stopping the bus ends every SSE stream
    // and long-poll so that wait is short and the engine gets to close cleanly.
    // TCP_NODELAY on every connection: an event stream writes small frames one after another,
    // and with Nagle's algorithm a frame written while the previous one is unacknowledged
    // waits for the client's delayed ACK (up to 40 ms) — the tail of every SSE latency.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY on a connection");
        }
    });
    let served = axum::serve(
        listener,
        app(engine, bus, jobs.clone(), Some(hooks.clone())),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        hooks_stopper.signal_stop();
        stopper.stop();
    })
    .await;
    hooks.stop().await;
    let _ = tokio::task::spawn_blocking(move || jobs.stop()).await;
    served
}
