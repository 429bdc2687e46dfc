//! Webhook delivery benchmark (`bash bench/webhooks.sh`): starts the release server
//! (`--webhooks-allow-private`, `--fsync always`) on a fresh data directory and a local
//! receiver (axum, port 0), registers E endpoints for `bench.*`, then measures
//!
//! 1. latency: L events published one at a time; for each delivery, receiver arrival time
//!    minus the event's commit time (its CloudEvents `time`), p50/p99 over all deliveries;
//! 2. throughput: endpoints paused, M events published, endpoints resumed; deliveries/s from
//!    resume until every endpoint has every event.
//!
//! It checks that each endpoint received each event once, in seq order. Prints a markdown
//! table on stdout. Flags: --server-bin PATH, --endpoints 1,4, --latency-events L,
//! --events M.

use anyhow::{bail, ensure, Context, Result};
use axum::body::Bytes;
use axum::extract::{Path, State};
use serde_json::{json, Value};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[derive(Default)]
struct Received {
    /// (endpoint, seq, arrival ms, commit ms)
    rows: Mutex<Vec<(usize, u64, u64, u64)>>,
}

async fn hook(
    State(rx): State<Arc<Received>>,
    Path(k): Path<usize>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> &'static str {
    let arrival = quiver_model::time::now_ms();
    let seq = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let commit = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| {
            v["time"]
                .as_str()
                .and_then(quiver_model::time::parse_rfc3339_ms)
        })
        .unwrap_or(0);
    if let Ok(mut rows) = rx.rows.lock() {
        rows.push((k, seq, arrival, commit));
    }
    "ok"
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[tokio::main]
async fn main() -> Result<()> {
    let bin = arg("--server-bin").context("--server-bin is required")?;
    let endpoints: Vec<usize> = arg("--endpoints")
        .unwrap_or_else(|| "1,4".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let latency_events: usize = arg("--latency-events").map_or(Ok(1000), |s| s.parse())?;
    let events: usize = arg("--events").map_or(Ok(20_000), |s| s.parse())?;
    println!("| endpoints | latency events | commit→delivered p50 ms | p99 ms | publish ack p50 ms | backlog events | deliveries | seconds | deliveries/s |");
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for e in endpoints {
        run(&bin, e, latency_events, events).await?;
    }
    Ok(())
}

async fn run(bin: &str, e: usize, latency_events: usize, events: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(bin)
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--fsync",
            "always",
            "--webhooks-allow-private",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("QUIVER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the server")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .context("the server did not start")??;
    let base = line
        .trim()
        .strip_prefix("quiver listening on ")
        .context("unexpected first line")?
        .to_string();

    let rx = Arc::new(Received::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let raddr = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/hook/{k}", axum::routing::post(hook))
        .with_state(rx.clone());
    let receiver = tokio::spawn(async move { axum::serve(listener, app).await });

    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for k in 0..e {
        let r = http
            .post(format!("{base}/v1/webhooks"))
            .json(&json!({"url": format!("http://{raddr}/hook/{k}"), "types": ["bench.*"]}))
            .send()
            .await?;
        ensure!(r.status() == 201, "create webhook: {}", r.text().await?);
        let v: Value = r.json().await?;
        ids.push(v["id"].as_str().context("id")?.to_string());
    }

    // 1. Latency: one event at a time.
    let mut acks = Vec::with_capacity(latency_events);
    for i in 0..latency_events {
        let t = Instant::now();
        let r = http
            .post(format!("{base}/v1/events"))
            .json(&json!({"type": "bench.latency", "data": {"i": i}}))
            .send()
            .await?;
        ensure!(r.status() == 201, "publish failed");
        acks.push(t.elapsed().as_micros() as u64);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    wait_rows(&rx, latency_events * e, Duration::from_secs(120)).await?;
    let mut lat: Vec<u64> = rx
        .rows
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .iter()
        .map(|r| r.2.saturating_sub(r.3))
        .collect();
    lat.sort_unstable();
    acks.sort_unstable();

    // 2. Throughput: a backlog delivered after resume.
    for id in &ids {
        http.post(format!("{base}/v1/webhooks/{id}/pause"))
            .send()
            .await?;
    }
    let publishers = 8;
    let per = events / publishers;
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let http = http.clone();
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                let r = http
                    .post(format!("{base}/v1/events"))
                    .json(&json!({"type": "bench.backlog", "data": {"p": p, "i": i}}))
                    .send()
                    .await?;
                ensure!(r.status() == 201, "publish failed");
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let backlog = per * publishers;
    let before = latency_events * e;
    let started = Instant::now();
    for id in &ids {
        http.post(format!("{base}/v1/webhooks/{id}/resume"))
            .send()
            .await?;
    }
    wait_rows(&rx, before + backlog * e, Duration::from_secs(600)).await?;
    let secs = started.elapsed().as_secs_f64();

    // Each endpoint: every event once, in seq order.
    {
        let rows = rx.rows.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        for k in 0..e {
            let seqs: Vec<u64> = rows.iter().filter(|r| r.0 == k).map(|r| r.1).collect();
            ensure!(
                seqs.len() == latency_events + backlog,
                "endpoint {k}: {} deliveries",
                seqs.len()
            );
            if !seqs.windows(2).all(|w| w[0] < w[1]) {
                bail!("endpoint {k}: out of order or duplicated");
            }
        }
    }
    println!(
        "| {e} | {} | {} | {} | {:.1} | {backlog} | {} | {secs:.2} | {:.0} |",
        lat.len(),
        quantile(&lat, 0.5),
        quantile(&lat, 0.99),
        quantile(&acks, 0.5) as f64 / 1000.0,
        backlog * e,
        (backlog * e) as f64 / secs
    );
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(60), child.wait()).await;
    receiver.abort();
    Ok(())
}

async fn wait_rows(rx: &Received, n: usize, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let got = rx
            .rows
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .len();
        if got >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {got} of {n} deliveries within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
