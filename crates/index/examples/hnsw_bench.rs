//! `hnsw_bench`: builds an `HnswIndex` from raw files and sweeps `ef`, single-threaded.
//!
//! This example owns only the Rust half of `bench/hnsw.sh`: it loads base and query files of
//! little-endian `f32` rows and a ground-truth file of little-endian `u32` ids (`k` per query,
//! written by `bench/hnsw_peers.py`), inserts the base rows with ids `0..rows` one at a time
//! (timed: the build), round-trips the index through `write_to`/`read_from` (timed), prints
//! one JSON line (build, memory, persistence), then serves sweeps: for each stdin line
//! `ef N` it runs every query once, one at a time, and prints `{ef, recall, qps}` as a JSON
//! line, so the Python side can interleave engines query pass by query pass.
//!
//! It must never print anything else on stdout (the JSON is parsed) and never use more than
//! one thread: the benchmark compares single-threaded build and search.
//!
//! With `--graph FILE`, the index is written to that file and read back from it (start-up
//! from disk, timed with the checksum and full validation of `read_from`); if the file already
//! exists, the build is skipped and the index is only read from it (`build_seconds` is then
//! `null`), which is how the start-up time of a large index is measured on its own.
//!
//! Usage: `hnsw_bench --base F --queries F --truth F --dimension N --metric cosine|l2
//!         [--k 10] [--m 16] [--m0 2m] [--ef-construction 200] [--int8 OVERSAMPLING]
//!         [--no-rescore] [--graph FILE]`

mod common;

use common::read_le;
use quiver_index::{HnswIndex, HnswParams, Metric, Quantization, VectorSource};
use std::io::{BufRead, Write};
use std::time::Instant;

struct Rows {
    data: Vec<f32>,
    dimension: usize,
}

impl VectorSource for Rows {
    fn vector(&self, id: u64) -> Option<&[f32]> {
        let start = (id as usize).checked_mul(self.dimension)?;
        self.data.get(start..start + self.dimension)
    }
}

/// Asserts a loaded index answers a probe exactly as the built one.
fn check_same(loaded: &HnswIndex, built: &HnswIndex, probe: &[f32], k: usize, base: &Rows) {
    assert_eq!(
        loaded.search(probe, k, None, None, None, Some(base)),
        built.search(probe, k, None, None, None, Some(base)),
        "the loaded index answers differently"
    );
}

fn main() {
    let mut flags = std::collections::HashMap::new();
    let mut switches = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--no-rescore" {
            switches.push(flag);
            continue;
        }
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        flags.insert(flag, value);
    }
    let get = |name: &str| flags.get(name).cloned();
    let required = |name: &str| get(name).unwrap_or_else(|| panic!("{name} is required"));
    let dimension: usize = required("--dimension").parse().expect("--dimension");
    let metric = match required("--metric").as_str() {
        "cosine" => Metric::Cosine,
        "l2" => Metric::L2,
        "dot" => Metric::Dot,
        other => panic!("unknown metric {other}"),
    };
    let k: usize = get("--k").map_or(10, |v| v.parse().expect("--k"));
    let mut params = HnswParams::with_m(
        get("--m").map_or(16, |v| v.parse().expect("--m")),
        get("--ef-construction").map_or(200, |v| v.parse().expect("--efc")),
        64,
    );
    if let Some(m0) = get("--m0") {
        params.m0 = m0.parse().expect("--m0");
    }
    params.validate().expect("graph parameters");
    let quantization = match get("--int8") {
        Some(oversampling) => Quantization::Int8 {
            rescore: !switches.iter().any(|s| s == "--no-rescore"),
            oversampling: oversampling.parse().expect("--int8 oversampling"),
        },
        None => Quantization::None,
    };

    let base = Rows {
        data: read_le(&required("--base"), f32::from_le_bytes),
        dimension,
    };
    let queries = read_le(&required("--queries"), f32::from_le_bytes);
    let truth = read_le(&required("--truth"), u32::from_le_bytes);
    let rows = base.data.len() / dimension;
    let query_count = queries.len() / dimension;
    let truth_k = truth.len() / query_count;
    assert!(
        truth_k >= k,
        "ground truth has {truth_k} per query, need {k}"
    );

    let graph = get("--graph").map(std::path::PathBuf::from);
    let prebuilt = graph.as_ref().is_some_and(|path| path.exists());
    let (index, build_seconds, save_seconds, saved_bytes) = if prebuilt {
        (None, None, 0.0, 0)
    } else {
        let mut index = HnswIndex::new(dimension, metric, params, quantization);
        index.reserve(rows);
        let started = Instant::now();
        for (id, vector) in base.data.chunks_exact(dimension).enumerate() {
            index.insert(id as u64, vector);
        }
        let build_seconds = started.elapsed().as_secs_f64();
        // Persistence: to the graph file, or to memory (what a start-up from a snapshot
        // does, minus the disk).
        let started = Instant::now();
        let mut saved = Vec::new();
        index.write_to(&mut saved).expect("write to memory");
        if let Some(path) = &graph {
            std::fs::write(path, &saved).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
        }
        let save_seconds = started.elapsed().as_secs_f64();
        let saved_bytes = saved.len();
        if graph.is_none() {
            let started = Instant::now();
            let loaded = HnswIndex::read_from(&mut &saved[..]).expect("read back");
            let load_seconds = started.elapsed().as_secs_f64();
            drop(saved);
            check_same(&loaded, &index, &queries[..dimension], k, &base);
            (
                Some((index, load_seconds)),
                Some(build_seconds),
                save_seconds,
                saved_bytes,
            )
        } else {
            (
                Some((index, 0.0)),
                Some(build_seconds),
                save_seconds,
                saved_bytes,
            )
        }
    };
    // From a graph file: open, read, checksum, validate every field and invariant.
    let (index, load_seconds) = match (&graph, index) {
        (Some(path), built) => {
            let started = Instant::now();
            let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
            let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
            let loaded = HnswIndex::read_from(&mut reader).expect("read the graph file");
            let load_seconds = started.elapsed().as_secs_f64();
            if let Some((built, _)) = built {
                check_same(&loaded, &built, &queries[..dimension], k, &base);
            }
            (loaded, load_seconds)
        }
        (None, Some(built)) => built,
        (None, None) => unreachable!("no graph file means a build"),
    };
    let memory_bytes = index.memory_bytes();
    let saved_bytes = if prebuilt {
        graph
            .as_ref()
            .and_then(|path| std::fs::metadata(path).ok())
            .map_or(0, |m| m.len() as usize)
    } else {
        saved_bytes
    };
    let build_seconds = build_seconds.map_or("null".to_string(), |s| format!("{s:.3}"));

    println!(
        "{{\"engine\":\"quiver\",\"backend\":\"{}\",\"rows\":{rows},\"link_bits\":{},\"build_seconds\":{build_seconds},\"memory_bytes\":{memory_bytes},\"saved_bytes\":{saved_bytes},\"save_seconds\":{save_seconds:.3},\"load_seconds\":{load_seconds:.3},\"quantized\":{}}}",
        quiver_index::kernels::backend().name(),
        index.link_bits(),
        index.is_quantized(),
    );
    std::io::stdout().flush().expect("flush stdout");

    // Serve sweeps: one line `ef N` in, one JSON line out (all queries once, one at a time).
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("read stdin");
        let Some(ef) = line.strip_prefix("ef ") else {
            break;
        };
        let ef: usize = ef.trim().parse().expect("ef N");
        let started = Instant::now();
        let mut hits = 0usize;
        for (q, query) in queries.chunks_exact(dimension).enumerate() {
            let found = index.search(query, k, Some(ef), None, None, Some(&base));
            let want = &truth[q * truth_k..q * truth_k + k];
            hits += found
                .iter()
                .filter(|(id, _)| want.contains(&(*id as u32)))
                .count();
        }
        let qps = query_count as f64 / started.elapsed().as_secs_f64();
        let recall = hits as f64 / (query_count * k) as f64;
        println!("{{\"ef\":{ef},\"recall\":{recall:.5},\"qps\":{qps:.1}}}");
        std::io::stdout().flush().expect("flush stdout");
    }
}
