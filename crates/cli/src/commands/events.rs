//! # `quiver events tail`
//!
//! Owns following the change stream `GET /v1/events/stream` (Server-Sent Events): the query
//! (`types`, `library_id`, `from_seq`), printing one line per event (`seq type library_id
//! data`, or the envelope with `--json`), remembering the last printed seq in a resume file,
//! and reconnecting with `Last-Event-ID` and bounded exponential backoff when the stream
//! drops.
//!
//! It must never print an event twice or skip one across reconnects (it resumes from the
//! last *printed* seq, and writes the resume file only after the event is on stdout), never
//! leave a torn resume file (write to a temporary file, then rename over), and never retry
//! forever or retry what cannot succeed: 4xx answers and an expired resume point end the
//! command with exit code 1; only transport failures, 5xx answers and ended streams are
//! retried, at most `--max-retries` times in a row.

use crate::client::{root_cause, Client, ServerError};
use crate::sse::{Frame, Parser};
use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use futures::StreamExt;
use rand::Rng;
use reqwest::Method;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// First reconnection delay when the server gave no `retry:` hint.
const BACKOFF_START: Duration = Duration::from_millis(500);
/// Longest wait between reconnection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Silence after which a connection is taken for dead: three of the server's 15 s heartbeats.
const IDLE_TIMEOUT: Duration = Duration::from_secs(45);

#[derive(Subcommand)]
pub enum EventsCommand {
    /// Print events as they happen (and, with --from-seq or --resume-file, from the past).
    Tail(TailArgs),
}

#[derive(clap::Args)]
pub struct TailArgs {
    /// Event types to follow: comma-separated, `*` wildcards (e.g. 'document.*').
    #[arg(long)]
    types: Option<String>,
    /// Only events of this library (id or name).
    #[arg(long, short)]
    library: Option<String>,
    /// Start at this seq (default: only new events). A resume file's seq wins over it.
    #[arg(long)]
    from_seq: Option<u64>,
    /// Keep the last printed seq in this file, and resume after it on start.
    #[arg(long)]
    resume_file: Option<PathBuf>,
    /// Reconnection attempts in a row before giving up.
    #[arg(long, default_value_t = 10)]
    max_retries: u32,
    /// Exit after printing this many events.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
}

pub async fn run(client: &Client, cmd: EventsCommand) -> Result<ExitCode> {
    match cmd {
        EventsCommand::Tail(args) => tail(client, args).await,
    }
}

/// Why one connection ended.
enum End {
    /// `--limit` reached.
    Done,
    /// Worth reconnecting: the cause, for the message.
    Retry(anyhow::Error),
}

struct Tail<'a> {
    client: &'a Client,
    args: &'a TailArgs,
    library_id: Option<String>,
    last_seq: Option<u64>,
    printed: u64,
    retry_hint: Option<Duration>,
}

async fn tail(client: &Client, args: TailArgs) -> Result<ExitCode> {
    let last_seq = match &args.resume_file {
        Some(p) => read_resume_file(p)?,
        None => None,
    };
    // Resolve a library name once: if it is renamed or deleted later, reconnects still
    // follow the same library id. An unknown name is passed on as given (maybe a future id).
    let library_id = match &args.library {
        None => None,
        Some(l) => match client.get_json(&["v1", "libraries", l]).await {
            Ok(v) => Some(v["id"].as_str().unwrap_or(l).to_string()),
            Err(e) if is_status(&e, 404) => Some(l.clone()),
            Err(e) => return Err(e),
        },
    };
    let mut t = Tail {
        client,
        args: &args,
        library_id,
        last_seq,
        printed: 0,
        retry_hint: None,
    };
    let mut failures = 0u32;
    loop {
        let printed_before = t.printed;
        let cause = match t.connect_once().await? {
            End::Done => return Ok(ExitCode::SUCCESS),
            End::Retry(cause) => cause,
        };
        if t.printed > printed_before {
            failures = 0;
        }
        failures += 1;
        if failures > args.max_retries {
            return Err(cause.context(format!(
                "the event stream failed {} times in a row; giving up (--max-retries {})",
                failures, args.max_retries
            )));
        }
        let exp = BACKOFF_START.saturating_mul(1u32 << (failures - 1).min(16));
        let base = t
            .retry_hint
            .unwrap_or(BACKOFF_START)
            .max(exp)
            .min(BACKOFF_MAX);
        let jitter = rand::thread_rng().gen_range(0.0..0.2);
        let wait = base.mul_f64(1.0 + jitter);
        if !client.quiet {
            let from = t
                .last_seq
                .map(|s| format!(" after seq {s}"))
                .unwrap_or_default();
            eprintln!(
                "event stream: {cause:#}; reconnecting{from} in {:.1}s (attempt {failures}/{})",
                wait.as_secs_f64(),
                args.max_retries
            );
        }
        tokio::time::sleep(wait).await;
    }
}

fn is_status(e: &anyhow::Error, status: u16) -> bool {
    e.chain()
        .find_map(|c| c.downcast_ref::<ServerError>())
        .is_some_and(|s| s.status == status)
}

impl Tail<'_> {
    /// One connection: returns when it ends; `Err` for what reconnecting cannot fix.
    async fn connect_once(&mut self) -> Result<End> {
        let client = self.client;
        let mut rb = client
            .request(Method::GET, &["v1", "events", "stream"])?
            .header(reqwest::header::ACCEPT, "text/event-stream");
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(t) = &self.args.types {
            query.push(("types", t.clone()));
        }
        if let Some(l) = &self.library_id {
            query.push(("library_id", l.clone()));
        }
        match self.last_seq {
            Some(seq) => rb = rb.header("Last-Event-ID", seq.to_string()),
            None => {
                if let Some(f) = self.args.from_seq {
                    query.push(("from_seq", f.to_string()));
                }
            }
        }
        let rb = rb.query(&query);
        let resp = match client.send(rb).await {
            Ok(r) => r,
            Err(e) => {
                let server = e.chain().find_map(|c| c.downcast_ref::<ServerError>());
                return match server {
                    Some(s) if s.status < 500 => Err(e),
                    _ => Ok(End::Retry(e)),
                };
            }
        };
        let mut parser = Parser::new();
        let mut stream = resp.bytes_stream();
        loop {
            let next = match tokio::time::timeout(IDLE_TIMEOUT, stream.next()).await {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(_) => {
                    return Ok(End::Retry(anyhow!(
                        "nothing arrived for {}s, not even a heartbeat",
                        IDLE_TIMEOUT.as_secs()
                    )))
                }
            };
            let chunk = match next {
                Ok(c) => c,
                Err(e) => {
                    return Ok(End::Retry(anyhow!(
                        "the connection broke: {}",
                        root_cause(&e)
                    )))
                }
            };
            let frames = parser.push(&chunk)?;
            if let Some(ms) = parser.retry_ms {
                self.retry_hint = Some(Duration::from_millis(ms));
            }
            for frame in frames {
                if let Some(end) = self.on_frame(frame)? {
                    return Ok(end);
                }
            }
        }
        Ok(End::Retry(anyhow!("the server ended the stream")))
    }

    fn on_frame(&mut self, frame: Frame) -> Result<Option<End>> {
        let envelope: Option<Value> = serde_json::from_str(&frame.data).ok();
        if frame.event.as_deref() == Some("error") {
            let v = envelope.unwrap_or(Value::Null);
            let e = ServerError {
                status: 0,
                code: v["error"].as_str().unwrap_or("stream_failed").to_string(),
                detail: v["detail"]
                    .as_str()
                    .unwrap_or(frame.data.as_str())
                    .to_string(),
            };
            if e.code == "events_expired" {
                // Resuming cannot help: the events after our position are gone.
                return Err(e.into());
            }
            return Ok(Some(End::Retry(e.into())));
        }
        let seq = frame
            .id
            .as_deref()
            .and_then(|id| id.trim().parse::<u64>().ok())
            .or_else(|| envelope.as_ref().and_then(|v| v["seq"].as_u64()));
        let line = if self.client.json {
            match &envelope {
                Some(v) => serde_json::to_string(v).context("rendering an event")?,
                None => frame.data.replace('\n', " "),
            }
        } else {
            match &envelope {
                Some(v) => {
                    let lib = v["library_id"].as_str().unwrap_or("-");
                    let data = serde_json::to_string(&v["data"]).context("rendering an event")?;
                    let ty = v["type"]
                        .as_str()
                        .or(frame.event.as_deref())
                        .unwrap_or("message");
                    let seq = seq.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
                    format!("{seq} {ty} {lib} {data}")
                }
                None => format!(
                    "{} {} - {}",
                    seq.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                    frame.event.as_deref().unwrap_or("message"),
                    frame.data.replace('\n', " ")
                ),
            }
        };
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{line}").context("writing to stdout")?;
            out.flush().context("writing to stdout")?;
        }
        self.printed += 1;
        if let Some(s) = seq {
            self.last_seq = Some(s);
            if let Some(p) = &self.args.resume_file {
                write_resume_file(p, s)?;
            }
        }
        if self.args.limit.is_some_and(|l| self.printed >= l) {
            return Ok(Some(End::Done));
        }
        Ok(None)
    }
}

/// The seq stored in a resume file; `None` if the file does not exist yet or is empty.
fn read_resume_file(path: &Path) -> Result<Option<u64>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let t = text.trim();
    if t.is_empty() {
        return Ok(None);
    }
    match t.parse::<u64>() {
        Ok(seq) => Ok(Some(seq)),
        Err(_) => bail!(
            "resume file {} holds {:?}, not a seq (delete it to start over)",
            path.display(),
            crate::output::truncate(t, 40)
        ),
    }
}

/// Stores `seq` atomically: a reader sees the old content or the new, never a torn one.
fn write_resume_file(path: &Path, seq: u64) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{seq}\n"))
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_file_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("pos");
        assert_eq!(read_resume_file(&p).expect("missing is fine"), None);
        write_resume_file(&p, 41).expect("write");
        write_resume_file(&p, 42).expect("write");
        assert_eq!(read_resume_file(&p).expect("read"), Some(42));
        assert!(!dir.path().join("pos.tmp").exists());
        std::fs::write(&p, "garbage").expect("write");
        assert!(read_resume_file(&p).is_err());
    }
}
