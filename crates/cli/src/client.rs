//! # The HTTP client every client subcommand shares
//!
//! Owns the flags common to client commands (`--url`, `--json`, `--quiet`), building request
//! URLs (path segments percent-encoded, so a library called `a b/c` is one segment), sending
//! requests, and turning every way a request can fail into an `anyhow::Error` a user can act
//! on: a non-2xx answer becomes a [`ServerError`] carrying the server's stable `error` code and
//! `detail` sentence; a refused connection names the URL and says what to check.
//!
//! It must never print (commands decide what goes to stdout, [`report_error`] to stderr),
//! never retry on its own (only `events tail` reconnects, under its own bound), and never put
//! an overall timeout on a request: ingest, export and the event stream are long-lived by
//! design. Only connecting is bounded.

use anyhow::{anyhow, bail, Context, Result};
use reqwest::{Method, RequestBuilder, Response, Url};
use serde_json::Value;
use std::fmt;
use std::time::Duration;

/// How long to wait for a TCP connection before calling the server unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of a non-JSON error body quoted back to the user.
const ERROR_BODY_QUOTE_BYTES: usize = 300;

#[derive(clap::Args, Clone, Debug)]
pub struct GlobalArgs {
    /// Base URL of the quiver server (client commands).
    #[arg(
        long,
        global = true,
        env = "QUIVER_URL",
        default_value = "http://127.0.0.1:8000"
    )]
    pub url: String,
    /// Machine-readable JSON output instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bar and no informational messages on stderr.
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

/// An error answer from the server: `{"error": code, "detail": sentence}` plus the status.
#[derive(Debug, Clone)]
pub struct ServerError {
    pub status: u16,
    pub code: String,
    pub detail: String,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.detail, self.code)
    }
}

impl std::error::Error for ServerError {}

impl ServerError {
    /// Reads an error response's body. Bodies that are not the API's error shape (a proxy's
    /// HTML page, say) are quoted, shortened.
    pub async fn from_response(resp: Response) -> ServerError {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        ServerError::from_body(status.as_u16(), &text)
    }

    pub fn from_body(status: u16, text: &str) -> ServerError {
        if let Ok(v) = serde_json::from_str::<Value>(text) {
            if let (Some(code), Some(detail)) = (v["error"].as_str(), v["detail"].as_str()) {
                return ServerError {
                    status,
                    code: code.to_string(),
                    detail: detail.to_string(),
                };
            }
        }
        let reason = reqwest::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let quoted = crate::output::truncate(text.trim(), ERROR_BODY_QUOTE_BYTES);
        ServerError {
            status,
            code: format!("http_{status}"),
            detail: if quoted.is_empty() {
                format!("the server answered {status} {reason}")
            } else {
                format!("the server answered {status} {reason}: {quoted}")
            },
        }
    }
}

/// Prints a failed command's error on stderr: `error: <detail> (<code>)` for server errors,
/// `error: <context>: <cause>` for everything else.
pub fn report_error(e: &anyhow::Error) {
    match e.chain().find_map(|c| c.downcast_ref::<ServerError>()) {
        Some(se) => eprintln!("error: {se}"),
        None => eprintln!("error: {e:#}"),
    }
}

pub struct Client {
    http: reqwest::Client,
    base: Url,
    pub json: bool,
    pub quiet: bool,
}

impl Client {
    pub fn new(g: &GlobalArgs) -> Result<Client> {
        let base = Url::parse(&g.url).with_context(|| {
            format!(
                "--url {:?} is not a URL (e.g. http://127.0.0.1:8000)",
                g.url
            )
        })?;
        match base.scheme() {
            "http" => {}
            "https" => bail!(
                "--url {}: this build of quiver speaks plain HTTP only (put TLS in front of it)",
                g.url
            ),
            other => bail!("--url {}: unsupported scheme {other:?}; use http://", g.url),
        }
        if base.cannot_be_a_base() || base.host_str().is_none() {
            bail!("--url {:?} has no host (e.g. http://127.0.0.1:8000)", g.url);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("quiver-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Client {
            http,
            base,
            json: g.json,
            quiet: g.quiet,
        })
    }

    /// `base` + segments, each percent-encoded as one path segment.
    pub fn url(&self, segments: &[&str]) -> Result<Url> {
        let mut url = self.base.clone();
        {
            let mut path = url
                .path_segments_mut()
                .map_err(|()| anyhow!("--url {} cannot take a path", self.base))?;
            path.pop_if_empty();
            path.extend(segments);
        }
        Ok(url)
    }

    pub fn request(&self, method: Method, segments: &[&str]) -> Result<RequestBuilder> {
        Ok(self.http.request(method, self.url(segments)?))
    }

    /// Sends a request; a non-2xx answer becomes a [`ServerError`].
    pub async fn send(&self, rb: RequestBuilder) -> Result<Response> {
        let resp = rb.send().await.map_err(|e| self.transport_error(e))?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(ServerError::from_response(resp).await.into())
        }
    }

    /// Sends a request and reads its JSON answer.
    pub async fn send_json(&self, rb: RequestBuilder) -> Result<Value> {
        let resp = self.send(rb).await?;
        let url = resp.url().clone();
        resp.json::<Value>()
            .await
            .map_err(|e| self.transport_error(e))
            .with_context(|| format!("reading the answer of {url}"))
    }

    pub async fn get_json(&self, segments: &[&str]) -> Result<Value> {
        self.send_json(self.request(Method::GET, segments)?).await
    }

    /// Explains a failure that happened below HTTP: refused or timed-out connections name
    /// the URL; the rest keep reqwest's cause chain.
    pub fn transport_error(&self, e: reqwest::Error) -> anyhow::Error {
        let root = root_cause(&e);
        if e.is_connect() {
            anyhow!(
                "cannot connect to the quiver server at {}: {root} (is `quiver serve` running there? set --url or QUIVER_URL)",
                self.base
            )
        } else if e.is_timeout() {
            anyhow!("the quiver server at {} timed out: {root}", self.base)
        } else if e.is_decode() {
            anyhow!(
                "the server at {} sent an answer that is not valid JSON: {root}",
                self.base
            )
        } else {
            anyhow!(
                "talking to the quiver server at {} failed: {root}",
                self.base
            )
        }
    }
}

/// The innermost cause of an error: the one sentence that says what actually happened.
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(url: &str) -> Result<Client> {
        Client::new(&GlobalArgs {
            url: url.into(),
            json: false,
            quiet: false,
        })
    }

    #[test]
    fn urls_encode_each_segment() {
        let c = client("http://h:1/prefix/").expect("valid url");
        let u = c.url(&["v1", "libraries", "a b/c"]).expect("url");
        assert_eq!(u.as_str(), "http://h:1/prefix/v1/libraries/a%20b%2Fc");
        let c = client("http://h:1").expect("valid url");
        assert_eq!(
            c.url(&["health"]).expect("url").as_str(),
            "http://h:1/health"
        );
    }

    #[test]
    fn bad_urls_are_refused() {
        assert!(client("nope").is_err());
        assert!(client("https://h").is_err());
        assert!(client("ftp://h").is_err());
    }

    #[test]
    fn error_bodies() {
        let e = ServerError::from_body(
            404,
            r#"{"error":"library_not_found","detail":"no library x"}"#,
        );
        assert_eq!(e.to_string(), "no library x (library_not_found)");
        let e = ServerError::from_body(502, "<html>bad gateway</html>");
        assert_eq!(e.code, "http_502");
        assert!(e.detail.contains("502 Bad Gateway: <html>"), "{}", e.detail);
    }
}
