//! Background jobs over real HTTP (port 0): each job type end to end, cancel mid-run, bad
//! input, list/stats, the `job.*` events in the log, export → import round trip with
//! identical search results, re-embedding with and without an embedder.

mod common;

use quiver_embed::{EmbedError, Embedder, Purpose};
use quiver_engine::{Engine, EngineConfig};
use reqwest::Client;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DIM: usize = 4;

fn vector(i: usize) -> Vec<f32> {
    let x = i as f32;
    vec![
        (x * 0.37).sin(),
        (x * 0.11).cos(),
        ((x * 0.05).sin() + 1.5),
        (i % 7) as f32 * 0.1,
    ]
}

fn doc_line(i: usize) -> String {
    json!({"id": format!("d{i:05}"), "title": format!("doc {i}"), "metadata": {"group": i % 4},
           "chunks": [{"text": format!("text {i}"), "embedding": vector(i), "metadata": {"n": i}}]})
    .to_string()
}

async fn server() -> (String, Client, Arc<Engine>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, engine) = common::spawn(EngineConfig::new(dir.path())).await;
    (base, Client::new(), engine, dir)
}

async fn library(c: &Client, base: &str, name: &str, index: &str) -> String {
    let r = c
        .post(format!("{base}/v1/libraries"))
        .json(&json!({"name": name, "dimension": DIM, "metric": "l2", "index_type": index}))
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 201);
    r.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string()
}

async fn fill(c: &Client, base: &str, lib: &str, n: usize) {
    let body: String = (0..n).map(|i| doc_line(i) + "\n").collect();
    let r = c
        .post(format!("{base}/v1/libraries/{lib}/documents/stream"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .expect("ingest");
    assert_eq!(r.status(), 200);
    r.text().await.expect("reply");
}

async fn submit(c: &Client, base: &str, kind: &str, body: Value) -> (u16, Value) {
    let r = c
        .post(format!("{base}/v1/jobs/{kind}"))
        .json(&body)
        .send()
        .await
        .expect("submit");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json"))
}

async fn job(c: &Client, base: &str, id: &str) -> Value {
    c.get(format!("{base}/v1/jobs/{id}"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

async fn wait(c: &Client, base: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let j = job(c, base, id).await;
        if ["completed", "failed", "cancelled"].contains(&j["status"].as_str().unwrap_or("")) {
            return j;
        }
        assert!(Instant::now() < deadline, "job did not finish: {j}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run(c: &Client, base: &str, kind: &str, body: Value) -> Value {
    let (status, v) = submit(c, base, kind, body).await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["status"], "queued");
    wait(c, base, v["job_id"].as_str().expect("job_id")).await
}

async fn count(c: &Client, base: &str, lib: &str) -> u64 {
    let v: Value = c
        .get(format!("{base}/v1/libraries/{lib}"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    v["num_documents"].as_u64().expect("num_documents")
}

async fn search(c: &Client, base: &str, lib: &str, q: &[f32]) -> Vec<(String, String)> {
    let v: Value = c
        .post(format!("{base}/v1/libraries/{lib}/search"))
        .json(&json!({"embedding": q, "k": 10}))
        .send()
        .await
        .expect("search")
        .json()
        .await
        .expect("json");
    v["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|h| {
            (
                h["document_id"].as_str().unwrap_or("").to_string(),
                format!("{:.6}", h["distance"].as_f64().unwrap_or(-1.0)),
            )
        })
        .collect()
}

/// Every durable record of the log, in seq order.
fn log_records(engine: &Engine) -> Vec<quiver_model::Record> {
    // Reads see a change up to one group commit before it is durable; the log shows durable
    // records only.
    engine
        .log()
        .wait_durable(engine.log().last_assigned_seq())
        .expect("durable");
    let mut out = Vec::new();
    let mut next = 1;
    loop {
        let batch = engine.log().read_from(next, 4096, 64 << 20).expect("read");
        if batch.is_empty() {
            return out;
        }
        for (seq, payload) in batch {
            next = seq + 1;
            out.push(quiver_model::Record::decode(&payload).expect("decode"));
        }
    }
}

/// The `job.*` event types of one job, in log order.
fn events_of(engine: &Engine, id: &str) -> Vec<String> {
    log_records(engine)
        .into_iter()
        .filter_map(|rec| match rec.change {
            quiver_model::record::Change::AppEvent {
                event_type, data, ..
            } if data["job_id"] == id => Some(event_type),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn import_upload_and_path_with_bad_lines() {
    let (base, c, engine, dir) = server().await;
    let lib = library(&c, &base, "imp", "flat").await;
    let mut body: String = (0..300).map(|i| doc_line(i) + "\n").collect();
    body.push_str("{not json\n");
    body.push_str(
        &json!({"title": "no id", "chunks": [{"text": "x", "embedding": vector(1)}]}).to_string(),
    );
    body.push('\n');
    body.push_str(
        &json!({"title": "bad dim", "chunks": [{"text": "x", "embedding": [1.0]}]}).to_string(),
    );
    let r = c
        .post(format!(
            "{base}/v1/jobs/batch_import?library_id={lib}&batch_size=64"
        ))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .expect("submit");
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.expect("json");
    let id = v["job_id"].as_str().expect("id").to_string();
    assert!(dir
        .path()
        .join("jobs")
        .join(&id)
        .join("input.ndjson")
        .exists());
    let j = wait(&c, &base, &id).await;
    assert_eq!(j["status"], "completed", "{j}");
    let res = &j["result"];
    assert_eq!(res["lines"], 303);
    assert_eq!(res["committed"], 301);
    assert_eq!(res["failed"], 2);
    assert_eq!(res["errors"][0]["line"], 301);
    assert_eq!(res["errors"][0]["error"], "malformed_json");
    assert_eq!(res["errors"][1]["line"], 303);
    assert_eq!(j["progress"]["percentage"], 100.0);
    assert_eq!(count(&c, &base, &lib).await, 301);
    // A line without an id gets `<job id>-<line>`, so a resumed import cannot duplicate it.
    let r = c
        .get(format!("{base}/v1/libraries/{lib}/documents/{id}-302"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    let evs = events_of(&engine, &id);
    assert_eq!(evs.first().map(String::as_str), Some("job.queued"));
    assert_eq!(evs.get(1).map(String::as_str), Some("job.started"));
    assert_eq!(evs.last().map(String::as_str), Some("job.completed"));

    // From a file on the server, in its import directory (`<data_dir>/import` by default).
    let path = dir.path().join("import").join("more.ndjson");
    let more: String = (300..350).map(|i| doc_line(i) + "\n").collect();
    std::fs::write(&path, more).expect("write");
    let j = run(
        &c,
        &base,
        "batch_import",
        json!({"library_id": lib, "path": path}),
    )
    .await;
    assert_eq!(j["status"], "completed", "{j}");
    assert_eq!(j["result"]["committed"], 50);
    assert_eq!(count(&c, &base, &lib).await, 351);
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let (base, c, _engine, _dir) = server().await;
    let lib = library(&c, &base, "bad", "flat").await;
    let cases = [
        ("nope", json!({"library_id": lib}), 404, "unknown_job_type"),
        ("batch_export", json!({}), 422, "missing_library_id"),
        (
            "batch_export",
            json!({"library_id": "missing"}),
            404,
            "library_not_found",
        ),
        (
            "batch_export",
            json!({"library_id": lib, "colour": 1}),
            422,
            "unknown_param",
        ),
        (
            "batch_export",
            json!({"library_id": lib, "max_retries": 99}),
            422,
            "invalid_param",
        ),
        (
            "batch_import",
            json!({"library_id": lib}),
            422,
            "missing_input",
        ),
        (
            "batch_import",
            json!({"library_id": lib, "path": "relative.ndjson"}),
            422,
            "invalid_path",
        ),
        (
            "batch_import",
            json!({"library_id": lib, "path": "/nonexistent/x.ndjson"}),
            403,
            "path_not_allowed",
        ),
        (
            "batch_delete",
            json!({"library_id": lib}),
            422,
            "invalid_param",
        ),
        (
            "batch_delete",
            json!({"library_id": lib, "ids": []}),
            422,
            "invalid_param",
        ),
        (
            "batch_delete",
            json!({"library_id": lib, "filter": {"field": "x", "operator": "bogus", "value": 1}}),
            422,
            "invalid_filter",
        ),
        (
            "index_rebuild",
            json!({"library_id": lib}),
            422,
            "invalid_param",
        ),
        (
            "index_rebuild",
            json!({"library_id": lib, "index_type": "hnsw", "index_params": {"q": 1}}),
            422,
            "invalid_index_params",
        ),
    ];
    for (kind, body, status, code) in cases {
        let (s, v) = submit(&c, &base, kind, body.clone()).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (status, Some(code)),
            "{kind} {body}: {v}"
        );
        assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    let r = c
        .post(format!("{base}/v1/jobs/batch_export"))
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    let r = c
        .post(format!("{base}/v1/jobs/batch_export?library_id={lib}"))
        .header("content-type", "application/x-ndjson")
        .body("{}\n")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 415);
    for (url, status, code) in [
        ("/v1/jobs/job_missing", 404, "job_not_found"),
        ("/v1/jobs?status=weird", 422, "invalid_status"),
        ("/v1/jobs?limit=0", 422, "invalid_limit"),
        ("/v1/jobs/job_missing/result", 404, "job_not_found"),
    ] {
        let r = c.get(format!("{base}{url}")).send().await.expect("get");
        assert_eq!(r.status().as_u16(), status, "{url}");
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["error"], code, "{url}");
    }
    let r = c
        .delete(format!("{base}/v1/jobs/job_missing"))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn export_import_round_trip_gives_identical_search_results() {
    let (base, c, _engine, _dir) = server().await;
    let src = library(&c, &base, "src", "flat").await;
    fill(&c, &base, &src, 500).await;
    let j = run(
        &c,
        &base,
        "batch_export",
        json!({"library_id": src, "batch_size": 100}),
    )
    .await;
    assert_eq!(j["status"], "completed", "{j}");
    assert_eq!(j["result"]["documents"], 500);
    let id = j["job_id"].as_str().expect("id");
    let r = c
        .get(format!("{base}/v1/jobs/{id}/result"))
        .send()
        .await
        .expect("result");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let text = r.text().await.expect("text");
    assert_eq!(text.lines().count(), 501);
    assert!(text.starts_with("{\"quiver_export\""));
    // The same lines as the streaming export route, apart from the header.
    let streamed = c
        .get(format!("{base}/v1/libraries/{src}/documents/stream"))
        .send()
        .await
        .expect("stream")
        .text()
        .await
        .expect("text");
    let body = |t: &str| t.lines().skip(1).map(str::to_string).collect::<Vec<_>>();
    assert_eq!(body(&text), body(&streamed));

    let dst = library(&c, &base, "dst", "flat").await;
    let r = c
        .post(format!("{base}/v1/jobs/batch_import?library_id={dst}"))
        .header("content-type", "application/x-ndjson")
        .body(text)
        .send()
        .await
        .expect("submit");
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.expect("json");
    let j = wait(&c, &base, v["job_id"].as_str().expect("id")).await;
    assert_eq!(j["status"], "completed", "{j}");
    assert_eq!(j["result"]["committed"], 500);
    for i in [0, 17, 250, 499] {
        let q = vector(i);
        assert_eq!(
            search(&c, &base, &src, &q).await,
            search(&c, &base, &dst, &q).await
        );
    }
    // An unfinished or non-export job has no result file.
    let j = run(&c, &base, "index_optimize", json!({"library_id": src})).await;
    let r = c
        .get(format!(
            "{base}/v1/jobs/{}/result",
            j["job_id"].as_str().expect("id")
        ))
        .send()
        .await
        .expect("result");
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn index_rebuild_and_optimize() {
    let (base, c, engine, _dir) = server().await;
    let lib = library(&c, &base, "idx", "flat").await;
    fill(&c, &base, &lib, 600).await;
    let before = search(&c, &base, &lib, &vector(42)).await;
    let j = run(
        &c,
        &base,
        "index_rebuild",
        json!({"library_id": lib, "index_type": "hnsw", "index_params": {"m": 12}}),
    )
    .await;
    assert_eq!(j["status"], "completed", "{j}");
    assert_eq!(j["result"]["index_type"], "hnsw");
    let idx: Value = c
        .get(format!("{base}/v1/libraries/{lib}/index"))
        .send()
        .await
        .expect("index")
        .json()
        .await
        .expect("json");
    assert_eq!(idx["index_type"], "hnsw", "{idx}");
    assert_eq!(search(&c, &base, &lib, &vector(42)).await[0], before[0]);

    // Deletes leave tombstones in the graph; optimize rebuilds it without them.
    let ids: Vec<String> = (0..300).map(|i| format!("d{i:05}")).collect();
    let j = run(
        &c,
        &base,
        "batch_delete",
        json!({"library_id": lib, "ids": ids}),
    )
    .await;
    assert_eq!(j["result"]["deleted_documents"], 300, "{j}");
    let j = run(&c, &base, "index_optimize", json!({"library_id": lib})).await;
    assert_eq!(j["status"], "completed", "{j}");
    assert_eq!(j["result"]["optimized"], true, "{j}");
    assert!(
        j["result"]["tombstones_before"].as_u64().unwrap_or(0) > 0,
        "{j}"
    );
    assert_eq!(j["result"]["tombstones_after"], 0, "{j}");
    // The job reads as completed once its records are applied; the log serves them once they
    // are durable too (fsync can lag on a loaded machine), so wait for that before reading.
    let applied = engine.applied_seq();
    engine
        .wait_durable(applied)
        .await
        .expect("the applied records become durable");
    let optimized = (1..=applied).any(|s| {
        engine
            .log()
            .read_from(s, 1, 1 << 20)
            .ok()
            .and_then(|b| b.into_iter().next())
            .and_then(|(_, p)| {
                quiver_model::record::peek_event_type(&p)
                    .ok()
                    .map(|t| t == "index.optimized")
            })
            .unwrap_or(false)
    });
    assert!(optimized, "index.optimized is in the log");
    assert_eq!(search(&c, &base, &lib, &vector(400)).await[0].0, "d00400");

    let flat = library(&c, &base, "idx-flat", "flat").await;
    fill(&c, &base, &flat, 10).await;
    let j = run(&c, &base, "index_optimize", json!({"library_id": flat})).await;
    assert_eq!(j["status"], "completed");
    assert_eq!(j["result"]["optimized"], false);
}

#[tokio::test]
async fn batch_delete_by_ids_and_by_filter() {
    let (base, c, _engine, _dir) = server().await;
    let lib = library(&c, &base, "del", "flat").await;
    fill(&c, &base, &lib, 200).await;
    let j = run(
        &c,
        &base,
        "batch_delete",
        json!({"library_id": lib, "ids": ["d00000", "d00001", "missing"]}),
    )
    .await;
    assert_eq!(j["status"], "completed", "{j}");
    assert_eq!(j["result"]["deleted_documents"], 2);
    assert_eq!(j["result"]["not_found"], 1);
    assert_eq!(count(&c, &base, &lib).await, 198);
    // group == 3 (document metadata): 50 documents, two of them (0 is not, 3 is) … all gone.
    let j = run(
        &c,
        &base,
        "batch_delete",
        json!({"library_id": lib, "filter": {"group": 3}}),
    )
    .await;
    assert_eq!(j["status"], "completed", "{j}");
    assert_eq!(j["result"]["deleted_documents"], 50);
    assert_eq!(count(&c, &base, &lib).await, 148);
    // Query-string ids work too.
    let r = c
        .post(format!(
            "{base}/v1/jobs/batch_delete?library_id={lib}&ids=d00002,d00004"
        ))
        .send()
        .await
        .expect("submit");
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.expect("json");
    let j = wait(&c, &base, v["job_id"].as_str().expect("id")).await;
    assert_eq!(j["result"]["deleted_documents"], 2, "{j}");
}

#[tokio::test]
async fn cancel_mid_run_stops_at_a_checkpoint() {
    let (base, c, engine, _dir) = server().await;
    let lib = library(&c, &base, "cancel", "flat").await;
    let body: String = (0..2000).map(|i| doc_line(i) + "\n").collect();
    // Small steps with a pause after each: the job takes ~10 s unless cancelled.
    let r = c
        .post(format!(
            "{base}/v1/jobs/batch_import?library_id={lib}&batch_size=10&pause_ms=50"
        ))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .expect("submit");
    let v: Value = r.json().await.expect("json");
    let id = v["job_id"].as_str().expect("id").to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let j = job(&c, &base, &id).await;
        if j["status"] == "running" && j["progress"]["current"].as_u64().unwrap_or(0) > 0 {
            assert!(j["progress"]["total"] == 2000, "{j}");
            break;
        }
        assert!(Instant::now() < deadline, "job never made progress: {j}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = c
        .delete(format!("{base}/v1/jobs/{id}"))
        .send()
        .await
        .expect("cancel");
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["cancel_requested"], true);
    let t = Instant::now();
    let j = wait(&c, &base, &id).await;
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "stopped at the next checkpoint"
    );
    assert_eq!(j["status"], "cancelled", "{j}");
    let n = count(&c, &base, &lib).await;
    assert!(n > 0 && n < 2000, "stopped part way: {n}");
    assert_eq!(n % 10, 0, "whole steps only: {n}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        count(&c, &base, &lib).await,
        n,
        "nothing more after the cancel"
    );
    let evs = events_of(&engine, &id);
    assert!(evs.contains(&"job.cancel_requested".to_string()));
    assert_eq!(evs.last().map(String::as_str), Some("job.cancelled"));
    // Progress is throttled: at most ~2 events a second.
    let progress = evs.iter().filter(|e| *e == "job.progress").count();
    assert!(progress <= 10, "{progress} progress events");
    // Cancelling again: the job has finished.
    let r = c
        .delete(format!("{base}/v1/jobs/{id}"))
        .send()
        .await
        .expect("cancel");
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"], "job_finished");
}

#[tokio::test]
async fn list_stats_and_queued_cancel() {
    let (base, c, _engine, _dir) = server().await;
    let lib = library(&c, &base, "list", "flat").await;
    let other = library(&c, &base, "list2", "flat").await;
    fill(&c, &base, &lib, 20).await;
    // Two slow jobs occupy both workers; the third waits and is cancelled while queued.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let (s, v) = submit(
            &c,
            &base,
            "batch_export",
            json!({"library_id": lib, "batch_size": 1, "pause_ms": 200}),
        )
        .await;
        assert_eq!(s, 202);
        slow.push(v["job_id"].as_str().expect("id").to_string());
    }
    let (_, v) = submit(&c, &base, "batch_export", json!({"library_id": other})).await;
    let queued = v["job_id"].as_str().expect("id").to_string();
    let r = c
        .delete(format!("{base}/v1/jobs/{queued}"))
        .send()
        .await
        .expect("cancel");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["status"], "cancelled");
    let st: Value = c
        .get(format!("{base}/v1/jobs/stats/queue"))
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("json");
    assert_eq!(st["workers"], 2, "{st}");
    assert_eq!(st["cancelled"], 1, "{st}");
    assert_eq!(
        st["queued"].as_u64().unwrap_or(0) + st["running"].as_u64().unwrap_or(0),
        2,
        "{st}"
    );
    let l: Value = c
        .get(format!(
            "{base}/v1/jobs?library_id={lib}&type=batch_export&limit=10"
        ))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(l["count"], 2, "{l}");
    let l: Value = c
        .get(format!("{base}/v1/jobs?status=cancelled"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(l["jobs"][0]["job_id"], queued.as_str());
    for id in &slow {
        let r = c
            .delete(format!("{base}/v1/jobs/{id}"))
            .send()
            .await
            .expect("cancel");
        assert!(r.status() == 202 || r.status() == 200);
        assert_eq!(wait(&c, &base, id).await["status"], "cancelled");
    }
}

/// A re-embedding that cannot work is refused at submission (422, no job, nothing changed):
/// no model named for a library without one, a model the server does not know.
#[tokio::test]
async fn regenerate_embeddings_refuses_clearly_without_a_model() {
    let (base, c, _engine, _dir) = server().await;
    let lib = library(&c, &base, "re", "flat").await;
    fill(&c, &base, &lib, 5).await;
    let before = search(&c, &base, &lib, &vector(3)).await;
    for (body, code) in [
        (json!({"library_id": lib}), "embedding_model_required"),
        (
            json!({"library_id": lib, "embedding_model": "local:nope"}),
            "unknown_model",
        ),
        (
            json!({"library_id": lib, "embedding_model": 7}),
            "invalid_param",
        ),
    ] {
        let (status, v) = submit(&c, &base, "regenerate_embeddings", body).await;
        assert_eq!(status, 422, "{v}");
        assert_eq!(v["error"], code, "{v}");
        assert!(!v["detail"].as_str().unwrap_or("").is_empty(), "{v}");
    }
    let jobs: Value = c
        .get(format!("{base}/v1/jobs"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(0), "{jobs}");
    assert_eq!(
        search(&c, &base, &lib, &vector(3)).await,
        before,
        "nothing changed"
    );
}

/// A deterministic test embedder: a text's vector is derived from its bytes.
#[derive(Debug)]
struct TestEmbedder;

impl Embedder for TestEmbedder {
    fn embed(
        &self,
        _: Option<&str>,
        texts: &[String],
        _: Purpose,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(texts
            .iter()
            .map(|t| {
                let s: u32 = t.bytes().map(u32::from).sum();
                vec![1.0, (s % 17) as f32, t.len() as f32, 0.5]
            })
            .collect())
    }
    fn dimension(&self, _: &str) -> Option<u32> {
        Some(DIM as u32)
    }
}

#[tokio::test]
async fn regenerate_embeddings_with_an_embedder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine =
        Engine::open_with(EngineConfig::new(dir.path()), Arc::new(TestEmbedder)).expect("open");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(quiver_server::serve(
        listener,
        engine.clone(),
        std::future::pending(),
    ));
    let c = Client::new();
    let lib = library(&c, &base, "emb", "flat").await;
    fill(&c, &base, &lib, 30).await;
    let j = run(
        &c,
        &base,
        "regenerate_embeddings",
        json!({"library_id": lib, "batch_size": 7, "embedding_model": "test:model"}),
    )
    .await;
    assert_eq!(j["status"], "completed", "{j}");
    assert_eq!(j["result"]["documents"], 30);
    assert_eq!(j["result"]["embedding_model"], "test:model", "{j}");
    assert_eq!(j["result"]["chunks_embedded"], 30);
    let d: Value = c
        .get(format!(
            "{base}/v1/libraries/{lib}/documents/d00012?include_embeddings=true"
        ))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    let want = TestEmbedder
        .embed(None, &["text 12".to_string()], Purpose::Document)
        .expect("embed");
    let got: Vec<f32> = d["chunks"][0]["embedding"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_f64)
                .map(|x| x as f32)
                .collect()
        })
        .unwrap_or_default();
    if !got.is_empty() {
        assert_eq!(got, want[0], "{d}");
    }
    let hits = search(&c, &base, &lib, &want[0]).await;
    assert_eq!(
        hits[0].1, "0.000000",
        "the re-embedded vector is searchable: {hits:?}"
    );
}

/// A server with a chosen job configuration.
async fn server_with(
    config: quiver_jobs::JobsConfig,
) -> (String, Client, Arc<Engine>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(EngineConfig::new(dir.path())).expect("open");
    let jobs = quiver_jobs::Jobs::start(engine.clone(), config).expect("jobs");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let options = quiver_server::ServeOptions {
        jobs: Some(jobs),
        ..Default::default()
    };
    tokio::spawn(quiver_server::serve_with(
        listener,
        engine.clone(),
        options,
        std::future::pending(),
    ));
    (base, Client::new(), engine, dir)
}

/// An I/O failure is retried with backoff up to `max_retries`, then the job fails with the
/// reason; every retry is a `job.retrying` event.
#[tokio::test]
async fn io_failures_are_retried_then_fail() {
    let (base, c, engine, dir) = server_with(quiver_jobs::JobsConfig {
        workers: 1,
        ..Default::default()
    })
    .await;
    let lib = library(&c, &base, "retry", "flat").await;
    fill(&c, &base, &lib, 5).await;
    // Keep the only worker busy while the input file disappears.
    let (_, v) = submit(
        &c,
        &base,
        "batch_export",
        json!({"library_id": lib, "batch_size": 1, "pause_ms": 100}),
    )
    .await;
    let blocker = v["job_id"].as_str().expect("id").to_string();
    let path = dir.path().join("import").join("gone.ndjson");
    std::fs::write(&path, doc_line(1) + "\n").expect("write");
    let (s, v) = submit(
        &c,
        &base,
        "batch_import",
        json!({"library_id": lib, "path": path, "max_retries": 2}),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let id = v["job_id"].as_str().expect("id").to_string();
    std::fs::remove_file(&path).expect("remove");
    assert_eq!(wait(&c, &base, &blocker).await["status"], "completed");
    let j = wait(&c, &base, &id).await;
    assert_eq!(j["status"], "failed", "{j}");
    assert_eq!(j["attempts"], 3, "{j}");
    assert_eq!(j["error"]["error"], "io_error", "{j}");
    let evs = events_of(&engine, &id);
    assert_eq!(
        evs.iter().filter(|e| *e == "job.retrying").count(),
        2,
        "{evs:?}"
    );
    assert_eq!(
        evs.iter().filter(|e| *e == "job.started").count(),
        3,
        "{evs:?}"
    );
}

/// Past the queue limit a submission is a 503; finished jobs (and their files) go once the
/// retention has passed.
#[tokio::test]
async fn queue_limit_and_retention() {
    let (base, c, _engine, dir) = server_with(quiver_jobs::JobsConfig {
        workers: 1,
        queue_limit: 2,
        retention: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let lib = library(&c, &base, "limits", "flat").await;
    fill(&c, &base, &lib, 5).await;
    let slow = json!({"library_id": lib, "batch_size": 1, "pause_ms": 100});
    let (s1, a) = submit(&c, &base, "batch_export", slow.clone()).await;
    let (s2, b) = submit(&c, &base, "batch_export", slow.clone()).await;
    let (s3, full) = submit(&c, &base, "batch_export", slow).await;
    assert_eq!((s1, s2, s3), (202, 202, 503), "{full}");
    assert_eq!(full["error"], "job_queue_full");
    let a = a["job_id"].as_str().expect("id").to_string();
    let b = b["job_id"].as_str().expect("id").to_string();
    assert_eq!(wait(&c, &base, &a).await["status"], "completed");
    assert_eq!(wait(&c, &base, &b).await["status"], "completed");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = c
            .get(format!("{base}/v1/jobs/{a}"))
            .send()
            .await
            .expect("get");
        if r.status() == 404 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "finished job kept past its retention"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !dir.path().join("jobs").join(&a).exists(),
        "its export file went too"
    );
}

// ------------------------------------------------------------------ re-embedding, real models

const POTION: &str = "local:potion-base-8m";
const MINILM: &str = "local:all-minilm-l6-v2";

const TOPICS: [&str; 8] = [
    "The cat sat on the warm windowsill all afternoon.",
    "Stock markets fell sharply after the interest rate announcement.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Our team won the football match in the final minute.",
    "The spacecraft entered orbit around Mars after a long journey.",
    "Heavy rain caused flooding in the river valley.",
    "She practiced the violin every evening before dinner.",
    "The database stores every change as an event in its log.",
];

/// The model cache with both local models, or `None` (the test says it skipped, unless
/// `QUIVER_REQUIRE_MODELS=1`, where it fails).
fn installed_models() -> Option<std::path::PathBuf> {
    let dir = match std::env::var_os("QUIVER_MODEL_DIR") {
        Some(d) if !d.is_empty() => std::path::PathBuf::from(d),
        _ => {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/quiver-models")
        }
    };
    for m in [POTION, MINILM] {
        if !matches!(quiver_embed::models::is_installed(m, &dir), Ok(true)) {
            let why = format!("{m} is not installed in {}", dir.display());
            if std::env::var("QUIVER_REQUIRE_MODELS").is_ok_and(|v| v == "1") {
                panic!("{why}");
            }
            eprintln!("SKIPPED: {why}");
            return None;
        }
    }
    Some(dir)
}

async fn text_search(c: &Client, base: &str, lib: &str, q: &str) -> Vec<(String, String)> {
    let r = c
        .post(format!("{base}/v1/libraries/{lib}/search"))
        .json(&json!({"query": q, "k": 5}))
        .send()
        .await
        .expect("search");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    v["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|h| {
            (
                h["chunk"]["text"].as_str().unwrap_or("").to_string(),
                format!("{:.5}", h["distance"].as_f64().unwrap_or(-1.0)),
            )
        })
        .collect()
}

async fn library_json(c: &Client, base: &str, lib: &str) -> Value {
    c.get(format!("{base}/v1/libraries/{lib}"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

/// Every chunk's stored vector length, over all documents of `lib`.
async fn vector_lengths(c: &Client, base: &str, lib: &str, ids: &[String]) -> Vec<usize> {
    let mut out = Vec::new();
    for id in ids {
        let d: Value = c
            .get(format!(
                "{base}/v1/libraries/{lib}/documents/{id}?include_embeddings=true"
            ))
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json");
        for ch in d["chunks"].as_array().expect("chunks") {
            out.push(ch["embedding"].as_array().map_or(0, Vec::len));
        }
    }
    out
}

/// Every event type of `library`, in log order.
fn library_events(engine: &Engine, library: &str) -> Vec<String> {
    log_records(engine)
        .into_iter()
        .filter(|rec| rec.change.library_id() == Some(library))
        .map(|rec| rec.change.event_type().to_string())
        .collect()
}

/// `regenerate_embeddings` with `embedding_model` moves a library to another model and
/// dimension (potion-base-8M, 256-d → all-MiniLM-L6-v2, 384-d; client vectors, 4-d → 384-d):
/// searches keep answering from the old vectors while it runs, a document written during the
/// run is re-embedded too, a cancel leaves the library exactly as it was, and the end state is
/// every chunk at the new dimension with text search ranking by the new model.
#[tokio::test]
async fn regenerate_embeddings_with_another_model_and_dimension() {
    let Some(models) = installed_models() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rc = quiver_embed::registry::RegistryConfig::new(&models);
    rc.auto_install = false;
    let registry = quiver_embed::registry::Registry::new(rc).expect("registry");
    let engine =
        Engine::open_with(EngineConfig::new(dir.path()), Arc::new(registry)).expect("open");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(quiver_server::serve(
        listener,
        engine.clone(),
        std::future::pending(),
    ));
    let c = Client::new();

    // A library on potion-base-8M, with text.
    let r = c
        .post(format!("{base}/v1/libraries"))
        .json(&json!({"name": "notes", "embedding_model": POTION}))
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 201);
    let lib = r.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(library_json(&c, &base, &lib).await["dimension"], 256);
    let n = 64;
    let body: String = (0..n)
        .map(|i| {
            json!({"id": format!("t{i:03}"), "title": format!("note {i}"),
                   "chunks": [{"text": format!("{} (note {i})", TOPICS[i % TOPICS.len()])}]})
            .to_string()
                + "\n"
        })
        .collect();
    let r = c
        .post(format!("{base}/v1/libraries/{lib}/documents/stream"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .expect("ingest");
    assert_eq!(r.status(), 200);
    let reply = r.text().await.expect("reply");
    assert!(!reply.contains("\"error\""), "{reply}");
    let query = "a kitten resting by the window";
    let before = text_search(&c, &base, &lib, query).await;
    assert!(!before.is_empty());

    // Refusals: an unknown model, and a library with a chunk that has no text.
    let (s, v) = submit(
        &c,
        &base,
        "regenerate_embeddings",
        json!({"library_id": lib, "embedding_model": "local:no-such-model"}),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (422, Some("unknown_model")),
        "{v}"
    );
    let bare = library(&c, &base, "bare", "flat").await;
    let r = c
        .post(format!("{base}/v1/libraries/{bare}/documents"))
        .json(&json!({"id": "v", "title": "vector only", "chunks": [{"text": "", "embedding": vector(1)}]}))
        .send()
        .await
        .expect("add");
    assert_eq!(r.status(), 201);
    let (s, v) = submit(
        &c,
        &base,
        "regenerate_embeddings",
        json!({"library_id": bare, "embedding_model": MINILM}),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (422, Some("chunks_without_text")),
        "{v}"
    );

    // Cancel mid-run: the library is exactly as it was, and nothing stays staged.
    let (s, v) = submit(
        &c,
        &base,
        "regenerate_embeddings",
        json!({"library_id": lib, "embedding_model": MINILM, "batch_size": 2, "pause_ms": 100}),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let id = v["job_id"].as_str().expect("id").to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = job(&c, &base, &id).await;
        if j["progress"]["current"].as_u64().unwrap_or(0) >= 4 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {j}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = c
        .delete(format!("{base}/v1/jobs/{id}"))
        .send()
        .await
        .expect("cancel");
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(wait(&c, &base, &id).await["status"], "cancelled");
    let l = library_json(&c, &base, &lib).await;
    assert_eq!(
        (l["dimension"].as_u64(), l["embedding_model"].as_str()),
        (Some(256), Some(POTION)),
        "{l}"
    );
    assert_eq!(
        text_search(&c, &base, &lib, query).await,
        before,
        "a cancel changes nothing"
    );
    assert!(
        engine.reembeddings_staged().is_empty(),
        "the staging was discarded"
    );

    // The real run: searches keep answering (from the 256-d vectors) while it runs; a second
    // re-embedding of the same library is refused; a document written meanwhile is redone.
    let (s, v) = submit(
        &c,
        &base,
        "regenerate_embeddings",
        json!({"library_id": lib, "embedding_model": MINILM, "batch_size": 4, "pause_ms": 40}),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let id = v["job_id"].as_str().expect("id").to_string();
    let (s, v) = submit(
        &c,
        &base,
        "regenerate_embeddings",
        json!({"library_id": lib, "embedding_model": MINILM}),
    )
    .await;
    assert_eq!((s, v["error"].as_str()), (409, Some("job_conflict")), "{v}");
    let mut searched_while_running = 0;
    let mut late_written = false;
    loop {
        let j = job(&c, &base, &id).await;
        if j["status"] != "running" && j["status"] != "queued" {
            break;
        }
        if j["status"] == "running" && j["progress"]["current"].as_u64().unwrap_or(0) > 0 {
            let l = library_json(&c, &base, &lib).await;
            if l["dimension"] == 256 {
                assert!(!text_search(&c, &base, &lib, query).await.is_empty());
                searched_while_running += 1;
                if !late_written {
                    let r = c
                        .post(format!("{base}/v1/libraries/{lib}/documents"))
                        .json(&json!({"id": "late", "title": "late",
                                      "chunks": [{"text": "A kitten naps by the sunny window."}]}))
                        .send()
                        .await
                        .expect("add");
                    assert_eq!(r.status(), 201);
                    late_written = true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(
        searched_while_running > 0 && late_written,
        "the job ran too fast to observe"
    );
    let j = wait(&c, &base, &id).await;
    assert_eq!(j["status"], "completed", "{j}");
    assert_eq!(j["result"]["dimension"], 384, "{j}");
    assert_eq!(j["result"]["from"]["dimension"], 256, "{j}");
    assert_eq!(j["result"]["documents"], n as u64 + 1, "{j}");
    let l = library_json(&c, &base, &lib).await;
    assert_eq!(
        (l["dimension"].as_u64(), l["embedding_model"].as_str()),
        (Some(384), Some(MINILM)),
        "{l}"
    );
    let mut ids: Vec<String> = (0..n).map(|i| format!("t{i:03}")).collect();
    ids.push("late".into());
    let lens = vector_lengths(&c, &base, &lib, &ids).await;
    assert_eq!(lens.len(), n + 1);
    assert!(lens.iter().all(|&d| d == 384), "{lens:?}");
    let after = text_search(&c, &base, &lib, query).await;
    assert!(
        after[0].0.contains("kitten") || after[0].0.contains("cat"),
        "{after:?}"
    );
    // Queries are embedded with the new model, and new text is too.
    let r = c
        .post(format!("{base}/v1/libraries/{lib}/documents"))
        .json(&json!({"id": "new", "title": "new", "chunks": [{"text": "Rain fell all night."}]}))
        .send()
        .await
        .expect("add");
    assert_eq!(r.status(), 201);
    assert_eq!(
        vector_lengths(&c, &base, &lib, &["new".into()]).await,
        vec![384]
    );
    let evs = library_events(&engine, &lib);
    let count = |t: &str| evs.iter().filter(|e| *e == t).count();
    assert_eq!(count("library.reembedding_started"), 2, "{evs:?}");
    assert_eq!(count("library.reembedding_discarded"), 1, "{evs:?}");
    assert_eq!(count("library.reembedded"), 1, "{evs:?}");
    assert!(count("library.reembedding_staged") > n, "{evs:?}");
    assert!(
        engine.snapshot().is_ok(),
        "snapshots resume after the switch"
    );
    assert!(engine.reembeddings_staged().is_empty());

    // A library of client vectors (4-d, no model) gets a model and 384-d vectors.
    let vecs = library(&c, &base, "vecs", "hnsw").await;
    fill(&c, &base, &vecs, 20).await;
    let j = run(
        &c,
        &base,
        "regenerate_embeddings",
        json!({"library_id": vecs, "embedding_model": MINILM}),
    )
    .await;
    assert_eq!(j["status"], "completed", "{j}");
    let l = library_json(&c, &base, &vecs).await;
    assert_eq!(
        (l["dimension"].as_u64(), l["embedding_model"].as_str()),
        (Some(384), Some(MINILM)),
        "{l}"
    );
    let ids: Vec<String> = (0..20).map(|i| format!("d{i:05}")).collect();
    assert!(vector_lengths(&c, &base, &vecs, &ids)
        .await
        .iter()
        .all(|&d| d == 384));
    let hits = text_search(&c, &base, &vecs, "text 7").await;
    assert!(!hits.is_empty());
}

/// `batch_import` reads a server file only inside an import directory (`<data_dir>/import`
/// by default, or `--import-dir`), after resolving `..` and symlinks: escapes are a 403 that
/// changes nothing, a bad file inside is a 422, and a file swapped for an escaping symlink
/// after submission fails the job at run time.
#[tokio::test]
async fn import_paths_are_confined_to_the_import_directories() {
    let outside_dir = tempfile::tempdir().expect("tempdir");
    let allowed_dir = tempfile::tempdir().expect("tempdir");
    let (base, c, _engine, dir) = server_with(quiver_jobs::JobsConfig {
        workers: 1,
        import_dirs: vec![allowed_dir.path().to_path_buf()],
        ..Default::default()
    })
    .await;
    let lib = library(&c, &base, "confined", "flat").await;
    let lines: String = (0..10).map(|i| doc_line(i) + "\n").collect();
    let outside = outside_dir.path().join("outside.ndjson");
    std::fs::write(&outside, &lines).expect("write");
    // The data directory's own import folder is not allowed when --import-dir is given.
    let default_import = dir.path().join("import");
    std::fs::create_dir_all(&default_import).expect("mkdir");
    std::fs::write(default_import.join("d.ndjson"), &lines).expect("write");
    let inside = allowed_dir.path();
    std::os::unix::fs::symlink(&outside, inside.join("link.ndjson")).expect("symlink");
    std::os::unix::fs::symlink(outside_dir.path(), inside.join("dirlink")).expect("symlink");
    std::fs::create_dir_all(inside.join("sub")).expect("mkdir");
    let escape = format!("{}/sub/../../{}", inside.display(), {
        let o = outside_dir.path();
        format!(
            "{}/outside.ndjson",
            o.strip_prefix(inside.parent().expect("parent"))
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| o.display().to_string())
        )
    });
    for (path, status, code) in [
        (outside.display().to_string(), 403, "path_not_allowed"),
        (escape, 403, "path_not_allowed"),
        ("../outside.ndjson".to_string(), 403, "path_not_allowed"),
        ("link.ndjson".to_string(), 403, "path_not_allowed"),
        (
            "dirlink/outside.ndjson".to_string(),
            403,
            "path_not_allowed",
        ),
        ("/etc/passwd".to_string(), 403, "path_not_allowed"),
        (
            default_import.join("d.ndjson").display().to_string(),
            403,
            "path_not_allowed",
        ),
        ("missing.ndjson".to_string(), 422, "invalid_path"),
        ("sub".to_string(), 422, "invalid_path"),
    ] {
        let (s, v) = submit(
            &c,
            &base,
            "batch_import",
            json!({"library_id": lib, "path": path}),
        )
        .await;
        assert_eq!(
            (s, v["error"].as_str()),
            (status, Some(code)),
            "{path}: {v}"
        );
        assert!(!v["detail"].as_str().unwrap_or("").is_empty(), "{v}");
    }
    assert_eq!(count(&c, &base, &lib).await, 0, "refusals change nothing");

    // Inside, by a relative or an absolute path: imported.
    std::fs::write(inside.join("sub").join("ok.ndjson"), &lines).expect("write");
    let j = run(
        &c,
        &base,
        "batch_import",
        json!({"library_id": lib, "path": "sub/ok.ndjson"}),
    )
    .await;
    assert_eq!(j["status"], "completed", "{j}");
    assert_eq!(j["result"]["committed"], 10, "{j}");

    // Swapped for an escaping symlink while queued: the job fails, nothing is imported.
    let other = library(&c, &base, "confined2", "flat").await;
    fill(&c, &base, &other, 5).await;
    let (_, v) = submit(
        &c,
        &base,
        "batch_export",
        json!({"library_id": other, "batch_size": 1, "pause_ms": 100}),
    )
    .await;
    let blocker = v["job_id"].as_str().expect("id").to_string();
    let swapped = inside.join("swap.ndjson");
    std::fs::write(&swapped, &lines).expect("write");
    let (s, v) = submit(
        &c,
        &base,
        "batch_import",
        json!({"library_id": other, "path": swapped}),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let id = v["job_id"].as_str().expect("id").to_string();
    std::fs::remove_file(&swapped).expect("rm");
    std::os::unix::fs::symlink(&outside, &swapped).expect("symlink");
    assert_eq!(wait(&c, &base, &blocker).await["status"], "completed");
    let j = wait(&c, &base, &id).await;
    assert_eq!(j["status"], "failed", "{j}");
    assert_eq!(j["error"]["error"], "path_not_allowed", "{j}");
    assert_eq!(count(&c, &base, &other).await, 5);
}
