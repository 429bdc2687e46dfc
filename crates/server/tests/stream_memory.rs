//! Memory stays flat however large an NDJSON upload is. Its own test binary (so its own
//! process): resident memory is per process, and other tests would disturb the reading.

use futures::StreamExt;
mod common;

use quiver_engine::EngineConfig;
use serde_json::{json, Value};

fn vm_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

/// Memory stays flat however large the upload: 100k lines (~100 MB) that all fail validation
/// leave no state behind, so resident memory must not grow by anything near the body size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_flat_for_a_large_upload() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _engine) = common::spawn(EngineConfig::new(dir.path())).await;
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{base}/v1/libraries"))
        .json(&json!({"name": "docs", "dimension": 8}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::CREATED);
    let line_count: usize = std::env::var("QV_LINES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let padding = "p".repeat(900);
    let before = vm_rss_kib();
    // Generated lazily so the client never holds the body either.
    let stream = futures::stream::iter(0..line_count / 100).map(move |block| {
        let mut chunk = String::with_capacity(100 * 1000);
        for i in 0..100 {
            chunk.push_str(&format!(
                "{{\"id\":\"d{}\",\"title\":\"{padding}\",\"chunks\":[{{\"embedding\":[1,2,3]}}]}}\n",
                block * 100 + i
            ));
        }
        Ok::<_, std::io::Error>(chunk)
    });
    let resp = client
        .post(format!("{base}/v1/libraries/docs/documents/stream"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    // Read replies incrementally as well.
    let mut replies = resp.bytes_stream();
    let mut newlines = 0usize;
    let mut tail = Vec::new();
    while let Some(chunk) = replies.next().await {
        let chunk = chunk.unwrap();
        newlines += chunk.iter().filter(|&&b| b == b'\n').count();
        tail.extend_from_slice(&chunk);
        if tail.len() > 4096 {
            tail.drain(..tail.len() - 4096);
        }
    }
    let after = vm_rss_kib();
    assert_eq!(newlines, line_count + 1);
    let last: Value =
        serde_json::from_slice(tail.split(|&b| b == b'\n').rev().nth(1).unwrap()).unwrap();
    assert_eq!(last["summary"]["failed"], line_count as u64);
    let grown_mib = after.saturating_sub(before) / 1024;
    eprintln!("resident memory grew by {grown_mib} MiB");
    assert!(
        grown_mib < 32,
        "resident memory grew by {grown_mib} MiB for a ~95 MiB upload"
    );
}
