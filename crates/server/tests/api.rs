//! API tests over real HTTP: the server runs in-process on a port-0 listener and every route
//! of the v1 contract (health, libraries, documents, chunks, batch, search) is exercised,
//! with its error paths, through reqwest.

mod common;

use quiver_engine::{Engine, EngineConfig};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;

struct Server {
    base: String,
    client: Client,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    engine: Option<Arc<Engine>>,
    dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Server {
        Self::start_in(tempfile::tempdir().unwrap()).await
    }

    async fn start_in(dir: tempfile::TempDir) -> Server {
        let engine = Engine::open(EngineConfig::new(dir.path())).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(quiver_server::serve(listener, engine.clone(), async move {
            let _ = rx.await;
        }));
        Server {
            base,
            client: Client::new(),
            shutdown: Some(tx),
            task: Some(task),
            engine: Some(engine),
            dir,
        }
    }

    /// Stops the server and closes the engine, keeping the data directory.
    async fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
        let engine = self.engine.take().unwrap();
        engine.close().unwrap();
        drop(engine);
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.client.request(method, self.url(path));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, v)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }
    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }
    async fn patch(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(reqwest::Method::PATCH, path, Some(body)).await
    }
    async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::DELETE, path, None).await
    }
    async fn raw_post(&self, path: &str, body: &'static str) -> (StatusCode, Value) {
        let resp = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap())
    }

    async fn library(&self, name: &str, dim: u32, metric: &str) -> String {
        let (s, v) = self
            .post(
                "/v1/libraries",
                json!({"name": name, "dimension": dim, "metric": metric}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["id"].as_str().unwrap().to_string()
    }
}

fn assert_error(status: StatusCode, body: &Value, want_status: StatusCode, want_code: &str) {
    assert_eq!(status, want_status, "body: {body}");
    assert_eq!(body["error"], want_code, "body: {body}");
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "a detail sentence: {body}"
    );
}

#[tokio::test]
async fn health_reports_version_and_seq() {
    let s = Server::start().await;
    let (st, v) = s.get("/health").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["status"], "healthy");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["seq"], 0);
    let (st, v) = s.get("/v1/nope").await;
    assert_error(st, &v, StatusCode::NOT_FOUND, "route_not_found");
}

#[tokio::test]
async fn library_lifecycle_and_errors() {
    let s = Server::start().await;
    let (st, v) = s
        .post(
            "/v1/libraries",
            json!({"name": "docs", "description": "d", "dimension": 4, "metric": "l2", "metadata": {"team": "x"}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["seq"], 1);
    assert_eq!(v["dimension"], 4);
    assert_eq!(v["metric"], "l2");
    assert_eq!(v["index_type"], "flat");
    assert_eq!(v["num_documents"], 0);
    assert_eq!(v["metadata"]["team"], "x");

    // Errors change nothing.
    let (st, v) = s
        .post("/v1/libraries", json!({"name": "docs", "dimension": 4}))
        .await;
    assert_error(st, &v, StatusCode::CONFLICT, "library_exists");
    let (st, v) = s.post("/v1/libraries", json!({"name": "nodim"})).await;
    assert_error(
        st,
        &v,
        StatusCode::UNPROCESSABLE_ENTITY,
        "dimension_required",
    );
    let (st, v) = s
        .post("/v1/libraries", json!({"name": "big", "dimension": 5000}))
        .await;
    assert_error(
        st,
        &v,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_dimension",
    );
    let (st, v) = s
        .post(
            "/v1/libraries",
            json!({"name": "m", "dimension": 3, "metric": "hamming"}),
        )
        .await;
    assert_error(st, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_metric");
    let (st, v) = s
        .post(
            "/v1/libraries",
            json!({"name": "i", "dimension": 3, "index_type": "lsh"}),
        )
        .await;
    assert_error(
        st,
        &v,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_index_type",
    );
    let (st, v) = s
        .post(
            "/v1/libraries",
            json!({"name": "x".repeat(300), "dimension": 3}),
        )
        .await;
    assert_error(st, &v, StatusCode::PAYLOAD_TOO_LARGE, "name_too_long");
    let (st, v) = s
        .post(
            "/v1/libraries",
            json!({"name": "u", "dimension": 3, "surprise": 1}),
        )
        .await;
    assert_error(st, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    let (st, v) = s.raw_post("/v1/libraries", "{\"name\": ").await;
    assert_error(st, &v, StatusCode::BAD_REQUEST, "malformed_json");
    let (st, v) = s
        .post("/v1/libraries", json!({"name": 7, "dimension": 3}))
        .await;
    assert_error(st, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    let (_, v) = s.get("/v1/libraries").await;
    assert_eq!(v["total"], 1, "failed creates changed nothing");
    assert_eq!(v["seq"], 1);

    // Read by id and by name.
    let (st, v) = s.get(&format!("/v1/libraries/{id}")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["name"], "docs");
    let (_, v) = s.get("/v1/libraries/docs").await;
    assert_eq!(v["id"], id);
    let (st, v) = s.get("/v1/libraries/missing").await;
    assert_error(st, &v, StatusCode::NOT_FOUND, "library_not_found");

    // Update.
    s.library("other", 2, "dot").await;
    let (st, v) = s
        .patch(
            &format!("/v1/libraries/{id}"),
            json!({"name": "renamed", "description": "new"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["name"], "renamed");
    assert_eq!(v["description"], "new");
    assert_eq!(v["seq"], 3);
    let (st, v) = s
        .patch(&format!("/v1/libraries/{id}"), json!({"name": "other"}))
        .await;
    assert_error(st, &v, StatusCode::CONFLICT, "library_exists");
    let (st, v) = s
        .patch(&format!("/v1/libraries/{id}"), json!({"dimension": 8}))
        .await;
    assert_error(st, &v, StatusCode::UNPROCESSABLE_ENTITY, "immutable_field");
    let (st, _) = s
        .patch(
            &format!("/v1/libraries/{id}"),
            json!({"dimension": 4, "metric": "l2"}),
        )
        .await;
    assert_eq!(
        st,
        StatusCode::OK,
        "unchanged immutable fields are accepted"
    );
    let (st, v) = s.patch("/v1/libraries/ghost", json!({"name": "g"})).await;
    assert_error(st, &v, StatusCode::NOT_FOUND, "library_not_found");
    let (_, v) = s.get("/v1/libraries/docs").await;
    assert_eq!(v["error"], "library_not_found", "the old name is free");

    // Delete.
    let resp = s
        .client
        .delete(s.url(&format!("/v1/libraries/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(resp.headers()["x-quiver-seq"], "5");
    let (st, v) = s.delete(&format!("/v1/libraries/{id}")).await;
    assert_error(st, &v, StatusCode::NOT_FOUND, "library_not_found");
    let (_, v) = s.get("/v1/libraries").await;
    assert_eq!(v["total"], 1);
}

#[tokio::test]
async fn documents_upsert_read_page_delete() {
    let s = Server::start().await;
    let lib = s.library("docs", 3, "cosine").await;
    let p = |rest: &str| format!("/v1/libraries/{lib}{rest}");
    let doc = json!({"id": "d1", "title": "First", "metadata": {"lang": "en"},
                     "chunks": [{"id": "c1", "text": "alpha", "embedding": [3.0, 4.0, 0.0], "metadata": {"page": 1}},
                                {"text": "beta", "embedding": [0.0, 1.0, 0.0]}]});
    let (st, v) = s.post(&p("/documents"), doc.clone()).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["id"], "d1");
    assert_eq!(v["created"], true);
    assert_eq!(v["num_chunks"], 2);
    assert!(
        v["chunks"][0].get("embedding").is_none(),
        "embeddings only when asked"
    );
    let seq1 = v["seq"].as_u64().unwrap();

    // Read back, with normalised vectors when asked.
    let (st, v) = s.get(&p("/documents/d1?include_embeddings=true")).await;
    assert_eq!(st, StatusCode::OK);
    let e = v["chunks"][0]["embedding"].as_array().unwrap();
    assert!(
        (e[0].as_f64().unwrap() - 0.6).abs() < 1e-6 && (e[1].as_f64().unwrap() - 0.8).abs() < 1e-6
    );
    assert_eq!(v["chunks"][0]["metadata"]["page"], 1);
    let created_at = v["created_at"].clone();

    // Same id again: an update, not a duplicate; created_at kept.
    let (st, v) = s
        .post(&p("/documents"), json!({"id": "d1", "title": "First v2", "chunks": [{"text": "gamma", "embedding": [1, 1, 1]}]}))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["created"], false);
    assert_eq!(v["title"], "First v2");
    assert_eq!(v["num_chunks"], 1);
    assert_eq!(v["created_at"], created_at);
    assert_eq!(v["seq"].as_u64().unwrap(), seq1 + 1);
    let (_, v) = s.get(&format!("/v1/libraries/{lib}")).await;
    assert_eq!(v["num_documents"], 1);
    assert_eq!(v["num_chunks"], 1);

    // Bad documents change nothing.
    let bad = [
        (
            json!({"title": "x", "chunks": [{"text": "t", "embedding": [1, 2]}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "dimension_mismatch",
        ),
        (
            json!({"title": "x", "chunks": [{"text": "t", "embedding": [0, 0, 0]}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_vector",
        ),
        (
            json!({"title": "x", "chunks": [{"text": "t", "embedding": [1e39, 0, 0]}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_vector",
        ),
        (
            json!({"title": "x", "texts": ["only text"]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "embedding_unavailable",
        ),
        (
            json!({"id": "a/b", "title": "x"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_id",
        ),
        (
            json!({"id": "batch", "title": "x"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "reserved_id",
        ),
        (
            json!({"title": "x", "chunks": [{"id": "c", "embedding": [1, 0, 0]}, {"id": "c", "embedding": [1, 0, 0]}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "duplicate_chunk_id",
        ),
        (
            json!({"title": "x", "chunks": [{"text": "x".repeat(70_000), "embedding": [1, 0, 0]}]}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "text_too_long",
        ),
        (
            json!({"title": "x", "chunks": (0..4097).map(|_| json!({"embedding": [1, 0, 0]})).collect::<Vec<_>>()}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_chunks",
        ),
        (
            json!({"title": "x", "chunks": [{"embedding": [1, 0, 0], "embedding_b64": "AAAA"}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_vector",
        ),
        (
            json!({"title": "x", "metadata": "not an object"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
    ];
    for (body, status, code) in bad {
        let (st, v) = s.post(&p("/documents"), body).await;
        assert_error(st, &v, status, code);
    }
    let (st, v) = s
        .post("/v1/libraries/nope/documents", json!({"title": "x"}))
        .await;
    assert_error(st, &v, StatusCode::NOT_FOUND, "library_not_found");
    let (_, v) = s.get("/health").await;
    assert_eq!(
        v["seq"].as_u64().unwrap(),
        seq1 + 1,
        "rejected writes did not reach the log"
    );

    // embedding_b64 works like embedding.
    use base64::Engine as _;
    let raw: Vec<u8> = [0.0f32, 0.0, 2.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
    let (st, v) = s
        .post(
            &p("/documents"),
            json!({"id": "d2", "title": "B", "chunks": [{"embedding_b64": b64}]}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");

    // Paging.
    for i in 0..25 {
        let (st, _) = s
            .post(&p("/documents"), json!({"id": format!("p{i:02}"), "title": "p", "chunks": [{"embedding": [1, 2, 3]}]}))
            .await;
        assert_eq!(st, StatusCode::CREATED);
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let q = match &after {
            Some(a) => format!("/documents?limit=10&after={a}"),
            None => "/documents?limit=10".to_string(),
        };
        let (st, v) = s.get(&p(&q)).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(v["total"], 27);
        assert!(
            v["documents"][0].get("chunks").is_none(),
            "lists hold summaries"
        );
        for d in v["documents"].as_array().unwrap() {
            seen.push(d["id"].as_str().unwrap().to_string());
        }
        match v["next_after"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen, sorted, "pages are in id order without repeats");
    assert_eq!(seen.len(), 27);
    let (st, v) = s.get(&p("/documents?limit=0")).await;
    assert_error(st, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_limit");
    let (st, v) = s.get(&p("/documents?limit=5000")).await;
    assert_error(st, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_limit");

    // Delete.
    let (st, _) = s.delete(&p("/documents/d1")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, v) = s.get(&p("/documents/d1")).await;
    assert_error(st, &v, StatusCode::NOT_FOUND, "document_not_found");
    let (st, v) = s.delete(&p("/documents/d1")).await;
    assert_error(st, &v, StatusCode::NOT_FOUND, "document_not_found");
}

#[tokio::test]
async fn chunk_routes() {
    let s = Server::start().await;
    let lib = s.library("docs", 2, "l2").await;
    let p = |rest: &str| format!("/v1/libraries/{lib}{rest}");
    s.post(
        &p("/documents"),
        json!({"id": "d", "title": "T", "chunks": [{"id": "a", "embedding": [0, 0]}]}),
    )
    .await;
    let (st, v) = s
        .post(
            &p("/documents/d/chunks"),
            json!({"chunks": [{"id": "b", "text": "bee", "embedding": [1, 1]}]}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["num_chunks"], 2);
    let (st, v) = s
        .post(
            &p("/documents/d/chunks"),
            json!({"chunks": [{"id": "b", "embedding": [1, 1]}]}),
        )
        .await;
    assert_error(st, &v, StatusCode::CONFLICT, "chunk_exists");
    let (st, v) = s
        .post(
            &p("/documents/d/chunks"),
            json!({"chunks": [{"embedding": [1]}]}),
        )
        .await;
    assert_error(
        st,
        &v,
        StatusCode::UNPROCESSABLE_ENTITY,
        "dimension_mismatch",
    );
    let (st, v) = s
        .post(&p("/documents/d/chunks"), json!({"chunks": []}))
        .await;
    assert_error(st, &v, StatusCode::UNPROCESSABLE_ENTITY, "no_chunks");
    let (st, v) = s
        .post(
            &p("/documents/zz/chunks"),
            json!({"chunks": [{"embedding": [1, 1]}]}),
        )
        .await;
    assert_error(st, &v, StatusCode::NOT_FOUND, "document_not_found");

    // The new chunk is searchable, the deleted one is not.
    let (_, v) = s
        .post(&p("/search"), json!({"embedding": [1, 1], "k": 1}))
        .await;
    assert_eq!(v["results"][0]["chunk"]["id"], "b");
    let (st, _) = s.delete(&p("/documents/d/chunks/b")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (_, v) = s
        .post(&p("/search"), json!({"embedding": [1, 1], "k": 5}))
        .await;
    assert_eq!(v["total_results"], 1);
    assert_eq!(v["results"][0]["chunk"]["id"], "a");
    let (st, v) = s.delete(&p("/documents/d/chunks/b")).await;
    assert_error(st, &v, StatusCode::NOT_FOUND, "chunk_not_found");
    let (_, v) = s.get(&format!("/v1/libraries/{lib}")).await;
    assert_eq!(v["num_chunks"], 1);
}

#[tokio::test]
async fn batch_commits_good_items_and_reports_bad_ones() {
    let s = Server::start().await;
    let lib = s.library("docs", 2, "dot").await;
    let p = |rest: &str| format!("/v1/libraries/{lib}{rest}");
    let (st, v) = s
        .post(
            &p("/documents/batch"),
            json!({"documents": [
                {"id": "ok1", "title": "a", "chunks": [{"embedding": [1, 0]}]},
                {"id": "bad", "title": "b", "chunks": [{"embedding": [1, 0, 0]}]},
                {"id": "ok2", "title": "c", "chunks": [{"embedding": [0, 1]}]},
                {"what": "ever"},
                {"id": "ok1", "title": "a2", "chunks": [{"embedding": [1, 1]}]},
            ]}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["committed"], 3);
    assert_eq!(v["failed"], 2);
    let r = v["results"].as_array().unwrap();
    assert_eq!(r[0]["ok"], true);
    assert_eq!(r[1]["ok"], false);
    assert_eq!(r[1]["error"], "dimension_mismatch");
    assert_eq!(r[3]["error"], "invalid_document");
    assert_eq!(
        r[4]["created"], false,
        "a repeated id within a batch is an update"
    );
    let seqs: Vec<u64> = [0, 2, 4]
        .iter()
        .map(|&i| r[i]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        vec![2, 3, 4],
        "each good item has its own seq, in order"
    );
    assert_eq!(v["seq"], 4);
    let (_, v) = s.get(&p("/documents/ok1")).await;
    assert_eq!(v["title"], "a2");
    let (_, v) = s.get(&p("/documents/bad")).await;
    assert_eq!(v["error"], "document_not_found");

    let (st, v) = s
        .post(&p("/documents/batch"), json!({"documents": []}))
        .await;
    assert_error(st, &v, StatusCode::UNPROCESSABLE_ENTITY, "empty_batch");
    let many: Vec<Value> = (0..1001)
        .map(|i| json!({"id": format!("m{i}"), "title": "m"}))
        .collect();
    let (st, v) = s
        .post(&p("/documents/batch"), json!({"documents": many}))
        .await;
    assert_error(st, &v, StatusCode::PAYLOAD_TOO_LARGE, "batch_too_large");
    let (st, v) = s.post(&p("/documents/batch"), json!({"docs": []})).await;
    assert_error(st, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
}

#[tokio::test]
async fn search_orders_filters_and_limits() {
    let s = Server::start().await;
    let lib = s.library("docs", 2, "l2").await;
    let p = |rest: &str| format!("/v1/libraries/{lib}{rest}");
    for i in 0..10 {
        let (st, v) = s
            .post(
                &p("/documents"),
                json!({"id": format!("d{i}"), "title": format!("Doc {i}"), "metadata": {"even": i % 2 == 0, "n": i},
                       "chunks": [{"id": format!("c{i}"), "text": format!("t{i}"), "embedding": [i as f32, 0.0], "metadata": {"tag": if i < 5 {"low"} else {"high"}}}]}),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    let (st, v) = s
        .post(&p("/search"), json!({"embedding": [3.2, 0], "k": 3}))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let ids: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["document_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["d3", "d4", "d2"]);
    assert!(
        (v["results"][0]["distance"].as_f64().unwrap() - 0.2).abs() < 1e-5,
        "l2 is the Euclidean distance"
    );
    assert_eq!(v["results"][0]["chunk"]["text"], "t3");
    assert_eq!(v["results"][0]["document_title"], "Doc 3");
    assert_eq!(v["total_results"], 3);
    assert_eq!(v["seq"], 11);
    assert!(v["query_time_ms"].as_f64().is_some());

    // Filters apply during the scan: still k results when k match.
    let (_, v) = s
        .post(&p("/search"), json!({"embedding": [3.2, 0], "k": 3, "filter": [{"field": "even", "operator": "eq", "value": true}]}))
        .await;
    let ids: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["document_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["d4", "d2", "d6"]);
    let (_, v) = s
        .post(
            &p("/search"),
            json!({"embedding": [0, 0], "k": 10, "filter": {"must": [{"field": "tag", "operator": "eq", "value": "high"}],
                                                             "must_not": [{"field": "document.n", "operator": "in", "value": [5, 6]}]}}),
        )
        .await;
    let ids: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["document_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["d7", "d8", "d9"]);
    let (_, v) = s
        .post(
            &p("/search"),
            json!({"embedding": [0, 0], "k": 10, "distance_threshold": 2.0}),
        )
        .await;
    assert_eq!(v["total_results"], 3, "distance ≤ 2 keeps d0, d1, d2: {v}");

    // Errors.
    for (body, status, code) in [
        (
            json!({"embedding": [0, 0], "k": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_k",
        ),
        (
            json!({"embedding": [0, 0], "k": 1001}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_k",
        ),
        (
            json!({"embedding": [0, 0, 0]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "dimension_mismatch",
        ),
        (
            json!({"k": 3}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing_query",
        ),
        (
            json!({"query": "text"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "embedding_unavailable",
        ),
        (
            json!({"embedding": [0, 0], "filter": [{"field": "n", "operator": "like", "value": 1}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_filter",
        ),
        (
            json!({"embedding": [0, 0], "nope": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
    ] {
        let (st, v) = s.post(&p("/search"), body).await;
        assert_error(st, &v, status, code);
    }
    let (st, v) = s.raw_post(&p("/search"), "{\"embedding\": [").await;
    assert_error(st, &v, StatusCode::BAD_REQUEST, "malformed_json");
    let (st, v) = s
        .post("/v1/libraries/nope/search", json!({"embedding": [0, 0]}))
        .await;
    assert_error(st, &v, StatusCode::NOT_FOUND, "library_not_found");
}

#[tokio::test]
async fn oversized_body_is_refused_with_json() {
    let s = Server::start().await;
    let lib = s.library("docs", 2, "l2").await;
    let body = vec![b' '; quiver_model::limits::BODY_BYTES_LIMIT + 1];
    let resp = s
        .client
        .post(s.url(&format!("/v1/libraries/{lib}/documents")))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"], "body_too_large");
}

#[tokio::test]
async fn trace_ids_are_echoed() {
    let s = Server::start().await;
    let resp = s
        .client
        .get(s.url("/health"))
        .header("x-request-id", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "req-42");
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let resp = s
        .client
        .get(s.url("/health"))
        .header("traceparent", tp)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["x-trace-id"],
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(resp.headers()["traceparent"], tp);
}

#[tokio::test]
async fn everything_survives_a_restart() {
    let s = Server::start().await;
    let lib = s.library("docs", 3, "cosine").await;
    for i in 0..20 {
        s.post(
            &format!("/v1/libraries/{lib}/documents"),
            json!({"id": format!("d{i}"), "title": format!("T{i}"), "metadata": {"i": i},
                   "chunks": [{"text": "x", "embedding": [1.0 + i as f32, 2.0, 3.0]}]}),
        )
        .await;
    }
    s.delete(&format!("/v1/libraries/{lib}/documents/d3")).await;
    let (_, before) = s
        .post(
            &format!("/v1/libraries/{lib}/search"),
            json!({"embedding": [1, 2, 3], "k": 5}),
        )
        .await;
    let (_, lib_before) = s.get(&format!("/v1/libraries/{lib}")).await;
    let dir = s.stop().await;

    let s = Server::start_in(dir).await;
    let (_, after) = s
        .post(
            &format!("/v1/libraries/{lib}/search"),
            json!({"embedding": [1, 2, 3], "k": 5}),
        )
        .await;
    assert_eq!(before["results"], after["results"]);
    assert_eq!(before["seq"], after["seq"]);
    let (_, lib_after) = s.get(&format!("/v1/libraries/{lib}")).await;
    // Everything but the index's allocated capacity, which depends on growth history.
    let strip = |mut v: Value| {
        v.as_object_mut().unwrap().remove("index");
        v
    };
    assert_eq!(strip(lib_before), strip(lib_after));
    let (_, v) = s.get(&format!("/v1/libraries/{lib}/documents/d3")).await;
    assert_eq!(v["error"], "document_not_found");
    // The next write continues the sequence.
    let (_, v) = s
        .post(
            &format!("/v1/libraries/{lib}/documents"),
            json!({"title": "new"}),
        )
        .await;
    assert_eq!(
        v["seq"].as_u64().unwrap(),
        before["seq"].as_u64().unwrap() + 1
    );
}

/// `search.performed` is opt-in: off by default, and with the flag every search leaves an
/// event with its query, k, result count and duration.
#[tokio::test]
async fn search_events_are_opt_in() {
    for emit in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = EngineConfig::new(dir.path());
        config.emit_search_events = emit;
        let (base, _engine) = common::spawn(config).await;
        let c = Client::new();
        c.post(format!("{base}/v1/libraries"))
            .json(&json!({"name": "d", "dimension": 2}))
            .send()
            .await
            .unwrap();
        c.post(format!("{base}/v1/libraries/d/documents"))
            .json(&json!({"chunks": [{"embedding": [1, 0]}]}))
            .send()
            .await
            .unwrap();
        let r = c
            .post(format!("{base}/v1/libraries/d/search"))
            .json(&json!({"embedding": [1, 1], "k": 3}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let v: Value = c
            .get(format!(
                "{base}/v1/events?from_seq=1&types=search.*&wait_ms=2000"
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let events = v["events"].as_array().unwrap();
        if emit {
            assert_eq!(events.len(), 1, "{v}");
            assert_eq!(events[0]["type"], "search.performed");
            assert_eq!(events[0]["data"]["k"], 3);
            assert_eq!(events[0]["data"]["results_count"], 1);
            assert!(events[0]["data"]["duration_ms"].as_f64().is_some());
        } else {
            assert!(events.is_empty(), "{v}");
        }
    }
}
