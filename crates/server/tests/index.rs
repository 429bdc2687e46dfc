//! Index management over HTTP: an `hnsw` library with its parameters and int8 quantization,
//! `GET …/index` (type, parameters, sizes, build), per-query `ef_search`, switching the index
//! with `PUT …/index` while searches keep answering, `index.rebuilt` on the change stream,
//! and clear errors for bad parameters.

mod common;

use quiver_engine::EngineConfig;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const DIM: usize = 8;

/// A distinct pseudo-random vector per `i` (splitmix64), reproducible without a seed file.
fn vector(i: usize) -> Vec<f32> {
    let mut x = i as u64 ^ 0x9E37_79B9_7F4A_7C15;
    (0..DIM)
        .map(|_| {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

async fn fill(client: &Client, base: &str, lib: &str, n: usize) {
    for start in (0..n).step_by(250) {
        let docs: Vec<Value> = (start..(start + 250).min(n))
            .map(|i| {
                json!({"id": format!("d{i:04}"), "title": "t",
                       "chunks": [{"text": "x", "embedding": vector(i), "metadata": {"g": i % 10}}]})
            })
            .collect();
        let r = client
            .post(format!("{base}/v1/libraries/{lib}/documents/batch"))
            .json(&json!({ "documents": docs }))
            .send()
            .await
            .expect("batch");
        assert_eq!(r.status(), StatusCode::OK);
    }
}

async fn search(client: &Client, base: &str, lib: &str, body: Value) -> (StatusCode, Value) {
    let r = client
        .post(format!("{base}/v1/libraries/{lib}/search"))
        .json(&body)
        .send()
        .await
        .expect("search");
    let status = r.status();
    (status, r.json().await.expect("json"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hnsw_library_index_route_and_switch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, _engine) = common::spawn(EngineConfig::new(dir.path())).await;
    let client = Client::new();

    // Bad parameters change nothing.
    for (body, code) in [
        (
            json!({"name": "a", "dimension": DIM, "index_type": "hnsw", "index_params": {"m": 1}}),
            "invalid_index_params",
        ),
        (
            json!({"name": "a", "dimension": DIM, "index_type": "hnsw", "index_params": {"ef_search": 100000}}),
            "invalid_index_params",
        ),
        (
            json!({"name": "a", "dimension": DIM, "index_type": "hnsw", "index_params": {"m": 8, "m0": 7}}),
            "invalid_index_params",
        ),
        (
            json!({"name": "a", "dimension": DIM, "index_type": "hnsw", "index_params": {"m0": 33}}),
            "invalid_index_params",
        ),
        (
            json!({"name": "a", "dimension": DIM, "index_params": {"m": 8}}),
            "invalid_index_params",
        ),
        (
            json!({"name": "a", "dimension": DIM, "index_type": "hnsw", "quantization": {"type": "pq"}}),
            "invalid_index_params",
        ),
        (
            json!({"name": "a", "dimension": DIM, "index_type": "annoy"}),
            "invalid_index_type",
        ),
    ] {
        let r = client
            .post(format!("{base}/v1/libraries"))
            .json(&body)
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["error"], code, "{v}");
    }
    let libs: Value = client
        .get(format!("{base}/v1/libraries"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(libs["libraries"].as_array().map(Vec::len), Some(0));

    let r = client
        .post(format!("{base}/v1/libraries"))
        .json(
            &json!({"name": "h", "dimension": DIM, "metric": "l2", "index_type": "hnsw",
                      "index_params": {"m": 12, "ef_construction": 100, "ef_search": 40},
                      "quantization": {"type": "int8", "oversampling": 3}}),
        )
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), StatusCode::CREATED);
    let lib: Value = r.json().await.expect("json");
    assert_eq!(lib["index_type"], "hnsw");
    assert_eq!(
        lib["index_params"],
        json!({"m": 12, "m0": 24, "ef_construction": 100, "ef_search": 40})
    );
    assert_eq!(lib["quantization"]["type"], "int8");
    let id = lib["id"].as_str().expect("id").to_string();
    fill(&client, &base, &id, 2000).await;

    let idx: Value = client
        .get(format!("{base}/v1/libraries/{id}/index"))
        .send()
        .await
        .expect("index")
        .json()
        .await
        .expect("json");
    assert_eq!(idx["index_type"], "hnsw");
    assert_eq!(idx["serving"], "hnsw");
    assert_eq!(idx["num_vectors"], 2000);
    assert_eq!(idx["graph_rows"], 2000);
    assert!(idx["memory_bytes"]["graph"].as_u64().expect("graph bytes") > 0);
    assert_eq!(idx["build"]["state"], "ready");

    // The nearest neighbour of a stored vector is itself (rescored on the originals: exact distance 0).
    let (status, v) = search(
        &client,
        &base,
        &id,
        json!({"embedding": vector(1234), "k": 5, "ef_search": 200}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["results"][0]["document_id"], "d1234");
    assert!(v["results"][0]["distance"].as_f64().expect("distance") < 1e-5);
    let (status, v) = search(
        &client,
        &base,
        &id,
        json!({"embedding": vector(1), "k": 5, "ef_search": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"], "invalid_ef_search");
    // Filtered: every hit matches, k hits.
    let (_, v) = search(
        &client,
        &base,
        &id,
        json!({"embedding": vector(7), "k": 10, "filter": {"g": 7}}),
    )
    .await;
    let hits = v["results"].as_array().expect("results");
    assert_eq!(hits.len(), 10);
    assert!(hits.iter().all(|h| h["chunk"]["metadata"]["g"] == 7));

    // index_type cannot change through PATCH; it changes through PUT …/index.
    let r = client
        .patch(format!("{base}/v1/libraries/{id}"))
        .json(&json!({"index_type": "flat"}))
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let r = client
        .put(format!("{base}/v1/libraries/{id}/index"))
        .json(&json!({"index_type": "hnsw", "index_params": {"m": 3000}}))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);

    let r = client
        .put(format!("{base}/v1/libraries/{id}/index"))
        .json(&json!({"index_type": "flat"}))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["serving"], "flat");
    let (_, v) = search(
        &client,
        &base,
        &id,
        json!({"embedding": vector(42), "k": 3}),
    )
    .await;
    assert_eq!(v["results"][0]["document_id"], "d0042");

    // Back to hnsw: built beside, searches answer while it builds, then it serves.
    let r = client
        .put(format!("{base}/v1/libraries/{id}/index"))
        .json(&json!({"index_type": "hnsw", "index_params": {"m": 8, "m0": 10}}))
        .send()
        .await
        .expect("put");
    assert!(
        r.status() == StatusCode::ACCEPTED || r.status() == StatusCode::OK,
        "{}",
        r.status()
    );
    let t = Instant::now();
    loop {
        let (status, v) = search(
            &client,
            &base,
            &id,
            json!({"embedding": vector(99), "k": 3}),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["results"][0]["document_id"], "d0099");
        let idx: Value = client
            .get(format!("{base}/v1/libraries/{id}/index"))
            .send()
            .await
            .expect("index")
            .json()
            .await
            .expect("json");
        if idx["build"]["state"] == "ready" {
            assert_eq!(idx["serving"], "hnsw");
            assert_eq!(idx["index_params"]["m"], 8);
            assert_eq!(idx["index_params"]["m0"], 10);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "build did not finish: {idx}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // index.rebuilt reaches the change stream.
    let t = Instant::now();
    loop {
        let v: Value = client
            .get(format!(
                "{base}/v1/events?from_seq=1&types=index.*&library_id={id}"
            ))
            .send()
            .await
            .expect("pull")
            .json()
            .await
            .expect("json");
        if let Some(e) = v["events"].as_array().and_then(|e| e.first()) {
            assert_eq!(e["type"], "index.rebuilt");
            assert_eq!(e["data"]["index_type"], "hnsw");
            assert_eq!(e["data"]["num_vectors"], 2000);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no index.rebuilt: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
