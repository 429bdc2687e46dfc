//! # quiver — the binary
//!
//! A thin shell over the library crates: it parses the command line (every flag also settable
//! through a `QUIVER_*` environment variable), sets up logging, and runs a subcommand.
//! `serve` opens the engine on a data directory and serves the HTTP API until SIGINT/SIGTERM,
//! then writes a final snapshot and closes the log. It holds no logic of its own: anything a
//! user can do goes through the server's API, so it is tested there.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use quiver_engine::{Engine, EngineConfig, FsyncPolicy, Retention};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "quiver",
    version,
    about = "A vector database whose change log is its event stream"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server on a data directory.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
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
    /// Write a snapshot after this many records.
    #[arg(long, env = "QUIVER_SNAPSHOT_EVERY", default_value_t = 50_000)]
    snapshot_every: u64,
    /// Roll log segments at this size, in bytes.
    #[arg(long, env = "QUIVER_SEGMENT_BYTES", default_value_t = 64 * 1024 * 1024)]
    segment_bytes: u64,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUIVER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let mut config = EngineConfig::new(&args.data_dir);
    config.fsync = args.fsync;
    config.retention = args.retain_events;
    config.snapshot_every_records = args.snapshot_every.max(1);
    config.segment_size_bytes_limit = args.segment_bytes;
    let engine = Engine::open(config)
        .with_context(|| format!("cannot open the data directory {}", args.data_dir.display()))?;
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
        quiver_server::serve(listener, engine.clone(), shutdown_signal()).await.context("server failed")
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
