//! What each job type does: parameter validation at submission, then the run itself, through
//! the engine's public write paths only. Every run calls [`Ctl::checkpoint`] between steps:
//! that is where a cancelled job stops (after a whole step, so the state is consistent), where
//! a stopping server leaves it (to resume from the last recorded checkpoint), and where
//! `job.progress` is recorded (throttled).
//!
//! Every step is idempotent, so a run resumed after a crash may redo the steps after its last
//! recorded checkpoint without changing the outcome: imports upsert (lines without an `id` get
//! `<job id>-<line>`), deletes treat "already gone" as done, exports rewrite the whole file.

use crate::{Job, JobError, JobType, Jobs, Result, MAX_RETRIES_DEFAULT, MAX_RETRIES_LIMIT};
use quiver_engine::filter::Filter;
use quiver_engine::input::{export_line, DocumentInput, IndexChange};
use quiver_engine::{Engine, EngineError, ItemOutcome, WriteCtx};
use serde_json::{json, Map, Value};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest import line, in bytes (as the NDJSON ingest route).
pub const LINE_BYTES_LIMIT: usize = 16 * 1024 * 1024;
/// Most items per step (and so between two checkpoints).
pub const BATCH_SIZE_LIMIT: u64 = 512;
pub const BATCH_SIZE_DEFAULT: u64 = 256;
/// Longest pause a job may ask for after each step (`pause_ms`: throttles a big job's load).
pub const PAUSE_MS_LIMIT: u64 = 1000;
/// Most ids one `batch_delete` may name.
pub const DELETE_IDS_LIMIT: usize = 100_000;
/// Most per-line errors an import keeps in its result.
pub const IMPORT_ERRORS_KEPT: usize = 100;

const COMMON: &[&str] = &["library_id", "max_retries", "pause_ms", "batch_size"];

fn allowed(t: JobType) -> &'static [&'static str] {
    match t {
        JobType::BatchImport => &["path", "input"],
        JobType::BatchExport => &["include_embeddings"],
        JobType::IndexRebuild => &["index_type", "index_params", "quantization"],
        JobType::IndexOptimize => &[],
        JobType::RegenerateEmbeddings => &["embedding_model"],
        JobType::BatchDelete => &["ids", "filter"],
    }
}

fn bounded_u64(p: &Map<String, Value>, key: &str, max: u64, default: u64) -> Result<u64> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_u64().filter(|n| *n <= max).ok_or_else(|| {
            JobError::invalid(
                "invalid_param",
                format!("`{key}` must be an integer from 0 to {max}"),
            )
        }),
    }
}

/// Checks a job's parameters before it is queued (so bad input is a 4xx now, not a failed
/// job later). Returns the library id (resolved from a name), the parameters to record, and
/// `max_retries`.
pub fn validate(
    engine: &Engine,
    import_roots: &[PathBuf],
    t: JobType,
    params: Value,
) -> Result<(Option<String>, Value, u32)> {
    let mut p = match params {
        Value::Object(m) => m,
        Value::Null => Map::new(),
        _ => {
            return Err(JobError::invalid(
                "invalid_params",
                "job parameters must be a JSON object",
            ))
        }
    };
    if let Some(k) = p
        .keys()
        .find(|k| !COMMON.contains(&k.as_str()) && !allowed(t).contains(&k.as_str()))
    {
        let mut keys: Vec<&str> = COMMON.to_vec();
        keys.extend(allowed(t));
        return Err(JobError::invalid(
            "unknown_param",
            format!(
                "unknown parameter {k:?} for a {} job; accepted: {}",
                t.as_str(),
                keys.join(", ")
            ),
        ));
    }
    let max_retries = bounded_u64(
        &p,
        "max_retries",
        MAX_RETRIES_LIMIT as u64,
        MAX_RETRIES_DEFAULT as u64,
    )? as u32;
    bounded_u64(&p, "pause_ms", PAUSE_MS_LIMIT, 0)?;
    if bounded_u64(&p, "batch_size", BATCH_SIZE_LIMIT, BATCH_SIZE_DEFAULT)? == 0 {
        return Err(JobError::invalid(
            "invalid_param",
            format!("`batch_size` must be from 1 to {BATCH_SIZE_LIMIT}"),
        ));
    }
    let lib = match p.get("library_id") {
        Some(Value::String(s)) => s.clone(),
        _ => {
            return Err(JobError::invalid(
                "missing_library_id",
                format!(
                    "a {} job needs `library_id` (in the query string or the JSON body)",
                    t.as_str()
                ),
            ))
        }
    };
    let (info, _) = engine.library(&lib)?;
    let lib_id = info.library.id.clone();
    p.insert("library_id".into(), Value::String(lib_id.clone()));
    match t {
        JobType::BatchImport => match (p.get("path"), p.get("input")) {
            (Some(Value::String(path)), None) => {
                let checked = import_path(import_roots, path)?;
                p.insert(
                    "path".into(),
                    Value::String(checked.to_string_lossy().into_owned()),
                );
            }
            (None, Some(Value::String(s))) if s == "upload" => {}
            _ => {
                return Err(JobError::invalid(
                    "missing_input",
                    "a batch_import job needs an NDJSON body (Content-Type: application/x-ndjson) or `{\"path\": \"/absolute/file.ndjson\"}`",
                ))
            }
        },
        JobType::BatchExport => {
            if p.get("include_embeddings")
                .is_some_and(|v| !v.is_boolean() && !v.is_null())
            {
                return Err(JobError::invalid(
                    "invalid_param",
                    "`include_embeddings` must be true or false",
                ));
            }
        }
        JobType::IndexRebuild => {
            index_change(&p)?;
        }
        JobType::BatchDelete => match (p.get("ids"), p.get("filter")) {
            (Some(ids), None) => {
                let ids = ids.as_array().ok_or_else(|| {
                    JobError::invalid("invalid_param", "`ids` must be an array of document ids")
                })?;
                if ids.is_empty() || ids.len() > DELETE_IDS_LIMIT {
                    return Err(JobError::invalid(
                        "invalid_param",
                        format!("`ids` must name 1 to {DELETE_IDS_LIMIT} documents"),
                    ));
                }
                if !ids.iter().all(Value::is_string) {
                    return Err(JobError::invalid(
                        "invalid_param",
                        "`ids` must be an array of strings",
                    ));
                }
            }
            (None, Some(f)) => {
                if Filter::parse(f).map_err(EngineError::Invalid)?.is_none() {
                    return Err(JobError::invalid(
                        "invalid_filter",
                        "an empty filter would delete everything; use a filter that selects",
                    ));
                }
            }
            _ => {
                return Err(JobError::invalid(
                    "invalid_param",
                    "a batch_delete job needs exactly one of `ids` or `filter`",
                ))
            }
        },
        JobType::RegenerateEmbeddings => {
            let model = match p.get("embedding_model") {
                None | Some(Value::Null) => None,
                Some(Value::String(m)) => Some(m.as_str()),
                Some(_) => {
                    return Err(JobError::invalid(
                        "invalid_param",
                        "`embedding_model` must be a model name such as \"local:all-minilm-l6-v2\"",
                    ))
                }
            };
            let (model, _) = engine.reembed_target(&lib_id, model)?;
            p.insert("embedding_model".into(), Value::String(model));
        }
        JobType::IndexOptimize => {}
    }
    Ok((Some(lib_id), Value::Object(p), max_retries))
}

/// Resolves an import `path` (relative: to the first import directory), canonicalised so
/// `..` and symlinks are followed, and accepts it only inside an import directory: 403
/// `path_not_allowed` otherwise, 422 `invalid_path` for a file that cannot be read.
pub fn import_path(import_roots: &[PathBuf], path: &str) -> Result<PathBuf> {
    let allowed = || {
        import_roots
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let given = PathBuf::from(path);
    let joined = match (given.is_absolute(), import_roots.first()) {
        (true, _) => given,
        (false, Some(root)) => root.join(given),
        (false, None) => {
            return Err(JobError::Forbidden {
                code: "path_not_allowed",
                detail: "this server reads no import files (no import directory)".into(),
            })
        }
    };
    let canonical = match std::fs::canonicalize(&joined) {
        Ok(c) => c,
        // Whether a file exists outside the import directories is not the caller's business
        // (`..` is resolved lexically here, as the file does not exist to canonicalise).
        Err(_) if !import_roots.iter().any(|r| lexical(&joined).starts_with(r)) => {
            return Err(JobError::Forbidden {
                code: "path_not_allowed",
                detail: format!("{path:?} is outside the import directories ({})", allowed()),
            })
        }
        Err(e) => {
            return Err(JobError::invalid(
                "invalid_path",
                format!("cannot read {path:?}: {e}"),
            ))
        }
    };
    if !import_roots.iter().any(|r| canonical.starts_with(r)) {
        return Err(JobError::Forbidden {
            code: "path_not_allowed",
            detail: format!(
                "{path:?} is outside the import directories ({}); put the file there (symlinks and `..` are resolved first)",
                allowed()
            ),
        });
    }
    match std::fs::metadata(&canonical) {
        Ok(m) if m.is_file() => Ok(canonical),
        Ok(_) => Err(JobError::invalid(
            "invalid_path",
            format!("{path:?} is not a regular file"),
        )),
        Err(e) => Err(JobError::invalid(
            "invalid_path",
            format!("cannot read {path:?}: {e}"),
        )),
    }
}

/// `p` with `.` and `..` components resolved without touching the disk.
fn lexical(p: &std::path::Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn index_change(p: &Map<String, Value>) -> Result<IndexChange> {
    let mut m = Map::new();
    for k in ["index_type", "index_params", "quantization"] {
        if let Some(v) = p.get(k) {
            m.insert(k.into(), v.clone());
        }
    }
    if m.is_empty() {
        return Err(JobError::invalid(
            "invalid_param",
            "an index_rebuild job needs `index_type` (and optionally `index_params`, `quantization`)",
        ));
    }
    serde_json::from_value(Value::Object(m))
        .map_err(|e| JobError::invalid("invalid_index_params", e.to_string()))
}

/// A run's handle on its job: checkpoints, progress, the engine.
pub(crate) struct Ctl<'a> {
    jobs: &'a Jobs,
    job: &'a Job,
    last_progress: Option<Instant>,
    pause: Duration,
    batch: usize,
    ctx: WriteCtx,
    library: String,
}

impl Ctl<'_> {
    /// Between two steps: stop if cancelled or stopping; record progress (throttled); pause.
    fn checkpoint(
        &mut self,
        current: u64,
        total: u64,
        message: &str,
        checkpoint: u64,
    ) -> Result<()> {
        if self.jobs.stopping() {
            return Err(JobError::Stopped);
        }
        if self.jobs.cancel_requested(&self.job.id) {
            return Err(JobError::Cancelled);
        }
        if self
            .last_progress
            .is_none_or(|t| t.elapsed() >= crate::PROGRESS_EVERY)
        {
            self.last_progress = Some(Instant::now());
            self.jobs.record_for(
                "job.progress",
                &self.job.id,
                json!({"job_id": self.job.id, "current": current, "total": total,
                       "percentage": if total == 0 { 0.0 } else { (current as f64 * 100.0 / total as f64).min(100.0) },
                       "message": message, "checkpoint": checkpoint}),
            )?;
        }
        // The pause is slept in slices so a cancel (or shutdown) is not kept waiting by it.
        let until = Instant::now() + self.pause;
        while let Some(left) = until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        {
            std::thread::sleep(left.min(Duration::from_millis(10)));
            if self.jobs.stopping() {
                return Err(JobError::Stopped);
            }
            if self.jobs.cancel_requested(&self.job.id) {
                return Err(JobError::Cancelled);
            }
        }
        Ok(())
    }

    fn engine(&self) -> &Arc<Engine> {
        self.jobs.engine()
    }
}

/// Runs one attempt of `job`; its result goes into `job.completed`.
pub(crate) fn run(jobs: &Jobs, job: &Job) -> Result<Value> {
    let p = job.params.as_object().cloned().unwrap_or_default();
    let num = |k: &str, d: u64| p.get(k).and_then(Value::as_u64).unwrap_or(d);
    let mut ctl = Ctl {
        jobs,
        job,
        last_progress: None,
        pause: Duration::from_millis(num("pause_ms", 0).min(PAUSE_MS_LIMIT)),
        batch: num("batch_size", BATCH_SIZE_DEFAULT).clamp(1, BATCH_SIZE_LIMIT) as usize,
        ctx: WriteCtx {
            trace_id: job.trace_id.clone(),
            source: Some(format!("job:{}", job.id)),
        },
        library: job.library_id.clone().unwrap_or_default(),
    };
    match job.job_type {
        JobType::BatchImport => import(&mut ctl, &p),
        JobType::BatchExport => export(&mut ctl, &p),
        JobType::IndexRebuild => rebuild(&mut ctl, &p),
        JobType::IndexOptimize => optimize(&mut ctl),
        JobType::BatchDelete => delete(&mut ctl, &p),
        JobType::RegenerateEmbeddings => regenerate(&mut ctl, &p),
    }
}

/// Reads one line (without its newline) into `buf`; `Ok(None)` at the end, `Ok(Some(false))`
/// for a line past [`LINE_BYTES_LIMIT`] (skipped, never held whole).
fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<Option<bool>> {
    buf.clear();
    let n = std::io::Read::take(&mut *r, LINE_BYTES_LIMIT as u64 + 1).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Some(true));
    }
    if buf.len() > LINE_BYTES_LIMIT {
        buf.clear();
        r.skip_until(b'\n')?;
        return Ok(Some(false));
    }
    Ok(Some(true)) // the last line, without a newline
}

fn import(ctl: &mut Ctl, p: &Map<String, Value>) -> Result<Value> {
    let path = match p.get("path").and_then(Value::as_str) {
        // Checked again at every run: the file (or a directory on its way) may have been
        // replaced by a symlink since the job was queued.
        Some(path) => {
            let c =
                std::fs::canonicalize(path).map_err(JobError::io(std::path::Path::new(path)))?;
            if !ctl.jobs.import_dirs().iter().any(|r| c.starts_with(r)) {
                return Err(JobError::Forbidden {
                    code: "path_not_allowed",
                    detail: format!("{path:?} now leads outside the import directories"),
                });
            }
            c
        }
        None => ctl.jobs.job_dir(&ctl.job.id).join("input.ndjson"),
    };
    let open = || {
        std::fs::File::open(&path)
            .map(|f| std::io::BufReader::with_capacity(1 << 20, f))
            .map_err(JobError::io(&path))
    };
    // Lines in the file (for progress), counted without holding any line.
    let mut total = 0u64;
    {
        let mut r = open()?;
        loop {
            let buf = r.fill_buf().map_err(JobError::io(&path))?;
            if buf.is_empty() {
                break;
            }
            let n = buf.len();
            total += memchr_count(buf);
            let ends_line = buf.last() == Some(&b'\n');
            r.consume(n);
            if !ends_line && r.fill_buf().map_err(JobError::io(&path))?.is_empty() {
                total += 1;
            }
        }
    }
    let resume = ctl.job.checkpoint;
    let mut r = open()?;
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    let (mut committed, mut failed, mut last_seq) = (0u64, 0u64, 0u64);
    let mut errors: Vec<Value> = Vec::new();
    let mut group: Vec<(u64, std::result::Result<DocumentInput, EngineError>)> = Vec::new();
    let note = |line: u64, e: &EngineError, failed: &mut u64, errors: &mut Vec<Value>| {
        *failed += 1;
        if errors.len() < IMPORT_ERRORS_KEPT {
            let code = crate::JobError::Engine(clone_err(e)).code();
            errors.push(json!({"line": line, "error": code, "detail": detail_of(e)}));
        }
    };
    loop {
        let got = read_line(&mut r, &mut buf).map_err(JobError::io(&path))?;
        let end = got.is_none();
        if let Some(ok) = got {
            line_no += 1;
            if line_no > resume {
                if !ok {
                    group.push((
                        line_no,
                        Err(EngineError::invalid(
                            "line_too_long",
                            format!("line is longer than {LINE_BYTES_LIMIT} bytes"),
                        )),
                    ));
                } else if let Some(item) = parse_line(&buf) {
                    let item = item.map(|mut d| {
                        if d.id.is_none() {
                            d.id = Some(format!("{}-{line_no}", ctl.job.id));
                        }
                        d
                    });
                    group.push((line_no, item));
                }
            }
        }
        let flush = !group.is_empty() && (end || group.len() >= ctl.batch);
        if flush {
            let numbers: Vec<u64> = group.iter().map(|(n, _)| *n).collect();
            let items = std::mem::take(&mut group)
                .into_iter()
                .map(|(_, i)| i)
                .collect();
            let c = ctl
                .engine()
                .upsert_documents(&ctl.ctx, &ctl.library, items)?;
            for (n, o) in numbers.iter().zip(c.value.iter()) {
                match o {
                    ItemOutcome::Committed { seq, .. } => {
                        committed += 1;
                        last_seq = last_seq.max(*seq);
                    }
                    ItemOutcome::Failed(e) => note(*n, e, &mut failed, &mut errors),
                }
            }
        }
        if end {
            break;
        }
        if flush {
            ctl.checkpoint(
                line_no,
                total,
                &format!("{line_no} of {total} lines"),
                line_no,
            )?;
        }
    }
    ctl.engine()
        .log()
        .wait_durable(last_seq)
        .map_err(|e| JobError::Engine(e.into()))?;
    Ok(
        json!({"lines": line_no, "committed": committed, "failed": failed, "errors": errors,
              "resumed_from_line": resume, "seq": last_seq}),
    )
}

fn memchr_count(b: &[u8]) -> u64 {
    b.iter().filter(|&&c| c == b'\n').count() as u64
}

/// A copy of an item's error good enough for its code and detail.
fn clone_err(e: &EngineError) -> EngineError {
    match e {
        EngineError::Invalid(i) => EngineError::Invalid(i.clone()),
        EngineError::NotFound { what, id } => EngineError::NotFound {
            what,
            id: id.clone(),
        },
        EngineError::Conflict { code, detail } => EngineError::Conflict {
            code,
            detail: detail.clone(),
        },
        EngineError::Unavailable { code, detail } => EngineError::Unavailable {
            code,
            detail: detail.clone(),
        },
        other => EngineError::Corrupt(other.to_string()),
    }
}

fn detail_of(e: &EngineError) -> String {
    match e {
        EngineError::Invalid(i) => i.detail.clone(),
        other => other.to_string(),
    }
}

/// One import line: `None` for blank lines and export headers.
fn parse_line(text: &[u8]) -> Option<std::result::Result<DocumentInput, EngineError>> {
    let t = text.trim_ascii();
    if t.is_empty() || t.starts_with(b"{\"quiver_export\"") {
        return None;
    }
    Some(serde_json::from_slice::<DocumentInput>(t).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => EngineError::invalid("invalid_document", e.to_string()),
            _ => EngineError::invalid("malformed_json", e.to_string()),
        }
    }))
}

fn export(ctl: &mut Ctl, p: &Map<String, Value>) -> Result<Value> {
    let include = p
        .get("include_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let (info, docs, seq) = ctl.engine().export(&ctl.library)?;
    let l = &info.library;
    let header = json!({"quiver_export": {"version": 1, "seq": seq, "documents": docs.len(),
        "library": {"id": l.id, "name": l.name, "description": l.description, "dimension": l.dimension,
                    "metric": l.metric.as_str(), "index_type": l.index_type.as_str(),
                    "embedding_model": l.embedding_model, "metadata": l.metadata}}});
    let dir = ctl.jobs.job_dir(&ctl.job.id);
    std::fs::create_dir_all(&dir).map_err(JobError::io(&dir))?;
    let path = dir.join("export.ndjson");
    let total = docs.len() as u64;
    let mut stopped: Option<JobError> = None;
    let mut bytes = 0u64;
    let written = quiver_log::write_atomic(&path, |w| {
        let mut put = |v: &Value, w: &mut std::io::BufWriter<std::fs::File>| {
            let s = serde_json::to_vec(v).map_err(std::io::Error::other)?;
            bytes += s.len() as u64 + 1;
            w.write_all(&s)?;
            w.write_all(b"\n")
        };
        put(&header, w)?;
        for (i, d) in docs.iter().enumerate() {
            put(&export_line(d, include), w)?;
            let n = i as u64 + 1;
            if n.is_multiple_of(ctl.batch as u64) {
                if let Err(e) = ctl.checkpoint(n, total, &format!("{n} of {total} documents"), 0) {
                    stopped = Some(e);
                    return Err(std::io::Error::other("job stopped"));
                }
            }
        }
        Ok(())
    });
    if let Some(e) = stopped {
        return Err(e); // write_atomic removed its temp file: no partial export is left
    }
    written.map_err(|e| JobError::Engine(e.into()))?;
    Ok(json!({"documents": total, "seq": seq, "bytes": bytes,
              "file": format!("jobs/{}/export.ndjson", ctl.job.id),
              "download": format!("/v1/jobs/{}/result", ctl.job.id)}))
}

/// Waits for a library's index build to end, recording its progress.
fn wait_built(ctl: &mut Ctl, what: &str) -> Result<quiver_engine::state::IndexStatus> {
    loop {
        let (st, _) = ctl.engine().index_status(&ctl.library)?;
        if !st.building {
            return Ok(st);
        }
        let (cur, total) = st.progress.unwrap_or((0, st.vectors as u64));
        ctl.checkpoint(cur, total, &format!("{what}: {cur} of {total} vectors"), 0)?;
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn rebuild(ctl: &mut Ctl, p: &Map<String, Value>) -> Result<Value> {
    let change = index_change(p)?;
    let started = Instant::now();
    let engine = ctl.engine().clone();
    engine.set_index(&ctl.ctx, &ctl.library, change)?;
    // A cancel from here on stops the wait only: the index change is committed (a
    // `library.updated` record) and its build finishes beside the live index regardless.
    let st = wait_built(ctl, "building the index")?;
    Ok(
        json!({"index_type": st.index_type.as_str(), "vectors": st.vectors, "serving": st.serving,
              "duration_ms": started.elapsed().as_secs_f64() * 1000.0}),
    )
}

fn optimize(ctl: &mut Ctl) -> Result<Value> {
    let started = Instant::now();
    let (before, _) = ctl.engine().index_status(&ctl.library)?;
    if !ctl.engine().optimize_index(&ctl.library)? {
        return Ok(
            json!({"optimized": false, "index_type": before.index_type.as_str(),
            "reason": "nothing to compact: a flat index reuses deleted rows in place (or the library is empty)"}),
        );
    }
    let after = wait_built(ctl, "compacting the index")?;
    let data = json!({
        "library_id": ctl.library, "index_type": after.index_type.as_str(), "num_vectors": after.vectors,
        "tombstones_before": before.tombstones, "tombstones_after": after.tombstones,
        "duration_ms": started.elapsed().as_secs_f64() * 1000.0, "job_id": ctl.job.id,
    });
    ctl.engine().append_system_event(
        &ctl.ctx,
        "index.optimized",
        Some(ctl.library.clone()),
        data.clone(),
    )?;
    Ok(
        json!({"optimized": true, "index_type": after.index_type.as_str(), "vectors": after.vectors,
              "tombstones_before": before.tombstones, "tombstones_after": after.tombstones,
              "duration_ms": data["duration_ms"]}),
    )
}

fn delete(ctl: &mut Ctl, p: &Map<String, Value>) -> Result<Value> {
    let (mut docs_deleted, mut chunks_deleted, mut not_found) = (0u64, 0u64, 0u64);
    // (document id, Some(chunk id) for a single chunk)
    let plan: Vec<(String, Option<String>)> =
        if let Some(ids) = p.get("ids").and_then(Value::as_array) {
            ids.iter()
                .filter_map(|v| v.as_str().map(|s| (s.to_string(), None)))
                .collect()
        } else {
            let f = p.get("filter").cloned().unwrap_or(Value::Null);
            let Some(filter) = Filter::parse(&f).map_err(EngineError::Invalid)? else {
                return Err(JobError::invalid(
                    "invalid_filter",
                    "the filter selects nothing",
                ));
            };
            let (_, docs, _) = ctl.engine().export(&ctl.library)?;
            let mut plan = Vec::new();
            for d in docs {
                let matching: Vec<&quiver_model::Chunk> =
                    d.chunks.iter().filter(|c| filter.matches(&d, c)).collect();
                let whole = if d.chunks.is_empty() {
                    let empty = quiver_model::Chunk {
                        id: String::new(),
                        document_id: d.id.clone(),
                        text: String::new(),
                        embedding: Vec::new(),
                        metadata: Map::new(),
                    };
                    filter.matches(&d, &empty)
                } else {
                    matching.len() == d.chunks.len()
                };
                if whole {
                    plan.push((d.id.clone(), None));
                } else {
                    plan.extend(matching.iter().map(|c| (d.id.clone(), Some(c.id.clone()))));
                }
            }
            plan
        };
    let total = plan.len() as u64;
    // Resuming a delete by ids skips what was recorded done; a filter is evaluated afresh
    // (what was deleted no longer matches).
    let start = if p.contains_key("ids") {
        ctl.job.checkpoint as usize
    } else {
        0
    };
    let mut last_seq = 0;
    for (i, (doc, chunk)) in plan.iter().enumerate().skip(start) {
        let r = match chunk {
            None => ctl.engine().delete_document(&ctl.ctx, &ctl.library, doc),
            Some(c) => ctl.engine().delete_chunk(&ctl.ctx, &ctl.library, doc, c),
        };
        match r {
            Ok(c) => {
                last_seq = c.seq;
                if chunk.is_some() {
                    chunks_deleted += 1;
                } else {
                    docs_deleted += 1;
                }
            }
            // Already gone (e.g. redone after a resume): the goal holds.
            Err(EngineError::NotFound { what, .. }) if what != "library" => not_found += 1,
            Err(e) => return Err(e.into()),
        }
        let n = i as u64 + 1;
        if n.is_multiple_of(ctl.batch as u64) && n < total {
            ctl.checkpoint(n, total, &format!("{n} of {total} deletions"), n)?;
        }
    }
    ctl.engine()
        .log()
        .wait_durable(last_seq)
        .map_err(|e| JobError::Engine(e.into()))?;
    Ok(
        json!({"deleted_documents": docs_deleted, "deleted_chunks": chunks_deleted,
              "not_found": not_found, "seq": last_seq}),
    )
}

/// Re-embeds every chunk of the library with `embedding_model` (which may change the
/// dimension): new vectors are staged beside the live ones (searches keep working on those),
/// then swapped in by one record once every document is staged. A cancel or a failure
/// discards the staging, leaving the library exactly as it was; a stopping server leaves it
/// staged, and the resumed job embeds only what is not staged yet.
fn regenerate(ctl: &mut Ctl, p: &Map<String, Value>) -> Result<Value> {
    let model = p.get("embedding_model").and_then(Value::as_str);
    let r = regenerate_staged(ctl, model);
    match &r {
        Ok(_) | Err(JobError::Stopped) => {}
        Err(_) => {
            if let Err(e) = ctl.engine().reembed_discard(&ctl.ctx, &ctl.library) {
                tracing::warn!(job = %ctl.job.id, "staged re-embedding not discarded: {e}");
            }
        }
    }
    r
}

/// Most rounds of "stage what changed meanwhile" before the switch gives up (each round
/// stages only documents written during the previous one).
const SWITCH_ROUNDS_LIMIT: u32 = 100;

fn regenerate_staged(ctl: &mut Ctl, model: Option<&str>) -> Result<Value> {
    let started = Instant::now();
    let engine = ctl.engine().clone();
    let (info, _) = engine.library(&ctl.library)?;
    let (from_model, from_dimension) =
        (info.library.embedding_model.clone(), info.library.dimension);
    let resumed = engine.reembed_begin(&ctl.ctx, &ctl.library, model)?.value;
    let (mut chunks, mut staged_docs) = (0u64, 0u64);
    for _ in 0..SWITCH_ROUNDS_LIMIT {
        let (total, pending) = engine.reembed_pending(&ctl.library)?;
        if pending.is_empty() {
            let switched = engine.reembed_switch(&ctl.ctx, &ctl.library)?;
            if let Some(after) = switched.value {
                let c = switched.seq;
                engine
                    .log()
                    .wait_durable(c)
                    .map_err(|e| JobError::Engine(e.into()))?;
                let l = &after.library;
                return Ok(json!({
                    "documents": after.num_documents, "chunks": after.num_chunks,
                    "chunks_embedded": chunks, "documents_embedded": staged_docs,
                    "resumed": resumed,
                    "from": {"embedding_model": from_model, "dimension": from_dimension},
                    "embedding_model": l.embedding_model, "dimension": l.dimension,
                    "duration_ms": started.elapsed().as_secs_f64() * 1000.0, "seq": c,
                }));
            }
            continue;
        }
        let total = total as u64;
        let mut done = total - pending.len() as u64;
        for group in pending.chunks(ctl.batch) {
            let n = engine.reembed_stage(&ctl.ctx, &ctl.library, group)?.value as u64;
            staged_docs += n;
            chunks += group
                .iter()
                .filter_map(|id| engine.document(&ctl.library, id).ok())
                .map(|(d, _)| d.chunks.len() as u64)
                .sum::<u64>();
            done += n;
            ctl.checkpoint(
                done,
                total,
                &format!("{done} of {total} documents embedded"),
                0,
            )?;
        }
    }
    Err(JobError::Engine(EngineError::Unavailable {
        code: "reembedding_busy",
        detail: format!("documents kept changing during {SWITCH_ROUNDS_LIMIT} rounds of re-embedding; retry when writes to the library calm down"),
    }))
}
