//! Shared by the integration tests: where installed models are, and a tiny HTTP server.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// `$QUIVER_MODEL_DIR`, else `<workspace>/target/quiver-models` (where
/// `cargo run --release -p quiver-embed --example embed_tool -- install <model>` puts them).
pub fn model_dir() -> PathBuf {
    match std::env::var_os("QUIVER_MODEL_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/quiver-models"),
    }
}

/// The cache dir when `model` is installed there; otherwise prints why the test is skipped and
/// returns `None` — or panics when `QUIVER_REQUIRE_MODELS=1` (CI), so a missing install step
/// cannot pass unnoticed.
pub fn installed(model: &str) -> Option<PathBuf> {
    let dir = model_dir();
    match quiver_embed::models::is_installed(model, &dir) {
        Ok(true) => Some(dir),
        other => {
            let why = format!(
                "model {model} is not installed in {} ({other:?}); install it with \
                 `cargo run --release -p quiver-embed --example embed_tool -- install {model}`",
                dir.display()
            );
            if std::env::var("QUIVER_REQUIRE_MODELS").is_ok_and(|v| v == "1") {
                panic!("{why}");
            }
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-12)
}

/// One request as the test server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: serde_json::Value,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// (status, extra headers, body)
pub type Reply = (u16, Vec<(String, String)>, String);

/// An HTTP/1.1 server on 127.0.0.1:0 answering each request with `handler(n, &seen)` (`n`
/// counts requests from 0). It serves at most `limit` connections, then stops.
pub fn serve<F>(limit: usize, handler: F) -> (String, Arc<Mutex<Vec<Seen>>>)
where
    F: Fn(usize, &Seen) -> Reply + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().take(limit).enumerate() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(match stream.try_clone() {
                Ok(s) => s,
                Err(_) => continue,
            });
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut headers = Vec::new();
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.trim().split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    headers.push((k.trim().to_string(), v.trim().to_string()));
                }
            }
            let mut body = vec![0u8; len];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let s = Seen {
                path,
                headers,
                body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
            };
            let (status, extra, reply) = handler(n, &s);
            log.lock().unwrap().push(s);
            let mut head = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
                reply.len()
            );
            for (k, v) in extra {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(reply.as_bytes());
            let _ = stream.flush();
        }
    });
    (format!("http://{addr}"), seen)
}
