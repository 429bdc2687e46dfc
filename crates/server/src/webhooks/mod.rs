//! # Webhooks: durable consumers of the change stream that deliver over HTTP
//!
//! It owns the webhook endpoints: their registrations, signing secrets and positions (one
//! file each under `<data_dir>/webhooks/`, mode 0600, replaced atomically), one worker task per
//! endpoint that reads the log through the bus ([`crate::bus::Subscription`], the same filter
//! as SSE) and delivers each matching event, in `seq` order, one at a time, signed the
//! Standard Webhooks way, with retries, parking and a bounded delivery history.
//!
//! It must never: put a secret in the log, an event or a read (secrets are shown once, on
//! create and rotate); advance an endpoint's position before the receiver answered 2xx (so
//! delivery is at least once, across restarts); have more than one request in flight per
//! endpoint (ordering); follow a redirect; connect to an address it has not checked (DNS is
//! resolved here, per delivery, and the connection goes to that address, so a name cannot
//! switch to a private address between the check and the connect); or deliver `webhook.*`
//! events (the events it writes itself: delivering them could feed a loop between endpoints).
//!
//! Why: the log is the database and the stream is that log, so a webhook endpoint is just
//! another subscriber with a durable position, not a side effect some handler remembers.
//!
//! Layout: [`routes`] (the HTTP API), `store` (files), `target` (URL checks, DNS, signing,
//! one HTTP attempt), `worker` (the per-endpoint delivery loop).

pub mod routes;
mod store;
pub mod target;
mod worker;

pub use routes::router;

use crate::bus::{Bus, EventFilter};
use crate::error::ApiError;
use axum::http::StatusCode;
use quiver_engine::Engine;
use quiver_log::Seq;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};

/// Most endpoints per server.
pub const ENDPOINTS_LIMIT: usize = 256;
/// Longest target URL, in bytes.
pub const URL_BYTES_LIMIT: usize = 2048;
/// Most type patterns per endpoint (the bus's filter limit).
pub const TYPES_LIMIT: usize = crate::bus::FILTER_PATTERNS_LIMIT;
/// Longest description, in bytes.
pub const DESCRIPTION_BYTES_LIMIT: usize = 1024;
/// Attempts per event unless the endpoint says otherwise, and the most it may say.
pub const MAX_ATTEMPTS_DEFAULT: u32 = 8;
pub const MAX_ATTEMPTS_LIMIT: u32 = 20;
/// Delivery attempts remembered per endpoint (the most recent; saved with the endpoint).
pub const HISTORY_LIMIT: usize = 1000;
/// Longest error text kept in one history entry, in bytes (bounds the saved file).
pub const HISTORY_ERROR_BYTES_LIMIT: usize = 512;
/// Parked events remembered per endpoint (persisted); past it the oldest is forgotten.
pub const PARKED_LIMIT: usize = 10_000;
/// Most bytes of a receiver's response body read (the rest is discarded unread).
pub const RESPONSE_BODY_BYTES_LIMIT: usize = 4096;

/// Webhook settings (`quiver serve --webhooks-allow-private`; the rest are knobs for tests
/// and operators: the same code path runs with any values).
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// Allow targets on private, loopback, link-local, unspecified or multicast addresses.
    pub allow_private: bool,
    /// First retry delay; each further retry doubles it, up to `backoff_max`, with jitter.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Longest `Retry-After` honoured (a longer one is cut to this).
    pub retry_after_max: Duration,
    /// Whole-request timeout (connect, send, response head and the bounded body).
    pub request_timeout: Duration,
    /// Deliveries in flight across all endpoints.
    pub concurrent_deliveries: usize,
    pub endpoints_limit: usize,
    /// How often a moving position is written to disk (always on change of registration and
    /// at shutdown). A crash may re-deliver what was delivered since: at least once.
    pub save_interval: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            allow_private: false,
            backoff_base: Duration::from_secs(2),
            backoff_max: Duration::from_secs(15 * 60),
            retry_after_max: Duration::from_secs(60 * 60),
            request_timeout: Duration::from_secs(10),
            concurrent_deliveries: 64,
            endpoints_limit: ENDPOINTS_LIMIT,
            save_interval: Duration::from_millis(250),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook {0} does not exist")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TargetForbidden(String),
    #[error("the server already has {0} webhook endpoints")]
    TooMany(usize),
    #[error("event {seq} is not parked for webhook {id}")]
    NotParked { id: String, seq: Seq },
    #[error("cannot store webhooks: {0}")]
    Store(String),
    #[error("webhooks are shutting down")]
    Stopped,
}

impl From<WebhookError> for ApiError {
    fn from(e: WebhookError) -> Self {
        let (status, code) = match &e {
            WebhookError::NotFound(_) => (StatusCode::NOT_FOUND, "webhook_not_found"),
            WebhookError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_webhook"),
            WebhookError::TargetForbidden(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "webhook_target_forbidden")
            }
            WebhookError::TooMany(_) => (StatusCode::CONFLICT, "too_many_webhooks"),
            WebhookError::NotParked { .. } => (StatusCode::NOT_FOUND, "delivery_not_parked"),
            WebhookError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            WebhookError::Stopped => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
        };
        if status.is_server_error() {
            tracing::error!("webhooks: {e}");
        }
        ApiError::new(status, code, e.to_string())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Active,
    Paused,
    /// The receiver answered 410 Gone; `resume` re-enables it.
    Disabled,
}

/// What is persisted for one endpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Registration {
    pub id: String,
    pub url: String,
    pub types: Vec<String>,
    pub library_id: Option<String>,
    pub description: Option<String>,
    pub max_attempts: u32,
    /// `whsec_<base64>`; never rendered by a read.
    pub secret: String,
    pub status: Status,
    #[serde(default)]
    pub disabled_reason: Option<String>,
    /// The last seq passed: delivered (2xx), parked, or not matching.
    pub position: Seq,
    #[serde(default)]
    pub parked: BTreeSet<Seq>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl Registration {
    pub fn filter(&self) -> EventFilter {
        let types = if self.types.iter().any(|t| t == "*") {
            Vec::new()
        } else {
            self.types.clone()
        };
        EventFilter {
            types,
            library_id: self.library_id.clone(),
        }
    }
}

/// One delivery attempt (or a parking / gap note), as `GET …/deliveries` shows it. The most
/// recent [`HISTORY_LIMIT`] are saved with the endpoint, so they outlive a restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Delivery {
    pub seq: Seq,
    pub event_type: String,
    /// `delivered`, `failed` (will retry), `parked`, `gone` (410: endpoint disabled),
    /// `expired` (no longer in the log).
    pub status: String,
    pub response_code: Option<u16>,
    pub latency_ms: u64,
    pub attempt: u32,
    pub error: Option<String>,
    pub at: String,
}

/// One endpoint at run time.
pub(crate) struct Endpoint {
    pub reg: Mutex<Registration>,
    pub history: Mutex<VecDeque<Delivery>>,
    /// Parked seqs asked to be delivered again, in order of asking.
    pub retry_queue: Mutex<VecDeque<Seq>>,
    /// Bumped on every change a worker must notice (pause, resume, patch, delete, retry).
    pub changes: watch::Sender<u64>,
    pub deleted: AtomicBool,
    /// Held while writing the file, so the newest state is written last.
    pub save_lock: Mutex<()>,
    pub last_saved: Mutex<Instant>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Endpoint {
    pub fn new(reg: Registration) -> Arc<Endpoint> {
        Self::with_history(reg, VecDeque::new())
    }

    pub fn with_history(reg: Registration, history: VecDeque<Delivery>) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            reg: Mutex::new(reg),
            history: Mutex::new(history),
            retry_queue: Mutex::new(VecDeque::new()),
            changes: watch::channel(0).0,
            deleted: AtomicBool::new(false),
            save_lock: Mutex::new(()),
            last_saved: Mutex::new(Instant::now()),
        })
    }

    pub fn changed(&self) {
        self.changes.send_modify(|g| *g = g.wrapping_add(1));
    }

    pub fn is_active(&self) -> bool {
        !self.deleted.load(Ordering::Acquire) && lock(&self.reg).status == Status::Active
    }

    pub fn record(&self, mut d: Delivery) {
        if let Some(e) = &mut d.error {
            if e.len() > HISTORY_ERROR_BYTES_LIMIT {
                let mut cut = HISTORY_ERROR_BYTES_LIMIT;
                while !e.is_char_boundary(cut) {
                    cut -= 1;
                }
                e.truncate(cut);
                e.push('…');
            }
        }
        let mut h = lock(&self.history);
        if h.len() >= HISTORY_LIMIT {
            h.pop_front();
        }
        h.push_back(d);
    }
}

pub(crate) struct Shared {
    pub engine: Arc<Engine>,
    pub bus: Arc<Bus>,
    pub config: WebhookConfig,
    pub dir: PathBuf,
    pub endpoints: Mutex<BTreeMap<String, Arc<Endpoint>>>,
    pub permits: Arc<Semaphore>,
    pub shutdown: watch::Sender<bool>,
    pub tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Shared {
    pub fn endpoint(&self, id: &str) -> Result<Arc<Endpoint>, WebhookError> {
        lock(&self.endpoints)
            .get(id)
            .cloned()
            .ok_or_else(|| WebhookError::NotFound(id.to_string()))
    }

    pub fn spawn_worker(self: &Arc<Self>, ep: Arc<Endpoint>) {
        let handle = tokio::spawn(worker::run(Arc::clone(self), ep));
        let mut tasks = lock(&self.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle);
    }
}

/// The webhook subsystem of one server. Dropping it does not stop the workers: call
/// [`Webhooks::stop`] (the server does at shutdown) so positions are saved.
pub struct Webhooks {
    pub(crate) shared: Arc<Shared>,
}

impl Webhooks {
    /// Loads every endpoint from `<data_dir>/webhooks/` and starts its worker. Must run inside
    /// a tokio runtime. A file that cannot be read or parsed stops the start (naming it):
    /// silently dropping an endpoint would silently drop its deliveries.
    pub fn start(
        engine: Arc<Engine>,
        bus: Arc<Bus>,
        config: WebhookConfig,
    ) -> Result<Arc<Webhooks>, WebhookError> {
        let dir = engine.config().data_dir.join("webhooks");
        let loaded = store::load_all(&dir)?;
        let shared = Arc::new(Shared {
            engine,
            bus,
            permits: Arc::new(Semaphore::new(config.concurrent_deliveries.max(1))),
            config,
            dir,
            endpoints: Mutex::new(BTreeMap::new()),
            shutdown: watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
        });
        // Log retention keeps what an endpoint has not delivered or parked events it may
        // retry (within the reader limit), paused and disabled endpoints included.
        let weak = Arc::downgrade(&shared);
        shared.engine.set_retention_hold(
            "webhooks",
            Box::new(move || {
                let shared = weak.upgrade()?;
                let eps: Vec<(String, Arc<Endpoint>)> = lock(&shared.endpoints)
                    .iter()
                    .map(|(id, ep)| (id.clone(), Arc::clone(ep)))
                    .collect();
                eps.into_iter()
                    .map(|(id, ep)| {
                        let reg = lock(&ep.reg);
                        let next = reg.position + 1;
                        (reg.parked.first().map_or(next, |p| next.min(*p)), id)
                    })
                    .min()
            }),
        );
        for (reg, history) in loaded {
            let ep = Endpoint::with_history(reg, history);
            let id = lock(&ep.reg).id.clone();
            lock(&shared.endpoints).insert(id, Arc::clone(&ep));
            shared.spawn_worker(ep);
        }
        Ok(Arc::new(Webhooks { shared }))
    }

    /// Stops every worker (an attempt in flight finishes or times out first) and waits for
    /// them to save their positions. Idempotent.
    pub async fn stop(&self) {
        self.shared.shutdown.send_replace(true);
        let tasks: Vec<_> = std::mem::take(&mut *lock(&self.shared.tasks));
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Signals the workers to stop without waiting (for a graceful-shutdown hook).
    pub fn signal_stop(&self) {
        self.shared.shutdown.send_replace(true);
    }

    pub fn config(&self) -> &WebhookConfig {
        &self.shared.config
    }
}
