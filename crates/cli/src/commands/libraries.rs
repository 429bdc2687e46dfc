//! # `quiver libraries create|list|show|delete`
//!
//! Owns library management from the command line: the request bodies it sends and the
//! table / field layouts it prints (`--json` prints the server's answer unchanged). It must
//! never validate what the server validates (names, dimension limits): the server's error
//! detail is the single source of truth and reaches the user as-is.

use crate::client::Client;
use crate::output::{cell, print_fields, print_json, Table};
use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::{json, Value};
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum LibrariesCommand {
    /// Create a library.
    Create {
        /// Unique name of the library.
        name: String,
        /// Length of every embedding stored in it (follows `--model` when omitted).
        #[arg(long)]
        dimension: Option<u64>,
        /// Embedding model for chunks sent as text, e.g. `local:all-minilm-l6-v2`.
        #[arg(long)]
        model: Option<String>,
        /// Distance used by search (the server's default is cosine).
        #[arg(long, value_enum)]
        metric: Option<Metric>,
        /// Index: `flat` (exact, the default) or `hnsw` (approximate).
        #[arg(long)]
        index: Option<String>,
        /// HNSW: neighbours per node.
        #[arg(long)]
        m: Option<u32>,
        /// HNSW: neighbours per node on the bottom layer (m..=2m; default 2m). Fewer use less
        /// memory per vector and reach a lower recall at a given ef_search.
        #[arg(long)]
        m0: Option<u32>,
        /// HNSW: candidate list size while building.
        #[arg(long)]
        ef_construction: Option<u32>,
        /// HNSW: default candidate list size per query.
        #[arg(long)]
        ef_search: Option<u32>,
        /// HNSW: store int8 codes, rescored on the original vectors.
        #[arg(long)]
        int8: bool,
        /// Free-text description.
        #[arg(long)]
        description: Option<String>,
    },
    /// List every library with its document and chunk counts.
    #[command(visible_alias = "ls")]
    List,
    /// Show one library.
    Show {
        /// Library id or name.
        library: String,
    },
    /// Delete a library and everything in it.
    #[command(visible_alias = "rm")]
    Delete {
        /// Library id or name.
        library: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Metric {
    Cosine,
    Dot,
    L2,
}

impl Metric {
    fn as_str(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::Dot => "dot",
            Metric::L2 => "l2",
        }
    }
}

pub async fn run(client: &Client, cmd: LibrariesCommand) -> Result<ExitCode> {
    match cmd {
        LibrariesCommand::Create {
            name,
            dimension,
            model,
            metric,
            index,
            m,
            m0,
            ef_construction,
            ef_search,
            int8,
            description,
        } => {
            let mut body = json!({"name": name});
            if let Some(d) = dimension {
                body["dimension"] = json!(d);
            }
            if let Some(model) = model {
                body["embedding_model"] = json!(model);
            }
            if let Some(m) = metric {
                body["metric"] = json!(m.as_str());
            }
            if let Some(i) = index {
                body["index_type"] = json!(i);
            }
            let mut params = serde_json::Map::new();
            for (key, v) in [
                ("m", m),
                ("m0", m0),
                ("ef_construction", ef_construction),
                ("ef_search", ef_search),
            ] {
                if let Some(v) = v {
                    params.insert(key.into(), json!(v));
                }
            }
            if !params.is_empty() {
                body["index_params"] = Value::Object(params);
            }
            if int8 {
                body["quantization"] = json!({"type": "int8", "rescore": true});
            }
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            let rb = client
                .request(Method::POST, &["v1", "libraries"])?
                .json(&body);
            let lib = client.send_json(rb).await?;
            if client.json {
                print_json(&lib)?;
            } else {
                show_library(&lib)?;
            }
        }
        LibrariesCommand::List => {
            let v = client.get_json(&["v1", "libraries"]).await?;
            if client.json {
                print_json(&v)?;
            } else {
                let mut t = Table::new(&[
                    "ID",
                    "NAME",
                    "DIM",
                    "METRIC",
                    "DOCS",
                    "CHUNKS",
                    "DESCRIPTION",
                ]);
                let libs = v["libraries"].as_array().cloned().unwrap_or_default();
                for l in &libs {
                    t.row(vec![
                        cell(&l["id"]),
                        cell(&l["name"]),
                        cell(&l["dimension"]),
                        cell(&l["metric"]),
                        cell(&l["num_documents"]),
                        cell(&l["num_chunks"]),
                        crate::output::truncate(&cell(&l["description"]), 50),
                    ]);
                }
                t.print()?;
            }
        }
        LibrariesCommand::Show { library } => {
            let lib = client.get_json(&["v1", "libraries", &library]).await?;
            if client.json {
                print_json(&lib)?;
            } else {
                show_library(&lib)?;
            }
        }
        LibrariesCommand::Delete { library } => {
            let rb = client.request(Method::DELETE, &["v1", "libraries", &library])?;
            let resp = client.send(rb).await?;
            let seq: Option<u64> = resp
                .headers()
                .get("x-quiver-seq")
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse().ok());
            if client.json {
                print_json(&json!({"deleted": library, "seq": seq}))?;
            } else {
                match seq {
                    Some(s) => println!("deleted library {library} (seq {s})"),
                    None => println!("deleted library {library}"),
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn show_library(l: &Value) -> Result<()> {
    let metadata = match &l["metadata"] {
        Value::Object(m) if m.is_empty() => String::new(),
        Value::Null => String::new(),
        other => serde_json::to_string(other).context("rendering metadata")?,
    };
    print_fields(&[
        ("id", cell(&l["id"])),
        ("name", cell(&l["name"])),
        ("description", cell(&l["description"])),
        ("dimension", cell(&l["dimension"])),
        ("metric", cell(&l["metric"])),
        ("index", cell(&l["index_type"])),
        ("embedding_model", cell(&l["embedding_model"])),
        ("documents", cell(&l["num_documents"])),
        ("chunks", cell(&l["num_chunks"])),
        ("created_at", cell(&l["created_at"])),
        ("updated_at", cell(&l["updated_at"])),
        ("metadata", metadata),
        ("seq", cell(&l["seq"])),
    ])
}
