//! `hnsw_links`: how many bits an HNSW graph's level-0 links need, and so how small an int8
//! index over that graph can be.
//!
//! This example owns one question from the HNSW issue: can an int8 index at 128 dimensions be
//! ≤ 30 % of the float index's memory? Codes are `dimension` bytes per row, so the answer rests
//! on the graph: its average level-0 degree (measured here) times the bits one link needs. It
//! reads a graph file written by `hnsw_bench --graph` (`bench/hnsw.sh --graph-file` leaves one
//! under `bench/data/<set>/`), then prices every row's level-0 list under three row orders —
//! the insertion order, a breadth-first order of the graph itself, and rows sorted by their
//! nearest of `--centroids` sampled base rows (neighbours in one cluster get near numbers) —
//! with three codes:
//!
//! - fixed width: `⌈log₂ rows⌉` bits per link (what the index stores today);
//! - Elias–Fano: `2 + ⌊log₂(rows / k)⌋` bits per link of a sorted list of `k`;
//! - Elias-γ on gaps: the list sorted, the first link coded relative to the row itself.
//!
//! Every figure is a lower bound for a real layout: list lengths, per-row addressing and the
//! cost of changing a compressed list on insert are not counted. It must never change the
//! graph; it only reads it. Single-threaded.
//!
//! Usage: `hnsw_links --graph F [--base F --dimension N] [--centroids 1024]`

mod common;

use common::read_le;
use quiver_index::{kernels, HnswIndex};
use std::collections::VecDeque;

/// Bits of the Elias-γ code of `value ≥ 1`.
fn gamma_bits(value: u64) -> u64 {
    debug_assert!(value >= 1);
    2 * u64::from(u64::BITS - value.leading_zeros()) - 1
}

/// Total bits of all lists under `order` (old row → new number): (fixed, Elias–Fano, γ gaps).
fn price(lists: &[Vec<u32>], order: &[u32]) -> (u64, u64, u64) {
    let rows = lists.len() as u64;
    let fixed_bits = u64::from(u64::BITS - rows.saturating_sub(1).leading_zeros());
    let (mut fixed, mut elias_fano, mut gaps) = (0u64, 0u64, 0u64);
    let mut sorted = Vec::new();
    for (row, list) in lists.iter().enumerate() {
        if list.is_empty() {
            continue;
        }
        let k = list.len() as u64;
        fixed += k * fixed_bits;
        elias_fano += k * (2 + u64::from((rows / k).ilog2()));
        sorted.clear();
        sorted.extend(list.iter().map(|&n| order[n as usize] as i64));
        sorted.sort_unstable();
        let me = order[row] as i64;
        let first = sorted[0] - me;
        let zigzag = if first >= 0 {
            2 * first
        } else {
            -2 * first - 1
        };
        gaps += gamma_bits(zigzag as u64 + 1);
        for pair in sorted.windows(2) {
            gaps += gamma_bits((pair[1] - pair[0]) as u64);
        }
    }
    (fixed, elias_fano, gaps)
}

/// Breadth-first numbering over the level-0 graph, from row 0 and then every unreached row.
fn bfs_order(lists: &[Vec<u32>]) -> Vec<u32> {
    let mut order = vec![u32::MAX; lists.len()];
    let mut next = 0u32;
    let mut queue = VecDeque::new();
    for start in 0..lists.len() {
        if order[start] != u32::MAX {
            continue;
        }
        order[start] = next;
        next += 1;
        queue.push_back(start as u32);
        while let Some(row) = queue.pop_front() {
            for &n in &lists[row as usize] {
                if order[n as usize] == u32::MAX {
                    order[n as usize] = next;
                    next += 1;
                    queue.push_back(n);
                }
            }
        }
    }
    order
}

/// Rows sorted by their nearest of `centroids` base rows taken at a fixed stride (ties by row).
fn cluster_order(base: &[f32], dimension: usize, centroids: usize) -> Vec<u32> {
    let rows = base.len() / dimension;
    let stride = (rows / centroids).max(1);
    let picks: Vec<&[f32]> = (0..rows)
        .step_by(stride)
        .take(centroids)
        .map(|r| &base[r * dimension..(r + 1) * dimension])
        .collect();
    let mut keyed: Vec<(u32, u32)> = base
        .chunks_exact(dimension)
        .enumerate()
        .map(|(row, v)| {
            let mut best = (f32::INFINITY, 0u32);
            for (c, centre) in picks.iter().enumerate() {
                let d = kernels::l2_squared(v, centre);
                if d < best.0 {
                    best = (d, c as u32);
                }
            }
            (best.1, row as u32)
        })
        .collect();
    keyed.sort_unstable();
    let mut order = vec![0u32; rows];
    for (number, &(_, row)) in keyed.iter().enumerate() {
        order[row as usize] = number as u32;
    }
    order
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let graph = get("--graph").expect("--graph FILE");
    let file = std::fs::File::open(&graph).unwrap_or_else(|e| panic!("open {graph}: {e}"));
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let index = HnswIndex::read_from(&mut reader).expect("read the graph file");
    let rows = index.slot_count();
    let mut lists = vec![Vec::new(); rows];
    for (row, list) in lists.iter_mut().enumerate() {
        index.level0_neighbours(row as u32, list);
    }
    let links: u64 = lists.iter().map(|l| l.len() as u64).sum();
    let capacity = index.params().m0;
    let mut degrees: Vec<usize> = lists.iter().map(Vec::len).collect();
    degrees.sort_unstable();
    let full = degrees.iter().filter(|&&d| d == capacity).count();
    let average = links as f64 / rows as f64;
    println!(
        "rows {rows}, dimension {}, quantized {}, memory_bytes {} ({:.1} B/row)",
        index.dimension(),
        index.is_quantized(),
        index.memory_bytes(),
        index.memory_bytes() as f64 / rows as f64
    );
    println!(
        "level-0 degree: average {average:.2} of {capacity} slots; p10 {} p50 {} p90 {}; full lists {:.1} %",
        degrees[rows / 10],
        degrees[rows / 2],
        degrees[rows * 9 / 10],
        100.0 * full as f64 / rows as f64
    );

    let mut orders: Vec<(&str, Vec<u32>)> = vec![
        ("insertion", (0..rows as u32).collect()),
        ("breadth-first", bfs_order(&lists)),
    ];
    if let (Some(base), Some(dimension)) = (get("--base"), get("--dimension")) {
        let dimension: usize = dimension.parse().expect("--dimension N");
        let centroids: usize = get("--centroids").map_or(1024, |c| c.parse().expect("N"));
        let base = read_le(&base, f32::from_le_bytes);
        assert_eq!(
            base.len() / dimension,
            rows,
            "--base must hold the graph's rows"
        );
        orders.push((
            "nearest-centroid",
            cluster_order(&base, dimension, centroids),
        ));
    }
    let mut best = f64::INFINITY;
    for (name, order) in &orders {
        let (fixed, elias_fano, gaps) = price(&lists, order);
        let per = |bits: u64| bits as f64 / links as f64;
        println!(
            "order {name:>16}: bits per link: fixed {:.2}, Elias-Fano {:.2}, gamma gaps {:.2}",
            per(fixed),
            per(elias_fano),
            per(gaps)
        );
        best = best.min(per(elias_fano)).min(per(gaps));
    }
    let link_bytes = average * best / 8.0;
    let dimension = index.dimension() as f64;
    println!(
        "best: {best:.2} bits per link = {link_bytes:.1} B of links per row; with nothing else \
         per row, int8 = {:.1} B/row and float = {:.1} B/row: ratio {:.1} %",
        dimension + link_bytes,
        4.0 * dimension + link_bytes,
        100.0 * (dimension + link_bytes) / (4.0 * dimension + link_bytes)
    );
}
