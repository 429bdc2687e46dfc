//! # quiver — the binary
//!
//! A thin shell: it parses the command line (every shared flag also settable through a
//! `QUIVER_*` environment variable), runs one subcommand and turns its outcome into an exit
//! code and, on failure, one `error: …` message on stderr. `serve` runs the server
//! ([`serve`]); every other subcommand is a client of the HTTP API at `--url`
//! ([`client`], [`commands`]).
//!
//! It must never hold command logic (that lives in the modules) and never print a Rust debug
//! dump to a user: server errors come out as `error: <detail> (<code>)`, everything else as
//! `error: <context>: <cause>`.
//!
//! Exit codes: 0 success; 1 any error (HTTP, transport, bad input, bad command line); 2 an
//! ingest in which some lines were refused while the rest committed.

mod alloc;
mod chunk;
mod client;
mod commands;
mod models;
mod output;
mod serve;
mod sse;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// mimalloc for small blocks, the system allocator for large ones ([`alloc`] says why).
#[global_allocator]
static GLOBAL: alloc::Routed = alloc::Routed;

#[derive(Parser)]
#[command(
    name = "quiver",
    version,
    about = "A vector database whose change log is its event stream"
)]
struct Cli {
    #[command(flatten)]
    global: client::GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server on a data directory.
    Serve(serve::ServeArgs),
    /// Install and list local embedding models (no server needed).
    #[command(subcommand)]
    Models(models::ModelsCommand),
    #[command(flatten)]
    Client(ClientCommand),
}

/// The subcommands that talk to a server over HTTP.
#[derive(Subcommand)]
enum ClientCommand {
    /// Create, list, show and delete libraries.
    #[command(subcommand)]
    Libraries(commands::libraries::LibrariesCommand),
    /// Stream documents into a library from NDJSON files, or from a directory of NDJSON,
    /// Markdown and text files.
    Ingest(commands::ingest::IngestArgs),
    /// Import one NDJSON file (e.g. made by `quiver export`) into a library.
    Import(commands::ingest::ImportArgs),
    /// Write every document of a library to stdout as NDJSON (re-importable).
    Export(commands::export::ExportArgs),
    /// Search a library by vector or by text.
    Search(commands::search::SearchArgs),
    /// Follow the change stream.
    #[command(subcommand)]
    Events(commands::events::EventsCommand),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Usage errors exit 1, not clap's 2: exit code 2 means "ingest partly refused".
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let outcome = match cli.command {
        Command::Serve(args) => {
            serve::init_logging();
            serve::serve(args).map(|()| ExitCode::SUCCESS)
        }
        Command::Models(cmd) => models::run(cmd),
        Command::Client(command) => run_client(cli.global, command),
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            client::report_error(&e);
            ExitCode::from(1)
        }
    }
}

fn run_client(global: client::GlobalArgs, command: ClientCommand) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async move {
        let client = client::Client::new(&global)?;
        match command {
            ClientCommand::Libraries(c) => commands::libraries::run(&client, c).await,
            ClientCommand::Ingest(a) => commands::ingest::run(&client, a).await,
            ClientCommand::Import(a) => commands::ingest::run(&client, a.into()).await,
            ClientCommand::Export(a) => commands::export::run(&client, a).await,
            ClientCommand::Search(a) => commands::search::run(&client, a).await,
            ClientCommand::Events(c) => commands::events::run(&client, c).await,
        }
    })
}
