//! SSE resume across a SIGKILL of the real `quiver` binary.
//!
//! A client reads the change stream live while concurrent writers post application events,
//! and disconnects; the writers go on and the server is SIGKILLed in the middle of those
//! writes (requests in flight), restarted on
//! the same data directory, and the client reconnects with `Last-Event-ID` = the last id it
//! had received. It must then get, in order and once each, every event after that id: every
//! acknowledged one (with the seq its 201 named and the data that was sent), plus possibly
//! writes that were durable but whose reply was lost in the kill — never anything else, and
//! with seqs gapless from the resume point to the recovered end and on into new writes.

mod common;

use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const STEP_TIMEOUT: Duration = Duration::from_secs(20);
const EVENT_TYPE: &str = "resume.test";

/// A running `quiver serve`; SIGKILLed on drop so a failing test leaks no process.
struct Server {
    child: common::ServeProcess,
    base: String,
}

impl Server {
    fn start(data_dir: &Path) -> Server {
        let (child, base) =
            common::spawn_serve(data_dir, "127.0.0.1:0", &["--fsync", "always"], true);
        Server { child, base }
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
        .build()
        .expect("http client")
}

/// One SSE event frame: its id and the parsed envelope.
#[derive(Debug, Clone)]
struct Frame {
    id: u64,
    event: String,
    envelope: Value,
}

/// Reads SSE event frames into `out` until the stream ends or fails, or `stop_after` frames
/// were read (then it disconnects); returns how it ended.
async fn read_sse(
    resp: reqwest::Response,
    out: Arc<Mutex<Vec<Frame>>>,
    stop_after: usize,
) -> String {
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        match stream.next().await {
            Some(Ok(bytes)) => buf.extend_from_slice(&bytes),
            Some(Err(e)) => return format!("error: {e}"),
            None => return "end".into(),
        }
        // Only whole frames (terminated by a blank line) count as received.
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let raw: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8(raw).expect("SSE is UTF-8");
            let (mut id, mut event, mut data) = (None, None, String::new());
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.parse::<u64>().expect("SSE id is a seq"));
                } else if let Some(v) = line.strip_prefix("event: ") {
                    event = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            if let (Some(id), Some(event)) = (id, event) {
                assert_ne!(event, "error", "the stream reported an error: {data}");
                let envelope: Value = serde_json::from_str(&data).expect("SSE data is JSON");
                assert_eq!(envelope["seq"].as_u64(), Some(id), "the SSE id is the seq");
                let mut out = out.lock().unwrap();
                out.push(Frame {
                    id,
                    event,
                    envelope,
                });
                if out.len() >= stop_after {
                    return "disconnected".into();
                }
            }
        }
    }
}

async fn open_sse(
    http: &reqwest::Client,
    server: &Server,
    last_event_id: Option<u64>,
) -> reqwest::Response {
    let mut req = http.get(server.url(&format!("/v1/events/stream?types={EVENT_TYPE}")));
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id.to_string());
    }
    let resp = tokio::time::timeout(STEP_TIMEOUT, req.send())
        .await
        .expect("SSE headers in time")
        .expect("open the SSE stream");
    assert_eq!(resp.status(), 200);
    resp
}

/// Posts one application event; `Some(seq)` when acknowledged (201), `None` when the request
/// was lost on the wire.
async fn post_event(http: &reqwest::Client, server_url: &str, w: u64, n: u64) -> Option<u64> {
    let resp = http
        .post(format!("{server_url}/v1/events"))
        .json(&json!({"type": EVENT_TYPE, "data": {"w": w, "n": n}}))
        .send()
        .await
        .ok()?;
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.ok()?;
    assert_eq!(status, 201, "publish refused: {body}");
    Some(body["seq"].as_u64().expect("seq in the 201"))
}

fn key_of(f: &Frame) -> (u64, u64) {
    let d = &f.envelope["data"];
    (
        d["w"].as_u64().expect("data.w"),
        d["n"].as_u64().expect("data.n"),
    )
}

async fn durable_seq(http: &reqwest::Client, server: &Server) -> u64 {
    let body: Value = http
        .get(server.url("/health"))
        .send()
        .await
        .expect("health")
        .json()
        .await
        .expect("health json");
    body["durable_seq"].as_u64().expect("durable_seq")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resumes_exactly_after_sigkill_and_restart() {
    const WRITERS: u64 = 8;
    let dir = tempfile::tempdir().unwrap();
    let http = client();
    let mut server = Server::start(dir.path());

    // Some history before the client connects.
    let mut acked: HashMap<(u64, u64), u64> = HashMap::new();
    for n in 0..20 {
        let seq = post_event(&http, &server.base, 99, n).await.expect("ack");
        acked.insert((99, n), seq);
    }

    // The client reads live (from the beginning) while writers run, and disconnects after
    // 100 events; the writers go on.
    let before: Arc<Mutex<Vec<Frame>>> = Arc::new(Mutex::new(Vec::new()));
    let resp = open_sse(&http, &server, Some(0)).await;
    let reader = tokio::spawn(read_sse(resp, Arc::clone(&before), 100));

    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(Mutex::new(Vec::<((u64, u64), u64)>::new()));
    let lost = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (http, base) = (http.clone(), server.base.clone());
        let (stop, acks, lost) = (Arc::clone(&stop), Arc::clone(&acks), Arc::clone(&lost));
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                match post_event(&http, &base, w, n).await {
                    Some(seq) => acks.lock().unwrap().push(((w, n), seq)),
                    None => {
                        lost.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
                n += 1;
            }
        }));
    }
    // Kill in the middle of the writes, well after the client has gone.
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let (a, b) = (acks.lock().unwrap().len(), before.lock().unwrap().len());
        if a >= 400 && b >= 100 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writers/reader too slow: {a} acks, {b} read"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill9();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        tokio::time::timeout(STEP_TIMEOUT, w)
            .await
            .expect("writers end once the server is gone")
            .unwrap();
    }
    let ended = tokio::time::timeout(STEP_TIMEOUT, reader)
        .await
        .expect("the client disconnected")
        .unwrap();
    for (key, seq) in acks.lock().unwrap().iter() {
        assert!(
            acked.insert(*key, *seq).is_none(),
            "{key:?} acknowledged twice"
        );
    }
    let before = before.lock().unwrap().clone();
    let last_read = before.last().expect("the client read events").id;
    eprintln!(
        "killed with {} acknowledged, {} lost in flight; the client had read up to seq {last_read} ({ended})",
        acked.len(),
        lost.load(Ordering::Relaxed)
    );
    // What the client saw live was gapless from seq 1 and only durable, acknowledged-or-not
    // writes of this test.
    assert_eq!(before.len(), 100);
    for (i, f) in before.iter().enumerate() {
        assert_eq!(f.id, i as u64 + 1, "live ids gapless from 1");
        assert_eq!(f.event, EVENT_TYPE);
    }

    // Restart on the same data dir; resume from the last id the client had.
    let server = Server::start(dir.path());
    let recovered = durable_seq(&http, &server).await;
    let max_acked = acked.values().copied().max().unwrap();
    assert!(
        recovered >= max_acked,
        "recovered to {recovered} < acknowledged {max_acked}"
    );
    assert!(
        recovered >= last_read,
        "the client saw seq {last_read} > recovered {recovered}"
    );
    let after: Arc<Mutex<Vec<Frame>>> = Arc::new(Mutex::new(Vec::new()));
    let resp = open_sse(&http, &server, Some(last_read)).await;
    let reader = tokio::spawn(read_sse(resp, Arc::clone(&after), usize::MAX));
    // One new write after the restart, to see the stream continue gaplessly.
    let new_seq = post_event(&http, &server.base, 1000, 0)
        .await
        .expect("ack after restart");
    assert_eq!(
        new_seq,
        recovered + 1,
        "seq continues gaplessly after the restart"
    );
    let deadline = Instant::now() + STEP_TIMEOUT;
    while after.lock().unwrap().last().map(|f| f.id) != Some(new_seq) {
        assert!(
            Instant::now() < deadline,
            "resumed stream incomplete: {} frames",
            after.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // anything extra would show now
    reader.abort();
    let after = after.lock().unwrap().clone();

    // Exactly the events after `last_read`, in order, once, gapless, up to the new write.
    let ids: Vec<u64> = after.iter().map(|f| f.id).collect();
    let want: Vec<u64> = (last_read + 1..=new_seq).collect();
    assert_eq!(
        ids, want,
        "resumed ids: gapless from Last-Event-ID + 1, in order, once"
    );
    let mut seen_keys = HashSet::new();
    for f in before.iter().chain(after.iter()) {
        let key = key_of(f);
        assert!(seen_keys.insert(key), "{key:?} delivered twice");
        if let Some(&seq) = acked.get(&key) {
            assert_eq!(seq, f.id, "{key:?} arrives under the seq its 201 named");
        }
    }
    // Every acknowledged write after the resume point is there (and those before it were
    // read live).
    let delivered: BTreeMap<u64, (u64, u64)> = before
        .iter()
        .chain(after.iter())
        .map(|f| (f.id, key_of(f)))
        .collect();
    for (key, seq) in &acked {
        assert_eq!(
            delivered.get(seq),
            Some(key),
            "acknowledged {key:?} at seq {seq} missing"
        );
    }
    let unacked = (recovered as usize).saturating_sub(acked.len());
    eprintln!(
        "resumed: {} events after seq {last_read}; {unacked} durable but unacknowledged (reply lost in the kill)",
        after.len()
    );
    assert!(
        unacked as u64 <= WRITERS,
        "at most one unacknowledged write per writer"
    );
    assert!(
        after.len() > 200,
        "the resume covers the writes made while the client was away"
    );
}
