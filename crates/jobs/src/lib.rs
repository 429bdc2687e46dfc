//! # quiver-jobs — background jobs as records in the log
//!
//! This crate owns background jobs: import, export, index rebuild and optimize, batch delete,
//! re-embedding. A job is not a row in some side table: every state change of a job is a
//! `job.*` system event appended to the engine's log (`job.queued`, `job.started`,
//! `job.progress` — at most [`PROGRESS_EVERY`] apart per job —, `job.retrying`,
//! `job.cancel_requested`, `job.completed`, `job.failed`, `job.cancelled`), so subscribers see
//! jobs on the event stream like any change, and the job table ([`table::Table`]) is a fold of
//! those events. At start-up the table is rebuilt by replaying the log; jobs that were queued
//! or running are queued again and resume from their last checkpoint (imports skip the lines
//! a `job.progress` event recorded as committed; every step is idempotent, so redoing the
//! steps after the checkpoint is harmless). A small table file
//! (`<data_dir>/jobs/table.json`, written with `write_atomic` after the events it covers are
//! durable) keeps the table when log retention has dropped the events it was folded from.
//!
//! It must never change a job except by appending its event first (the table is folded
//! under the same lock the event is appended under, so the table's order is the log's), never
//! change library data except through the engine's public write paths, and never hold more
//! than its limits: the queue ([`JobsConfig::queue_limit`]), finished jobs kept
//! ([`JobsConfig::retention`], [`FINISHED_JOBS_LIMIT`]), retries ([`MAX_RETRIES_LIMIT`]).
//!
//! Layout: [`table`] — types and the fold; [`work`] — what each job type does; this file —
//! the worker pool, submission, cancellation, retries and retention.

pub mod table;
pub mod work;

use parking_lot::{Condvar, Mutex};
use quiver_engine::{Engine, EngineError, WriteCtx};
use quiver_model::record::Change;
use quiver_model::Record;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
pub use table::{Job, JobFailure, JobStatus, JobType, Progress, Table};

/// Most workers a server may run.
pub const WORKERS_LIMIT: usize = 64;
/// Largest `max_retries` a job may ask for.
pub const MAX_RETRIES_LIMIT: u32 = 10;
pub const MAX_RETRIES_DEFAULT: u32 = 3;
/// Finished jobs kept in the table at most (the oldest go first past it).
pub const FINISHED_JOBS_LIMIT: usize = 100_000;
/// Largest job parameters, in bytes of JSON.
pub const PARAMS_BYTES_LIMIT: usize = 1024 * 1024;
/// Shortest interval between two `job.progress` events of one job.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// First retry delay; each retry doubles it (up to [`BACKOFF_MAX`]), times a jitter in
/// [0.5, 1.5).
pub const BACKOFF_BASE: Duration = Duration::from_millis(200);
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
const TABLE_FILE: &str = "table.json";

#[derive(Clone, Debug)]
pub struct JobsConfig {
    pub workers: usize,
    /// Most jobs queued (not yet finished) at once; past it submissions are refused.
    pub queue_limit: usize,
    /// How long finished jobs stay in the table.
    pub retention: Duration,
    /// Largest uploaded import body, in bytes.
    pub upload_bytes_limit: u64,
    /// The only directories a `batch_import` job may read a `path` from (a path is
    /// canonicalised first, so `..` and symlinks cannot leave them). Empty: the data
    /// directory's `import/` folder (created at start).
    pub import_dirs: Vec<PathBuf>,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            workers: 2,
            queue_limit: 10_000,
            retention: Duration::from_secs(24 * 3600),
            upload_bytes_limit: 1024 * 1024 * 1024,
            import_dirs: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Bad parameters or input: the job (or request) cannot succeed as given.
    #[error("{detail}")]
    Invalid { code: &'static str, detail: String },
    /// The request names something this server will not touch (a file outside the import
    /// directories).
    #[error("{detail}")]
    Forbidden { code: &'static str, detail: String },
    #[error("job {0:?} was not found")]
    NotFound(String),
    #[error("the job queue is full ({limit} jobs waiting or running); retry later")]
    QueueFull { limit: usize },
    #[error("job {id:?} has already finished ({status})")]
    Finished { id: String, status: &'static str },
    #[error("the job server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The job was cancelled (internal: ends a run at a checkpoint).
    #[error("cancelled")]
    Cancelled,
    /// The server is stopping (internal: the job stays running in the log and resumes).
    #[error("stopped")]
    Stopped,
}

impl JobError {
    pub fn invalid(code: &'static str, detail: impl Into<String>) -> Self {
        JobError::Invalid {
            code,
            detail: detail.into(),
        }
    }
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JobError + '_ {
        move |source| JobError::Io {
            path: path.display().to_string(),
            source,
        }
    }
    /// Worth another attempt: I/O and internal failures, not bad input.
    fn retryable(&self) -> bool {
        match self {
            JobError::Io { .. } => true,
            JobError::Engine(e) => {
                matches!(e, EngineError::Io { .. } | EngineError::Unavailable { .. })
            }
            _ => false,
        }
    }
    /// A stable code for the job's `error` field.
    pub fn code(&self) -> String {
        match self {
            JobError::Invalid { code, .. } | JobError::Forbidden { code, .. } => {
                (*code).to_string()
            }
            JobError::NotFound(_) => "job_not_found".into(),
            JobError::QueueFull { .. } => "job_queue_full".into(),
            JobError::Finished { .. } => "job_finished".into(),
            JobError::ShuttingDown => "shutting_down".into(),
            JobError::Engine(e) => match e {
                EngineError::NotFound { what, .. } => format!("{what}_not_found"),
                EngineError::Invalid(i) => i.code.to_string(),
                EngineError::Conflict { code, .. } | EngineError::Unavailable { code, .. } => {
                    (*code).to_string()
                }
                _ => "internal".into(),
            },
            JobError::Io { .. } => "io_error".into(),
            JobError::Cancelled => "cancelled".into(),
            JobError::Stopped => "stopped".into(),
        }
    }
    /// The human sentence for the job's `error` field.
    pub fn detail(&self) -> String {
        match self {
            JobError::Engine(EngineError::Invalid(i)) => i.detail.clone(),
            other => other.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, JobError>;

/// A job to submit: its type, parameters (a JSON object) and, for uploads, the id the
/// caller already stored the input under (see [`Jobs::new_id`]).
pub struct Submit {
    pub id: Option<String>,
    pub job_type: JobType,
    pub params: Value,
    pub trace_id: Option<String>,
}

/// Counts for `GET /v1/jobs/stats/queue`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueStats {
    pub queued: usize,
    pub running: usize,
    pub completed: usize,
    pub failed: usize,
    pub cancelled: usize,
    pub workers: usize,
    pub busy_workers: usize,
    pub queue_limit: usize,
    pub oldest_queued_age_ms: Option<u64>,
    pub retention_seconds: u64,
}

pub struct Jobs {
    engine: Arc<Engine>,
    config: JobsConfig,
    dir: PathBuf,
    /// `config.import_dirs` (or the default), canonicalised.
    import_roots: Vec<PathBuf>,
    inner: Mutex<Inner>,
    wake: Condvar,
    stop: AtomicBool,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

struct Inner {
    table: Table,
    busy: usize,
    /// The table changed since the table file was last written.
    dirty: bool,
}

impl Jobs {
    /// Rebuilds the job table (table file, then the log after it), queues again what was
    /// unfinished, and starts the workers and the housekeeping thread.
    pub fn start(engine: Arc<Engine>, mut config: JobsConfig) -> Result<Arc<Jobs>> {
        config.workers = config.workers.clamp(1, WORKERS_LIMIT);
        config.queue_limit = config.queue_limit.max(1);
        let dir = engine.config().data_dir.join("jobs");
        std::fs::create_dir_all(&dir).map_err(JobError::io(&dir))?;
        let import_roots = import_roots(&engine, &config)?;
        let table = load_table(&engine, &dir)?;
        let open = table.queue.len();
        let jobs = Arc::new(Jobs {
            engine,
            config,
            dir,
            import_roots,
            inner: Mutex::new(Inner {
                table,
                busy: 0,
                dirty: true,
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
        });
        if open > 0 {
            tracing::info!(jobs = open, "resuming jobs that were queued or running");
        }
        let mut threads = Vec::new();
        for i in 0..jobs.config.workers {
            let j = jobs.clone();
            let h = std::thread::Builder::new()
                .name(format!("quiver-job-{i}"))
                .spawn(move || j.worker())
                .map_err(JobError::io(Path::new("job worker thread")))?;
            threads.push(h);
        }
        // A staged re-embedding no unfinished job will finish (its job ended in a crash
        // between its last event and the discard) would hold snapshots back: drop it.
        let owned: Vec<String> = jobs
            .inner
            .lock()
            .table
            .jobs
            .values()
            .filter(|j| j.job_type == JobType::RegenerateEmbeddings && !j.status.is_finished())
            .filter_map(|j| j.library_id.clone())
            .collect();
        for lib in jobs.engine.reembeddings_staged() {
            if !owned.contains(&lib) {
                tracing::warn!(library = %lib, "discarding a re-embedding no job owns");
                jobs.discard_staging(&lib);
            }
        }
        let j = jobs.clone();
        let h = std::thread::Builder::new()
            .name("quiver-job-housekeeping".into())
            .spawn(move || j.housekeeping())
            .map_err(JobError::io(Path::new("job housekeeping thread")))?;
        threads.push(h);
        *jobs.threads.lock() = threads;
        Ok(jobs)
    }

    pub fn config(&self) -> &JobsConfig {
        &self.config
    }

    /// The directories `batch_import` may read a `path` from (canonical).
    pub fn import_dirs(&self) -> &[PathBuf] {
        &self.import_roots
    }

    /// A fresh job id (for callers that store an upload before submitting).
    pub fn new_id() -> String {
        format!("job_{}", uuid::Uuid::new_v4().simple())
    }

    /// The directory holding a job's files (input upload, export result).
    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Refuses early when the queue is full (before an upload is stored).
    pub fn check_capacity(&self) -> Result<()> {
        if self.stop.load(Ordering::Acquire) {
            return Err(JobError::ShuttingDown);
        }
        let inner = self.inner.lock();
        if inner.table.queue.len() + inner.busy >= self.config.queue_limit {
            return Err(JobError::QueueFull {
                limit: self.config.queue_limit,
            });
        }
        Ok(())
    }

    /// Validates a job's parameters and queues it (`job.queued`). Returns the job as queued.
    pub fn submit(&self, req: Submit) -> Result<Job> {
        let (library_id, params, max_retries) =
            work::validate(&self.engine, &self.import_roots, req.job_type, req.params)?;
        let size = serde_json::to_vec(&params).map(|v| v.len()).unwrap_or(0);
        if size > PARAMS_BYTES_LIMIT {
            return Err(JobError::invalid(
                "params_too_large",
                format!(
                    "job parameters are {size} bytes of JSON; the limit is {PARAMS_BYTES_LIMIT}"
                ),
            ));
        }
        let id = req.id.unwrap_or_else(Jobs::new_id);
        let mut inner = self.inner.lock();
        if self.stop.load(Ordering::Acquire) {
            return Err(JobError::ShuttingDown);
        }
        if inner.table.queue.len() + inner.busy >= self.config.queue_limit {
            return Err(JobError::QueueFull {
                limit: self.config.queue_limit,
            });
        }
        // One re-embedding per library at a time: two would replace each other's staging.
        if req.job_type == JobType::RegenerateEmbeddings {
            if let Some(other) = inner.table.jobs.values().find(|j| {
                j.job_type == JobType::RegenerateEmbeddings
                    && !j.status.is_finished()
                    && j.library_id == library_id
            }) {
                return Err(JobError::Engine(EngineError::Conflict {
                    code: "job_conflict",
                    detail: format!(
                        "job {} is already re-embedding this library; cancel it or wait for it",
                        other.id
                    ),
                }));
            }
        }
        if inner.table.jobs.contains_key(&id) {
            return Err(JobError::invalid(
                "job_exists",
                format!("job {id:?} exists"),
            ));
        }
        let data = json!({
            "job_id": id,
            "job_type": req.job_type.as_str(),
            "library_id": library_id,
            "params": params,
            "max_retries": max_retries,
            "trace_id": req.trace_id,
            "replica": self.engine.replica_id(),
        });
        self.record(&mut inner, "job.queued", &id, data)?;
        let job = inner
            .table
            .jobs
            .get(&id)
            .cloned()
            .ok_or_else(|| JobError::NotFound(id.clone()))?;
        drop(inner);
        self.wake.notify_one();
        Ok(job)
    }

    pub fn get(&self, id: &str) -> Result<Job> {
        self.inner
            .lock()
            .table
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| JobError::NotFound(id.to_string()))
    }

    /// Jobs matching the filters, newest first, at most `limit`.
    pub fn list(
        &self,
        status: Option<JobStatus>,
        job_type: Option<JobType>,
        library_id: Option<&str>,
        limit: usize,
    ) -> Vec<Job> {
        let inner = self.inner.lock();
        let mut v: Vec<&Job> = inner
            .table
            .jobs
            .values()
            .filter(|j| status.is_none_or(|s| j.status == s))
            .filter(|j| job_type.is_none_or(|t| j.job_type == t))
            .filter(|j| library_id.is_none_or(|l| j.library_id.as_deref() == Some(l)))
            .collect();
        v.sort_by_key(|j| std::cmp::Reverse(j.queued_seq));
        v.into_iter().take(limit).cloned().collect()
    }

    /// Cancels a job: a queued one at once (`job.cancelled`), a running one at its next
    /// checkpoint (`job.cancel_requested` now, `job.cancelled` when it stops).
    pub fn cancel(&self, id: &str) -> Result<Job> {
        let mut inner = self.inner.lock();
        let job = inner
            .table
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| JobError::NotFound(id.to_string()))?;
        if job.status.is_finished() {
            return Err(JobError::Finished {
                id: id.to_string(),
                status: job.status.as_str(),
            });
        }
        let taken = job.status == JobStatus::Running || !inner.table.queue.contains(&job.id);
        if taken {
            if !job.cancel_requested {
                self.record(
                    &mut inner,
                    "job.cancel_requested",
                    id,
                    json!({"job_id": id}),
                )?;
            }
        } else {
            self.record(
                &mut inner,
                "job.cancelled",
                id,
                json!({"job_id": id, "checkpoint": job.checkpoint}),
            )?;
            // A re-embedding queued again after a restart may have staged vectors already.
            if job.job_type == JobType::RegenerateEmbeddings {
                if let Some(lib) = &job.library_id {
                    self.discard_staging(lib);
                }
            }
        }
        inner
            .table
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| JobError::NotFound(id.to_string()))
    }

    /// Drops a library's staged re-embedding (logged, not fatal: the library's live vectors
    /// are unchanged either way).
    fn discard_staging(&self, library_id: &str) {
        let ctx = WriteCtx {
            trace_id: None,
            source: Some("jobs".into()),
        };
        match self.engine.reembed_discard(&ctx, library_id) {
            Ok(_) | Err(EngineError::NotFound { .. }) => {}
            Err(e) => {
                tracing::warn!(library = %library_id, "staged re-embedding not discarded: {e}")
            }
        }
    }

    pub fn stats(&self) -> QueueStats {
        let inner = self.inner.lock();
        let t = &inner.table;
        let now = quiver_model::time::now_ms();
        QueueStats {
            queued: t.count(JobStatus::Queued),
            running: t.count(JobStatus::Running),
            completed: t.count(JobStatus::Completed),
            failed: t.count(JobStatus::Failed),
            cancelled: t.count(JobStatus::Cancelled),
            workers: self.config.workers,
            busy_workers: inner.busy,
            queue_limit: self.config.queue_limit,
            oldest_queued_age_ms: t
                .queue
                .front()
                .and_then(|id| t.jobs.get(id))
                .map(|j| now.saturating_sub(j.created_at_ms)),
            retention_seconds: self.config.retention.as_secs(),
        }
    }

    /// Stops the workers at their next checkpoint (running jobs stay `running` in the log and
    /// resume at the next start) and writes the table file.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            let _ = t.join();
        }
        if let Err(e) = self.save_table() {
            tracing::warn!("job table file not written: {e}");
        }
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    pub(crate) fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub(crate) fn cancel_requested(&self, id: &str) -> bool {
        self.inner
            .lock()
            .table
            .jobs
            .get(id)
            .is_some_and(|j| j.cancel_requested)
    }

    /// Appends a job event and folds it into the table, under the table's lock (so the
    /// table's order is the log's order).
    fn record(&self, inner: &mut Inner, ty: &'static str, id: &str, data: Value) -> Result<()> {
        let (library_id, trace_id) = inner
            .table
            .jobs
            .get(id)
            .map(|j| (j.library_id.clone(), j.trace_id.clone()))
            .unwrap_or_else(|| {
                (
                    data.get("library_id")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    data.get("trace_id")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                )
            });
        let ctx = WriteCtx {
            trace_id,
            source: Some("jobs".into()),
        };
        let c = self
            .engine
            .append_system_event(&ctx, ty, library_id, data.clone())?;
        inner
            .table
            .apply(ty, &data, quiver_model::time::now_ms(), c.seq);
        inner.dirty = true;
        Ok(())
    }

    /// Records an event for a running job (progress, end).
    pub(crate) fn record_for(&self, ty: &'static str, id: &str, data: Value) -> Result<()> {
        let mut inner = self.inner.lock();
        self.record(&mut inner, ty, id, data)
    }

    /// Takes the next queued job whose retry time has come, or waits for one.
    fn next_job(&self) -> Option<Job> {
        let mut inner = self.inner.lock();
        loop {
            if self.stopping() {
                return None;
            }
            let now = quiver_model::time::now_ms();
            let mut wait = Duration::from_millis(500);
            let mut pick = None;
            for (i, id) in inner.table.queue.iter().enumerate() {
                match inner.table.jobs.get(id) {
                    Some(j) if j.not_before_ms <= now => {
                        pick = Some(i);
                        break;
                    }
                    Some(j) => {
                        wait = wait.min(Duration::from_millis(j.not_before_ms - now));
                    }
                    None => {
                        pick = Some(i);
                        break;
                    }
                }
            }
            if let Some(i) = pick {
                let Some(id) = inner.table.queue.remove(i) else {
                    continue;
                };
                if let Some(j) = inner.table.jobs.get(&id).cloned() {
                    inner.busy += 1;
                    return Some(j);
                }
                continue;
            }
            self.wake.wait_for(&mut inner, wait);
        }
    }

    fn worker(self: Arc<Self>) {
        while let Some(job) = self.next_job() {
            self.run_one(job);
            self.inner.lock().busy -= 1;
        }
    }

    fn run_one(&self, job: Job) {
        let id = job.id.clone();
        let outcome = if job.cancel_requested {
            Err(JobError::Cancelled)
        } else {
            let attempt = job.attempts + 1;
            match self.record_for(
                "job.started",
                &id,
                json!({"job_id": id, "job_type": job.job_type.as_str(), "attempt": attempt, "resumed_from": job.checkpoint}),
            ) {
                Ok(()) => work::run(self, &job),
                Err(e) => Err(e),
            }
        };
        let attempts = self.get(&id).map(|j| j.attempts).unwrap_or(job.attempts);
        let recorded = match outcome {
            Ok(result) => self.record_for(
                "job.completed",
                &id,
                json!({"job_id": id, "job_type": job.job_type.as_str(), "result": result}),
            ),
            Err(JobError::Stopped) => Ok(()), // resumes at the next start
            Err(JobError::Cancelled) => {
                let checkpoint = self.get(&id).map(|j| j.checkpoint).unwrap_or(0);
                self.record_for(
                    "job.cancelled",
                    &id,
                    json!({"job_id": id, "job_type": job.job_type.as_str(), "checkpoint": checkpoint}),
                )
            }
            Err(e) if e.retryable() && attempts <= job.max_retries => {
                let delay = backoff(attempts);
                let retry_at_ms = quiver_model::time::now_ms() + delay.as_millis() as u64;
                tracing::warn!(job = %id, attempt = attempts, "job failed, retrying in {delay:?}: {e}");
                let r = self.record_for(
                    "job.retrying",
                    &id,
                    json!({"job_id": id, "attempt": attempts, "error": e.code(), "detail": e.detail(), "retry_at_ms": retry_at_ms}),
                );
                self.wake.notify_one();
                r
            }
            Err(e) => self.record_for(
                "job.failed",
                &id,
                json!({"job_id": id, "job_type": job.job_type.as_str(), "attempts": attempts, "error": e.code(), "detail": e.detail()}),
            ),
        };
        if let Err(e) = recorded {
            tracing::error!(job = %id, "job state not recorded: {e}");
        }
    }

    /// Every second: drop finished jobs past retention (and their files); every few seconds,
    /// write the table file when it changed.
    fn housekeeping(self: Arc<Self>) {
        let mut last_save = Instant::now();
        while !self.stopping() {
            std::thread::park_timeout(Duration::from_millis(250));
            let cutoff = quiver_model::time::now_ms()
                .saturating_sub(self.config.retention.as_millis() as u64);
            let removed = {
                let mut inner = self.inner.lock();
                let r = inner.table.prune(cutoff, FINISHED_JOBS_LIMIT);
                if !r.is_empty() {
                    inner.dirty = true;
                }
                r
            };
            for id in removed {
                let d = self.job_dir(&id);
                if d.exists() {
                    if let Err(e) = std::fs::remove_dir_all(&d) {
                        tracing::warn!("cannot remove {}: {e}", d.display());
                    }
                }
            }
            if last_save.elapsed() >= Duration::from_secs(5) {
                last_save = Instant::now();
                if let Err(e) = self.save_table() {
                    tracing::warn!("job table file not written: {e}");
                }
            }
        }
    }

    /// Writes `<data_dir>/jobs/table.json` once the events it folds are durable.
    fn save_table(&self) -> Result<()> {
        let (bytes, seq) = {
            let mut inner = self.inner.lock();
            if !inner.dirty {
                return Ok(());
            }
            inner.dirty = false;
            // Every job event is appended under this lock, so the table has folded every job
            // event the log has assigned so far: the next start scans the log from here.
            let assigned = self.engine.log().last_assigned_seq();
            inner.table.seq = inner.table.seq.max(assigned);
            let bytes = serde_json::to_vec(&inner.table).map_err(|e| JobError::Io {
                path: TABLE_FILE.into(),
                source: e.into(),
            })?;
            (bytes, inner.table.seq)
        };
        self.engine
            .log()
            .wait_durable(seq)
            .map_err(|e| JobError::Engine(e.into()))?;
        let path = self.dir.join(TABLE_FILE);
        quiver_log::write_atomic(&path, |w| std::io::Write::write_all(w, &bytes))
            .map_err(|e| JobError::Engine(e.into()))
    }
}

/// The import directories, canonicalised; the default one is created. A configured one that
/// does not exist stops the start (an operator typo must not silently allow nothing).
fn import_roots(engine: &Engine, config: &JobsConfig) -> Result<Vec<PathBuf>> {
    let dirs = if config.import_dirs.is_empty() {
        let d = engine.config().data_dir.join("import");
        std::fs::create_dir_all(&d).map_err(JobError::io(&d))?;
        vec![d]
    } else {
        config.import_dirs.clone()
    };
    dirs.iter()
        .map(|d| {
            let c = std::fs::canonicalize(d).map_err(JobError::io(d))?;
            if !c.is_dir() {
                return Err(JobError::invalid(
                    "invalid_import_dir",
                    format!("import directory {} is not a directory", d.display()),
                ));
            }
            Ok(c)
        })
        .collect()
}

/// Exponential backoff with jitter: `BACKOFF_BASE · 2^(attempt-1)`, capped, times [0.5, 1.5).
pub fn backoff(attempt: u32) -> Duration {
    use rand::Rng;
    let exp = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    exp.mul_f64(rand::thread_rng().gen_range(0.5..1.5))
}

/// The table as of the end of the log: the table file (if any), then every `job.*` event
/// after the seq it covers that the log still holds.
fn load_table(engine: &Engine, dir: &Path) -> Result<Table> {
    let path = dir.join(TABLE_FILE);
    let mut table = match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<Table>(&bytes) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(
                    "ignoring the damaged job table file {}: {e}",
                    path.display()
                );
                Table::default()
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Table::default(),
        Err(e) => return Err(JobError::io(&path)(e)),
    };
    let first = engine.log().first_seq();
    let mut next = (table.seq + 1).max(first);
    if first > table.seq + 1 {
        tracing::warn!(
            "the log now begins at seq {first}; any job events in {}..{} are gone (retention) and the job table file does not cover them",
            table.seq + 1,
            first - 1
        );
    }
    let end = engine.applied_seq();
    while next <= end {
        let batch = engine
            .log()
            .read_from(next, 4096, 64 << 20)
            .map_err(|e| JobError::Engine(e.into()))?;
        if batch.is_empty() {
            break;
        }
        for (seq, payload) in batch {
            next = seq + 1;
            let is_job = quiver_model::record::peek_event_type(&payload)
                .map(|t| t.starts_with("job."))
                .unwrap_or(false);
            if !is_job {
                continue;
            }
            let Ok(rec) = Record::decode(&payload) else {
                continue;
            };
            if let Change::AppEvent {
                event_type, data, ..
            } = &rec.change
            {
                table.apply(event_type, data, rec.meta.timestamp_ms, seq);
            }
        }
    }
    table.requeue_unfinished(engine.replica_id());
    Ok(table)
}
