//! `events_bench`: end-to-end event streaming, side by side — Quiver (`POST /v1/events` →
//! one SSE client on `/v1/events/stream`), NATS JetStream (async-nats publisher awaiting
//! publish acks → pull consumer) and Redis Streams (`XADD` → `XREAD BLOCK`).
//!
//! This example owns the whole of `bench/events.sh`. Per run and per target (a system with one
//! durability setting) it starts a fresh server on a free port with a temporary data
//! directory, then runs one phase per rate: `--publishers` concurrent publishers (Quiver: one
//! HTTP/1.1 keep-alive connection each; JetStream: one shared NATS connection, as its clients
//! are built; Redis: one connection each), each with one publish in flight, append events with
//! the same ~`--payload-bytes` JSON payload `{"bench_i":K,"pad":"…"}` to a fresh
//! stream/subject/type, while one subscriber (started before the first publish) receives them.
//! A fixed rate schedules event K at `start + K / rate` (tokio's 1 ms timer: events leave in
//! ~1 ms bursts); `max` has every publisher send back to back for `--duration` seconds.
//!
//! Per phase it reports events/s (acknowledged events over the time from the first send to the
//! last acknowledgement), end-to-end latency send → received by the subscriber (p50/p99/max; the
//! send instant is taken just before the request is written), and the publish acknowledgement
//! latency send → ack. For Quiver it also reports ack → SSE: the subscriber's receive instant
//! minus the instant the publisher had the 201 (after fsync) — the "commit → SSE" of the issue,
//! as the client can see it; negative when the SSE frame arrives first. Every phase checks that
//! the subscriber received every acknowledged event exactly once (Quiver: SSE ids gapless and
//! equal to the acknowledged seqs).
//!
//! The fan-out phase (Quiver only, on the targets whose fsync policy `--fanout-fsync` names;
//! `always` by default): `--fanout-clients` SSE clients connect (each its own connection), then
//! events are published at `--fanout-rate` for `--duration` seconds; every client must receive
//! every event once, and latency send → received is taken over all (client, event) pairs.
//! The SSE clients are plain-socket HTTP/1.1 readers (see `sse_client`), so that a thousand of
//! them cost the shared cores as little as a measuring client can.
//!
//! Targets: `quiver-always` (`--fsync always`, group commit, ack after fdatasync),
//! `quiver-always-ndjson` / `quiver-never-ndjson` / `quiver-1s-ndjson` (the same servers, but
//! each publisher holds one NDJSON `POST /v1/events` request and sends one line per event,
//! still one event in flight: an acknowledgement per line, without an HTTP request each —
//! as a NATS client publishes on its connection),
//! `quiver-always-mux` / `quiver-never-mux` / `quiver-1s-mux` (one NDJSON request shared by
//! all publishers, pipelined, each line acknowledged in order: how a NATS client publishes —
//! every publisher on one connection),
//! `quiver-1s` (`--fsync interval=1000`), `quiver-never` (`--fsync never`), `jetstream` (file
//! storage, the server's own sync policy: 2.9 acks without an fsync per message),
//! `jetstream-always` (`sync_interval: always`, when the nats-server supports it),
//! `redis-always` (`appendonly yes`, `appendfsync always`), `redis-everysec`.
//!
//! With `--runs N` it prints each run's table and then the medians per row over the runs.

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures::StreamExt;
use std::collections::HashMap;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[derive(Parser)]
#[command(about = "Event streaming benchmark: Quiver SSE vs NATS JetStream vs Redis Streams")]
struct Args {
    /// The `quiver` binary (release).
    #[arg(long)]
    server_bin: PathBuf,
    #[arg(long, default_value = "nats-server")]
    nats_bin: String,
    #[arg(long, default_value = "redis-server")]
    redis_bin: String,
    /// Targets, comma separated (see the module docs).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "quiver-always,jetstream,jetstream-always,redis-always,quiver-never,quiver-1s,redis-everysec"
    )]
    targets: Vec<String>,
    /// Rates in events/s, or `max`, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,max")]
    rates: Vec<String>,
    /// Seconds per phase.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Concurrent publishers, each with one publish in flight.
    #[arg(long, default_value_t = 64)]
    publishers: usize,
    /// Size of the JSON payload of each event, in bytes.
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// SSE clients of the fan-out phase (0 skips it).
    #[arg(long, default_value_t = 1000)]
    fanout_clients: usize,
    /// The Quiver fsync policies (`always`, `1s`, `never`) whose targets also run the fan-out
    /// phase, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "always")]
    fanout_fsync: Vec<String>,
    /// Events/s of the fan-out phase.
    #[arg(long, default_value_t = 1000)]
    fanout_rate: u64,
    /// Whole repetitions of everything; the medians over them are printed at the end.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Where temporary data directories go (default: the system temp dir).
    #[arg(long)]
    data_root: Option<PathBuf>,
}

/// Nanoseconds since the process's time base (one clock for publishers and subscribers).
fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn payload(k: u64, bytes: usize) -> String {
    let head = format!("{{\"bench_i\":{k},\"pad\":\"");
    let pad = bytes.saturating_sub(head.len() + 2);
    let mut s = String::with_capacity(bytes);
    s.push_str(&head);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

/// `bench_i` from the start of a payload.
fn bench_i(p: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"{\"bench_i\":";
    let rest = p.strip_prefix(KEY)?;
    let mut v = 0u64;
    let mut any = false;
    for &b in rest {
        if b.is_ascii_digit() {
            v = v * 10 + u64::from(b - b'0');
            any = true;
        } else {
            break;
        }
    }
    any.then_some(v)
}

// ------------------------------------------------------------------ servers

struct Proc {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: signalling our own child, not yet reaped.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

async fn wait_tcp(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} after 20 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start_quiver(args: &Args, fsync: &str) -> Result<(Proc, String)> {
    start_quiver_with(args, fsync, &[]).await
}

/// `quiver serve` with extra flags (the JetStream targets' `--jetstream-url …`).
async fn start_quiver_with(args: &Args, fsync: &str, extra: &[String]) -> Result<(Proc, String)> {
    let dir = tempdir(args)?;
    let mut child = Command::new(&args.server_bin)
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--fsync",
            fsync,
            "--data-dir",
        ])
        .arg(dir.path())
        .args(extra)
        .env("QUIVER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawn {}", args.server_bin.display()))?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("quiver did not print its address within 30 s")??
        .context("quiver exited before listening")?;
    let base = line
        .strip_prefix("quiver listening on ")
        .with_context(|| format!("unexpected first line {line:?}"))?
        .to_string();
    // Keep draining stdout so the server never blocks on it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((Proc { child, _dir: dir }, base))
}

/// Does this nats-server accept `sync_interval` in its `jetstream` block?
async fn nats_supports_sync_interval(args: &Args) -> bool {
    match start_nats(args, true).await {
        Ok((p, _)) => {
            p.stop().await;
            true
        }
        Err(_) => false,
    }
}

async fn start_nats(args: &Args, sync_always: bool) -> Result<(Proc, u16)> {
    let dir = tempdir(args)?;
    let port = free_port()?;
    let conf = dir.path().join("nats.conf");
    let store = dir.path().join("store");
    let sync = if sync_always {
        ", sync_interval: always"
    } else {
        ""
    };
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?}{sync} }}\n",
            store.display().to_string()
        ),
    )?;
    let mut child = Command::new(&args.nats_bin)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawn {}", args.nats_bin))?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    if let Some(status) = child.try_wait()? {
        bail!("nats-server exited at start ({status}); config: {conf:?}");
    }
    let proc = Proc { child, _dir: dir };
    wait_tcp(port).await?;
    Ok((proc, port))
}

async fn start_redis(args: &Args, appendfsync: &str) -> Result<(Proc, u16)> {
    let dir = tempdir(args)?;
    let port = free_port()?;
    let child = Command::new(&args.redis_bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
        .arg(dir.path())
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            appendfsync,
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawn {}", args.redis_bin))?;
    let proc = Proc { child, _dir: dir };
    wait_tcp(port).await?;
    Ok((proc, port))
}

fn tempdir(args: &Args) -> Result<tempfile::TempDir> {
    Ok(match &args.data_root {
        Some(root) => {
            std::fs::create_dir_all(root)?;
            tempfile::Builder::new()
                .prefix("events-bench-")
                .tempdir_in(root)?
        }
        None => tempfile::Builder::new().prefix("events-bench-").tempdir()?,
    })
}

// ------------------------------------------------------------------ one phase

#[derive(Clone, Copy, Debug)]
enum Rate {
    Fixed(u64),
    Max,
}

impl Rate {
    fn parse(s: &str) -> Result<Rate> {
        if s.trim() == "max" {
            Ok(Rate::Max)
        } else {
            Ok(Rate::Fixed(s.trim().parse().context("rate")?))
        }
    }
    fn label(self) -> String {
        match self {
            Rate::Fixed(r) => format!("{r}/s"),
            Rate::Max => "max".into(),
        }
    }
}

/// What the publishers recorded: per event index, send and ack instants (0 = none) and the
/// key the subscriber will see it under (Quiver: the seq; others: the index).
struct Sent {
    send_ns: Vec<AtomicU64>,
    ack_ns: Vec<AtomicU64>,
    key: Vec<AtomicU64>,
    next: AtomicUsize,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Sent {
    fn new(n: usize) -> Sent {
        let v = || (0..n).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        Sent {
            send_ns: v(),
            ack_ns: v(),
            key: v(),
            next: AtomicUsize::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
        }
    }
    fn error(&self, e: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut f = self.first_error.lock().unwrap();
        if f.is_none() {
            *f = Some(e);
        }
    }
}

/// A publisher's single operation: publish event `k` with `body`, returning the key.
#[derive(Clone)]
enum Publisher {
    Quiver {
        http: reqwest::Client,
        url: String,
        event_type: String,
    },
    /// `POST /v1/events` as NDJSON: one long request per publisher, one line per event, one
    /// status line back per event once it is durable (the pipelined path).
    QuiverStream {
        http: reqwest::Client,
        url: String,
        event_type: String,
    },
    /// `POST /v1/events` as NDJSON over one request shared by every publisher, pipelined: as
    /// a NATS client multiplexes its publishers over one connection.
    QuiverMux {
        mux: Arc<MuxConn>,
        event_type: String,
    },
    Nats {
        js: async_nats::jetstream::Context,
        subject: String,
    },
    Redis {
        client: redis::Client,
        stream: String,
    },
}

enum Conn {
    None,
    Redis(redis::aio::MultiplexedConnection),
    /// A publisher's own NDJSON publish request (one line in flight on it).
    QuiverStream(MuxConn),
}

type Ack = Result<u64, String>;

/// One status line of an NDJSON publish reply: its seq or its error; `None` for the summary
/// line (and anything that is not JSON).
fn ack_of_line(line: &[u8]) -> Option<Ack> {
    let v = serde_json::from_slice::<serde_json::Value>(line).ok()?;
    if v.get("summary").is_some() {
        return None;
    }
    Some(match v["seq"].as_u64() {
        Some(seq) if v["ok"] == true => Ok(seq),
        _ => Err(format!("NDJSON publish: {v}")),
    })
}

/// One NDJSON publish request shared by all publishers: each hands over its line with a
/// oneshot for its ack; a writer task joins every line that is ready into one body chunk and
/// queues the oneshots in send order; the reader matches status lines to them in that order
/// (the server answers lines in order).
struct MuxConn {
    tx: tokio::sync::mpsc::Sender<(Vec<u8>, tokio::sync::oneshot::Sender<Ack>)>,
}

impl MuxConn {
    /// Publishes one event and waits for its acknowledgement: its seq.
    async fn publish(&self, event_type: &str, payload: &str) -> Result<u64> {
        let line = format!("{{\"type\":\"{event_type}\",\"data\":{payload}}}\n");
        let (ack_tx, ack_rx) = tokio::sync::oneshot::channel();
        self.tx
            .send((line.into_bytes(), ack_tx))
            .await
            .map_err(|_| anyhow::anyhow!("the NDJSON publish request ended"))?;
        match ack_rx.await {
            Ok(Ok(seq)) => Ok(seq),
            Ok(Err(e)) => bail!("{e}"),
            Err(_) => bail!("the NDJSON publish reply ended"),
        }
    }
}

async fn quiver_mux_conn(http: &reqwest::Client, url: &str) -> Result<MuxConn> {
    type Waiting = Arc<Mutex<std::collections::VecDeque<tokio::sync::oneshot::Sender<Ack>>>>;
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<(Vec<u8>, tokio::sync::oneshot::Sender<Ack>)>(4096);
    let (body_tx, body_rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(64);
    let waiting: Waiting = Arc::new(Mutex::new(std::collections::VecDeque::new()));
    let writer_waiting = Arc::clone(&waiting);
    tokio::spawn(async move {
        while let Some((mut chunk, ack)) = rx.recv().await {
            writer_waiting.lock().unwrap().push_back(ack);
            while chunk.len() < 64 * 1024 {
                let Ok((line, ack)) = rx.try_recv() else {
                    break;
                };
                chunk.extend_from_slice(&line);
                writer_waiting.lock().unwrap().push_back(ack);
            }
            if body_tx.send(Ok(chunk)).await.is_err() {
                return;
            }
        }
    });
    let body = reqwest::Body::wrap_stream(futures::stream::unfold(body_rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let request = http
        .post(url)
        .header("content-type", "application/x-ndjson")
        .body(body);
    tokio::spawn(async move {
        let fail_all = |why: String| {
            for ack in waiting.lock().unwrap().drain(..) {
                let _ = ack.send(Err(why.clone()));
            }
        };
        let resp = match request.send().await {
            Ok(r) if r.status().as_u16() == 200 => r,
            Ok(r) => return fail_all(format!("NDJSON publish: {}", r.status())),
            Err(e) => return fail_all(format!("NDJSON publish: {e}")),
        };
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else { break };
            buf.extend_from_slice(&chunk);
            let mut start = 0;
            while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
                let line = &buf[start..start + nl];
                start += nl + 1;
                let Some(ack) = ack_of_line(line) else {
                    continue;
                };
                if let Some(waiter) = waiting.lock().unwrap().pop_front() {
                    let _ = waiter.send(ack);
                }
            }
            buf.drain(..start);
        }
        fail_all("the NDJSON publish reply ended".to_string());
    });
    Ok(MuxConn { tx })
}

impl Publisher {
    async fn connect(&self) -> Result<Conn> {
        Ok(match self {
            Publisher::Redis { client, .. } => {
                Conn::Redis(client.get_multiplexed_async_connection().await?)
            }
            Publisher::QuiverStream { http, url, .. } => {
                Conn::QuiverStream(quiver_mux_conn(http, url).await?)
            }
            _ => Conn::None,
        })
    }

    async fn publish(&self, conn: &mut Conn, k: u64, payload: String) -> Result<u64> {
        match (self, conn) {
            (
                Publisher::Quiver {
                    http,
                    url,
                    event_type,
                },
                _,
            ) => {
                let body = format!("{{\"type\":\"{event_type}\",\"data\":{payload}}}");
                let resp = http
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                let status = resp.status();
                let seq = resp
                    .headers()
                    .get("x-quiver-seq")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| s.parse::<u64>().ok());
                let text = resp.bytes().await?;
                if status.as_u16() != 201 {
                    bail!(
                        "POST /v1/events: {status} {}",
                        String::from_utf8_lossy(&text)
                    );
                }
                seq.context("no x-quiver-seq header")
            }
            (Publisher::QuiverStream { event_type, .. }, Conn::QuiverStream(mux)) => {
                mux.publish(event_type, &payload).await
            }
            (Publisher::QuiverMux { mux, event_type }, _) => {
                mux.publish(event_type, &payload).await
            }
            (Publisher::QuiverStream { .. }, _) => bail!("no NDJSON publish stream"),
            (Publisher::Nats { js, subject }, _) => {
                js.publish(subject.clone(), payload.into())
                    .await
                    .map_err(|e| anyhow::anyhow!("publish: {e}"))?
                    .await
                    .map_err(|e| anyhow::anyhow!("publish ack: {e}"))?;
                Ok(k)
            }
            (Publisher::Redis { stream, .. }, Conn::Redis(con)) => {
                let _id: String = redis::cmd("XADD")
                    .arg(stream)
                    .arg("*")
                    .arg("d")
                    .arg(payload)
                    .query_async(con)
                    .await?;
                Ok(k)
            }
            (Publisher::Redis { .. }, _) => bail!("no redis connection"),
        }
    }
}

async fn run_publishers(
    publisher: Publisher,
    publishers: usize,
    rate: Rate,
    duration: f64,
    payload_bytes: usize,
) -> Result<(Arc<Sent>, usize, u64)> {
    let cap = match rate {
        Rate::Fixed(r) => ((r as f64) * duration).round() as usize,
        Rate::Max => 3_000_000,
    };
    let sent = Arc::new(Sent::new(cap));
    let start_ns = now_ns() + 20_000_000;
    let start = Instant::now() + Duration::from_millis(20);
    let deadline = start + Duration::from_secs_f64(duration);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..publishers {
        let publisher = publisher.clone();
        let sent = Arc::clone(&sent);
        let mut conn = publisher.connect().await?;
        tasks.spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            loop {
                let k = sent.next.fetch_add(1, Ordering::Relaxed);
                if k >= cap {
                    break;
                }
                match rate {
                    Rate::Fixed(r) => {
                        let at = start
                            + Duration::from_nanos((k as u128 * 1_000_000_000 / r as u128) as u64);
                        tokio::time::sleep_until(at.into()).await;
                    }
                    Rate::Max => {
                        if Instant::now() >= deadline {
                            // Give the slot back is not needed: unsent slots have send_ns 0.
                            break;
                        }
                    }
                }
                let body = payload(k as u64, payload_bytes);
                sent.send_ns[k].store(now_ns(), Ordering::Relaxed);
                match publisher.publish(&mut conn, k as u64, body).await {
                    Ok(key) => {
                        sent.key[k].store(key, Ordering::Relaxed);
                        sent.ack_ns[k].store(now_ns(), Ordering::Release);
                    }
                    Err(e) => sent.error(format!("{e:#}")),
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r?;
    }
    let issued = sent.next.load(Ordering::Relaxed).min(cap);
    Ok((sent, issued, start_ns))
}

/// What a subscriber received: (key, receive instant).
type Received = Arc<Mutex<Vec<(u64, u64)>>>;

/// An SSE client: parses frames, records `(id, now)` for every event frame.
///
/// It speaks HTTP/1.1 on a plain socket (request line, headers, chunked body) instead of going
/// through reqwest: in the fan-out phase a thousand of these share the two cores with the
/// server, and reqwest's client runs each connection as a task that hands every chunk to the
/// body stream's task (two wakes and two copies per read). Here a read is one wake: the bytes
/// are de-chunked into the frame buffer and split on blank lines in place.
async fn sse_client(
    url: String,
    received: Received,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("not an http:// URL: {url}"))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut socket = tokio::net::TcpStream::connect(host).await?;
    socket.set_nodelay(true)?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n");
    socket.write_all(request.as_bytes()).await?;
    // The response head.
    let mut raw: Vec<u8> = Vec::with_capacity(64 * 1024);
    let head_end = loop {
        if let Some(i) = memchr::memmem::find(&raw, b"\r\n\r\n") {
            break i + 4;
        }
        if raw.len() > 16 * 1024 {
            bail!("SSE {url}: response head over 16 KiB");
        }
        if socket.read_buf(&mut raw).await? == 0 {
            bail!("SSE {url}: connection closed before the response head");
        }
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        bail!("SSE {url}: {}", head.lines().next().unwrap_or(""));
    }
    let chunked = head.contains("transfer-encoding: chunked");
    raw.drain(..head_end);
    let _ = ready.send(());
    let frame_end = memchr::memmem::Finder::new(b"\n\n");
    let mut body = Dechunk::new(chunked);
    let mut frames: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut batch: Vec<(u64, u64)> = Vec::with_capacity(1024);
    loop {
        if !raw.is_empty() {
            let t = now_ns();
            body.feed(&raw, &mut frames)?;
            raw.clear();
            let mut start = 0;
            while let Some(end) = frame_end.find(&frames[start..]) {
                if let Some(id) = frame_id(&frames[start..start + end]) {
                    batch.push((id, t));
                }
                start += end + 2;
            }
            if start == frames.len() {
                frames.clear();
            } else {
                frames.drain(..start);
            }
            if frames.len() > SSE_FRAME_BYTES_LIMIT {
                bail!("SSE {url}: no frame end in {SSE_FRAME_BYTES_LIMIT} bytes");
            }
            if !batch.is_empty() {
                received.lock().unwrap().append(&mut batch);
            }
        }
        if socket.read_buf(&mut raw).await? == 0 {
            return Ok(());
        }
    }
}

/// The longest SSE frame the measuring client buffers (the server's are under 100 KiB).
const SSE_FRAME_BYTES_LIMIT: usize = 16 << 20;

/// HTTP/1.1 chunked transfer decoding, fed any split of the bytes.
struct Dechunk {
    chunked: bool,
    /// Data bytes left in the current chunk, then its CRLF (2 bytes).
    data_left: usize,
    crlf_left: usize,
    /// The size line read so far (hex digits, extensions), without its CRLF.
    size_line: Vec<u8>,
}

impl Dechunk {
    fn new(chunked: bool) -> Self {
        Dechunk {
            chunked,
            data_left: 0,
            crlf_left: 0,
            size_line: Vec::new(),
        }
    }

    /// Appends the data bytes in `input` to `out`.
    fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<()> {
        if !self.chunked {
            out.extend_from_slice(input);
            return Ok(());
        }
        while !input.is_empty() {
            if self.data_left > 0 {
                let n = self.data_left.min(input.len());
                out.extend_from_slice(&input[..n]);
                self.data_left -= n;
                input = &input[n..];
            } else if self.crlf_left > 0 {
                let n = self.crlf_left.min(input.len());
                self.crlf_left -= n;
                input = &input[n..];
            } else {
                let Some(nl) = memchr::memchr(b'\n', input) else {
                    self.size_line.extend_from_slice(input);
                    if self.size_line.len() > 1024 {
                        bail!("a chunk size line over 1 KiB");
                    }
                    return Ok(());
                };
                self.size_line.extend_from_slice(&input[..nl]);
                input = &input[nl + 1..];
                let line = std::str::from_utf8(&self.size_line)?;
                let hex = line
                    .trim_end_matches('\r')
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim();
                let size = usize::from_str_radix(hex, 16)
                    .with_context(|| format!("bad chunk size line {line:?}"))?;
                self.size_line.clear();
                if size == 0 {
                    bail!("the SSE body ended");
                }
                self.data_left = size;
                self.crlf_left = 2;
            }
        }
        Ok(())
    }
}

/// The `id:` of an SSE frame: its first line for Quiver's frames, else found by scanning.
fn frame_id(frame: &[u8]) -> Option<u64> {
    if let Some(rest) = frame.strip_prefix(b"id: ") {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits > 0 && digits <= 19 {
            return rest[..digits].iter().try_fold(0u64, |n, &b| {
                n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
            });
        }
    }
    for line in frame.split(|&b| b == b'\n') {
        if let Some(rest) = line.strip_prefix(b"id: ") {
            return std::str::from_utf8(rest).ok()?.trim().parse().ok();
        }
    }
    None
}

#[derive(Clone, Debug, Default)]
struct Row {
    target: String,
    durability: String,
    rate: String,
    events_per_s: f64,
    e2e_p50_ms: f64,
    e2e_p99_ms: f64,
    e2e_max_ms: f64,
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    /// Quiver only: subscriber receive − publisher ack.
    commit_sse_p50_ms: Option<f64>,
    commit_sse_p99_ms: Option<f64>,
    acked: u64,
    delivered_ok: bool,
    /// CPU seconds of the server process and of this process (publishers + subscribers)
    /// during the phase.
    server_cpu_s: f64,
    bench_cpu_s: f64,
    note: String,
}

/// CPU seconds (user + system, all threads) of a process so far.
fn cpu_s(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    (ticks(11) + ticks(12)) / hz
}

/// Measures the CPU the server (`pid`) and this process spend while `f` runs.
async fn with_cpu<T>(pid: u32, row: &mut Row, f: impl std::future::Future<Output = T>) -> T {
    let (s0, b0) = (cpu_s(&pid.to_string()), cpu_s("self"));
    let out = f.await;
    row.server_cpu_s = cpu_s(&pid.to_string()) - s0;
    row.bench_cpu_s = cpu_s("self") - b0;
    out
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn sort(v: &mut [f64]) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
}

/// Computes a row from what was sent and what `subscribers` received.
fn summarize(sent: &Sent, issued: usize, start_ns: u64, subs: &[Vec<(u64, u64)>], row: &mut Row) {
    let mut key_to_k: HashMap<u64, usize> = HashMap::with_capacity(issued);
    let mut ack_lat = Vec::with_capacity(issued);
    let mut last_ack = start_ns;
    let mut acked = 0u64;
    for k in 0..issued {
        let a = sent.ack_ns[k].load(Ordering::Acquire);
        if a == 0 {
            continue;
        }
        acked += 1;
        let s = sent.send_ns[k].load(Ordering::Relaxed);
        ack_lat.push((a - s) as f64 / 1e6);
        last_ack = last_ack.max(a);
        key_to_k.insert(sent.key[k].load(Ordering::Relaxed), k);
    }
    row.acked = acked;
    row.events_per_s = acked as f64 / ((last_ack.saturating_sub(start_ns)) as f64 / 1e9);
    sort(&mut ack_lat);
    row.ack_p50_ms = pct(&ack_lat, 0.5);
    row.ack_p99_ms = pct(&ack_lat, 0.99);
    let mut e2e = Vec::new();
    let mut commit_sse = Vec::new();
    let mut ok = true;
    let mut problems = Vec::new();
    for (i, sub) in subs.iter().enumerate() {
        let mut seen = vec![false; issued];
        let mut got = 0u64;
        for &(key, t) in sub {
            let Some(&k) = key_to_k.get(&key) else {
                // Not acknowledged (or unknown): never expected.
                if problems.len() < 3 {
                    problems.push(format!("subscriber {i}: unacknowledged key {key}"));
                }
                ok = false;
                continue;
            };
            if seen[k] {
                ok = false;
                if problems.len() < 3 {
                    problems.push(format!("subscriber {i}: key {key} twice"));
                }
                continue;
            }
            seen[k] = true;
            got += 1;
            let s = sent.send_ns[k].load(Ordering::Relaxed);
            e2e.push(t.saturating_sub(s) as f64 / 1e6);
            if row.target.starts_with("quiver") {
                let a = sent.ack_ns[k].load(Ordering::Relaxed);
                commit_sse.push((t as f64 - a as f64) / 1e6);
            }
        }
        if got != acked {
            ok = false;
            if problems.len() < 3 {
                problems.push(format!("subscriber {i}: {got} of {acked} events"));
            }
        }
    }
    sort(&mut e2e);
    row.e2e_p50_ms = pct(&e2e, 0.5);
    row.e2e_p99_ms = pct(&e2e, 0.99);
    row.e2e_max_ms = e2e.last().copied().unwrap_or(f64::NAN);
    if !commit_sse.is_empty() {
        sort(&mut commit_sse);
        row.commit_sse_p50_ms = Some(pct(&commit_sse, 0.5));
        row.commit_sse_p99_ms = Some(pct(&commit_sse, 0.99));
    }
    let errors = sent.errors.load(Ordering::Relaxed);
    if errors > 0 {
        problems.push(format!(
            "{errors} publish errors, first: {}",
            sent.first_error.lock().unwrap().clone().unwrap_or_default()
        ));
    }
    row.delivered_ok = ok && errors == 0;
    row.note = problems.join("; ");
}

/// Waits until every subscriber has `want` events or nothing arrived for 5 s.
async fn wait_delivered(subs: &[Received], want: u64) {
    let mut last_total = 0usize;
    let mut last_change = Instant::now();
    loop {
        let counts: Vec<usize> = subs.iter().map(|s| s.lock().unwrap().len()).collect();
        if counts.iter().all(|&c| c as u64 >= want) {
            // A little grace for duplicates to show up, if any.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
        let total: usize = counts.iter().sum();
        if total != last_total {
            last_total = total;
            last_change = Instant::now();
        } else if last_change.elapsed() > Duration::from_secs(5) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn acked_count(sent: &Sent, issued: usize) -> u64 {
    (0..issued)
        .filter(|&k| sent.ack_ns[k].load(Ordering::Acquire) != 0)
        .count() as u64
}

fn http_client(pool: usize) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .pool_max_idle_per_host(pool)
        .tcp_nodelay(true)
        .build()?)
}

/// How Quiver's publishers send: a POST each, an NDJSON request each, or one shared NDJSON
/// request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum QuiverMode {
    Post,
    Ndjson,
    Mux,
}

#[allow(clippy::too_many_arguments)]
async fn quiver_phase(
    args: &Args,
    base: &str,
    sub_base: &str,
    phase: usize,
    rate: Rate,
    sse_clients: usize,
    mode: QuiverMode,
    row: &mut Row,
) -> Result<()> {
    let event_type = format!("bench.p{phase}");
    // The subscribers read `sub_base`: the same server, or another replica of its log.
    let url = format!("{sub_base}/v1/events/stream?types={event_type}");
    let mut subs = Vec::new();
    let mut handles = Vec::new();
    for chunk_start in (0..sse_clients).step_by(100) {
        let mut readies = Vec::new();
        for _ in chunk_start..(chunk_start + 100).min(sse_clients) {
            let received: Received = Arc::new(Mutex::new(Vec::new()));
            let (tx, rx) = tokio::sync::oneshot::channel();
            handles.push(tokio::spawn(sse_client(
                url.clone(),
                Arc::clone(&received),
                tx,
            )));
            subs.push(received);
            readies.push(rx);
        }
        for r in readies {
            tokio::time::timeout(Duration::from_secs(30), r)
                .await
                .context("an SSE client did not connect within 30 s")?
                .context("an SSE client failed to connect")?;
        }
    }
    let (http, url) = (http_client(args.publishers)?, format!("{base}/v1/events"));
    let publisher = match mode {
        QuiverMode::Ndjson => Publisher::QuiverStream {
            http,
            url,
            event_type,
        },
        QuiverMode::Mux => Publisher::QuiverMux {
            mux: Arc::new(quiver_mux_conn(&http, &url).await?),
            event_type,
        },
        QuiverMode::Post => Publisher::Quiver {
            http,
            url,
            event_type,
        },
    };
    let (sent, issued, start_ns) = run_publishers(
        publisher,
        args.publishers,
        rate,
        args.duration,
        args.payload_bytes,
    )
    .await?;
    let acked = acked_count(&sent, issued);
    wait_delivered(&subs, acked).await;
    for h in &handles {
        h.abort();
    }
    let subs: Vec<Vec<(u64, u64)>> = subs
        .iter()
        .map(|s| std::mem::take(&mut *s.lock().unwrap()))
        .collect();
    summarize(&sent, issued, start_ns, &subs, row);
    // Quiver's SSE ids are the seqs: gapless and in order for a stream of one type.
    if let Some(first) = subs.first() {
        if first.windows(2).any(|w| w[1].0 != w[0].0 + 1) {
            row.delivered_ok = false;
            row.note.push_str(" SSE ids not gapless/in order;");
        }
    }
    Ok(())
}

async fn nats_phase(args: &Args, port: u16, phase: usize, rate: Rate, row: &mut Row) -> Result<()> {
    use async_nats::jetstream::{self, consumer, stream};
    let client = async_nats::connect(format!("127.0.0.1:{port}")).await?;
    let js = jetstream::new(client.clone());
    let subject = format!("bench.p{phase}");
    let st = js
        .create_stream(stream::Config {
            name: format!("BENCH{phase}"),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("create stream: {e}"))?;
    let cons = st
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("create consumer: {e}"))?;
    let mut messages = cons
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("consumer messages: {e}"))?;
    let received: Received = Arc::new(Mutex::new(Vec::new()));
    let sub = {
        let received = Arc::clone(&received);
        tokio::spawn(async move {
            while let Some(m) = messages.next().await {
                let t = now_ns();
                if let Ok(m) = m {
                    if let Some(k) = bench_i(&m.payload) {
                        received.lock().unwrap().push((k, t));
                    }
                }
            }
        })
    };
    let publisher = Publisher::Nats { js, subject };
    let (sent, issued, start_ns) = run_publishers(
        publisher,
        args.publishers,
        rate,
        args.duration,
        args.payload_bytes,
    )
    .await?;
    let acked = acked_count(&sent, issued);
    wait_delivered(std::slice::from_ref(&received), acked).await;
    sub.abort();
    let subs = vec![std::mem::take(&mut *received.lock().unwrap())];
    summarize(&sent, issued, start_ns, &subs, row);
    Ok(())
}

fn redis_entries(v: &redis::Value, out: &mut Vec<(String, Option<u64>)>) {
    // XREAD reply: [[stream, [[id, [field, value]], …]]] (RESP2) or a map (RESP3).
    match v {
        redis::Value::Array(items) => {
            if items.len() == 2 {
                if let (redis::Value::BulkString(id), redis::Value::Array(fields)) =
                    (&items[0], &items[1])
                {
                    if id.contains(&b'-') && id.iter().all(|b| b.is_ascii_digit() || *b == b'-') {
                        let k = fields.iter().find_map(|f| match f {
                            redis::Value::BulkString(b) => bench_i(b),
                            _ => None,
                        });
                        out.push((String::from_utf8_lossy(id).into_owned(), k));
                        return;
                    }
                }
            }
            for i in items {
                redis_entries(i, out);
            }
        }
        redis::Value::Map(pairs) => {
            for (a, b) in pairs {
                redis_entries(a, out);
                redis_entries(b, out);
            }
        }
        _ => {}
    }
}

async fn redis_phase(
    args: &Args,
    port: u16,
    phase: usize,
    rate: Rate,
    row: &mut Row,
) -> Result<()> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let stream = format!("bench:p{phase}");
    let received: Received = Arc::new(Mutex::new(Vec::new()));
    let mut con = client.get_multiplexed_async_connection().await?;
    let sub = {
        let received = Arc::clone(&received);
        let stream = stream.clone();
        tokio::spawn(async move {
            let mut last = "0-0".to_string();
            let mut entries = Vec::new();
            loop {
                let reply: redis::RedisResult<redis::Value> = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(1000)
                    .arg("BLOCK")
                    .arg(100)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(&last)
                    .query_async(&mut con)
                    .await;
                let t = now_ns();
                let Ok(reply) = reply else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                entries.clear();
                redis_entries(&reply, &mut entries);
                if let Some((id, _)) = entries.last() {
                    last = id.clone();
                }
                received
                    .lock()
                    .unwrap()
                    .extend(entries.iter().filter_map(|(_, k)| k.map(|k| (k, t))));
            }
        })
    };
    let publisher = Publisher::Redis { client, stream };
    let (sent, issued, start_ns) = run_publishers(
        publisher,
        args.publishers,
        rate,
        args.duration,
        args.payload_bytes,
    )
    .await?;
    let acked = acked_count(&sent, issued);
    wait_delivered(std::slice::from_ref(&received), acked).await;
    sub.abort();
    let subs = vec![std::mem::take(&mut *received.lock().unwrap())];
    summarize(&sent, issued, start_ns, &subs, row);
    Ok(())
}

// ------------------------------------------------------------------ targets and tables

fn durability(target: &str) -> &'static str {
    match target {
        "quiver-always" => "`--fsync always`: group commit, 201 after fdatasync",
        "quiver-always-ndjson" => "`--fsync always`, NDJSON publish: each line's ack after fdatasync",
        "quiver-1s-ndjson" => "`--fsync interval=1000`, NDJSON publish",
        "quiver-never-ndjson" => "`--fsync never`, NDJSON publish: ack after write(2)",
        "quiver-always-mux" => "`--fsync always`, one NDJSON publish shared by all publishers: each line's ack after fdatasync",
        "quiver-1s-mux" => "`--fsync interval=1000`, one shared NDJSON publish",
        "quiver-never-mux" => "`--fsync never`, one shared NDJSON publish: ack after write(2)",
        "quiver-1s" => "`--fsync interval=1000`: 201 after write(2), fdatasync every 1 s",
        "quiver-never" => "`--fsync never`: 201 after write(2), no fsync",
        "jetstream" => "file storage, server default: ack after the store write, no fsync per message (fsync of blocks every 2 min)",
        "quiver-jetstream" => "one replica on a JetStream log (`--jetstream-url`, `--fsync always`): 201 after JetStream's ack (as `jetstream`) and the local fdatasync",
        "quiver-jetstream-mux" => "one replica on a JetStream log, one NDJSON publish shared by all publishers: a JetStream message per group of lines",
        "quiver-jetstream-2" => "two replicas of one JetStream log: published to A, SSE read on B (ack → SSE is A's 201 → B's frame)",
        "jetstream-always" => "file storage, `sync_interval: always`",
        "redis-always" => "`appendonly yes`, `appendfsync always`",
        "redis-everysec" => "`appendonly yes`, `appendfsync everysec`",
        _ => "?",
    }
}

/// One Quiver target's server: whose CPU is counted, where events are published and where
/// the subscriber reads them (the same server, or another replica of its log).
struct QuiverRun<'a> {
    pid: u32,
    base: &'a str,
    sub_base: &'a str,
    mode: QuiverMode,
}

/// Runs one phase per rate against `run`, one row each.
async fn quiver_rates(
    args: &Args,
    target: &str,
    run: &QuiverRun<'_>,
    rates: &[Rate],
    phase: &mut usize,
    rows: &mut Vec<Row>,
) -> Result<()> {
    for &rate in rates {
        *phase += 1;
        let mut row = Row {
            target: target.to_string(),
            durability: durability(target).to_string(),
            rate: rate.label(),
            ..Default::default()
        };
        let mut inner = row.clone();
        with_cpu(
            run.pid,
            &mut row,
            quiver_phase(
                args,
                run.base,
                run.sub_base,
                *phase,
                rate,
                1,
                run.mode,
                &mut inner,
            ),
        )
        .await?;
        row = Row {
            server_cpu_s: row.server_cpu_s,
            bench_cpu_s: row.bench_cpu_s,
            ..inner
        };
        eprintln!("  {target} {}: {row:?}", row.rate);
        rows.push(row);
    }
    Ok(())
}

async fn run_target(
    args: &Args,
    target: &str,
    phase: &mut usize,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let rates: Vec<Rate> = args
        .rates
        .iter()
        .map(|r| Rate::parse(r))
        .collect::<Result<_>>()?;
    let new_row = |rate: String| Row {
        target: target.to_string(),
        durability: durability(target).to_string(),
        rate,
        ..Default::default()
    };
    match target {
        "quiver-always"
        | "quiver-1s"
        | "quiver-never"
        | "quiver-always-ndjson"
        | "quiver-1s-ndjson"
        | "quiver-never-ndjson"
        | "quiver-always-mux"
        | "quiver-1s-mux"
        | "quiver-never-mux" => {
            let mode = if target.ends_with("-ndjson") {
                QuiverMode::Ndjson
            } else if target.ends_with("-mux") {
                QuiverMode::Mux
            } else {
                QuiverMode::Post
            };
            let (fsync, fsync_label) =
                match target.trim_end_matches("-ndjson").trim_end_matches("-mux") {
                    "quiver-always" => ("always", "always"),
                    "quiver-1s" => ("interval=1000", "1s"),
                    _ => ("never", "never"),
                };
            let (proc, base) = start_quiver(args, fsync).await?;
            let run = QuiverRun {
                pid: proc.pid(),
                base: &base,
                sub_base: &base,
                mode,
            };
            quiver_rates(args, target, &run, &rates, phase, rows).await?;
            if args.fanout_fsync.iter().any(|f| f == fsync_label) && args.fanout_clients > 0 {
                *phase += 1;
                let mut row = new_row(format!(
                    "{}/s, {} SSE clients",
                    args.fanout_rate, args.fanout_clients
                ));
                let mut inner = row.clone();
                with_cpu(
                    proc.pid(),
                    &mut row,
                    quiver_phase(
                        args,
                        &base,
                        &base,
                        *phase,
                        Rate::Fixed(args.fanout_rate),
                        args.fanout_clients,
                        mode,
                        &mut inner,
                    ),
                )
                .await?;
                row = Row {
                    server_cpu_s: row.server_cpu_s,
                    bench_cpu_s: row.bench_cpu_s,
                    ..inner
                };
                eprintln!("  {target} fan-out: {row:?}");
                rows.push(row);
            }
            proc.stop().await;
        }
        "quiver-jetstream" | "quiver-jetstream-mux" | "quiver-jetstream-2" => {
            let mode = if target.ends_with("-mux") {
                QuiverMode::Mux
            } else {
                QuiverMode::Post
            };
            let (nats, port) = start_nats(args, false).await?;
            let flags = vec![
                "--jetstream-url".to_string(),
                format!("nats://127.0.0.1:{port}"),
            ];
            let (a, base) = start_quiver_with(args, "always", &flags).await?;
            let second = if target == "quiver-jetstream-2" {
                Some(start_quiver_with(args, "always", &flags).await?)
            } else {
                None
            };
            let sub_base = second.as_ref().map_or(base.clone(), |(_, b)| b.clone());
            let run = QuiverRun {
                pid: a.pid(),
                base: &base,
                sub_base: &sub_base,
                mode,
            };
            quiver_rates(args, target, &run, &rates, phase, rows).await?;
            if let Some((b, _)) = second {
                b.stop().await;
            }
            a.stop().await;
            nats.stop().await;
        }
        "jetstream" | "jetstream-always" => {
            let always = target == "jetstream-always";
            if always && !nats_supports_sync_interval(args).await {
                let mut row = new_row("-".into());
                row.note =
                    "this nats-server refuses `sync_interval` (added after 2.9): not run".into();
                eprintln!("  {target}: {}", row.note);
                rows.push(row);
                return Ok(());
            }
            let (proc, port) = start_nats(args, always).await?;
            for &rate in &rates {
                *phase += 1;
                let mut row = new_row(rate.label());
                let mut inner = row.clone();
                with_cpu(
                    proc.pid(),
                    &mut row,
                    nats_phase(args, port, *phase, rate, &mut inner),
                )
                .await?;
                row = Row {
                    server_cpu_s: row.server_cpu_s,
                    bench_cpu_s: row.bench_cpu_s,
                    ..inner
                };
                eprintln!("  {target} {}: {row:?}", row.rate);
                rows.push(row);
            }
            proc.stop().await;
        }
        "redis-always" | "redis-everysec" => {
            let policy = if target == "redis-always" {
                "always"
            } else {
                "everysec"
            };
            let (proc, port) = start_redis(args, policy).await?;
            for &rate in &rates {
                *phase += 1;
                let mut row = new_row(rate.label());
                let mut inner = row.clone();
                with_cpu(
                    proc.pid(),
                    &mut row,
                    redis_phase(args, port, *phase, rate, &mut inner),
                )
                .await?;
                row = Row {
                    server_cpu_s: row.server_cpu_s,
                    bench_cpu_s: row.bench_cpu_s,
                    ..inner
                };
                eprintln!("  {target} {}: {row:?}", row.rate);
                rows.push(row);
            }
            proc.stop().await;
        }
        other => bail!("unknown target {other:?}"),
    }
    Ok(())
}

fn f(v: f64, digits: usize) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.digits$}")
    }
}

fn print_table(title: &str, rows: &[Row]) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "\n### {title}\n");
    let _ = writeln!(
        out,
        "| target | rate | events/s | e2e p50 ms | e2e p99 ms | e2e max ms | ack p50 ms | ack p99 ms | ack→SSE p50 ms | ack→SSE p99 ms | server CPU s | bench CPU s | all delivered once |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|");
    for r in rows {
        let o = |v: Option<f64>| v.map_or("".into(), |v| f(v, 2));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}{} |",
            r.target,
            r.rate,
            f(r.events_per_s, 0),
            f(r.e2e_p50_ms, 2),
            f(r.e2e_p99_ms, 2),
            f(r.e2e_max_ms, 1),
            f(r.ack_p50_ms, 2),
            f(r.ack_p99_ms, 2),
            o(r.commit_sse_p50_ms),
            o(r.commit_sse_p99_ms),
            f(r.server_cpu_s, 1),
            f(r.bench_cpu_s, 1),
            if r.acked == 0 {
                "–"
            } else if r.delivered_ok {
                "yes"
            } else {
                "**NO**"
            },
            if r.note.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.note)
            },
        );
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    sort(&mut v);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn medians(runs: &[Vec<Row>]) -> Vec<Row> {
    let mut out = Vec::new();
    for (i, first) in runs[0].iter().enumerate() {
        let same: Vec<&Row> = runs
            .iter()
            .filter_map(|r| r.get(i))
            .filter(|r| r.target == first.target && r.rate == first.rate)
            .collect();
        let m = |g: &dyn Fn(&Row) -> f64| median(same.iter().map(|r| g(r)).collect());
        let mo = |g: &dyn Fn(&Row) -> Option<f64>| {
            let v: Vec<f64> = same.iter().filter_map(|r| g(r)).collect();
            (!v.is_empty()).then(|| median(v))
        };
        out.push(Row {
            target: first.target.clone(),
            durability: first.durability.clone(),
            rate: first.rate.clone(),
            events_per_s: m(&|r| r.events_per_s),
            e2e_p50_ms: m(&|r| r.e2e_p50_ms),
            e2e_p99_ms: m(&|r| r.e2e_p99_ms),
            e2e_max_ms: m(&|r| r.e2e_max_ms),
            ack_p50_ms: m(&|r| r.ack_p50_ms),
            ack_p99_ms: m(&|r| r.ack_p99_ms),
            commit_sse_p50_ms: mo(&|r| r.commit_sse_p50_ms),
            commit_sse_p99_ms: mo(&|r| r.commit_sse_p99_ms),
            acked: same.iter().map(|r| r.acked).min().unwrap_or(0),
            server_cpu_s: m(&|r| r.server_cpu_s),
            bench_cpu_s: m(&|r| r.bench_cpu_s),
            delivered_ok: same.iter().all(|r| r.delivered_ok),
            note: format!(
                "{} runs{}",
                same.len(),
                if same.iter().all(|r| r.delivered_ok) {
                    ""
                } else {
                    "; a run failed its delivery check"
                }
            ),
        });
    }
    out
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    raise_fd_limit();
    now_ns();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut all = Vec::new();
        let mut phase = 0usize;
        for run in 1..=args.runs {
            let mut rows = Vec::new();
            for target in &args.targets {
                eprintln!("run {run}: {target}");
                run_target(&args, target, &mut phase, &mut rows)
                    .await
                    .with_context(|| format!("run {run}, target {target}"))?;
            }
            print_table(&format!("run {run} of {}", args.runs), &rows);
            all.push(rows);
        }
        if args.runs > 1 {
            let med = medians(&all);
            print_table(&format!("medians over {} runs", args.runs), &med);
            // Ratios against JetStream at max.
            let at_max = |t: &str| {
                med.iter()
                    .find(|r| r.target == t && r.rate == "max")
                    .map(|r| r.events_per_s)
            };
            if let Some(js) = at_max("jetstream") {
                println!();
                for t in &args.targets {
                    if let Some(v) = at_max(t) {
                        println!("- {t} at max: {:.0} events/s = {:.2}× jetstream", v, v / js);
                    }
                }
            }
        }
        println!("\nDurability per target:");
        for t in &args.targets {
            println!("- {t}: {}", durability(t));
        }
        Ok(())
    })
}
