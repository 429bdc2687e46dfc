//! `flat_bench`: times `FlatIndex::search` one query at a time on vectors read from raw files.
//!
//! This example owns only the Rust half of `bench/flat_search.sh`: it loads a base file and a
//! query file of little-endian `f32` rows (written by `bench/flat_search.py`), inserts the base
//! rows with ids `0..rows`, runs every query once untimed-warm, then once timed, and prints
//! one JSON object on stdout (per-query latencies, median, p99 and the top-k ids) for the
//! Python side to compare with faiss.
//!
//! It must never print anything else on stdout (the JSON is parsed), and never run queries
//! concurrently: the benchmark measures single-threaded latency.
//!
//! Usage: `flat_bench --base FILE --queries FILE --dimension N [--k N] [--metric dot|cosine|l2]`

mod common;

use common::read_le;
use quiver_index::{kernels, FlatIndex, Metric};
use std::time::Instant;

struct Arguments {
    base_path: String,
    queries_path: String,
    dimension: usize,
    k: usize,
    metric: Metric,
    warmup_queries: usize,
}

fn parse_arguments() -> Arguments {
    let mut base_path = None;
    let mut queries_path = None;
    let mut dimension = None;
    let mut k = 10;
    let mut metric = Metric::Dot;
    let mut warmup_queries = 20;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("flag {flag} needs a value"));
        match flag.as_str() {
            "--base" => base_path = Some(value),
            "--queries" => queries_path = Some(value),
            "--dimension" => dimension = Some(value.parse().expect("--dimension: integer")),
            "--k" => k = value.parse().expect("--k: integer"),
            "--warmup" => warmup_queries = value.parse().expect("--warmup: integer"),
            "--metric" => {
                metric = match value.as_str() {
                    "dot" => Metric::Dot,
                    "cosine" => Metric::Cosine,
                    "l2" => Metric::L2,
                    other => panic!("unknown metric {other}"),
                }
            }
            other => panic!("unknown flag {other}"),
        }
    }
    Arguments {
        base_path: base_path.expect("--base is required"),
        queries_path: queries_path.expect("--queries is required"),
        dimension: dimension.expect("--dimension is required"),
        k,
        metric,
        warmup_queries,
    }
}

/// Reads a file of little-endian f32 rows of `dimension` components.
fn read_rows(path: &str, dimension: usize) -> Vec<f32> {
    let rows = read_le(path, f32::from_le_bytes);
    assert_eq!(rows.len() % dimension, 0, "{path}: not whole rows");
    rows
}

fn percentile_ms(sorted_ms: &[f64], fraction: f64) -> f64 {
    assert!(!sorted_ms.is_empty());
    // Nearest-rank: the smallest value with at least `fraction` of samples at or below it.
    let rank = (fraction * sorted_ms.len() as f64).ceil() as usize;
    sorted_ms[rank.clamp(1, sorted_ms.len()) - 1]
}

fn main() {
    let arguments = parse_arguments();
    let dimension = arguments.dimension;
    let base = read_rows(&arguments.base_path, dimension);
    let queries = read_rows(&arguments.queries_path, dimension);
    let rows = base.len() / dimension;

    let load_start = Instant::now();
    let mut index = FlatIndex::new(dimension, arguments.metric);
    index.reserve(rows);
    for (id, vector) in base.chunks_exact(dimension).enumerate() {
        index.insert(id as u64, vector);
    }
    let load_ms = load_start.elapsed().as_secs_f64() * 1e3;
    drop(base);

    for query in queries
        .chunks_exact(dimension)
        .take(arguments.warmup_queries)
    {
        std::hint::black_box(index.search(query, arguments.k, None, None));
    }

    let mut latencies_ms = Vec::new();
    let mut results = Vec::new();
    for query in queries.chunks_exact(dimension) {
        let start = Instant::now();
        let found = std::hint::black_box(index.search(query, arguments.k, None, None));
        latencies_ms.push(start.elapsed().as_secs_f64() * 1e3);
        results.push(found);
    }
    let mut sorted_ms = latencies_ms.clone();
    sorted_ms.sort_by(|a, b| a.partial_cmp(b).expect("latencies are finite"));

    let list = |values: Vec<String>| format!("[{}]", values.join(","));
    let latencies_json = list(latencies_ms.iter().map(|ms| format!("{ms:.6}")).collect());
    let ids_json = list(
        results
            .iter()
            .map(|found| list(found.iter().map(|(id, _)| id.to_string()).collect()))
            .collect(),
    );
    let distances_json = list(
        results
            .iter()
            .map(|found| list(found.iter().map(|(_, d)| format!("{d}")).collect()))
            .collect(),
    );
    println!(
        "{{\"backend\":\"{}\",\"metric\":\"{:?}\",\"rows\":{},\"dimension\":{},\"k\":{},\
         \"queries\":{},\"load_ms\":{:.3},\"memory_bytes\":{},\"median_ms\":{:.6},\
         \"p99_ms\":{:.6},\"latencies_ms\":{},\"ids\":{},\"distances\":{}}}",
        kernels::backend().name(),
        arguments.metric,
        rows,
        dimension,
        arguments.k,
        latencies_ms.len(),
        load_ms,
        index.memory_bytes(),
        percentile_ms(&sorted_ms, 0.5),
        percentile_ms(&sorted_ms, 0.99),
        latencies_json,
        ids_json,
        distances_json,
    );
}
