//! # `quiver ingest` and `quiver import`
//!
//! Owns streaming documents into a library through `POST /v1/libraries/{id}/documents/stream`:
//! which files a path stands for, how each becomes a request body, reading the per-line
//! status replies as they arrive, the progress bar, and the final report and exit code
//! (0 all committed, 2 some lines refused, 1 transport or HTTP failure).
//!
//! - `.ndjson`/`.jsonl` files (and any file named explicitly that is not text) are sent as
//!   they are, read in 64 KiB pieces: the request body is a stream over the file, so memory
//!   stays flat whatever the file's size. With `--batch-lines N` the file is cut into
//!   requests of N lines each (line numbers in the report stay the file's own).
//! - `.txt`/`.md` files each become one document `{id: relative path, title: file name,
//!   texts: chunks}` (see [`crate::chunk`]); all text files of a run share one request.
//! - A directory stands for every such file under it (hidden entries skipped, directory
//!   symlinks not followed), in name order.
//!
//! It must never read a whole NDJSON file into memory, never stop at a refused line (the
//! server refuses lines one by one; they are reported, not fatal) and never draw the progress
//! bar on stdout, which belongs to the report.

use crate::chunk::{chunk_text, CHUNK_CHARS};
use crate::client::Client;
use crate::output::{print_json, truncate};
use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Method;
use serde_json::{json, Value};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// Size of one piece of request body read from a file.
const PIECE_BYTES: usize = 64 * 1024;
/// Longest reply line accepted from the server.
const REPLY_LINE_BYTES_LIMIT: usize = 16 * 1024 * 1024;
/// Failures kept for the report; past it they are only counted.
const KEPT_FAILURES_LIMIT: usize = 100_000;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Progress {
    /// A bar when stderr is a terminal (and not --quiet).
    Auto,
    /// Always report progress on stderr; on a non-terminal, as one plain line per update.
    Always,
    /// Never.
    Never,
}

#[derive(clap::Args)]
pub struct IngestArgs {
    /// NDJSON files (one document per line), text/Markdown files, or directories of them.
    #[arg(required = true, value_name = "FILE|DIR")]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    opts: UploadOptions,
}

/// What `ingest` and `import` share: where to, how, and how to report.
#[derive(clap::Args)]
pub struct UploadOptions {
    /// Library id or name.
    #[arg(long, short)]
    library: String,
    /// Send NDJSON files as requests of this many lines each (default: one request per file).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    batch_lines: Option<u64>,
    /// How many failures the human report lists (`--json` lists them all).
    #[arg(long, default_value_t = 20)]
    show_failures: usize,
    /// Progress reporting on stderr.
    #[arg(long, value_enum, env = "QUIVER_PROGRESS", default_value = "auto")]
    progress: Progress,
}

#[derive(clap::Args)]
pub struct ImportArgs {
    /// An NDJSON file, e.g. one written by `quiver export`.
    file: PathBuf,
    #[command(flatten)]
    opts: UploadOptions,
}

impl From<ImportArgs> for IngestArgs {
    fn from(a: ImportArgs) -> Self {
        IngestArgs {
            paths: vec![a.file],
            opts: a.opts,
        }
    }
}

// ------------------------------------------------------------------ what to send

struct TextFile {
    path: PathBuf,
    /// Path relative to the directory given (`/`-separated), or the file name.
    rel: String,
    /// The document id: `rel` made a valid id (see [`text_id`]).
    id: String,
    title: String,
    size: u64,
}

enum Source {
    Ndjson { path: PathBuf, size: u64 },
    Texts { files: Vec<TextFile> },
}

enum Kind {
    Ndjson,
    Text,
    Other,
}

fn kind_of(path: &Path) -> Kind {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("ndjson" | "jsonl") => Kind::Ndjson,
        Some("txt" | "md" | "markdown") => Kind::Text,
        _ => Kind::Other,
    }
}

/// A document id for a relative path. Ids are printable ASCII without `/`, `?` or `#`
/// (so they fit a URL path segment): path separators become `:`, and any byte outside that
/// set (space, non-ASCII, `?`, `#`) or that would be ambiguous (`%`, `:`) becomes `%XX`.
/// Lossless: two paths never share an id. The path itself goes into the document's metadata.
fn text_id(rel: &str) -> String {
    let mut out = String::with_capacity(rel.len());
    for (i, part) in rel.split('/').enumerate() {
        if i > 0 {
            out.push(':');
        }
        for b in part.bytes() {
            if b.is_ascii_graphic() && !matches!(b, b'?' | b'#' | b'%' | b':') {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The files `paths` stand for, and how many files in directories were skipped.
fn collect(paths: &[PathBuf]) -> Result<(Vec<Source>, usize)> {
    let mut ndjson: Vec<(PathBuf, u64)> = Vec::new();
    let mut texts: Vec<TextFile> = Vec::new();
    let mut skipped = 0usize;
    for p in paths {
        let meta = std::fs::metadata(p).with_context(|| format!("cannot read {}", p.display()))?;
        if meta.is_dir() {
            walk(p, p, &mut ndjson, &mut texts, &mut skipped)?;
        } else {
            match kind_of(p) {
                Kind::Text => texts.push(TextFile {
                    path: p.clone(),
                    rel: file_name(p),
                    id: text_id(&file_name(p)),
                    title: file_name(p),
                    size: meta.len(),
                }),
                // A file named explicitly is taken as NDJSON whatever its extension.
                Kind::Ndjson | Kind::Other => ndjson.push((p.clone(), meta.len())),
            }
        }
    }
    let mut sources: Vec<Source> = ndjson
        .into_iter()
        .map(|(path, size)| Source::Ndjson { path, size })
        .collect();
    if !texts.is_empty() {
        sources.push(Source::Texts { files: texts });
    }
    Ok((sources, skipped))
}

fn walk(
    root: &Path,
    dir: &Path,
    ndjson: &mut Vec<(PathBuf, u64)>,
    texts: &mut Vec<TextFile>,
    skipped: &mut usize,
) -> Result<()> {
    let mut entries: Vec<std::fs::DirEntry> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let ft = e
            .file_type()
            .with_context(|| format!("cannot read {}", path.display()))?;
        if ft.is_dir() {
            walk(root, &path, ndjson, texts, skipped)?;
            continue;
        }
        // Follow file symlinks, not directory ones (no cycles).
        let meta = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => m,
            _ => {
                *skipped += 1;
                continue;
            }
        };
        match kind_of(&path) {
            Kind::Ndjson => ndjson.push((path, meta.len())),
            Kind::Text => {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                let rel = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                texts.push(TextFile {
                    title: file_name(&path),
                    id: text_id(&rel),
                    rel,
                    path,
                    size: meta.len(),
                });
            }
            Kind::Other => *skipped += 1,
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ the report

#[derive(Clone)]
struct Failure {
    file: String,
    /// Line in the NDJSON file; `None` for a text file (one document per file).
    line: Option<u64>,
    document_id: Option<String>,
    error: String,
    detail: String,
}

impl Failure {
    fn to_json(&self) -> Value {
        json!({"file": self.file, "line": self.line, "document_id": self.document_id,
               "error": self.error, "detail": self.detail})
    }
}

struct FileReport {
    file: String,
    lines: u64,
    committed: u64,
    failed: u64,
}

#[derive(Default)]
struct Report {
    lines: u64,
    committed: u64,
    failed: u64,
    first_seq: Option<u64>,
    last_seq: Option<u64>,
    failures: Vec<Failure>,
    failures_not_kept: u64,
    files: Vec<FileReport>,
}

impl Report {
    fn fail(&mut self, f: Failure) {
        if self.failures.len() < KEPT_FAILURES_LIMIT {
            self.failures.push(f);
        } else {
            self.failures_not_kept += 1;
        }
    }
}

/// Counters shared with the progress bar's message.
struct Live {
    started: Instant,
    done: u64,
    failed: u64,
}

impl Live {
    fn message(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        format!(
            "{} docs ({:.0}/s), {} failed",
            self.done,
            self.done as f64 / secs,
            self.failed
        )
    }
}

// ------------------------------------------------------------------ progress

/// A progress target for stderr that is not a terminal: no cursor movement, one plain line
/// per redraw (at a low rate), so logs stay readable.
#[derive(Debug)]
struct PlainStderr;

impl indicatif::TermLike for PlainStderr {
    fn width(&self) -> u16 {
        100
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        if s.trim().is_empty() {
            return Ok(());
        }
        writeln!(std::io::stderr(), "{s}")
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.write_line(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn progress_bar(mode: Progress, quiet: bool, total: u64) -> ProgressBar {
    let target = match (mode, quiet) {
        (Progress::Never, _) | (Progress::Auto, true) => ProgressDrawTarget::hidden(),
        (Progress::Auto, false) if !std::io::stderr().is_terminal() => ProgressDrawTarget::hidden(),
        (Progress::Auto, false) => ProgressDrawTarget::stderr(),
        (Progress::Always, _) if std::io::stderr().is_terminal() => ProgressDrawTarget::stderr(),
        (Progress::Always, _) => ProgressDrawTarget::term_like_with_hz(Box::new(PlainStderr), 2),
    };
    let pb = ProgressBar::with_draw_target(Some(total), target);
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {msg} ETA {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb.enable_steady_tick(Duration::from_millis(250));
    pb
}

// ------------------------------------------------------------------ request bodies

/// The first error hit while producing a request body (reqwest only learns that the body
/// failed, not why), so the user gets the real cause.
type ErrSlot = Arc<Mutex<Option<String>>>;

fn note(slot: &ErrSlot, msg: String) {
    if let Ok(mut s) = slot.lock() {
        s.get_or_insert(msg);
    }
}

fn taken(slot: &ErrSlot) -> Option<String> {
    slot.lock().ok().and_then(|mut s| s.take())
}

/// An NDJSON file being sent, possibly over several requests.
struct Feed {
    reader: BufReader<tokio::fs::File>,
    eof: bool,
    /// Whole lines sent so far (counting a last line without a newline).
    lines: u64,
}

/// Reads the next piece of body. `remaining`: lines this request may still take (`None`:
/// the whole file in one request, so lines need not be counted).
async fn next_piece(f: &mut Feed, remaining: &mut Option<u64>) -> std::io::Result<Option<Vec<u8>>> {
    if f.eof {
        return Ok(None);
    }
    let Some(rem) = remaining else {
        let mut buf = vec![0u8; PIECE_BYTES];
        let n = f.reader.read(&mut buf).await?;
        if n == 0 {
            f.eof = true;
            return Ok(None);
        }
        buf.truncate(n);
        return Ok(Some(buf));
    };
    let mut out = Vec::new();
    while *rem > 0 && out.len() < PIECE_BYTES {
        let avail = f.reader.fill_buf().await?;
        if avail.is_empty() {
            if out.last().is_some_and(|&b| b != b'\n') {
                f.lines += 1; // a last line without a newline still counts
            }
            f.eof = true;
            break;
        }
        let take = (PIECE_BYTES - out.len()).min(avail.len());
        match avail[..take].iter().position(|&b| b == b'\n') {
            Some(i) => {
                out.extend_from_slice(&avail[..=i]);
                f.reader.consume(i + 1);
                f.lines += 1;
                *rem -= 1;
            }
            None => {
                out.extend_from_slice(&avail[..take]);
                f.reader.consume(take);
            }
        }
    }
    if *rem == 0 && !f.eof && f.reader.fill_buf().await?.is_empty() {
        f.eof = true;
    }
    Ok(if out.is_empty() { None } else { Some(out) })
}

fn feed_body(
    feed: Arc<tokio::sync::Mutex<Feed>>,
    batch_lines: Option<u64>,
    pb: ProgressBar,
    err: ErrSlot,
    label: String,
) -> reqwest::Body {
    let stream = futures::stream::unfold(
        (feed, batch_lines, false),
        move |(feed, mut remaining, failed)| {
            let pb = pb.clone();
            let err = err.clone();
            let label = label.clone();
            async move {
                if failed {
                    return None;
                }
                let piece = {
                    let mut f = feed.lock().await;
                    next_piece(&mut f, &mut remaining).await
                };
                match piece {
                    Ok(Some(bytes)) => {
                        pb.inc(bytes.len() as u64);
                        Some((Ok(bytes), (feed, remaining, false)))
                    }
                    Ok(None) => None,
                    Err(e) => {
                        note(&err, format!("reading {label} failed: {e}"));
                        Some((Err(e), (feed, remaining, true)))
                    }
                }
            }
        },
    );
    reqwest::Body::wrap_stream(stream)
}

/// Which text file (relative path, document id) each line of a text request is.
type SentTexts = Arc<Mutex<Vec<(String, String)>>>;

/// Text files as NDJSON lines, one document each, produced one file at a time. `sent`
/// records which file each line is (for the report); files that cannot be read are skipped
/// and reported in `local`.
fn texts_body(
    files: Vec<TextFile>,
    pb: ProgressBar,
    sent: SentTexts,
    local: Arc<Mutex<Vec<Failure>>>,
) -> reqwest::Body {
    let stream = futures::stream::unfold(files.into_iter(), move |mut it| {
        let pb = pb.clone();
        let sent = sent.clone();
        let local = local.clone();
        async move {
            for f in it.by_ref() {
                let failure = |error: &str, detail: String| Failure {
                    file: f.rel.clone(),
                    line: None,
                    document_id: Some(f.id.clone()),
                    error: error.to_string(),
                    detail,
                };
                let bytes = match tokio::fs::read(&f.path).await {
                    Ok(b) => b,
                    Err(e) => {
                        pb.inc(f.size);
                        if let Ok(mut l) = local.lock() {
                            l.push(failure(
                                "unreadable_file",
                                format!("cannot read {}: {e}", f.path.display()),
                            ));
                        }
                        continue;
                    }
                };
                let text = String::from_utf8_lossy(&bytes);
                let doc = json!({"id": f.id, "title": f.title, "metadata": {"path": f.rel},
                                 "texts": chunk_text(&text, CHUNK_CHARS)});
                let mut line = match serde_json::to_vec(&doc) {
                    Ok(l) => l,
                    Err(e) => {
                        if let Ok(mut l) = local.lock() {
                            l.push(failure("unencodable_file", e.to_string()));
                        }
                        continue;
                    }
                };
                line.push(b'\n');
                if let Ok(mut s) = sent.lock() {
                    s.push((f.rel.clone(), f.id.clone()));
                }
                pb.inc(f.size);
                return Some((Ok::<_, std::io::Error>(line), it));
            }
            None
        }
    });
    reqwest::Body::wrap_stream(stream)
}

// ------------------------------------------------------------------ one request

/// Where reply line `n` of a request came from.
enum LineMap {
    /// An NDJSON file; the request started after `offset` lines of it.
    File { name: String, offset: u64 },
    /// Text files; line `n` is `sent[n - 1]`.
    Texts(SentTexts),
}

impl LineMap {
    /// (file, line in it, document id if known without the server's help).
    fn locate(&self, n: u64) -> (String, Option<u64>, Option<String>) {
        match self {
            LineMap::File { name, offset } => (name.clone(), Some(offset + n), None),
            LineMap::Texts(sent) => {
                let found = sent
                    .lock()
                    .ok()
                    .and_then(|s| s.get((n as usize).wrapping_sub(1)).cloned());
                match found {
                    Some((rel, id)) => (rel, None, Some(id)),
                    None => (format!("text document #{n}"), None, None),
                }
            }
        }
    }
}

struct Summary {
    lines: u64,
    committed: u64,
    failed: u64,
    first_seq: Option<u64>,
    last_seq: Option<u64>,
}

/// One run of the command: where it sends, and what it has learnt so far.
struct Run<'a> {
    client: &'a Client,
    library_id: &'a str,
    pb: &'a ProgressBar,
    report: Report,
    live: Live,
}

impl Run<'_> {
    /// Sends one streamed ingest request and folds its replies into the report.
    async fn send_one(
        &mut self,
        body: reqwest::Body,
        map: &LineMap,
        body_err: &ErrSlot,
    ) -> Result<Summary> {
        let (client, library_id, pb) = (self.client, self.library_id, self.pb);
        let (report, live) = (&mut self.report, &mut self.live);
        let rb = client
            .request(
                Method::POST,
                &["v1", "libraries", library_id, "documents", "stream"],
            )?
            .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
            .body(body);
        let resp = match client.send(rb).await {
            Ok(r) => r,
            Err(e) => {
                return Err(match taken(body_err) {
                    Some(cause) => anyhow!(cause),
                    None => e,
                })
            }
        };
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut summary: Option<Value> = None;
        let mut acknowledged = 0u64;
        loop {
            let chunk = match stream.next().await {
                None => break,
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    let cause =
                        taken(body_err).unwrap_or_else(|| client.transport_error(e).to_string());
                    bail!(
                        "the ingest stream broke after {acknowledged} acknowledged lines: {cause}"
                    );
                }
            };
            buf.extend_from_slice(&chunk);
            let mut start = 0usize;
            while let Some(i) = buf[start..].iter().position(|&b| b == b'\n') {
                let line = &buf[start..start + i];
                start += i + 1;
                if let Some(s) = reply_line(line, map, report, live)? {
                    summary = Some(s);
                } else {
                    acknowledged += 1;
                }
            }
            buf.drain(..start);
            if buf.len() > REPLY_LINE_BYTES_LIMIT {
                bail!("the server sent a reply line longer than {REPLY_LINE_BYTES_LIMIT} bytes");
            }
            pb.set_message(live.message());
        }
        if !buf.is_empty() {
            if let Some(s) = reply_line(&buf, map, report, live)? {
                summary = Some(s);
            }
        }
        if let Some(cause) = taken(body_err) {
            bail!("{cause} (after {acknowledged} acknowledged lines)");
        }
        let Some(s) = summary else {
            bail!("the server ended the ingest stream without a summary, after {acknowledged} acknowledged lines");
        };
        if let Some(e) = s.get("error").and_then(|e| e.as_str()) {
            bail!("the server stopped the ingest after {acknowledged} acknowledged lines: {e}");
        }
        Ok(Summary {
            lines: s["lines"].as_u64().unwrap_or(0),
            committed: s["committed"].as_u64().unwrap_or(0),
            failed: s["failed"].as_u64().unwrap_or(0),
            first_seq: s["first_seq"].as_u64(),
            last_seq: s["last_seq"].as_u64(),
        })
    }
}

/// Handles one reply line; returns the summary object if it was the summary.
fn reply_line(
    line: &[u8],
    map: &LineMap,
    report: &mut Report,
    live: &mut Live,
) -> Result<Option<Value>> {
    if line.trim_ascii().is_empty() {
        return Ok(None);
    }
    let v: Value = serde_json::from_slice(line).with_context(|| {
        format!(
            "the server sent a reply line that is not JSON: {}",
            truncate(&String::from_utf8_lossy(line), 200)
        )
    })?;
    if let Some(s) = v.get("summary") {
        return Ok(Some(s.clone()));
    }
    live.done += 1;
    if v["ok"].as_bool() == Some(true) {
        return Ok(None);
    }
    live.failed += 1;
    let n = v["line"].as_u64().unwrap_or(0);
    let (file, line_no, id) = map.locate(n);
    let document_id = v["document_id"].as_str().map(str::to_string).or(id);
    report.fail(Failure {
        file,
        line: line_no,
        document_id,
        error: v["error"].as_str().unwrap_or("unknown").to_string(),
        detail: v["detail"].as_str().unwrap_or("").to_string(),
    });
    Ok(None)
}

// ------------------------------------------------------------------ the command

pub async fn run(client: &Client, args: IngestArgs) -> Result<ExitCode> {
    let (sources, skipped) = collect(&args.paths)?;
    if sources.is_empty() {
        bail!(
            "nothing to ingest in {}: no .ndjson, .jsonl, .txt or .md files",
            args.paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // Resolve the library first: a clean "unknown library" error, and a stable id for every
    // request even if the library is renamed meanwhile.
    let lib = client
        .get_json(&["v1", "libraries", &args.opts.library])
        .await?;
    let library_id = lib["id"]
        .as_str()
        .ok_or_else(|| {
            anyhow!(
                "the server's answer for library {} has no id",
                args.opts.library
            )
        })?
        .to_string();
    let library_name = lib["name"]
        .as_str()
        .unwrap_or(&args.opts.library)
        .to_string();

    let total: u64 = sources
        .iter()
        .map(|s| match s {
            Source::Ndjson { size, .. } => *size,
            Source::Texts { files } => files.iter().map(|f| f.size).sum(),
        })
        .sum();
    let pb = progress_bar(args.opts.progress, client.quiet, total);
    let started = Instant::now();
    let mut run = Run {
        client,
        library_id: &library_id,
        pb: &pb,
        report: Report::default(),
        live: Live {
            started,
            done: 0,
            failed: 0,
        },
    };
    let outcome = run.ingest_all(sources, args.opts.batch_lines).await;
    pb.finish_and_clear();
    outcome?;
    let report = run.report;
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;

    if client.json {
        let mut v = json!({
            "library": {"id": library_id, "name": library_name},
            "summary": {"lines": report.lines, "committed": report.committed, "failed": report.failed,
                        "first_seq": report.first_seq, "last_seq": report.last_seq,
                        "duration_ms": duration_ms},
            "files": report.files.iter().map(|f| json!({"file": f.file, "lines": f.lines,
                        "committed": f.committed, "failed": f.failed})).collect::<Vec<_>>(),
            "failures": report.failures.iter().map(Failure::to_json).collect::<Vec<_>>(),
            "skipped_files": skipped,
        });
        if report.failures_not_kept > 0 {
            v["failures_not_listed"] = json!(report.failures_not_kept);
        }
        print_json(&v)?;
    } else {
        print_report(
            &report,
            &library_name,
            duration_ms,
            skipped,
            args.opts.show_failures,
        )?;
    }
    Ok(if report.failed > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

impl Run<'_> {
    async fn ingest_all(&mut self, sources: Vec<Source>, batch_lines: Option<u64>) -> Result<()> {
        let pb = self.pb;
        for source in sources {
            match source {
                Source::Ndjson { path, .. } => {
                    let name = path.display().to_string();
                    let file = tokio::fs::File::open(&path)
                        .await
                        .with_context(|| format!("cannot open {name}"))?;
                    let feed = Arc::new(tokio::sync::Mutex::new(Feed {
                        reader: BufReader::with_capacity(PIECE_BYTES, file),
                        eof: false,
                        lines: 0,
                    }));
                    let mut fr = FileReport {
                        file: name.clone(),
                        lines: 0,
                        committed: 0,
                        failed: 0,
                    };
                    loop {
                        let offset = feed.lock().await.lines;
                        let err: ErrSlot = Arc::default();
                        let body = feed_body(
                            feed.clone(),
                            batch_lines,
                            pb.clone(),
                            err.clone(),
                            name.clone(),
                        );
                        let map = LineMap::File {
                            name: name.clone(),
                            offset,
                        };
                        let s = self
                            .send_one(body, &map, &err)
                            .await
                            .with_context(|| format!("ingesting {name}"))?;
                        add(&mut self.report, &mut fr, &s);
                        if batch_lines.is_none() || feed.lock().await.eof {
                            break;
                        }
                    }
                    self.report.files.push(fr);
                }
                Source::Texts { files } => {
                    let sent: SentTexts = Arc::default();
                    let local: Arc<Mutex<Vec<Failure>>> = Arc::default();
                    let body = texts_body(files, pb.clone(), sent.clone(), local.clone());
                    let map = LineMap::Texts(sent);
                    let err: ErrSlot = Arc::default();
                    let s = self
                        .send_one(body, &map, &err)
                        .await
                        .context("ingesting text files")?;
                    let mut fr = FileReport {
                        file: "(text files)".to_string(),
                        lines: 0,
                        committed: 0,
                        failed: 0,
                    };
                    let report = &mut self.report;
                    add(report, &mut fr, &s);
                    let local = local.lock().map(|l| l.clone()).unwrap_or_default();
                    for f in local {
                        report.lines += 1;
                        report.failed += 1;
                        fr.lines += 1;
                        fr.failed += 1;
                        report.fail(f);
                    }
                    report.files.push(fr);
                }
            }
        }
        Ok(())
    }
}

fn add(report: &mut Report, fr: &mut FileReport, s: &Summary) {
    report.lines += s.lines;
    report.committed += s.committed;
    report.failed += s.failed;
    fr.lines += s.lines;
    fr.committed += s.committed;
    fr.failed += s.failed;
    if report.first_seq.is_none() {
        report.first_seq = s.first_seq;
    }
    if s.last_seq.is_some() {
        report.last_seq = s.last_seq;
    }
}

fn print_report(
    r: &Report,
    library: &str,
    duration_ms: f64,
    skipped: usize,
    show: usize,
) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let seqs = match (r.first_seq, r.last_seq) {
        (Some(a), Some(b)) => format!(", seq {a}..{b}"),
        _ => String::new(),
    };
    writeln!(
        out,
        "ingested into {library}: {} committed, {} failed ({} lines{seqs}) in {:.1}s",
        r.committed,
        r.failed,
        r.lines,
        duration_ms / 1000.0
    )?;
    if skipped > 0 {
        writeln!(
            out,
            "skipped {skipped} files that are not .ndjson, .jsonl, .txt or .md"
        )?;
    }
    if r.failed > 0 {
        let listed = r.failures.len().min(show);
        writeln!(out, "failures (first {listed} of {}):", r.failed)?;
        for f in r.failures.iter().take(show) {
            let place = match f.line {
                Some(n) => format!("{}:{n}", f.file),
                None => f.file.clone(),
            };
            writeln!(out, "  {place}: {} ({})", truncate(&f.detail, 200), f.error)?;
        }
        if r.failed as usize > listed {
            writeln!(
                out,
                "  … and {} more (--json lists them all)",
                r.failed as usize - listed
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pieces(content: &[u8], batch: Option<u64>) -> Vec<(Vec<u8>, u64)> {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f.ndjson");
        std::fs::write(&p, content).expect("write");
        let file = tokio::fs::File::open(&p).await.expect("open");
        let mut f = Feed {
            reader: BufReader::with_capacity(16, file),
            eof: false,
            lines: 0,
        };
        let mut out = Vec::new();
        while !f.eof {
            let mut rem = batch;
            let mut req = Vec::new();
            while let Some(b) = next_piece(&mut f, &mut rem).await.expect("read") {
                req.extend(b);
            }
            out.push((req, f.lines));
            if batch.is_none() {
                break;
            }
        }
        out
    }

    #[test]
    fn text_ids_are_valid_and_distinct() {
        assert_eq!(text_id("sub/b.txt"), "sub:b.txt");
        assert_eq!(text_id("a b?#%:é.md"), "a%20b%3F%23%25%3A%C3%A9.md");
        assert_ne!(text_id("a:b"), text_id("a/b"));
    }

    #[tokio::test]
    async fn batches_cut_at_line_ends() {
        let content = b"{\"a\":1}\n{\"b\":22222222222222222222}\n\n{\"c\":3}";
        let whole = pieces(content, None).await;
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0].0, content.to_vec());
        let b = pieces(content, Some(2)).await;
        let reqs: Vec<&[u8]> = b.iter().map(|(r, _)| r.as_slice()).collect();
        assert_eq!(
            reqs,
            vec![
                &b"{\"a\":1}\n{\"b\":22222222222222222222}\n"[..],
                &b"\n{\"c\":3}"[..]
            ]
        );
        assert_eq!(b.last().map(|x| x.1), Some(4));
        // Exactly N lines at the end: no empty trailing request.
        let b = pieces(b"1\n2\n", Some(2)).await;
        assert_eq!(b.len(), 1);
    }
}
