//! Webhooks end to end: a real server on port 0 and a real HTTP receiver (axum, port 0) that
//! the test scripts (fail N times, 410, 429, down). Backoffs are short through the config
//! knob; the code path is the same as in production.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use quiver_engine::{Engine, EngineConfig};
use quiver_server::webhooks::WebhookConfig;
use quiver_server::ServeOptions;
use serde_json::{json, Value};
use sha2::Sha256;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

// ---------- the receiver ----------

#[derive(Clone, Debug)]
struct Got {
    id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
    answered: u16,
}

#[derive(Default)]
struct Receiver {
    got: Mutex<Vec<Got>>,
    /// Statuses to answer next, in order; then `default_status` (200 when 0).
    plan: Mutex<VecDeque<u16>>,
    default_status: Mutex<u16>,
}

impl Receiver {
    fn delivered(&self) -> Vec<Got> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|g| (200..300).contains(&g.answered) && !g.id.starts_with("test-"))
            .cloned()
            .collect()
    }
    fn set_default(&self, s: u16) {
        *self.default_status.lock().unwrap() = s;
    }
}

async fn hook(State(rx): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> Response {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let status = rx.plan.lock().unwrap().pop_front().unwrap_or_else(|| {
        let d = *rx.default_status.lock().unwrap();
        if d == 0 {
            200
        } else {
            d
        }
    });
    rx.got.lock().unwrap().push(Got {
        id: h("webhook-id"),
        timestamp: h("webhook-timestamp"),
        signature: h("webhook-signature"),
        body: body.to_vec(),
        answered: status,
    });
    let code = StatusCode::from_u16(status).unwrap();
    if status == 429 {
        return (code, [("retry-after", "1")], "slow down").into_response();
    }
    (code, "ok").into_response()
}

struct Running {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    async fn down(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = self.task.await;
    }
}

async fn receiver_on(rx: Arc<Receiver>, addr: &str) -> Running {
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(rx);
    let (tx, rx_stop) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx_stop.await;
            })
            .await;
    });
    Running {
        addr,
        stop: Some(tx),
        task,
    }
}

// ---------- the server ----------

struct Server {
    base: String,
    engine: Arc<Engine>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
    http: reqwest::Client,
}

fn fast(allow_private: bool) -> ServeOptions {
    ServeOptions {
        webhooks: WebhookConfig {
            allow_private,
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            save_interval: Duration::from_millis(50),
            request_timeout: Duration::from_secs(5),
            ..WebhookConfig::default()
        },
        jobs: None,
    }
}

async fn server(dir: &std::path::Path, options: ServeOptions) -> Server {
    server_with(EngineConfig::new(dir), options).await
}

async fn server_with(config: EngineConfig, options: ServeOptions) -> Server {
    let engine = Engine::open(config).expect("the engine opens");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(quiver_server::serve_with(
        listener,
        engine.clone(),
        options,
        async move {
            let _ = rx.await;
        },
    ));
    Server {
        base,
        engine,
        stop: Some(tx),
        task,
        http: reqwest::Client::new(),
    }
}

impl Server {
    async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.await.unwrap().unwrap();
        self.engine.close().unwrap();
    }
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }
    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }
    async fn publish(&self, n: usize, tag: &str) {
        for i in 0..n {
            let (s, _) = self
                .post(
                    "/v1/events",
                    json!({"type": "app.tick", "data": {"i": i, "tag": tag}}),
                )
                .await;
            assert_eq!(s, 201);
        }
    }
    async fn create_hook(&self, url: &str, extra: Value) -> (String, String) {
        let mut body = json!({"url": url, "types": ["app.*"]});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let (s, v) = self.post("/v1/webhooks", body).await;
        assert_eq!(s, 201, "{v}");
        (
            v["id"].as_str().unwrap().to_string(),
            v["secret"].as_str().unwrap().to_string(),
        )
    }
}

async fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn verify(secret: &str, g: &Got) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.", g.id, g.timestamp).as_bytes());
    mac.update(&g.body);
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    g.signature.split(' ').any(|s| s == expected)
}

fn body_of(g: &Got) -> Value {
    serde_json::from_slice(&g.body).unwrap()
}

/// Seqs of the first successful delivery of each event, in arrival order.
fn delivered_seqs(rx: &Receiver) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for g in rx.delivered() {
        let seq: u64 = g.id.parse().unwrap();
        if !out.contains(&seq) {
            out.push(seq);
        }
    }
    out
}

fn strictly_increasing(v: &[u64]) -> bool {
    v.windows(2).all(|w| w[0] < w[1])
}

// ---------- tests ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_document_events_in_order_signed_and_hides_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), fast(true)).await;
    let rx = Arc::new(Receiver::default());
    let r = receiver_on(rx.clone(), "127.0.0.1:0").await;
    let (st, lib) = s
        .post("/v1/libraries", json!({"name": "a", "dimension": 2}))
        .await;
    assert_eq!(st, 201);
    let lib = lib["id"].as_str().unwrap().to_string();
    let (st, other) = s
        .post("/v1/libraries", json!({"name": "b", "dimension": 2}))
        .await;
    assert_eq!(st, 201);
    let other = other["id"].as_str().unwrap().to_string();

    let url = format!("http://{}/hook", r.addr);
    let (st, created) = s
        .post(
            "/v1/webhooks",
            json!({"url": url, "types": ["document.*"], "library_id": lib, "description": "d"}),
        )
        .await;
    assert_eq!(st, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let secret = created["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    assert_eq!(created["status"], "active");
    assert_eq!(created["max_attempts"], 8);

    // The secret is never shown again.
    let (st, v) = s.get(&format!("/v1/webhooks/{id}")).await;
    assert_eq!(st, 200);
    assert!(v.get("secret").is_none(), "{v}");
    let (_, list) = s.get("/v1/webhooks").await;
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 1);
    assert!(!list.to_string().contains(&secret));

    for i in 0..20 {
        for l in [&lib, &other] {
            let (st, v) = s
                .post(
                    &format!("/v1/libraries/{l}/documents"),
                    json!({"title": format!("t{i}"), "chunks": [{"text": "x", "embedding": [1.0, 0.5]}]}),
                )
                .await;
            assert_eq!(st, 201, "{v}");
        }
    }
    wait_for("20 deliveries", 10, || rx.delivered().len() >= 20).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = rx.delivered();
    assert_eq!(got.len(), 20, "only the one library's document events");
    let seqs: Vec<u64> = got.iter().map(|g| g.id.parse().unwrap()).collect();
    assert!(strictly_increasing(&seqs), "{seqs:?}");
    for g in &got {
        assert!(verify(&secret, g), "signature verifies");
        let ts: u64 = g.timestamp.parse().unwrap();
        let now = quiver_model::time::now_ms() / 1000;
        assert!(ts <= now && now - ts < 60);
        let b = body_of(g);
        assert_eq!(b["specversion"], "1.0");
        assert_eq!(b["type"], "document.added");
        assert_eq!(b["id"].to_string().trim_matches('"'), g.id);
    }
    // A wrong secret does not verify.
    assert!(!verify(
        "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        &got[0]
    ));

    // Test ping: synchronous, reported.
    let (st, v) = s.post(&format!("/v1/webhooks/{id}/test"), json!({})).await;
    assert_eq!(st, 200);
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["response_code"], 200);
    let last = rx.got.lock().unwrap().last().cloned().unwrap();
    assert_eq!(body_of(&last)["type"], "webhook.test");
    assert!(verify(&secret, &last));

    // The history shows each delivery.
    let (_, d) = s.get(&format!("/v1/webhooks/{id}/deliveries")).await;
    let items = d["deliveries"].as_array().unwrap();
    assert_eq!(items.len(), 20);
    assert_eq!(items[0]["status"], "delivered");
    assert_eq!(items[0]["response_code"], 200);
    assert!(items[0]["latency_ms"].is_u64());

    // Rotation: new deliveries are signed with the new secret only.
    let (st, rot) = s
        .post(&format!("/v1/webhooks/{id}/rotate-secret"), json!({}))
        .await;
    assert_eq!(st, 200);
    let secret2 = rot["secret"].as_str().unwrap().to_string();
    assert_ne!(secret, secret2);
    s.post(
        &format!("/v1/libraries/{lib}/documents"),
        json!({"title": "after", "chunks": [{"text": "x", "embedding": [1.0, 0.5]}]}),
    )
    .await;
    wait_for("21 deliveries", 10, || rx.delivered().len() >= 21).await;
    let g = rx.delivered().last().cloned().unwrap();
    assert!(verify(&secret2, &g) && !verify(&secret, &g));

    // The file on disk is private; the secret never enters the log.
    let file = dir.path().join("webhooks").join(format!("{id}.json"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    for e in std::fs::read_dir(dir.path().join("log")).unwrap() {
        let bytes = std::fs::read(e.unwrap().path()).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(&secret2[6..]) && !text.contains(&secret[6..]));
    }

    // Pause stops deliveries; resume delivers what was missed.
    let (st, v) = s.post(&format!("/v1/webhooks/{id}/pause"), json!({})).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("paused")));
    s.post(
        &format!("/v1/libraries/{lib}/documents"),
        json!({"title": "paused", "chunks": [{"text": "x", "embedding": [1.0, 0.5]}]}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.delivered().len(), 21);
    let (st, v) = s
        .post(&format!("/v1/webhooks/{id}/resume"), json!({}))
        .await;
    assert_eq!((st, v["status"].as_str()), (200, Some("active")));
    wait_for("22 deliveries", 10, || rx.delivered().len() >= 22).await;

    // PATCH and DELETE.
    let r2 = s
        .http
        .patch(format!("{}/v1/webhooks/{id}", s.base))
        .json(&json!({"description": null, "max_attempts": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r2.status(), 200);
    let v: Value = r2.json().await.unwrap();
    assert_eq!(v["max_attempts"], 3);
    assert!(v["description"].is_null());
    let r2 = s
        .http
        .delete(format!("{}/v1/webhooks/{id}", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r2.status(), 204);
    let (st, v) = s.get(&format!("/v1/webhooks/{id}")).await;
    assert_eq!((st, v["error"].as_str()), (404, Some("webhook_not_found")));
    assert!(!file.exists());
    r.down().await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_failing_then_recovering_gets_everything_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), fast(true)).await;
    let rx = Arc::new(Receiver::default());
    // 500s, a redirect (not followed), a 429 with Retry-After: 1, then successes.
    rx.plan
        .lock()
        .unwrap()
        .extend([500, 503, 302, 500, 429, 500]);
    let r = receiver_on(rx.clone(), "127.0.0.1:0").await;
    let (id, _) = s
        .create_hook(
            &format!("http://{}/hook", r.addr),
            json!({"max_attempts": 20}),
        )
        .await;
    s.publish(10, "a").await;
    wait_for("10 deliveries", 15, || delivered_seqs(&rx).len() >= 10).await;
    let seqs = delivered_seqs(&rx);
    assert_eq!(seqs.len(), 10);
    assert!(strictly_increasing(&seqs), "{seqs:?}");
    // Every request was for the next undelivered event: never one past a failure.
    let all: Vec<u64> = rx
        .got
        .lock()
        .unwrap()
        .iter()
        .map(|g| g.id.parse().unwrap())
        .collect();
    assert!(all.windows(2).all(|w| w[0] <= w[1]), "{all:?}");
    assert_eq!(all.len(), 16);
    let (_, d) = s.get(&format!("/v1/webhooks/{id}/deliveries")).await;
    let items = d["deliveries"].as_array().unwrap();
    let failed = items.iter().filter(|i| i["status"] == "failed").count();
    assert_eq!(failed, 6);
    assert!(items
        .iter()
        .any(|i| i["response_code"] == 302 && i["error"].as_str().unwrap().contains("redirect")));
    assert!(items.iter().any(|i| i["attempt"] == 7));
    r.down().await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_and_resume_re_enables() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), fast(true)).await;
    let rx = Arc::new(Receiver::default());
    rx.set_default(410);
    let r = receiver_on(rx.clone(), "127.0.0.1:0").await;
    let (id, _) = s
        .create_hook(&format!("http://{}/hook", r.addr), json!({}))
        .await;
    s.publish(3, "g").await;
    let mut status = String::new();
    for _ in 0..250 {
        status = s.get(&format!("/v1/webhooks/{id}")).await.1["status"]
            .as_str()
            .unwrap()
            .to_string();
        if status == "disabled" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, "disabled");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rx.got.lock().unwrap().len(), 1, "no attempt after a 410");
    let (_, ev) = s.get("/v1/events?types=webhook.disabled").await;
    assert_eq!(ev["events"].as_array().unwrap().len(), 1, "{ev}");
    rx.set_default(200);
    s.post(&format!("/v1/webhooks/{id}/resume"), json!({}))
        .await;
    wait_for("3 deliveries", 10, || delivered_seqs(&rx).len() >= 3).await;
    assert!(strictly_increasing(&delivered_seqs(&rx)));
    r.down().await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_deliveries_are_listed_announced_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), fast(true)).await;
    let rx = Arc::new(Receiver::default());
    rx.set_default(500);
    let r = receiver_on(rx.clone(), "127.0.0.1:0").await;
    let (id, _) = s
        .create_hook(
            &format!("http://{}/hook", r.addr),
            json!({"max_attempts": 2}),
        )
        .await;
    s.publish(3, "p").await;
    let mut parked: Vec<u64> = Vec::new();
    for _ in 0..250 {
        let (_, d) = s.get(&format!("/v1/webhooks/{id}/deliveries")).await;
        parked = d["parked"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        if parked.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(parked.len(), 3);
    assert_eq!(rx.got.lock().unwrap().len(), 6, "two attempts each");
    let (_, ev) = s.get("/v1/events?types=webhook.parked").await;
    let ev = ev["events"].as_array().unwrap().clone();
    assert_eq!(ev.len(), 3);
    assert_eq!(ev[0]["data"]["webhook_id"], id.as_str());
    assert_eq!(ev[0]["data"]["seq"], parked[0]);
    // Not parked: 404.
    let (st, v) = s
        .post(
            &format!("/v1/webhooks/{id}/deliveries/999999/retry"),
            json!({}),
        )
        .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (404, Some("delivery_not_parked"))
    );

    rx.set_default(200);
    for seq in &parked {
        let (st, v) = s
            .post(
                &format!("/v1/webhooks/{id}/deliveries/{seq}/retry"),
                json!({}),
            )
            .await;
        assert_eq!(st, 202, "{v}");
    }
    wait_for("3 retried deliveries", 10, || {
        delivered_seqs(&rx).len() >= 3
    })
    .await;
    assert_eq!(delivered_seqs(&rx), parked);
    let mut left = usize::MAX;
    for _ in 0..100 {
        let (_, d) = s.get(&format!("/v1/webhooks/{id}/deliveries")).await;
        left = d["parked"].as_array().unwrap().len();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(left, 0);
    r.down().await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_across_a_server_restart_still_gets_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Arc::new(Receiver::default());
    // Learn a free port, then take the receiver down.
    let r = receiver_on(rx.clone(), "127.0.0.1:0").await;
    let addr = r.addr;
    r.down().await;

    let s = server(dir.path(), fast(true)).await;
    let (id, secret) = s
        .create_hook(&format!("http://{addr}/hook"), json!({"max_attempts": 20}))
        .await;
    s.publish(5, "before").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.got.lock().unwrap().is_empty());
    s.shutdown().await;

    // Same data directory, new engine and server; the receiver is still down at first.
    let s = server(dir.path(), fast(true)).await;
    let (st, v) = s.get(&format!("/v1/webhooks/{id}")).await;
    assert_eq!(st, 200, "the endpoint survived the restart: {v}");
    s.publish(5, "after").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = receiver_on(rx.clone(), &addr.to_string()).await;
    wait_for("10 deliveries", 15, || delivered_seqs(&rx).len() >= 10).await;
    let got = rx.delivered();
    let seqs = delivered_seqs(&rx);
    assert_eq!(seqs.len(), 10);
    assert!(strictly_increasing(&seqs), "{seqs:?}");
    let tags: Vec<String> = seqs
        .iter()
        .map(|seq| {
            let g = got.iter().find(|g| g.id == seq.to_string()).unwrap();
            assert!(verify(&secret, g));
            body_of(g)["data"]["tag"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(&tags[..5], &["before"; 5]);
    assert_eq!(&tags[5..], &["after"; 5]);
    r.down().await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_targets_are_refused_without_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), fast(false)).await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://localhost:9/hook",
        "http://10.0.0.1/hook",
        "http://192.168.0.10/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[fe80::1]/hook",
        "http://0.0.0.0/hook",
        "http://[::ffff:127.0.0.1]/hook",
    ] {
        let (st, v) = s
            .post("/v1/webhooks", json!({"url": url, "types": ["*"]}))
            .await;
        assert_eq!(st, 422, "{url}: {v}");
        assert_eq!(v["error"], "webhook_target_forbidden", "{url}");
    }
    for (body, code) in [
        (
            json!({"url": "ftp://example.com/x", "types": ["*"]}),
            "invalid_webhook",
        ),
        (
            json!({"url": "https://example.com/x", "types": []}),
            "invalid_webhook",
        ),
        (
            json!({"url": "https://example.com/x", "types": ["*"], "max_attempts": 21}),
            "invalid_webhook",
        ),
        (json!({"url": "https://example.com/x"}), "invalid_request"),
    ] {
        let (st, v) = s.post("/v1/webhooks", body).await;
        assert_eq!((st, v["error"].as_str()), (422, Some(code)), "{v}");
    }
    let (st, _) = s.get("/v1/webhooks").await;
    assert_eq!(st, 200);
    s.shutdown().await;
}

/// The delivery history (`GET …/deliveries`: attempts, codes, parked seqs, position) is saved
/// with the endpoint: after a restart it reads the same, and a parked event can still be
/// retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_history_and_parked_events_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), fast(true)).await;
    let rx = Arc::new(Receiver::default());
    rx.set_default(503);
    let r = receiver_on(rx.clone(), "127.0.0.1:0").await;
    let (id, _) = s
        .create_hook(
            &format!("http://{}/hook", r.addr),
            json!({"max_attempts": 3}),
        )
        .await;
    s.publish(2, "p").await;
    let path = format!("/v1/webhooks/{id}/deliveries");
    let mut before = Value::Null;
    for _ in 0..500 {
        let (_, d) = s.get(&path).await;
        before = d;
        if before["parked"].as_array().map_or(0, Vec::len) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let parked: Vec<u64> = before["parked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(parked.len(), 2, "{before}");
    let history = before["deliveries"].as_array().unwrap().clone();
    // Three failed attempts and a parking note per event.
    assert_eq!(history.len(), 8, "{before}");
    assert_eq!(
        history.iter().filter(|d| d["status"] == "parked").count(),
        2
    );
    assert!(history
        .iter()
        .filter(|d| d["status"] == "failed")
        .all(|d| d["response_code"] == 503));
    s.shutdown().await;

    let s = server(dir.path(), fast(true)).await;
    let (st, after) = s.get(&path).await;
    assert_eq!(st, 200);
    assert_eq!(after, before, "the same history, parked list and position");

    rx.set_default(200);
    let (st, v) = s
        .post(&format!("{path}/{}/retry", parked[0]), json!({}))
        .await;
    assert_eq!(st, 202, "{v}");
    wait_for("the retried delivery", 10, || {
        delivered_seqs(&rx) == parked[..1]
    })
    .await;
    let mut newest = Value::Null;
    for _ in 0..250 {
        let (_, d) = s.get(&path).await;
        newest = d;
        if newest["parked"].as_array().map_or(0, Vec::len) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(newest["parked"], json!([parked[1]]), "{newest}");
    let d = newest["deliveries"].as_array().unwrap();
    assert_eq!(d.len(), 9, "the old history plus the retry: {newest}");
    assert_eq!(d[0]["status"], "delivered");
    assert_eq!(d[0]["seq"], parked[0]);
    r.down().await;
    s.shutdown().await;
}

/// Small segments, no retention beyond what snapshots need: only durable readers keep the
/// log from being deleted.
fn tight_log(dir: &std::path::Path, reader_limit_bytes: Option<u64>) -> EngineConfig {
    let mut c = EngineConfig::new(dir);
    c.segment_size_bytes_limit = 4096;
    c.retention = quiver_engine::Retention::NONE;
    c.snapshot_every_records = u64::MAX / 2;
    c.snapshot_min_log_bytes = u64::MAX / 2;
    c.snapshot_replay_ms_limit = u64::MAX;
    if let Some(b) = reader_limit_bytes {
        c.reader_retention = quiver_engine::Retention {
            max_age: None,
            max_bytes: Some(b),
        };
    }
    c
}

/// Two snapshots, so every segment before the older one is covered (what retention needs).
async fn snapshot_twice(s: &Server) {
    s.engine.snapshot().unwrap();
    s.publish(1, "tick").await;
    s.engine.snapshot().unwrap();
}

/// Log retention never deletes what a registered durable reader has not consumed: a paused
/// webhook endpoint and an unacked consumer group keep their events; once they have read
/// them, the segments go. Past the reader limit the segments go anyway and the reader says
/// so (`expired` in the webhook's history, `expired_unread` for the consumer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_what_durable_readers_have_not_consumed() {
    let dir = tempfile::tempdir().unwrap();
    let s = server_with(tight_log(dir.path(), None), fast(true)).await;
    let rx = Arc::new(Receiver::default());
    let r = receiver_on(rx.clone(), "127.0.0.1:0").await;
    let (id, _) = s
        .create_hook(&format!("http://{}/hook", r.addr), json!({}))
        .await;
    let (st, v) = s.post(&format!("/v1/webhooks/{id}/pause"), json!({})).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = s
        .post(
            "/v1/consumers",
            json!({"name": "slow", "types": ["app.*"], "start": "now"}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let first = s.engine.log().first_seq();
    s.publish(300, "held").await;
    snapshot_twice(&s).await;
    assert!(
        s.engine.log().segment_count() > 5,
        "the test needs several segments"
    );
    assert_eq!(
        s.engine.log().first_seq(),
        first,
        "nothing the readers still need was deleted"
    );

    // The consumer reads and acks everything; the paused webhook still holds the log.
    let mut acked = 0;
    loop {
        let (st, b) = s.get("/v1/consumers/slow/next?max=100&wait_ms=0").await;
        assert_eq!(st, 200, "{b}");
        let seqs: Vec<u64> = b["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect();
        if seqs.is_empty() {
            break;
        }
        acked += seqs.len();
        let (st, _) = s
            .post("/v1/consumers/slow/ack", json!({"seqs": seqs}))
            .await;
        assert_eq!(st, 200);
    }
    assert!(acked >= 300, "{acked}");
    snapshot_twice(&s).await;
    assert_eq!(
        s.engine.log().first_seq(),
        first,
        "the webhook still needs them"
    );
    // The statistics name the reader that holds the log back.
    let (st, stats) = s.get("/v1/events/statistics").await;
    assert_eq!(st, 200);
    assert_eq!(
        stats["retention_hold"]["reader"],
        format!("webhooks {id}"),
        "{stats}"
    );
    let hold_seq = stats["retention_hold"]["seq"].as_u64().unwrap();
    assert!(
        hold_seq < first + 300,
        "it holds events it has not delivered: {hold_seq}"
    );

    // The webhook delivers every event, then nothing holds the segments any more.
    let (st, _) = s
        .post(&format!("/v1/webhooks/{id}/resume"), json!({}))
        .await;
    assert_eq!(st, 200);
    wait_for("every event delivered", 30, || {
        delivered_seqs(&rx).len() >= 302
    })
    .await;
    let tags: Vec<String> = rx
        .delivered()
        .iter()
        .map(|g| body_of(g)["data"]["tag"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(tags.iter().filter(|t| *t == "held").count(), 300);
    // Positions are saved every 50 ms here; the hold reads the live ones.
    tokio::time::sleep(Duration::from_millis(200)).await;
    snapshot_twice(&s).await;
    assert!(
        s.engine.log().first_seq() > first + 250,
        "consumed segments are deleted: first_seq {}",
        s.engine.log().first_seq()
    );
    r.down().await;
    s.shutdown().await;

    // A reader limit of one segment: a paused endpoint cannot hold the log past it, and
    // its history says what it lost.
    let dir = tempfile::tempdir().unwrap();
    let s = server_with(tight_log(dir.path(), Some(8192)), fast(true)).await;
    let rx = Arc::new(Receiver::default());
    let r = receiver_on(rx.clone(), "127.0.0.1:0").await;
    let (id, _) = s
        .create_hook(&format!("http://{}/hook", r.addr), json!({}))
        .await;
    s.post(&format!("/v1/webhooks/{id}/pause"), json!({})).await;
    s.publish(300, "lost").await;
    snapshot_twice(&s).await;
    let first_seq = s.engine.log().first_seq();
    assert!(first_seq > 100, "past the limit the log goes: {first_seq}");
    s.post(&format!("/v1/webhooks/{id}/resume"), json!({}))
        .await;
    let path = format!("/v1/webhooks/{id}/deliveries");
    let mut d = Value::Null;
    for _ in 0..500 {
        let (_, v) = s.get(&path).await;
        d = v;
        let expired = d["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["status"] == "expired");
        if expired && !rx.delivered().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        d["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["status"] == "expired"),
        "{d}"
    );
    let got = delivered_seqs(&rx);
    assert!(
        got.iter().all(|&q| q >= first_seq),
        "only what the log still held: {got:?}, first_seq {first_seq}"
    );
    r.down().await;
    s.shutdown().await;
}
