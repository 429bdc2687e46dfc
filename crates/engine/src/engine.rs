//! The engine: the only writer of state. A write is validated, framed as records, appended to
//! the log (which assigns its `seq`), applied to memory in `seq` order, and acknowledged once
//! the log reports it durable. Reads take a library's read lock and report the `seq` they are
//! consistent at.
//!
//! Invariants (asserted or enforced here):
//! - one writer at a time (`write_lock`): validation sees every earlier change, and records are
//!   applied in exactly the order the log numbered them — the live state equals a replay;
//! - nothing is applied that is not in the log, and every write's `seq` is returned;
//! - the write lock is never held across an fsync: writers queue behind one another only for
//!   validation and apply, while the log's writer thread gives all of them one fsync.
//!
//! With a JetStream log (see the `replica` module), a commit is first published to the stream
//! on condition that the stream has not moved since this replica last folded it; a refusal
//! changed nothing and is retried after folding the winner (`retry_conflicts`), then is a
//! `write_conflict`. Other replicas' messages are folded (appended
//! locally, applied) under the same write lock, so the two never interleave.
//!
//! Reads may see a change up to one group commit before its writer is acknowledged (the
//! change is in the log's queue). If the log then fails, the process exits rather than serve
//! state the disk does not have (see [`Engine::wait_durable`]); the event stream only ever
//! shows durable records.

use crate::error::{EngineError, Result};
use crate::filter::Filter;
use crate::input::{self, CreateLibrary, DocumentInput, PatchLibrary, SearchInput};
use crate::replica;
use crate::snapshot;
use crate::state::{self, Catalog, LibraryState, Shard};
use parking_lot::{Mutex, RwLock};
use quiver_embed::{Embedder, NoEmbedder, Purpose};
use quiver_log::{
    Envelope, FileLog, FsyncPolicy, JetStreamConfig, JetStreamLog, LogConfig, LogError, Published,
    Retention, Seq,
};
use quiver_model::limits::{CHUNKS_PER_DOCUMENT_LIMIT, LIBRARIES_LIMIT, SEARCH_K_LIMIT};
use quiver_model::record::Change;
use quiver_model::validate::{self, Invalid};
use quiver_model::{time, Document, IndexType, Library, Metric, Record, RecordMeta};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How to open an engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    pub fsync: FsyncPolicy,
    /// How long (or how much) log to keep beyond what the newest snapshot needs, so event
    /// subscribers can resume from old `seq`s.
    pub retention: Retention,
    /// Take a snapshot once this many records were applied since the last one…
    pub snapshot_every_records: u64,
    /// …and the log has grown by at least this many bytes (and by at least the size of the
    /// last snapshot). A snapshot rewrites the whole state, so this bounds its write
    /// amplification; replaying this much log at start-up takes about a second.
    pub snapshot_min_log_bytes: u64,
    /// …or applying the records since the last snapshot has taken this many ms (whatever
    /// their count and size), so a restart after a crash replays for about this long at most.
    /// Why both: bytes bound replay for cheap records, but an HNSW insert costs ~0.4 ms to
    /// apply for ~700 bytes of log, so at a million vectors the byte rule alone let a crash
    /// replay for many minutes.
    pub snapshot_replay_ms_limit: u64,
    pub segment_size_bytes_limit: u64,
    /// The most log that durable readers (consumer groups, webhook endpoints — see
    /// [`Engine::set_retention_hold`]) may keep beyond `retention` while they have not read
    /// it. Past it the segments go anyway and those readers report the events they lost.
    pub reader_retention: Retention,
    /// Append a `search.performed` event for every search (telemetry, so off by default).
    pub emit_search_events: bool,
    /// Keep the log in a NATS JetStream stream shared by every replica (see the `replica` module);
    /// `None`: the embedded file log is the log of record.
    pub jetstream: Option<JetStreamConfig>,
}

impl EngineConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        EngineConfig {
            data_dir: data_dir.into(),
            fsync: FsyncPolicy::Always,
            retention: Retention {
                max_age: Some(Duration::from_secs(7 * 24 * 3600)),
                max_bytes: None,
            },
            snapshot_every_records: 50_000,
            snapshot_min_log_bytes: 256 * 1024 * 1024,
            snapshot_replay_ms_limit: 60_000,
            segment_size_bytes_limit: 64 * 1024 * 1024,
            reader_retention: Retention {
                max_age: Some(Duration::from_secs(30 * 24 * 3600)),
                max_bytes: Some(64 * 1024 * 1024 * 1024),
            },
            emit_search_events: false,
            jetstream: None,
        }
    }
}

/// Who caused a write: carried into every record it produces (and so into its events).
#[derive(Clone, Debug, Default)]
pub struct WriteCtx {
    pub trace_id: Option<String>,
    pub source: Option<String>,
}

/// A write's result and the `seq` of its last record (the state includes it from then on).
#[derive(Debug)]
pub struct Committed<T> {
    pub value: T,
    pub seq: Seq,
}

/// A library as reads show it: its description and its size, never its vectors.
#[derive(Clone, Debug)]
pub struct LibraryInfo {
    pub library: Library,
    pub num_documents: usize,
    pub num_chunks: usize,
    pub index_memory_bytes: usize,
}

impl LibraryInfo {
    fn of(st: &LibraryState) -> Self {
        LibraryInfo {
            library: st.library.clone(),
            num_documents: st.num_documents(),
            num_chunks: st.num_chunks,
            index_memory_bytes: st.index_memory_bytes(),
        }
    }
}

pub struct Hit {
    pub document: Arc<Document>,
    pub chunk_index: usize,
    pub distance: f32,
}

/// One item of a batch: committed (with its own seq) or refused (with its own error).
#[derive(Debug)]
pub enum ItemOutcome {
    Committed {
        document_id: String,
        created: bool,
        num_chunks: usize,
        seq: Seq,
    },
    Failed(EngineError),
}

#[derive(Clone, Debug, Default)]
pub struct EngineStats {
    pub applied_seq: Seq,
    pub durable_seq: Seq,
    pub first_seq: Seq,
    pub last_snapshot_seq: Seq,
    pub log_size_bytes: u64,
    pub libraries: usize,
    /// With a JetStream log: the stream's name, the last message this replica folded and the
    /// replica's id.
    pub replica: Option<(String, u64, String)>,
}

/// Reports the oldest seq one kind of durable reader still needs, and which reader of that kind
/// needs it (e.g. a consumer group's name), or `None` when it needs nothing.
pub type RetentionHold = Box<dyn Fn() -> Option<(Seq, String)> + Send + Sync>;

pub struct Engine {
    config: EngineConfig,
    /// Durable readers' holds on the log, by name (see [`Engine::set_retention_hold`]).
    holds: Mutex<std::collections::BTreeMap<String, RetentionHold>>,
    log: Arc<FileLog>,
    pub(crate) write_lock: Mutex<WriterState>,
    catalog: RwLock<Catalog>,
    applied_seq: AtomicU64,
    embedder: Arc<dyn Embedder>,
    snapshot_lock: Mutex<()>,
    last_snapshot_seq: AtomicU64,
    /// Size of the last snapshot file and the log's written bytes when it was taken: the
    /// next snapshot waits until the log has grown by as much as the last snapshot, so
    /// snapshots never write more than the log itself (amortised O(1) per byte ingested, not
    /// O(state) every N records), and replay after a crash reads at most about one state's
    /// worth of log.
    last_snapshot_size_bytes: AtomicU64,
    log_bytes_at_snapshot: AtomicU64,
    /// Time spent applying the records after the last snapshot (the replay a restart would
    /// do), in ns: counted at start-up's replay and at every commit.
    apply_ns_since_snapshot: AtomicU64,
    stop: AtomicBool,
    snapshot_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The shared log, when this engine is one replica of a JetStream stream.
    stream: Option<JetStreamLog>,
    /// The last stream message folded (a copy of `WriterState::stream_msg_seq`, for stats).
    stream_msg_seq: AtomicU64,
    follow_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// With a JetStream log: this replica's name, kept in `<data_dir>/replica_id`, so work
    /// that must happen once (a job) knows whose it is.
    replica_id: Option<String>,
    pub started_at: Instant,
}

pub(crate) struct WriterState {
    /// Timestamps never go backwards along `seq`, whatever the wall clock does.
    last_timestamp_ms: u64,
    /// With a JetStream log: the last stream message folded, which the next publish expects
    /// to be the stream's last.
    stream_msg_seq: u64,
    /// With a JetStream log: messages the follower read, folded by whoever holds the lock.
    pub(crate) inbox: Option<tokio::sync::mpsc::Receiver<std::result::Result<Envelope, String>>>,
}

impl Engine {
    /// Opens the data directory: loads the newest valid snapshot, opens the log (truncating a
    /// torn tail, refusing corruption), replays the records after the snapshot, and starts the
    /// background snapshotter.
    pub fn open(config: EngineConfig) -> Result<Arc<Engine>> {
        Self::open_with(config, Arc::new(NoEmbedder))
    }

    pub fn open_with(config: EngineConfig, embedder: Arc<dyn Embedder>) -> Result<Arc<Engine>> {
        let io = |p: &std::path::Path| {
            let p = p.display().to_string();
            move |e| EngineError::Io { path: p, source: e }
        };
        let snap_dir = config.data_dir.join("snapshots");
        std::fs::create_dir_all(&snap_dir).map_err(io(&snap_dir))?;
        let log_dir = config.data_dir.join("log");

        // Newest valid snapshot first; a damaged one is reported and the previous one used.
        let mut catalog = Catalog::default();
        let mut snap_seq: Seq = 0;
        for (seq, path) in snapshot::list(&snap_dir)? {
            match snapshot::load(&path) {
                Ok((s, c)) => {
                    assert_eq!(s, seq, "snapshot file name and header agree");
                    catalog = c;
                    snap_seq = s;
                    break;
                }
                Err(e) => tracing::error!("ignoring snapshot: {e}"),
            }
        }

        let mut log_config = LogConfig::new(&log_dir);
        log_config.fsync = config.fsync;
        log_config.segment_size_bytes_limit = config.segment_size_bytes_limit;
        let (log, recovery) = FileLog::open(log_config)?;
        if recovery.truncated_bytes > 0 {
            tracing::warn!(
                "log: dropped a torn tail of {} bytes (an unacknowledged write)",
                recovery.truncated_bytes
            );
        }
        if recovery.last_seq < snap_seq {
            return Err(EngineError::Corrupt(format!(
                "the snapshot at seq {snap_seq} is newer than the log, which ends at seq {}; the log in {} is missing records",
                recovery.last_seq,
                log_dir.display()
            )));
        }
        if log.first_seq() > snap_seq + 1 {
            return Err(EngineError::Corrupt(format!(
                "the log in {} begins at seq {} but the newest usable snapshot covers only up to seq {snap_seq}; records {}..{} are missing",
                log_dir.display(),
                log.first_seq(),
                snap_seq + 1,
                log.first_seq() - 1
            )));
        }

        let catalog = RwLock::new(catalog);
        let replay_started = Instant::now();
        let mut next = snap_seq + 1;
        let mut last_timestamp_ms = 0;
        loop {
            let batch = log.read_from(next, 4096, 64 << 20)?;
            if batch.is_empty() {
                break;
            }
            for (seq, payload) in batch {
                assert_eq!(seq, next, "the log returns contiguous seqs");
                let rec = Record::decode(&payload).map_err(|e| {
                    EngineError::Corrupt(format!("log record {seq} cannot be decoded: {e}"))
                })?;
                last_timestamp_ms = last_timestamp_ms.max(rec.meta.timestamp_ms);
                state::apply(&catalog, rec).map_err(|e| {
                    EngineError::Corrupt(format!("log record {seq} cannot be applied: {e}"))
                })?;
                next += 1;
            }
        }
        let applied = next - 1;
        assert_eq!(
            applied,
            recovery.last_seq.max(snap_seq),
            "replay reached the end of the log"
        );
        tracing::info!(
            snapshot_seq = snap_seq,
            replayed = applied - snap_seq,
            last_seq = applied,
            "state recovered"
        );

        // A replica of a shared log: find where the local copy stands in the stream.
        let (stream, position) = match &config.jetstream {
            None => (None, None),
            Some(js) => {
                let stream = JetStreamLog::connect(js.clone())?;
                let position = replica::locate(&stream, &log, applied)?;
                tracing::info!(
                    stream = %js.stream,
                    url = %js.url,
                    folded_msg_seq = position.folded_msg_seq,
                    stream_last_msg_seq = position.stream_last_msg_seq,
                    "replica of a JetStream log"
                );
                (Some(stream), Some(position))
            }
        };
        let folded_msg_seq = position.as_ref().map_or(0, |p| p.folded_msg_seq);
        let replica_id = match &stream {
            Some(_) => Some(replica::replica_id(&config.data_dir)?),
            None => None,
        };

        let engine = Arc::new(Engine {
            config,
            holds: Mutex::new(Default::default()),
            log: Arc::new(log),
            write_lock: Mutex::new(WriterState {
                last_timestamp_ms,
                stream_msg_seq: folded_msg_seq,
                inbox: None,
            }),
            catalog,
            applied_seq: AtomicU64::new(applied),
            embedder,
            snapshot_lock: Mutex::new(()),
            last_snapshot_seq: AtomicU64::new(snap_seq),
            last_snapshot_size_bytes: AtomicU64::new(0),
            log_bytes_at_snapshot: AtomicU64::new(0),
            apply_ns_since_snapshot: AtomicU64::new(nanos_u64(replay_started.elapsed())),
            stop: AtomicBool::new(false),
            snapshot_thread: Mutex::new(None),
            stream,
            stream_msg_seq: AtomicU64::new(folded_msg_seq),
            follow_thread: Mutex::new(None),
            replica_id,
            started_at: Instant::now(),
        });
        let weak = Arc::downgrade(&engine);
        let handle = spawn_thread("quiver-snapshot", move || snapshot_loop(weak))?;
        *engine.snapshot_thread.lock() = Some(handle);
        if let Some(position) = position {
            engine.start_following(position)?;
        }
        Ok(engine)
    }

    /// Folds a partly held message, starts the follower, and folds the stream up to the last
    /// message it had when this replica located itself, so a replica serves only once it has
    /// caught up with what was written before it started.
    fn start_following(self: &Arc<Self>, position: replica::Position) -> Result<()> {
        let Some(stream) = &self.stream else {
            return Ok(());
        };
        let from = {
            let mut w = self.write_lock.lock();
            if let Some(partial) = position.partial {
                self.fold_locked(&mut w, partial)?;
            }
            w.stream_msg_seq + 1
        };
        let weak = Arc::downgrade(self);
        let handle = spawn_thread("quiver-follow", move || follow_loop(weak))?;
        let waker = handle.thread().clone();
        let inbox = stream.follow(from, move || waker.unpark());
        self.write_lock.lock().inbox = Some(inbox);
        *self.follow_thread.lock() = Some(handle);

        let target = position.stream_last_msg_seq;
        let stall_limit = stream.config().request_timeout * 3;
        let (mut progress_at, mut progress_msg) = (Instant::now(), 0);
        let mut logged_at = Instant::now();
        loop {
            let folded = {
                let mut w = self.write_lock.lock();
                self.drain_locked(&mut w)?;
                w.stream_msg_seq
            };
            if folded >= target {
                tracing::info!(
                    folded_msg_seq = folded,
                    applied_seq = self.applied_seq(),
                    "caught up with the JetStream log"
                );
                return Ok(());
            }
            if folded > progress_msg {
                (progress_at, progress_msg) = (Instant::now(), folded);
            } else if progress_at.elapsed() > stall_limit {
                return Err(EngineError::Unavailable {
                    code: "log_unavailable",
                    detail: format!(
                        "catching up with JetStream stream {:?} made no progress for {} s (at message {folded} of {target})",
                        stream.config().stream,
                        stall_limit.as_secs()
                    ),
                });
            }
            if logged_at.elapsed() > Duration::from_secs(5) {
                tracing::info!(
                    folded_msg_seq = folded,
                    target_msg_seq = target,
                    "catching up with the JetStream log"
                );
                logged_at = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Folds every message the follower has queued (under the write lock, so folds and
    /// commits never interleave).
    fn drain_locked(&self, w: &mut WriterState) -> Result<()> {
        loop {
            let next = match w.inbox.as_mut() {
                None => return Ok(()),
                Some(inbox) => inbox.try_recv(),
            };
            match next {
                Ok(Ok(envelope)) => self.fold_locked(w, envelope)?,
                Ok(Err(reason)) => return Err(EngineError::Corrupt(reason)),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => return Ok(()),
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                    return Err(EngineError::Unavailable {
                        code: "log_unavailable",
                        detail: "the JetStream follower stopped".into(),
                    })
                }
            }
        }
    }

    /// Folds one stream message: appends its records this replica does not hold to the local
    /// log and applies them. Messages already folded (this replica's own commits, delivered
    /// back by the follower) are skipped; a message that would leave a gap is an error.
    fn fold_locked(&self, w: &mut WriterState, envelope: Envelope) -> Result<()> {
        if envelope.msg_seq <= w.stream_msg_seq {
            return Ok(());
        }
        let applied = self.applied_seq();
        if envelope.first_seq > applied + 1 {
            return Err(EngineError::Corrupt(format!(
                "stream message {} begins at seq {} but this replica holds records only up to seq {applied}: records are missing from the stream",
                envelope.msg_seq, envelope.first_seq
            )));
        }
        let msg_seq = envelope.msg_seq;
        if envelope.last_seq() > applied {
            let skip = (applied + 1 - envelope.first_seq) as usize;
            let payloads: Vec<Vec<u8>> = envelope.payloads.into_iter().skip(skip).collect();
            let mut records = Vec::with_capacity(payloads.len());
            for (i, payload) in payloads.iter().enumerate() {
                records.push(Record::decode(payload).map_err(|e| {
                    EngineError::Corrupt(format!(
                        "stream message {msg_seq}: record {} cannot be decoded: {e}",
                        applied + 1 + i as u64
                    ))
                })?);
            }
            let timestamp_ms = records.iter().map(|r| r.meta.timestamp_ms).max();
            let first = self.log.append(payloads)?;
            self.apply_appended(first, records);
            w.last_timestamp_ms = w.last_timestamp_ms.max(timestamp_ms.unwrap_or(0));
        }
        w.stream_msg_seq = msg_seq;
        self.stream_msg_seq.store(msg_seq, Ordering::Release);
        Ok(())
    }

    /// Publishes a commit's records to the shared log, then appends them to the local copy.
    /// Returns the first record's seq.
    fn publish_locked(
        &self,
        w: &mut WriterState,
        stream: &JetStreamLog,
        payloads: Vec<Vec<u8>>,
    ) -> Result<Seq> {
        // What the local log would refuse must not reach the stream.
        let limit_bytes = self.log.config().record_size_bytes_limit;
        if let Some(p) = payloads.iter().find(|p| p.len() > limit_bytes as usize) {
            return Err(LogError::RecordTooLarge {
                size_bytes: p.len(),
                limit_bytes,
            }
            .into());
        }
        match stream.publish(w.stream_msg_seq, self.applied_seq() + 1, &payloads) {
            Ok(Published::Stored(msg_seq)) => {
                w.stream_msg_seq = msg_seq;
                self.stream_msg_seq.store(msg_seq, Ordering::Release);
                match self.log.append(payloads) {
                    Ok(first) => Ok(first),
                    Err(e) => {
                        tracing::error!("stream message {msg_seq} is stored but this replica cannot append it to its local log ({e}); exiting so a restart folds it from the stream");
                        std::process::exit(70);
                    }
                }
            }
            Ok(Published::Conflict) => {
                if let Err(e) = self.drain_locked(w) {
                    follow_failed(e);
                }
                Err(EngineError::Conflict {
                    code: "write_conflict",
                    detail: "another replica wrote to the shared log at the same moment; nothing was written: retry the request".into(),
                })
            }
            Err(e @ LogError::MessageTooLarge { .. }) => Err(e.into()),
            Err(e) => Err(EngineError::Unavailable {
                code: "log_unavailable",
                detail: format!("the shared log did not take the write ({e}); it may or may not have been stored: read before retrying"),
            }),
        }
    }

    /// Runs a write on its owned `input`, and on a replica runs it again (on a copy kept
    /// aside) when another replica committed first — up to [`CONFLICT_RETRIES_LIMIT`] times,
    /// after the follower has folded the winner — so a client sees `409 write_conflict` only
    /// under sustained contention. `write` builds its commit from scratch each time:
    /// validation has to see the winner's change.
    fn retry_conflicts<T: Clone, U>(
        &self,
        input: T,
        mut write: impl FnMut(T) -> Result<U>,
    ) -> Result<U> {
        let mut retained = Retained::new(input, self.stream.is_some());
        let mut retries = 0;
        loop {
            let Some(input) = retained.take() else {
                return Err(EngineError::Log(LogError::Failed(
                    "a write was retried without its input".into(),
                )));
            };
            match write(input) {
                Err(EngineError::Conflict {
                    code: "write_conflict",
                    ..
                }) if self.stream.is_some() && retries < CONFLICT_RETRIES_LIMIT => {
                    retries += 1;
                    self.wait_for_stream_head();
                }
                other => return other,
            }
        }
    }

    /// Waits (bounded) until the follower has folded the stream's current last message.
    fn wait_for_stream_head(&self) {
        let Some(stream) = &self.stream else {
            return;
        };
        let Ok((_, last)) = stream.bounds() else {
            return; // the retry will report what is wrong
        };
        let deadline = Instant::now() + Duration::from_millis(CONFLICT_FOLD_WAIT_MS_MAX);
        while self.stream_msg_seq.load(Ordering::Acquire) < last && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Applies records just appended to the log at `first..`, in order.
    fn apply_appended(&self, first: Seq, records: Vec<Record>) {
        assert_eq!(
            first,
            self.applied_seq() + 1,
            "the log numbers records right after what was applied"
        );
        let apply_started = Instant::now();
        for (i, rec) in records.into_iter().enumerate() {
            if let Err(e) = state::apply(&self.catalog, rec) {
                // A validated record (here or on another replica) cannot apply: memory and log
                // now disagree.
                tracing::error!(
                    "BUG: record {} was validated but cannot be applied: {e}; exiting",
                    first + i as u64
                );
                std::process::exit(70);
            }
            self.applied_seq.store(first + i as u64, Ordering::Release);
        }
        self.apply_ns_since_snapshot
            .fetch_add(nanos_u64(apply_started.elapsed()), Ordering::Relaxed);
    }

    /// Registers (or replaces) a durable reader's hold on the log: log retention keeps every
    /// segment holding a record at or after the seq `hold` reports, within
    /// [`EngineConfig::reader_retention`]. The closure runs at snapshot time, outside the
    /// engine's locks; it must not call back into the engine's retention.
    pub fn set_retention_hold(&self, name: &str, hold: RetentionHold) {
        self.holds.lock().insert(name.to_string(), hold);
    }

    /// The oldest seq any durable reader still needs, and who holds it (`"<kind> <reader>"`,
    /// e.g. `consumers orders-worker`): the answer to "why is the log not shrinking".
    pub fn retention_hold(&self) -> Option<(Seq, String)> {
        let holds = self.holds.lock();
        holds
            .iter()
            .filter_map(|(kind, f)| f().map(|(s, reader)| (s, format!("{kind} {reader}"))))
            .min()
    }

    /// This replica's name when the log is a JetStream stream (`None` on the embedded log).
    pub fn replica_id(&self) -> Option<&str> {
        self.replica_id.as_deref()
    }

    pub fn log(&self) -> &Arc<FileLog> {
        &self.log
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Whether a commit holds the write lock right now: a hint, stale as soon as it is read.
    /// An async caller with a small write (an application event) runs it in place when
    /// nothing is committing and goes to a blocking thread when something is, since a batch
    /// into an HNSW library holds the lock for as long as its graph inserts take.
    pub fn write_in_progress(&self) -> bool {
        // A replica's every commit waits for the stream's acknowledgement: never inline.
        self.stream.is_some() || self.write_lock.is_locked()
    }

    /// The highest `seq` applied to the state that reads see.
    pub fn applied_seq(&self) -> Seq {
        self.applied_seq.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            applied_seq: self.applied_seq(),
            durable_seq: self.log.durable_seq(),
            first_seq: self.log.first_seq(),
            last_snapshot_seq: self.last_snapshot_seq.load(Ordering::Acquire),
            log_size_bytes: self.log.size_bytes(),
            libraries: self.catalog.read().len(),
            replica: self.stream.as_ref().map(|s| {
                (
                    s.config().stream.clone(),
                    self.stream_msg_seq.load(Ordering::Acquire),
                    self.replica_id.clone().unwrap_or_default(),
                )
            }),
        }
    }

    /// Waits until `seq` is durable under the fsync policy. If the log has failed, the state in
    /// memory holds changes the disk may not: the process exits (as PostgreSQL does on an fsync
    /// failure) and a restart recovers from the log.
    pub async fn wait_durable(&self, seq: Seq) -> Result<()> {
        if self.log.durable_seq() >= seq {
            return Ok(());
        }
        let mut rx = self.log.watch_durable();
        let ok = rx.wait_for(|d| *d >= seq).await.is_ok();
        if !ok || self.log.durable_seq() < seq {
            let e = self.log.wait_durable(seq).err();
            tracing::error!("the log failed while seq {seq} was in flight ({e:?}); exiting so a restart recovers from disk");
            std::process::exit(70);
        }
        Ok(())
    }

    fn shard(&self, id_or_name: &str) -> Result<Arc<Shard>> {
        self.catalog
            .read()
            .resolve(id_or_name)
            .cloned()
            .ok_or_else(|| EngineError::not_found("library", id_or_name))
    }

    /// Validates and applies one write. `build` sees the current state and returns the
    /// changes to append plus a value; `after` runs after they are applied, still under the
    /// write lock, to read back what they made.
    fn commit<T, U>(
        &self,
        ctx: &WriteCtx,
        build: impl FnOnce(&Catalog, u64) -> Result<(Vec<Change>, T)>,
        after: impl FnOnce(&Catalog, T, Seq) -> U,
    ) -> Result<Committed<U>> {
        let mut w = self.write_lock.lock();
        if self.stream.is_some() {
            // Validate against everything the follower has read from other replicas.
            if let Err(e) = self.drain_locked(&mut w) {
                follow_failed(e);
            }
        }
        let timestamp_ms = time::now_ms().max(w.last_timestamp_ms);
        let (changes, value) = {
            let cat = self.catalog.read();
            build(&cat, timestamp_ms)?
        };
        let meta = RecordMeta {
            timestamp_ms,
            trace_id: ctx.trace_id.clone(),
            source: ctx.source.clone(),
        };
        if changes.is_empty() {
            let seq = self.applied_seq();
            let cat = self.catalog.read();
            return Ok(Committed {
                value: after(&cat, value, seq),
                seq,
            });
        }
        let records: Vec<Record> = changes
            .into_iter()
            .map(|c| Record::new(meta.clone(), c))
            .collect();
        let payloads: Vec<Vec<u8>> = records.iter().map(Record::encode).collect();
        let n = records.len() as u64;
        let first = match &self.stream {
            None => self.log.append(payloads)?,
            Some(stream) => self.publish_locked(&mut w, stream, payloads)?,
        };
        self.apply_appended(first, records);
        w.last_timestamp_ms = timestamp_ms;
        let last = first + n - 1;
        let cat = self.catalog.read();
        Ok(Committed {
            value: after(&cat, value, first),
            seq: last,
        })
    }

    // ---------------------------------------------------------------- libraries

    pub fn create_library(
        &self,
        ctx: &WriteCtx,
        mut req: CreateLibrary,
    ) -> Result<Committed<LibraryInfo>> {
        validate::name(&req.name)?;
        validate::description(&req.description)?;
        let metadata = req.metadata.take().unwrap_or_default();
        validate::metadata("library", &metadata)?;
        let metric = match &req.metric {
            None => Metric::Cosine,
            Some(m) => Metric::parse(m).ok_or_else(|| {
                EngineError::invalid(
                    "invalid_metric",
                    format!("unknown metric {m:?}; use cosine, dot or l2"),
                )
            })?,
        };
        let index_type = parse_index_config(
            req.index_type.as_deref(),
            req.index_params,
            req.quantization.as_ref(),
        )?;
        // No dimension and no model: the local default model, when this server has one.
        if req.dimension.is_none() && req.embedding_model.is_none() {
            if let Some(d) = self.embedder.dimension(DEFAULT_EMBEDDING_MODEL) {
                tracing::debug!(
                    "library {:?} gets {DEFAULT_EMBEDDING_MODEL} ({d}-d)",
                    req.name
                );
                req.embedding_model = Some(DEFAULT_EMBEDDING_MODEL.to_string());
            }
        }
        if let Some(m) = &req.embedding_model {
            validate::name(m).map_err(|e| EngineError::invalid("invalid_model", e.detail))?;
        }
        let model_dimension = req
            .embedding_model
            .as_deref()
            .and_then(|m| self.embedder.dimension(m));
        let dimension = match (req.dimension, model_dimension) {
            (Some(d), Some(md)) if d != md as u64 => {
                return Err(EngineError::invalid(
                    "dimension_mismatch",
                    format!(
                    "embedding model produces {md}-dimensional vectors but dimension {d} was given"
                ),
                ))
            }
            (Some(d), _) => validate::dimension(d)?,
            (None, Some(md)) => md,
            (None, None) => return Err(EngineError::invalid(
                "dimension_required",
                match &req.embedding_model {
                    Some(m) => format!(
                        "embedding model {m:?} is not available here, so `dimension` is required"
                    ),
                    None => {
                        "`dimension` is required: no embedding model is available on this server"
                            .to_string()
                    }
                },
            )),
        };
        let id = uuid::Uuid::new_v4().to_string();
        self.retry_conflicts((req, metadata), |(req, metadata)| {
            self.commit(
                ctx,
                |cat, now| {
                    if cat.id_for_name(&req.name).is_some() {
                        return Err(EngineError::Conflict {
                            code: "library_exists",
                            detail: format!("a library named {:?} already exists", req.name),
                        });
                    }
                    if cat.len() >= LIBRARIES_LIMIT {
                        return Err(EngineError::Invalid(Invalid::too_large(
                            "too_many_libraries",
                            format!("this server holds its limit of {LIBRARIES_LIMIT} libraries"),
                        )));
                    }
                    let lib = Library {
                        id: id.clone(),
                        name: req.name,
                        description: req.description,
                        dimension,
                        metric,
                        index_type,
                        embedding_model: req.embedding_model,
                        created_at_ms: now,
                        updated_at_ms: now,
                        metadata,
                    };
                    Ok((vec![Change::LibraryCreated(lib)], ()))
                },
                |cat, (), _| info_of(cat, &id),
            )
        })
        .and_then(|c| {
            Ok(Committed {
                value: c.value?,
                seq: c.seq,
            })
        })
    }

    pub fn update_library(
        &self,
        ctx: &WriteCtx,
        id: &str,
        req: PatchLibrary,
    ) -> Result<Committed<LibraryInfo>> {
        if let Some(n) = &req.name {
            validate::name(n)?;
        }
        if let Some(d) = &req.description {
            validate::description(d)?;
        }
        if let Some(m) = &req.metadata {
            validate::metadata("library", m)?;
        }
        let lib_id = self.shard(id)?.state.read().library.id.clone();
        self.retry_conflicts(req, |req| self.commit(
            ctx,
            |cat, now| {
                let shard = library_shard(cat, &lib_id, id)?;
                let mut lib = shard.state.read().library.clone();
                let immutable = |field: &str| {
                    EngineError::invalid(
                        "immutable_field",
                        format!("`{field}` cannot change after a library is created"),
                    )
                };
                if req.dimension.is_some_and(|d| d != lib.dimension as u64) {
                    return Err(immutable("dimension"));
                }
                if req
                    .metric
                    .as_deref()
                    .is_some_and(|m| Metric::parse(m) != Some(lib.metric))
                {
                    return Err(immutable("metric"));
                }
                if req.embedding_model.is_some() && req.embedding_model != lib.embedding_model {
                    return Err(immutable("embedding_model"));
                }
                if let Some(t) = &req.index_type {
                    if parse_index_type(Some(t))?.as_str() != lib.index_type.as_str() {
                        return Err(EngineError::invalid(
                            "immutable_field",
                            "`index_type` changes through PUT /v1/libraries/{id}/index, which rebuilds the index while searches continue",
                        ));
                    }
                }
                if let Some(n) = req.name {
                    if n != lib.name && cat.id_for_name(&n).is_some() {
                        return Err(EngineError::Conflict {
                            code: "library_exists",
                            detail: format!("a library named {n:?} already exists"),
                        });
                    }
                    lib.name = n;
                }
                if let Some(d) = req.description {
                    lib.description = d;
                }
                if let Some(m) = req.metadata {
                    lib.metadata = m;
                }
                lib.updated_at_ms = now;
                Ok((vec![Change::LibraryUpdated(lib)], ()))
            },
            |cat, (), _| info_of(cat, &lib_id),
        ))
        .and_then(|c| {
            Ok(Committed {
                value: c.value?,
                seq: c.seq,
            })
        })
    }

    pub fn delete_library(&self, ctx: &WriteCtx, id: &str) -> Result<Committed<()>> {
        let lib = self.shard(id)?.state.read().library.clone();
        self.retry_conflicts((), |()| {
            self.commit(
                ctx,
                |cat, _| {
                    if cat.shard(&lib.id).is_none() {
                        return Err(EngineError::not_found("library", id));
                    }
                    Ok((
                        vec![Change::LibraryDeleted {
                            library_id: lib.id.clone(),
                            name: lib.name.clone(),
                        }],
                        (),
                    ))
                },
                |_, (), _| (),
            )
        })
    }

    pub fn list_libraries(&self) -> (Vec<LibraryInfo>, Seq) {
        let cat = self.catalog.read();
        let mut out: Vec<LibraryInfo> = cat
            .shards()
            .map(|s| LibraryInfo::of(&s.state.read()))
            .collect();
        let seq = self.applied_seq();
        out.sort_by(|a, b| {
            a.library
                .created_at_ms
                .cmp(&b.library.created_at_ms)
                .then(a.library.name.cmp(&b.library.name))
        });
        (out, seq)
    }

    pub fn library(&self, id: &str) -> Result<(LibraryInfo, Seq)> {
        let shard = self.shard(id)?;
        let st = shard.state.read();
        Ok((LibraryInfo::of(&st), self.applied_seq()))
    }

    // ---------------------------------------------------------------- documents

    /// Resolves a library and returns its description, for validating input outside the lock.
    fn library_for_write(&self, id: &str) -> Result<Library> {
        Ok(self.shard(id)?.state.read().library.clone())
    }

    /// Adds a document, or replaces the one with the same id atomically.
    pub fn upsert_document(
        &self,
        ctx: &WriteCtx,
        library: &str,
        doc: DocumentInput,
    ) -> Result<Committed<(Arc<Document>, bool)>> {
        let lib = self.library_for_write(library)?;
        let doc = input::prepare_document(&lib, doc, self.embedder.as_ref())?;
        let doc_id = doc.id.clone();
        self.retry_conflicts(doc, |doc| {
            self.commit(
                ctx,
                |cat, now| {
                    let shard = library_shard(cat, &lib.id, library)?;
                    let change = stamp(&shard.state.read(), doc, now, &mut Default::default());
                    let created = matches!(
                        change,
                        Change::DocumentUpserted {
                            replaced: false,
                            ..
                        }
                    );
                    Ok((vec![change], created))
                },
                |cat, created, _| {
                    let doc = cat
                        .shard(&lib.id)
                        .and_then(|s| s.state.read().document(&doc_id).cloned());
                    (doc.expect("the document was just applied"), created)
                },
            )
        })
    }

    /// Upserts many documents in one group: each item is validated on its own, bad items get
    /// their own error, good items commit together (one append, one fsync).
    pub fn upsert_documents(
        &self,
        ctx: &WriteCtx,
        library: &str,
        items: Vec<std::result::Result<DocumentInput, EngineError>>,
    ) -> Result<Committed<Vec<ItemOutcome>>> {
        let lib = self.library_for_write(library)?;
        let mut deferred: Vec<Result<(Document, Vec<usize>)>> = items
            .into_iter()
            .map(|i| i.and_then(|d| input::prepare_document_deferred(&lib, d)))
            .collect();
        // One embedding call for every text-only chunk of the batch.
        let mut pending: Vec<(usize, &mut Vec<quiver_model::Chunk>, &[usize])> = deferred
            .iter_mut()
            .enumerate()
            .filter_map(|(n, d)| {
                d.as_mut()
                    .ok()
                    .map(|(doc, needs)| (n, &mut doc.chunks, &needs[..]))
            })
            .filter(|(_, _, needs)| !needs.is_empty())
            .collect();
        let mut failures: Vec<(usize, EngineError)> = Vec::new();
        if !pending.is_empty() {
            let mut items: Vec<(&mut Vec<quiver_model::Chunk>, &[usize])> =
                pending.iter_mut().map(|(_, c, n)| (&mut **c, *n)).collect();
            let errors = input::embed_pending(&lib, self.embedder.as_ref(), &mut items);
            for ((n, _, _), e) in pending.iter().zip(errors) {
                if let Some(e) = e {
                    failures.push((*n, e));
                }
            }
        }
        // Items' errors stay here; their documents go into the commit (again, after a
        // conflict on a replica).
        let (mut prepared, mut early_errors) = split_errors(
            deferred
                .into_iter()
                .map(|d| d.map(|(doc, _)| doc))
                .collect(),
        );
        for (n, e) in failures {
            prepared[n] = None;
            early_errors[n] = Some(e);
        }
        let committed = self.retry_conflicts(prepared, |prepared| {
            self.commit(
                ctx,
                |cat, now| {
                    let shard = library_shard(cat, &lib.id, library)?;
                    let st = shard.state.read();
                    let mut in_batch = std::collections::HashMap::new();
                    let mut changes = Vec::new();
                    let mut plan = Vec::with_capacity(prepared.len());
                    for p in prepared {
                        match p {
                            Some(doc) => {
                                let (id, n) = (doc.id.clone(), doc.chunks.len());
                                let change = stamp(&st, doc, now, &mut in_batch);
                                let created = matches!(
                                    change,
                                    Change::DocumentUpserted {
                                        replaced: false,
                                        ..
                                    }
                                );
                                plan.push(Some((id, created, n, changes.len() as u64)));
                                changes.push(change);
                            }
                            None => plan.push(None),
                        }
                    }
                    Ok((changes, plan))
                },
                |_, plan, first| {
                    plan.into_iter()
                        .map(|p| {
                            p.map(
                                |(document_id, created, num_chunks, i)| ItemOutcome::Committed {
                                    document_id,
                                    created,
                                    num_chunks,
                                    seq: first + i,
                                },
                            )
                        })
                        .collect::<Vec<_>>()
                },
            )
        })?;
        let outcomes = committed
            .value
            .into_iter()
            .zip(early_errors)
            .map(|(outcome, early)| match (outcome, early) {
                (Some(o), _) => o,
                (None, early) => ItemOutcome::Failed(early.unwrap_or_else(lost_error)),
            })
            .collect();
        Ok(Committed {
            value: outcomes,
            seq: committed.seq,
        })
    }

    pub fn delete_document(
        &self,
        ctx: &WriteCtx,
        library: &str,
        doc_id: &str,
    ) -> Result<Committed<()>> {
        let lib_id = self.library_for_write(library)?.id;
        self.retry_conflicts((), |()| {
            self.commit(
                ctx,
                |cat, _| {
                    let shard = library_shard(cat, &lib_id, library)?;
                    if shard.state.read().document(doc_id).is_none() {
                        return Err(EngineError::not_found("document", doc_id));
                    }
                    Ok((
                        vec![Change::DocumentDeleted {
                            library_id: lib_id.clone(),
                            document_id: doc_id.to_string(),
                        }],
                        (),
                    ))
                },
                |_, (), _| (),
            )
        })
    }

    pub fn document(&self, library: &str, doc_id: &str) -> Result<(Arc<Document>, Seq)> {
        let shard = self.shard(library)?;
        let st = shard.state.read();
        let doc = st
            .document(doc_id)
            .cloned()
            .ok_or_else(|| EngineError::not_found("document", doc_id))?;
        Ok((doc, self.applied_seq()))
    }

    /// A page of documents in id order after `after`; also the library's document count.
    pub fn documents(
        &self,
        library: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Arc<Document>>, usize, Seq)> {
        let shard = self.shard(library)?;
        let st = shard.state.read();
        Ok((
            st.documents_after(after, limit),
            st.num_documents(),
            self.applied_seq(),
        ))
    }

    pub fn add_chunks(
        &self,
        ctx: &WriteCtx,
        library: &str,
        doc_id: &str,
        chunks: Vec<input::ChunkInput>,
    ) -> Result<Committed<Arc<Document>>> {
        let lib = self.library_for_write(library)?;
        if chunks.is_empty() {
            return Err(EngineError::invalid("no_chunks", "send at least one chunk"));
        }
        let chunks = input::prepare_chunks(&lib, doc_id, chunks, self.embedder.as_ref())?;
        self.retry_conflicts(chunks, |chunks| self.commit(
            ctx,
            |cat, _| {
                let shard = library_shard(cat, &lib.id, library)?;
                let st = shard.state.read();
                let doc = st.document(doc_id).ok_or_else(|| EngineError::not_found("document", doc_id))?;
                if doc.chunks.len() + chunks.len() > CHUNKS_PER_DOCUMENT_LIMIT {
                    return Err(EngineError::Invalid(Invalid::too_large(
                        "too_many_chunks",
                        format!(
                            "the document would have {} chunks; the limit is {CHUNKS_PER_DOCUMENT_LIMIT}",
                            doc.chunks.len() + chunks.len()
                        ),
                    )));
                }
                if let Some(c) = chunks.iter().find(|c| doc.chunks.iter().any(|o| o.id == c.id)) {
                    return Err(EngineError::Conflict {
                        code: "chunk_exists",
                        detail: format!("chunk {:?} already exists in document {doc_id:?}", c.id),
                    });
                }
                Ok((
                    vec![Change::ChunksAdded { library_id: lib.id.clone(), document_id: doc_id.to_string(), chunks }],
                    (),
                ))
            },
            |cat, (), _| {
                let doc = cat.shard(&lib.id).and_then(|s| s.state.read().document(doc_id).cloned());
                doc.expect("the document was just applied")
            },
        ))
    }

    pub fn delete_chunk(
        &self,
        ctx: &WriteCtx,
        library: &str,
        doc_id: &str,
        chunk_id: &str,
    ) -> Result<Committed<()>> {
        let lib_id = self.library_for_write(library)?.id;
        self.retry_conflicts((), |()| {
            self.commit(
                ctx,
                |cat, _| {
                    let shard = library_shard(cat, &lib_id, library)?;
                    let st = shard.state.read();
                    let doc = st
                        .document(doc_id)
                        .ok_or_else(|| EngineError::not_found("document", doc_id))?;
                    if !doc.chunks.iter().any(|c| c.id == chunk_id) {
                        return Err(EngineError::not_found("chunk", chunk_id));
                    }
                    Ok((
                        vec![Change::ChunkDeleted {
                            library_id: lib_id.clone(),
                            document_id: doc_id.to_string(),
                            chunk_id: chunk_id.to_string(),
                        }],
                        (),
                    ))
                },
                |_, (), _| (),
            )
        })
    }

    // ---------------------------------------------------------------- application events

    /// Appends an application-defined event: durable and ordered like any change, with no
    /// effect on state. System types (library.*, document.*, …) are refused so the stream's
    /// meaning cannot be forged.
    pub fn append_event(
        &self,
        ctx: &WriteCtx,
        event_type: &str,
        library: Option<&str>,
        data: serde_json::Value,
    ) -> Result<Committed<()>> {
        validate_event_type(event_type)?;
        check_event_data_size(&data)?;
        let library_id = match library {
            Some(l) => Some(self.library_for_write(l)?.id),
            None => None,
        };
        self.commit_event(ctx, event_type.to_string(), library_id, data, true)
    }

    /// Appends many application events in one commit (one log append, one group of records),
    /// in order: each event gets its own outcome, its seq or why it was refused, and a refused
    /// one costs only itself. Why one commit: a pipelined publisher (NDJSON) hands the server
    /// dozens of events at once, and a commit per event spent most of its time on the write
    /// lock and the log's queue rather than on the events.
    pub fn append_events(&self, ctx: &WriteCtx, events: Vec<AppEventInput>) -> Vec<Result<Seq>> {
        // Checks that need no lock happen before it, so the write lock is held only to check
        // libraries and append.
        let checked: Vec<Result<AppEventInput>> = events
            .into_iter()
            .map(|e| {
                validate_event_type(&e.event_type)?;
                check_event_data_size(&e.data)?;
                Ok(e)
            })
            .collect();
        let total = checked.len();
        // Names resolved to ids once per batch (a batch usually names one library or none).
        let mut library_ids: HashMap<String, String> = HashMap::new();
        let mut planned: Vec<Result<AppEventInput>> = Vec::with_capacity(total);
        for c in checked {
            planned.push(c.and_then(|mut e| {
                if let Some(name) = e.library_id.take() {
                    let id = match library_ids.get(&name) {
                        Some(id) => id.clone(),
                        None => {
                            let id = self.library_for_write(&name)?.id;
                            library_ids.insert(name, id.clone());
                            id
                        }
                    };
                    e.library_id = Some(id);
                }
                Ok(e)
            }));
        }
        // Errors so far stay here; the events go into the commit (again, after a conflict).
        let (inputs, early_errors) = split_errors(planned);
        let committed = self.retry_conflicts(inputs, |inputs| {
            self.commit(
                ctx,
                |cat, _| {
                    let mut changes = Vec::with_capacity(total);
                    // Per event: its index among the changes, or its error (`None`: the one
                    // found before the commit).
                    let mut slots: Vec<std::result::Result<usize, Option<EngineError>>> =
                        Vec::with_capacity(total);
                    for p in inputs {
                        let Some(e) = p else {
                            slots.push(Err(None));
                            continue;
                        };
                        if let Some(id) = &e.library_id {
                            if cat.shard(id).is_none() {
                                slots
                                    .push(Err(Some(EngineError::not_found("library", id.clone()))));
                                continue;
                            }
                        }
                        changes.push(Change::AppEvent {
                            event_type: e.event_type,
                            library_id: e.library_id,
                            data: e.data,
                        });
                        slots.push(Ok(changes.len() - 1));
                    }
                    Ok((changes, slots))
                },
                |_, slots, first| {
                    slots
                        .into_iter()
                        .map(|s| s.map(|i| first + i as u64))
                        .collect::<Vec<_>>()
                },
            )
        });
        match committed {
            Ok(c) => c
                .value
                .into_iter()
                .zip(early_errors)
                .map(|(slot, early)| match slot {
                    Ok(seq) => Ok(seq),
                    Err(Some(e)) => Err(e),
                    Err(None) => Err(early.unwrap_or_else(lost_error)),
                })
                .collect(),
            // The append itself failed (the log is closed or failed): every event shares it.
            Err(e) => {
                let detail = e.to_string();
                let mut first = Some(e);
                (0..total)
                    .map(|_| {
                        Err(first.take().unwrap_or_else(|| {
                            EngineError::Log(quiver_log::LogError::Failed(detail.clone()))
                        }))
                    })
                    .collect()
            }
        }
    }

    /// Appends an event of a system type (e.g. `batch.started`) on behalf of a Quiver feature.
    pub fn append_system_event(
        &self,
        ctx: &WriteCtx,
        event_type: &'static str,
        library_id: Option<String>,
        data: serde_json::Value,
    ) -> Result<Committed<()>> {
        debug_assert!(
            RESERVED_EVENT_PREFIXES
                .iter()
                .any(|p| event_type.starts_with(p)),
            "system types are reserved"
        );
        self.commit_event(ctx, event_type.to_string(), library_id, data, false)
    }

    /// Appends one event record. With `library_must_exist`, the library is checked under the
    /// write lock (application events); system events about a library may outlive it (an
    /// upload whose library was deleted mid-stream still reports how it ended).
    fn commit_event(
        &self,
        ctx: &WriteCtx,
        event_type: String,
        library_id: Option<String>,
        data: serde_json::Value,
        library_must_exist: bool,
    ) -> Result<Committed<()>> {
        self.retry_conflicts(
            (event_type, library_id, data),
            |(event_type, library_id, data)| {
                self.commit(
                    ctx,
                    |cat, _| {
                        if let (true, Some(id)) = (library_must_exist, &library_id) {
                            if cat.shard(id).is_none() {
                                return Err(EngineError::not_found("library", id.clone()));
                            }
                        }
                        Ok((
                            vec![Change::AppEvent {
                                event_type,
                                library_id,
                                data,
                            }],
                            (),
                        ))
                    },
                    |_, (), _| (),
                )
            },
        )
    }

    /// Every document of a library at one `seq`: pointers to immutable values, collected under
    /// the library's read lock, so the caller can stream them while writers go on.
    pub fn export(&self, library: &str) -> Result<(LibraryInfo, Vec<Arc<Document>>, Seq)> {
        let shard = self.shard(library)?;
        let st = shard.state.read();
        Ok((LibraryInfo::of(&st), st.all_documents(), self.applied_seq()))
    }

    // ---------------------------------------------------------------- search

    /// Exact k-nearest-neighbour search with an optional metadata filter applied during the
    /// scan. Returns hits in ascending distance and the `seq` the results are consistent at.
    pub fn search(&self, library: &str, req: &SearchInput) -> Result<(Vec<Hit>, Seq)> {
        self.search_limited(library, req, SEARCH_K_LIMIT)
    }

    /// The query vector for `text` in `library`'s vector space (its embedding model, query
    /// purpose), validated (normalised for cosine): what a `{"query": …}` search uses, for
    /// other readers such as semantic subscriptions.
    pub fn embed_query(&self, library: &str, text: &str) -> Result<Vec<f32>> {
        let lib = self.shard(library)?.state.read().library.clone();
        if text.trim().is_empty() {
            return Err(EngineError::invalid(
                "missing_query",
                "the query text is empty",
            ));
        }
        let v = self.embed_text_query(&lib, text)?;
        Ok(validate::vector(v, lib.dimension, lib.metric)?)
    }

    fn embed_text_query(&self, lib: &Library, text: &str) -> Result<Vec<f32>> {
        let mut v = self
            .embedder
            .embed(
                lib.embedding_model.as_deref(),
                std::slice::from_ref(&text.to_string()),
                Purpose::Query,
            )
            .map_err(input::embed_error)?;
        v.pop().ok_or_else(|| EngineError::Unavailable {
            code: "embedding_failed",
            detail: "the embedding provider returned no vector".into(),
        })
    }

    /// As [`Engine::search`] with a caller-chosen bound on `k` (streaming search allows more).
    pub fn search_limited(
        &self,
        library: &str,
        req: &SearchInput,
        k_limit: usize,
    ) -> Result<(Vec<Hit>, Seq)> {
        let started = Instant::now();
        if req.k == 0 || req.k > k_limit {
            return Err(EngineError::invalid(
                "invalid_k",
                format!("k must be between 1 and {k_limit}, got {}", req.k),
            ));
        }
        if let Some(t) = req.distance_threshold {
            if !t.is_finite() {
                return Err(EngineError::invalid(
                    "invalid_threshold",
                    "distance_threshold must be a finite number",
                ));
            }
        }
        let filter = Filter::parse(&req.filter)?;
        let shard = self.shard(library)?;
        let lib = shard.state.read().library.clone();
        let vector = match input::pick_vector(req.embedding.clone(), req.embedding_b64.clone())? {
            Some(v) => v,
            None => match &req.query {
                Some(q) if !q.trim().is_empty() => self.embed_text_query(&lib, q)?,
                _ => {
                    return Err(EngineError::invalid(
                        "missing_query",
                        "send `embedding` (or `embedding_b64`) or a text `query`",
                    ))
                }
            },
        };
        let vector = validate::vector(vector, lib.dimension, lib.metric)?;
        let st = shard.state.read();
        let seq = self.applied_seq();
        let ef = match req.ef_search {
            None => None,
            Some(e) if (1..=quiver_model::types::HNSW_EF_LIMIT).contains(&e) => Some(e as usize),
            Some(e) => {
                return Err(EngineError::invalid(
                    "invalid_ef_search",
                    format!(
                        "ef_search must be between 1 and {}, got {e}",
                        quiver_model::types::HNSW_EF_LIMIT
                    ),
                ))
            }
        };
        let lib_state: &LibraryState = &st;
        let pred = filter.as_ref().map(|f| {
            move |key: u64| {
                lib_state
                    .locs
                    .get(&key)
                    .is_some_and(|loc| f.matches(&loc.doc, &loc.doc.chunks[loc.idx as usize]))
            }
        });
        let pred_dyn: Option<&dyn Fn(u64) -> bool> = pred.as_ref().map(|p| p as _);
        // The graph answers unless the candidate list it would need passes its limit (a
        // streaming search for thousands of results): then the exact scan does, which is
        // also the right tool for that.
        let graph = st.ann.serving().filter(|g| {
            crate::ann::candidates_needed(&g.config, req.k, ef) <= quiver_index::EF_LIMIT
        });
        let raw: Vec<(u64, f32)> = match graph {
            Some(graph) => graph.index.search(
                &vector,
                req.k,
                ef,
                req.distance_threshold,
                pred_dyn,
                Some(&crate::ann::StateVectors(lib_state)),
            ),
            None => st
                .index
                .search(&vector, req.k, req.distance_threshold, pred_dyn),
        };
        let mut hits: Vec<Hit> = raw
            .into_iter()
            .filter_map(|(key, distance)| {
                st.locs.get(&key).map(|loc| Hit {
                    document: loc.doc.clone(),
                    chunk_index: loc.idx as usize,
                    distance,
                })
            })
            .collect();
        // Equal distances are ordered by (document id, chunk id), not by insertion history, so
        // the same content answers the same way (e.g. after export → import).
        hits.sort_by(|a, b| {
            a.distance
                .total_cmp(&b.distance)
                .then_with(|| a.document.id.cmp(&b.document.id))
                .then_with(|| {
                    a.document.chunks[a.chunk_index]
                        .id
                        .cmp(&b.document.chunks[b.chunk_index].id)
                })
        });
        if self.config.emit_search_events {
            // The library's read lock must be released before appending: the write path
            // takes the write lock first and then library locks.
            drop(st);
            let ctx = WriteCtx {
                trace_id: None,
                source: Some("search".into()),
            };
            let data = serde_json::json!({
                "query": req.query,
                "k": req.k,
                "results_count": hits.len(),
                "duration_ms": started.elapsed().as_secs_f64() * 1000.0,
            });
            // Telemetry: never fail or slow a search for it (no wait for durability).
            if let Err(e) =
                self.append_system_event(&ctx, "search.performed", Some(lib.id.clone()), data)
            {
                tracing::warn!("search.performed was not recorded: {e}");
            }
        }
        Ok((hits, seq))
    }

    // ---------------------------------------------------------------- index management

    /// The library's index: type, parameters, sizes and any running build.
    pub fn index_status(&self, library: &str) -> Result<(crate::state::IndexStatus, Seq)> {
        let shard = self.shard(library)?;
        let st = shard.state.read();
        Ok((st.index_status(), self.applied_seq()))
    }

    /// Switches the library's index (type, parameters, quantization). The change is a
    /// `library.updated` record; the new index is built beside the live one while searches
    /// continue on the old one, and `index.rebuilt` is appended when it serves. Returns at
    /// once; `GET …/index` shows the build's progress.
    pub fn set_index(
        self: &Arc<Self>,
        ctx: &WriteCtx,
        library: &str,
        req: input::IndexChange,
    ) -> Result<Committed<LibraryInfo>> {
        let index_type = parse_index_config(
            req.index_type.as_deref(),
            req.index_params,
            req.quantization.as_ref(),
        )?;
        let lib_id = self.shard(library)?.state.read().library.id.clone();
        let started = Instant::now();
        let committed = self.retry_conflicts((), |()| {
            self.commit(
                ctx,
                |cat, now| {
                    let shard = library_shard(cat, &lib_id, library)?;
                    let mut lib = shard.state.read().library.clone();
                    if lib.index_type == index_type {
                        return Ok((Vec::new(), false));
                    }
                    lib.index_type = index_type;
                    lib.updated_at_ms = now;
                    Ok((vec![Change::LibraryUpdated(lib)], true))
                },
                |cat, changed, _| (info_of(cat, &lib_id), changed),
            )
        })?;
        let (info, changed) = committed.value;
        let info = info?;
        if changed {
            let engine = Arc::downgrade(self);
            let ctx = ctx.clone();
            let spawned = std::thread::Builder::new()
                .name("quiver-index-watch".into())
                .spawn(move || announce_when_built(engine, ctx, lib_id, started));
            if let Err(e) = spawned {
                tracing::warn!("index.rebuilt will not be announced: {e}");
            }
        }
        Ok(Committed {
            value: info,
            seq: committed.seq,
        })
    }

    /// Compacts a library's index: an `hnsw` library's graph is rebuilt with its current
    /// configuration beside the live one (the same build-and-swap as an index change), which
    /// drops its tombstoned rows; searches keep the old graph until the swap. The graph is
    /// derived from the documents, so no record changes: the state stays a fold of the log.
    /// Returns whether a rebuild started — `false` for a flat library (its deleted rows are
    /// reused in place, there is nothing to compact) or an empty one.
    pub fn optimize_index(&self, library: &str) -> Result<bool> {
        let shard = self.shard(library)?;
        let mut st = shard.state.write();
        let Some(config) = st.library.index_type.hnsw() else {
            return Ok(false);
        };
        if st.num_chunks == 0 {
            return Ok(false);
        }
        let st = &mut *st;
        crate::ann::start_rebuild(&shard, &mut st.ann, config);
        Ok(true)
    }

    // ---------------------------------------------------------------- re-embedding

    /// Checks that `library` can be re-embedded with `model` (`None`: its own model) and
    /// returns the target `(model, dimension)`. Refused (422, nothing changes): no model named
    /// and none on the library (`embedding_model_required`), a model this server cannot embed
    /// with (`unknown_model`), or chunks without text, which could not get a new vector
    /// (`chunks_without_text`).
    pub fn reembed_target(&self, library: &str, model: Option<&str>) -> Result<(String, u32)> {
        let shard = self.shard(library)?;
        let st = shard.state.read();
        let model = match model.or(st.library.embedding_model.as_deref()) {
            Some(m) => m.to_string(),
            None => {
                return Err(EngineError::invalid(
                    "embedding_model_required",
                    "this library has no embedding model (its vectors came from the client); name the model to embed its chunks with in `embedding_model`",
                ))
            }
        };
        validate::name(&model).map_err(|e| EngineError::invalid("unknown_model", e.detail))?;
        let dimension = self.embedder.dimension(&model).ok_or_else(|| {
            EngineError::invalid(
                "unknown_model",
                format!("embedding model {model:?} is not known to this server (its dimension is unknown); use e.g. local:all-minilm-l6-v2 or local:potion-base-8m"),
            )
        })?;
        let dimension = validate::dimension(u64::from(dimension))?;
        let without_text: usize = st
            .all_documents()
            .iter()
            .map(|d| d.chunks.iter().filter(|c| c.text.trim().is_empty()).count())
            .sum();
        if without_text > 0 {
            return Err(EngineError::invalid(
                "chunks_without_text",
                format!("{without_text} chunks of this library have no text, so they cannot be embedded again; delete them or give them text first"),
            ));
        }
        Ok((model, dimension))
    }

    /// Starts staging a re-embedding of `library` with `model` (a `library.reembedding_started`
    /// record), or resumes the one already staged for the same model (no record). Returns
    /// whether it resumed. Searches keep using the live vectors until [`Engine::reembed_switch`].
    pub fn reembed_begin(
        &self,
        ctx: &WriteCtx,
        library: &str,
        model: Option<&str>,
    ) -> Result<Committed<bool>> {
        let (model, dimension) = self.reembed_target(library, model)?;
        let lib_id = self.shard(library)?.state.read().library.id.clone();
        self.retry_conflicts((), |()| {
            self.commit(
                ctx,
                |cat, _| {
                    let shard = library_shard(cat, &lib_id, library)?;
                    let st = shard.state.read();
                    if st
                        .staging
                        .as_ref()
                        .is_some_and(|s| s.model == model && s.dimension == dimension)
                    {
                        return Ok((Vec::new(), true));
                    }
                    Ok((
                        vec![Change::ReembedStarted {
                            library_id: lib_id.clone(),
                            model: model.clone(),
                            dimension,
                        }],
                        false,
                    ))
                },
                |_, resumed, _| resumed,
            )
        })
    }

    /// `(documents, ids of documents not staged yet)` of the running re-embedding.
    pub fn reembed_pending(&self, library: &str) -> Result<(usize, Vec<String>)> {
        let shard = self.shard(library)?;
        let st = shard.state.read();
        if st.staging.is_none() {
            return Err(EngineError::Conflict {
                code: "reembedding_not_started",
                detail: format!("no re-embedding is staged for library {library:?}"),
            });
        }
        Ok((st.num_documents(), st.unstaged_documents()))
    }

    /// Embeds the chunks of `documents` with the staged model (outside any lock) and stages
    /// the vectors, one `library.reembedding_staged` record per document. A document that
    /// changed meanwhile (or is gone) is skipped: it stays unstaged and is embedded again.
    /// Returns how many documents were staged.
    pub fn reembed_stage(
        &self,
        ctx: &WriteCtx,
        library: &str,
        documents: &[String],
    ) -> Result<Committed<usize>> {
        let shard = self.shard(library)?;
        let (lib, model, dimension, docs) = {
            let st = shard.state.read();
            let s = st.staging.as_ref().ok_or_else(|| EngineError::Conflict {
                code: "reembedding_not_started",
                detail: format!("no re-embedding is staged for library {library:?}"),
            })?;
            let docs: Vec<Arc<Document>> = documents
                .iter()
                .filter_map(|id| st.document(id).cloned())
                .collect();
            (st.library.clone(), s.model.clone(), s.dimension, docs)
        };
        let mut staged: Vec<(Arc<Document>, Vec<Vec<f32>>)> = Vec::with_capacity(docs.len());
        let mut batch: Vec<Arc<Document>> = Vec::new();
        let mut texts: Vec<String> = Vec::new();
        let flush = |batch: &mut Vec<Arc<Document>>,
                     texts: &mut Vec<String>,
                     staged: &mut Vec<(Arc<Document>, Vec<Vec<f32>>)>|
         -> Result<()> {
            if texts.is_empty() {
                batch.clear();
                return Ok(());
            }
            let vectors = self
                .embedder
                .embed(Some(&model), texts, quiver_embed::Purpose::Document)
                .map_err(input::embed_error)?;
            if vectors.len() != texts.len() {
                return Err(EngineError::Unavailable {
                    code: "embedding_failed",
                    detail: format!(
                        "the embedding provider returned {} vectors for {} texts",
                        vectors.len(),
                        texts.len()
                    ),
                });
            }
            let mut vectors = vectors.into_iter();
            for d in batch.drain(..) {
                let mut vs = Vec::with_capacity(d.chunks.len());
                for c in &d.chunks {
                    let v = vectors.next().unwrap_or_default();
                    let v = validate::vector(v, dimension, lib.metric).map_err(|e| {
                        EngineError::invalid(
                            "embedding_failed",
                            format!(
                                "model {model:?} gave chunk {:?} a bad vector: {}",
                                c.id, e.detail
                            ),
                        )
                    })?;
                    vs.push(v);
                }
                staged.push((d, vs));
            }
            texts.clear();
            Ok(())
        };
        for d in docs {
            if let Some(c) = d.chunks.iter().find(|c| c.text.trim().is_empty()) {
                return Err(EngineError::invalid(
                    "chunks_without_text",
                    format!(
                        "chunk {:?} of document {:?} has no text, so it cannot be embedded again",
                        c.id, d.id
                    ),
                ));
            }
            if texts.len() + d.chunks.len() > quiver_embed::MAX_TEXTS_PER_CALL {
                flush(&mut batch, &mut texts, &mut staged)?;
            }
            texts.extend(d.chunks.iter().map(|c| c.text.clone()));
            batch.push(d);
        }
        flush(&mut batch, &mut texts, &mut staged)?;
        let lib_id = lib.id.clone();
        self.retry_conflicts(staged, |staged| {
            self.commit(
                ctx,
                |cat, _| {
                    let shard = library_shard(cat, &lib_id, library)?;
                    let st = shard.state.read();
                    let same_target = st
                        .staging
                        .as_ref()
                        .is_some_and(|s| s.model == model && s.dimension == dimension);
                    if !same_target {
                        return Err(EngineError::Conflict {
                            code: "reembedding_replaced",
                            detail: "the re-embedding was discarded or replaced while it ran"
                                .into(),
                        });
                    }
                    let mut changes = Vec::with_capacity(staged.len());
                    for (d, vectors) in staged {
                        // Only the document exactly as it was embedded; a newer one is redone.
                        if !st.document(&d.id).is_some_and(|now| Arc::ptr_eq(now, &d)) {
                            continue;
                        }
                        changes.push(Change::ReembedStaged {
                            library_id: lib_id.clone(),
                            document_id: d.id.clone(),
                            chunk_ids: d.chunks.iter().map(|c| c.id.clone()).collect(),
                            vectors,
                        });
                    }
                    let n = changes.len();
                    Ok((changes, n))
                },
                |_, n, _| n,
            )
        })
    }

    /// Swaps the staged vectors in, once every document is staged: one `library.reembedded`
    /// record carrying the library's new model and dimension; HNSW graphs are rebuilt in the
    /// background (searches run exact meanwhile). Returns `None` (nothing written) while some
    /// document is still unstaged (written meanwhile): stage it and call again.
    pub fn reembed_switch(
        &self,
        ctx: &WriteCtx,
        library: &str,
    ) -> Result<Committed<Option<LibraryInfo>>> {
        let lib_id = self.shard(library)?.state.read().library.id.clone();
        self.retry_conflicts((), |()| {
            self.commit(
                ctx,
                |cat, now| {
                    let shard = library_shard(cat, &lib_id, library)?;
                    let st = shard.state.read();
                    let Some(s) = st.staging.as_ref() else {
                        return Err(EngineError::Conflict {
                            code: "reembedding_not_started",
                            detail: format!("no re-embedding is staged for library {library:?}"),
                        });
                    };
                    if !st.unstaged_documents().is_empty() {
                        return Ok((Vec::new(), false));
                    }
                    let mut lib = st.library.clone();
                    lib.embedding_model = Some(s.model.clone());
                    lib.dimension = s.dimension;
                    lib.updated_at_ms = now;
                    Ok((vec![Change::Reembedded(lib)], true))
                },
                |cat, switched, _| switched.then(|| info_of(cat, &lib_id)).transpose(),
            )
        })
        .and_then(|c| {
            Ok(Committed {
                value: c.value?,
                seq: c.seq,
            })
        })
    }

    /// Drops a staged re-embedding (`library.reembedding_discarded`); the live vectors never
    /// changed. Returns whether there was one.
    pub fn reembed_discard(&self, ctx: &WriteCtx, library: &str) -> Result<Committed<bool>> {
        let lib_id = self.shard(library)?.state.read().library.id.clone();
        self.retry_conflicts((), |()| {
            self.commit(
                ctx,
                |cat, _| {
                    let staged = cat
                        .shard(&lib_id)
                        .is_some_and(|s| s.state.read().staging.is_some());
                    if !staged {
                        return Ok((Vec::new(), false));
                    }
                    Ok((
                        vec![Change::ReembedDiscarded {
                            library_id: lib_id.clone(),
                        }],
                        true,
                    ))
                },
                |_, d, _| d,
            )
        })
    }

    /// Ids of libraries with a staged re-embedding.
    pub fn reembeddings_staged(&self) -> Vec<String> {
        self.catalog
            .read()
            .shards()
            .filter_map(|s| {
                let st = s.state.read();
                st.staging.is_some().then(|| st.library.id.clone())
            })
            .collect()
    }

    // ---------------------------------------------------------------- snapshots

    /// Writes a snapshot of the current state (if anything changed since the last one), then
    /// deletes older snapshots and the log segments no snapshot or retention needs.
    pub fn snapshot(&self) -> Result<Option<Seq>> {
        let _one_at_a_time = self.snapshot_lock.lock();
        let mut graphs: Vec<(String, quiver_index::HnswIndex)> = Vec::new();
        let (seq, libraries, apply_ns) = {
            // Hold the write lock only while collecting pointers: no writer is between
            // append and apply, so the state is exactly the fold of the log up to `seq`.
            let _w = self.write_lock.lock();
            let seq = self.applied_seq();
            let apply_ns = self.apply_ns_since_snapshot.load(Ordering::Relaxed);
            if seq == self.last_snapshot_seq.load(Ordering::Acquire) {
                return Ok(None);
            }
            let cat = self.catalog.read();
            // A staged re-embedding lives only in memory and the log: while one runs, no
            // snapshot is written, so the log keeps (and replay rebuilds) the staged vectors.
            if let Some(s) = cat.shards().find(|s| s.state.read().staging.is_some()) {
                tracing::debug!(library = %s.state.read().library.id, "snapshot deferred: a re-embedding is staged");
                return Ok(None);
            }
            let mut libs: Vec<(Library, Vec<Arc<Document>>)> = Vec::with_capacity(cat.len());
            for s in cat.shards() {
                let st = s.state.read();
                libs.push((st.library.clone(), st.all_documents()));
                // A graph is copied (memory speed) with its ids renumbered to the keys the
                // snapshot's chunks get when loaded; it is written after the locks go.
                if let Some(g) = st.graph_for_snapshot() {
                    graphs.push((st.library.id.clone(), g));
                }
            }
            libs.sort_by_key(|(l, _)| l.created_at_ms);
            (seq, libs, apply_ns)
        };
        // Never snapshot a change the log could still lose, whatever the fsync policy.
        self.log.sync_through(seq)?;
        let dir = self.config.data_dir.join("snapshots");
        let t = Instant::now();
        for (library_id, graph) in &graphs {
            snapshot::write_graph(&dir, seq, library_id, graph)?;
        }
        drop(graphs);
        let path = snapshot::write(&dir, seq, &libraries)?;
        self.last_snapshot_seq.store(seq, Ordering::Release);
        let size_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        self.last_snapshot_size_bytes
            .store(size_bytes, Ordering::Release);
        self.log_bytes_at_snapshot
            .store(self.log.stats().written_bytes, Ordering::Release);
        // What was applied up to `seq` no longer needs replaying; what came since still does.
        self.apply_ns_since_snapshot
            .fetch_sub(apply_ns, Ordering::Relaxed);
        tracing::info!(seq, path = %path.display(), elapsed_ms = t.elapsed().as_millis() as u64, "snapshot written");
        // Keep this snapshot and the one before it (a fallback should this one be damaged).
        let all = snapshot::list(&dir)?;
        for (_, old) in all.iter().skip(2) {
            if let Err(e) = std::fs::remove_file(old) {
                tracing::warn!("could not delete old snapshot {}: {e}", old.display());
            }
        }
        let kept: Vec<Seq> = all.iter().take(2).map(|(s, _)| *s).collect();
        snapshot::prune_graphs(&dir, &kept);
        let oldest_kept = all.iter().take(2).map(|(s, _)| *s).min().unwrap_or(seq);
        let hold = self.retention_hold();
        let deleted = self.log.truncate_before_held(
            oldest_kept + 1,
            &self.config.retention,
            hold.as_ref()
                .map(|(seq, _)| (*seq, &self.config.reader_retention)),
        )?;
        if let Some((seq, who)) = &hold {
            if self.log.first_seq() > *seq {
                tracing::warn!(
                    first_seq = self.log.first_seq(),
                    needed = seq,
                    reader = %who,
                    "a durable reader fell behind the reader retention limit; it lost the events before first_seq"
                );
            }
        }
        if deleted > 0 {
            tracing::info!(
                deleted,
                first_seq = self.log.first_seq(),
                "log segments deleted"
            );
        }
        Ok(Some(seq))
    }

    /// Stops the snapshotter, writes a final snapshot and closes the log.
    pub fn close(&self) -> Result<()> {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.snapshot_thread.lock().take() {
            h.thread().unpark();
            let _ = h.join();
        }
        if let Some(h) = self.follow_thread.lock().take() {
            h.thread().unpark();
            let _ = h.join();
        }
        self.snapshot()?;
        self.log.close()?;
        Ok(())
    }
}

/// Waits for a library's index build to finish, then appends `index.rebuilt` (with how long
/// it took), so subscribers learn when the new index serves without polling.
fn announce_when_built(
    engine: std::sync::Weak<Engine>,
    ctx: WriteCtx,
    library_id: String,
    started: Instant,
) {
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let Some(e) = engine.upgrade() else { return };
        if e.stop.load(Ordering::Acquire) {
            return;
        }
        let Ok(shard) = e.shard(&library_id) else {
            return; // deleted meanwhile
        };
        let status = shard.state.read().index_status();
        if status.building {
            continue;
        }
        let data = serde_json::json!({
            "library_id": library_id,
            "index_type": status.index_type.as_str(),
            "num_vectors": status.vectors,
            "duration_ms": started.elapsed().as_secs_f64() * 1000.0,
        });
        if let Err(err) = e.append_system_event(&ctx, "index.rebuilt", Some(library_id), data) {
            tracing::warn!("index.rebuilt was not recorded: {err}");
        }
        return;
    }
}

/// A duration in ns, saturating (u64 ns last 584 years).
fn nanos_u64(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Splits a batch's items into the inputs that go into its commit and the errors found
/// before it, position by position (so a retried commit takes only the inputs).
fn split_errors<T>(items: Vec<Result<T>>) -> (Vec<Option<T>>, Vec<Option<EngineError>>) {
    items
        .into_iter()
        .map(|item| match item {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        })
        .unzip()
}

/// The error of an item that produced no record and whose error was lost (a bug).
fn lost_error() -> EngineError {
    EngineError::Log(LogError::Failed(
        "an item without a record lost its error".into(),
    ))
}

/// Times a replica retries a write another replica beat to the shared log (each retry validates
/// again against the winner's change) before it answers `409 write_conflict`.
const CONFLICT_RETRIES_LIMIT: usize = 8;
/// Longest a retry waits for the follower to fold the message that won, in ms.
const CONFLICT_FOLD_WAIT_MS_MAX: u64 = 1_000;

/// A write's owned input, kept for a retry after a conflict: the first attempt takes the
/// original; a copy exists only on a replica, the only place conflicts happen, so the
/// embedded log never pays for it.
struct Retained<T: Clone> {
    first: Option<T>,
    spare: Option<T>,
}

impl<T: Clone> Retained<T> {
    fn new(value: T, replica: bool) -> Self {
        let spare = replica.then(|| value.clone());
        Retained {
            first: Some(value),
            spare,
        }
    }

    /// The input for the next attempt (`None` only for a retry without a spare, which
    /// `retry_conflicts` never asks for outside a replica).
    fn take(&mut self) -> Option<T> {
        self.first.take().or_else(|| self.spare.clone())
    }
}

/// The shard of library `id` in a commit's view of the catalog, or `library_not_found` naming
/// it as the caller did (`named`: an id or a name).
fn library_shard<'a>(cat: &'a Catalog, id: &str, named: &str) -> Result<&'a Arc<Shard>> {
    cat.shard(id)
        .ok_or_else(|| EngineError::not_found("library", named))
}

/// Starts one of the engine's background threads.
fn spawn_thread(
    name: &str,
    body: impl FnOnce() + Send + 'static,
) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(body)
        .map_err(|e| EngineError::Io {
            path: format!("thread {name}"),
            source: e,
        })
}

/// A replica that cannot fold the shared log must not go on serving a state that diverges
/// from it: it exits (as on an fsync failure), and a restart locates it again.
fn follow_failed(e: EngineError) -> ! {
    tracing::error!("this replica cannot follow the shared log: {e}; exiting");
    std::process::exit(70);
}

/// The follower thread: folds what the stream delivered whenever the follower wakes it (and
/// at least five times a second, so a lost wake-up costs 200 ms, not a stall).
fn follow_loop(engine: std::sync::Weak<Engine>) {
    loop {
        std::thread::park_timeout(Duration::from_millis(200));
        let Some(e) = engine.upgrade() else { return };
        if e.stop.load(Ordering::Acquire) {
            return;
        }
        let mut w = e.write_lock.lock();
        if let Err(err) = e.drain_locked(&mut w) {
            follow_failed(err);
        }
    }
}

fn snapshot_loop(engine: std::sync::Weak<Engine>) {
    loop {
        std::thread::park_timeout(Duration::from_millis(500));
        let Some(e) = engine.upgrade() else { return };
        if e.stop.load(Ordering::Acquire) {
            return;
        }
        let behind = e
            .applied_seq()
            .saturating_sub(e.last_snapshot_seq.load(Ordering::Acquire));
        let log_grown_bytes = e
            .log
            .stats()
            .written_bytes
            .saturating_sub(e.log_bytes_at_snapshot.load(Ordering::Acquire));
        let last_snapshot_bytes = e.last_snapshot_size_bytes.load(Ordering::Acquire);
        let replay_ms = e.apply_ns_since_snapshot.load(Ordering::Relaxed) / 1_000_000;
        let grown = behind >= e.config.snapshot_every_records
            && log_grown_bytes >= last_snapshot_bytes.max(e.config.snapshot_min_log_bytes);
        let slow_to_replay = behind > 0 && replay_ms >= e.config.snapshot_replay_ms_limit;
        if grown || slow_to_replay {
            if let Err(err) = e.snapshot() {
                tracing::error!("snapshot failed: {err}");
            }
        }
    }
}

/// The model a library gets when it is created with neither `dimension` nor
/// `embedding_model` (the same default Chroma ships), if the server's embedder knows it.
pub const DEFAULT_EMBEDDING_MODEL: &str = "local:all-minilm-l6-v2";

/// Largest application event payload, in bytes of JSON.
pub const EVENT_DATA_BYTES_LIMIT: usize = 64 * 1024;

/// One application event for [`Engine::append_events`].
#[derive(Debug, Clone)]
pub struct AppEventInput {
    pub event_type: String,
    /// A library name or id (resolved to the id); `None` for an event about no library.
    pub library_id: Option<String>,
    pub data: serde_json::Value,
}

/// Refuses event data larger than [`EVENT_DATA_BYTES_LIMIT`] as compact JSON (counted without
/// building the JSON text).
fn check_event_data_size(data: &serde_json::Value) -> Result<()> {
    let mut counter = ByteCounter(0);
    let size_bytes = match serde_json::to_writer(&mut counter, data) {
        Ok(()) => counter.0,
        Err(_) => usize::MAX,
    };
    if size_bytes > EVENT_DATA_BYTES_LIMIT {
        return Err(EngineError::Invalid(Invalid::too_large(
            "event_too_large",
            format!(
                "event data is {size_bytes} bytes as JSON; the limit is {EVENT_DATA_BYTES_LIMIT}"
            ),
        )));
    }
    Ok(())
}

/// An `io::Write` that only counts.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 = self.0.saturating_add(buf.len());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
/// Event type prefixes that only the system writes.
pub const RESERVED_EVENT_PREFIXES: &[&str] = &[
    "library.",
    "document.",
    "chunk.",
    "index.",
    "batch.",
    "job.",
    "search.",
    "webhook.",
    "consumer.",
];

fn validate_event_type(t: &str) -> Result<()> {
    if t.is_empty()
        || t.len() > 128
        || !t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:/".contains(&b))
    {
        return Err(EngineError::invalid(
            "invalid_event_type",
            "event type must be 1 to 128 characters of letters, digits and . _ - : /",
        ));
    }
    if let Some(p) = RESERVED_EVENT_PREFIXES.iter().find(|p| t.starts_with(*p)) {
        return Err(EngineError::invalid(
            "reserved_event_type",
            format!("event types starting with {p:?} are written by Quiver itself; choose another prefix (e.g. \"app.\")"),
        ));
    }
    Ok(())
}

fn parse_index_type(s: Option<&str>) -> Result<IndexType> {
    match s {
        None => Ok(IndexType::Flat),
        Some(t) => IndexType::parse(t).ok_or_else(|| {
            EngineError::invalid(
                "invalid_index_type",
                format!("unknown index_type {t:?}; this server offers \"flat\" and \"hnsw\""),
            )
        }),
    }
}

/// The index a request asks for: a type with its parameters and quantization, each checked
/// against its limits. Parameters for `flat` are refused rather than ignored.
pub(crate) fn parse_index_config(
    kind: Option<&str>,
    params: Option<input::IndexParamsInput>,
    quantization: Option<&input::QuantizationInput>,
) -> Result<IndexType> {
    let bad = |detail: String| EngineError::invalid("invalid_index_params", detail);
    match parse_index_type(kind)? {
        IndexType::Flat => {
            if params.is_some() || quantization.is_some() {
                return Err(bad(
                    "`index_params` and `quantization` apply to index_type \"hnsw\" only".into(),
                ));
            }
            Ok(IndexType::Flat)
        }
        IndexType::Hnsw(mut c) => {
            if let Some(p) = params {
                c.m = p.m.unwrap_or(c.m);
                c.m0 = p.m0.or(c.m0);
                c.ef_construction = p.ef_construction.unwrap_or(c.ef_construction);
                c.ef_search = p.ef_search.unwrap_or(c.ef_search);
            }
            if let Some(q) = quantization {
                c.quantization = match q.kind.to_ascii_lowercase().as_str() {
                    "none" => quiver_model::Quantization::None,
                    "int8" | "scalar" | "sq8" => quiver_model::Quantization::Int8 {
                        rescore: q.rescore.unwrap_or(true),
                        oversampling: q.oversampling.unwrap_or(2.0),
                    },
                    other => {
                        return Err(bad(format!(
                            "unknown quantization type {other:?}; use \"int8\" or \"none\""
                        )))
                    }
                };
            }
            c.validate().map_err(bad)?;
            Ok(IndexType::Hnsw(c))
        }
    }
}

fn info_of(cat: &Catalog, id: &str) -> Result<LibraryInfo> {
    cat.shard(id)
        .map(|s| LibraryInfo::of(&s.state.read()))
        .ok_or_else(|| EngineError::not_found("library", id))
}

/// Sets a prepared document's timestamps against what exists (in the state or earlier in the
/// same batch) and makes its change record.
fn stamp(
    st: &LibraryState,
    mut doc: Document,
    now: u64,
    in_batch: &mut std::collections::HashMap<String, u64>,
) -> Change {
    let existing = in_batch
        .get(&doc.id)
        .copied()
        .or_else(|| st.document(&doc.id).map(|d| d.created_at_ms));
    doc.created_at_ms = existing.unwrap_or(now);
    doc.updated_at_ms = now;
    in_batch.insert(doc.id.clone(), doc.created_at_ms);
    Change::DocumentUpserted {
        document: doc,
        replaced: existing.is_some(),
    }
}
