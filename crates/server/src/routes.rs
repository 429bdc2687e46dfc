//! The REST routes of the v1 contract (DESIGN.md): health, libraries, documents, chunks,
//! batch and search. Handlers are thin: parse, call the engine, wait for durability, render.
//! A write answers only after its record is durable, with the `seq` it committed at; a read
//! answers with the `seq` it is consistent at.

use crate::error::{ApiError, ApiResult};
use crate::extract::{parse_json, ApiBytes, ApiJson, Ctx};
use crate::render::{self, with_seq};
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use quiver_engine::input::{
    ChunkInput, CreateLibrary, DocumentInput, IndexChange, PatchLibrary, SearchInput,
};
use quiver_engine::{EngineError, ItemOutcome};
use quiver_model::limits::{BATCH_DOCUMENTS_LIMIT, PAGE_LIMIT};
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Instant;

pub const SEQ_HEADER: &str = "x-quiver-seq";

fn seq_headers(seq: u64) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(SEQ_HEADER, HeaderValue::from(seq));
    h
}

pub async fn health(State(s): State<AppState>) -> Json<Value> {
    let st = s.engine.stats();
    Json(json!({
        "status": "healthy",
        "version": env!("CARGO_PKG_VERSION"),
        "seq": st.applied_seq,
        "durable_seq": st.durable_seq,
        "log": match &st.replica {
            None => json!({"backend": "file"}),
            Some((stream, msg_seq, replica_id)) => json!({
                "backend": "jetstream",
                "stream": stream,
                "stream_msg_seq": msg_seq,
                "replica_id": replica_id,
            }),
        },
        "uptime_seconds": s.engine.started_at.elapsed().as_secs(),
    }))
}

// ------------------------------------------------------------------ libraries

pub async fn create_library(
    State(s): State<AppState>,
    Ctx(ctx): Ctx,
    ApiJson(req): ApiJson<CreateLibrary>,
) -> ApiResult<Response> {
    let c = s.engine.create_library(&ctx, req)?;
    s.engine.wait_durable(c.seq).await?;
    Ok((
        StatusCode::CREATED,
        seq_headers(c.seq),
        Json(with_seq(render::library(&c.value), c.seq)),
    )
        .into_response())
}

pub async fn list_libraries(State(s): State<AppState>) -> Json<Value> {
    let (libs, seq) = s.engine.list_libraries();
    Json(json!({
        "libraries": libs.iter().map(render::library).collect::<Vec<_>>(),
        "total": libs.len(),
        "seq": seq,
    }))
}

pub async fn get_library(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let (info, seq) = s.engine.library(&id)?;
    Ok(Json(with_seq(render::library(&info), seq)))
}

pub async fn patch_library(
    State(s): State<AppState>,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<PatchLibrary>,
) -> ApiResult<Response> {
    let c = s.engine.update_library(&ctx, &id, req)?;
    s.engine.wait_durable(c.seq).await?;
    Ok((
        seq_headers(c.seq),
        Json(with_seq(render::library(&c.value), c.seq)),
    )
        .into_response())
}

/// `GET /v1/libraries/{id}/index`: what serves searches, its parameters, sizes and build.
pub async fn get_index(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let (status, seq) = s.engine.index_status(&id)?;
    Ok((
        seq_headers(seq),
        Json(with_seq(render::index(&status), seq)),
    )
        .into_response())
}

/// `PUT /v1/libraries/{id}/index`: switches the index; 202 while the new one is built beside
/// the old (which keeps answering searches), 200 when nothing needed building.
pub async fn put_index(
    State(s): State<AppState>,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<IndexChange>,
) -> ApiResult<Response> {
    let c = s.engine.set_index(&ctx, &id, req)?;
    s.engine.wait_durable(c.seq).await?;
    let (status, _) = s.engine.index_status(&id)?;
    let code = if status.building {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((
        code,
        seq_headers(c.seq),
        Json(with_seq(render::index(&status), c.seq)),
    )
        .into_response())
}

pub async fn delete_library(
    State(s): State<AppState>,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let c = s.engine.delete_library(&ctx, &id)?;
    s.engine.wait_durable(c.seq).await?;
    Ok((StatusCode::NO_CONTENT, seq_headers(c.seq)).into_response())
}

// ------------------------------------------------------------------ documents

pub async fn upsert_document(
    State(s): State<AppState>,
    Ctx(ctx): Ctx,
    Path(lib): Path<String>,
    ApiJson(doc): ApiJson<DocumentInput>,
) -> ApiResult<Response> {
    let c = s.engine.upsert_document(&ctx, &lib, doc)?;
    s.engine.wait_durable(c.seq).await?;
    let (doc, created) = c.value;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut body = with_seq(render::document(&doc, false), c.seq);
    body["created"] = json!(created);
    Ok((status, seq_headers(c.seq), Json(body)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody<'a> {
    /// Kept raw (borrowed from the body, not copied) so each item is parsed on its own,
    /// straight into its type: a malformed item is reported without costing the rest.
    #[serde(borrow)]
    documents: Vec<&'a serde_json::value::RawValue>,
}

/// One item of a batch reply (a typed struct: no map allocation per key and item).
#[derive(serde::Serialize)]
struct BatchItem<'a> {
    index: usize,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    document_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    num_chunks: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
}

pub async fn upsert_batch(
    State(s): State<AppState>,
    Ctx(ctx): Ctx,
    Path(lib): Path<String>,
    ApiBytes(body): ApiBytes,
) -> ApiResult<Response> {
    let engine = s.engine.clone();
    // Parsing and validating up to 1000 documents is CPU work: keep it off the async workers.
    let c = tokio::task::spawn_blocking(move || -> ApiResult<_> {
        let body: BatchBody = serde_json::from_slice(&body).map_err(crate::extract::json_error)?;
        if body.documents.len() > BATCH_DOCUMENTS_LIMIT {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "batch_too_large",
                format!(
                    "{} documents; the limit per batch is {BATCH_DOCUMENTS_LIMIT}",
                    body.documents.len()
                ),
            ));
        }
        if body.documents.is_empty() {
            return Err(ApiError::unprocessable(
                "empty_batch",
                "send at least one document",
            ));
        }
        let items: Vec<Result<DocumentInput, EngineError>> = body
            .documents
            .iter()
            .map(|raw| {
                serde_json::from_str::<DocumentInput>(raw.get())
                    .map_err(|e| EngineError::invalid("invalid_document", e.to_string()))
            })
            .collect();
        drop(body);
        Ok(engine.upsert_documents(&ctx, &lib, items)?)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
    s.engine.wait_durable(c.seq).await?;
    let (mut committed, mut failed) = (0usize, 0usize);
    let results: Vec<BatchItem> = c
        .value
        .iter()
        .enumerate()
        .map(|(index, o)| match o {
            ItemOutcome::Committed {
                document_id,
                created,
                num_chunks,
                seq,
            } => {
                committed += 1;
                BatchItem {
                    index,
                    ok: true,
                    document_id: Some(document_id),
                    created: Some(*created),
                    num_chunks: Some(*num_chunks),
                    seq: Some(*seq),
                    error: None,
                    detail: None,
                    status: None,
                }
            }
            ItemOutcome::Failed(e) => {
                failed += 1;
                let (status, code, detail) = ApiError::parts(e);
                BatchItem {
                    index,
                    ok: false,
                    document_id: None,
                    created: None,
                    num_chunks: None,
                    seq: None,
                    error: Some(code),
                    detail: Some(detail),
                    status: Some(status),
                }
            }
        })
        .collect();
    let body = serde_json::to_vec(
        &json!({"results": results, "committed": committed, "failed": failed, "seq": c.seq}),
    )
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let mut headers = seq_headers(c.seq);
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok((StatusCode::OK, headers, body).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    limit: Option<usize>,
    after: Option<String>,
}

pub async fn list_documents(
    State(s): State<AppState>,
    Path(lib): Path<String>,
    Query(p): Query<ListParams>,
) -> ApiResult<Json<Value>> {
    let limit = p.limit.unwrap_or(100);
    if limit == 0 || limit > PAGE_LIMIT {
        return Err(ApiError::unprocessable(
            "invalid_limit",
            format!("limit must be between 1 and {PAGE_LIMIT}"),
        ));
    }
    let (docs, total, seq) = s.engine.documents(&lib, p.after.as_deref(), limit)?;
    let next = if docs.len() == limit {
        docs.last().map(|d| d.id.clone())
    } else {
        None
    };
    Ok(Json(json!({
        "documents": docs.iter().map(|d| render::document_summary(d)).collect::<Vec<_>>(),
        "total": total,
        "next_after": next,
        "seq": seq,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetDocParams {
    #[serde(default)]
    include_embeddings: bool,
}

pub async fn get_document(
    State(s): State<AppState>,
    Path((lib, doc)): Path<(String, String)>,
    Query(p): Query<GetDocParams>,
) -> ApiResult<Json<Value>> {
    let (doc, seq) = s.engine.document(&lib, &doc)?;
    Ok(Json(with_seq(
        render::document(&doc, p.include_embeddings),
        seq,
    )))
}

pub async fn delete_document(
    State(s): State<AppState>,
    Ctx(ctx): Ctx,
    Path((lib, doc)): Path<(String, String)>,
) -> ApiResult<Response> {
    let c = s.engine.delete_document(&ctx, &lib, &doc)?;
    s.engine.wait_durable(c.seq).await?;
    Ok((StatusCode::NO_CONTENT, seq_headers(c.seq)).into_response())
}

// ------------------------------------------------------------------ chunks

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunksBody {
    chunks: Vec<ChunkInput>,
}

pub async fn add_chunks(
    State(s): State<AppState>,
    Ctx(ctx): Ctx,
    Path((lib, doc)): Path<(String, String)>,
    ApiJson(body): ApiJson<ChunksBody>,
) -> ApiResult<Response> {
    let c = s.engine.add_chunks(&ctx, &lib, &doc, body.chunks)?;
    s.engine.wait_durable(c.seq).await?;
    Ok((
        StatusCode::CREATED,
        seq_headers(c.seq),
        Json(with_seq(render::document(&c.value, false), c.seq)),
    )
        .into_response())
}

pub async fn delete_chunk(
    State(s): State<AppState>,
    Ctx(ctx): Ctx,
    Path((lib, doc, chunk)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let c = s.engine.delete_chunk(&ctx, &lib, &doc, &chunk)?;
    s.engine.wait_durable(c.seq).await?;
    Ok((StatusCode::NO_CONTENT, seq_headers(c.seq)).into_response())
}

// ------------------------------------------------------------------ search

pub async fn search(
    State(s): State<AppState>,
    Path(lib): Path<String>,
    ApiBytes(body): ApiBytes,
) -> ApiResult<Json<Value>> {
    let req: SearchInput = parse_json(&body)?;
    let t = Instant::now();
    let engine = s.engine.clone();
    let include = req.include_embeddings;
    // A scan is CPU work: run it off the async workers so it never stalls other connections.
    let (hits, seq) = tokio::task::spawn_blocking(move || engine.search(&lib, &req))
        .await
        .map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })??;
    let query_time_ms = t.elapsed().as_secs_f64() * 1000.0;
    Ok(Json(json!({
        "results": hits.iter().map(|h| render::hit(h, include)).collect::<Vec<_>>(),
        "total_results": hits.len(),
        "query_time_ms": query_time_ms,
        "seq": seq,
    })))
}

pub async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "route_not_found",
        "no such route; see the API table in the README",
    )
}
