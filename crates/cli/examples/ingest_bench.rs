//! `ingest_bench`: durable batch ingest through the HTTP API — vectors per second and the
//! latency of each batch's acknowledgement.
//!
//! This example owns the whole of `bench/ingest.sh`. For every fsync policy and encoding it
//! asked for, it starts a fresh `quiver serve` (the release binary) on a temporary data
//! directory, creates a library `bench` (cosine, `--dimension` dims), and has `--clients`
//! concurrent clients post `--total` documents of one chunk each to the batch route,
//! `--batch` documents per request, until all are acknowledged. Request bodies are built
//! before the clock starts (deterministic vectors from `--seed`), so the timed phase is the
//! server's work plus HTTP, not the client's JSON formatting.
//!
//! Per configuration it reports: vectors/s (vectors / wall time of the timed phase), p50/p99/max
//! acknowledgement latency per request, the number of `fdatasync`/`fsync` calls the server made
//! during the timed phase (counted with `perf stat` tracepoints when `perf` works; "n/a"
//! otherwise), the server's and this process's CPU time, the server's peak RSS (`VmHWM`) and
//! the data directory's size.
//!
//! It checks its work: every response must report the whole batch committed, the library
//! must then report `num_chunks == --total`, a few documents are read back and their stored
//! vectors compared with the (normalised) vectors that were sent, and the server must shut
//! down cleanly on SIGTERM.
//!
//! Usage: `ingest_bench [--clients 4] [--batch 100] [--total 100000] [--encoding json|b64|both]
//! [--fsync-policies always,never] [--server-bin PATH] [--no-perf]`

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, ValueEnum};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const LIBRARY: &str = "bench";
const GOAL_VECTORS_PER_SECOND: f64 = 50_000.0;

#[derive(Parser)]
#[command(about = "Durable batch-ingest benchmark for `quiver serve`")]
struct Args {
    /// Concurrent clients, each with its own connection, posting one batch at a time.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Documents (of one chunk each) per batch request; at most 1000.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Vectors (= documents) to ingest per configuration.
    #[arg(long, default_value_t = 100_000)]
    total: usize,
    /// How vectors travel: `embedding` as JSON floats, `embedding_b64`, or both in turn.
    #[arg(long, value_enum, default_value_t = Encoding::Both)]
    encoding: Encoding,
    /// Fsync policies to run, comma separated (each is passed to `quiver serve --fsync`).
    #[arg(long, value_delimiter = ',', default_value = "always,never")]
    fsync_policies: Vec<String>,
    /// The `quiver` binary; defaults to `../quiver` next to this example's directory.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Vector dimension of the library.
    #[arg(long, default_value_t = 384)]
    dimension: usize,
    /// Seed of the vectors and texts.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Where the temporary data directories go (default: the system temp dir).
    #[arg(long)]
    data_root: Option<PathBuf>,
    /// Do not count the server's fsyncs with `perf stat`.
    #[arg(long)]
    no_perf: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Encoding {
    Json,
    B64,
    Both,
}

impl Encoding {
    fn name(self) -> &'static str {
        match self {
            Encoding::Json => "json floats",
            Encoding::B64 => "embedding_b64",
            Encoding::Both => "both",
        }
    }
}

/// One configuration's results.
struct Row {
    fsync: String,
    encoding: Encoding,
    vectors: usize,
    requests: usize,
    body_bytes: usize,
    wall: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    fsyncs: Option<(u64, u64)>,
    server_cpu_s: f64,
    client_cpu_s: f64,
    server_peak_rss_kib: u64,
    data_dir_bytes: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.clients >= 1, "--clients must be at least 1");
    ensure!(
        (1..=1000).contains(&args.batch),
        "--batch must be between 1 and 1000"
    );
    ensure!(args.total >= 1, "--total must be at least 1");
    ensure!(args.dimension >= 1, "--dimension must be at least 1");
    ensure!(!args.fsync_policies.is_empty(), "no --fsync-policies");
    let server_bin = match &args.server_bin {
        Some(p) => p.clone(),
        None => default_server_bin()?,
    };
    ensure!(
        server_bin.is_file(),
        "no server binary at {} (build it with `cargo build --release -p quiver`, or pass --server-bin)",
        server_bin.display()
    );
    let encodings = match args.encoding {
        Encoding::Both => vec![Encoding::Json, Encoding::B64],
        e => vec![e],
    };

    let mut rows = Vec::new();
    for &encoding in &encodings {
        let t = Instant::now();
        let bodies = build_bodies(&args, encoding);
        let mib = bodies.iter().map(Vec::len).sum::<usize>() as f64 / MIB;
        eprintln!(
            "built {} request bodies ({}, {mib:.0} MiB) in {:.1} s",
            bodies.len(),
            encoding.name(),
            t.elapsed().as_secs_f64()
        );
        for policy in &args.fsync_policies {
            eprintln!(
                "running: fsync={policy}, {}, {} clients x {} docs, {} vectors",
                encoding.name(),
                args.clients,
                args.batch,
                args.total
            );
            let row = run_configuration(&args, &server_bin, policy, encoding, bodies.clone())
                .await
                .with_context(|| format!("fsync={policy}, {}", encoding.name()))?;
            eprintln!(
                "  {:.0} vectors/s, p50 {:.1} ms, p99 {:.1} ms",
                row.vectors as f64 / row.wall.as_secs_f64(),
                ms(row.p50),
                ms(row.p99)
            );
            rows.push(row);
        }
    }
    print_table(&args, &rows);
    Ok(())
}

const MIB: f64 = 1024.0 * 1024.0;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `target/<profile>/quiver` for an example at `target/<profile>/examples/ingest_bench`.
fn default_server_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot find the target directory of this executable")?;
    Ok(profile_dir.join(format!("quiver{}", std::env::consts::EXE_SUFFIX)))
}

// ------------------------------------------------------------------ workload

/// The vector of document `i`: uniform in [-1, 1) per component, from a seed of its own so
/// that any document can be regenerated to check what the server stored.
fn vector_for(seed: u64, i: usize, dimension: usize) -> Vec<f32> {
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (0..dimension)
        .map(|_| rng.gen_range(-1.0f32..1.0))
        .collect()
}

/// About 100 characters of words, deterministic in `i`.
fn text_for(seed: u64, i: usize) -> String {
    const WORDS: &[&str] = &[
        "vector",
        "durable",
        "append",
        "log",
        "group",
        "commit",
        "quiver",
        "search",
        "index",
        "cosine",
        "batch",
        "chunk",
        "document",
        "library",
        "latency",
        "throughput",
        "snapshot",
        "segment",
        "replay",
        "embedding",
        "record",
        "sequence",
        "fsync",
        "client",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(!seed ^ i as u64);
    let mut s = format!("Document {i}:");
    while s.len() < 100 {
        s.push(' ');
        s.push_str(WORDS[rng.gen_range(0..WORDS.len())]);
    }
    s
}

/// Standard base64 with padding.
fn base64_into(bytes: &[u8], out: &mut Vec<u8>) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        out.push(ALPHABET[(n >> 18) as usize & 63]);
        out.push(ALPHABET[(n >> 12) as usize & 63]);
        out.push(if c.len() > 1 {
            ALPHABET[(n >> 6) as usize & 63]
        } else {
            b'='
        });
        out.push(if c.len() > 2 {
            ALPHABET[n as usize & 63]
        } else {
            b'='
        });
    }
}

/// One request body per batch: documents `d-<i>` with one chunk each.
fn build_bodies(args: &Args, encoding: Encoding) -> Vec<Vec<u8>> {
    let mut bodies = Vec::with_capacity(args.total.div_ceil(args.batch));
    let mut raw = Vec::with_capacity(args.dimension * 4);
    for start in (0..args.total).step_by(args.batch) {
        let end = (start + args.batch).min(args.total);
        let mut body = Vec::with_capacity((end - start) * (args.dimension * 12 + 200));
        body.extend_from_slice(b"{\"documents\":[");
        for i in start..end {
            if i > start {
                body.push(b',');
            }
            let v = vector_for(args.seed, i, args.dimension);
            write!(
                body,
                "{{\"id\":\"d-{i}\",\"title\":\"document {i}\",\"chunks\":[{{\"text\":"
            )
            .expect("writing to a Vec");
            serde_json::to_writer(&mut body, &text_for(args.seed, i)).expect("writing to a Vec");
            match encoding {
                Encoding::Json => {
                    body.extend_from_slice(b",\"embedding\":");
                    serde_json::to_writer(&mut body, &v).expect("writing to a Vec");
                }
                Encoding::B64 | Encoding::Both => {
                    raw.clear();
                    raw.extend(v.iter().flat_map(|x| x.to_le_bytes()));
                    body.extend_from_slice(b",\"embedding_b64\":\"");
                    base64_into(&raw, &mut body);
                    body.push(b'"');
                }
            }
            body.extend_from_slice(b"}]}");
        }
        body.extend_from_slice(b"]}");
        bodies.push(body);
    }
    bodies
}

// ------------------------------------------------------------------ one configuration

struct Server {
    child: Child,
    pid: u32,
    url: String,
}

async fn start_server(bin: &Path, data_dir: &Path, fsync: &str) -> Result<Server> {
    let mut child = Command::new(bin)
        .arg("serve")
        .args(["--addr", "127.0.0.1:0", "--fsync", fsync, "--data-dir"])
        .arg(data_dir)
        .env("QUIVER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let pid = child.id().context("the server exited at once")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .context("the server did not say where it listens within 30 s")??;
    let url = line
        .trim()
        .strip_prefix("quiver listening on ")
        .with_context(|| format!("unexpected first line from the server: {line:?}"))?
        .to_string();
    Ok(Server { child, pid, url })
}

/// SIGTERM, then wait for a clean exit (the server writes a final snapshot first).
async fn stop_server(mut server: Server) -> Result<()> {
    signal(server.pid, libc::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(60), server.child.wait())
        .await
        .context("the server did not exit within 60 s of SIGTERM")??;
    ensure!(status.success(), "the server exited with {status}");
    Ok(())
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a child we spawned and have not reaped yet.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

async fn run_configuration(
    args: &Args,
    server_bin: &Path,
    fsync: &str,
    encoding: Encoding,
    bodies: Vec<Vec<u8>>,
) -> Result<Row> {
    let data = match &args.data_root {
        Some(root) => tempfile::Builder::new()
            .prefix("quiver-ingest-")
            .tempdir_in(root)?,
        None => tempfile::Builder::new()
            .prefix("quiver-ingest-")
            .tempdir()?,
    };
    let server = start_server(server_bin, data.path(), fsync).await?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    let resp = http
        .post(format!("{}/v1/libraries", server.url))
        .json(&json!({"name": LIBRARY, "dimension": args.dimension, "metric": "cosine"}))
        .send()
        .await?;
    ensure!(
        resp.status().as_u16() == 201,
        "creating the library answered {}: {}",
        resp.status(),
        resp.text().await.unwrap_or_default()
    );

    let requests = bodies.len();
    let body_bytes = bodies.iter().map(Vec::len).sum();
    let expected: Vec<usize> = (0..requests)
        .map(|b| (args.total - b * args.batch).min(args.batch))
        .collect();
    let work = Arc::new(Work {
        bodies: bodies.into_iter().map(|b| Mutex::new(Some(b))).collect(),
        expected,
        next: AtomicUsize::new(0),
        url: format!("{}/v1/libraries/{LIBRARY}/documents/batch", server.url),
    });

    let perf = if args.no_perf {
        None
    } else {
        FsyncCounter::start(server.pid, data.path()).await
    };
    let server_cpu_before = cpu_seconds(&format!("/proc/{}/stat", server.pid))?;
    let client_cpu_before = cpu_seconds("/proc/self/stat")?;
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.clients)
        .map(|_| tokio::spawn(client(work.clone())))
        .collect();
    let mut latencies = Vec::with_capacity(requests);
    for t in tasks {
        latencies.extend(t.await??);
    }
    let wall = started.elapsed();
    let server_cpu_s = cpu_seconds(&format!("/proc/{}/stat", server.pid))? - server_cpu_before;
    let client_cpu_s = cpu_seconds("/proc/self/stat")? - client_cpu_before;
    let fsyncs = match perf {
        Some(p) => p.stop().await,
        None => None,
    };
    ensure!(
        latencies.len() == requests,
        "{} of {requests} requests answered",
        latencies.len()
    );
    latencies.sort_unstable();

    verify(&http, &server.url, args).await?;
    let server_peak_rss_kib = peak_rss_kib(server.pid)?;
    let data_dir_bytes = dir_size(data.path())?;
    stop_server(server).await?;

    Ok(Row {
        fsync: fsync.to_string(),
        encoding,
        vectors: args.total,
        requests,
        body_bytes,
        wall,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        max: *latencies.last().expect("at least one request"),
        fsyncs,
        server_cpu_s,
        client_cpu_s,
        server_peak_rss_kib,
        data_dir_bytes,
    })
}

/// The batches of one configuration, taken in order by whichever client is free.
struct Work {
    bodies: Vec<Mutex<Option<Vec<u8>>>>,
    expected: Vec<usize>,
    next: AtomicUsize,
    url: String,
}

/// One client: its own connection, one request in flight at a time.
async fn client(work: Arc<Work>) -> Result<Vec<Duration>> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()?;
    let mut latencies = Vec::new();
    loop {
        let i = work.next.fetch_add(1, Ordering::Relaxed);
        if i >= work.bodies.len() {
            return Ok(latencies);
        }
        let body = work.bodies[i]
            .lock()
            .expect("no panics while holding the lock")
            .take()
            .expect("each batch is taken once");
        let t = Instant::now();
        let resp = http
            .post(&work.url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .with_context(|| format!("batch {i}"))?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        latencies.push(t.elapsed());
        if !status.is_success() {
            bail!(
                "batch {i} answered {status}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(500)])
            );
        }
        let answer: Value = serde_json::from_slice(&bytes)?;
        let committed = answer["committed"].as_u64().unwrap_or(0) as usize;
        let failed = answer["failed"].as_u64().unwrap_or(u64::MAX);
        ensure!(
            committed == work.expected[i] && failed == 0 && answer["seq"].is_u64(),
            "batch {i}: expected {} committed, got {}",
            work.expected[i],
            String::from_utf8_lossy(&bytes[..bytes.len().min(500)])
        );
    }
}

/// The library holds exactly `--total` chunks, and a few documents read back hold the vectors
/// and texts that were sent (vectors normalised, as the cosine metric stores them).
async fn verify(http: &reqwest::Client, url: &str, args: &Args) -> Result<()> {
    let lib: Value = http
        .get(format!("{url}/v1/libraries/{LIBRARY}"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    ensure!(
        lib["num_chunks"].as_u64() == Some(args.total as u64)
            && lib["num_documents"].as_u64() == Some(args.total as u64),
        "the library reports {} documents and {} chunks, expected {} of each",
        lib["num_documents"],
        lib["num_chunks"],
        args.total
    );
    let mut samples = vec![0, args.total / 2, args.total - 1];
    samples.dedup();
    for i in samples {
        let doc: Value = http
            .get(format!(
                "{url}/v1/libraries/{LIBRARY}/documents/d-{i}?include_embeddings=true"
            ))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let chunk = &doc["chunks"][0];
        ensure!(
            chunk["text"].as_str() == Some(text_for(args.seed, i).as_str()),
            "document d-{i} has the wrong text"
        );
        let stored: Vec<f32> = serde_json::from_value(chunk["embedding"].clone())
            .with_context(|| format!("document d-{i} has no embedding"))?;
        let sent = vector_for(args.seed, i, args.dimension);
        let norm = sent
            .iter()
            .map(|x| (*x as f64) * (*x as f64))
            .sum::<f64>()
            .sqrt();
        ensure!(
            stored.len() == sent.len()
                && stored
                    .iter()
                    .zip(&sent)
                    .all(|(s, x)| (*s as f64 - *x as f64 / norm).abs() < 1e-6),
            "document d-{i} does not hold the vector that was sent"
        );
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

// ------------------------------------------------------------------ measurements from /proc

/// utime + stime of a process (all its threads), in seconds.
fn cpu_seconds(stat_path: &str) -> Result<f64> {
    let stat =
        std::fs::read_to_string(stat_path).with_context(|| format!("reading {stat_path}"))?;
    // Fields after the command name (which may hold spaces) start at field 3, `state`.
    let rest = &stat[stat.rfind(')').context("malformed stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields[11].parse()?;
    let stime: u64 = fields[12].parse()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((utime + stime) as f64 / ticks)
}

fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/<pid>/status")
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// `perf stat` counting the server's fdatasync and fsync calls, if perf can attach.
struct FsyncCounter {
    child: Child,
    output: PathBuf,
}

impl FsyncCounter {
    async fn start(pid: u32, scratch: &Path) -> Option<FsyncCounter> {
        let output = scratch.with_extension("perf.csv");
        let mut child = Command::new("perf")
            .args([
                "stat",
                "-x,",
                "-e",
                "syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync",
                "-p",
                &pid.to_string(),
                "-o",
            ])
            .arg(&output)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .ok()?;
        // perf has no "attached" signal; give it a moment, and give up if it already quit.
        tokio::time::sleep(Duration::from_millis(500)).await;
        if child.try_wait().ok()?.is_some() {
            return None;
        }
        Some(FsyncCounter { child, output })
    }

    /// (fdatasync, fsync) calls since `start`.
    async fn stop(mut self) -> Option<(u64, u64)> {
        signal(self.child.id()?, libc::SIGINT);
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .ok()?
            .ok()?;
        let text = std::fs::read_to_string(&self.output).ok()?;
        let _ = std::fs::remove_file(&self.output);
        let count = |event: &str| {
            text.lines().find_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f.len() > 2 && f[2] == event).then(|| f[0].parse::<u64>().ok())?
            })
        };
        Some((
            count("syscalls:sys_enter_fdatasync")?,
            count("syscalls:sys_enter_fsync")?,
        ))
    }
}

// ------------------------------------------------------------------ report

fn print_table(args: &Args, rows: &[Row]) {
    println!(
        "\nIngest: {} vectors of {} dims per configuration, {} documents x 1 chunk per batch, {} concurrent clients. Goal: >= {:.0} vectors/s with fsync always.\n",
        args.total, args.dimension, args.batch, args.clients, GOAL_VECTORS_PER_SECOND
    );
    println!("| fsync | encoding | body KiB/req | wall s | vectors/s | p50 ms | p99 ms | max ms | fdatasync (+fsync) | vectors/fdatasync | server CPU s | server CPU µs/vector | client CPU s | server peak RSS MiB | data dir MiB |");
    println!("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for r in rows {
        let (syncs, per_sync) = match r.fsyncs {
            Some((fdatasync, fsync)) => (
                format!("{fdatasync} (+{fsync})"),
                if fdatasync > 0 {
                    format!("{:.0}", r.vectors as f64 / fdatasync as f64)
                } else {
                    "-".to_string()
                },
            ),
            None => ("n/a".to_string(), "n/a".to_string()),
        };
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {} | {:.1} ({:.0}%) | {:.0} | {:.1} | {:.0} | {:.0} |",
            r.fsync,
            r.encoding.name(),
            r.body_bytes as f64 / r.requests as f64 / 1024.0,
            r.wall.as_secs_f64(),
            r.vectors as f64 / r.wall.as_secs_f64(),
            ms(r.p50),
            ms(r.p99),
            ms(r.max),
            syncs,
            per_sync,
            r.server_cpu_s,
            100.0 * r.server_cpu_s / r.wall.as_secs_f64(),
            1e6 * r.server_cpu_s / r.vectors as f64,
            r.client_cpu_s,
            r.server_peak_rss_kib as f64 / 1024.0,
            r.data_dir_bytes as f64 / MIB,
        );
    }
    println!(
        "\nvectors/s = vectors / wall time of the timed phase; latency = one batch request, send to full answer (after fsync under `always`). Server CPU (utime+stime over the timed phase) % is of one core, so 200% = 2 cores; CPU µs/vector is much less sensitive than vectors/s to other load on the machine."
    );
}
