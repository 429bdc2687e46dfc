//! # `quiver search`
//!
//! Owns searching from the command line: turning `--embedding`/`--query`, `-k`, `--filter`
//! and `--distance-threshold` into the body of `POST /v1/libraries/{id}/search`, and showing
//! the hits as a ranked table (or the server's answer unchanged with `--json`). It must never
//! re-rank, filter or compute distances itself: what the server answered is what is shown.

use crate::client::Client;
use crate::output::{print_json, truncate, Table};
use anyhow::{Context, Result};
use clap::ArgGroup;
use reqwest::Method;
use serde_json::{json, Value};
use std::process::ExitCode;

/// Characters of chunk text shown per hit in the table.
const TEXT_CHARS: usize = 70;

#[derive(clap::Args)]
#[command(group(ArgGroup::new("input").required(true).args(["embedding", "query"])))]
pub struct SearchArgs {
    /// Library id or name.
    #[arg(long, short)]
    library: String,
    /// The query vector, as a JSON array: '[0.1, 0.2, 0.3]'.
    #[arg(long, allow_hyphen_values = true)]
    embedding: Option<String>,
    /// Query text (embedded by the library's model, if it has one).
    #[arg(long)]
    query: Option<String>,
    /// How many hits.
    #[arg(short, long, default_value_t = 10)]
    k: u64,
    /// A metadata filter as JSON: '{"lang": "en"}' or '[{"field": …, "operator": …, "value": …}]'.
    #[arg(long)]
    filter: Option<String>,
    /// Only hits at most this far away.
    #[arg(long, allow_hyphen_values = true)]
    distance_threshold: Option<f64>,
}

/// Parses `--embedding`: a JSON array of numbers (the brackets may be left out).
fn parse_embedding(text: &str) -> Result<Vec<f64>> {
    let t = text.trim();
    let json = if t.starts_with('[') {
        t.to_string()
    } else {
        format!("[{t}]")
    };
    serde_json::from_str(&json).with_context(|| {
        format!("--embedding {text:?} is not a JSON array of numbers (e.g. '[0.1, 0.2, 0.3]')")
    })
}

pub async fn run(client: &Client, args: SearchArgs) -> Result<ExitCode> {
    let mut body = json!({"k": args.k});
    if let Some(e) = &args.embedding {
        body["embedding"] = json!(parse_embedding(e)?);
    }
    if let Some(q) = &args.query {
        body["query"] = json!(q);
    }
    if let Some(f) = &args.filter {
        let v: Value =
            serde_json::from_str(f).with_context(|| format!("--filter {f:?} is not valid JSON"))?;
        body["filter"] = v;
    }
    if let Some(d) = args.distance_threshold {
        body["distance_threshold"] = json!(d);
    }
    let rb = client
        .request(Method::POST, &["v1", "libraries", &args.library, "search"])?
        .json(&body);
    let v = client.send_json(rb).await?;
    if client.json {
        print_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    let hits = v["results"].as_array().cloned().unwrap_or_default();
    if hits.is_empty() {
        println!("no results");
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(&["RANK", "DISTANCE", "DOCUMENT", "TEXT"]);
    for (i, h) in hits.iter().enumerate() {
        let distance = h["distance"]
            .as_f64()
            .map(|d| format!("{d:.4}"))
            .unwrap_or_default();
        t.row(vec![
            (i + 1).to_string(),
            distance,
            h["document_id"].as_str().unwrap_or("").to_string(),
            truncate(h["chunk"]["text"].as_str().unwrap_or(""), TEXT_CHARS),
        ]);
    }
    t.print()?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_parse_with_or_without_brackets() {
        assert_eq!(
            parse_embedding("[1, 0.5,-2]").expect("ok"),
            vec![1.0, 0.5, -2.0]
        );
        assert_eq!(parse_embedding("1,2").expect("ok"), vec![1.0, 2.0]);
        assert!(parse_embedding("[1, x]").is_err());
    }
}
