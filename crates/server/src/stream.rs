//! Streaming NDJSON routes: ingest (one document per line in, one status line per line out),
//! export (every document of a library at one `seq`, re-importable), and streamed search.
//!
//! Ingest reads the body incrementally through a pipeline — read lines → parse → commit (in
//! line order) → wait for durability and reply — whose stages overlap (the next group parses
//! while this one commits and fsyncs) and are joined by bounded channels
//! ([`PIPELINE_GROUPS_LIMIT`] groups each; a group is at most [`BATCH_LINES_LIMIT`] lines and
//! [`BATCH_BYTES_LIMIT`] bytes, a line at most [`LINE_BYTES_LIMIT`]). Replies go through a
//! bounded channel too, so a client that stops reading replies stops the server reading its
//! body (backpressure), never growing a buffer. A bad line costs only itself. Groups are
//! committed through the same engine path as the batch route, so a client-chosen id makes a
//! retried upload idempotent.

use crate::error::{ApiError, ApiResult};
use crate::extract::{parse_json, ApiBytes, Ctx};
use crate::render;
use crate::slots::Slots;
use crate::AppState;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use quiver_engine::input::{export_line, DocumentInput, SearchInput};
use quiver_engine::{EngineError, ItemOutcome, WriteCtx};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest NDJSON line, in bytes.
pub const LINE_BYTES_LIMIT: usize = 16 * 1024 * 1024;
/// Most lines committed in one group.
pub const BATCH_LINES_LIMIT: usize = 512;
/// Most line bytes held for one group.
pub const BATCH_BYTES_LIMIT: usize = 4 * 1024 * 1024;
/// Reply chunks buffered before the server stops reading the request.
pub const REPLY_CHUNKS_LIMIT: usize = 8;
/// When the body pauses this long, the lines in hand are committed without waiting for more.
/// (Document ingest trades this much latency for bigger groups; event publishing, where each
/// line is usually one publisher's only one in flight, flushes as soon as the body pauses.)
pub(crate) const IDLE_FLUSH: Duration = Duration::from_millis(5);
/// Most NDJSON uploads in progress at once (the handler returns before the upload ends, so
/// the request concurrency limit does not bound them).
pub const INGEST_STREAMS_LIMIT: usize = 64;
static INGEST_STREAMS: Slots = Slots::new(INGEST_STREAMS_LIMIT);
/// Largest `k` for streamed search.
pub const STREAM_K_LIMIT: usize = 10_000;

pub(crate) const NDJSON: &str = "application/x-ndjson";

fn ndjson(body: Body) -> Response {
    let mut r = Response::new(body);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    r
}

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

struct Totals {
    lines: u64,
    committed: u64,
    failed: u64,
    first_seq: Option<u64>,
    last_seq: Option<u64>,
}

/// One pending line: its number and either its parsed document or its error.
type Pending = (u64, Result<DocumentInput, EngineError>);

/// A raw line as read from the body: its bytes, or the fact that it was too long to keep.
pub(crate) enum RawLine {
    Text(Bytes),
    TooLong,
}

/// Groups in flight between two pipeline stages (read → parse → commit → reply). Each stage
/// owns one core's worth of work, so parsing the next group overlaps committing this one and
/// waiting for its fsync; the bounds keep memory flat and carry backpressure back to the body.
const PIPELINE_GROUPS_LIMIT: usize = 2;

pub async fn ingest(
    State(s): State<AppState>,
    Ctx(ctx): Ctx,
    Path(lib): Path<String>,
    body: Body,
) -> ApiResult<Response> {
    let (info, _) = s.engine.library(&lib)?;
    let library_id = info.library.id.clone();
    let slot = INGEST_STREAMS.try_acquire().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_uploads",
            format!("{INGEST_STREAMS_LIMIT} NDJSON uploads are already in progress; retry shortly"),
        )
    })?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(REPLY_CHUNKS_LIMIT);
    let engine = s.engine.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let started = Instant::now();
        let start = engine.append_system_event(
            &ctx,
            "batch.started",
            Some(library_id.clone()),
            json!({"library_id": library_id, "source": "ndjson"}),
        );
        if let Ok(c) = &start {
            let _ = engine.wait_durable(c.seq).await;
        }
        let (outcome, totals) = pipeline(&engine, &ctx, &library_id, body, &tx).await;
        let (event, error) = match &outcome {
            Ok(()) => ("batch.completed", None),
            Err(e) => ("batch.failed", Some(e.clone())),
        };
        let data = json!({"library_id": library_id, "lines": totals.lines, "committed": totals.committed,
                          "failed": totals.failed, "first_seq": totals.first_seq, "last_seq": totals.last_seq,
                          "error": error});
        if let Ok(c) = engine.append_system_event(&ctx, event, Some(library_id.clone()), data) {
            let _ = engine.wait_durable(c.seq).await;
        }
        let mut summary = json!({"summary": {
            "lines": totals.lines, "committed": totals.committed, "failed": totals.failed,
            "first_seq": totals.first_seq, "last_seq": totals.last_seq,
            "duration_ms": started.elapsed().as_secs_f64() * 1000.0,
        }});
        if let Some(e) = error {
            summary["summary"]["error"] = json!(e);
        }
        let _ = tx.send(line(&summary)).await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    Ok(ndjson(Body::from_stream(stream)))
}

/// Runs the ingest pipeline to the end of the body: read lines (here) → parse (blocking pool)
/// → commit in order (blocking pool) → wait for durability and reply (a task). Returns Err
/// only when the body itself fails or the client stops reading replies.
async fn pipeline(
    engine: &Arc<quiver_engine::Engine>,
    ctx: &WriteCtx,
    library_id: &str,
    body: Body,
    tx: &tokio::sync::mpsc::Sender<Bytes>,
) -> (Result<(), String>, Totals) {
    use tokio::sync::mpsc::channel;
    let (raw_tx, mut raw_rx) = channel::<Vec<(u64, RawLine)>>(PIPELINE_GROUPS_LIMIT);
    let (parsed_tx, mut parsed_rx) = channel::<Vec<Pending>>(PIPELINE_GROUPS_LIMIT);
    let (done_tx, mut done_rx) = channel::<(
        Vec<u64>,
        Result<quiver_engine::Committed<Vec<ItemOutcome>>, EngineError>,
    )>(PIPELINE_GROUPS_LIMIT);

    let parse_stage = tokio::spawn(async move {
        while let Some(group) = raw_rx.recv().await {
            let Ok(parsed) = tokio::task::spawn_blocking(move || parse_group(group)).await else {
                return;
            };
            if parsed_tx.send(parsed).await.is_err() {
                return;
            }
        }
    });
    let commit_stage = {
        let engine = engine.clone();
        let ctx = ctx.clone();
        let lib = library_id.to_string();
        tokio::spawn(async move {
            while let Some(group) = parsed_rx.recv().await {
                let (numbers, items): (Vec<u64>, Vec<_>) = group.into_iter().unzip();
                let (engine, ctx, lib) = (engine.clone(), ctx.clone(), lib.clone());
                // Groups commit one after another, in line order (a later line for the same
                // id must win), while the next group is parsed.
                let Ok(result) =
                    tokio::task::spawn_blocking(move || engine.upsert_documents(&ctx, &lib, items))
                        .await
                else {
                    return;
                };
                if done_tx.send((numbers, result)).await.is_err() {
                    return;
                }
            }
        })
    };
    let reply_stage = {
        let engine = engine.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut totals = Totals {
                lines: 0,
                committed: 0,
                failed: 0,
                first_seq: None,
                last_seq: None,
            };
            while let Some((numbers, result)) = done_rx.recv().await {
                let out = match result {
                    Ok(c) => {
                        if engine.wait_durable(c.seq).await.is_err() {
                            return (Err("the log failed".to_string()), totals);
                        }
                        reply_lines(&numbers, Ok(c.value), &mut totals)
                    }
                    Err(e) => reply_lines(&numbers, Err(e), &mut totals),
                };
                if tx.send(out).await.is_err() {
                    return (
                        Err("the client stopped reading replies".to_string()),
                        totals,
                    );
                }
            }
            (Ok(()), totals)
        })
    };

    let read = read_lines(body, &raw_tx, IDLE_FLUSH).await;
    drop(raw_tx);
    let _ = parse_stage.await;
    let _ = commit_stage.await;
    let (replied, totals) = reply_stage.await.unwrap_or_else(|e| {
        (
            Err(format!("ingest reply task failed: {e}")),
            Totals {
                lines: 0,
                committed: 0,
                failed: 0,
                first_seq: None,
                last_seq: None,
            },
        )
    });
    (read.and(replied), totals)
}

/// Splits the body into lines and sends them on in groups (at most [`BATCH_LINES_LIMIT`]
/// lines or [`BATCH_BYTES_LIMIT`] bytes; a group also goes when the body pauses for
/// `idle_flush`, or, when that is zero, as soon as no more of the body is at hand).
pub(crate) async fn read_lines(
    body: Body,
    raw_tx: &tokio::sync::mpsc::Sender<Vec<(u64, RawLine)>>,
    idle_flush: Duration,
) -> Result<(), String> {
    let mut stream = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut skipping_long_line = false;
    let mut group: Vec<(u64, RawLine)> = Vec::new();
    let mut group_bytes = 0usize;
    let mut line_no: u64 = 0;
    let mut ended = false;
    let send = |group: Vec<(u64, RawLine)>| async move {
        raw_tx
            .send(group)
            .await
            .map_err(|_| "the ingest pipeline stopped".to_string())
    };
    while !ended {
        let next = if group.is_empty() {
            stream.next().await
        } else if idle_flush.is_zero() {
            // Only what is already here: a zero timeout would still wait for the timer's next
            // tick (up to 1 ms), which every pipelined publisher's acknowledgement would pay.
            match futures::FutureExt::now_or_never(stream.next()) {
                Some(n) => n,
                None => {
                    send(std::mem::take(&mut group)).await?;
                    group_bytes = 0;
                    continue;
                }
            }
        } else {
            match tokio::time::timeout(idle_flush, stream.next()).await {
                Ok(n) => n,
                Err(_) => {
                    send(std::mem::take(&mut group)).await?;
                    group_bytes = 0;
                    continue;
                }
            }
        };
        let chunk = match next {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(format!("reading the request body failed: {e}")),
            None => {
                ended = true;
                Bytes::new()
            }
        };
        let mut start = 0usize;
        loop {
            let nl = memchr::memchr(b'\n', &chunk[start..]).map(|i| start + i);
            let end = nl.unwrap_or(chunk.len());
            let complete = nl.is_some() || (ended && !buf.is_empty());
            // A line wholly inside this chunk is a zero-copy slice of it; only a line that
            // spans chunks is assembled in `buf`.
            let text = if !skipping_long_line && buf.is_empty() && nl.is_some() {
                if end - start > LINE_BYTES_LIMIT {
                    skipping_long_line = true;
                    Bytes::new()
                } else {
                    chunk.slice(start..end)
                }
            } else {
                if !skipping_long_line {
                    if buf.len() + (end - start) > LINE_BYTES_LIMIT {
                        skipping_long_line = true;
                        buf = Vec::new();
                    } else {
                        buf.extend_from_slice(&chunk[start..end]);
                    }
                }
                if !complete {
                    break;
                }
                Bytes::from(std::mem::take(&mut buf))
            };
            line_no += 1;
            if skipping_long_line {
                skipping_long_line = false;
                group.push((line_no, RawLine::TooLong));
            } else if !text.trim_ascii().is_empty() {
                group_bytes += text.len();
                group.push((line_no, RawLine::Text(text)));
            }
            if group.len() >= BATCH_LINES_LIMIT || group_bytes >= BATCH_BYTES_LIMIT {
                send(std::mem::take(&mut group)).await?;
                group_bytes = 0;
            }
            match nl {
                Some(i) => start = i + 1,
                None => break,
            }
        }
    }
    if !group.is_empty() {
        send(group).await?;
    }
    Ok(())
}

fn parse_group(group: Vec<(u64, RawLine)>) -> Vec<Pending> {
    group
        .into_iter()
        .filter_map(|(n, raw)| match raw {
            RawLine::TooLong => Some((
                n,
                Err(EngineError::Invalid(
                    quiver_model::validate::Invalid::too_large(
                        "line_too_long",
                        format!("line is longer than {LINE_BYTES_LIMIT} bytes"),
                    ),
                )),
            )),
            RawLine::Text(text) => parse_line(&text).map(|item| (n, item)),
        })
        .collect()
}

/// Parses one line; `None` for blank lines and export headers (which carry no document).
fn parse_line(text: &[u8]) -> Option<Result<DocumentInput, EngineError>> {
    let trimmed = text.trim_ascii();
    if trimmed.is_empty() {
        return None;
    }
    if trimmed.starts_with(b"{\"quiver_export\"") {
        return None;
    }
    // Straight into the document type: no intermediate `Value` tree.
    Some(
        serde_json::from_slice::<DocumentInput>(trimmed).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => EngineError::invalid("invalid_document", e.to_string()),
                _ => EngineError::invalid("malformed_json", e.to_string()),
            }
        }),
    )
}

/// One status line (a typed struct: no map allocation per key and line).
#[derive(serde::Serialize)]
struct StatusLine<'a> {
    line: u64,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    document_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
}

fn push_line(out: &mut Vec<u8>, l: &StatusLine) {
    // Serialising plain fields into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, l);
    out.push(b'\n');
}

/// The status lines of one committed group (or of a group that failed whole, e.g. because
/// the library was deleted mid-stream).
fn reply_lines(
    numbers: &[u64],
    result: Result<Vec<ItemOutcome>, EngineError>,
    totals: &mut Totals,
) -> Bytes {
    let mut out = Vec::with_capacity(numbers.len() * 80);
    let failed = |line: u64, code: &str, detail: &str, out: &mut Vec<u8>| {
        let l = StatusLine {
            line,
            ok: false,
            document_id: None,
            created: None,
            seq: None,
            error: Some(code),
            detail: Some(detail),
        };
        push_line(out, &l);
    };
    match result {
        Ok(outcomes) => {
            for (&n, o) in numbers.iter().zip(&outcomes) {
                totals.lines += 1;
                match o {
                    ItemOutcome::Committed {
                        document_id,
                        created,
                        seq,
                        ..
                    } => {
                        totals.committed += 1;
                        totals.first_seq.get_or_insert(*seq);
                        totals.last_seq = Some(*seq);
                        let l = StatusLine {
                            line: n,
                            ok: true,
                            document_id: Some(document_id),
                            created: Some(*created),
                            seq: Some(*seq),
                            error: None,
                            detail: None,
                        };
                        push_line(&mut out, &l);
                    }
                    ItemOutcome::Failed(e) => {
                        totals.failed += 1;
                        let (_, code, detail) = ApiError::parts(e);
                        failed(n, &code, &detail, &mut out);
                    }
                }
            }
        }
        Err(e) => {
            let (_, code, detail) = ApiError::parts(&e);
            for &n in numbers {
                totals.lines += 1;
                totals.failed += 1;
                failed(n, &code, &detail, &mut out);
            }
        }
    }
    Bytes::from(out)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportParams {
    #[serde(default = "yes")]
    include_embeddings: bool,
}

fn yes() -> bool {
    true
}

/// Streams every document of a library as it stood at one `seq` (first line), in the shape
/// the ingest route reads: export → ingest into another library reproduces it.
pub async fn export(
    State(s): State<AppState>,
    Path(lib): Path<String>,
    Query(p): Query<ExportParams>,
) -> ApiResult<Response> {
    let (info, docs, seq) = s.engine.export(&lib)?;
    let header = json!({"quiver_export": {"version": 1, "seq": seq, "documents": docs.len(), "library": render::library(&info)}});
    let include = p.include_embeddings;
    let first = futures::stream::once(async move { Ok::<_, std::io::Error>(line(&header)) });
    let rest = futures::stream::iter(docs).map(move |d| Ok(line(&export_line(&d, include))));
    let mut resp = ndjson(Body::from_stream(first.chain(rest)));
    resp.headers_mut()
        .insert(crate::routes::SEQ_HEADER, HeaderValue::from(seq));
    Ok(resp)
}

/// Search results as NDJSON lines in rank order (k up to [`STREAM_K_LIMIT`]), then a summary.
pub async fn search(
    State(s): State<AppState>,
    Path(lib): Path<String>,
    ApiBytes(body): ApiBytes,
) -> ApiResult<Response> {
    let req: SearchInput = parse_json(&body)?;
    let t = Instant::now();
    let engine = s.engine.clone();
    let include = req.include_embeddings;
    let (hits, seq) =
        tokio::task::spawn_blocking(move || engine.search_limited(&lib, &req, STREAM_K_LIMIT))
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })??;
    let summary = json!({"summary": {"total_results": hits.len(), "seq": seq,
                                     "query_time_ms": t.elapsed().as_secs_f64() * 1000.0}});
    let lines = futures::stream::iter(hits.into_iter().enumerate()).map(move |(rank, h)| {
        let mut v = render::hit(&h, include);
        v["rank"] = json!(rank + 1);
        Ok::<_, std::io::Error>(line(&v))
    });
    let tail = futures::stream::once(async move { Ok(line(&summary)) });
    let mut resp = ndjson(Body::from_stream(lines.chain(tail)));
    resp.headers_mut()
        .insert(crate::routes::SEQ_HEADER, HeaderValue::from(seq));
    Ok(resp.into_response())
}
