//! The change stream over real sockets: SSE, pull, publish, statistics and metrics, against an
//! in-process server on 127.0.0.1. SSE is read with `bytes_stream()` and parsed here, so the
//! tests see exactly the bytes a browser would.

use futures::{Stream, StreamExt};
use quiver_engine::{Engine, EngineConfig, FsyncPolicy, Retention, WriteCtx};
use quiver_server::bus::{Bus, BusConfig};
use quiver_server::AppState;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

const STEP_TIMEOUT: Duration = Duration::from_secs(30);

struct Server {
    base: String,
    engine: Arc<Engine>,
    http: reqwest::Client,
    _shutdown: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

fn config(dir: &tempfile::TempDir) -> EngineConfig {
    let mut c = EngineConfig::new(dir.path());
    c.fsync = FsyncPolicy::Never;
    c
}

async fn start_with(configure: impl FnOnce(&mut EngineConfig)) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir);
    configure(&mut c);
    let engine = Engine::open(c).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(quiver_server::serve(listener, engine.clone(), async {
        let _ = rx.await;
    }));
    Server {
        base,
        engine,
        http: reqwest::Client::new(),
        _shutdown: tx,
        _dir: dir,
    }
}

async fn start() -> Server {
    start_with(|_| {}).await
}

/// A server with only the event routes and a bus of the given live-tail capacity.
async fn start_small_tail(capacity: usize) -> (Server, Arc<Bus>) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(config(&dir)).unwrap();
    let bus = Bus::start_with(
        engine.log().clone(),
        BusConfig {
            broadcast_capacity: capacity,
            ..BusConfig::default()
        },
    );
    let state = AppState {
        engine: engine.clone(),
        bus: bus.clone(),
    };
    let app = axum::Router::new()
        .merge(quiver_server::events::router())
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await
    });
    let server = Server {
        base,
        engine,
        http: reqwest::Client::new(),
        _shutdown: tx,
        _dir: dir,
    };
    (server, bus)
}

impl Server {
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> u16 {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.unwrap().status().as_u16()
    }

    async fn app_event(&self, event_type: &str, data: Value) -> u64 {
        let (status, body) = self
            .post("/v1/events", json!({"type": event_type, "data": data}))
            .await;
        assert_eq!(status, 201, "{body}");
        body["seq"].as_u64().unwrap()
    }

    async fn sse(&self, query: &str, last_event_id: Option<u64>) -> Sse {
        let mut req = self
            .http
            .get(format!("{}/v1/events/stream{query}", self.base));
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        Sse {
            stream: Box::pin(resp.bytes_stream()),
            buf: Vec::new(),
            saw_retry: false,
        }
    }

    async fn stats(&self) -> Value {
        let (status, body) = self.get("/v1/events/statistics").await;
        assert_eq!(status, 200);
        body
    }
}

#[derive(Debug)]
struct Frame {
    id: Option<u64>,
    event: Option<String>,
    data: String,
}

struct Sse {
    stream: Pin<Box<dyn Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>>,
    buf: Vec<u8>,
    saw_retry: bool,
}

impl Sse {
    /// The next frame that carries an event (skips `retry:` hints and comment heartbeats).
    async fn next(&mut self) -> Frame {
        tokio::time::timeout(STEP_TIMEOUT, self.next_inner())
            .await
            .expect("an SSE event within the step timeout")
    }

    async fn next_inner(&mut self) -> Frame {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8(raw).unwrap();
                let mut frame = Frame {
                    id: None,
                    event: None,
                    data: String::new(),
                };
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        frame.id = Some(v.parse().unwrap());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        frame.event = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        frame.data.push_str(v);
                    } else if line.starts_with("retry: 2000") {
                        self.saw_retry = true;
                    }
                }
                if frame.event.is_some() {
                    return frame;
                }
                continue;
            }
            match self.stream.next().await {
                Some(Ok(bytes)) => self.buf.extend_from_slice(&bytes),
                other => panic!("the SSE stream ended: {other:?}"),
            }
        }
    }

    async fn events(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let f = self.next().await;
            let v: Value = serde_json::from_str(&f.data).unwrap();
            assert_eq!(f.id, v["seq"].as_u64(), "the SSE id is the seq");
            assert_eq!(f.event.as_deref(), v["type"].as_str());
            out.push(v);
        }
        out
    }
}

fn assert_contiguous(events: &[Value]) {
    for w in events.windows(2) {
        assert_eq!(
            w[1]["seq"].as_u64().unwrap(),
            w[0]["seq"].as_u64().unwrap() + 1,
            "seqs in order with no gap"
        );
    }
}

async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_every_change_with_documented_shapes() {
    let s = start().await;
    let mut sse = s.sse("", None).await;
    let (st, lib) = s
        .post(
            "/v1/libraries",
            json!({"name": "docs", "dimension": 3, "metric": "l2"}),
        )
        .await;
    assert_eq!(st, 201, "{lib}");
    let lib_id = lib["id"].as_str().unwrap().to_string();
    let doc = json!({"id": "d1", "title": "One", "metadata": {"k": "v"},
        "chunks": [{"id": "c1", "text": "a", "embedding": [1.0, 0.0, 0.0]}]});
    let path = format!("/v1/libraries/{lib_id}/documents");
    assert_eq!(s.post(&path, doc.clone()).await.0, 201);
    assert_eq!(s.post(&path, doc).await.0, 200);
    let (st, body) = s
        .post(
            &format!("{path}/d1/chunks"),
            json!({"chunks": [{"id": "c2", "text": "b", "embedding": [0.0, 1.0, 0.0]}]}),
        )
        .await;
    assert_eq!(st, 201, "{body}");
    use reqwest::Method;
    assert_eq!(
        s.send(Method::DELETE, &format!("{path}/d1/chunks/c2"), None)
            .await,
        204
    );
    assert_eq!(
        s.send(
            Method::PATCH,
            &format!("/v1/libraries/{lib_id}"),
            Some(json!({"description": "new", "metadata": {"team": "x"}}))
        )
        .await,
        200
    );
    assert_eq!(
        s.send(Method::DELETE, &format!("{path}/d1"), None).await,
        204
    );
    let (st, body) = s
        .post(
            "/v1/events",
            json!({"type": "app.ping", "library_id": "docs", "data": {"n": 1}, "source": "tester"}),
        )
        .await;
    assert_eq!(st, 201, "{body}");
    assert_eq!(body["type"], "app.ping");
    assert_eq!(
        s.send(Method::DELETE, &format!("/v1/libraries/{lib_id}"), None)
            .await,
        204
    );

    let events = sse.events(9).await;
    assert!(sse.saw_retry, "the stream starts with a retry hint");
    assert_contiguous(&events);
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "library.created",
            "document.added",
            "document.updated",
            "chunk.added",
            "chunk.deleted",
            "library.updated",
            "document.deleted",
            "app.ping",
            "library.deleted"
        ]
    );
    for e in &events {
        for key in [
            "seq",
            "type",
            "library_id",
            "timestamp",
            "data",
            "source",
            "trace_id",
        ] {
            assert!(e.get(key).is_some(), "envelope has {key}: {e}");
        }
        assert_eq!(e["library_id"], lib_id.as_str());
        assert!(e["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(e["trace_id"].as_str().is_some_and(|t| !t.is_empty()));
    }
    assert_eq!(
        events[0]["data"],
        json!({"library_id": lib_id, "name": "docs", "index_type": "flat", "metric": "l2", "embedding_dimension": 3})
    );
    assert_eq!(
        events[1]["data"],
        json!({"document_id": "d1", "title": "One", "num_chunks": 1, "metadata": {"k": "v"}, "chunk_ids": ["c1"]})
    );
    assert_eq!(events[2]["data"]["chunk_ids"], json!(["c1"]));
    assert_eq!(
        events[3]["data"],
        json!({"document_id": "d1", "chunk_ids": ["c2"], "num_chunks": 1})
    );
    assert_eq!(
        events[4]["data"],
        json!({"document_id": "d1", "chunk_id": "c2"})
    );
    assert_eq!(
        events[5]["data"],
        json!({"library_id": lib_id, "name": "docs", "description": "new", "metadata": {"team": "x"}})
    );
    assert_eq!(events[6]["data"], json!({"document_id": "d1"}));
    assert_eq!(events[7]["data"], json!({"n": 1}));
    assert_eq!(events[7]["source"], "tester");
    assert_eq!(events[1]["source"], "api");
    assert_eq!(
        events[8]["data"],
        json!({"library_id": lib_id, "name": "docs"})
    );

    // The same history as CloudEvents, replayed from the first seq.
    let first = events[0]["seq"].as_u64().unwrap();
    let mut ce = s
        .sse(&format!("?from_seq={first}&format=cloudevents"), None)
        .await;
    let f = ce.next().await;
    let v: Value = serde_json::from_str(&f.data).unwrap();
    assert_eq!(v["specversion"], "1.0");
    assert_eq!(v["id"], first.to_string());
    assert_eq!(v["type"], "library.created");
    assert_eq!(v["source"], format!("/libraries/{lib_id}"));
    let f = ce.next().await;
    let v: Value = serde_json::from_str(&f.data).unwrap();
    assert_eq!(v["subject"], "d1");
    assert_eq!(v["datacontenttype"], "application/json");
    assert!(v["time"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_by_type_glob_and_library() {
    let s = start().await;
    let mut ids = Vec::new();
    for name in ["a", "b"] {
        let (st, lib) = s
            .post("/v1/libraries", json!({"name": name, "dimension": 2}))
            .await;
        assert_eq!(st, 201);
        ids.push(lib["id"].as_str().unwrap().to_string());
    }
    // `library_id` takes an id or a name (resolved to the id when the stream opens).
    let mut docs_a = s.sse("?types=document.*&library_id=a", None).await;
    let mut by_id = s.sse(&format!("?library_id={}", ids[1]), None).await;
    let mut deletions = s.sse("?types=*.deleted,app.*", None).await;
    for (i, id) in ids.iter().enumerate() {
        for d in 0..3 {
            let (st, _) = s
                .post(
                    &format!("/v1/libraries/{id}/documents"),
                    json!({"id": format!("d{d}"), "title": format!("lib{i} doc{d}"),
                       "chunks": [{"text": "x", "embedding": [1.0, 2.0]}]}),
                )
                .await;
            assert_eq!(st, 201);
        }
        let st = s
            .send(
                reqwest::Method::DELETE,
                &format!("/v1/libraries/{id}/documents/d0"),
                None,
            )
            .await;
        assert_eq!(st, 204);
    }
    s.app_event("app.done", json!({})).await;

    let got = docs_a.events(4).await;
    let summary: Vec<(String, String)> = got
        .iter()
        .map(|e| {
            assert_eq!(e["library_id"], ids[0].as_str());
            (
                e["type"].as_str().unwrap().to_string(),
                e["data"]["document_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("document.added".into(), "d0".into()),
            ("document.added".into(), "d1".into()),
            ("document.added".into(), "d2".into()),
            ("document.deleted".into(), "d0".into()),
        ]
    );
    let got = by_id.events(4).await;
    assert!(got.iter().all(|e| e["library_id"] == ids[1].as_str()));
    let got = deletions.events(3).await;
    let types: Vec<&str> = got.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["document.deleted", "document.deleted", "app.done"]);

    // Bad filters are a clear 400.
    let (st, body) = s
        .get(&format!("/v1/events/stream?types={}", "x,".repeat(100)))
        .await;
    assert_eq!(st, 400);
    assert_eq!(body["error"], "invalid_types");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_resumes_with_exactly_the_missed_events() {
    let s = start().await;
    let mut sse = s.sse("", None).await;
    for i in 0..3 {
        s.app_event("app.before", json!({"i": i})).await;
    }
    let got = sse.events(3).await;
    let last = got[2]["seq"].as_u64().unwrap();
    drop(sse);
    let mut missed = Vec::new();
    for i in 0..5 {
        missed.push(s.app_event("app.missed", json!({"i": i})).await);
    }
    // Last-Event-ID wins over from_seq.
    let mut sse = s.sse("?from_seq=1", Some(last)).await;
    let after = s.app_event("app.after", json!({})).await;
    let got = sse.events(6).await;
    let seqs: Vec<u64> = got.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    let mut want = missed.clone();
    want.push(after);
    assert_eq!(seqs, want);
    assert_eq!(missed[0], last + 1);

    // `since` finds the first event at or after a time.
    let first_missed_time = got[0]["timestamp"].as_str().unwrap().to_string();
    let (st, body) = s
        .get(&format!(
            "/v1/events?since={}&types=app.missed",
            first_missed_time
        ))
        .await;
    assert_eq!(st, 200, "{body}");
    let seqs: Vec<u64> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, missed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_pages_and_long_polls() {
    let s = start().await;
    let mut seqs = Vec::new();
    for i in 0..7 {
        seqs.push(s.app_event("app.page", json!({"i": i})).await);
    }
    let (st, body) = s
        .get(&format!("/v1/events?from_seq={}&limit=5", seqs[0]))
        .await;
    assert_eq!(st, 200, "{body}");
    let got: Vec<u64> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, seqs[..5]);
    assert_eq!(body["next_seq"], seqs[5]);
    assert_eq!(body["last_seq"], seqs[6]);
    assert!(body["first_seq"].as_u64().unwrap() <= seqs[0]);
    let (_, body) = s
        .get(&format!("/v1/events?from_seq={}&limit=5", seqs[5]))
        .await;
    assert_eq!(body["events"].as_array().unwrap().len(), 2);
    let next = body["next_seq"].as_u64().unwrap();
    assert_eq!(next, seqs[6] + 1);

    // Nothing new: a plain pull answers at once with no events.
    let (_, body) = s.get(&format!("/v1/events?from_seq={next}")).await;
    assert_eq!(body["events"], json!([]));
    assert_eq!(body["next_seq"], next);

    // A long-poll wakes on a matching write (and not on a filtered-out one).
    let poll = {
        let http = s.http.clone();
        let url = format!(
            "{}/v1/events?from_seq={next}&wait_ms=20000&types=app.wake",
            s.base
        );
        tokio::spawn(async move {
            let t = Instant::now();
            let body: Value = http.get(url).send().await.unwrap().json().await.unwrap();
            (body, t.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let skipped = s.app_event("app.ignored", json!({})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !poll.is_finished(),
        "a filtered-out event does not end the poll"
    );
    let woke = s.app_event("app.wake", json!({})).await;
    let (body, elapsed) = poll.await.unwrap();
    assert!(elapsed < Duration::from_secs(10), "woke on the write");
    let events = body["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["seq"], woke);
    assert!(skipped < woke);
    assert_eq!(body["next_seq"], woke + 1);

    // A long-poll with nothing to wake it times out empty.
    let t = Instant::now();
    let (_, body) = s
        .get(&format!("/v1/events?from_seq={}&wait_ms=300", woke + 1))
        .await;
    assert!(t.elapsed() >= Duration::from_millis(250));
    assert_eq!(body["events"], json!([]));

    for bad in ["limit=0", "limit=1001", "wait_ms=30001", "from_seq=x"] {
        let (st, _) = s.get(&format!("/v1/events?{bad}")).await;
        assert_eq!(st, 400, "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_round_trip_and_reserved_types() {
    let s = start().await;
    let mut sse = s.sse("", None).await;
    let r = s
        .http
        .post(format!("{}/v1/events", s.base))
        .header("X-Request-ID", "req-42")
        .json(&json!({"type": "app.order.placed", "data": {"order": 7}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    let seq = body["seq"].as_u64().unwrap();
    assert_eq!(body["type"], "app.order.placed");
    let e = &sse.events(1).await[0];
    assert_eq!(e["seq"], seq);
    assert_eq!(e["data"], json!({"order": 7}));
    assert_eq!(e["trace_id"], "req-42");
    assert_eq!(e["library_id"], Value::Null);

    for reserved in ["document.added", "library.created", "chunk.x"] {
        let (st, body) = s
            .post("/v1/events", json!({"type": reserved, "data": {}}))
            .await;
        assert_eq!(st, 422, "{reserved}");
        assert_eq!(body["error"], "reserved_event_type");
    }
    let (st, _) = s
        .post("/v1/events", json!({"type": "app.x", "library_id": "nope"}))
        .await;
    assert_eq!(st, 404);
    let (st, body) = s.post("/v1/events", json!({"data": {}})).await;
    assert_eq!(st, 422, "{body}");
    assert_eq!(
        s.engine.log().durable_seq(),
        seq,
        "refused events changed nothing"
    );
}

/// `POST /v1/events` with an NDJSON body (whole, or streamed line by line).
async fn post_ndjson(s: &Server, body: impl Into<reqwest::Body>) -> reqwest::Response {
    s.http
        .post(format!("{}/v1/events", s.base))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// NDJSON publish: one event per line on one request, each line answered with its seq once
/// durable (or its own error), a summary at the end; bad lines commit nothing and cost only
/// themselves; the stream sees exactly the good ones, in line order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_publish_answers_every_line() {
    let s = start().await;
    let mut sse = s.sse("?types=app.*", None).await;
    let before = s.engine.log().durable_seq();
    let mut body = String::new();
    for i in 0..300 {
        // Lines 50–59 carry their own source: one group becomes several commits, in order.
        let source = if (50..60).contains(&i) {
            format!(",\"source\":\"worker-{}\"", i % 2)
        } else {
            String::new()
        };
        body.push_str(&format!(
            "{{\"type\":\"app.tick\",\"data\":{{\"i\":{i}}}{source}}}\n"
        ));
        match i {
            10 => body.push_str("{not json\n"),
            20 => body.push_str("{\"type\":\"document.added\",\"data\":{}}\n"),
            30 => body.push_str("\n{\"data\":{}}\n"),
            40 => body.push_str("{\"type\":\"app.tick\",\"library_id\":\"nope\"}\n"),
            _ => {}
        }
    }
    let r = post_ndjson(&s, body).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (summary, statuses) = lines.split_last().unwrap();
    assert_eq!(statuses.len(), 304, "one status per non-blank line");
    let errors: Vec<(u64, &str)> = statuses
        .iter()
        .filter(|l| l["ok"] == false)
        .map(|l| (l["line"].as_u64().unwrap(), l["error"].as_str().unwrap()))
        .collect();
    assert_eq!(
        errors,
        vec![
            (12, "malformed_json"),
            (23, "reserved_event_type"),
            (35, "invalid_event"),
            (46, "library_not_found"),
        ]
    );
    let seqs: Vec<u64> = statuses.iter().filter_map(|l| l["seq"].as_u64()).collect();
    assert_eq!(seqs, ((before + 1)..=(before + 300)).collect::<Vec<_>>());
    assert_eq!(summary["summary"]["published"], 300);
    assert_eq!(summary["summary"]["failed"], 4);
    assert_eq!(summary["summary"]["last_seq"], before + 300);
    assert_eq!(
        s.engine.log().durable_seq(),
        before + 300,
        "bad lines committed nothing"
    );
    let events = sse.events(300).await;
    let is: Vec<u64> = events
        .iter()
        .map(|e| e["data"]["i"].as_u64().unwrap())
        .collect();
    assert_eq!(is, (0..300).collect::<Vec<_>>());
    for e in &events {
        let i = e["data"]["i"].as_u64().unwrap();
        let source = e["source"].as_str().unwrap_or("");
        if (50..60).contains(&i) {
            assert_eq!(
                source,
                format!("worker-{}", i % 2),
                "event {i}: its line's source"
            );
        } else {
            assert!(
                !source.starts_with("worker-"),
                "event {i}: the request's source"
            );
        }
    }

    // A plain JSON body still takes the single-event path.
    let (st, one) = s.post("/v1/events", json!({"type": "app.one"})).await;
    assert_eq!((st, one["seq"].as_u64()), (201, Some(before + 301)));
}

/// The next line of an NDJSON reply stream, parsed; `buf` holds what was read past it.
async fn next_ndjson_reply(
    replies: &mut (impl Stream<Item = reqwest::Result<axum::body::Bytes>> + Unpin),
    buf: &mut Vec<u8>,
) -> Value {
    loop {
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let reply: Vec<u8> = buf.drain(..=end).collect();
            return serde_json::from_slice(&reply).unwrap();
        }
        let chunk = tokio::time::timeout(Duration::from_secs(10), replies.next())
            .await
            .expect("a reply within 10 s: the line is not held back for more")
            .expect("the reply stream ended early")
            .unwrap();
        buf.extend_from_slice(&chunk);
    }
}

/// A pipelined publisher that sends one line and waits for its ack before the next (the
/// small groups that are appended on the connection's own task, where a 300-line body goes to
/// the blocking pool): each line is acknowledged on its own, in order, with its seq, without
/// waiting for more lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_publish_acks_each_line_as_it_arrives() {
    let s = start().await;
    let mut sse = s.sse("?types=app.step", None).await;
    let before = s.engine.log().durable_seq();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (line, rx))
    }));
    let line = |i: u64| format!("{{\"type\":\"app.step\",\"data\":{{\"i\":{i}}}}}\n").into_bytes();
    tx.send(Ok(line(0))).await.unwrap();
    let response = post_ndjson(&s, body).await;
    assert_eq!(response.status(), 200);
    let mut replies = response.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    for i in 0..40u64 {
        if i > 0 {
            tx.send(Ok(line(i))).await.unwrap();
        }
        let ack = next_ndjson_reply(&mut replies, &mut buf).await;
        assert_eq!(ack["ok"], true, "{ack}");
        assert_eq!(ack["line"], i + 1, "{ack}");
        assert_eq!(ack["seq"], before + 1 + i, "{ack}");
        assert!(
            s.engine.log().durable_seq() >= before + 1 + i,
            "acked only once durable"
        );
    }
    drop(tx);
    let summary = next_ndjson_reply(&mut replies, &mut buf).await;
    assert_eq!(summary["summary"]["published"], 40, "{summary}");
    assert_eq!(summary["summary"]["failed"], 0, "{summary}");
    let is: Vec<u64> = sse
        .events(40)
        .await
        .iter()
        .map(|e| e["data"]["i"].as_u64().unwrap())
        .collect();
    assert_eq!(is, (0..40).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_resume_is_410_with_first_seq() {
    let s = start_with(|c| {
        c.retention = Retention::NONE;
        c.segment_size_bytes_limit = 1024;
    })
    .await;
    for i in 0..60 {
        s.app_event("app.fill", json!({"i": i, "pad": "x".repeat(100)}))
            .await;
    }
    let engine = s.engine.clone();
    tokio::task::spawn_blocking(move || engine.snapshot().unwrap())
        .await
        .unwrap();
    let first = s.engine.log().first_seq();
    assert!(first > 1, "old segments were deleted (first_seq {first})");

    let r = s
        .http
        .get(format!("{}/v1/events/stream?from_seq=1", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 410);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "events_expired");
    assert_eq!(body["first_seq"], first);
    assert!(body["detail"].as_str().unwrap().contains("no longer"));

    let r = s
        .http
        .get(format!("{}/v1/events/stream", s.base))
        .header("Last-Event-ID", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 410);

    let (st, body) = s.get("/v1/events?from_seq=1").await;
    assert_eq!(st, 410);
    assert_eq!(body["first_seq"], first);

    // The first retained seq still works.
    let mut sse = s.sse(&format!("?from_seq={first}"), None).await;
    assert_eq!(sse.events(1).await[0]["seq"], first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_every_seq_once_in_order() {
    let s = start().await;
    let mut sse = s.sse("", None).await;
    let start_seq = s.engine.log().durable_seq() + 1;
    const TASKS: usize = 4;
    const THREADS: usize = 3;
    const EACH: usize = 40;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let http = s.http.clone();
        let url = format!("{}/v1/events", s.base);
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                let r = http
                    .post(&url)
                    .json(&json!({"type": "app.task", "data": {"t": t, "i": i}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
            }
        }));
    }
    let mut threads = Vec::new();
    for t in 0..THREADS {
        let engine = s.engine.clone();
        threads.push(std::thread::spawn(move || {
            for i in 0..EACH {
                engine
                    .append_event(
                        &WriteCtx::default(),
                        "app.thread",
                        None,
                        json!({"t": t, "i": i}),
                    )
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for t in threads {
        t.join().unwrap();
    }
    let total = (TASKS + THREADS) * EACH;
    let got = sse.events(total).await;
    assert_contiguous(&got);
    assert_eq!(got[0]["seq"], start_seq);

    let mut pulled = Vec::new();
    let mut next = start_seq;
    while pulled.len() < total {
        let (st, body) = s
            .get(&format!("/v1/events?from_seq={next}&limit=50&wait_ms=5000"))
            .await;
        assert_eq!(st, 200);
        for e in body["events"].as_array().unwrap() {
            pulled.push(e["seq"].as_u64().unwrap());
        }
        next = body["next_seq"].as_u64().unwrap();
    }
    let want: Vec<u64> = (start_seq..start_seq + total as u64).collect();
    assert_eq!(pulled, want);
    // Per writer, its own events are in its own order.
    let mut seen = BTreeSet::new();
    for e in &got {
        let key = (
            e["type"].as_str().unwrap().to_string(),
            e["data"]["t"].as_u64().unwrap(),
        );
        let i = e["data"]["i"].as_u64().unwrap();
        assert!(seen.insert((key.clone(), i)));
        if i > 0 {
            assert!(seen.contains(&(key, i - 1)), "writer order kept");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_never_blocks_writers_and_catches_up() {
    let (s, bus) = start_small_tail(16).await;
    let mut slow = s.sse("", None).await;
    let first = s.engine.log().durable_seq() + 1;
    // ~16 MiB of events: far more than the socket buffers and the 16-frame live tail.
    const EVENTS: usize = 2000;
    let pad = "p".repeat(8 * 1024);
    let engine = s.engine.clone();
    let writer = std::thread::spawn(move || {
        let t = Instant::now();
        let mut last = 0;
        for i in 0..EVENTS {
            last = engine
                .append_event(
                    &WriteCtx::default(),
                    "app.bulk",
                    None,
                    json!({"i": i, "pad": pad}),
                )
                .unwrap()
                .seq;
        }
        engine.log().wait_durable(last).unwrap();
        (t.elapsed(), last)
    });
    let (elapsed, last) = tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap();
    assert!(
        elapsed < Duration::from_secs(20),
        "writers finished while the subscriber was not reading ({elapsed:?})"
    );
    // The stalled subscriber is behind (its lag shows in statistics).
    let stats = s.stats().await;
    assert!(stats["pending_events"].as_u64().unwrap() > 0, "{stats}");
    // Now read everything: in order, none missing, none twice.
    let mut expect = first;
    while expect <= last {
        let f = slow.next().await;
        assert_eq!(f.id, Some(expect));
        expect += 1;
    }
    let stats = bus.stats();
    assert!(stats.total_catch_ups > 0, "the catch-up path ran");
    assert_eq!(stats.total_published, EVENTS as u64);
    // A live event after the catch-up still arrives.
    let after = s.app_event("app.after", json!({})).await;
    assert_eq!(slow.next().await.id, Some(after));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscribers_all_receive_everything() {
    const CLIENTS: usize = 1000;
    // Each client is two sockets in this process (its end and the server's): make sure the
    // descriptor limit allows it, raising the soft limit towards the hard one if needed.
    let want_fds = (2 * CLIENTS + 256) as libc::rlim_t;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < want_fds {
            limit.rlim_cur = want_fds.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    assert!(
        limit.rlim_cur >= want_fds,
        "this test needs {want_fds} file descriptors; the hard limit is {} (raise `ulimit -Hn`)",
        limit.rlim_max
    );
    let s = start().await;
    const EVENTS: usize = 20;
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(s.sse("", None).await);
    }
    wait_until("all subscribers counted", || async {
        s.stats().await["subscriber_count"] == CLIENTS
    })
    .await;
    let mut seqs = Vec::new();
    for i in 0..EVENTS {
        seqs.push(s.app_event("app.fan", json!({"i": i})).await);
    }
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut got = Vec::with_capacity(EVENTS);
                for _ in 0..EVENTS {
                    got.push(c.next().await.id.unwrap());
                }
                (got, c)
            })
        })
        .collect();
    let mut kept = Vec::new();
    for r in readers {
        let (got, c) = r.await.unwrap();
        assert_eq!(got, seqs);
        kept.push(c);
    }
    let stats = s.stats().await;
    assert!(stats["total_delivered"].as_u64().unwrap() >= (CLIENTS * EVENTS) as u64);
    drop(kept);
    wait_until("subscribers uncounted after disconnect", || async {
        s.stats().await["subscriber_count"] == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_and_metrics() {
    let s = start().await;
    let mut sse = s.sse("?types=app.*", None).await;
    for i in 0..3 {
        s.app_event("app.stat", json!({"i": i})).await;
    }
    sse.events(3).await;
    let stats = s.stats().await;
    for key in [
        "total_published",
        "total_delivered",
        "total_errors",
        "pending_events",
        "subscriber_count",
        "running",
        "first_seq",
        "last_seq",
        "events_by_type",
        "error_counts",
        "uptime_seconds",
        "delivery_latency_ms",
        "subscribers",
    ] {
        assert!(stats.get(key).is_some(), "statistics has {key}: {stats}");
    }
    assert_eq!(stats["running"], true);
    assert!(stats["total_published"].as_u64().unwrap() >= 3);
    assert!(stats["total_delivered"].as_u64().unwrap() >= 3);
    assert_eq!(stats["total_errors"], 0);
    assert_eq!(stats["events_by_type"]["app.stat"], 3);
    assert_eq!(stats["subscriber_count"], 1);
    let sub = &stats["subscribers"][0];
    assert_eq!(sub["kind"], "sse");
    assert_eq!(sub["filter"]["types"], json!(["app.*"]));
    assert_eq!(sub["position"], stats["last_seq"]);
    assert_eq!(sub["lag"], 0);
    let latency = &stats["delivery_latency_ms"];
    assert!(latency["samples"].as_u64().unwrap() >= 3);
    assert!(latency["p99"].as_u64().unwrap() >= latency["p50"].as_u64().unwrap());
    assert!(latency["p99"].as_u64().unwrap() < 10_000);
    let (st, alias) = s.get("/v1/events/stats").await;
    assert_eq!(st, 200);
    assert_eq!(alias["total_published"], stats["total_published"]);

    let r = s
        .http
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = r.text().await.unwrap();
    for name in [
        "quiver_events_published_total ",
        "quiver_events_delivered_total ",
        "quiver_event_subscribers 1",
        "quiver_event_delivery_latency_ms{quantile=\"0.99\"} ",
        "quiver_seq_durable ",
        "quiver_events_by_type_total{type=\"app.stat\"} 3",
        "# TYPE quiver_event_subscribers gauge",
    ] {
        assert!(text.contains(name), "metrics has {name}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_bus_ends_streams_and_long_polls() {
    let (s, bus) = start_small_tail(64).await;
    let mut sse = s.sse("", None).await;
    let seq = s.app_event("app.before_stop", json!({})).await;
    assert_eq!(sse.next().await.id, Some(seq));
    let poll = {
        let http = s.http.clone();
        let url = format!("{}/v1/events?from_seq={}&wait_ms=30000", s.base, seq + 1);
        tokio::spawn(async move { http.get(url).send().await.unwrap().status().as_u16() })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    bus.stop();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(chunk) = sse.stream.next().await {
            if chunk.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the SSE stream ends when the bus stops");
    let status = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .expect("the long-poll ends when the bus stops")
        .unwrap();
    assert_eq!(status, 200);
    let (st, body) = s.get("/v1/events/stream").await;
    assert_eq!(st, 503, "{body}");
    assert!(!bus.stats().running);
}
