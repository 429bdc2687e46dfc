//! Where a webhook may go and how one request is made: URL checks, the SSRF address rule,
//! DNS resolved here and pinned for the connection, Standard Webhooks signing, and one HTTP
//! attempt (no redirects, no proxy, a timeout, a bounded response body).
//!
//! It must never connect to an address it did not check: the client is built with the
//! resolved address as an override for the host name, so reqwest does no lookup of its own.

use super::{WebhookError, RESPONSE_BODY_BYTES_LIMIT, URL_BYTES_LIMIT};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use reqwest::Url;
use sha2::Sha256;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// Parses and checks a target URL: `http` or `https`, a host, no credentials, bounded length.
pub fn parse_url(s: &str) -> Result<Url, WebhookError> {
    if s.len() > URL_BYTES_LIMIT {
        return Err(WebhookError::Invalid(format!(
            "url is {} bytes; the limit is {URL_BYTES_LIMIT}",
            s.len()
        )));
    }
    let url = Url::parse(s).map_err(|e| WebhookError::Invalid(format!("url {s:?}: {e}")))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(WebhookError::Invalid(format!(
            "url scheme must be http or https, not {:?}",
            url.scheme()
        )));
    }
    if url.host().is_none() {
        return Err(WebhookError::Invalid("url has no host".to_string()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(WebhookError::Invalid(
            "url must not carry credentials; the signature authenticates the sender".to_string(),
        ));
    }
    Ok(url)
}

/// Addresses a webhook may not reach unless private targets are allowed: private, loopback,
/// link-local, unspecified, multicast, broadcast, shared (CGNAT) and the IPv4 "this network".
pub fn ip_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4_forbidden(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4_forbidden(v4);
            }
            let seg0 = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg0 & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (seg0 & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (seg0 & 0xffc0) == 0xfec0 // site-local (deprecated) fec0::/10
        }
    }
}

fn v4_forbidden(v4: Ipv4Addr) -> bool {
    let o = v4.octets();
    v4.is_private()
        || v4.is_loopback()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_multicast()
        || v4.is_broadcast()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
}

/// Resolves the URL's host to the address to connect to, checking every answer.
pub async fn resolve(url: &Url, allow_private: bool) -> Result<SocketAddr, String> {
    let port = url
        .port_or_known_default()
        .ok_or_else(|| "the url has no port".to_string())?;
    let addrs: Vec<SocketAddr> = match url.host() {
        Some(url::Host::Ipv4(ip)) => vec![SocketAddr::new(IpAddr::V4(ip), port)],
        Some(url::Host::Ipv6(ip)) => vec![SocketAddr::new(IpAddr::V6(ip), port)],
        Some(url::Host::Domain(name)) => tokio::net::lookup_host((name, port))
            .await
            .map_err(|e| format!("cannot resolve {name}: {e}"))?
            .collect(),
        None => return Err("the url has no host".to_string()),
    };
    if allow_private {
        return addrs
            .into_iter()
            .next()
            .ok_or_else(|| "the host resolves to no address".to_string());
    }
    // Any forbidden answer refuses the name: a name that mixes public and private answers
    // is a rebinding attempt or a misconfiguration either way.
    if let Some(bad) = addrs.iter().find(|a| ip_forbidden(a.ip())) {
        return Err(format!(
            "the target resolves to {}, a private, loopback or link-local address (start the server with --webhooks-allow-private to allow it)",
            bad.ip()
        ));
    }
    addrs
        .into_iter()
        .next()
        .ok_or_else(|| "the host resolves to no address".to_string())
}

/// The check at registration: a target that resolves (now) to a forbidden address is refused.
/// A name that does not resolve yet is accepted: every delivery resolves and checks again.
pub async fn check_registration(url: &Url, allow_private: bool) -> Result<(), WebhookError> {
    if allow_private {
        return Ok(());
    }
    if let Some(url::Host::Domain(name)) = url.host() {
        let lower = name.to_ascii_lowercase();
        if lower == "localhost" || lower.ends_with(".localhost") {
            return Err(WebhookError::TargetForbidden(format!(
                "{name} is a loopback name (start the server with --webhooks-allow-private to allow it)"
            )));
        }
    }
    match resolve(url, false).await {
        Err(e) if e.contains("private, loopback") => Err(WebhookError::TargetForbidden(e)),
        _ => Ok(()),
    }
}

/// A new Standard Webhooks secret: `whsec_` and the base64 of 32 random bytes.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed by the secret's bytes.
pub fn sign(secret: &str, id: &str, timestamp: u64, body: &[u8]) -> Result<String, String> {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| format!("the secret is not base64: {e}"))?;
    let mut mac =
        Hmac::<Sha256>::new_from_slice(&key).map_err(|e| format!("bad signing key: {e}"))?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Delivered,
    /// 410: the receiver asks never to be called again.
    Gone,
    /// Failed; retry (after the given delay for a 429 with `Retry-After`).
    Failed {
        retry_after: Option<Duration>,
    },
}

#[derive(Debug, Clone)]
pub struct Attempt {
    pub verdict: Verdict,
    pub response_code: Option<u16>,
    pub latency_ms: u64,
    pub error: Option<String>,
}

/// A client pinned to one checked address, reused while the name keeps resolving there (so
/// connections are kept alive between deliveries).
#[derive(Default)]
pub struct ClientCache {
    key: Option<(String, SocketAddr)>,
    client: Option<reqwest::Client>,
}

impl ClientCache {
    fn get(
        &mut self,
        url: &Url,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<reqwest::Client, String> {
        let host = url.host_str().unwrap_or_default().to_string();
        if let (Some((h, a)), Some(c)) = (&self.key, &self.client) {
            if *h == host && *a == addr {
                return Ok(c.clone());
            }
        }
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(1)
            .user_agent(concat!("quiver-webhooks/", env!("CARGO_PKG_VERSION")));
        if let Some(url::Host::Domain(name)) = url.host() {
            b = b.resolve(name, addr);
        }
        let client = b
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        self.key = Some((host, addr));
        self.client = Some(client.clone());
        Ok(client)
    }
}

/// Makes one signed POST of `body` to `url` (resolving and checking the address first).
pub async fn send(
    cache: &mut ClientCache,
    url: &str,
    allow_private: bool,
    timeout: Duration,
    secret: &str,
    webhook_id: &str,
    body: &[u8],
) -> Attempt {
    let started = Instant::now();
    let fail = |error: String, started: Instant| Attempt {
        verdict: Verdict::Failed { retry_after: None },
        response_code: None,
        latency_ms: started.elapsed().as_millis() as u64,
        error: Some(error),
    };
    let url = match parse_url(url) {
        Ok(u) => u,
        Err(e) => return fail(e.to_string(), started),
    };
    let addr = match resolve(&url, allow_private).await {
        Ok(a) => a,
        Err(e) => return fail(e, started),
    };
    let client = match cache.get(&url, addr, timeout) {
        Ok(c) => c,
        Err(e) => return fail(e, started),
    };
    let timestamp = quiver_model::time::now_ms() / 1000;
    let signature = match sign(secret, webhook_id, timestamp, body) {
        Ok(s) => s,
        Err(e) => return fail(e, started),
    };
    let sent = client
        .post(url)
        .header("content-type", "application/cloudevents+json")
        .header("webhook-id", webhook_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body.to_vec())
        .send()
        .await;
    let mut resp = match sent {
        Ok(r) => r,
        Err(e) => {
            let what = if e.is_timeout() {
                format!("timed out after {} ms", timeout.as_millis())
            } else {
                format!("request failed: {}", error_chain(&e))
            };
            return fail(what, started);
        }
    };
    let code = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    // Read a bounded prefix of the body (for the error message); drop the rest.
    let mut head: Vec<u8> = Vec::new();
    while head.len() < RESPONSE_BODY_BYTES_LIMIT {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let room = RESPONSE_BODY_BYTES_LIMIT - head.len();
                head.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            _ => break,
        }
    }
    let latency_ms = started.elapsed().as_millis() as u64;
    let snippet = || {
        let text = String::from_utf8_lossy(&head);
        let text: String = text.chars().take(200).collect();
        if text.is_empty() {
            String::new()
        } else {
            format!(": {text}")
        }
    };
    let (verdict, error) = match code {
        200..=299 => (Verdict::Delivered, None),
        410 => (Verdict::Gone, Some(format!("HTTP 410 Gone{}", snippet()))),
        429 => (
            Verdict::Failed { retry_after },
            Some(format!("HTTP 429 Too Many Requests{}", snippet())),
        ),
        300..=399 => (
            Verdict::Failed { retry_after: None },
            Some(format!("HTTP {code}: redirects are not followed")),
        ),
        _ => (
            Verdict::Failed { retry_after: None },
            Some(format!("HTTP {code}{}", snippet())),
        ),
    };
    Attempt {
        verdict,
        response_code: Some(code),
        latency_ms,
        error,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// `Retry-After` as delay-seconds or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // RFC 7231 IMF-fixdate, e.g. "Wed, 21 Oct 2015 07:28:00 GMT".
    let parts: Vec<&str> = v.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[2])?
        + 1;
    let rfc = format!(
        "{}-{:02}-{:02}T{}Z",
        parts[3],
        month,
        parts[1].parse::<u32>().ok()?,
        parts[4]
    );
    let at_ms = quiver_model::time::parse_rfc3339_ms(&rfc)?;
    Some(Duration::from_millis(
        at_ms.saturating_sub(quiver_model::time::now_ms()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "ff02::1",
        ] {
            let ip: IpAddr = ip.parse().expect("an address");
            assert!(ip_forbidden(ip), "{ip} must be forbidden");
        }
        for ip in ["1.1.1.1", "93.184.216.34", "2606:4700::1111"] {
            let ip: IpAddr = ip.parse().expect("an address");
            assert!(!ip_forbidden(ip), "{ip} must be allowed");
        }
    }

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example from the Standard Webhooks specification.
        let sig = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        )
        .expect("signs");
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    /// The per-delivery check: a name resolving to loopback fails the attempt before any
    /// connection is made (the path a name re-pointed to a private address takes).
    #[tokio::test]
    async fn delivery_to_a_name_resolving_to_loopback_is_refused() {
        let url = parse_url("http://localhost:9/hook").expect("a url");
        let err = resolve(&url, false).await.expect_err("refused");
        assert!(err.contains("private, loopback"), "{err}");
        assert!(resolve(&url, true).await.is_ok());
        let mut cache = ClientCache::default();
        let a = send(
            &mut cache,
            "http://localhost:9/hook",
            false,
            Duration::from_secs(1),
            "whsec_AAAA",
            "1",
            b"{}",
        )
        .await;
        assert_eq!(a.response_code, None);
        assert!(matches!(a.verdict, Verdict::Failed { .. }));
        assert!(a.error.unwrap_or_default().contains("private, loopback"));
        assert!(
            cache.client.is_none(),
            "no client was built, no connection made"
        );
    }

    #[test]
    fn urls() {
        assert!(parse_url("ftp://x.example/").is_err());
        assert!(parse_url("https://u:p@x.example/").is_err());
        assert!(parse_url(&format!("https://x.example/{}", "a".repeat(3000))).is_err());
        assert!(parse_url("https://x.example/hook").is_ok());
    }
}
