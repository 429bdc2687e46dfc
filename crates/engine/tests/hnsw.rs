//! HNSW libraries through the engine: approximate search agrees with exact search, filters
//! and deletes are honoured, the graph is saved with the snapshot and attached at start (not
//! rebuilt), a missing graph file is rebuilt in the background while searches stay correct,
//! and switching a library's index keeps searches answering throughout.

use quiver_engine::input::{
    ChunkInput, CreateLibrary, DocumentInput, IndexChange, IndexParamsInput, SearchInput,
};
use quiver_engine::{Engine, EngineConfig, WriteCtx};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

const DIM: usize = 16;
const DOCS: usize = 3000;

fn vectors(seed: u64, n: usize) -> Vec<Vec<f32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let centres: Vec<Vec<f32>> = (0..20)
        .map(|_| (0..DIM).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
        .collect();
    (0..n)
        .map(|i| {
            centres[i % centres.len()]
                .iter()
                .map(|c| c + rng.gen_range(-0.2f32..0.2))
                .collect()
        })
        .collect()
}

fn create(engine: &Engine, name: &str, index: Option<&str>) -> String {
    create_with(engine, name, index, None)
}

fn create_with(
    engine: &Engine,
    name: &str,
    index: Option<&str>,
    index_params: Option<IndexParamsInput>,
) -> String {
    engine
        .create_library(
            &WriteCtx::default(),
            CreateLibrary {
                name: name.into(),
                dimension: Some(DIM as u64),
                metric: Some("l2".into()),
                index_type: index.map(str::to_string),
                index_params,
                ..Default::default()
            },
        )
        .expect("create library")
        .value
        .library
        .id
}

fn fill(engine: &Engine, lib: &str, vs: &[Vec<f32>]) {
    for (start, part) in vs.chunks(500).enumerate() {
        let items = part
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let n = start * 500 + i;
                Ok(DocumentInput {
                    id: Some(format!("d{n:05}")),
                    title: format!("doc {n}"),
                    chunks: Some(vec![ChunkInput {
                        text: format!("chunk of {n}"),
                        embedding: Some(v.clone()),
                        metadata: json!({"group": n % 100}).as_object().cloned(),
                        ..Default::default()
                    }]),
                    ..Default::default()
                })
            })
            .collect();
        engine
            .upsert_documents(&WriteCtx::default(), lib, items)
            .expect("batch");
    }
}

fn search(
    engine: &Engine,
    lib: &str,
    q: &[f32],
    k: usize,
    filter: serde_json::Value,
) -> Vec<String> {
    let req = SearchInput {
        query: None,
        embedding: Some(q.to_vec()),
        embedding_b64: None,
        k,
        filter,
        distance_threshold: None,
        include_embeddings: false,
        ef_search: Some(128),
    };
    engine
        .search(lib, &req)
        .expect("search")
        .0
        .iter()
        .map(|h| h.document.id.clone())
        .collect()
}

fn recall(engine: &Engine, approx: &str, exact: &str, queries: &[Vec<f32>]) -> f64 {
    let mut found = 0usize;
    let mut wanted = 0usize;
    for q in queries {
        let truth = search(engine, exact, q, 10, serde_json::Value::Null);
        let got = search(engine, approx, q, 10, serde_json::Value::Null);
        wanted += truth.len();
        found += got.iter().filter(|d| truth.contains(d)).count();
    }
    found as f64 / wanted as f64
}

fn wait_ready(engine: &Engine, lib: &str) {
    let t = Instant::now();
    loop {
        let (status, _) = engine.index_status(lib).expect("status");
        if !status.building {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "index build did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn hnsw_library_searches_filters_deletes_and_survives_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = vectors(7, DOCS);
    let queries = vectors(8, 50);
    let engine = Engine::open(EngineConfig::new(dir.path())).expect("open");
    // A bottom layer of 20 links rather than 2·m = 32: the library record and the graph file
    // carry m0 (index-type code 2, graph format 3) through the restart below.
    let approx = create_with(
        &engine,
        "approx",
        Some("hnsw"),
        Some(IndexParamsInput {
            m0: Some(20),
            ..Default::default()
        }),
    );
    let m0_of = |engine: &Engine| match engine.index_status(&approx).expect("status").0.index_type {
        quiver_model::IndexType::Hnsw(c) => (c.m, c.level0_degree()),
        other => panic!("{other:?}"),
    };
    assert_eq!(m0_of(&engine), (16, 20));
    let exact = create(&engine, "exact", None);
    fill(&engine, &approx, &data);
    fill(&engine, &exact, &data);
    let (status, _) = engine.index_status(&approx).expect("status");
    assert_eq!(status.serving, "hnsw");
    assert_eq!(status.graph_rows, Some(DOCS));
    let r = recall(&engine, &approx, &exact, &queries);
    assert!(r >= 0.95, "recall@10 {r}");

    // A 1% filter: every hit matches, and k hits come back when k matches exist.
    let f = json!({"group": 3});
    for q in &queries[..10] {
        let got = search(&engine, &approx, q, 10, f.clone());
        assert_eq!(got.len(), 10);
        for d in &got {
            let n: usize = d[1..].parse().expect("doc number");
            assert_eq!(n % 100, 3, "{d} does not match the filter");
        }
        assert_eq!(got, search(&engine, &exact, q, 10, f.clone()));
    }

    // Deletes are never returned.
    for n in (0..DOCS).step_by(3) {
        for lib in [&approx, &exact] {
            engine
                .delete_document(&WriteCtx::default(), lib, &format!("d{n:05}"))
                .expect("delete");
        }
    }
    for q in &queries {
        for d in search(&engine, &approx, q, 10, serde_json::Value::Null) {
            let n: usize = d[1..].parse().expect("doc number");
            assert_ne!(n % 3, 0, "deleted {d} was returned");
        }
    }
    let before: Vec<Vec<String>> = queries
        .iter()
        .map(|q| search(&engine, &approx, q, 10, serde_json::Value::Null))
        .collect();
    engine.close().expect("close");
    drop(engine);

    // The graph comes back from the snapshot, serving at once, with identical answers.
    let engine = Engine::open(EngineConfig::new(dir.path())).expect("reopen");
    let (status, _) = engine.index_status(&approx).expect("status");
    assert_eq!(status.serving, "hnsw", "graph attached from the snapshot");
    assert!(!status.building, "not rebuilt");
    assert_eq!(m0_of(&engine), (16, 20));
    let after: Vec<Vec<String>> = queries
        .iter()
        .map(|q| search(&engine, &approx, q, 10, serde_json::Value::Null))
        .collect();
    assert_eq!(before, after);

    // A sound graph file of the right size and dimension, but built with other parameters
    // (m0 = 2m, not the library's 20), is not served: the library rebuilds its graph with its
    // own. The file's vectors are unrelated ones, so serving it would wreck recall.
    let engine_chunks = engine.index_status(&approx).expect("status").0.vectors;
    engine.close().expect("close");
    drop(engine);
    let mut other = quiver_index::HnswIndex::new(
        DIM,
        quiver_index::Metric::L2,
        quiver_index::HnswParams::default(),
        quiver_index::Quantization::None,
    );
    for (id, v) in vectors(99, engine_chunks).iter().enumerate() {
        other.insert(id as u64, v);
    }
    let mut bytes = Vec::new();
    other.write_to(&mut bytes).expect("encode");
    for e in std::fs::read_dir(dir.path().join("snapshots")).expect("ls") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "hnsw") {
            std::fs::write(&p, &bytes).expect("replace");
        }
    }
    let engine = Engine::open(EngineConfig::new(dir.path())).expect("reopen");
    wait_ready(&engine, &approx);
    assert_eq!(m0_of(&engine), (16, 20));
    let r = recall(&engine, &approx, &exact, &queries);
    assert!(
        r >= 0.95,
        "recall@10 with a graph file of other parameters {r}"
    );
    engine.close().expect("close");
    drop(engine);

    // Without its graph file the library rebuilds in the background and answers meanwhile.
    for e in std::fs::read_dir(dir.path().join("snapshots")).expect("ls") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "hnsw") {
            std::fs::write(&p, b"not a graph").expect("damage");
        }
    }
    let engine = Engine::open(EngineConfig::new(dir.path())).expect("reopen");
    let got = search(&engine, &approx, &queries[0], 10, serde_json::Value::Null);
    assert_eq!(got.len(), 10);
    wait_ready(&engine, &approx);
    let (status, _) = engine.index_status(&approx).expect("status");
    assert_eq!(status.serving, "hnsw");
    assert_eq!(status.graph_rows, Some(status.vectors));
    let r = recall(&engine, &approx, &exact, &queries);
    assert!(r >= 0.95, "recall@10 after rebuild {r}");
    engine.close().expect("close");
}

#[test]
fn switching_index_keeps_searching_and_announces_the_rebuild() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = vectors(9, DOCS);
    let queries = vectors(10, 20);
    let engine = Engine::open(EngineConfig::new(dir.path())).expect("open");
    let lib = create(&engine, "lib", None);
    let exact = create(&engine, "exact", None);
    fill(&engine, &lib, &data);
    fill(&engine, &exact, &data);

    let searcher = {
        let engine: Arc<Engine> = engine.clone();
        let lib = lib.clone();
        let q = queries[0].clone();
        std::thread::spawn(move || {
            let mut answered = 0;
            let t = Instant::now();
            while t.elapsed() < Duration::from_millis(500) {
                assert_eq!(
                    search(&engine, &lib, &q, 10, serde_json::Value::Null).len(),
                    10
                );
                answered += 1;
            }
            answered
        })
    };
    let change = IndexChange {
        index_type: Some("hnsw".into()),
        index_params: None,
        quantization: None,
    };
    let committed = engine
        .set_index(&WriteCtx::default(), &lib, change)
        .expect("switch");
    assert_eq!(committed.value.library.index_type.as_str(), "hnsw");
    // Writes during the build land in the new graph too (through its journal).
    fill(&engine, &lib, &data[..200]);
    wait_ready(&engine, &lib);
    assert!(searcher.join().expect("searcher") > 0);
    let (status, _) = engine.index_status(&lib).expect("status");
    assert_eq!(status.serving, "hnsw");
    assert_eq!(status.graph_rows, Some(DOCS));
    assert!(recall(&engine, &lib, &exact, &queries) >= 0.95);

    // index.rebuilt is on the change stream once the new index serves.
    let t = Instant::now();
    loop {
        let events = engine
            .log()
            .read_from(1, 100_000, 1 << 30)
            .expect("read log");
        let found = events.iter().any(|(_, payload)| {
            quiver_model::record::peek_event_type(payload).is_ok_and(|t| t == "index.rebuilt")
        });
        if found {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no index.rebuilt event"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    engine.close().expect("close");
}

/// `optimize_index` rebuilds an hnsw graph with the same configuration beside the live one:
/// its tombstones are gone afterwards, nothing is appended to the log, searches still answer;
/// a flat library has nothing to compact.
#[test]
fn optimize_drops_tombstones_and_keeps_results() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(EngineConfig::new(dir.path())).expect("open");
    let lib = create(&engine, "opt", Some("hnsw"));
    let vs = vectors(7, 400);
    fill(&engine, &lib, &vs);
    for n in 0..200 {
        engine
            .delete_document(&WriteCtx::default(), &lib, &format!("d{n:05}"))
            .expect("delete");
    }
    let (before, _) = engine.index_status(&lib).expect("status");
    assert!(
        before.tombstones.unwrap_or(0) > 0,
        "deletes leave tombstones"
    );
    let seq = engine.applied_seq();
    assert!(engine.optimize_index(&lib).expect("optimize"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (st, _) = engine.index_status(&lib).expect("status");
        if !st.building {
            assert_eq!(
                st.tombstones,
                Some(0),
                "the rebuilt graph has no tombstones"
            );
            assert_eq!(st.graph_rows, Some(200));
            break;
        }
        assert!(Instant::now() < deadline, "the rebuild finishes");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(engine.applied_seq(), seq, "optimizing appends no record");
    let hits = search(&engine, &lib, &vs[300], 5, serde_json::Value::Null);
    assert_eq!(hits[0], "d00300");
    let flat = create(&engine, "opt-flat", None);
    assert!(!engine.optimize_index(&flat).expect("flat"));
}

/// The seqs of the snapshots in `data_dir`, oldest first.
fn snapshot_seqs(data_dir: &std::path::Path) -> Vec<u64> {
    let mut seqs: Vec<u64> = std::fs::read_dir(data_dir.join("snapshots"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter_map(|name| {
                    name.strip_prefix("snapshot-")?
                        .strip_suffix(".qsnap")?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default();
    seqs.sort_unstable();
    seqs
}

/// The replay bound: HNSW inserts cost far more to replay than their log bytes suggest, so a
/// snapshot follows once applying the records since the last one took
/// `snapshot_replay_ms_limit`, even when the byte and record rules are nowhere near.
#[test]
fn a_snapshot_follows_when_replay_would_take_too_long() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |replay_ms_limit: u64| {
        let mut c = EngineConfig::new(dir.path());
        c.snapshot_every_records = u64::MAX / 2;
        c.snapshot_min_log_bytes = u64::MAX / 2;
        c.snapshot_replay_ms_limit = replay_ms_limit;
        c
    };
    // The control: with the bound out of reach nothing triggers a snapshot (the loop looks
    // every 500 ms).
    let engine = Engine::open(config(u64::MAX)).expect("open");
    let lib = create(&engine, "graph", Some("hnsw"));
    fill(&engine, &lib, &vectors(21, 1000));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(snapshot_seqs(dir.path()), Vec::<u64>::new());
    engine.close().expect("close"); // writes the shutdown snapshot
    drop(engine);
    let at_close = snapshot_seqs(dir.path());
    assert_eq!(at_close.len(), 1);

    // With a 1 ms bound, a thousand graph inserts (tens of ms to apply) bring a snapshot at
    // the loop's next look.
    let engine = Engine::open(config(1)).expect("reopen");
    fill(&engine, &lib, &vectors(22, 1000));
    let want = engine.applied_seq();
    assert!(want > at_close[0]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while snapshot_seqs(dir.path()).last() != Some(&want) {
        assert!(
            Instant::now() < deadline,
            "no snapshot at seq {want}: {:?}",
            snapshot_seqs(dir.path())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
