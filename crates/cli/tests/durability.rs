//! Durability tests of the `quiver` binary: real child processes, real sockets, SIGKILL and
//! SIGTERM, and byte-level damage to the files a killed server leaves behind.
//!
//! What they hold the server to:
//! - an acknowledged write survives any crash, with exactly the content that was sent, and an
//!   acknowledged delete stays deleted; a refused (4xx) write never appears;
//! - `seq` is unique per acknowledged write and continues gaplessly across restarts;
//! - a torn tail of the last segment is cut back to the last whole frame, and nothing else is;
//! - corruption anywhere else stops start-up with the file and byte offset named;
//! - SIGTERM exits 0 after writing a final snapshot.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DIM: usize = 8;
const SEGMENT_MAGIC: &[u8] = b"QVRLOG01";
const FRAME_HEADER_BYTES: usize = 16;
const START_TIMEOUT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------ the server process

/// A running `quiver serve`. Killed (SIGKILL) on drop so a failing test leaks no process.
struct Server {
    child: Child,
    base: String,
    stderr: Arc<Mutex<String>>,
    _stdout: BufReader<ChildStdout>,
}

/// What a start attempt led to.
enum Launch {
    Ready(Server),
    Exited {
        status: ExitStatus,
        stdout: String,
        stderr: String,
    },
}

impl Launch {
    fn ready(self) -> Server {
        match self {
            Launch::Ready(server) => server,
            Launch::Exited {
                status,
                stdout,
                stderr,
            } => panic!("quiver serve exited ({status}) instead of serving\nstdout: {stdout}\nstderr:\n{stderr}"),
        }
    }
}

fn launch(data_dir: &Path, extra: &[&str]) -> Launch {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quiver"))
        .arg("serve")
        .args(["--addr", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env("QUIVER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn quiver serve");
    let stderr = Arc::new(Mutex::new(String::new()));
    let stderr_thread = {
        let mut pipe = child.stderr.take().expect("stderr is piped");
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sink
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
        })
    };
    // Read the one stdout line on a thread, so a server that neither serves nor exits fails
    // the test instead of hanging it.
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let read = reader.read_line(&mut line);
        let _ = tx.send((read.map(|_| line), reader));
    });
    let (line, reader) = match rx.recv_timeout(START_TIMEOUT) {
        Ok((Ok(line), reader)) => (line, reader),
        Ok((Err(e), _)) => panic!("reading the server's stdout failed: {e}"),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "quiver serve neither served nor exited within {START_TIMEOUT:?}; stderr:\n{}",
                stderr.lock().unwrap()
            );
        }
    };
    const PREFIX: &str = "quiver listening on ";
    if let Some(url) = line.trim_end().strip_prefix(PREFIX) {
        return Launch::Ready(Server {
            child,
            base: url.to_string(),
            stderr,
            _stdout: reader,
        });
    }
    // No "listening" line: it must be exiting. Anything printed is kept for the assertion.
    let deadline = Instant::now() + START_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("quiver serve printed {line:?} but neither served nor exited");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = stderr_thread.join();
    let mut stdout = line;
    let mut rest = String::new();
    let mut reader = reader;
    let _ = reader.read_to_string(&mut rest);
    stdout.push_str(&rest);
    let stderr = stderr.lock().unwrap().clone();
    Launch::Exited {
        status,
        stdout,
        stderr,
    }
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// SIGKILL (what `Child::kill` sends on Unix) and reap.
    fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL the server");
        let status = self.child.wait().expect("reap the server");
        assert!(!status.success(), "a SIGKILLed server cannot exit 0");
    }

    /// SIGTERM and wait for the exit (bounded).
    fn sigterm(&mut self) -> ExitStatus {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: sending a signal to our own, not yet reaped, child.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not exit within 30 s of SIGTERM; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ HTTP

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("http client")
}

/// A reply, or `Lost` when the request failed on the wire (the server died): such a write may
/// or may not have happened.
enum Reply {
    Status {
        status: u16,
        body: Value,
        seq_header: Option<u64>,
    },
    Lost(String),
}

async fn send(request: reqwest::RequestBuilder) -> Reply {
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => return Reply::Lost(e.to_string()),
    };
    let status = response.status().as_u16();
    let seq_header = response
        .headers()
        .get("x-quiver-seq")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse().ok());
    match response.bytes().await {
        Err(e) => Reply::Lost(e.to_string()),
        Ok(bytes) => Reply::Status {
            status,
            body: if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap_or(Value::Null)
            },
            seq_header,
        },
    }
}

/// A request that must succeed with `expected` status; returns the body.
async fn expect_status(request: reqwest::RequestBuilder, expected: u16) -> (Value, Option<u64>) {
    match send(request).await {
        Reply::Status {
            status,
            body,
            seq_header,
        } => {
            assert_eq!(status, expected, "unexpected status; body: {body}");
            (body, seq_header)
        }
        Reply::Lost(e) => panic!("request failed: {e}"),
    }
}

async fn health(client: &reqwest::Client, server: &Server) -> (u64, u64) {
    let (body, _) = expect_status(client.get(server.url("/health")), 200).await;
    assert_eq!(body["status"], "healthy");
    (
        body["seq"].as_u64().expect("health seq"),
        body["durable_seq"].as_u64().expect("health durable_seq"),
    )
}

async fn create_library(client: &reqwest::Client, server: &Server) -> (String, u64) {
    let (body, header) = expect_status(
        client.post(server.url("/v1/libraries")).json(&json!({
            "name": "durable",
            "dimension": DIM,
            "metric": "l2",
        })),
        201,
    )
    .await;
    let seq = body["seq"].as_u64().expect("library seq");
    assert_eq!(header, Some(seq), "x-quiver-seq matches the body");
    (body["id"].as_str().expect("library id").to_string(), seq)
}

/// Every document of a library, through the paginated list.
async fn list_all(client: &reqwest::Client, server: &Server, lib: &str) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let mut url = server.url(&format!("/v1/libraries/{lib}/documents?limit=1000"));
        if let Some(a) = &after {
            url.push_str(&format!("&after={a}"));
        }
        let (page, _) = expect_status(client.get(url), 200).await;
        for doc in page["documents"].as_array().expect("documents array") {
            let id = doc["id"].as_str().expect("document id").to_string();
            assert!(
                out.insert(id.clone(), doc.clone()).is_none(),
                "{id} listed twice"
            );
        }
        match page["next_after"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
    }
    out
}

/// `GET` of each document (with embeddings), 8 at a time: `(id, status, body)`.
async fn fetch_docs(
    client: &reqwest::Client,
    server: &Server,
    lib: &str,
    ids: impl IntoIterator<Item = String>,
) -> Vec<(String, u16, Value)> {
    let permits = Arc::new(tokio::sync::Semaphore::new(8));
    let mut set = tokio::task::JoinSet::new();
    for id in ids {
        let client = client.clone();
        let url = server.url(&format!(
            "/v1/libraries/{lib}/documents/{id}?include_embeddings=true"
        ));
        let permits = Arc::clone(&permits);
        set.spawn(async move {
            let _permit = permits.acquire_owned().await.expect("semaphore");
            let response = client.get(url).send().await.expect("GET document");
            let status = response.status().as_u16();
            let body = response.json::<Value>().await.unwrap_or(Value::Null);
            (id, status, body)
        });
    }
    let mut out = Vec::new();
    while let Some(joined) = set.join_next().await {
        out.push(joined.expect("fetch task"));
    }
    out
}

// ------------------------------------------------------------------ documents

#[derive(Clone, Debug, PartialEq)]
struct ChunkContent {
    text: String,
    embedding: Vec<f32>,
    metadata: Value,
}

/// What a client sent for a document, and what it must read back.
#[derive(Clone, Debug, PartialEq)]
struct Content {
    title: String,
    metadata: Value,
    chunks: Vec<ChunkContent>,
}

impl Content {
    /// Random content; components are multiples of 1/8 so they survive JSON exactly.
    fn random(rng: &mut StdRng, id: &str, version: u32, dimension: usize) -> Content {
        let chunks = (0..rng.gen_range(1..=3))
            .map(|i| ChunkContent {
                text: format!("chunk {i} of {id} v{version} {}", rng.gen::<u32>()),
                embedding: (0..dimension)
                    .map(|_| rng.gen_range(-800i32..800) as f32 / 8.0)
                    .collect(),
                metadata: json!({"i": i, "even": i % 2 == 0}),
            })
            .collect();
        Content {
            title: format!("doc {id} v{version} ✓"),
            metadata: json!({
                "v": version,
                "tag": format!("t{}", rng.gen_range(0..5)),
                "flag": rng.gen_bool(0.5),
                "nested": {"xs": [version, rng.gen_range(0..1000)], "s": "é"},
            }),
            chunks,
        }
    }

    fn to_json(&self, id: &str) -> Value {
        json!({
            "id": id,
            "title": self.title,
            "metadata": self.metadata,
            "chunks": self.chunks.iter().map(|c| json!({
                "text": c.text,
                "embedding": c.embedding,
                "metadata": c.metadata,
            })).collect::<Vec<_>>(),
        })
    }

    /// Parses a `GET document?include_embeddings=true` body.
    fn from_json(doc: &Value) -> Content {
        Content {
            title: doc["title"].as_str().unwrap_or("<missing>").to_string(),
            metadata: doc["metadata"].clone(),
            chunks: doc["chunks"]
                .as_array()
                .map(|chunks| {
                    chunks
                        .iter()
                        .map(|c| ChunkContent {
                            text: c["text"].as_str().unwrap_or("<missing>").to_string(),
                            embedding: c["embedding"]
                                .as_array()
                                .map(|xs| {
                                    xs.iter()
                                        .map(|x| x.as_f64().unwrap_or(f64::NAN) as f32)
                                        .collect()
                                })
                                .unwrap_or_default(),
                            metadata: c["metadata"].clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

async fn upsert(
    client: &reqwest::Client,
    server: &Server,
    lib: &str,
    id: &str,
    content: &Content,
) -> u64 {
    let (body, header) = expect_status(
        client
            .post(server.url(&format!("/v1/libraries/{lib}/documents")))
            .json(&content.to_json(id)),
        201,
    )
    .await;
    let seq = body["seq"].as_u64().expect("upsert seq");
    assert_eq!(header, Some(seq), "x-quiver-seq matches the body");
    seq
}

async fn delete(client: &reqwest::Client, server: &Server, lib: &str, id: &str) -> u64 {
    let (_, header) = expect_status(
        client.delete(server.url(&format!("/v1/libraries/{lib}/documents/{id}"))),
        204,
    )
    .await;
    header.expect("a delete answers with x-quiver-seq")
}

/// Asserts that exactly `expected` is stored: every present document with its exact content,
/// every absent one 404, nothing else listed.
async fn assert_documents(
    client: &reqwest::Client,
    server: &Server,
    lib: &str,
    expected: &BTreeMap<String, Option<Content>>,
) {
    let listed = list_all(client, server, lib).await;
    let want: BTreeSet<&String> = expected
        .iter()
        .filter(|(_, c)| c.is_some())
        .map(|(id, _)| id)
        .collect();
    let got: BTreeSet<&String> = listed.keys().collect();
    assert_eq!(got, want, "the listed documents");
    for (id, status, body) in fetch_docs(client, server, lib, expected.keys().cloned()).await {
        match &expected[&id] {
            Some(content) => {
                assert_eq!(status, 200, "GET {id}: {body}");
                assert_eq!(&Content::from_json(&body), content, "content of {id}");
            }
            None => assert_eq!(status, 404, "GET {id} (must be absent): {body}"),
        }
    }
}

// ------------------------------------------------------------------ files

fn segments(data_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(data_dir.join("log"))
        .expect("read the log directory")
        .filter_map(|e| {
            let path = e.expect("dir entry").path();
            let name = path.file_name()?.to_str()?.to_string();
            let seq = name.strip_suffix(".qlog")?.parse().ok()?;
            Some((seq, path))
        })
        .collect();
    out.sort();
    out
}

fn snapshot_seqs(data_dir: &Path) -> Vec<u64> {
    let mut out: Vec<u64> = std::fs::read_dir(data_dir.join("snapshots"))
        .expect("read the snapshot directory")
        .filter_map(|e| {
            let name = e.expect("dir entry").file_name().to_str()?.to_string();
            name.strip_prefix("snapshot-")?
                .strip_suffix(".qsnap")?
                .parse()
                .ok()
        })
        .collect();
    out.sort();
    out
}

/// One frame of a segment file, as laid out on disk.
#[derive(Clone, Copy, Debug)]
struct FrameAt {
    offset: usize,
    end: usize,
    seq: u64,
}

/// The frames of an intact segment file (header, then whole frames to the end).
fn frames(bytes: &[u8]) -> Vec<FrameAt> {
    assert_eq!(&bytes[..SEGMENT_MAGIC.len()], SEGMENT_MAGIC);
    let mut out = Vec::new();
    let mut offset = SEGMENT_MAGIC.len();
    while offset < bytes.len() {
        let header = &bytes[offset..offset + FRAME_HEADER_BYTES];
        let payload_len = u32::from_le_bytes(header[0..4].try_into().unwrap()) as usize;
        let seq = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let end = offset + FRAME_HEADER_BYTES + payload_len;
        assert!(end <= bytes.len(), "a frame runs past the end of the file");
        out.push(FrameAt { offset, end, seq });
        offset = end;
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the copy");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}

// ------------------------------------------------------------------ 1. crash rounds

const WRITERS_ASYNC: usize = 4;
const WRITERS: usize = WRITERS_ASYNC + 1; // plus one OS thread with its own runtime
const WRITER_OPS_MAX: usize = 20_000;

#[derive(Clone, Debug)]
enum Op {
    Upsert(Content),
    Delete,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    Acked(u64),
    Rejected(u16),
    Unknown,
}

#[derive(Debug)]
struct Event {
    id: String,
    op: Op,
    outcome: Outcome,
}

struct WriterPlan {
    round: usize,
    writer: usize,
    base: String,
    lib: String,
    /// Live documents from earlier rounds that this writer alone may delete or replace.
    owned: Vec<(String, Content)>,
    stop: Arc<AtomicBool>,
    seed: u64,
}

#[derive(Default)]
struct WriterReport {
    events: Vec<Event>,
    problems: Vec<String>,
}

/// Writes until the server dies (or `stop`): new documents (single and batched), replaces and
/// deletes of its own acknowledged documents, and requests that must be refused. Records the
/// outcome of every request. Stops at the first request lost on the wire, so only a writer's
/// last event can be `Unknown`.
async fn run_writer(plan: WriterPlan) -> WriterReport {
    let client = client();
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let mut report = WriterReport::default();
    let mut live: Vec<String> = Vec::new();
    let mut contents: HashMap<String, Content> = HashMap::new();
    let mut versions: HashMap<String, u32> = HashMap::new();
    for (id, content) in plan.owned {
        live.push(id.clone());
        contents.insert(id, content);
    }
    let docs_url = format!("{}/v1/libraries/{}/documents", plan.base, plan.lib);
    let mut last_seq = 0u64;
    let mut n = 0usize;
    let prefix = format!("r{}-w{}", plan.round, plan.writer);

    // Checks a success's seq: present, matching the header, increasing along this writer.
    let mut check_seq =
        |what: &str, seq: Option<u64>, header: Option<u64>, problems: &mut Vec<String>| -> u64 {
            let Some(seq) = seq else {
                problems.push(format!("{what}: a success without a seq"));
                return 0;
            };
            if header.is_some() && header != Some(seq) {
                problems.push(format!("{what}: x-quiver-seq {header:?} != body seq {seq}"));
            }
            if seq <= last_seq {
                problems.push(format!(
                    "{what}: seq {seq} not above this writer's previous {last_seq}"
                ));
            }
            last_seq = seq;
            seq
        };

    while !plan.stop.load(Ordering::Acquire) && n < WRITER_OPS_MAX {
        n += 1;
        // With nothing of its own to delete or replace, a writer creates documents.
        let roll: f64 = rng.gen::<f64>() * if live.is_empty() { 0.65 } else { 1.0 };
        if roll < 0.55 {
            // A new document.
            let id = format!("{prefix}-{n}");
            let content = Content::random(&mut rng, &id, 1, DIM);
            let reply = send(client.post(&docs_url).json(&content.to_json(&id))).await;
            let outcome = match reply {
                Reply::Lost(_) => Outcome::Unknown,
                Reply::Status {
                    status: 201,
                    body,
                    seq_header,
                } => {
                    if body["id"] != json!(id) {
                        report
                            .problems
                            .push(format!("create {id}: answered for {}", body["id"]));
                    }
                    let seq =
                        check_seq(&id, body["seq"].as_u64(), seq_header, &mut report.problems);
                    live.push(id.clone());
                    contents.insert(id.clone(), content.clone());
                    Outcome::Acked(seq)
                }
                Reply::Status { status, body, .. } => {
                    report
                        .problems
                        .push(format!("create {id}: status {status}: {body}"));
                    Outcome::Rejected(status)
                }
            };
            report.events.push(Event {
                id,
                op: Op::Upsert(content),
                outcome,
            });
            if outcome == Outcome::Unknown {
                break;
            }
        } else if roll < 0.65 {
            // A batch of new documents with one invalid item (wrong dimension) among them.
            let size = rng.gen_range(2..=4);
            let bad_index = rng.gen_range(0..=size);
            let mut items: Vec<(String, Content, bool)> = Vec::new();
            for i in 0..=size {
                let id = format!("{prefix}-{n}-b{i}");
                let bad = i == bad_index;
                let content = Content::random(&mut rng, &id, 1, if bad { DIM - 1 } else { DIM });
                items.push((id, content, bad));
            }
            let body = json!({
                "documents": items.iter().map(|(id, c, _)| c.to_json(id)).collect::<Vec<_>>(),
            });
            let reply = send(client.post(format!("{docs_url}/batch")).json(&body)).await;
            let mut lost = false;
            let mut outcomes = vec![Outcome::Unknown; items.len()];
            match reply {
                Reply::Lost(_) => lost = true,
                Reply::Status {
                    status: 200,
                    body,
                    seq_header,
                } => {
                    let results = body["results"].as_array().cloned().unwrap_or_default();
                    if results.len() != items.len() {
                        report
                            .problems
                            .push(format!("batch {prefix}-{n}: {} results", results.len()));
                    }
                    let mut batch_max = 0;
                    for (i, r) in results.iter().enumerate().take(items.len()) {
                        let (id, content, bad) = &items[i];
                        if r["ok"] == json!(true) {
                            let seq = check_seq(id, r["seq"].as_u64(), None, &mut report.problems);
                            batch_max = batch_max.max(seq);
                            if *bad || r["document_id"] != json!(id) {
                                report.problems.push(format!("batch item {id}: {r}"));
                            }
                            live.push(id.clone());
                            contents.insert(id.clone(), content.clone());
                            outcomes[i] = Outcome::Acked(seq);
                        } else {
                            if !*bad {
                                report
                                    .problems
                                    .push(format!("batch item {id} refused: {r}"));
                            }
                            outcomes[i] =
                                Outcome::Rejected(r["status"].as_u64().unwrap_or(0) as u16);
                        }
                    }
                    if body["seq"].as_u64() != Some(batch_max) || seq_header != Some(batch_max) {
                        report.problems.push(format!(
                            "batch {prefix}-{n}: seq {} / header {seq_header:?}, items up to {batch_max}",
                            body["seq"]
                        ));
                    }
                }
                Reply::Status { status, body, .. } => {
                    report
                        .problems
                        .push(format!("batch {prefix}-{n}: status {status}: {body}"));
                    outcomes = vec![Outcome::Rejected(status); items.len()];
                }
            }
            for ((id, content, _), outcome) in items.into_iter().zip(outcomes) {
                report.events.push(Event {
                    id,
                    op: Op::Upsert(content),
                    outcome,
                });
            }
            if lost {
                break;
            }
        } else if roll < 0.78 {
            // Delete one of this writer's live documents.
            let id = live.swap_remove(rng.gen_range(0..live.len()));
            let reply = send(client.delete(format!("{docs_url}/{id}"))).await;
            let outcome = match reply {
                Reply::Lost(_) => Outcome::Unknown,
                Reply::Status {
                    status: 204,
                    seq_header,
                    ..
                } => Outcome::Acked(check_seq(
                    &format!("delete {id}"),
                    seq_header,
                    None,
                    &mut report.problems,
                )),
                Reply::Status { status, body, .. } => {
                    report
                        .problems
                        .push(format!("delete {id}: status {status}: {body}"));
                    live.push(id.clone());
                    Outcome::Rejected(status)
                }
            };
            if let Outcome::Acked(_) = outcome {
                contents.remove(&id);
            }
            report.events.push(Event {
                id,
                op: Op::Delete,
                outcome,
            });
            if outcome == Outcome::Unknown {
                break;
            }
        } else {
            // Replace one of this writer's live documents, validly (200) or with a vector of
            // the wrong dimension (must be refused and change nothing).
            let bad = roll >= 0.90;
            let id = live[rng.gen_range(0..live.len())].clone();
            let version = versions.entry(id.clone()).or_insert(1);
            *version += 1;
            let content = Content::random(&mut rng, &id, *version, if bad { DIM + 1 } else { DIM });
            let reply = send(client.post(&docs_url).json(&content.to_json(&id))).await;
            let outcome = match reply {
                Reply::Lost(_) => Outcome::Unknown,
                Reply::Status {
                    status: 200,
                    body,
                    seq_header,
                } => {
                    if bad {
                        report
                            .problems
                            .push(format!("bad replace of {id} accepted: {body}"));
                    }
                    let seq =
                        check_seq(&id, body["seq"].as_u64(), seq_header, &mut report.problems);
                    contents.insert(id.clone(), content.clone());
                    Outcome::Acked(seq)
                }
                Reply::Status { status, body, .. } => {
                    if !bad || !(400..500).contains(&status) {
                        report.problems.push(format!(
                            "replace {id} (bad: {bad}): status {status}: {body}"
                        ));
                    }
                    Outcome::Rejected(status)
                }
            };
            report.events.push(Event {
                id,
                op: Op::Upsert(content),
                outcome,
            });
            if outcome == Outcome::Unknown {
                break;
            }
        }
    }
    report
}

/// What the test knows the database holds, and every seq it acknowledged.
#[derive(Default)]
struct Model {
    known: BTreeMap<String, Option<Content>>,
    acked_seqs: HashSet<u64>,
    max_acked_seq: u64,
}

impl Model {
    fn ack(&mut self, seq: u64, what: &str, failures: &mut Vec<String>) {
        if !self.acked_seqs.insert(seq) {
            failures.push(format!("seq {seq} acknowledged twice (again for {what})"));
        }
        self.max_acked_seq = self.max_acked_seq.max(seq);
    }
}

#[derive(Default, Debug)]
struct Tally {
    acked: usize,
    rejected: usize,
    unknown: usize,
}

/// After a restart: checks the server against the model plus the events of the crashed round,
/// then records what it found, and checks that the next write gets the next seq.
async fn verify_after_restart(
    label: &str,
    client: &reqwest::Client,
    server: &Server,
    lib: &str,
    model: &mut Model,
    events: Vec<Event>,
) {
    let mut failures = Vec::new();
    // Possible states of each document: one, unless its last request was lost in the crash.
    let mut candidates: BTreeMap<String, Vec<Option<Content>>> = model
        .known
        .iter()
        .map(|(id, c)| (id.clone(), vec![c.clone()]))
        .collect();
    for event in events {
        if let Outcome::Acked(seq) = event.outcome {
            model.ack(seq, &event.id, &mut failures);
        }
        let after = match &event.op {
            Op::Upsert(content) => Some(content.clone()),
            Op::Delete => None,
        };
        let states = candidates.entry(event.id).or_insert_with(|| vec![None]);
        match event.outcome {
            Outcome::Acked(_) => *states = vec![after],
            Outcome::Rejected(_) => {}
            Outcome::Unknown => {
                if !states.contains(&after) {
                    states.push(after);
                }
            }
        }
    }

    let (seq, durable_seq) = health(client, server).await;
    if durable_seq != seq {
        failures.push(format!(
            "after recovery durable_seq {durable_seq} != seq {seq}"
        ));
    }
    if seq < model.max_acked_seq {
        failures.push(format!(
            "/health seq {seq} is below the highest acknowledged seq {}",
            model.max_acked_seq
        ));
    }

    let listed = list_all(client, server, lib).await;
    for id in listed.keys() {
        if !candidates.contains_key(id) {
            failures.push(format!("{id} is present but was never written"));
        }
    }
    let present: Vec<String> = candidates
        .keys()
        .filter(|id| listed.contains_key(*id))
        .cloned()
        .collect();
    let mut observed: BTreeMap<String, Option<Content>> = BTreeMap::new();
    for (id, status, body) in fetch_docs(client, server, lib, present).await {
        if status != 200 {
            failures.push(format!("{id} is listed but GET answers {status}"));
            continue;
        }
        let content = Content::from_json(&body);
        let summary = &listed[&id];
        if summary["title"] != body["title"] || summary["metadata"] != body["metadata"] {
            failures.push(format!("{id}: the list and GET disagree"));
        }
        observed.insert(id, Some(content));
    }
    let mut total_chunks = 0;
    for (id, states) in &candidates {
        let found = observed.get(id).cloned().unwrap_or(None);
        if let Some(c) = &found {
            total_chunks += c.chunks.len();
        }
        if !states.contains(&found) {
            let describe = |s: &Option<Content>| match s {
                None => "absent".to_string(),
                Some(c) => format!("{c:?}"),
            };
            failures.push(format!(
                "{id}: found {} but expected one of [{}]",
                describe(&found),
                states.iter().map(describe).collect::<Vec<_>>().join(" | ")
            ));
        }
        observed.entry(id.clone()).or_insert(found);
    }
    let (info, _) =
        expect_status(client.get(server.url(&format!("/v1/libraries/{lib}"))), 200).await;
    if info["num_documents"].as_u64() != Some(listed.len() as u64)
        || info["num_chunks"].as_u64() != Some(total_chunks as u64)
        || info["dimension"] != json!(DIM)
        || info["metric"] != json!("l2")
    {
        failures.push(format!(
            "library {info} disagrees with {} listed documents / {total_chunks} chunks",
            listed.len()
        ));
    }
    model.known = observed;

    // Gapless: the first write after the restart gets the recovered seq + 1.
    let probe = format!("probe-{}", label.replace(' ', "-"));
    let mut rng = StdRng::seed_from_u64(seq);
    let content = Content::random(&mut rng, &probe, 1, DIM);
    let probe_seq = upsert(client, server, lib, &probe, &content).await;
    if probe_seq != seq + 1 {
        failures.push(format!(
            "the first write after restart got seq {probe_seq}, expected {}",
            seq + 1
        ));
    }
    model.ack(probe_seq, &probe, &mut failures);
    model.known.insert(probe, Some(content));

    if !failures.is_empty() {
        let shown = failures
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        panic!(
            "{label}: {} durability failures:\n{shown}\nserver stderr:\n{}",
            failures.len(),
            server.stderr()
        );
    }
}

/// Server flags per round: snapshots every few hundred records with log truncation
/// (`--retain-events none`) in some rounds, small segments so they roll, and large snapshot
/// intervals in others, so recovery runs from snapshot + log and from log alone.
const ROUND_FLAGS: [&[&str]; 5] = [
    &["--snapshot-every", "1000000", "--segment-bytes", "65536"],
    &[
        "--snapshot-every",
        "200",
        "--snapshot-min-bytes",
        "0",
        "--segment-bytes",
        "65536",
        "--retain-events",
        "none",
    ],
    &[
        "--snapshot-every",
        "50",
        "--snapshot-min-bytes",
        "0",
        "--segment-bytes",
        "16384",
        "--retain-events",
        "none",
    ],
    &["--snapshot-every", "1000000", "--segment-bytes", "16384"],
    &[
        "--snapshot-every",
        "200",
        "--snapshot-min-bytes",
        "0",
        "--segment-bytes",
        "65536",
        "--retain-events",
        "none",
    ],
];

fn flags(round: usize) -> Vec<&'static str> {
    let mut f = vec!["--fsync", "always"];
    f.extend_from_slice(ROUND_FLAGS[round % ROUND_FLAGS.len()]);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_repeated_sigkill() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let seed: u64 = rand::thread_rng().gen();
    eprintln!("crash rounds: seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let client = client();
    let mut model = Model::default();

    let mut server = launch(&data, &flags(0)).ready();
    let (lib, lib_seq) = create_library(&client, &server).await;
    assert_eq!(lib_seq, 1, "the first record of a new database has seq 1");
    let mut failures = Vec::new();
    model.ack(lib_seq, "library", &mut failures);
    assert!(failures.is_empty());

    let rounds = ROUND_FLAGS.len();
    for round in 0..rounds {
        if round > 0 {
            server = launch(&data, &flags(round)).ready();
            verify_after_restart(
                &format!("round {round} start"),
                &client,
                &server,
                &lib,
                &mut model,
                Vec::new(),
            )
            .await;
        }
        // Hand each writer its share of the live documents to delete or replace.
        let mut owned: Vec<Vec<(String, Content)>> = vec![Vec::new(); WRITERS];
        for (i, (id, content)) in model
            .known
            .iter()
            .filter_map(|(id, c)| c.as_ref().map(|c| (id, c)))
            .enumerate()
        {
            owned[i % WRITERS].push((id.clone(), content.clone()));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut plans: Vec<WriterPlan> = owned
            .into_iter()
            .enumerate()
            .map(|(writer, owned)| WriterPlan {
                round,
                writer,
                base: server.base.clone(),
                lib: lib.clone(),
                owned,
                stop: Arc::clone(&stop),
                seed: rng.gen(),
            })
            .collect();
        let thread_plan = plans.pop().expect("one plan per writer");
        let thread = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("writer runtime")
                .block_on(run_writer(thread_plan))
        });
        let tasks: Vec<_> = plans
            .into_iter()
            .map(|p| tokio::spawn(run_writer(p)))
            .collect();

        let delay = Duration::from_millis(rng.gen_range(100..=600));
        tokio::time::sleep(delay).await;
        server.kill9();
        stop.store(true, Ordering::Release);

        let mut reports = Vec::new();
        for task in tasks {
            reports.push(task.await.expect("writer task"));
        }
        reports.push(
            tokio::task::spawn_blocking(move || thread.join().expect("writer thread"))
                .await
                .expect("join"),
        );
        let mut tally = Tally::default();
        let mut events = Vec::new();
        for report in reports {
            assert!(
                report.problems.is_empty(),
                "round {round}: the server answered wrongly before the crash:\n{}",
                report.problems.join("\n")
            );
            for e in report.events {
                match e.outcome {
                    Outcome::Acked(_) => tally.acked += 1,
                    Outcome::Rejected(_) => tally.rejected += 1,
                    Outcome::Unknown => tally.unknown += 1,
                }
                events.push(e);
            }
        }
        eprintln!("round {round}: killed after {delay:?}: {tally:?}");
        assert!(
            tally.acked > 0,
            "round {round}: no write was acknowledged before the kill"
        );

        server = launch(&data, &flags(round + 1)).ready();
        verify_after_restart(
            &format!("round {round}"),
            &client,
            &server,
            &lib,
            &mut model,
            events,
        )
        .await;
        server.kill9();
    }
    let snapshots = snapshot_seqs(&data);
    let segs = segments(&data);
    eprintln!(
        "after {rounds} rounds: {} documents, max acked seq {}, snapshots {snapshots:?}, segments from seq {:?} ({} files)",
        model.known.values().filter(|c| c.is_some()).count(),
        model.max_acked_seq,
        segs.first().map(|s| s.0),
        segs.len(),
    );
}

// ------------------------------------------------------------------ 2. torn tail

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tail_is_cut_back_to_the_last_whole_frame() {
    const DOCS: usize = 24;
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let flags = ["--fsync", "always", "--snapshot-every", "1000000"];
    let client = client();
    let mut rng = StdRng::seed_from_u64(rand::thread_rng().gen());

    let mut server = launch(&data, &flags).ready();
    let (lib, lib_seq) = create_library(&client, &server).await;
    assert_eq!(lib_seq, 1);
    let mut docs: Vec<(String, Content, u64)> = Vec::new();
    for i in 0..DOCS {
        let id = format!("doc-{i:03}");
        let content = Content::random(&mut rng, &id, 1, DIM);
        let seq = upsert(&client, &server, &lib, &id, &content).await;
        assert_eq!(seq, i as u64 + 2, "seqs are gapless");
        docs.push((id, content, seq));
    }
    server.kill9();
    assert!(
        snapshot_seqs(&data).is_empty(),
        "no snapshot may cover the tail"
    );

    let segs = segments(&data);
    assert_eq!(segs.len(), 1, "one segment at the default size");
    let segment_name = segs[0].1.file_name().unwrap().to_owned();
    let bytes = std::fs::read(&segs[0].1).expect("read the segment");
    let all = frames(&bytes);
    assert_eq!(
        all.iter().map(|f| f.seq).collect::<Vec<_>>(),
        (1..=DOCS as u64 + 1).collect::<Vec<_>>()
    );

    // Cuts inside the last few frames: random ones plus the edge cases.
    let tail_start = all[all.len() - 5].offset;
    let last = all[all.len() - 1];
    let mut cuts: Vec<(usize, bool)> = vec![
        (last.offset + 3, false),                      // inside the last header
        (last.offset + FRAME_HEADER_BYTES + 1, false), // inside the last payload
        (bytes.len() - 1, false),                      // one byte short
        (tail_start + 1, true),                        // torn and then zero-filled
    ];
    for _ in 0..3 {
        cuts.push((
            rng.gen_range(tail_start + 1..bytes.len()),
            rng.gen_bool(0.3),
        ));
    }
    for (cut, zero_fill) in cuts {
        let case = tempfile::tempdir().expect("tempdir");
        let copy = case.path().join("data");
        copy_dir(&data, &copy);
        let segment = copy.join("log").join(&segment_name);
        let mut damaged = bytes[..cut].to_vec();
        if zero_fill {
            damaged.resize(bytes.len(), 0);
        }
        std::fs::write(&segment, &damaged).expect("write the torn segment");
        let intact = all.iter().filter(|f| f.end <= cut).count() as u64;
        let intact_end = all
            .iter()
            .filter(|f| f.end <= cut)
            .map(|f| f.end)
            .max()
            .unwrap_or(8);
        let what = format!("cut at {cut} of {} (zero-filled: {zero_fill})", bytes.len());

        let server = launch(&copy, &flags).ready();
        assert_eq!(health(&client, &server).await, (intact, intact), "{what}");
        assert_eq!(
            std::fs::metadata(&segment).expect("segment").len(),
            intact_end as u64,
            "{what}: exactly the torn bytes are cut"
        );
        let expected: BTreeMap<String, Option<Content>> = docs
            .iter()
            .map(|(id, c, seq)| (id.clone(), (*seq <= intact).then(|| c.clone())))
            .collect();
        assert_documents(&client, &server, &lib, &expected).await;
        let id = format!("after-cut-{cut}");
        let content = Content::random(&mut rng, &id, 1, DIM);
        let seq = upsert(&client, &server, &lib, &id, &content).await;
        assert_eq!(seq, intact + 1, "{what}: the next write continues the seqs");
        assert_eq!(health(&client, &server).await, (intact + 1, intact + 1));
    }
}

// ------------------------------------------------------------------ 3. mid-log corruption

/// Starts on a damaged copy and asserts the server refuses: exit non-zero, never serving, with
/// the file and the byte offset on stderr.
fn assert_refuses(data: &Path, flags: &[&str], file_name: &str, offset: usize, what: &str) {
    match launch(data, flags) {
        Launch::Ready(server) => panic!(
            "{what}: the server started on a corrupt log (stderr:\n{})",
            server.stderr()
        ),
        Launch::Exited {
            status,
            stdout,
            stderr,
        } => {
            assert!(!status.success(), "{what}: exit status {status}");
            assert!(
                !stdout.contains("listening"),
                "{what}: it announced it was serving: {stdout}"
            );
            assert!(
                stderr.contains(file_name),
                "{what}: stderr does not name {file_name}:\n{stderr}"
            );
            assert!(
                stderr.contains(&format!("byte offset {offset}")),
                "{what}: stderr does not name byte offset {offset}:\n{stderr}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mid_log_corruption_stops_start_up() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let flags = [
        "--fsync",
        "always",
        "--snapshot-every",
        "1000000",
        "--segment-bytes",
        "4096",
        "--retain-events",
        "forever",
    ];
    let client = client();
    let mut rng = StdRng::seed_from_u64(rand::thread_rng().gen());

    let mut server = launch(&data, &flags).ready();
    let (lib, _) = create_library(&client, &server).await;
    // Write until there are at least four segments and the last one holds three frames.
    let mut last_seq = 1;
    for i in 0.. {
        let id = format!("doc-{i:03}");
        last_seq = upsert(
            &client,
            &server,
            &lib,
            &id,
            &Content::random(&mut rng, &id, 1, DIM),
        )
        .await;
        let segs = segments(&data);
        if segs.len() >= 4 && last_seq >= segs.last().unwrap().0 + 2 {
            break;
        }
        assert!(i < 1000, "the log never rolled to four segments");
    }
    server.kill9(); // no final snapshot
    assert!(
        snapshot_seqs(&data).is_empty(),
        "no snapshot may cover the damage"
    );
    let segs = segments(&data);

    // (a) A payload byte of an early frame of the first (sealed) segment.
    {
        let case = tempfile::tempdir().expect("tempdir");
        let copy = case.path().join("data");
        copy_dir(&data, &copy);
        let path = copy.join("log").join(segs[0].1.file_name().unwrap());
        let mut bytes = std::fs::read(&path).expect("read");
        let frame = frames(&bytes)[1];
        bytes[(frame.offset + FRAME_HEADER_BYTES + frame.end) / 2] ^= 0x20;
        std::fs::write(&path, &bytes).expect("write");
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        assert_refuses(
            &copy,
            &flags,
            &name,
            frame.offset,
            "a flipped byte in a sealed segment",
        );
    }
    // (b) The first frame of the last segment, with whole frames after it: not a torn tail.
    {
        let case = tempfile::tempdir().expect("tempdir");
        let copy = case.path().join("data");
        copy_dir(&data, &copy);
        let (_, last) = segs.last().unwrap();
        let path = copy.join("log").join(last.file_name().unwrap());
        let mut bytes = std::fs::read(&path).expect("read");
        let all = frames(&bytes);
        assert!(all.len() >= 3);
        let frame = all[0];
        bytes[frame.offset + FRAME_HEADER_BYTES + 2] ^= 0x01;
        std::fs::write(&path, &bytes).expect("write");
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        assert_refuses(
            &copy,
            &flags,
            &name,
            frame.offset,
            "a flipped byte mid last segment",
        );
    }
    // (c) A missing middle segment: the next one no longer continues the seqs.
    {
        let case = tempfile::tempdir().expect("tempdir");
        let copy = case.path().join("data");
        copy_dir(&data, &copy);
        std::fs::remove_file(copy.join("log").join(segs[1].1.file_name().unwrap())).expect("rm");
        let name = segs[2].1.file_name().unwrap().to_str().unwrap().to_string();
        assert_refuses(&copy, &flags, &name, 0, "a missing segment");
    }
    // The undamaged original still opens with everything.
    let server = launch(&data, &flags).ready();
    assert_eq!(health(&client, &server).await, (last_seq, last_seq));
}

// ------------------------------------------------------------------ 4. clean shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_writes_a_final_snapshot_and_exits_zero() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let flags = ["--fsync", "always", "--snapshot-every", "1000000"];
    let client = client();
    let mut rng = StdRng::seed_from_u64(rand::thread_rng().gen());

    let mut server = launch(&data, &flags).ready();
    let (lib, _) = create_library(&client, &server).await;
    let mut expected: BTreeMap<String, Option<Content>> = BTreeMap::new();
    let mut last_seq = 0;
    for i in 0..20 {
        let id = format!("doc-{i:03}");
        let content = Content::random(&mut rng, &id, 1, DIM);
        last_seq = upsert(&client, &server, &lib, &id, &content).await;
        expected.insert(id, Some(content));
    }
    for i in [3, 7, 11] {
        let id = format!("doc-{i:03}");
        let seq = delete(&client, &server, &lib, &id).await;
        assert_eq!(seq, last_seq + 1);
        last_seq = seq;
        expected.insert(id, None);
    }
    assert_eq!(last_seq, 24, "1 library + 20 upserts + 3 deletes");
    assert!(
        snapshot_seqs(&data).is_empty(),
        "no snapshot before shutdown"
    );

    let status = server.sigterm();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM exits 0; stderr:\n{}",
        server.stderr()
    );
    assert_eq!(
        snapshot_seqs(&data),
        vec![last_seq],
        "the final snapshot covers every write"
    );

    let server = launch(&data, &flags).ready();
    assert_eq!(health(&client, &server).await, (last_seq, last_seq));
    assert_documents(&client, &server, &lib, &expected).await;
    let content = Content::random(&mut rng, "after", 1, DIM);
    assert_eq!(
        upsert(&client, &server, &lib, "after", &content).await,
        last_seq + 1
    );
}
