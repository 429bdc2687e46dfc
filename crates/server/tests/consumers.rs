//! Durable consumer groups, the library statistics projection and semantic (`near`)
//! subscriptions, over real sockets against in-process servers on 127.0.0.1:0. The restart
//! test closes the first server (graceful shutdown, engine closed and dropped) and opens a
//! second one on the same data directory.

use futures::{Stream, StreamExt};
use quiver_engine::{Engine, EngineConfig, FsyncPolicy};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

const STEP_TIMEOUT: Duration = Duration::from_secs(20);

struct Server {
    base: String,
    engine: Arc<Engine>,
    http: reqwest::Client,
    shutdown: tokio::sync::oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(dir: &Path) -> Server {
    let mut c = EngineConfig::new(dir);
    c.fsync = FsyncPolicy::Never;
    // A previous server in this process may still be releasing the data directory's lock.
    let deadline = Instant::now() + STEP_TIMEOUT;
    let engine = loop {
        match Engine::open(c.clone()) {
            Ok(e) => break e,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the engine does not open: {e}"),
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(quiver_server::serve(listener, engine.clone(), async {
        let _ = rx.await;
    }));
    Server {
        base,
        engine,
        http: reqwest::Client::new(),
        shutdown: tx,
        serving,
    }
}

impl Server {
    /// Graceful shutdown, then the engine is closed and every handle to it dropped.
    async fn stop(self) {
        drop(self.http);
        let _ = self.shutdown.send(());
        tokio::time::timeout(STEP_TIMEOUT, self.serving)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
        self.engine.close().unwrap();
        let deadline = Instant::now() + STEP_TIMEOUT;
        while Arc::strong_count(&self.engine) > 1 {
            assert!(Instant::now() < deadline, "engine handles are released");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn req(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.req(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.req(reqwest::Method::GET, path, None).await
    }

    async fn library(&self, name: &str) -> String {
        let (st, lib) = self
            .post(
                "/v1/libraries",
                json!({"name": name, "dimension": 2, "metric": "l2"}),
            )
            .await;
        assert_eq!(st, 201, "{lib}");
        lib["id"].as_str().unwrap().to_string()
    }

    async fn publish(&self, i: usize) -> u64 {
        let (st, body) = self
            .post("/v1/events", json!({"type": "app.job", "data": {"i": i}}))
            .await;
        assert_eq!(st, 201, "{body}");
        body["seq"].as_u64().unwrap()
    }

    async fn consumer(&self, body: Value) -> Value {
        let (st, c) = self.post("/v1/consumers", body).await;
        assert_eq!(st, 201, "{c}");
        c
    }

    async fn next(&self, name: &str, max: usize, wait_ms: u64) -> Vec<Value> {
        let (st, body) = self
            .get(&format!(
                "/v1/consumers/{name}/next?max={max}&wait_ms={wait_ms}"
            ))
            .await;
        assert_eq!(st, 200, "{body}");
        body["events"].as_array().unwrap().clone()
    }

    async fn ack(&self, name: &str, seqs: &[u64]) -> Value {
        let (st, body) = self
            .post(&format!("/v1/consumers/{name}/ack"), json!({"seqs": seqs}))
            .await;
        assert_eq!(st, 200, "{body}");
        body
    }

    async fn inspect(&self, name: &str) -> Value {
        let (st, body) = self.get(&format!("/v1/consumers/{name}")).await;
        assert_eq!(st, 200, "{body}");
        body
    }
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_share_the_load_without_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(start(dir.path()).await);
    s.consumer(json!({"name": "jobs", "types": ["app.*"], "start": "now", "ack_wait_ms": 30000}))
        .await;
    const N: usize = 300;
    let mut workers = Vec::new();
    for _ in 0..2 {
        let s = Arc::clone(&s);
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let deadline = Instant::now() + STEP_TIMEOUT;
            loop {
                let (_, info) = s.get("/v1/consumers/jobs").await;
                if info["counters"]["acked"].as_u64() == Some(N as u64) {
                    break;
                }
                assert!(Instant::now() < deadline, "workers finish: {info}");
                let events = s.next("jobs", 7, 200).await;
                for e in &events {
                    assert_eq!(e["deliveries"], 1, "no redelivery while leases live");
                    assert_eq!(e["type"], "app.job");
                }
                let got = seqs(&events);
                if !got.is_empty() {
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    let acked = s.ack("jobs", &got).await;
                    assert_eq!(acked["acked"].as_array().unwrap().len(), got.len());
                }
                mine.extend(got);
            }
            mine
        }));
    }
    // Writers run while the workers long-poll.
    let mut published = BTreeSet::new();
    let mut writers = Vec::new();
    for w in 0..3 {
        let s = Arc::clone(&s);
        writers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..N / 3 {
                out.push(s.publish(w * 1000 + i).await);
            }
            out
        }));
    }
    for w in writers {
        published.extend(w.await.unwrap());
    }
    let a = workers.remove(0).await.unwrap();
    let b = workers.remove(0).await.unwrap();
    assert!(
        !a.is_empty() && !b.is_empty(),
        "both workers got work: {} / {}",
        a.len(),
        b.len()
    );
    let sa: BTreeSet<u64> = a.iter().copied().collect();
    let sb: BTreeSet<u64> = b.iter().copied().collect();
    assert_eq!(sa.len(), a.len(), "no seq twice to one worker");
    assert!(sa.is_disjoint(&sb), "no seq to both workers");
    let all: BTreeSet<u64> = sa.union(&sb).copied().collect();
    assert_eq!(
        all, published,
        "together they acked everything exactly once"
    );
    let info = s.inspect("jobs").await;
    assert_eq!(info["pending"], 0, "{info}");
    assert_eq!(info["lag"], 0, "{info}");
    assert_eq!(info["counters"]["delivered"], N as u64);
    assert_eq!(info["counters"]["redelivered"], 0);
    // Statistics and metrics show the consumer.
    let (_, stats) = s.get("/v1/events/statistics").await;
    let c = &stats["consumers"][0];
    assert_eq!(c["name"], "jobs");
    assert_eq!(c["lag"], 0);
    assert_eq!(c["filter"]["types"], json!(["app.*"]));
    let metrics = s
        .http
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("quiver_consumer_acked_total{consumer=\"jobs\"} 300"),
        "{metrics}"
    );
    assert!(metrics.contains("quiver_consumer_lag{consumer=\"jobs\"} 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_leases_are_redelivered_and_poison_is_parked() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    s.consumer(json!({"name": "w", "start": "now", "ack_wait_ms": 300, "max_deliver": 3}))
        .await;
    let mut published = Vec::new();
    for i in 0..5 {
        published.push(s.publish(i).await);
    }
    // Worker A leases everything and dies.
    let a = s.next("w", 10, 1000).await;
    assert_eq!(seqs(&a), published);
    assert!(
        s.next("w", 10, 0).await.is_empty(),
        "live leases are exclusive"
    );
    // Worker B gets them again once ack_wait_ms has passed.
    let t = Instant::now();
    let b = s.next("w", 10, 5000).await;
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(seqs(&b), published);
    assert!(b.iter().all(|e| e["deliveries"] == 2));
    // B acks all but one poison event, which it nacks until it is parked.
    let poison = published[2];
    let rest: Vec<u64> = published.iter().copied().filter(|&q| q != poison).collect();
    s.ack("w", &rest).await;
    let (st, body) = s
        .post("/v1/consumers/w/nack", json!({"seqs": [poison]}))
        .await;
    assert_eq!((st, &body["nacked"]), (200, &json!([poison])), "{body}");
    let c = s.next("w", 10, 1000).await;
    assert_eq!(seqs(&c), vec![poison]);
    assert_eq!(c[0]["deliveries"], 3);
    s.post("/v1/consumers/w/nack", json!({"seqs": [poison]}))
        .await;
    // Delivered max_deliver (3) times: parked, not delivered again.
    assert!(s.next("w", 10, 300).await.is_empty());
    let info = s.inspect("w").await;
    assert_eq!(
        (info["parked"].clone(), info["pending"].clone()),
        (json!(1), json!(0)),
        "{info}"
    );
    assert_eq!(info["counters"]["redelivered"], 6);
    let (st, parked) = s.get("/v1/consumers/w/parked").await;
    assert_eq!(st, 200);
    assert_eq!(parked["parked"][0]["seq"], poison);
    assert_eq!(parked["parked"][0]["deliveries"], 3);
    assert_eq!(parked["parked"][0]["event"]["data"]["i"], 2);
    // Retry from parked: delivered afresh, acked, gone.
    let (st, _) = s
        .post(&format!("/v1/consumers/w/parked/{poison}/retry"), json!({}))
        .await;
    assert_eq!(st, 200);
    let d = s.next("w", 10, 1000).await;
    assert_eq!(seqs(&d), vec![poison]);
    assert_eq!(d[0]["deliveries"], 1);
    s.ack("w", &[poison]).await;
    let info = s.inspect("w").await;
    assert_eq!(
        (
            info["parked"].clone(),
            info["pending"].clone(),
            info["lag"].clone()
        ),
        (json!(0), json!(0), json!(0))
    );
    // A nack with a delay holds the event back for that long.
    let q = s.publish(99).await;
    assert_eq!(seqs(&s.next("w", 1, 1000).await), vec![q]);
    s.post(
        "/v1/consumers/w/nack",
        json!({"seqs": [q], "delay_ms": 400}),
    )
    .await;
    assert!(s.next("w", 1, 0).await.is_empty());
    let t = Instant::now();
    assert_eq!(seqs(&s.next("w", 1, 3000).await), vec![q]);
    assert!(t.elapsed() >= Duration::from_millis(250));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_acks_and_the_projection_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let lib = s.library("kept").await;
    for i in 0..4 {
        let (st, body) = s
            .post(
                &format!("/v1/libraries/{lib}/documents"),
                json!({"id": format!("d{i}"), "title": "t", "chunks": [
                    {"text": "a", "embedding": [1.0, 0.0]}, {"text": "b", "embedding": [0.0, 1.0]}]}),
            )
            .await;
        assert_eq!(st, 201, "{body}");
    }
    s.consumer(
        json!({"name": "durable", "types": "app.*", "start": "beginning", "ack_wait_ms": 500}),
    )
    .await;
    let mut published = Vec::new();
    for i in 0..10 {
        published.push(s.publish(i).await);
    }
    let got = s.next("durable", 10, 1000).await;
    assert_eq!(seqs(&got), published);
    s.ack("durable", &published[..6]).await;
    let (st, stats_before) = s.get(&format!("/v1/libraries/{lib}/statistics")).await;
    assert_eq!(st, 200, "{stats_before}");
    assert_eq!(
        (
            stats_before["documents"].clone(),
            stats_before["chunks"].clone()
        ),
        (json!(4), json!(8))
    );
    s.stop().await;

    let s = start(dir.path()).await;
    let info = s.inspect("durable").await;
    assert_eq!(info["counters"]["acked"], 6, "{info}");
    assert_eq!(info["pending"], 4);
    assert_eq!(info["ack_floor"], published[6] - 1);
    // The 4 leased-but-unacked events come back (at least once); acked ones never do.
    let again = s.next("durable", 100, 5000).await;
    assert_eq!(seqs(&again), published[6..].to_vec());
    assert!(again.iter().all(|e| e["deliveries"] == 2), "{again:?}");
    s.ack("durable", &published[6..]).await;
    let newer = vec![s.publish(10).await, s.publish(11).await];
    assert_eq!(seqs(&s.next("durable", 100, 1000).await), newer);
    // The projection resumed from its checkpoint: no double counting, and a rebuild agrees.
    let (_, stats_after) = s.get(&format!("/v1/libraries/{lib}/statistics")).await;
    for k in [
        "documents",
        "chunks",
        "events_total",
        "events_by_type",
        "last_seq",
        "created_seq",
    ] {
        assert_eq!(stats_after[k], stats_before[k], "{k}");
    }
    let (st, rebuilt) = s
        .post("/v1/projections/library_stats/rebuild", json!({}))
        .await;
    assert_eq!(st, 200, "{rebuilt}");
    assert_eq!(rebuilt["equal_to_live"], true, "{rebuilt}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_rebuilt_from_seq_1_equals_the_live_one() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let a = s.library("a").await;
    let b = s.library("b").await;
    let docs = |lib: &str| format!("/v1/libraries/{lib}/documents");
    for (lib, n) in [(&a, 5), (&b, 3)] {
        for i in 0..n {
            let chunks: Vec<Value> = (0..=i % 3)
                .map(|j| json!({"id": format!("c{j}"), "text": "x", "embedding": [j as f32, 1.0]}))
                .collect();
            let (st, body) = s
                .post(
                    &docs(lib),
                    json!({"id": format!("d{i}"), "title": "t", "chunks": chunks}),
                )
                .await;
            assert_eq!(st, 201, "{body}");
        }
    }
    // Replace one, add chunks, delete a chunk and a document.
    s.post(
        &docs(&a),
        json!({"id": "d0", "title": "t2", "chunks": [{"text": "y", "embedding": [0.5, 0.5]}]}),
    )
    .await;
    let (st, body) = s
        .post(
            &format!("{}/d1/chunks", docs(&a)),
            json!({"chunks": [{"id": "n1", "text": "z", "embedding": [1.0, 1.0]}]}),
        )
        .await;
    assert_eq!(st, 201, "{body}");
    let sr = &s;
    let del = |p: String| async move { sr.req(reqwest::Method::DELETE, &p, None).await };
    assert_eq!(del(format!("{}/d1/chunks/n1", docs(&a))).await.0, 204);
    assert_eq!(del(format!("{}/d2", docs(&a))).await.0, 204);
    s.post(
        "/v1/events",
        json!({"type": "app.note", "library_id": a, "data": {}}),
    )
    .await;

    for lib in [&a, &b] {
        let (_, engine_view) = s.get(&format!("/v1/libraries/{lib}")).await;
        let (st, stats) = s.get(&format!("/v1/libraries/{lib}/statistics")).await;
        assert_eq!(st, 200, "{stats}");
        assert_eq!(stats["documents"], engine_view["num_documents"], "{stats}");
        assert_eq!(stats["chunks"], engine_view["num_chunks"], "{stats}");
    }
    let (_, live) = s.get("/v1/projections/library_stats").await;
    assert_eq!(live["libraries"][&a]["events_by_type"]["app.note"], 1);
    let (st, rebuilt) = s
        .post("/v1/projections/library_stats/rebuild", json!({}))
        .await;
    assert_eq!(st, 200);
    assert_eq!(rebuilt["equal_to_live"], true);
    assert_eq!(rebuilt["rebuilt_through"], live["checkpoint"]);
    assert_eq!(rebuilt["libraries"], live["libraries"]);
    // Included per library in the bus statistics.
    let (_, stats) = s.get("/v1/events/statistics").await;
    assert_eq!(stats["library_statistics"]["libraries"], live["libraries"]);
    // A deleted library has no statistics.
    assert_eq!(
        s.req(reqwest::Method::DELETE, &format!("/v1/libraries/{b}"), None)
            .await
            .0,
        204
    );
    let (st, err) = s.get(&format!("/v1/libraries/{b}/statistics")).await;
    assert_eq!(
        (st, err["error"].as_str()),
        (404, Some("library_not_found"))
    );
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>>;

/// The next SSE event frame's `data` as JSON.
async fn sse_next(stream: &mut ByteStream, buf: &mut Vec<u8>) -> Value {
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let raw: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8(raw).unwrap();
            if let Some(data) = text.lines().find_map(|l| l.strip_prefix("data: ")) {
                if text.lines().any(|l| l.starts_with("event: ")) {
                    return serde_json::from_str(data).unwrap();
                }
            }
            continue;
        }
        match tokio::time::timeout(STEP_TIMEOUT, stream.next()).await {
            Ok(Some(Ok(bytes))) => buf.extend_from_slice(&bytes),
            other => panic!("the SSE stream ended: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_delivers_only_events_within_distance() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let lib = s.library("sem").await;
    let near = json!({"embedding": [1.0, 0.0], "max_distance": 0.5});
    s.consumer(json!({"name": "sem", "library_id": lib, "start": "now", "near": near}))
        .await;
    let resp = s
        .http
        .get(format!(
            "{}/v1/events/stream?library_id={lib}&near_embedding=1,0&max_distance=0.5",
            s.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream: ByteStream = Box::pin(resp.bytes_stream());
    let mut buf = Vec::new();

    let docs = format!("/v1/libraries/{lib}/documents");
    let post = |body: Value| s.post(&docs, body);
    let (_, far) = post(json!({"id": "far", "title": "f", "chunks": [{"id": "f1", "text": "x", "embedding": [-1.0, 0.0]}]})).await;
    let (_, close) = post(json!({"id": "close", "title": "c", "chunks": [
        {"id": "c1", "text": "x", "embedding": [0.0, 5.0]}, {"id": "c2", "text": "y", "embedding": [1.0, 0.3]}]})).await;
    let (_, added) = s
        .post(
            &format!("{docs}/far/chunks"),
            json!({"chunks": [{"id": "f2", "text": "z", "embedding": [0.9, 0.0]}]}),
        )
        .await;
    s.req(reqwest::Method::DELETE, &format!("{docs}/close"), None)
        .await;
    s.post(
        "/v1/events",
        json!({"type": "app.x", "library_id": lib, "data": {}}),
    )
    .await;
    let (_, last) = post(json!({"id": "far2", "title": "f", "chunks": [{"id": "g", "text": "x", "embedding": [3.0, 3.0]}]})).await;
    let (_, fin) = post(json!({"id": "end", "title": "e", "chunks": [{"id": "e1", "text": "x", "embedding": [1.0, 0.0]}]})).await;
    let _ = (far, last);
    let want = vec![
        close["seq"].as_u64().unwrap(),
        added["seq"].as_u64().unwrap(),
        fin["seq"].as_u64().unwrap(),
    ];

    // SSE: in order, so once the last matching one arrives nothing else slipped in between.
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(sse_next(&mut stream, &mut buf).await);
    }
    assert_eq!(seqs(&got), want);
    assert_eq!(got[0]["near"]["chunk_id"], "c2");
    assert!((got[0]["near"]["distance"].as_f64().unwrap() - 0.3).abs() < 1e-5);
    assert_eq!(got[1]["type"], "chunk.added");
    assert_eq!(got[1]["near"]["chunk_id"], "f2");

    // The consumer sees the same three.
    let events = s.next("sem", 100, 2000).await;
    assert_eq!(seqs(&events), want);
    assert_eq!(events[2]["near"]["distance"], 0.0);
    let info = s.inspect("sem").await;
    assert_eq!(info["filter"]["near"]["max_distance"], 0.5);

    // near.query goes through the embedder: none is configured here.
    let (st, err) = s
        .post(
            "/v1/consumers",
            json!({"name": "q", "library_id": lib, "near": {"query": "cats", "max_distance": 0.5}}),
        )
        .await;
    assert_eq!(
        (st, err["error"].as_str()),
        (422, Some("embedding_unavailable")),
        "{err}"
    );
    let (st, err) = s
        .get(&format!(
            "/v1/events/stream?library_id={lib}&near_query=cats&max_distance=1"
        ))
        .await;
    assert_eq!(
        (st, err["error"].as_str()),
        (422, Some("embedding_unavailable"))
    );
    // near needs a library, a distance and the library's dimension.
    let (st, err) = s
        .post("/v1/consumers", json!({"name": "q", "near": near}))
        .await;
    assert_eq!(
        (st, err["error"].as_str()),
        (422, Some("near_requires_library"))
    );
    let (st, err) = s
        .post(
            "/v1/consumers",
            json!({"name": "q", "library_id": lib, "near": {"embedding": [1.0, 0.0]}}),
        )
        .await;
    assert_eq!(
        (st, err["error"].as_str()),
        (422, Some("missing_max_distance"))
    );
    let (st, err) = s
        .get(&format!(
            "/v1/events/stream?library_id={lib}&near_embedding=1,0,0&max_distance=1"
        ))
        .await;
    assert_eq!(
        (st, err["error"].as_str()),
        (422, Some("dimension_mismatch"))
    );
    let (st, err) = s
        .get(&format!(
            "/v1/events/stream?library_id={lib}&near_embedding=1,x&max_distance=1"
        ))
        .await;
    assert_eq!(
        (st, err["error"].as_str()),
        (400, Some("invalid_near_embedding"))
    );
}

/// `near` plus a metadata filter: only chunks within distance *and* passing the filter
/// count, on the SSE stream (`near_filter=`) and on a consumer (`near.filter`); a bad filter
/// is refused with `invalid_filter` and creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_with_a_metadata_filter() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let lib = s.library("semf").await;
    let filter = json!({"lang": "fr"});
    let near = json!({"embedding": [1.0, 0.0], "max_distance": 0.5, "filter": filter});
    s.consumer(json!({"name": "fr", "library_id": lib, "start": "now", "near": near}))
        .await;
    let filter_q: String = url_encode(&filter.to_string());
    let resp = s
        .http
        .get(format!(
            "{}/v1/events/stream?library_id={lib}&near_embedding=1,0&max_distance=0.5&near_filter={filter_q}",
            s.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream: ByteStream = Box::pin(resp.bytes_stream());
    let mut buf = Vec::new();

    let docs = format!("/v1/libraries/{lib}/documents");
    // Near but English: passed over. Near and French (chunk metadata): delivered, and the
    // match names the French chunk even though the English one is closer.
    s.post(
        &docs,
        json!({"id": "en", "title": "e", "chunks": [
        {"id": "e1", "text": "x", "embedding": [1.0, 0.0], "metadata": {"lang": "en"}}]}),
    )
    .await;
    let (_, mixed) = s
        .post(
            &docs,
            json!({"id": "mix", "title": "m", "chunks": [
            {"id": "m-en", "text": "x", "embedding": [1.0, 0.0], "metadata": {"lang": "en"}},
            {"id": "m-fr", "text": "y", "embedding": [1.0, 0.2], "metadata": {"lang": "fr"}}]}),
        )
        .await;
    // French but far: passed over. Document-level metadata counts for a document event.
    s.post(
        &docs,
        json!({"id": "far", "title": "f", "chunks": [
        {"id": "f1", "text": "x", "embedding": [-1.0, 0.0], "metadata": {"lang": "fr"}}]}),
    )
    .await;
    let (_, docfr) = s
        .post(
            &docs,
            json!({"id": "dfr", "title": "d", "metadata": {"lang": "fr"}, "chunks": [
            {"id": "d1", "text": "x", "embedding": [0.9, 0.0]}]}),
        )
        .await;
    let want = vec![
        mixed["seq"].as_u64().unwrap(),
        docfr["seq"].as_u64().unwrap(),
    ];

    let got = vec![
        sse_next(&mut stream, &mut buf).await,
        sse_next(&mut stream, &mut buf).await,
    ];
    assert_eq!(seqs(&got), want);
    assert_eq!(got[0]["near"]["chunk_id"], "m-fr");
    assert_eq!(got[1]["near"]["chunk_id"], "d1");
    let events = s.next("fr", 100, 2000).await;
    assert_eq!(seqs(&events), want);
    let info = s.inspect("fr").await;
    assert_eq!(info["filter"]["near"]["filter"], filter);

    let bad = json!({"embedding": [1.0, 0.0], "max_distance": 0.5, "filter": {"field": "lang", "operator": "nope", "value": 1}});
    let (st, err) = s
        .post(
            "/v1/consumers",
            json!({"name": "bad", "library_id": lib, "near": bad}),
        )
        .await;
    assert_eq!(
        (st, err["error"].as_str()),
        (422, Some("invalid_filter")),
        "{err}"
    );
    let (st, _) = s.get("/v1/consumers/bad").await;
    assert_eq!(st, 404, "a refused consumer is not created");
    let (st, err) = s
        .get(&format!(
            "/v1/events/stream?library_id={lib}&near_embedding=1,0&max_distance=1&near_filter=%7Bnot"
        ))
        .await;
    assert_eq!((st, err["error"].as_str()), (400, Some("invalid_filter")));
    let (st, err) = s
        .get(&format!(
            "/v1/events/stream?library_id={lib}&near_filter={filter_q}"
        ))
        .await;
    assert_eq!((st, err["error"].as_str()), (400, Some("invalid_near")));
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let expect = |got: (u16, Value), status: u16, code: &str| {
        assert_eq!(got.0, status, "{}", got.1);
        assert_eq!(got.1["error"], code, "{}", got.1);
        assert!(
            got.1["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{}",
            got.1
        );
    };
    use reqwest::Method;
    expect(s.get("/v1/consumers/nope").await, 404, "consumer_not_found");
    expect(
        s.get("/v1/consumers/nope/next").await,
        404,
        "consumer_not_found",
    );
    expect(
        s.post("/v1/consumers/nope/ack", json!({"seqs": [1]})).await,
        404,
        "consumer_not_found",
    );
    expect(
        s.req(Method::DELETE, "/v1/consumers/nope", None).await,
        404,
        "consumer_not_found",
    );
    s.consumer(json!({"name": "c1"})).await;
    expect(
        s.post("/v1/consumers", json!({"name": "c1"})).await,
        409,
        "consumer_exists",
    );
    for (start, code, status) in [
        (json!("yesterday"), "invalid_start", 422),
        (json!(0), "invalid_start", 422),
        (json!(-3), "invalid_start", 422),
        (json!(1.5), "invalid_start", 422),
        (json!({"seq": 1}), "invalid_start", 422),
    ] {
        expect(
            s.post("/v1/consumers", json!({"name": "c2", "start": start}))
                .await,
            status,
            code,
        );
    }
    expect(
        s.post("/v1/consumers", json!({"name": "a/b"})).await,
        422,
        "invalid_name",
    );
    expect(
        s.post("/v1/consumers", json!({"name": "x".repeat(65)}))
            .await,
        422,
        "invalid_name",
    );
    expect(
        s.post("/v1/consumers", json!({"name": "c2", "ack_wait_ms": 10}))
            .await,
        422,
        "invalid_ack_wait_ms",
    );
    expect(
        s.post("/v1/consumers", json!({"name": "c2", "max_deliver": 0}))
            .await,
        422,
        "invalid_max_deliver",
    );
    expect(
        s.post("/v1/consumers", json!({"name": "c2", "types": 5}))
            .await,
        422,
        "invalid_types",
    );
    expect(
        s.post("/v1/consumers", json!({"name": "c2", "bogus": 1}))
            .await,
        422,
        "invalid_request",
    );
    let r = s
        .http
        .post(format!("{}/v1/consumers", s.base))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "malformed_json");
    expect(
        s.get("/v1/consumers/c1/next?max=0").await,
        400,
        "invalid_max",
    );
    expect(
        s.get("/v1/consumers/c1/next?max=1001").await,
        400,
        "invalid_max",
    );
    expect(
        s.get("/v1/consumers/c1/next?wait_ms=30001").await,
        400,
        "invalid_wait_ms",
    );
    expect(
        s.get("/v1/consumers/c1/next?max=abc").await,
        400,
        "invalid_query",
    );
    expect(
        s.post("/v1/consumers/c1/ack", json!({"seqs": []})).await,
        422,
        "invalid_seqs",
    );
    let many: Vec<u64> = (1..=10_001).collect();
    expect(
        s.post("/v1/consumers/c1/ack", json!({"seqs": many})).await,
        422,
        "invalid_seqs",
    );
    expect(
        s.post(
            "/v1/consumers/c1/nack",
            json!({"seqs": [1], "delay_ms": 4_000_000}),
        )
        .await,
        422,
        "invalid_delay_ms",
    );
    expect(
        s.post("/v1/consumers/c1/parked/5/retry", json!({})).await,
        404,
        "not_parked",
    );
    expect(
        s.post("/v1/consumers/c1/parked/x/retry", json!({})).await,
        400,
        "invalid_seq",
    );
    expect(
        s.get("/v1/consumers/c1/parked?limit=0").await,
        400,
        "invalid_limit",
    );
    // Acking what was never delivered is not an error, but says so.
    let body = s.ack("c1", &[12345]).await;
    assert_eq!(body["not_pending"], json!([12345]));
    // The consumer limit.
    for i in 1..256 {
        let (st, body) = s
            .post("/v1/consumers", json!({"name": format!("n{i}")}))
            .await;
        assert_eq!(st, 201, "{body}");
    }
    expect(
        s.post("/v1/consumers", json!({"name": "one-too-many"}))
            .await,
        409,
        "too_many_consumers",
    );
    let (st, list) = s.get("/v1/consumers").await;
    assert_eq!(st, 200);
    assert_eq!(list["consumers"].as_array().unwrap().len(), 256);
    assert_eq!(s.req(Method::DELETE, "/v1/consumers/c1", None).await.0, 204);
    expect(s.get("/v1/consumers/c1").await, 404, "consumer_not_found");
    // Unknown library statistics.
    expect(
        s.get("/v1/libraries/nope/statistics").await,
        404,
        "library_not_found",
    );
}
