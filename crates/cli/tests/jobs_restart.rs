//! Jobs survive a crash: the real `quiver serve` binary is SIGKILLed in the middle of an
//! import job (with another job queued behind it); after a restart on the same data
//! directory, the job table is rebuilt from the log, the import resumes from its last
//! checkpoint and completes with every line imported exactly once (lines without an `id` get
//! a deterministic one), and the queued job runs too. A re-embedding killed mid-way resumes
//! from the vectors it had staged (they are in the log) and switches the library to the new
//! model and dimension.

mod common;

use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

struct Server {
    child: common::ServeProcess,
    base: String,
}

impl Server {
    /// Crashes the server ([`common::ServeProcess::kill9`]); takes it, so nothing can call
    /// the dead one afterwards.
    fn kill9(mut self) {
        self.child.kill9();
    }
}

fn launch(data_dir: &Path) -> Server {
    launch_with(data_dir, &[])
}

fn launch_with(data_dir: &Path, extra: &[&std::ffi::OsStr]) -> Server {
    let mut args: Vec<&std::ffi::OsStr> = vec!["--job-workers".as_ref(), "1".as_ref()];
    args.extend_from_slice(extra);
    let (child, base) = common::spawn_serve(data_dir, "127.0.0.1:0", &args, true);
    Server { child, base }
}

async fn get(c: &reqwest::Client, url: String) -> Value {
    c.get(url)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

async fn wait_for(
    c: &reqwest::Client,
    base: &str,
    id: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let j = get(c, format!("{base}/v1/jobs/{id}")).await;
        if done(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "job did not get there: {j}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until everything the server has applied so far is durable (`/health`'s `durable_seq`
/// reaches its `seq`). Why: a read may show a change up to one group commit before the log's
/// writer has handed it to the OS (see the engine's module doc), so a checkpoint seen in
/// `GET /v1/jobs/{id}` can still be lost to a SIGKILL; these tests claim that a *durable*
/// checkpoint survives one, which is what a client watching the event stream (durable records
/// only) can rely on.
async fn wait_applied_durable(c: &reqwest::Client, base: &str) {
    let h = get(c, format!("{base}/health")).await;
    let seq = h["seq"].as_u64().expect("health seq");
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let h = get(c, format!("{base}/health")).await;
        if h["durable_seq"].as_u64().unwrap_or(0) >= seq {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "seq {seq} never became durable: {h}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_import_then_restart_completes_it() {
    const LINES: usize = 3000;
    let dir = tempfile::tempdir().expect("tempdir");
    let c = reqwest::Client::new();
    let server = launch(dir.path());
    let base = server.base.clone();
    let lib = create_library(
        &c,
        &base,
        json!({"name": "crash", "dimension": 4, "metric": "l2"}),
    )
    .await;
    // Every other line has no id: those get `<job id>-<line>`, so a resumed run that redoes
    // some lines cannot create duplicates.
    let body: String = (0..LINES)
        .map(|i| {
            let v = json!([i as f32, 1.0, (i % 13) as f32, 0.5]);
            let mut d =
                json!({"title": format!("doc {i}"), "chunks": [{"text": "t", "embedding": v}]});
            if i % 2 == 0 {
                d["id"] = json!(format!("d{i:05}"));
            }
            d.to_string() + "\n"
        })
        .collect();
    let r = c
        .post(format!(
            "{base}/v1/jobs/batch_import?library_id={lib}&batch_size=10&pause_ms=20"
        ))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .expect("submit");
    assert_eq!(r.status(), 202);
    let import = r.json::<Value>().await.expect("json")["job_id"]
        .as_str()
        .expect("id")
        .to_string();
    let r = c
        .post(format!("{base}/v1/jobs/batch_export?library_id={lib}"))
        .send()
        .await
        .expect("submit");
    assert_eq!(r.status(), 202);
    let export = r.json::<Value>().await.expect("json")["job_id"]
        .as_str()
        .expect("id")
        .to_string();

    // Let it get part way (a checkpoint recorded), then kill the process outright.
    let j = wait_for(&c, &base, &import, |j| {
        j["checkpoint"].as_u64().unwrap_or(0) >= 200
    })
    .await;
    assert_eq!(j["status"], "running");
    wait_applied_durable(&c, &base).await;
    server.kill9();

    let server = launch(dir.path());
    let base = server.base.clone();
    let j = wait_for(&c, &base, &import, |j| j["status"] == "completed").await;
    let resumed = j["result"]["resumed_from_line"].as_u64().unwrap_or(0);
    assert!(
        resumed >= 200 && resumed < LINES as u64,
        "resumed from a checkpoint: {j}"
    );
    assert_eq!(j["attempts"], 2, "{j}");
    assert_eq!(j["result"]["lines"], LINES as u64);
    let libv = get(&c, format!("{base}/v1/libraries/{lib}")).await;
    assert_eq!(
        libv["num_documents"], LINES as u64,
        "every line exactly once: {libv}"
    );
    let probe = get(
        &c,
        format!("{base}/v1/libraries/{lib}/documents/{import}-2"),
    )
    .await;
    assert_eq!(
        probe["title"], "doc 1",
        "line 2 (no id) has its deterministic id"
    );
    // The job queued behind it ran after the restart.
    let e = wait_for(&c, &base, &export, |j| j["status"] == "completed").await;
    assert_eq!(e["result"]["documents"], LINES as u64, "{e}");
    drop(server);
}

const POTION: &str = "local:potion-base-8m";
const MINILM: &str = "local:all-minilm-l6-v2";

/// The model cache holding both local models, or `None` (skipped, unless
/// `QUIVER_REQUIRE_MODELS=1`).
fn models() -> Option<std::path::PathBuf> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_reembedding_then_restart_completes_it() {
    const DOCS: usize = 60;
    let Some(models) = models() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let args = [
        std::ffi::OsStr::new("--model-dir"),
        models.as_os_str(),
        std::ffi::OsStr::new("--no-model-install"),
    ];
    let c = reqwest::Client::new();
    let server = launch_with(dir.path(), &args);
    let base = server.base.clone();
    let lib = create_library(&c, &base, json!({"name": "re", "embedding_model": POTION})).await;
    let body: String = (0..DOCS)
        .map(|i| {
            json!({"id": format!("n{i:03}"), "title": format!("note {i}"),
                   "chunks": [{"text": format!("Note number {i} is about topic {}.", i % 7)}]})
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
    r.text().await.expect("reply");
    let r = c
        .post(format!("{base}/v1/jobs/regenerate_embeddings"))
        .json(&json!({"library_id": lib, "embedding_model": MINILM, "batch_size": 2, "pause_ms": 100}))
        .send()
        .await
        .expect("submit");
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.expect("json")["job_id"]
        .as_str()
        .expect("id")
        .to_string();
    let j = wait_for(&c, &base, &id, |j| {
        j["progress"]["current"].as_u64().unwrap_or(0) >= 12
    })
    .await;
    assert_eq!(j["status"], "running");
    wait_applied_durable(&c, &base).await;
    server.kill9();

    let server = launch_with(dir.path(), &args);
    let base = server.base.clone();
    // Until the switch the library serves its old vectors.
    let l = get(&c, format!("{base}/v1/libraries/{lib}")).await;
    assert!(l["dimension"] == 256 || l["dimension"] == 384, "{l}");
    let j = wait_for(&c, &base, &id, |j| {
        ["completed", "failed", "cancelled"].contains(&j["status"].as_str().unwrap_or(""))
    })
    .await;
    assert_eq!(j["status"], "completed", "{j}");
    assert_eq!(j["result"]["resumed"], true, "{j}");
    let redone = j["result"]["documents_embedded"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(
        redone < DOCS as u64 - 5,
        "only what was not staged before the kill is embedded again: {j}"
    );
    let l = get(&c, format!("{base}/v1/libraries/{lib}")).await;
    assert_eq!(l["dimension"], 384, "{l}");
    assert_eq!(l["embedding_model"], MINILM, "{l}");
    assert_eq!(l["num_documents"], DOCS as u64, "{l}");
    for i in 0..DOCS {
        let d = get(
            &c,
            format!("{base}/v1/libraries/{lib}/documents/n{i:03}?include_embeddings=true"),
        )
        .await;
        assert_eq!(
            d["chunks"][0]["embedding"].as_array().map(Vec::len),
            Some(384),
            "n{i:03}"
        );
    }
    drop(server);
}

/// Creates a library from `body`; its id.
async fn create_library(c: &reqwest::Client, base: &str, body: Value) -> String {
    let r = c
        .post(format!("{base}/v1/libraries"))
        .json(&body)
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 201);
    r.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string()
}
