//! The event bus: fan-out of the durable log to live subscribers, with catch-up from disk.
//!
//! It owns one tailer task per server, which watches the log's durable seq, reads each new
//! record once, renders its event envelope once into an [`EventFrame`] and publishes it on a
//! bounded `tokio::sync::broadcast` ring (the "live tail"). A [`Subscription`] reads that ring;
//! when it falls behind (`Lagged`) it reads the log files itself, in bounded pages, from its own
//! next seq until it reaches the live tail again, skipping what it already sent. With many
//! subscribers, a ticker task wakes the stream writers in cohorts, one cohort per ms, so each
//! writes a few ms' worth of events at once and the writes spread evenly over time. It also
//! owns the bus statistics (counters, per-subscriber positions, delivery latency).
//!
//! It must never block a writer (publishing never waits for a subscriber), never lose or
//! duplicate an event for a subscriber (every subscriber sees every seq from its start once,
//! in order, filtered or not), never hold unbounded memory per subscriber (one ring shared by
//! all, plus at most one catch-up page each), and never invent an event: frames are built only
//! from durable log records. Why: the log is the database and the stream is that log, so a
//! subscriber must be able to trust "I saw seq N" to mean "I saw everything up to N".

use axum::body::Bytes;
use quiver_engine::events::{into_event, Event};
use quiver_engine::Engine;
use quiver_log::{FileLog, LogError, Seq};
use quiver_model::time::now_ms;
use quiver_model::Record;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};

/// Frames the live tail holds; a subscriber further behind catches up from disk.
pub const BROADCAST_CAPACITY_DEFAULT: usize = 4096;
/// Largest live tail one can configure.
pub const BROADCAST_CAPACITY_MAX: usize = 1 << 20;
/// Most subscribers (SSE streams plus pull requests in flight) at once.
pub const SUBSCRIBERS_LIMIT: usize = 10_000;
/// Most records one log read (tailer, catch-up page or pull page) decodes.
pub const PAGE_RECORDS_LIMIT: usize = 256;
/// About the most payload bytes one log read returns (at least one record).
pub const PAGE_BYTES_LIMIT: usize = 1 << 20;
/// A page read from the log's in-memory ring and decoded on an async thread is smaller (about
/// 100 µs of decoding), so other tasks on that thread wait no longer than that.
const INLINE_PAGE_RECORDS_LIMIT: usize = 64;
const INLINE_PAGE_BYTES_LIMIT: usize = 64 * 1024;
/// Stream writers gather events for up to this many ms before a write...
pub const COALESCE_MS_MAX: u64 = 20;
/// ...one ms per this many subscribers (so 49 never wait, 100 wait 2 ms, 1,000 wait 20 ms).
pub const COALESCE_SUBSCRIBERS_PER_MS: u64 = 50;
/// Delivery latency is summarised over this window (the current one and the one before).
pub const LATENCY_WINDOW_MS: u64 = 60_000;
/// Latencies below this many ms have a bucket each; above, one bucket per power of two.
const LATENCY_LINEAR_BUCKETS: usize = 1024;
/// One bucket per power of two from 2^10 to 2^63.
const LATENCY_BUCKETS: usize = LATENCY_LINEAR_BUCKETS + 54;
/// Distinct event types counted by name; further types are counted under `"other"`.
pub const EVENT_TYPES_TRACKED_LIMIT: usize = 1000;
/// Most type patterns in one filter, and the longest pattern in bytes.
pub const FILTER_PATTERNS_LIMIT: usize = 64;
pub const FILTER_PATTERN_BYTES_LIMIT: usize = 128;

/// One event, rendered once and shared by every subscriber that receives it.
#[derive(Debug)]
pub struct EventFrame {
    pub seq: Seq,
    pub event: Event,
    /// The envelope `{seq, type, library_id, timestamp, data, source, trace_id}`, compact JSON.
    pub json: Arc<str>,
    cloudevent: OnceLock<Arc<str>>,
    websocket: OnceLock<Arc<str>>,
    /// The whole SSE frame (`id:`, `event:`, `data:`, blank line) per [`Format`], built by
    /// the first subscriber that needs it and then shared: fan-out copies no JSON.
    sse: [OnceLock<Bytes>; 2],
}

impl EventFrame {
    pub fn new(event: Event) -> Self {
        let json = String::from_utf8(event.envelope_bytes()).unwrap_or_default();
        EventFrame {
            seq: event.seq,
            json: Arc::from(json),
            event,
            cloudevent: OnceLock::new(),
            websocket: OnceLock::new(),
            sse: [OnceLock::new(), OnceLock::new()],
        }
    }

    /// Decodes the record at `seq` and renders its event.
    pub fn decode(seq: Seq, payload: &[u8]) -> Result<Self, String> {
        let record = Record::decode(payload).map_err(|e| e.to_string())?;
        Ok(EventFrame::new(into_event(seq, record)))
    }

    pub fn event_type(&self) -> &str {
        &self.event.event_type
    }

    pub fn library_id(&self) -> Option<&str> {
        self.event.library_id.as_deref()
    }

    /// The CloudEvents 1.0 rendering, built on first use and then shared.
    pub fn cloudevent(&self) -> &Arc<str> {
        self.cloudevent.get_or_init(|| {
            Arc::from(String::from_utf8(self.event.cloudevent_bytes()).unwrap_or_default())
        })
    }

    /// The WebSocket push `{"type":"event","event_type":…, seq, library_id, timestamp, data,
    /// source, trace_id}` (the envelope, with its `type` renamed so the message's own `type`
    /// can say what kind of message it is), built on first use and then shared.
    pub fn websocket(&self) -> &Arc<str> {
        self.websocket.get_or_init(|| {
            let mut v = self.event.envelope_json();
            if let Some(m) = v.as_object_mut() {
                if let Some(t) = m.remove("type") {
                    m.insert("event_type".into(), t);
                }
                m.insert("type".into(), Value::String("event".into()));
            }
            Arc::from(v.to_string())
        })
    }

    /// The rendering a subscriber asked for.
    pub fn rendered(&self, format: Format) -> &Arc<str> {
        match format {
            Format::Envelope => &self.json,
            Format::CloudEvents => self.cloudevent(),
        }
    }

    /// The complete SSE frame in `format`, rendered once per event and shared (a clone is a
    /// reference count, not a copy).
    pub fn sse(&self, format: Format) -> &Bytes {
        let slot = match format {
            Format::Envelope => &self.sse[0],
            Format::CloudEvents => &self.sse[1],
        };
        slot.get_or_init(|| sse_frame_bytes(self.seq, self.event_type(), self.rendered(format)))
    }
}

/// `id: <seq>\nevent: <type>\ndata: <json>\n\n`. The JSON is compact (one line) and event
/// types never hold line breaks (they are validated at append), so one `data:` line carries
/// the whole payload; a stray line break would be split into further `data:` lines, which
/// an SSE client joins back, rather than corrupt the stream.
pub fn sse_frame_bytes(seq: Seq, event_type: &str, data: &str) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + event_type.len() + 40);
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(seq.to_string().as_bytes());
    out.extend_from_slice(b"\nevent: ");
    out.extend(event_type.bytes().filter(|b| *b != b'\n' && *b != b'\r'));
    for line in data.split('\n') {
        out.extend_from_slice(b"\ndata: ");
        out.extend_from_slice(line.trim_end_matches('\r').as_bytes());
    }
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// How events are rendered on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Envelope,
    CloudEvents,
}

impl Format {
    pub fn parse(s: Option<&str>) -> Result<Format, String> {
        match s.map(str::trim) {
            None | Some("") | Some("envelope") | Some("json") => Ok(Format::Envelope),
            Some("cloudevents") => Ok(Format::CloudEvents),
            Some(other) => Err(format!(
                "unknown format {other:?}; use \"envelope\" (the default) or \"cloudevents\""
            )),
        }
    }
}

/// Which events a subscriber wants: type patterns (`*` matches any run of characters, so
/// `document.*` and `*` work) and one library id. Empty patterns mean every type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub types: Vec<String>,
    pub library_id: Option<String>,
}

impl EventFilter {
    /// Parses a comma-separated list of type patterns.
    pub fn parse(types: Option<&str>, library_id: Option<String>) -> Result<EventFilter, String> {
        let mut patterns = Vec::new();
        for p in types.unwrap_or("").split(',').map(str::trim) {
            if p.is_empty() {
                continue;
            }
            if p.len() > FILTER_PATTERN_BYTES_LIMIT {
                return Err(format!(
                    "a type pattern is {} bytes; the limit is {FILTER_PATTERN_BYTES_LIMIT}",
                    p.len()
                ));
            }
            patterns.push(p.to_string());
            if patterns.len() > FILTER_PATTERNS_LIMIT {
                return Err(format!(
                    "more than {FILTER_PATTERNS_LIMIT} type patterns in one filter"
                ));
            }
        }
        if patterns.iter().any(|p| p == "*") {
            patterns.clear();
        }
        Ok(EventFilter {
            types: patterns,
            library_id,
        })
    }

    pub fn matches(&self, event_type: &str, library_id: Option<&str>) -> bool {
        if let Some(want) = &self.library_id {
            if library_id != Some(want.as_str()) {
                return false;
            }
        }
        self.types.is_empty() || self.types.iter().any(|p| glob_match(p, event_type))
    }

    pub fn matches_frame(&self, frame: &EventFrame) -> bool {
        self.matches(frame.event_type(), frame.library_id())
    }

    pub fn describe(&self) -> Value {
        json!({"types": self.types, "library_id": self.library_id})
    }
}

/// `*` matches any (possibly empty) run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// Why a subscription cannot start or continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusError {
    /// The resume point is older than the oldest record the log still holds.
    Expired {
        requested: Seq,
        first_seq: Seq,
    },
    TooManySubscribers {
        limit: usize,
    },
    /// The bus has stopped (the server is shutting down or the log closed).
    Stopped,
    Log(String),
}

impl std::fmt::Display for BusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BusError::Expired { requested, first_seq } => write!(
                f,
                "events from seq {requested} are no longer retained; the oldest available seq is {first_seq}"
            ),
            BusError::TooManySubscribers { limit } => {
                write!(f, "the server already has {limit} event subscribers")
            }
            BusError::Stopped => f.write_str("the event bus has stopped"),
            BusError::Log(e) => write!(f, "reading the log failed: {e}"),
        }
    }
}

impl From<LogError> for BusError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Compacted {
                requested,
                first_available,
            } => BusError::Expired {
                requested,
                first_seq: first_available,
            },
            other => BusError::Log(other.to_string()),
        }
    }
}

/// What kind of client a subscriber is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubscriberKind {
    Sse,
    Pull,
    WebSocket,
    Webhook,
}

impl SubscriberKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriberKind::Sse => "sse",
            SubscriberKind::Pull => "pull",
            SubscriberKind::WebSocket => "websocket",
            SubscriberKind::Webhook => "webhook",
        }
    }
}

/// One registered subscriber, as statistics show it.
#[derive(Debug)]
pub struct SubscriberSlot {
    pub id: u64,
    pub kind: SubscriberKind,
    pub filter: EventFilter,
    /// The last seq this subscriber has passed (sent, or filtered out).
    pub position: AtomicU64,
    pub connected_at_ms: u64,
}

/// Unregisters its subscriber when dropped, so a disconnected client is uncounted at once.
pub struct SubscriberGuard {
    inner: Arc<Inner>,
    pub slot: Arc<SubscriberSlot>,
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        if lock(&self.inner.subscribers)
            .remove(&self.slot.id)
            .is_some()
        {
            self.inner.subscriber_count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Bus settings.
#[derive(Clone, Debug)]
pub struct BusConfig {
    pub broadcast_capacity: usize,
    pub subscribers_limit: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            broadcast_capacity: BROADCAST_CAPACITY_DEFAULT,
            subscribers_limit: SUBSCRIBERS_LIMIT,
        }
    }
}

/// Delivery latencies of one window: a count per bucket, lock-free, so that a thousand
/// subscribers recording at once never queue on a mutex.
struct LatencyWindow {
    /// `now_ms / LATENCY_WINDOW_MS` of the window these counts belong to.
    window: AtomicU64,
    buckets: Box<[AtomicU64]>,
    sum_ms: AtomicU64,
}

impl LatencyWindow {
    fn new() -> Self {
        LatencyWindow {
            window: AtomicU64::new(u64::MAX),
            buckets: (0..LATENCY_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum_ms: AtomicU64::new(0),
        }
    }
}

/// Which bucket holds `ms`: one per ms below [`LATENCY_LINEAR_BUCKETS`], then one per power
/// of two.
fn latency_bucket(ms: u64) -> usize {
    if (ms as usize) < LATENCY_LINEAR_BUCKETS {
        ms as usize
    } else {
        let log2 = 63 - ms.leading_zeros() as usize; // ≥ 10
        (LATENCY_LINEAR_BUCKETS + log2 - 10).min(LATENCY_BUCKETS - 1)
    }
}

/// The smallest latency a bucket holds (what a quantile reports).
fn latency_bucket_floor_ms(bucket: usize) -> u64 {
    if bucket < LATENCY_LINEAR_BUCKETS {
        bucket as u64
    } else {
        1u64 << (bucket - LATENCY_LINEAR_BUCKETS + 10)
    }
}

/// Commit → delivery latency over the current and the previous [`LATENCY_WINDOW_MS`]: two
/// windows used in turn, the older one reset when time moves on.
struct Latency {
    windows: [LatencyWindow; 2],
}

impl Latency {
    fn new() -> Self {
        Latency {
            windows: [LatencyWindow::new(), LatencyWindow::new()],
        }
    }

    fn record(&self, now_ms: u64, latency_ms: u64) {
        self.record_n(now_ms, latency_ms, 1);
    }

    /// Records `count` deliveries that each took `latency_ms`.
    fn record_n(&self, now_ms: u64, latency_ms: u64, count: u64) {
        let window = now_ms / LATENCY_WINDOW_MS;
        let w = &self.windows[(window % 2) as usize];
        let held = w.window.load(Ordering::Acquire);
        if held != window
            && w.window
                .compare_exchange(held, window, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // This thread moved the slot to a new window: clear the old counts. A record
            // racing the reset may be lost or kept; the summary is a statistic, not a ledger.
            for b in w.buckets.iter() {
                b.store(0, Ordering::Relaxed);
            }
            w.sum_ms.store(0, Ordering::Relaxed);
        }
        w.buckets[latency_bucket(latency_ms)].fetch_add(count, Ordering::Relaxed);
        w.sum_ms
            .fetch_add(latency_ms.saturating_mul(count), Ordering::Relaxed);
    }

    fn summary(&self, now_ms: u64) -> LatencySummary {
        let window = now_ms / LATENCY_WINDOW_MS;
        let mut counts = vec![0u64; LATENCY_BUCKETS];
        let mut sum_ms = 0u64;
        for w in &self.windows {
            let held = w.window.load(Ordering::Acquire);
            if held != window && held.checked_add(1) != Some(window) {
                continue;
            }
            for (c, b) in counts.iter_mut().zip(w.buckets.iter()) {
                *c += b.load(Ordering::Relaxed);
            }
            sum_ms += w.sum_ms.load(Ordering::Relaxed);
        }
        let n: u64 = counts.iter().sum();
        let quantile = |q: f64| -> u64 {
            if n == 0 {
                return 0;
            }
            let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
            let mut seen = 0u64;
            for (bucket, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return latency_bucket_floor_ms(bucket);
                }
            }
            latency_bucket_floor_ms(LATENCY_BUCKETS - 1)
        };
        LatencySummary {
            avg_ms: if n == 0 {
                0.0
            } else {
                sum_ms as f64 / n as f64
            },
            p50_ms: quantile(0.5),
            p99_ms: quantile(0.99),
            samples: usize::try_from(n).unwrap_or(usize::MAX),
            sum_ms,
        }
    }
}

/// Delivery latency (commit → handed to the connection) over the last one to two
/// [`LATENCY_WINDOW_MS`]; quantiles are exact to the ms below 1,024 ms.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LatencySummary {
    pub avg_ms: f64,
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub samples: usize,
    pub sum_ms: u64,
}

/// A point-in-time copy of the bus statistics.
#[derive(Clone, Debug)]
pub struct BusStats {
    pub total_published: u64,
    pub total_delivered: u64,
    pub total_errors: u64,
    pub total_catch_ups: u64,
    pub pending_events: u64,
    pub subscriber_count: usize,
    pub running: bool,
    pub first_seq: Seq,
    pub last_seq: Seq,
    pub published_seq: Seq,
    pub events_by_type: BTreeMap<String, u64>,
    pub error_counts: BTreeMap<String, u64>,
    pub uptime_seconds: u64,
    pub latency: LatencySummary,
    /// At most [`SUBSCRIBERS_LISTED_LIMIT`] subscribers, oldest first.
    pub subscribers: Vec<SubscriberInfo>,
}

/// Most subscribers listed by statistics (all are counted).
pub const SUBSCRIBERS_LISTED_LIMIT: usize = 1000;

#[derive(Clone, Debug)]
pub struct SubscriberInfo {
    pub id: u64,
    pub kind: SubscriberKind,
    pub filter: EventFilter,
    pub position: Seq,
    pub lag: u64,
    pub connected_at_ms: u64,
}

struct Inner {
    log: Arc<FileLog>,
    sender: Mutex<Option<broadcast::Sender<Arc<EventFrame>>>>,
    /// Last seq the tailer has published (or passed, if it did not decode).
    published_seq: AtomicU64,
    stopped: AtomicBool,
    /// Turns true once on stop, so waiters (long-polls) end with the bus.
    stopped_tx: tokio::sync::watch::Sender<bool>,
    subscribers_limit: usize,
    subscribers: Mutex<HashMap<u64, Arc<SubscriberSlot>>>,
    /// `subscribers.len()`, readable without the lock (writers size their coalescing by it).
    subscriber_count: AtomicUsize,
    next_subscriber_id: AtomicU64,
    total_published: AtomicU64,
    total_delivered: AtomicU64,
    total_errors: AtomicU64,
    total_catch_ups: AtomicU64,
    events_by_type: Mutex<BTreeMap<String, u64>>,
    error_counts: Mutex<BTreeMap<String, u64>>,
    latency: Latency,
    started_at: Instant,
    /// Signalled after each publish; the ticker waits on it.
    published: tokio::sync::Notify,
    /// The coalescing ticks, one per cohort of subscribers: a stream writer that gathers
    /// events waits on its cohort's, and the ticker wakes one cohort per ms (see [`ticker`]).
    ticks: [tokio::sync::Notify; COALESCE_MS_MAX as usize],
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts one event of `event_type`, under `"other"` once [`EVENT_TYPES_TRACKED_LIMIT`] types
/// are tracked.
fn count_type(by_type: &mut BTreeMap<String, u64>, event_type: &str) {
    let key = if by_type.contains_key(event_type) || by_type.len() < EVENT_TYPES_TRACKED_LIMIT {
        event_type
    } else {
        "other"
    };
    match by_type.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            by_type.insert(key.to_string(), 1);
        }
    }
}

/// One page of the log, decoded.
struct Page {
    frames: Vec<Arc<EventFrame>>,
    /// The last seq read (decoded or not); `None` when nothing was available.
    end_seq: Option<Seq>,
}

impl Inner {
    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        // Dropping the sender wakes every receiver with `Closed`.
        lock(&self.sender).take();
        self.stopped_tx.send_replace(true);
        // Writers waiting for a tick see the stop; the ticker ends.
        for tick in &self.ticks {
            tick.notify_waiters();
        }
        self.published.notify_one();
    }

    /// How long stream writers gather events, in ms (see [`Subscription::coalesce_ms`]).
    fn coalesce_ms(&self) -> u64 {
        let subscribers = self.subscriber_count.load(Ordering::Relaxed) as u64;
        (subscribers / COALESCE_SUBSCRIBERS_PER_MS).min(COALESCE_MS_MAX)
    }

    fn count_error(&self, kind: &str) {
        self.total_errors.fetch_add(1, Ordering::Relaxed);
        *lock(&self.error_counts)
            .entry(kind.to_string())
            .or_insert(0) += 1;
    }

    fn read_page_blocking(&self, from: Seq) -> Result<Page, BusError> {
        let records = self
            .log
            .read_from(from, PAGE_RECORDS_LIMIT, PAGE_BYTES_LIMIT)
            .map_err(|e| {
                if !matches!(e, LogError::Compacted { .. }) {
                    self.count_error("log_read");
                }
                BusError::from(e)
            })?;
        Ok(self.decode_page(records))
    }

    fn decode_page(&self, records: Vec<(Seq, Vec<u8>)>) -> Page {
        let end_seq = records.last().map(|(seq, _)| *seq);
        let mut frames = Vec::with_capacity(records.len());
        for (seq, payload) in records {
            match EventFrame::decode(seq, &payload) {
                Ok(frame) => frames.push(Arc::new(frame)),
                Err(error) => {
                    tracing::error!(seq, %error, "a log record does not decode; its event is skipped");
                    self.count_error("decode");
                }
            }
        }
        Page { frames, end_seq }
    }

    async fn read_page(self: &Arc<Self>, from: Seq) -> Result<Page, BusError> {
        // Near the tail the page is in the log's memory: decode it here, a small page so the
        // async thread is not held long, without a hop to the blocking pool.
        if let Some(records) =
            self.log
                .read_recent(from, INLINE_PAGE_RECORDS_LIMIT, INLINE_PAGE_BYTES_LIMIT)
        {
            return Ok(self.decode_page(records));
        }
        let inner = Arc::clone(self);
        tokio::task::spawn_blocking(move || inner.read_page_blocking(from))
            .await
            .map_err(|e| BusError::Log(format!("the log reader task failed: {e}")))?
    }

    fn record_delivery(&self, frame: &EventFrame, record_latency: bool) {
        self.total_delivered.fetch_add(1, Ordering::Relaxed);
        if record_latency {
            let now = now_ms();
            self.latency
                .record(now, now.saturating_sub(frame.event.timestamp_ms));
        }
    }

    fn count_published(&self, event_type: &str) {
        count_type(&mut lock(&self.events_by_type), event_type);
        self.total_published.fetch_add(1, Ordering::Relaxed);
    }

    fn live_receivers(&self) -> usize {
        lock(&self.sender)
            .as_ref()
            .map_or(0, |s| s.receiver_count())
    }

    /// With nobody on the live tail, the tailer only counts: it reads each record's type from
    /// its header and renders nothing (a subscriber that arrives later reads the log itself).
    ///
    /// It reads no further than `through`, the durable seq seen *before* checking that nobody
    /// listens: a subscriber arriving after that check starts its live tail at a durable seq
    /// ≥ `through`, so everything after `through` must go through the full (publishing) path.
    fn skim_page_blocking(&self, from: Seq, through: Seq) -> Result<Option<Seq>, BusError> {
        if from > through {
            return Ok(None);
        }
        let max_records = usize::try_from(through - from + 1)
            .unwrap_or(usize::MAX)
            .min(PAGE_RECORDS_LIMIT);
        let records = self
            .log
            .read_from(from, max_records, PAGE_BYTES_LIMIT)
            .map_err(BusError::from)?;
        debug_assert!(records.last().is_none_or(|(seq, _)| *seq <= through));
        for (seq, payload) in &records {
            match quiver_model::record::peek_event_type(payload) {
                Ok(t) => self.count_published(&t),
                Err(error) => {
                    tracing::error!(seq, %error, "a log record does not decode; its event is skipped");
                    self.count_error("decode");
                }
            }
        }
        Ok(records.last().map(|(seq, _)| *seq))
    }

    /// Publishes a page of frames in order: one lock of the counters and one of the sender
    /// per page, not per event.
    fn publish(&self, frames: Vec<Arc<EventFrame>>) {
        let Some(last_seq) = frames.last().map(|f| f.seq) else {
            return;
        };
        {
            let mut by_type = lock(&self.events_by_type);
            for frame in &frames {
                count_type(&mut by_type, frame.event_type());
            }
        }
        self.total_published
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        if let Some(sender) = lock(&self.sender).as_ref() {
            for frame in frames {
                // No receivers is fine: nobody is listening right now.
                let _ = sender.send(frame);
            }
        }
        self.published_seq.store(last_seq, Ordering::Release);
        self.published.notify_one();
    }
}

/// The bus. Kept in `AppState`; dropping the last handle stops the tailer.
pub struct Bus {
    inner: Arc<Inner>,
    /// The tailer and the ticker.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for Bus {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Bus {
    /// Starts the bus on the engine's log with default settings. Must run inside a tokio
    /// runtime (it spawns the tailer task).
    pub fn start(engine: &Arc<Engine>) -> Arc<Bus> {
        Self::start_with(Arc::clone(engine.log()), BusConfig::default())
    }

    /// Starts the bus on `log`; the live tail begins at the log's current durable seq.
    pub fn start_with(log: Arc<FileLog>, config: BusConfig) -> Arc<Bus> {
        let capacity = config.broadcast_capacity.clamp(1, BROADCAST_CAPACITY_MAX);
        let (sender, _) = broadcast::channel(capacity);
        let start_seq = log.durable_seq();
        let inner = Arc::new(Inner {
            log,
            sender: Mutex::new(Some(sender)),
            published_seq: AtomicU64::new(start_seq),
            stopped: AtomicBool::new(false),
            stopped_tx: tokio::sync::watch::channel(false).0,
            subscribers_limit: config.subscribers_limit.min(SUBSCRIBERS_LIMIT),
            subscribers: Mutex::new(HashMap::new()),
            subscriber_count: AtomicUsize::new(0),
            next_subscriber_id: AtomicU64::new(1),
            total_published: AtomicU64::new(0),
            total_delivered: AtomicU64::new(0),
            total_errors: AtomicU64::new(0),
            total_catch_ups: AtomicU64::new(0),
            events_by_type: Mutex::new(BTreeMap::new()),
            error_counts: Mutex::new(BTreeMap::new()),
            latency: Latency::new(),
            started_at: Instant::now(),
            published: tokio::sync::Notify::new(),
            ticks: std::array::from_fn(|_| tokio::sync::Notify::new()),
        });
        let tailer = tokio::spawn(tail(Arc::clone(&inner), start_seq + 1));
        let ticker = tokio::spawn(ticker(Arc::clone(&inner)));
        Arc::new(Bus {
            inner,
            tasks: Mutex::new(vec![tailer, ticker]),
        })
    }

    /// Stops the tailer and ends every subscription (they return `None`). Idempotent.
    pub fn stop(&self) {
        for handle in lock(&self.tasks).drain(..) {
            handle.abort();
        }
        self.inner.stop();
    }

    /// Resolves once the bus has stopped (for long-polls, so they end with the server).
    pub async fn stopped(&self) {
        let mut rx = self.inner.stopped_tx.subscribe();
        let _ = rx.wait_for(|stopped| *stopped).await;
    }

    pub fn is_running(&self) -> bool {
        !self.inner.stopped.load(Ordering::Acquire)
            && lock(&self.tasks)
                .first()
                .is_some_and(|tailer| !tailer.is_finished())
    }

    pub fn log(&self) -> &Arc<FileLog> {
        &self.inner.log
    }

    /// Registers a subscriber (counted against the limit) without a stream, e.g. for one pull
    /// request. The guard unregisters it.
    pub fn register(
        &self,
        kind: SubscriberKind,
        filter: EventFilter,
        position: Seq,
    ) -> Result<SubscriberGuard, BusError> {
        if self.inner.stopped.load(Ordering::Acquire) {
            return Err(BusError::Stopped);
        }
        let mut subscribers = lock(&self.inner.subscribers);
        if subscribers.len() >= self.inner.subscribers_limit {
            return Err(BusError::TooManySubscribers {
                limit: self.inner.subscribers_limit,
            });
        }
        let id = self
            .inner
            .next_subscriber_id
            .fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(SubscriberSlot {
            id,
            kind,
            filter,
            position: AtomicU64::new(position),
            connected_at_ms: now_ms(),
        });
        subscribers.insert(id, Arc::clone(&slot));
        self.inner.subscriber_count.fetch_add(1, Ordering::Relaxed);
        Ok(SubscriberGuard {
            inner: Arc::clone(&self.inner),
            slot,
        })
    }

    /// Subscribes from `from_seq` (default: the next durable seq, i.e. "from now"). A start
    /// older than the log's first seq is [`BusError::Expired`].
    pub fn subscribe(
        &self,
        kind: SubscriberKind,
        from_seq: Option<Seq>,
        filter: EventFilter,
    ) -> Result<Subscription, BusError> {
        // Subscribe to the live tail before reading the durable seq, so nothing published
        // after that point can be missed.
        let rx = match lock(&self.inner.sender).as_ref() {
            Some(sender) => sender.subscribe(),
            None => return Err(BusError::Stopped),
        };
        let durable = self.inner.log.durable_seq();
        let next_seq = from_seq.unwrap_or(durable + 1).max(1);
        let first_seq = self.inner.log.first_seq();
        if next_seq < first_seq {
            return Err(BusError::Expired {
                requested: next_seq,
                first_seq,
            });
        }
        let guard = self.register(kind, filter.clone(), next_seq - 1)?;
        Ok(Subscription {
            inner: Arc::clone(&self.inner),
            rx,
            next_seq,
            catching_up: next_seq <= durable,
            closed: false,
            pending: VecDeque::new(),
            page_end_seq: None,
            filter,
            latency_after_seq: durable,
            guard,
        })
    }

    /// Reads up to one page of events from `from` (decoded by the caller's task, not the
    /// tailer). Returns the frames and the last seq read.
    pub async fn read_page(
        &self,
        from: Seq,
    ) -> Result<(Vec<Arc<EventFrame>>, Option<Seq>), BusError> {
        let page = self.inner.read_page(from).await?;
        Ok((page.frames, page.end_seq))
    }

    /// The first seq whose event timestamp is at or after `since_ms` (timestamps never go
    /// backwards along seq), or the next durable seq when there is none. Binary search:
    /// O(log n) single-record reads.
    pub async fn seq_at_time(&self, since_ms: u64) -> Result<Seq, BusError> {
        let log = Arc::clone(&self.inner.log);
        tokio::task::spawn_blocking(move || seq_at_time_blocking(&log, since_ms))
            .await
            .map_err(|e| BusError::Log(format!("the log reader task failed: {e}")))?
    }

    /// Counts a delivery (and its latency when it is live, not history).
    pub fn record_delivery(&self, frame: &EventFrame, record_latency: bool) {
        self.inner.record_delivery(frame, record_latency);
    }

    pub fn count_error(&self, kind: &str) {
        self.inner.count_error(kind);
    }

    pub fn subscriber_count(&self) -> usize {
        lock(&self.inner.subscribers).len()
    }

    pub fn stats(&self) -> BusStats {
        let inner = &self.inner;
        let durable = inner.log.durable_seq();
        let mut slots: Vec<Arc<SubscriberSlot>> =
            lock(&inner.subscribers).values().cloned().collect();
        slots.sort_by_key(|s| s.id);
        let mut pending_events = 0u64;
        let mut subscribers = Vec::with_capacity(slots.len().min(SUBSCRIBERS_LISTED_LIMIT));
        for s in &slots {
            let position = s.position.load(Ordering::Relaxed);
            let lag = durable.saturating_sub(position);
            pending_events += lag;
            if subscribers.len() < SUBSCRIBERS_LISTED_LIMIT {
                subscribers.push(SubscriberInfo {
                    id: s.id,
                    kind: s.kind,
                    filter: s.filter.clone(),
                    position,
                    lag,
                    connected_at_ms: s.connected_at_ms,
                });
            }
        }
        let latency = inner.latency.summary(now_ms());
        BusStats {
            total_published: inner.total_published.load(Ordering::Relaxed),
            total_delivered: inner.total_delivered.load(Ordering::Relaxed),
            total_errors: inner.total_errors.load(Ordering::Relaxed),
            total_catch_ups: inner.total_catch_ups.load(Ordering::Relaxed),
            pending_events,
            subscriber_count: slots.len(),
            running: self.is_running(),
            first_seq: inner.log.first_seq(),
            last_seq: durable,
            published_seq: inner.published_seq.load(Ordering::Acquire),
            events_by_type: lock(&inner.events_by_type).clone(),
            error_counts: lock(&inner.error_counts).clone(),
            uptime_seconds: inner.started_at.elapsed().as_secs(),
            latency,
            subscribers,
        }
    }
}

fn seq_at_time_blocking(log: &FileLog, since_ms: u64) -> Result<Seq, BusError> {
    // A retention delete may race the search; retry a few times from the new first seq.
    for _ in 0..8 {
        let mut lo = log.first_seq();
        let mut hi = log.durable_seq() + 1;
        let mut raced = false;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let timestamp_ms = match log.read_from(mid, 1, 1) {
                Ok(records) => match records.first() {
                    Some((_, payload)) => Record::decode(payload)
                        .map(|r| r.meta.timestamp_ms)
                        .unwrap_or(0),
                    None => u64::MAX,
                },
                Err(LogError::Compacted { .. }) => {
                    raced = true;
                    break;
                }
                Err(e) => return Err(BusError::from(e)),
            };
            if timestamp_ms < since_ms {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if !raced {
            return Ok(lo);
        }
    }
    Err(BusError::Log(
        "the log kept being truncated during a time search".to_string(),
    ))
}

/// The tailer: publishes every durable record, in seq order, from `next` on.
async fn tail(inner: Arc<Inner>, mut next: Seq) {
    let mut durable_rx = inner.log.watch_durable();
    loop {
        let durable = *durable_rx.borrow_and_update();
        while next <= durable && !inner.stopped.load(Ordering::Acquire) {
            if inner.live_receivers() == 0 {
                let skim = Arc::clone(&inner);
                let skimmed =
                    tokio::task::spawn_blocking(move || skim.skim_page_blocking(next, durable))
                        .await
                        .map_err(|e| BusError::Log(format!("the log reader task failed: {e}")))
                        .and_then(|r| r);
                match skimmed {
                    Ok(Some(end_seq)) => {
                        next = end_seq + 1;
                        inner.published_seq.store(end_seq, Ordering::Release);
                        continue;
                    }
                    Ok(None) => break,
                    // Fall through to the full path, which reports and handles errors.
                    Err(_) => {}
                }
            }
            match inner.read_page(next).await {
                Ok(page) => {
                    let Some(end_seq) = page.end_seq else { break };
                    inner.publish(page.frames);
                    next = end_seq + 1;
                    inner.published_seq.store(end_seq, Ordering::Release);
                }
                Err(BusError::Expired { first_seq, .. }) => {
                    // Retention overtook the tailer (only possible if it stalled for long):
                    // subscribers see the gap and catch up from disk, or learn it expired.
                    inner.count_error("tail_expired");
                    next = first_seq;
                }
                Err(error) => {
                    tracing::error!(%error, "the event tailer cannot read the log; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
        if inner.stopped.load(Ordering::Acquire) || durable_rx.changed().await.is_err() {
            break;
        }
    }
    // The log closed (or the bus stopped): every stream ends after what it already has.
    inner.stop();
}

/// The ticker. With coalescing at `c` ms, subscribers fall in [`COALESCE_MS_MAX`] cohorts (by
/// id) and cohort `k` is woken at every ms `m` with `m ≡ k (mod c)`: each writer still writes
/// at most once per `c` ms, but a thousand writers' work is spread evenly over the interval
/// instead of arriving as one burst per interval. Why: in a burst, every task that handles a
/// publish or an ack queues behind a thousand writers (about 12 ms of work on this machine),
/// and a commit that just missed a burst waits for the next; that queueing, not the
/// coalescing, made most of the fan-out's latency tail. It ticks for one full interval after
/// the last publish, so every cohort sees every event, and sleeps while nothing is published.
async fn ticker(inner: Arc<Inner>) {
    let clock_ms = |inner: &Inner| inner.started_at.elapsed().as_millis() as u64;
    let mut seen_seq = inner.published_seq.load(Ordering::Acquire);
    loop {
        inner.published.notified().await;
        if inner.stopped.load(Ordering::Acquire) {
            return;
        }
        let published_seq = inner.published_seq.load(Ordering::Acquire);
        if published_seq == seen_seq {
            continue; // A publish this loop's last round already covered.
        }
        seen_seq = published_seq;
        if inner.coalesce_ms() == 0 {
            for tick in &inner.ticks {
                tick.notify_waiters();
            }
            continue;
        }
        let mut last_ms = clock_ms(&inner);
        let mut until_ms = last_ms + inner.coalesce_ms();
        while last_ms < until_ms {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            if inner.stopped.load(Ordering::Acquire) {
                return;
            }
            let (now, c) = (clock_ms(&inner), inner.coalesce_ms().max(1));
            // Every ms since the last round (a sleep can overrun), at most one interval's.
            for m in (last_ms + 1)..=now.min(last_ms + c) {
                let mut k = m % c;
                while k < COALESCE_MS_MAX {
                    inner.ticks[k as usize].notify_waiters();
                    k += c;
                }
            }
            last_ms = now.max(last_ms);
            let published_seq = inner.published_seq.load(Ordering::Acquire);
            if published_seq != seen_seq {
                seen_seq = published_seq;
                until_ms = last_ms + c;
            }
        }
    }
}

/// One subscriber's ordered, gapless view of the log from its start, filtered.
pub struct Subscription {
    inner: Arc<Inner>,
    rx: broadcast::Receiver<Arc<EventFrame>>,
    /// The next seq this subscriber has not yet passed.
    next_seq: Seq,
    catching_up: bool,
    /// The live tail has closed (the bus stopped).
    closed: bool,
    /// At most one catch-up page (or one live frame).
    pending: VecDeque<Arc<EventFrame>>,
    page_end_seq: Option<Seq>,
    filter: EventFilter,
    /// Seqs above this were committed after the subscription started: their delivery
    /// latency is measured (history is not).
    latency_after_seq: Seq,
    guard: SubscriberGuard,
}

impl Subscription {
    /// The next matching event, in seq order; `Ok(None)` once the bus has stopped.
    /// Cancel-safe: dropping the future loses nothing (the position only moves once an
    /// event is returned or filtered out).
    pub async fn next(&mut self) -> Result<Option<Arc<EventFrame>>, BusError> {
        loop {
            if let Some(frame) = self.take_pending() {
                return Ok(Some(frame));
            }
            if self.inner.stopped.load(Ordering::Acquire) {
                return Ok(None);
            }
            if self.catching_up {
                let page = match self.inner.read_page(self.next_seq).await {
                    Ok(page) => page,
                    Err(e) => {
                        if matches!(e, BusError::Expired { .. }) {
                            self.inner.count_error("subscriber_expired");
                        }
                        return Err(e);
                    }
                };
                match page.end_seq {
                    None => self.catching_up = false,
                    Some(end_seq) => {
                        self.pending.extend(page.frames);
                        self.page_end_seq = Some(end_seq);
                    }
                }
                continue;
            }
            let received = self.rx.recv().await;
            self.accept(received.map_err(|e| match e {
                RecvError::Lagged(n) => TryRecvError::Lagged(n),
                RecvError::Closed => TryRecvError::Closed,
            }));
            if self.closed {
                return Ok(None);
            }
        }
    }

    /// How long a stream writer should let events gather after the first one before it
    /// writes, in ms: none with few subscribers (latency first), up to
    /// [`COALESCE_MS_MAX`] with many. Why: with a thousand subscribers, a write per event per
    /// subscriber is a million writes and task wakes a second at 1,000 events/s — more than
    /// the machine has, so latency would grow without bound; a few ms of gathering makes it a
    /// write per subscriber per tick.
    pub fn coalesce_ms(&self) -> u64 {
        self.inner.coalesce_ms()
    }

    /// Like [`Subscription::next`], but a frame from the live tail is returned only at this
    /// subscriber's next coalescing tick (see [`ticker`]), by when the events since its last
    /// write have gathered for [`Subscription::try_next`]. Catching up from the log does not
    /// wait. Cancel-safe, like `next`.
    pub async fn next_on_tick(&mut self) -> Result<Option<Arc<EventFrame>>, BusError> {
        let inner = Arc::clone(&self.inner);
        let cohort = (self.guard.slot.id % COALESCE_MS_MAX) as usize;
        loop {
            let tick = inner.ticks[cohort].notified();
            tokio::pin!(tick);
            // Registered before looking, so a tick between the look and the wait counts.
            tick.as_mut().enable();
            if let Some(frame) = self.try_next() {
                return Ok(Some(frame));
            }
            if self.catching_up || self.closed || self.inner.stopped.load(Ordering::Acquire) {
                return self.next().await;
            }
            tick.await;
        }
    }

    /// The next matching event if one is at hand without waiting or reading the log (a
    /// frame already received, or one waiting on the live tail); `None` otherwise. A writer
    /// uses it to put every event that is ready into one write.
    pub fn try_next(&mut self) -> Option<Arc<EventFrame>> {
        loop {
            if let Some(frame) = self.take_pending() {
                return Some(frame);
            }
            if self.catching_up || self.closed || self.inner.stopped.load(Ordering::Acquire) {
                return None;
            }
            match self.rx.try_recv() {
                Err(TryRecvError::Empty) => return None,
                received => self.accept(received),
            }
            if self.pending.is_empty() {
                return None;
            }
        }
    }

    /// Passes pending frames (advancing the position over filtered ones) and returns the
    /// first that matches; also passes the end of a page whose last records did not decode.
    fn take_pending(&mut self) -> Option<Arc<EventFrame>> {
        while let Some(frame) = self.pending.pop_front() {
            if frame.seq < self.next_seq {
                continue;
            }
            self.next_seq = frame.seq + 1;
            self.guard.slot.position.store(frame.seq, Ordering::Relaxed);
            if self.filter.matches_frame(&frame) {
                return Some(frame);
            }
        }
        if let Some(end_seq) = self.page_end_seq.take() {
            // Records of the page that did not decode are passed too.
            if end_seq >= self.next_seq {
                self.next_seq = end_seq + 1;
                self.guard.slot.position.store(end_seq, Ordering::Relaxed);
            }
        }
        None
    }

    /// Takes one result of the live tail: the next frame is queued, a gap or a lag switches
    /// to reading the log, a closed tail ends the subscription.
    fn accept(&mut self, received: Result<Arc<EventFrame>, TryRecvError>) {
        match received {
            Ok(frame) if frame.seq < self.next_seq => {}
            Ok(frame) if frame.seq == self.next_seq => self.pending.push_back(frame),
            // A gap: frames were published before this receiver saw them, or a record
            // did not decode. The log has them (or says why not).
            Ok(_) => self.catching_up = true,
            Err(TryRecvError::Lagged(_)) => {
                self.inner.total_catch_ups.fetch_add(1, Ordering::Relaxed);
                self.catching_up = true;
            }
            Err(TryRecvError::Closed) => self.closed = true,
            Err(TryRecvError::Empty) => {}
        }
    }

    /// The last seq this subscriber has passed.
    pub fn position(&self) -> Seq {
        self.next_seq - 1
    }

    /// Counts `frame` as delivered to this subscriber.
    pub fn delivered(&self, frame: &EventFrame) {
        self.inner
            .record_delivery(frame, frame.seq > self.latency_after_seq);
    }

    /// Counts `frames` (in seq order) as delivered at `now_ms`, in one update of the shared
    /// counters per run of equal latency: a writer sends many frames in one write, and a
    /// thousand subscribers updating the same counters (and reading the clock) per event made
    /// those a large part of the fan-out's CPU.
    pub fn delivered_all(&self, frames: &[Arc<EventFrame>], now_ms: u64) {
        if frames.is_empty() {
            return;
        }
        let inner = &self.inner;
        inner
            .total_delivered
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        let mut run: Option<(u64, u64)> = None; // (latency_ms, count)
        for frame in frames.iter().filter(|f| f.seq > self.latency_after_seq) {
            let latency_ms = now_ms.saturating_sub(frame.event.timestamp_ms);
            run = match run {
                Some((l, n)) if l == latency_ms => Some((l, n + 1)),
                Some((l, n)) => {
                    inner.latency.record_n(now_ms, l, n);
                    Some((latency_ms, 1))
                }
                None => Some((latency_ms, 1)),
            };
        }
        if let Some((l, n)) = run {
            inner.latency.record_n(now_ms, l, n);
        }
    }

    pub fn id(&self) -> u64 {
        self.guard.slot.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_quantiles_over_two_windows() {
        let l = Latency::new();
        let t0 = 10 * LATENCY_WINDOW_MS;
        for ms in 1..=100 {
            l.record(t0, ms);
        }
        let s = l.summary(t0);
        assert_eq!((s.samples, s.p50_ms, s.p99_ms), (100, 50, 99));
        assert_eq!(s.sum_ms, 5050);
        // The next window adds to the previous one; the one after that forgets the first.
        l.record(t0 + LATENCY_WINDOW_MS, 5000);
        let s = l.summary(t0 + LATENCY_WINDOW_MS);
        assert_eq!(s.samples, 101);
        assert_eq!(latency_bucket_floor_ms(latency_bucket(5000)), 4096);
        let s = l.summary(t0 + 2 * LATENCY_WINDOW_MS);
        assert_eq!((s.samples, s.p50_ms), (1, 4096));
        l.record(t0 + 2 * LATENCY_WINDOW_MS, 7);
        let s = l.summary(t0 + 2 * LATENCY_WINDOW_MS);
        assert_eq!((s.samples, s.p50_ms, s.p99_ms), (2, 7, 4096));
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
        assert_eq!(latency_bucket_floor_ms(LATENCY_BUCKETS - 1), 1 << 63);
        // A run of equal latencies counted at once weighs as much as one by one.
        let (a, b) = (Latency::new(), Latency::new());
        for _ in 0..30 {
            a.record(t0, 3);
        }
        a.record(t0, 40);
        b.record_n(t0, 3, 30);
        b.record_n(t0, 40, 1);
        assert_eq!(a.summary(t0), b.summary(t0));
        assert_eq!(b.summary(t0).sum_ms, 130);
    }

    #[test]
    fn sse_frames_are_one_data_line_per_json_line() {
        let f = sse_frame_bytes(7, "app.x", r#"{"a":1}"#);
        assert_eq!(&f[..], b"id: 7\nevent: app.x\ndata: {\"a\":1}\n\n");
        let f = sse_frame_bytes(8, "a\nb", "x\ny");
        assert_eq!(&f[..], b"id: 8\nevent: ab\ndata: x\ndata: y\n\n");
    }

    #[test]
    fn globs() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("document.*", "document.added"));
        assert!(!glob_match("document.*", "chunk.added"));
        assert!(glob_match("*.deleted", "chunk.deleted"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        let f = EventFilter::parse(Some("document.*, chunk.added"), Some("l1".into())).unwrap();
        assert!(f.matches("chunk.added", Some("l1")));
        assert!(!f.matches("chunk.added", Some("l2")));
        assert!(!f.matches("library.created", Some("l1")));
        assert!(EventFilter::parse(Some("*,x"), None)
            .unwrap()
            .types
            .is_empty());
        assert!(EventFilter::parse(Some(&"a,".repeat(100)), None).is_err());
    }
}
