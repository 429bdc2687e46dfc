//! The `/v1/jobs` routes: submit a background job, read it and its progress, list, cancel,
//! queue statistics, and download an export's result. The jobs themselves (their table,
//! workers, retries, the `job.*` events) live in the `quiver-jobs` crate; this file only
//! translates HTTP to it.
//!
//! It must never change a job except through `Jobs`, and never answer a submission or a
//! cancellation before its event is durable. An uploaded import body is streamed to
//! `<data_dir>/jobs/<id>/input.ndjson` within [`quiver_jobs::JobsConfig::upload_bytes_limit`]
//! (never held in memory), and only then is the job queued.

use crate::error::{ApiError, ApiResult};
use crate::extract::{json_error, TraceId};
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt;
use quiver_engine::Engine;
use quiver_jobs::{Job, JobError, JobStatus, JobType, Jobs, Submit};
use quiver_model::time::rfc3339_ms;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

/// Most jobs one list returns.
pub const LIST_LIMIT: usize = 1000;
const LIST_DEFAULT: usize = 100;
/// Largest JSON body of a job submission.
const PARAMS_BODY_BYTES_LIMIT: usize = 2 * 1024 * 1024;

#[derive(Clone)]
pub struct JobsState {
    pub engine: Arc<Engine>,
    pub jobs: Arc<Jobs>,
}

pub fn router<S>(state: JobsState) -> Router<S> {
    Router::new()
        .route("/v1/jobs", get(list))
        .route("/v1/jobs/stats/queue", get(stats))
        .route("/v1/jobs/{id}", get(read).delete(cancel).post(submit))
        .route("/v1/jobs/{id}/result", get(result))
        .with_state(state)
}

fn api_error(e: JobError) -> ApiError {
    match e {
        JobError::Engine(e) => e.into(),
        JobError::Invalid { code, detail } => {
            let status = if code.ends_with("too_large") {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            ApiError::new(status, code, detail)
        }
        JobError::Forbidden { code, detail } => ApiError::new(StatusCode::FORBIDDEN, code, detail),
        e @ JobError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, e.code(), e.detail()),
        e @ JobError::Finished { .. } => ApiError::new(StatusCode::CONFLICT, e.code(), e.detail()),
        e @ (JobError::QueueFull { .. } | JobError::ShuttingDown) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.code(), e.detail())
        }
        e => {
            tracing::error!("job error: {e}");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.code(), e.detail())
        }
    }
}

/// A job on the wire.
pub fn render(j: &Job) -> Value {
    json!({
        "job_id": j.id,
        "type": j.job_type.as_str(),
        "status": j.status.as_str(),
        "library_id": j.library_id,
        "params": j.params,
        "progress": {
            "current": j.progress.current,
            "total": j.progress.total,
            "percentage": j.progress.percentage(),
            "message": j.progress.message,
        },
        "attempts": j.attempts,
        "max_retries": j.max_retries,
        "cancel_requested": j.cancel_requested,
        "checkpoint": j.checkpoint,
        "error": j.error.as_ref().map(|e| json!({"error": e.code, "detail": e.detail})),
        "result": j.result,
        "created_at": rfc3339_ms(j.created_at_ms),
        "started_at": j.started_at_ms.map(rfc3339_ms),
        "finished_at": j.finished_at_ms.map(rfc3339_ms),
        "retry_at": (j.not_before_ms > 0 && j.status == JobStatus::Queued).then(|| rfc3339_ms(j.not_before_ms)),
    })
}

/// A query-string value as the JSON type the parameter takes.
fn query_value(key: &str, v: &str) -> Result<Value, ApiError> {
    let bad = |what: &str| {
        ApiError::unprocessable(
            "invalid_param",
            format!("`{key}` must be {what}, not {v:?}"),
        )
    };
    Ok(match key {
        "max_retries" | "pause_ms" | "batch_size" => {
            Value::from(v.parse::<u64>().map_err(|_| bad("an integer"))?)
        }
        "include_embeddings" => Value::from(v.parse::<bool>().map_err(|_| bad("true or false"))?),
        "ids" => Value::from(
            v.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>(),
        ),
        "filter" | "index_params" | "quantization" => {
            serde_json::from_str(v).map_err(|_| bad("JSON"))?
        }
        _ => Value::from(v),
    })
}

/// `POST /v1/jobs/{type}` → 202 `{job_id, status, …}` once `job.queued` is durable.
async fn submit(
    State(s): State<JobsState>,
    Path(kind): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    req: Request,
) -> ApiResult<Response> {
    let job_type = JobType::parse(&kind).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_job_type",
            format!(
                "no job type {kind:?}; this server runs {}",
                JobType::ALL.map(JobType::as_str).join(", ")
            ),
        )
    })?;
    let trace_id = req.extensions().get::<TraceId>().map(|t| t.0.clone());
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let upload = content_type.starts_with("application/x-ndjson")
        || content_type.starts_with("application/ndjson")
        || content_type.starts_with("application/jsonl");
    let mut params = Map::new();
    let mut id = None;
    let body = req.into_body();
    if upload {
        if job_type != JobType::BatchImport {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "only batch_import takes an NDJSON body; send parameters as JSON",
            ));
        }
        s.jobs.check_capacity().map_err(api_error)?;
        let new_id = Jobs::new_id();
        store_upload(&s.jobs, &new_id, body).await?;
        params.insert("input".into(), Value::from("upload"));
        id = Some(new_id);
    } else {
        let bytes = axum::body::to_bytes(body, PARAMS_BODY_BYTES_LIMIT)
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!(
                        "job parameters are limited to {PARAMS_BODY_BYTES_LIMIT} bytes of JSON"
                    ),
                )
            })?;
        if !bytes.iter().all(u8::is_ascii_whitespace) {
            match serde_json::from_slice::<Value>(&bytes).map_err(json_error)? {
                Value::Object(m) => params = m,
                _ => {
                    return Err(ApiError::unprocessable(
                        "invalid_request",
                        "the body must be a JSON object of job parameters",
                    ))
                }
            }
        }
    }
    for (k, v) in &query {
        if !params.contains_key(k) {
            params.insert(k.clone(), query_value(k, v)?);
        }
    }
    let jobs = s.jobs.clone();
    let upload_id = id.clone();
    let submitted = tokio::task::spawn_blocking(move || {
        jobs.submit(Submit {
            id,
            job_type,
            params: Value::Object(params),
            trace_id,
        })
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let job = match submitted {
        Ok(j) => j,
        Err(e) => {
            if let Some(u) = upload_id {
                let _ = tokio::fs::remove_dir_all(s.jobs.job_dir(&u)).await;
            }
            return Err(api_error(e));
        }
    };
    s.engine.wait_durable(job.queued_seq).await?;
    let mut resp = (
        StatusCode::ACCEPTED,
        Json(
            json!({"job_id": job.id, "status": job.status.as_str(), "type": job.job_type.as_str(),
                    "library_id": job.library_id, "seq": job.queued_seq}),
        ),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/jobs/{}", job.id)) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// Streams an NDJSON body to the job's input file, within the upload limit.
async fn store_upload(jobs: &Jobs, id: &str, body: Body) -> ApiResult<()> {
    let dir = jobs.job_dir(id);
    let io = |e: std::io::Error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "io_error",
            format!("cannot store the upload: {e}"),
        )
    };
    tokio::fs::create_dir_all(&dir).await.map_err(io)?;
    let result = async {
        let path = dir.join("input.ndjson");
        let mut file = tokio::fs::File::create(&path).await.map_err(io)?;
        let limit = jobs.config().upload_bytes_limit;
        let mut size = 0u64;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ApiError::bad_request("bad_body", e.to_string()))?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "upload_too_large",
                    format!("an import upload is limited to {limit} bytes; put bigger files on the server and pass {{\"path\": …}}"),
                ));
            }
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.sync_all().await.map_err(io)?;
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_dir_all(&dir).await;
    }
    result
}

async fn read(State(s): State<JobsState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let job = s.jobs.get(&id).map_err(api_error)?;
    Ok(Json(render(&job)))
}

/// `DELETE /v1/jobs/{id}`: a queued job is cancelled now (200); a running one stops at its
/// next checkpoint (202, `cancel_requested: true`); a finished one is a 409.
async fn cancel(State(s): State<JobsState>, Path(id): Path<String>) -> ApiResult<Response> {
    let jobs = s.jobs.clone();
    let job = tokio::task::spawn_blocking(move || jobs.cancel(&id))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(api_error)?;
    s.engine.wait_durable(s.engine.applied_seq()).await?;
    let status = if job.status.is_finished() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(render(&job))).into_response())
}

async fn list(
    State(s): State<JobsState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    if let Some(k) = q
        .keys()
        .find(|k| !["status", "type", "library_id", "limit"].contains(&k.as_str()))
    {
        return Err(ApiError::unprocessable(
            "unknown_param",
            format!("unknown query parameter {k:?}; use status, type, library_id, limit"),
        ));
    }
    let status = match q.get("status") {
        None => None,
        Some(v) => Some(JobStatus::parse(v).ok_or_else(|| {
            ApiError::unprocessable(
                "invalid_status",
                format!(
                    "unknown status {v:?}; use queued, running, completed, failed or cancelled"
                ),
            )
        })?),
    };
    let job_type = match q.get("type") {
        None => None,
        Some(v) => Some(JobType::parse(v).ok_or_else(|| {
            ApiError::unprocessable("invalid_job_type", format!("unknown job type {v:?}"))
        })?),
    };
    let limit = match q.get("limit") {
        None => LIST_DEFAULT,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=LIST_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::unprocessable(
                    "invalid_limit",
                    format!("`limit` must be from 1 to {LIST_LIMIT}"),
                )
            })?,
    };
    let found = s.jobs.list(
        status,
        job_type,
        q.get("library_id").map(String::as_str),
        limit,
    );
    Ok(Json(json!({
        "jobs": found.iter().map(render).collect::<Vec<_>>(),
        "count": found.len(),
    })))
}

async fn stats(State(s): State<JobsState>) -> Json<Value> {
    Json(json!(s.jobs.stats()))
}

/// `GET /v1/jobs/{id}/result`: a completed export's NDJSON file.
async fn result(State(s): State<JobsState>, Path(id): Path<String>) -> ApiResult<Response> {
    let job = s.jobs.get(&id).map_err(api_error)?;
    if job.job_type != JobType::BatchExport {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_result_file",
            format!(
                "a {} job has no result file; its result is in GET /v1/jobs/{id}",
                job.job_type.as_str()
            ),
        ));
    }
    if job.status != JobStatus::Completed {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_not_completed",
            format!(
                "job {id:?} is {}; its result is ready once it completes",
                job.status.as_str()
            ),
        ));
    }
    let path = s.jobs.job_dir(&id).join("export.ndjson");
    let file = tokio::fs::File::open(&path).await.map_err(|e| {
        ApiError::new(
            StatusCode::GONE,
            "result_gone",
            format!("the export file of job {id:?} is gone: {e}"),
        )
    })?;
    let stream = futures::stream::unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 256 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    let mut resp = Body::from_stream(stream).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    if let Some(seq) = job
        .result
        .as_ref()
        .and_then(|r| r.get("seq"))
        .and_then(Value::as_u64)
    {
        resp.headers_mut()
            .insert(crate::routes::SEQ_HEADER, HeaderValue::from(seq));
    }
    Ok(resp)
}
