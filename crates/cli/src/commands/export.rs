//! # `quiver export`
//!
//! Owns copying a library out as NDJSON: `GET /v1/libraries/{id}/documents/stream` is copied
//! to stdout (or `--output FILE`) piece by piece as it arrives, so a library of any size
//! passes through a constant amount of memory. The output is exactly what the server sent
//! (a header line, then one document per line) and re-imports with `quiver import`.
//!
//! It must never reformat, reorder or buffer the whole export, and never print anything but
//! the export on stdout (the short report goes to stderr). It checks that the number of
//! document lines matches the header's count, so a cut stream is an error, not a silently
//! short file.

use crate::client::Client;
use anyhow::{bail, Context, Result};
use futures::StreamExt;
use reqwest::Method;
use serde_json::Value;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio::io::AsyncWriteExt;

/// Most bytes of the header line kept to read the document count.
const HEADER_BYTES_LIMIT: usize = 1024 * 1024;

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Library id or name.
    #[arg(long, short)]
    library: String,
    /// Leave the vectors out (smaller; the result then re-imports only into a library that
    /// can embed text).
    #[arg(long)]
    no_embeddings: bool,
    /// Write to this file instead of stdout.
    #[arg(long, short)]
    output: Option<PathBuf>,
}

pub async fn run(client: &Client, args: ExportArgs) -> Result<ExitCode> {
    let rb = client
        .request(
            Method::GET,
            &["v1", "libraries", &args.library, "documents", "stream"],
        )?
        .query(&[(
            "include_embeddings",
            if args.no_embeddings { "false" } else { "true" },
        )]);
    let resp = client.send(rb).await?;
    let (mut out, target): (Box<dyn tokio::io::AsyncWrite + Unpin + Send>, String) =
        match &args.output {
            Some(p) => (
                Box::new(
                    tokio::fs::File::create(p)
                        .await
                        .with_context(|| format!("cannot create {}", p.display()))?,
                ),
                p.display().to_string(),
            ),
            None => (Box::new(tokio::io::stdout()), "stdout".to_string()),
        };
    let mut stream = resp.bytes_stream();
    let mut bytes = 0u64;
    let mut lines = 0u64;
    // The header (first line) is kept until it is complete, to learn the document count.
    let mut header: Vec<u8> = Vec::new();
    let mut header_done = false;
    let mut last_byte = b'\n';
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| client.transport_error(e))
            .with_context(|| format!("the export stream broke after {bytes} bytes"))?;
        if !header_done {
            let upto = chunk
                .iter()
                .position(|&b| b == b'\n')
                .map_or(chunk.len(), |i| i + 1);
            header.extend_from_slice(&chunk[..upto]);
            header_done = header.last() == Some(&b'\n') || header.len() > HEADER_BYTES_LIMIT;
        }
        lines += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
        if let Some(&b) = chunk.last() {
            last_byte = b;
        }
        bytes += chunk.len() as u64;
        out.write_all(&chunk)
            .await
            .with_context(|| format!("writing to {target}"))?;
    }
    out.flush()
        .await
        .with_context(|| format!("writing to {target}"))?;
    if bytes > 0 && last_byte != b'\n' {
        lines += 1;
    }
    let head: Value = serde_json::from_slice(&header).unwrap_or(Value::Null);
    let info = &head["quiver_export"];
    let expected = info["documents"].as_u64();
    let got = lines.saturating_sub(1);
    if let Some(n) = expected {
        if n != got {
            bail!(
                "the export of {} is incomplete: {got} of {n} documents arrived",
                args.library
            );
        }
    }
    if !client.quiet {
        let seq = info["seq"]
            .as_u64()
            .map(|s| format!(" at seq {s}"))
            .unwrap_or_default();
        eprintln!(
            "exported {got} documents of {}{seq} to {target} ({bytes} bytes)",
            args.library
        );
    }
    Ok(ExitCode::SUCCESS)
}
