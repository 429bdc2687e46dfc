//! The remote providers against local servers speaking their wire formats.

mod common;

use std::time::Duration;

use common::{serve, Seen};
use quiver_embed::remote::{Cohere, OpenAi, RemoteConfig, Secret};
use quiver_embed::{EmbedError, Embedder, Purpose, Registry, RegistryConfig};
use serde_json::json;

fn cfg(base: &str) -> RemoteConfig {
    RemoteConfig {
        cohere_base_url: base.to_string(),
        cohere_key: Some(Secret::new("test-key-123")),
        openai_base_url: base.to_string(),
        openai_key: None,
        timeout: Duration::from_secs(10),
        max_attempts: 3,
        backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(50),
        ..RemoteConfig::default()
    }
}

fn texts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("t{i}")).collect()
}

/// A Cohere reply: each vector is [index from the text "t<i>", 1 if search_query else 0, 0.5].
fn cohere_reply(seen: &Seen) -> String {
    let q = if seen.body["input_type"] == "search_query" {
        1.0
    } else {
        0.0
    };
    let embs: Vec<Vec<f64>> = seen.body["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let i: f64 = t.as_str().unwrap()[1..].parse().unwrap();
            vec![i, q, 0.5]
        })
        .collect();
    json!({"id": "x", "embeddings": {"float": embs}, "texts": seen.body["texts"]}).to_string()
}

#[test]
fn cohere_request_shape_batches_of_96_and_order() {
    let (base, seen) = serve(10, |_, s| (200, vec![], cohere_reply(s)));
    let c = Cohere::new(cfg(&base)).unwrap();
    let out = c
        .embed("embed-english-v3.0", &texts(200), Purpose::Document)
        .unwrap();
    assert_eq!(out.len(), 200);
    for (i, v) in out.iter().enumerate() {
        assert_eq!(v, &vec![i as f32, 0.0, 0.5]);
    }
    let seen = seen.lock().unwrap().clone();
    let sizes: Vec<usize> = seen
        .iter()
        .map(|s| s.body["texts"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, vec![96, 96, 8]);
    for s in &seen {
        assert_eq!(s.path, "/v1/embed");
        assert_eq!(s.header("authorization"), Some("Bearer test-key-123"));
        assert_eq!(s.body["model"], "embed-english-v3.0");
        assert_eq!(s.body["input_type"], "search_document");
        assert_eq!(s.body["embedding_types"], json!(["float"]));
    }
    let q = c
        .embed("embed-english-v3.0", &texts(1), Purpose::Query)
        .unwrap();
    assert_eq!(q, vec![vec![0.0, 1.0, 0.5]]);
}

#[test]
fn cohere_429_then_success_honours_retry_after() {
    let (base, seen) = serve(10, |n, s| {
        if n == 0 {
            (
                429,
                vec![("Retry-After".into(), "0".into())],
                r#"{"message":"slow down"}"#.into(),
            )
        } else {
            (200, vec![], cohere_reply(s))
        }
    });
    let c = Cohere::new(cfg(&base)).unwrap();
    let out = c
        .embed("embed-english-v3.0", &texts(3), Purpose::Document)
        .unwrap();
    assert_eq!(out.len(), 3);
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[test]
fn server_errors_are_retried_then_reported_with_the_reason() {
    let (base, seen) = serve(10, |_, _| {
        (500, vec![], r#"{"message":"model overloaded"}"#.into())
    });
    let c = Cohere::new(cfg(&base)).unwrap();
    let e = c
        .embed("embed-english-v3.0", &texts(2), Purpose::Document)
        .unwrap_err();
    assert!(matches!(e, EmbedError::Provider(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("model overloaded") && msg.contains("500"),
        "{msg}"
    );
    assert!(msg.contains("3 attempts"), "{msg}");
    assert!(!msg.contains("test-key-123"));
    assert_eq!(seen.lock().unwrap().len(), 3);
}

#[test]
fn client_errors_are_not_retried() {
    let (base, seen) = serve(10, |_, _| {
        (401, vec![], r#"{"message":"invalid api token"}"#.into())
    });
    let c = Cohere::new(cfg(&base)).unwrap();
    let e = c
        .embed("embed-english-v3.0", &texts(2), Purpose::Query)
        .unwrap_err();
    assert!(e.to_string().contains("invalid api token"), "{e}");
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert!(!format!("{c:?}").contains("test-key-123"));
}

#[test]
fn cohere_without_a_key_is_unavailable() {
    let mut c = cfg("http://127.0.0.1:9");
    c.cohere_key = None;
    let e = Cohere::new(c).unwrap_err();
    assert!(matches!(e, EmbedError::Unavailable(_)));
    assert!(e.to_string().contains("COHERE_API_KEY"));
}

#[test]
fn unreachable_provider_is_a_clear_error() {
    // Bind then drop: nothing listens there any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut c = cfg(&format!("http://127.0.0.1:{port}"));
    c.max_attempts = 2;
    let e = OpenAi::new(c)
        .unwrap()
        .embed("m", &texts(1), Purpose::Query)
        .unwrap_err();
    assert!(e.to_string().contains("could not be reached"), "{e}");
}

#[test]
fn openai_request_shape_and_index_order() {
    let (base, seen) = serve(10, |_, s| {
        let n = s.body["input"].as_array().unwrap().len();
        // Answer in reverse order: the client must sort by `index`.
        let data: Vec<_> = (0..n)
            .rev()
            .map(|i| json!({"object": "embedding", "index": i, "embedding": [i as f64, 2.0]}))
            .collect();
        (
            200,
            vec![],
            json!({"object": "list", "data": data, "model": s.body["model"]}).to_string(),
        )
    });
    let mut c = cfg(&format!("{base}/v1"));
    c.openai_batch = 4;
    c.openai_key = Some(Secret::new("sk-abc"));
    let out = OpenAi::new(c)
        .unwrap()
        .embed("nomic-embed-text", &texts(10), Purpose::Document)
        .unwrap();
    assert_eq!(out.len(), 10);
    for (i, v) in out.iter().enumerate() {
        assert_eq!(v, &vec![(i % 4) as f32, 2.0]);
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].path, "/v1/embeddings");
    assert_eq!(seen[0].body["model"], "nomic-embed-text");
    assert_eq!(seen[0].body["input"], json!(["t0", "t1", "t2", "t3"]));
    assert_eq!(seen[0].header("authorization"), Some("Bearer sk-abc"));
}

#[test]
fn openai_without_key_sends_no_authorization_and_wrong_counts_fail() {
    let (base, seen) = serve(10, |_, _| {
        (
            200,
            vec![],
            json!({"data": [{"index": 0, "embedding": [1.0]}]}).to_string(),
        )
    });
    let e = OpenAi::new(cfg(&base))
        .unwrap()
        .embed("m", &texts(2), Purpose::Document)
        .unwrap_err();
    assert!(e.to_string().contains("1 embeddings for 2 texts"), "{e}");
    assert_eq!(seen.lock().unwrap()[0].header("authorization"), None);
}

#[test]
fn registry_routes_concurrent_purposes_without_mixing_and_caches_queries() {
    let (base, seen) = serve(1000, |_, s| (200, vec![], cohere_reply(s)));
    let mut rc = RegistryConfig::new(std::env::temp_dir().join("quiver-embed-unused-models"));
    rc.remote = cfg(&base);
    let reg = std::sync::Arc::new(Registry::new(rc).unwrap());
    let model = "cohere:embed-english-v3.0";
    assert_eq!(reg.dimension(model), Some(1024));
    let handles: Vec<_> = (0..8)
        .map(|k| {
            let reg = std::sync::Arc::clone(&reg);
            std::thread::spawn(move || {
                let purpose = if k % 2 == 0 {
                    Purpose::Document
                } else {
                    Purpose::Query
                };
                for round in 0..5 {
                    let t: Vec<String> = (0..7)
                        .map(|i| format!("t{}", k * 1000 + round * 10 + i))
                        .collect();
                    let out = reg.embed(Some(model), &t, purpose).unwrap();
                    for (i, v) in out.iter().enumerate() {
                        let want_q = if purpose == Purpose::Query { 1.0 } else { 0.0 };
                        assert_eq!(v[0], (k * 1000 + round * 10 + i) as f32);
                        assert_eq!(v[1], want_q, "purpose mixed up");
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let before = seen.lock().unwrap().len();
    assert!(before <= 40, "{before} requests for 40 calls");
    // The same query again is served from the cache.
    let q = vec!["t1000".to_string()];
    reg.embed(Some(model), &q, Purpose::Query).unwrap();
    reg.embed(Some(model), &q, Purpose::Query).unwrap();
    assert!(reg.cached_queries() > 0);
    assert!(seen.lock().unwrap().len() <= before + 1);
}

/// Regression: with two idle workers, one could take a job and then wait for the receiver
/// lock held by the other (blocked in `recv`) to micro-batch — holding the job until the next
/// request arrived. Sequential single requests, each after the workers went idle, must all be
/// answered promptly.
#[test]
fn registry_answers_each_sequential_request_without_waiting_for_the_next() {
    let (base, _seen) = serve(1000, |_, s| (200, vec![], cohere_reply(s)));
    let mut rc = RegistryConfig::new(std::env::temp_dir().join("quiver-embed-unused-models"));
    rc.remote = cfg(&base);
    rc.workers = 2;
    rc.request_timeout = std::time::Duration::from_secs(5);
    let reg = Registry::new(rc).unwrap();
    for i in 0..100 {
        // Let both workers go back to waiting for work.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let t = vec![format!("t{i}")];
        let out = reg
            .embed(Some("cohere:embed-english-v3.0"), &t, Purpose::Document)
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(out.len(), 1);
    }
}
