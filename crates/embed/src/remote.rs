//! # Remote providers: Cohere and OpenAI-compatible embedding servers
//!
//! Owns the two wire formats — Cohere `POST {base}/v1/embed` (`input_type` search_document /
//! search_query, at most 96 texts a request) and OpenAI-compatible `POST {base}/v1/embeddings`
//! (OpenAI, Ollama, vLLM, TEI…) — and the policy around them: a timeout on every request,
//! bounded retries with exponential backoff on 429 (honouring `Retry-After`) and 5xx, a cap on
//! response size, and errors that carry the provider's own reason.
//!
//! It must never put a key in an error, a log line or `Debug` output ([`Secret`]), never keep
//! per-request state in the client (the purpose travels with each call, so concurrent
//! document and query embeddings cannot mix), and never return a vector count or shape other
//! than what was asked for.
//!
//! The client is blocking: embedding runs on the registry's own worker threads, never on the
//! async runtime. Build and use these types off any tokio runtime.

use std::io::Read;
use std::time::Duration;

use serde_json::{json, Value};

use crate::{EmbedError, Purpose};

/// Texts per Cohere request (the API's limit).
pub const COHERE_BATCH: usize = 96;
/// Texts per OpenAI-compatible request by default.
pub const OPENAI_BATCH: usize = 256;
/// Largest response body read, in bytes.
pub const RESPONSE_BYTES_LIMIT: u64 = 64 * 1024 * 1024;
/// Longest provider message kept in an error.
const REASON_LIMIT: usize = 500;

/// An API key: shown as `***` everywhere.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Settings of the remote providers.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    /// Default `https://api.cohere.com` (`$QUIVER_COHERE_BASE_URL`).
    pub cohere_base_url: String,
    /// `$COHERE_API_KEY`.
    pub cohere_key: Option<Secret>,
    /// Default `https://api.openai.com` (`$QUIVER_OPENAI_BASE_URL`); `/v1/embeddings` is
    /// appended (a trailing `/v1` is accepted too).
    pub openai_base_url: String,
    /// `$OPENAI_API_KEY`; optional (local servers need none).
    pub openai_key: Option<Secret>,
    /// Texts per OpenAI-compatible request.
    pub openai_batch: usize,
    /// Per-request timeout (connect + whole response).
    pub timeout: Duration,
    /// Attempts per request, first included (≥ 1).
    pub max_attempts: u32,
    /// First backoff; doubles per retry, capped by `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            cohere_base_url: "https://api.cohere.com".into(),
            cohere_key: None,
            openai_base_url: "https://api.openai.com".into(),
            openai_key: None,
            openai_batch: OPENAI_BATCH,
            timeout: Duration::from_secs(30),
            max_attempts: 4,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(20),
        }
    }
}

impl RemoteConfig {
    /// Defaults, with keys and base URLs from the environment (`COHERE_API_KEY`,
    /// `OPENAI_API_KEY`, `QUIVER_COHERE_BASE_URL`, `QUIVER_OPENAI_BASE_URL`).
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|s| !s.trim().is_empty());
        let mut c = RemoteConfig {
            cohere_key: var("COHERE_API_KEY").map(Secret),
            openai_key: var("OPENAI_API_KEY").map(Secret),
            ..RemoteConfig::default()
        };
        if let Some(u) = var("QUIVER_COHERE_BASE_URL") {
            c.cohere_base_url = u;
        }
        if let Some(u) = var("QUIVER_OPENAI_BASE_URL") {
            c.openai_base_url = u;
        }
        c
    }
}

/// The dimension of well-known remote models.
pub fn known_dimension(provider: &str, model: &str) -> Option<u32> {
    match (provider, model) {
        ("cohere", "embed-english-v3.0" | "embed-multilingual-v3.0") => Some(1024),
        ("cohere", "embed-english-light-v3.0" | "embed-multilingual-light-v3.0") => Some(384),
        ("openai", "text-embedding-3-small" | "text-embedding-ada-002") => Some(1536),
        ("openai", "text-embedding-3-large") => Some(3072),
        _ => None,
    }
}

fn base(url: &str) -> String {
    let u = url.trim_end_matches('/');
    u.strip_suffix("/v1").unwrap_or(u).to_string()
}

fn client(timeout: Duration) -> Result<reqwest::blocking::Client, EmbedError> {
    reqwest::blocking::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .build()
        .map_err(|e| EmbedError::Provider(format!("could not build an HTTP client: {e}")))
}

fn clip_reason(s: &str) -> String {
    let s = s.trim();
    if s.len() <= REASON_LIMIT {
        return s.to_string();
    }
    let mut end = REASON_LIMIT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The provider's own reason in an error body (`{"message"}`, `{"error": {"message"}}`,
/// `{"error": "…"}`, `{"detail"}`), else the body's start.
fn reason(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        let found = v
            .get("message")
            .and_then(Value::as_str)
            .or_else(|| v.pointer("/error/message").and_then(Value::as_str))
            .or_else(|| v.get("error").and_then(Value::as_str))
            .or_else(|| v.get("detail").and_then(Value::as_str));
        if let Some(m) = found {
            return clip_reason(m);
        }
    }
    clip_reason(&String::from_utf8_lossy(body))
}

/// Sends one JSON POST with the retry policy; returns the parsed 2xx body.
fn post_json(
    http: &reqwest::blocking::Client,
    cfg: &RemoteConfig,
    provider: &str,
    url: &str,
    key: Option<&Secret>,
    body: &Value,
) -> Result<Value, EmbedError> {
    let attempts = cfg.max_attempts.max(1);
    let mut last = String::new();
    for attempt in 0..attempts {
        let mut req = http.post(url).json(body);
        if let Some(k) = key {
            req = req.bearer_auth(k.expose());
        }
        let backoff = cfg
            .backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(cfg.max_backoff);
        let wait = match req.send() {
            Ok(resp) => {
                let status = resp.status();
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let mut bytes = Vec::new();
                let read = resp.take(RESPONSE_BYTES_LIMIT + 1).read_to_end(&mut bytes);
                if status.is_success() {
                    if let Err(e) = read {
                        return Err(EmbedError::Provider(format!(
                            "{provider}: reading the response failed: {e}"
                        )));
                    }
                    if bytes.len() as u64 > RESPONSE_BYTES_LIMIT {
                        return Err(EmbedError::Provider(format!(
                            "{provider}: response larger than {RESPONSE_BYTES_LIMIT} bytes"
                        )));
                    }
                    return serde_json::from_slice(&bytes).map_err(|e| {
                        EmbedError::Provider(format!("{provider}: response is not JSON: {e}"))
                    });
                }
                let why = reason(&bytes);
                last = format!("{provider} answered {status}: {why}");
                let retryable = status.as_u16() == 429 || status.is_server_error();
                if !retryable {
                    return Err(EmbedError::Provider(last));
                }
                tracing::warn!(provider, %status, attempt, "embedding request will be retried");
                retry_after
                    .map(|d| d.min(cfg.max_backoff))
                    .unwrap_or(backoff)
            }
            Err(e) => {
                // reqwest errors carry the URL, never headers, so no key can leak here.
                last = format!("{provider} could not be reached: {e}");
                tracing::warn!(provider, attempt, error = %e, "embedding request will be retried");
                backoff
            }
        };
        if attempt + 1 < attempts {
            std::thread::sleep(wait);
        }
    }
    Err(EmbedError::Provider(format!(
        "{last} (gave up after {attempts} attempts)"
    )))
}

fn floats(provider: &str, v: &Value) -> Result<Vec<f32>, EmbedError> {
    let arr = v
        .as_array()
        .ok_or_else(|| EmbedError::Provider(format!("{provider}: an embedding is not an array")))?;
    arr.iter()
        .map(|x| {
            x.as_f64()
                .map(|f| f as f32)
                .filter(|f| f.is_finite())
                .ok_or_else(|| {
                    EmbedError::Provider(format!("{provider}: non-numeric embedding value"))
                })
        })
        .collect()
}

fn check_shape(provider: &str, asked: usize, got: &[Vec<f32>]) -> Result<(), EmbedError> {
    if got.len() != asked {
        return Err(EmbedError::Provider(format!(
            "{provider} returned {} embeddings for {asked} texts",
            got.len()
        )));
    }
    if let Some(first) = got.first() {
        if first.is_empty() || got.iter().any(|v| v.len() != first.len()) {
            return Err(EmbedError::Provider(format!(
                "{provider} returned embeddings of differing or zero dimension"
            )));
        }
    }
    Ok(())
}

/// Cohere's `/v1/embed`.
#[derive(Debug)]
pub struct Cohere {
    http: reqwest::blocking::Client,
    cfg: RemoteConfig,
    url: String,
}

impl Cohere {
    /// Fails with [`EmbedError::Unavailable`] when no key is configured.
    pub fn new(cfg: RemoteConfig) -> Result<Self, EmbedError> {
        if cfg.cohere_key.is_none() {
            return Err(EmbedError::Unavailable(
                "Cohere embeddings need an API key: set COHERE_API_KEY in the server's environment"
                    .into(),
            ));
        }
        Ok(Cohere {
            http: client(cfg.timeout)?,
            url: format!("{}/v1/embed", base(&cfg.cohere_base_url)),
            cfg,
        })
    }

    pub fn embed(
        &self,
        model: &str,
        texts: &[String],
        purpose: Purpose,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        crate::check_count(texts)?;
        let input_type = match purpose {
            Purpose::Document => "search_document",
            Purpose::Query => "search_query",
        };
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(COHERE_BATCH) {
            let clipped: Vec<&str> = batch.iter().map(|t| crate::clip(t)).collect();
            let body = json!({
                "model": model,
                "texts": clipped,
                "input_type": input_type,
                "embedding_types": ["float"],
                "truncate": "END",
            });
            let v = post_json(
                &self.http,
                &self.cfg,
                "cohere",
                &self.url,
                self.cfg.cohere_key.as_ref(),
                &body,
            )?;
            // `embeddings` is `{"float": [[…]]}` when embedding_types is sent, `[[…]]` otherwise.
            let embs = v
                .get("embeddings")
                .and_then(|e| e.get("float").or(Some(e)))
                .and_then(Value::as_array)
                .ok_or_else(|| EmbedError::Provider("cohere: response has no embeddings".into()))?;
            let got = embs
                .iter()
                .map(|e| floats("cohere", e))
                .collect::<Result<Vec<_>, _>>()?;
            check_shape("cohere", batch.len(), &got)?;
            out.extend(got);
        }
        Ok(out)
    }
}

/// An OpenAI-compatible `/v1/embeddings`.
#[derive(Debug)]
pub struct OpenAi {
    http: reqwest::blocking::Client,
    cfg: RemoteConfig,
    url: String,
}

impl OpenAi {
    pub fn new(cfg: RemoteConfig) -> Result<Self, EmbedError> {
        Ok(OpenAi {
            http: client(cfg.timeout)?,
            url: format!("{}/v1/embeddings", base(&cfg.openai_base_url)),
            cfg,
        })
    }

    /// `purpose` is not sent: the OpenAI API embeds documents and queries alike.
    pub fn embed(
        &self,
        model: &str,
        texts: &[String],
        _purpose: Purpose,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        crate::check_count(texts)?;
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(self.cfg.openai_batch.clamp(1, crate::MAX_TEXTS_PER_CALL)) {
            let clipped: Vec<&str> = batch.iter().map(|t| crate::clip(t)).collect();
            let body = json!({ "model": model, "input": clipped, "encoding_format": "float" });
            let v = post_json(
                &self.http,
                &self.cfg,
                "openai",
                &self.url,
                self.cfg.openai_key.as_ref(),
                &body,
            )?;
            let data = v
                .get("data")
                .and_then(Value::as_array)
                .ok_or_else(|| EmbedError::Provider("openai: response has no data".into()))?;
            let mut got: Vec<(usize, Vec<f32>)> = Vec::with_capacity(data.len());
            for (pos, d) in data.iter().enumerate() {
                let idx = d
                    .get("index")
                    .and_then(Value::as_u64)
                    .map(|i| i as usize)
                    .unwrap_or(pos);
                let e = d.get("embedding").ok_or_else(|| {
                    EmbedError::Provider("openai: data item has no embedding".into())
                })?;
                got.push((idx, floats("openai", e)?));
            }
            got.sort_by_key(|(i, _)| *i);
            if got.iter().enumerate().any(|(k, (i, _))| k != *i) {
                return Err(EmbedError::Provider(
                    "openai: response indexes do not match the inputs".into(),
                ));
            }
            let got: Vec<Vec<f32>> = got.into_iter().map(|(_, v)| v).collect();
            check_shape("openai", batch.len(), &got)?;
            out.extend(got);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn keys_never_show() {
        let c = RemoteConfig {
            cohere_key: Some(Secret::new("sk-very-secret")),
            ..RemoteConfig::default()
        };
        assert!(!format!("{c:?}").contains("very-secret"));
    }
    #[test]
    fn reasons_are_found() {
        assert_eq!(reason(br#"{"message":"bad key"}"#), "bad key");
        assert_eq!(reason(br#"{"error":{"message":"slow down"}}"#), "slow down");
        assert_eq!(reason(b"plain"), "plain");
    }
    #[test]
    fn base_urls() {
        assert_eq!(base("http://x:1/v1/"), "http://x:1");
        assert_eq!(base("http://x:1"), "http://x:1");
    }
}
