//! Exactness: the engine's search (flat index, filter applied during the scan) returns what a
//! straightforward reference computation returns — every metric, with and without filters,
//! with thresholds, after replacements and deletes.

use quiver_engine::input::{ChunkInput, CreateLibrary, DocumentInput, SearchInput};
use quiver_engine::{Engine, EngineConfig, WriteCtx};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const DIM: usize = 12;

struct RefChunk {
    doc: String,
    chunk: String,
    v: Vec<f64>,
    color: String,
    n: i64,
    year: i64,
}

fn reference_distance(metric: &str, q: &[f64], v: &[f64]) -> f64 {
    let dot: f64 = q.iter().zip(v).map(|(a, b)| a * b).sum();
    match metric {
        "cosine" => {
            let nq = q.iter().map(|a| a * a).sum::<f64>().sqrt();
            let nv = v.iter().map(|a| a * a).sum::<f64>().sqrt();
            1.0 - dot / (nq * nv)
        }
        "dot" => -dot,
        _ => q
            .iter()
            .zip(v)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            .sqrt(),
    }
}

#[test]
fn search_equals_reference_for_every_metric_and_filter() {
    for metric in ["cosine", "dot", "l2"] {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(EngineConfig::new(dir.path())).unwrap();
        let ctx = WriteCtx::default();
        let lib = engine
            .create_library(
                &ctx,
                CreateLibrary {
                    name: "lib".into(),
                    dimension: Some(DIM as u64),
                    metric: Some(metric.into()),
                    ..Default::default()
                },
            )
            .unwrap()
            .value
            .library
            .id;
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let colors = ["red", "green", "blue"];
        let mut reference: Vec<RefChunk> = Vec::new();
        for d in 0..300 {
            let year = rng.gen_range(1990..2025);
            let chunks: Vec<ChunkInput> = (0..rng.gen_range(1..5))
                .map(|c| {
                    let v: Vec<f32> = (0..DIM).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
                    let color = colors[rng.gen_range(0..3)];
                    let n = rng.gen_range(0..100);
                    reference.push(RefChunk {
                        doc: format!("d{d}"),
                        chunk: format!("c{c}"),
                        v: v.iter().map(|x| *x as f64).collect(),
                        color: color.into(),
                        n,
                        year,
                    });
                    ChunkInput {
                        id: Some(format!("c{c}")),
                        text: format!("chunk {c} of {d}"),
                        embedding: Some(v),
                        metadata: json!({"color": color, "n": n}).as_object().cloned(),
                        ..Default::default()
                    }
                })
                .collect();
            engine
                .upsert_document(
                    &ctx,
                    &lib,
                    DocumentInput {
                        id: Some(format!("d{d}")),
                        title: format!("doc {d}"),
                        metadata: json!({"year": year}).as_object().cloned(),
                        chunks: Some(chunks),
                        texts: None,
                    },
                )
                .unwrap();
        }
        // Churn: delete every 7th document; the reference follows.
        for d in (0..300).step_by(7) {
            engine
                .delete_document(&ctx, &lib, &format!("d{d}"))
                .unwrap();
            reference.retain(|r| r.doc != format!("d{d}"));
        }

        type Pred = Box<dyn Fn(&RefChunk) -> bool>;
        let filters: Vec<(Value, Pred)> = vec![
            (Value::Null, Box::new(|_| true)),
            (
                json!([{"field": "color", "operator": "eq", "value": "red"}]),
                Box::new(|r| r.color == "red"),
            ),
            (
                json!({"must": [{"field": "n", "operator": "gte", "value": 50}],
                       "must_not": [{"field": "document.year", "operator": "lt", "value": 2000}]}),
                Box::new(|r| r.n >= 50 && r.year >= 2000),
            ),
            (
                json!({"should": [{"field": "color", "operator": "in", "value": ["green"]},
                                  {"field": "n", "operator": "lt", "value": 5}]}),
                Box::new(|r| r.color == "green" || r.n < 5),
            ),
            // Very selective: fewer matches than k.
            (
                json!([{"field": "n", "operator": "eq", "value": 42}, {"field": "color", "operator": "eq", "value": "blue"}]),
                Box::new(|r| r.n == 42 && r.color == "blue"),
            ),
        ];

        for qi in 0..20 {
            let q: Vec<f32> = (0..DIM).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            let qd: Vec<f64> = q.iter().map(|x| *x as f64).collect();
            for (fi, (filter, pred)) in filters.iter().enumerate() {
                let k = [1, 10, 50][qi % 3];
                let mut want: Vec<(f64, &RefChunk)> = reference
                    .iter()
                    .filter(|r| pred(r))
                    .map(|r| (reference_distance(metric, &qd, &r.v), r))
                    .collect();
                want.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
                let threshold = if qi % 4 == 3 && want.len() > 3 {
                    Some(want[want.len() / 3].0 as f32)
                } else {
                    None
                };
                if let Some(t) = threshold {
                    want.retain(|(d, _)| *d <= t as f64 + 1e-6);
                }
                want.truncate(k);
                let req = SearchInput {
                    query: None,
                    embedding: Some(q.clone()),
                    embedding_b64: None,
                    k,
                    filter: filter.clone(),
                    distance_threshold: threshold,
                    include_embeddings: false,
                    ef_search: None,
                };
                let (hits, _) = engine.search(&lib, &req).unwrap();
                assert!(
                    hits.len() == want.len()
                        || (threshold.is_some() && hits.len() + 1 >= want.len()),
                    "{metric} filter {fi}: got {} hits, want {}",
                    hits.len(),
                    want.len()
                );
                for (i, (h, (wd, wr))) in hits.iter().zip(&want).enumerate() {
                    assert!(
                        (h.distance as f64 - wd).abs() < 1e-4,
                        "{metric} filter {fi} rank {i}: distance {} vs reference {wd}",
                        h.distance
                    );
                    let got = (&h.document.id, &h.document.chunks[h.chunk_index].id);
                    // Equal ids unless the reference has a near-tie at this rank.
                    let tied = want.iter().filter(|(d, _)| (d - wd).abs() < 1e-5).count() > 1;
                    if !tied {
                        assert_eq!(got, (&wr.doc, &wr.chunk), "{metric} filter {fi} rank {i}");
                    }
                    assert!(pred(
                        reference
                            .iter()
                            .find(|r| &r.doc == got.0 && &r.chunk == got.1)
                            .unwrap()
                    ));
                }
            }
        }
        engine.close().unwrap();
    }
}
