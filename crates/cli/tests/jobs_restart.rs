//! Jobs survive a crash: the real `quiver serve` binary is SIGKILLed in the middle of an
//! import job (with another job queued behind it); after a restart on the same data
//! directory, the job table is rebuilt from the log, the import resumes from its last
//! checkpoint and completes with every line imported exactly once (lines without an `id` get
//! a deterministic one), and the queued job runs too.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn launch(data_dir: &Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--job-workers",
            "1",
            "--data-dir",
        ])
        .arg(data_dir)
        .env("QUIVER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn quiver serve");
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let mut reader = BufReader::new(stdout);
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        // Keep the pipe open until the process ends.
        let mut sink = String::new();
        while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {}
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the server prints its address");
    let base = line
        .trim_end()
        .strip_prefix("quiver listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_import_then_restart_completes_it() {
    const LINES: usize = 3000;
    let dir = tempfile::tempdir().expect("tempdir");
    let c = reqwest::Client::new();
    let server = launch(dir.path());
    let base = server.base.clone();
    let r = c
        .post(format!("{base}/v1/libraries"))
        .json(&json!({"name": "crash", "dimension": 4, "metric": "l2"}))
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 201);
    let lib = r.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
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
    let mut server = server;
    // SAFETY: plain FFI call with a valid pid.
    unsafe {
        libc::kill(server.child.id() as i32, libc::SIGKILL);
    }
    let _ = server.child.wait();
    drop(server);

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
