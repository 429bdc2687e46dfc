//! Read models folded from the log: the [`Projection`] trait and its [`ProjectionRunner`].
//!
//! A projection applies records in seq order to its own state. The runner owns the
//! checkpoint: it stores the projection's state *and* the seq it reflects in one file,
//! `<data_dir>/projections/<NAME>.json`, replaced atomically (temp file, fsync, rename, fsync
//! dir), so after a crash the pair on disk always agrees and the runner resumes from exactly
//! the next seq — nothing skipped, nothing applied twice. It catches up from the checkpoint
//! through the log files, then follows the log's durable seq. A projection can be rebuilt by
//! replaying from seq 1 and compared with the live one.
//!
//! It must never apply a record out of order or twice, never write the state without its
//! checkpoint (or the other way round), and never pretend to be current when retention has
//! deleted records it had not applied: it stops and reports the error. Why: this is the
//! seeds' "ReadModelReconciliator" done right — a read model that equals a replay of the log.

use crate::error::ConsumerError;
use quiver_log::{write_atomic, FileLog, LogError, Seq};
use quiver_model::Record;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// The version tag of a checkpoint file.
pub const FILE_FORMAT: &str = "quiver-projection/1";
/// Records one log read hands to a projection.
pub const PAGE_RECORDS_LIMIT: usize = 256;
/// About the most payload bytes of one log read.
pub const PAGE_BYTES_LIMIT: usize = 1 << 20;
/// Shortest interval between two checkpoint writes while records keep arriving.
pub const PERSIST_INTERVAL_MS: u64 = 500;
/// Largest checkpoint file read at start-up.
pub const CHECKPOINT_FILE_BYTES_LIMIT: u64 = 1 << 30;

/// A read model: a deterministic fold of log records. `apply` must depend only on its
/// arguments and the projection's state (no clock, no engine), so a replay equals the live
/// state.
pub trait Projection:
    Default + Clone + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// Stable name; names the checkpoint file.
    const NAME: &'static str;
    /// Applies the record at `seq`. Called once per seq, in order.
    fn apply(&mut self, seq: Seq, record: &Record);
}

#[derive(Serialize, Deserialize)]
struct Checkpoint<P> {
    format: String,
    name: String,
    checkpoint: Seq,
    state: P,
}

struct Live<P> {
    projection: P,
    checkpoint: Seq,
    persisted: Seq,
    error: Option<String>,
    decode_errors: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a rebuild found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RebuildReport {
    /// The rebuilt state reflects seqs 1..=through.
    pub through: Seq,
    /// Whether the rebuilt state equalled the live one (it replaces it either way).
    pub equal_to_live: bool,
}

/// Applies records `from..=through` to `projection`; returns the last seq applied (or
/// `from - 1`). Records that do not decode are skipped and counted in `decode_errors`.
pub fn replay<P: Projection>(
    log: &FileLog,
    projection: &mut P,
    from: Seq,
    through: Seq,
    decode_errors: &mut u64,
) -> Result<Seq, ConsumerError> {
    let mut next = from.max(1);
    while next <= through {
        let records = log
            .read_from(next, PAGE_RECORDS_LIMIT, PAGE_BYTES_LIMIT)
            .map_err(|e| match e {
                LogError::Compacted {
                    requested,
                    first_available,
                } => ConsumerError::Expired(format!(
                    "the projection needs seq {requested} but the log now starts at seq {first_available}"
                )),
                other => ConsumerError::Log(other),
            })?;
        if records.is_empty() {
            break;
        }
        for (seq, payload) in records {
            if seq > through {
                return Ok(next - 1);
            }
            match Record::decode(&payload) {
                Ok(record) => projection.apply(seq, &record),
                Err(error) => {
                    tracing::error!(seq, %error, "a log record does not decode; the projection skips it");
                    *decode_errors += 1;
                }
            }
            next = seq + 1;
        }
    }
    Ok(next - 1)
}

/// Runs one projection: load the checkpoint, catch up, follow, persist.
pub struct ProjectionRunner<P: Projection> {
    /// Weak, so a runner never keeps the log (and its directory lock) open after the engine
    /// that owns it is gone: a restart in the same process can reopen the directory at once.
    log: Weak<FileLog>,
    path: PathBuf,
    live: Mutex<Live<P>>,
    /// Serialises checkpoint writes.
    persist_lock: Mutex<()>,
    applied_tx: tokio::sync::watch::Sender<Seq>,
    stop_tx: tokio::sync::watch::Sender<bool>,
}

impl<P: Projection> ProjectionRunner<P> {
    /// Loads `<dir>/<NAME>.json` if it exists (an unreadable one is reported and the
    /// projection starts over from seq 1, which is always correct for a fold of the log).
    pub fn open(log: Arc<FileLog>, dir: &Path) -> Arc<Self> {
        let path = dir.join(format!("{}.json", P::NAME));
        let (projection, checkpoint) = match load::<P>(&path) {
            // A checkpoint past the end of the log means the log lost records the projection
            // had applied (a machine crash under `--fsync never`): start over.
            Ok(Some(c)) if c.checkpoint > log.durable_seq() => {
                tracing::error!(
                    checkpoint = c.checkpoint,
                    durable = log.durable_seq(),
                    "projection {} is ahead of the log; rebuilding from seq 1",
                    P::NAME
                );
                (P::default(), 0)
            }
            Ok(Some(c)) => (c.state, c.checkpoint),
            Ok(None) => (P::default(), 0),
            Err(e) => {
                tracing::error!(path = %path.display(), "projection checkpoint unreadable, rebuilding from seq 1: {e}");
                (P::default(), 0)
            }
        };
        Arc::new(ProjectionRunner {
            log: Arc::downgrade(&log),
            path,
            live: Mutex::new(Live {
                projection,
                checkpoint,
                persisted: checkpoint,
                error: None,
                decode_errors: 0,
            }),
            persist_lock: Mutex::new(()),
            applied_tx: tokio::sync::watch::channel(checkpoint).0,
            stop_tx: tokio::sync::watch::channel(false).0,
        })
    }

    /// Starts following the log on the current tokio runtime until [`Self::stop`] (or the log
    /// closes); the state is persisted once more at the end.
    pub fn start(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move { me.follow().await })
    }

    pub fn stop(&self) {
        self.stop_tx.send_replace(true);
    }

    fn log(&self) -> Result<Arc<FileLog>, ConsumerError> {
        self.log
            .upgrade()
            .ok_or(ConsumerError::Log(LogError::Closed))
    }

    async fn follow(self: Arc<Self>) {
        let mut durable_rx = match self.log.upgrade() {
            Some(log) => log.watch_durable(),
            None => return,
        };
        let mut stop_rx = self.stop_tx.subscribe();
        let mut last_persist = Instant::now();
        loop {
            if self.log.strong_count() == 0 {
                break;
            }
            durable_rx.borrow_and_update();
            let me = Arc::clone(&self);
            let result = tokio::task::spawn_blocking(move || me.catch_up_blocking()).await;
            let failed = match result {
                Ok(Ok(_)) => false,
                Ok(Err(e)) => {
                    lock(&self.live).error = Some(e.to_string());
                    tracing::error!("projection {} stopped: {e}", P::NAME);
                    true
                }
                Err(e) => {
                    lock(&self.live).error = Some(format!("the reader task failed: {e}"));
                    true
                }
            };
            let dirty = {
                let l = lock(&self.live);
                l.checkpoint > l.persisted
            };
            let interval = Duration::from_millis(PERSIST_INTERVAL_MS);
            if dirty && last_persist.elapsed() >= interval {
                self.persist_async().await;
                last_persist = Instant::now();
            }
            let persist_at = tokio::time::Instant::from_std(last_persist + interval);
            let retry_at = tokio::time::Instant::now() + Duration::from_secs(1);
            tokio::select! {
                changed = durable_rx.changed(), if !failed => {
                    if changed.is_err() { break; }
                }
                () = tokio::time::sleep_until(retry_at), if failed => {}
                () = tokio::time::sleep_until(persist_at), if dirty => {}
                _ = stop_rx.wait_for(|s| *s) => break,
            }
        }
        self.persist_async().await;
    }

    async fn persist_async(self: &Arc<Self>) {
        let me = Arc::clone(self);
        match tokio::task::spawn_blocking(move || me.persist()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("projection {} checkpoint not written: {e}", P::NAME),
            Err(e) => tracing::error!("projection {} checkpoint task failed: {e}", P::NAME),
        }
    }

    /// Applies every durable record after the checkpoint (blocking I/O). Returns the new
    /// checkpoint.
    pub fn catch_up_blocking(&self) -> Result<Seq, ConsumerError> {
        let log = self.log()?;
        loop {
            let from = lock(&self.live).checkpoint + 1;
            let durable = log.durable_seq();
            if from > durable {
                let cp = from - 1;
                lock(&self.live).error = None;
                return Ok(cp);
            }
            // Read outside the lock; apply under it, only if nobody moved the checkpoint.
            let records = log
                .read_from(from, PAGE_RECORDS_LIMIT, PAGE_BYTES_LIMIT)
                .map_err(|e| match e {
                    LogError::Compacted {
                        requested,
                        first_available,
                    } => ConsumerError::Expired(format!(
                        "projection {} is at seq {} but the log now starts at seq {first_available}; rebuild it",
                        P::NAME,
                        requested - 1
                    )),
                    other => ConsumerError::Log(other),
                })?;
            if records.is_empty() {
                return Ok(from - 1);
            }
            let mut live = lock(&self.live);
            for (seq, payload) in records {
                if seq != live.checkpoint + 1 {
                    continue;
                }
                match Record::decode(&payload) {
                    Ok(record) => live.projection.apply(seq, &record),
                    Err(error) => {
                        tracing::error!(seq, %error, "a log record does not decode; the projection skips it");
                        live.decode_errors += 1;
                    }
                }
                live.checkpoint = seq;
            }
            let cp = live.checkpoint;
            drop(live);
            self.applied_tx.send_replace(cp);
        }
    }

    /// Writes state and checkpoint together, atomically (blocking I/O).
    pub fn persist(&self) -> Result<(), ConsumerError> {
        let _one = lock(&self.persist_lock);
        let (state, checkpoint) = {
            let l = lock(&self.live);
            if l.checkpoint == l.persisted && self.path.exists() {
                return Ok(());
            }
            (l.projection.clone(), l.checkpoint)
        };
        let bytes = serde_json::to_vec(&Checkpoint {
            format: FILE_FORMAT.to_string(),
            name: P::NAME.to_string(),
            checkpoint,
            state,
        })
        .map_err(|e| ConsumerError::io(&self.path, std::io::Error::other(e)))?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| ConsumerError::io(dir, e))?;
        }
        write_atomic(&self.path, |w| w.write_all(&bytes))?;
        let mut l = lock(&self.live);
        l.persisted = l.persisted.max(checkpoint);
        Ok(())
    }

    /// Reads the live state and the seq it reflects.
    pub fn read<R>(&self, f: impl FnOnce(&P, Seq) -> R) -> R {
        let l = lock(&self.live);
        f(&l.projection, l.checkpoint)
    }

    pub fn checkpoint(&self) -> Seq {
        lock(&self.live).checkpoint
    }

    /// The last error (e.g. retention overtook the projection), if it is not current.
    pub fn error(&self) -> Option<String> {
        lock(&self.live).error.clone()
    }

    pub fn decode_errors(&self) -> u64 {
        lock(&self.live).decode_errors
    }

    /// Waits until the projection reflects `seq` (or `timeout` passes); returns its seq.
    pub async fn wait_for(&self, seq: Seq, timeout: Duration) -> Seq {
        let mut rx = self.applied_tx.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|s| *s >= seq)).await;
        self.checkpoint()
    }

    /// Replays the log from seq 1 into a fresh projection up to the live checkpoint, compares
    /// it with the live state and replaces the live state with it (blocking I/O). The long
    /// part runs without the lock; only the last few records are replayed under it.
    pub fn rebuild_blocking(&self) -> Result<RebuildReport, ConsumerError> {
        let log = self.log()?;
        let target = self.checkpoint();
        let mut fresh = P::default();
        let mut decode_errors = 0;
        let mut through = replay(&log, &mut fresh, 1, target, &mut decode_errors)?;
        let mut live = lock(&self.live);
        if live.checkpoint > through {
            through = replay(
                &log,
                &mut fresh,
                through + 1,
                live.checkpoint,
                &mut decode_errors,
            )?;
        }
        if through != live.checkpoint {
            return Err(ConsumerError::Expired(format!(
                "the rebuild reached seq {through} but the live projection is at seq {}",
                live.checkpoint
            )));
        }
        let equal_to_live = fresh == live.projection;
        if !equal_to_live {
            tracing::warn!(
                "projection {} differed from its rebuild at seq {through}; replaced",
                P::NAME
            );
            live.projection = fresh;
            // Force the next persist to write the repaired state.
            live.persisted = 0;
        }
        live.error = None;
        drop(live);
        self.persist()?;
        Ok(RebuildReport {
            through,
            equal_to_live,
        })
    }
}

fn load<P: Projection>(path: &Path) -> Result<Option<Checkpoint<P>>, ConsumerError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ConsumerError::io(path, e)),
    };
    if meta.len() > CHECKPOINT_FILE_BYTES_LIMIT {
        return Err(ConsumerError::Unreadable {
            name: P::NAME.to_string(),
            detail: format!("the checkpoint file is {} bytes", meta.len()),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| ConsumerError::io(path, e))?;
    let c: Checkpoint<P> =
        serde_json::from_slice(&bytes).map_err(|e| ConsumerError::Unreadable {
            name: P::NAME.to_string(),
            detail: e.to_string(),
        })?;
    if c.format != FILE_FORMAT || c.name != P::NAME {
        return Err(ConsumerError::Unreadable {
            name: P::NAME.to_string(),
            detail: format!("format {:?} / name {:?} not expected", c.format, c.name),
        });
    }
    Ok(Some(c))
}
