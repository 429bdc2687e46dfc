//! Streaming NDJSON routes: ingest (one document per line in, one status line per line out),
//! export (every document of a library at one `seq`, re-importable), and streamed search.
//!
//! Ingest reads the body incrementally and never holds more than one batch of lines plus one
//! line in progress ([`LINE_BYTES_LIMIT`], [`BATCH_LINES_LIMIT`], [`BATCH_BYTES_LIMIT`]); its
//! replies go through a bounded channel, so a client that stops reading replies stops the
//! server reading its body (backpressure), never growing a buffer. A bad line costs only
//! itself. Batches are committed through the same engine path as the batch route, so a
//! client-chosen id makes a retried upload idempotent.

use crate::error::{ApiError, ApiResult};
use crate::extract::{parse_json, ApiBytes, Ctx};
use crate::render;
use crate::AppState;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use quiver_engine::input::{DocumentInput, SearchInput};
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
pub const BATCH_BYTES_LIMIT: usize = 16 * 1024 * 1024;
/// Reply chunks buffered before the server stops reading the request.
pub const REPLY_CHUNKS_LIMIT: usize = 8;
/// When the body pauses this long, the lines in hand are committed without waiting for more.
const IDLE_FLUSH: Duration = Duration::from_millis(5);
/// Largest `k` for streamed search.
pub const STREAM_K_LIMIT: usize = 10_000;

const NDJSON: &str = "application/x-ndjson";

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

pub async fn ingest(
    State(s): State<AppState>,
    Ctx(ctx): Ctx,
    Path(lib): Path<String>,
    body: Body,
) -> ApiResult<Response> {
    let (info, _) = s.engine.library(&lib)?;
    let library_id = info.library.id.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(REPLY_CHUNKS_LIMIT);
    let engine = s.engine.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let mut totals = Totals {
            lines: 0,
            committed: 0,
            failed: 0,
            first_seq: None,
            last_seq: None,
        };
        let start = engine.append_system_event(
            &ctx,
            "batch.started",
            Some(library_id.clone()),
            json!({"library_id": library_id, "source": "ndjson"}),
        );
        if let Ok(c) = &start {
            let _ = engine.wait_durable(c.seq).await;
        }
        let outcome = read_and_commit(&engine, &ctx, &library_id, body, &tx, &mut totals).await;
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

/// Reads lines from `body`, commits them in groups, sends a status line per input line.
/// Returns Err only when the body itself fails (the client went away or sent garbage framing).
async fn read_and_commit(
    engine: &Arc<quiver_engine::Engine>,
    ctx: &WriteCtx,
    library_id: &str,
    body: Body,
    tx: &tokio::sync::mpsc::Sender<Bytes>,
    totals: &mut Totals,
) -> Result<(), String> {
    let mut stream = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut skipping_long_line = false;
    let mut pending: Vec<Pending> = Vec::new();
    let mut pending_bytes = 0usize;
    let mut line_no: u64 = 0;
    let mut ended = false;
    while !ended {
        let next = if pending.is_empty() {
            stream.next().await
        } else {
            match tokio::time::timeout(IDLE_FLUSH, stream.next()).await {
                Ok(n) => n,
                Err(_) => {
                    flush(engine, ctx, library_id, &mut pending, tx, totals).await?;
                    pending_bytes = 0;
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
        let mut rest: &[u8] = &chunk;
        loop {
            let nl = rest.iter().position(|&b| b == b'\n');
            let (piece, complete) = match nl {
                Some(i) => (&rest[..i], true),
                None if ended => (rest, !buf.is_empty() || !rest.is_empty()),
                None => (rest, false),
            };
            if !skipping_long_line {
                if buf.len() + piece.len() > LINE_BYTES_LIMIT {
                    skipping_long_line = true;
                    buf = Vec::new();
                } else {
                    buf.extend_from_slice(piece);
                }
            }
            if !complete {
                break;
            }
            line_no += 1;
            let text = std::mem::take(&mut buf);
            if skipping_long_line {
                skipping_long_line = false;
                let e = EngineError::Invalid(quiver_model::validate::Invalid::too_large(
                    "line_too_long",
                    format!("line is longer than {LINE_BYTES_LIMIT} bytes"),
                ));
                pending.push((line_no, Err(e)));
            } else if let Some(item) = parse_line(&text) {
                pending_bytes += text.len();
                pending.push((line_no, item));
            }
            if pending.len() >= BATCH_LINES_LIMIT || pending_bytes >= BATCH_BYTES_LIMIT {
                flush(engine, ctx, library_id, &mut pending, tx, totals).await?;
                pending_bytes = 0;
            }
            match nl {
                Some(i) => rest = &rest[i + 1..],
                None => break,
            }
        }
    }
    flush(engine, ctx, library_id, &mut pending, tx, totals).await
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

async fn flush(
    engine: &Arc<quiver_engine::Engine>,
    ctx: &WriteCtx,
    library_id: &str,
    pending: &mut Vec<Pending>,
    tx: &tokio::sync::mpsc::Sender<Bytes>,
    totals: &mut Totals,
) -> Result<(), String> {
    if pending.is_empty() {
        return Ok(());
    }
    let batch = std::mem::take(pending);
    let (numbers, items): (Vec<u64>, Vec<_>) = batch.into_iter().unzip();
    let engine2 = engine.clone();
    let ctx2 = ctx.clone();
    let lib = library_id.to_string();
    // Validation, embedding and apply are CPU work: keep them off the async workers.
    let result = tokio::task::spawn_blocking(move || engine2.upsert_documents(&ctx2, &lib, items))
        .await
        .map_err(|e| format!("ingest worker failed: {e}"))?;
    let mut out = Vec::with_capacity(numbers.len() * 64);
    match result {
        Ok(c) => {
            engine
                .wait_durable(c.seq)
                .await
                .map_err(|e| e.to_string())?;
            for (n, o) in numbers.iter().zip(c.value) {
                totals.lines += 1;
                let v = match o {
                    ItemOutcome::Committed {
                        document_id,
                        created,
                        seq,
                        ..
                    } => {
                        totals.committed += 1;
                        totals.first_seq.get_or_insert(seq);
                        totals.last_seq = Some(seq);
                        json!({"line": n, "ok": true, "document_id": document_id, "created": created, "seq": seq})
                    }
                    ItemOutcome::Failed(e) => {
                        totals.failed += 1;
                        let e = ApiError::from(e);
                        json!({"line": n, "ok": false, "error": e.code, "detail": e.detail})
                    }
                };
                out.extend_from_slice(&line(&v));
            }
        }
        Err(e) => {
            // The whole group failed (e.g. the library was deleted mid-stream): every line says so.
            let e = ApiError::from(e);
            for n in &numbers {
                totals.lines += 1;
                totals.failed += 1;
                out.extend_from_slice(&line(
                    &json!({"line": n, "ok": false, "error": e.code, "detail": e.detail}),
                ));
            }
        }
    }
    tx.send(Bytes::from(out))
        .await
        .map_err(|_| "the client stopped reading replies".to_string())
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

fn export_line(d: &quiver_model::Document, include_embeddings: bool) -> Value {
    let chunks: Vec<Value> = d
        .chunks
        .iter()
        .map(|c| {
            let mut v = json!({"id": c.id, "text": c.text, "metadata": c.metadata});
            if include_embeddings {
                v["embedding_b64"] = json!(quiver_engine::input::B64Vector::encode(&c.embedding));
            }
            v
        })
        .collect();
    json!({"id": d.id, "title": d.title, "metadata": d.metadata, "chunks": chunks})
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
