//! The JetStream log backend, end to end: real `quiver serve` replicas sharing one stream of a
//! real `nats-server` (spawned on a free port with its own store directory).
//!
//! What a user of replicas relies on, checked here:
//! - a write taken by any replica is read, searched and streamed (SSE) by every replica, under
//!   the same gapless `seq`s, with identical events;
//! - concurrent writers on both replicas: every acknowledged write is on both, once, with the
//!   seq it was acknowledged with; a refused one (`409 write_conflict`) is on neither;
//! - a replica SIGKILLed while the others write, and a new replica with an empty data
//!   directory, both serve only once they have caught up;
//! - a data directory started against another stream is refused with a clear error;
//! - a commit larger than the NATS server's `max_payload` is a 413 that changes nothing;
//!   with NATS down a write is a 503 within the timeout while reads go on; once NATS is back,
//!   writes work again without a restart.
//!
//! Without `nats-server` on the PATH the tests say they skipped, unless
//! `QUIVER_REQUIRE_NATS` is set (`.ci/run` installs it and sets it).

mod common;

use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// A `nats-server` with JetStream; killed on drop.
struct Nats {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Nats {
    /// Starts one, or `None` (the test skips) when `nats-server` is not installed.
    fn start(dir: &Path, max_payload_bytes: usize) -> Option<Nats> {
        let installed = Command::new("nats-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            if std::env::var_os("QUIVER_REQUIRE_NATS").is_some() {
                panic!("nats-server is not installed and QUIVER_REQUIRE_NATS is set");
            }
            eprintln!("SKIPPED: nats-server is not installed (apt-get install nats-server)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut nats = Nats {
            child: None,
            port,
            dir: dir.to_path_buf(),
        };
        std::fs::write(
            dir.join("nats.conf"),
            format!(
                "listen: 127.0.0.1:{port}\nmax_payload: {max_payload_bytes}\njetstream {{\n  store_dir: {:?}\n}}\n",
                dir.join("store").display().to_string()
            ),
        )
        .expect("write nats.conf");
        nats.run();
        Some(nats)
    }

    /// (Re)starts the server on its port and store, and waits until it accepts connections.
    fn run(&mut self) {
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(self.dir.join("nats.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < STEP_TIMEOUT,
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `quiver serve` replica; SIGKILLed on drop.
struct Replica {
    child: common::ServeProcess,
    base: String,
}

impl Replica {
    fn start(data_dir: &Path, nats: &Nats, stream: &str) -> Replica {
        let url = nats.url();
        let args = [
            "--jetstream-url",
            url.as_str(),
            "--jetstream-stream",
            stream,
            "--jetstream-timeout",
            "2s",
        ];
        let (child, base) = common::spawn_serve(data_dir, "127.0.0.1:0", &args, true);
        Replica { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn kill9(&mut self) {
        self.child.kill9();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(STEP_TIMEOUT)
        .build()
        .expect("http client")
}

async fn call(request: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = request.send().await.expect("request");
    let status = resp.status().as_u16();
    let body = resp.text().await.expect("body");
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

async fn expect(request: reqwest::RequestBuilder, status: u16, what: &str) -> Value {
    let (got, body) = call(request).await;
    assert_eq!(got, status, "{what}: {body}");
    body
}

async fn health(c: &reqwest::Client, r: &Replica) -> Value {
    expect(c.get(r.url("/health")), 200, "health").await
}

async fn seq_of(c: &reqwest::Client, r: &Replica) -> u64 {
    health(c, r).await["seq"].as_u64().expect("health.seq")
}

/// Waits until `seq` is durable on `r` (it folds other replicas' writes within milliseconds;
/// the event routes serve durable records only).
async fn wait_for_seq(c: &reqwest::Client, r: &Replica, seq: u64) {
    let started = Instant::now();
    loop {
        let at = health(c, r).await["durable_seq"]
            .as_u64()
            .expect("health.durable_seq");
        if at >= seq {
            return;
        }
        assert!(
            started.elapsed() < STEP_TIMEOUT,
            "replica {} stayed at seq {at}, expected {seq}",
            r.base
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every event a replica serves, by seq, as `(type, library_id, data, timestamp)`.
async fn events(c: &reqwest::Client, r: &Replica) -> BTreeMap<u64, Value> {
    let mut out = BTreeMap::new();
    let mut from = 1;
    loop {
        let page = expect(
            c.get(r.url(&format!("/v1/events?from_seq={from}&limit=1000"))),
            200,
            "events page",
        )
        .await;
        let list = page["events"].as_array().expect("events").clone();
        for e in &list {
            let seq = e["seq"].as_u64().expect("seq");
            out.insert(
                seq,
                json!([e["type"], e["library_id"], e["data"], e["timestamp"]]),
            );
        }
        if list.is_empty() {
            return out;
        }
        from = page["next_seq"].as_u64().expect("next_seq");
    }
}

fn assert_gapless(events: &BTreeMap<u64, Value>, last: u64, who: &str) {
    let seqs: Vec<u64> = events.keys().copied().collect();
    let want: Vec<u64> = (1..=last).collect();
    assert_eq!(seqs, want, "{who}: events are seqs 1..={last}");
}

async fn create_library(c: &reqwest::Client, r: &Replica, name: &str) -> String {
    let body = expect(
        c.post(r.url("/v1/libraries"))
            .json(&json!({"name": name, "dimension": 4, "index_type": "flat"})),
        201,
        "create library",
    )
    .await;
    body["id"].as_str().expect("library id").to_string()
}

async fn add_doc(c: &reqwest::Client, r: &Replica, lib: &str, id: &str, v: [f32; 4]) -> u64 {
    let body = expect(
        c.post(r.url(&format!("/v1/libraries/{lib}/documents")))
            .json(&json!({
                "id": id, "title": id,
                "chunks": [{"text": format!("text of {id}"), "embedding": v}]
            })),
        201,
        "add document",
    )
    .await;
    body["seq"].as_u64().expect("seq")
}

/// Reads SSE ids from `from_seq` until one at or past `until` arrived (`until` is set once
/// the writes it waits for are known).
async fn sse_ids(base: &str, from_seq: u64, until: tokio::sync::watch::Receiver<u64>) -> Vec<u64> {
    let c = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("SSE client");
    let resp = c
        .get(format!("{base}/v1/events/stream?from_seq={from_seq}"))
        .send()
        .await
        .expect("open SSE");
    assert_eq!(resp.status().as_u16(), 200);
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut ids = Vec::new();
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while ids.last().is_none_or(|last| last < &*until.borrow()) {
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("SSE on {base} stopped at {ids:?}"))
            .expect("SSE ended early")
            .expect("SSE chunk");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            for line in frame.lines() {
                if let Some(id) = line.strip_prefix("id: ") {
                    ids.push(id.trim().parse().expect("numeric id"));
                }
            }
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_share_one_log() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some(nats) = Nats::start(tmp.path(), 8 << 20) else {
        return;
    };
    let c = client();
    let a = Replica::start(&tmp.path().join("a"), &nats, "shared");
    let b = Replica::start(&tmp.path().join("b"), &nats, "shared");
    let h = health(&c, &b).await;
    assert_eq!(h["log"]["backend"], "jetstream", "{h}");
    assert_eq!(h["log"]["stream"], "shared", "{h}");

    // B listens from the start; A creates the library; B writes to it once it sees it.
    let (until_tx, until) = tokio::sync::watch::channel(u64::MAX);
    let sse = {
        let base = b.base.clone();
        tokio::spawn(async move { sse_ids(&base, 1, until).await })
    };
    let lib = create_library(&c, &a, "docs").await;
    let seq = seq_of(&c, &a).await;
    wait_for_seq(&c, &b, seq).await;
    let from_b = add_doc(&c, &b, &lib, "from-b", [0.0, 1.0, 0.0, 0.0]).await;
    wait_for_seq(&c, &a, from_b).await;
    let from_a = add_doc(&c, &a, &lib, "from-a", [1.0, 0.0, 0.0, 0.0]).await;
    assert!(from_a > from_b, "seqs grow across replicas");
    wait_for_seq(&c, &b, from_a).await;

    // A's write is searchable on B, B's on A.
    let hits = expect(
        c.post(b.url(&format!("/v1/libraries/{lib}/search")))
            .json(&json!({"embedding": [1.0, 0.0, 0.0, 0.0], "k": 2})),
        200,
        "search on B",
    )
    .await;
    assert_eq!(hits["results"][0]["document_id"], "from-a", "{hits}");
    let doc = expect(
        c.get(a.url(&format!("/v1/libraries/{lib}/documents/from-b"))),
        200,
        "B's document on A",
    )
    .await;
    assert_eq!(doc["title"], "from-b", "{doc}");

    // B's live SSE stream carried A's writes and its own, in order, gapless.
    until_tx.send(from_a).expect("the SSE reader is waiting");
    let ids = tokio::time::timeout(STEP_TIMEOUT, sse)
        .await
        .expect("SSE reader")
        .expect("SSE task");
    assert_eq!(ids, (1..=from_a).collect::<Vec<u64>>(), "SSE ids on B");

    // Concurrent writers on both replicas. The server retries a write another replica beat;
    // a 409 that still comes back (sustained contention) is retried as a client would.
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (c, base) = (c.clone(), if w % 2 == 0 { &a } else { &b }.base.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut conflicts = 0;
            for i in 0..40 {
                loop {
                    let (status, body) = call(
                        c.post(format!("{base}/v1/events"))
                            .json(&json!({"type": "app.tick", "data": {"writer": w, "i": i}})),
                    )
                    .await;
                    match status {
                        201 => {
                            acked.push((body["seq"].as_u64().expect("seq"), w, i));
                            break;
                        }
                        409 => {
                            assert_eq!(body["error"], "write_conflict", "{body}");
                            conflicts += 1;
                        }
                        other => panic!("writer {w}: {other} {body}"),
                    }
                }
            }
            (acked, conflicts)
        }));
    }
    let mut acked = Vec::new();
    let mut conflicts = 0;
    for t in tasks {
        let (mut got, n) = t.await.expect("writer");
        acked.append(&mut got);
        conflicts += n;
    }
    eprintln!(
        "{} acknowledged events, {conflicts} conflicts retried",
        acked.len()
    );
    let last = acked.iter().map(|a| a.0).max().expect("acks");
    wait_for_seq(&c, &a, last).await;
    wait_for_seq(&c, &b, last).await;
    let (ea, eb) = (events(&c, &a).await, events(&c, &b).await);
    assert_gapless(&ea, last, "replica A");
    assert_eq!(ea, eb, "both replicas serve the same events");
    for (seq, w, i) in &acked {
        let e = &ea[seq];
        assert_eq!(e[0], "app.tick");
        assert_eq!(e[2], json!({"writer": w, "i": i}), "seq {seq}");
    }
    let ticks = ea.values().filter(|e| e[0] == "app.tick").count();
    assert_eq!(ticks, 160, "every acknowledged event once, no refused one");
    let distinct: HashSet<(u64, u64)> = ea
        .values()
        .filter(|e| e[0] == "app.tick")
        .map(|e| {
            (
                e[2]["writer"].as_u64().expect("writer"),
                e[2]["i"].as_u64().expect("i"),
            )
        })
        .collect();
    assert_eq!(distinct.len(), 160);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_catch_up_after_sigkill_and_from_empty() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some(nats) = Nats::start(tmp.path(), 8 << 20) else {
        return;
    };
    let c = client();
    let a = Replica::start(&tmp.path().join("a"), &nats, "s2");
    let mut b = Replica::start(&tmp.path().join("b"), &nats, "s2");
    let lib = create_library(&c, &a, "docs").await;
    let mut last = 0;
    for i in 0..20 {
        last = add_doc(&c, &a, &lib, &format!("d{i}"), [i as f32, 1.0, 0.0, 0.0]).await;
    }
    wait_for_seq(&c, &b, last).await;
    let id_of = |h: Value| {
        h["log"]["replica_id"]
            .as_str()
            .expect("replica_id")
            .to_string()
    };
    let (id_a, id_b) = (id_of(health(&c, &a).await), id_of(health(&c, &b).await));
    assert_ne!(id_a, id_b, "each replica has its own id");

    // B dies; A goes on writing; B comes back and serves only once it has all of it.
    b.kill9();
    for i in 20..60 {
        last = add_doc(&c, &a, &lib, &format!("d{i}"), [i as f32, 1.0, 0.0, 0.0]).await;
    }
    let b = Replica::start(&tmp.path().join("b"), &nats, "s2");
    assert_eq!(seq_of(&c, &b).await, last, "B caught up before serving");
    assert_eq!(
        id_of(health(&c, &b).await),
        id_b,
        "B keeps its id across a restart"
    );
    // A new replica with an empty data directory folds the whole stream.
    let n = Replica::start(&tmp.path().join("new"), &nats, "s2");
    assert_eq!(seq_of(&c, &n).await, last, "the new replica caught up");
    let id_n = id_of(health(&c, &n).await);
    assert!(id_n != id_a && id_n != id_b, "a new replica gets a new id");
    let docs = expect(
        c.get(n.url(&format!("/v1/libraries/{lib}"))),
        200,
        "library on the new replica",
    )
    .await;
    assert_eq!(docs["num_documents"], 60, "{docs}");
    for r in [&a, &b, &n] {
        wait_for_seq(&c, r, last).await;
    }
    let (ea, eb, en) = (
        events(&c, &a).await,
        events(&c, &b).await,
        events(&c, &n).await,
    );
    assert_gapless(&ea, last, "replica A");
    assert_eq!(ea, eb, "B after its restart");
    assert_eq!(ea, en, "the new replica");

    // A data directory of this stream, started against another stream, is refused.
    drop(b);
    let other = Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args(["serve", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path().join("b"))
        .args([
            "--jetstream-url",
            &nats.url(),
            "--jetstream-stream",
            "other",
        ])
        .env("QUIVER_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run quiver serve");
    assert!(
        !other.status.success(),
        "a data directory of another log must not serve"
    );
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(
        stderr.contains("belongs to another log"),
        "the refusal says why: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_commits_and_outages_are_clear_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some(mut nats) = Nats::start(tmp.path(), 64 * 1024) else {
        return;
    };
    let c = client();
    let a = Replica::start(&tmp.path().join("a"), &nats, "s3");
    let b = Replica::start(&tmp.path().join("b"), &nats, "s3");
    let lib = create_library(&c, &a, "docs").await;
    let before = seq_of(&c, &a).await;

    // Three chunks of 30 KB: one commit larger than the server's max_payload of 64 KiB.
    let text = "x".repeat(30_000);
    let chunks: Vec<Value> = (0..3)
        .map(|i| json!({"text": text, "embedding": [i as f32, 0.0, 0.0, 1.0]}))
        .collect();
    let body = expect(
        c.post(a.url(&format!("/v1/libraries/{lib}/documents")))
            .json(&json!({"id": "big", "title": "big", "chunks": chunks})),
        413,
        "a commit over max_payload",
    )
    .await;
    assert_eq!(body["error"], "record_too_large", "{body}");
    let detail = body["detail"].as_str().expect("detail");
    assert!(
        detail.contains("max_payload"),
        "the detail names the knob: {detail}"
    );
    assert_eq!(seq_of(&c, &a).await, before, "nothing was written");
    expect(
        c.get(a.url(&format!("/v1/libraries/{lib}/documents/big"))),
        404,
        "the refused document",
    )
    .await;

    // NATS goes away: writes fail fast and clearly, reads go on.
    nats.kill();
    let started = Instant::now();
    let (status, body) = call(
        c.post(a.url("/v1/events"))
            .json(&json!({"type": "app.down", "data": {}})),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "log_unavailable", "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the refusal took {:?}",
        started.elapsed()
    );
    expect(
        c.get(b.url(&format!("/v1/libraries/{lib}"))),
        200,
        "a read while NATS is down",
    )
    .await;

    // NATS comes back on the same store: writes work again without restarting the replicas.
    nats.run();
    let started = Instant::now();
    let seq = loop {
        let (status, body) = call(
            c.post(a.url("/v1/events"))
                .json(&json!({"type": "app.up", "data": {}})),
        )
        .await;
        if status == 201 {
            break body["seq"].as_u64().expect("seq");
        }
        assert!(
            [503, 409].contains(&status) && started.elapsed() < STEP_TIMEOUT,
            "writes did not recover: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    wait_for_seq(&c, &b, seq).await;
    let (ea, eb) = (events(&c, &a).await, events(&c, &b).await);
    assert_gapless(&ea, seq, "replica A");
    assert_eq!(ea, eb, "B after the outage");
    assert_eq!(ea[&seq][0], "app.up");
}
