//! Integration tests of `HnswIndex`: recall against `FlatIndex` ground truth (before and after
//! churn, filtered at 50 % / 5 % / 0.1 % selectivity, int8 with rescoring), persistence round
//! trips and corrupt bytes, and concurrent search during inserts.
//!
//! Sizes: release builds use the 50k-vector set; debug builds (CI's `cargo test
//! --workspace`) use 10k so the file stays well under a minute, with the same assertions.

use std::sync::{Arc, RwLock};

use quiver_index::hnsw::Plan;
use quiver_index::{FlatIndex, HnswIndex, HnswParams, Metric, Quantization, VectorSource};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const K: usize = 10;

fn rows_for_recall() -> usize {
    if cfg!(debug_assertions) {
        10_000
    } else {
        50_000
    }
}

/// Clustered vectors with a low intrinsic dimension (like embeddings): a cluster centre plus
/// noise in a 16-dimensional latent space, projected to `dimension`, plus isotropic noise.
struct Clustered {
    centres: Vec<Vec<f32>>,
    projection: Vec<Vec<f32>>,
    dimension: usize,
}

impl Clustered {
    fn new(rng: &mut StdRng, dimension: usize) -> Self {
        let latent = 16;
        let centres = (0..100)
            .map(|_| (0..latent).map(|_| rng.gen_range(-1.0..1.0)).collect())
            .collect();
        let projection = (0..latent)
            .map(|_| (0..dimension).map(|_| rng.gen_range(-1.0..1.0)).collect())
            .collect();
        Clustered {
            centres,
            projection,
            dimension,
        }
    }

    fn sample(&self, rng: &mut StdRng, metric: Metric) -> Vec<f32> {
        let centre = &self.centres[rng.gen_range(0..self.centres.len())];
        let mut v: Vec<f32> = (0..self.dimension)
            .map(|_| rng.gen_range(-2.0..2.0))
            .collect();
        for (c, row) in centre.iter().zip(&self.projection) {
            let z = c + rng.gen_range(-0.5..0.5);
            for (x, w) in v.iter_mut().zip(row) {
                *x += z * w;
            }
        }
        if metric == Metric::Cosine {
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= n);
        }
        v
    }
}

struct Dataset {
    dimension: usize,
    metric: Metric,
    base: Vec<Vec<f32>>,
    queries: Vec<Vec<f32>>,
}

impl Dataset {
    fn new(seed: u64, rows: usize, queries: usize, dimension: usize, metric: Metric) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let model = Clustered::new(&mut rng, dimension);
        Dataset {
            dimension,
            metric,
            base: (0..rows).map(|_| model.sample(&mut rng, metric)).collect(),
            queries: (0..queries)
                .map(|_| model.sample(&mut rng, metric))
                .collect(),
        }
    }

    fn flat(&self) -> FlatIndex {
        let mut flat = FlatIndex::new(self.dimension, self.metric);
        for (id, v) in self.base.iter().enumerate() {
            flat.insert(id as u64, v);
        }
        flat
    }

    fn hnsw(&self, quantization: Quantization) -> HnswIndex {
        self.hnsw_with(HnswParams::default(), quantization)
    }

    fn hnsw_with(&self, params: HnswParams, quantization: Quantization) -> HnswIndex {
        let mut index = HnswIndex::new(self.dimension, self.metric, params, quantization);
        index.reserve(self.base.len());
        for (id, v) in self.base.iter().enumerate() {
            index.insert(id as u64, v);
        }
        index
    }
}

impl VectorSource for Dataset {
    fn vector(&self, id: u64) -> Option<&[f32]> {
        self.base.get(id as usize).map(|v| &v[..])
    }
}

/// Mean recall@K of `index` against exact search on `flat`, under `filter`.
fn recall(
    data: &Dataset,
    flat: &FlatIndex,
    index: &HnswIndex,
    filter: Option<&dyn Fn(u64) -> bool>,
    plan: Option<Plan>,
    source: Option<&dyn VectorSource>,
) -> f64 {
    let (mut hits, mut wanted) = (0usize, 0usize);
    for query in &data.queries {
        let truth = flat.search(query, K, None, filter);
        let found = index.search_planned(query, K, None, None, filter, source, plan);
        assert_eq!(
            found.len(),
            truth.len(),
            "k results whenever k rows match (or all matches when fewer)"
        );
        assert!(found.windows(2).all(|w| w[0].1 <= w[1].1), "ascending");
        if let Some(filter) = filter {
            assert!(found.iter().all(|(id, _)| filter(*id)), "filter honoured");
        }
        hits += found
            .iter()
            .filter(|(id, _)| truth.iter().any(|(t, _)| t == id))
            .count();
        wanted += truth.len();
    }
    hits as f64 / wanted as f64
}

#[test]
fn recall_before_and_after_deleting_and_reinserting_30_percent() {
    let data = Dataset::new(1, rows_for_recall(), 200, 32, Metric::Cosine);
    let flat = data.flat();
    let started = std::time::Instant::now();
    let mut index = data.hnsw(Quantization::None);
    let build = started.elapsed();
    index.assert_invariants();
    let before = recall(&data, &flat, &index, None, None, None);

    // Delete 30 % (random rows), check they vanish from results, then re-insert them.
    let mut rng = StdRng::seed_from_u64(2);
    let mut rows: Vec<u32> = (0..data.base.len() as u32).collect();
    let count = rows.len();
    for i in 0..count {
        rows.swap(i, rng.gen_range(i..count));
    }
    let removed: Vec<u32> = rows[..data.base.len() * 3 / 10].to_vec();
    let mut gone = vec![false; data.base.len()];
    for &row in &removed {
        index.remove(row);
        gone[row as usize] = true;
    }
    assert_eq!(index.tombstones(), removed.len());
    let mut partial = FlatIndex::new(data.dimension, data.metric);
    for (id, v) in data.base.iter().enumerate() {
        if !gone[id] {
            partial.insert(id as u64, v);
        }
    }
    let during = recall(&data, &partial, &index, None, None, None);
    for &row in &removed {
        // Row numbers equal ids here: they were inserted in order.
        let id = row as u64;
        let new_row = index.insert(id, &data.base[id as usize]);
        assert!(gone[new_row as usize], "a freed row is reused");
    }
    assert_eq!(index.tombstones(), 0);
    assert_eq!(index.len(), data.base.len());
    index.assert_invariants();
    let after = recall(&data, &flat, &index, None, None, None);
    eprintln!(
        "{} rows x {}: build {:.2?}, recall@10 before {before:.4}, with 30% deleted {during:.4}, \
         after re-inserting {after:.4}",
        data.base.len(),
        data.dimension,
        build
    );
    assert!(before >= 0.95, "recall before churn {before}");
    assert!(during >= 0.95, "recall with 30% tombstones {during}");
    assert!(after >= 0.95, "recall after churn {after}");
}

#[test]
fn filtered_recall_at_50_5_and_0_1_percent() {
    let data = Dataset::new(3, rows_for_recall(), 50, 32, Metric::L2);
    let flat = data.flat();
    let index = data.hnsw(Quantization::None);
    // Filters uncorrelated with position: a hash of the id.
    let hash = |id: u64| id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
    let selectivities = [(2u64, "50%"), (20, "5%"), (1000, "0.1%")];
    for (modulus, name) in selectivities {
        let filter = move |id: u64| hash(id) % modulus == 0;
        let filter: &dyn Fn(u64) -> bool = &filter;
        let matches = (0..data.base.len() as u64).filter(|&id| filter(id)).count();
        let plan = index.plan(HnswParams::default().ef_search, Some(filter));
        let planned = recall(&data, &flat, &index, Some(filter), None, None);
        let graph = recall(&data, &flat, &index, Some(filter), Some(Plan::Graph), None);
        let exact = recall(&data, &flat, &index, Some(filter), Some(Plan::Exact), None);
        // The planner's evidence: time per query of each plan at this selectivity.
        let time_plan = |plan: Plan| {
            let started = std::time::Instant::now();
            for query in &data.queries[..20] {
                index.search_planned(query, K, None, None, Some(filter), None, Some(plan));
            }
            started.elapsed() / 20
        };
        let (graph_time, exact_time) = (time_plan(Plan::Graph), time_plan(Plan::Exact));
        eprintln!(
            "filter {name} ({matches} matches): planner chose {plan:?}; recall@10 planned \
             {planned:.4}, graph {graph:.4}, exact {exact:.4}; per query graph {graph_time:.2?}, \
             exact {exact_time:.2?}"
        );
        assert!(planned >= 0.95, "{name}: planned recall {planned}");
        assert!(graph >= 0.95, "{name}: graph recall {graph}");
        assert_eq!(exact, 1.0, "{name}: exact plan is exact");
    }
    // The planner's rule at this size: 50 % traverses the graph, 0.1 % scans.
    let half = |id: u64| hash(id) % 2 == 0;
    let rare = |id: u64| hash(id) % 1000 == 0;
    assert_eq!(index.plan(64, Some(&half)), Plan::Graph);
    assert_eq!(index.plan(64, Some(&rare)), Plan::Exact);
    // Fewer matches than k: all of them come back, on either plan.
    let few = |id: u64| id == 7 || id == 70 || id == 700;
    for plan in [Plan::Graph, Plan::Exact] {
        let found = index.search_planned(
            &data.queries[0],
            K,
            None,
            None,
            Some(&few),
            None,
            Some(plan),
        );
        let mut ids: Vec<u64> = found.iter().map(|r| r.0).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![7, 70, 700]);
    }
}

#[test]
fn max_distance_and_small_k() {
    let data = Dataset::new(4, 2_000, 20, 16, Metric::L2);
    let flat = data.flat();
    let index = data.hnsw(Quantization::None);
    for query in &data.queries {
        let truth = flat.search(query, 50, None, None);
        let limit = truth[20].1;
        let found = index.search(query, 50, None, Some(limit), None, None);
        assert!(found.iter().all(|r| r.1 <= limit));
        assert!(found.len() <= 21 + 1);
        assert!(index.search(query, 0, None, None, None, None).is_empty());
        assert_eq!(index.search(query, 1, Some(1), None, None, None).len(), 1);
    }
}

#[test]
fn int8_recall_after_rescoring_and_memory() {
    let rows = if cfg!(debug_assertions) {
        5_000
    } else {
        20_000
    };
    let data = Dataset::new(5, rows, 100, 96, Metric::Cosine);
    let flat = data.flat();
    let float = data.hnsw(Quantization::None);
    let int8_of = |m0: usize| {
        let params = HnswParams {
            m0,
            ..HnswParams::default()
        };
        let index = data.hnsw_with(
            params,
            Quantization::Int8 {
                rescore: true,
                oversampling: 3.0,
            },
        );
        assert!(index.is_quantized());
        index.assert_invariants();
        index
    };
    let int8 = int8_of(2 * HnswParams::default().m);
    // The lean shape: a bottom layer of m links instead of 2m.
    let lean = int8_of(HnswParams::default().m);
    let float_recall = recall(&data, &flat, &float, None, None, None);
    let rescored = recall(&data, &flat, &int8, None, None, Some(&data));
    let lean_rescored = recall(&data, &flat, &lean, None, None, Some(&data));
    let unrescored = recall(&data, &flat, &int8, None, None, None);
    let (float_bytes, int8_bytes) = (float.memory_bytes(), int8.memory_bytes());
    let lean_bytes = lean.memory_bytes();
    let vector_bytes = rows * data.dimension * 4;
    eprintln!(
        "int8 {rows} x {}: recall@10 float {float_recall:.4}, int8 rescored {rescored:.4} \
         (m0 = m: {lean_rescored:.4}), int8 without originals {unrescored:.4}; memory float \
         {float_bytes} B, int8 {int8_bytes} B ({:.1}%), m0 = m {lean_bytes} B ({:.1}%), f32 \
         vectors alone {vector_bytes} B",
        data.dimension,
        100.0 * int8_bytes as f64 / float_bytes as f64,
        100.0 * lean_bytes as f64 / float_bytes as f64
    );
    assert!(rescored >= 0.95, "int8 rescored recall {rescored}");
    assert!(
        lean_rescored >= 0.95,
        "int8 m0 = m rescored recall {lean_rescored}"
    );
    // m links of `link_bits` fewer per row (less one 8-byte word: a row's links are padded to
    // whole words), and nothing else changes size.
    let links_saved = rows * (HnswParams::default().m * lean.link_bits() as usize / 8 - 8);
    assert!(
        int8_bytes - lean_bytes >= links_saved,
        "m0 = m saves {} B, want ≥ {links_saved}",
        int8_bytes - lean_bytes
    );
    // No f32 copy: at least 70 % of the float vectors' bytes are saved (codes are 25 %).
    assert!(
        float_bytes - int8_bytes >= vector_bytes * 7 / 10,
        "int8 must not hold an f32 copy"
    );
    // Rescored distances are exact: they match the flat index's.
    let query = &data.queries[0];
    let exact = flat.search(query, K, None, None);
    let found = int8.search(query, K, None, None, None, Some(&data));
    for (id, distance) in &found {
        if let Some((_, want)) = exact.iter().find(|(t, _)| t == id) {
            assert!((distance - want).abs() < 1e-5);
        }
    }
}

#[test]
fn persistence_round_trip_is_identical_and_corruption_is_an_error() {
    for (quantization, rows) in [
        (Quantization::None, 3_000),
        (
            Quantization::Int8 {
                rescore: true,
                oversampling: 2.0,
            },
            3_000,
        ),
    ] {
        let data = Dataset::new(6, rows, 30, 24, Metric::L2);
        let mut index = data.hnsw(quantization);
        for row in (0..rows as u32).step_by(7) {
            index.remove(row);
        }
        let mut bytes = Vec::new();
        index.write_to(&mut bytes).expect("write to a Vec");
        let loaded = HnswIndex::read_from(&mut &bytes[..]).expect("read back");
        loaded.assert_invariants();
        assert_eq!(loaded.len(), index.len());
        assert_eq!(loaded.tombstones(), index.tombstones());
        assert_eq!(loaded.params(), index.params());
        let filter = |id: u64| !id.is_multiple_of(3);
        for query in &data.queries {
            assert_eq!(
                loaded.search(query, K, None, None, None, Some(&data)),
                index.search(query, K, None, None, None, Some(&data))
            );
            assert_eq!(
                loaded.search(query, K, Some(20), None, Some(&filter), None),
                index.search(query, K, Some(20), None, Some(&filter), None)
            );
        }
        // Writing the loaded index gives the same bytes (upper blocks are written compacted).
        let mut again = Vec::new();
        loaded.write_to(&mut again).unwrap();
        assert_eq!(again, bytes);
        // The loaded index keeps working: inserts reuse rows, continue the level stream.
        let mut loaded = loaded;
        let mut original = index;
        for (id, v) in data.base.iter().enumerate().take(50) {
            assert_eq!(loaded.insert(id as u64, v), original.insert(id as u64, v));
        }

        // Truncation anywhere is an error.
        let mut rng = StdRng::seed_from_u64(7);
        let mut cuts: Vec<usize> = (0..40).collect();
        cuts.extend((0..200).map(|_| rng.gen_range(0..bytes.len())));
        for cut in cuts {
            assert!(
                HnswIndex::read_from(&mut &bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        // Random byte flips are caught (header checks or the checksum).
        for _ in 0..300 {
            let mut corrupt = bytes.clone();
            let at = rng.gen_range(0..corrupt.len());
            corrupt[at] ^= 1 << rng.gen_range(0..8);
            assert!(
                HnswIndex::read_from(&mut &corrupt[..]).is_err(),
                "flip at {at}"
            );
        }
        // Fuzz past the checksum: mutate the payload and fix the CRC, so validation itself is
        // exercised. Whatever happens, no panic; an accepted index passes its invariants and
        // can be searched.
        let payload_start = 24;
        let mut accepted = 0;
        for round in 0..400 {
            let mut corrupt = bytes.clone();
            let flips = 1 + round % 4;
            for _ in 0..flips {
                let at = rng.gen_range(payload_start..corrupt.len());
                corrupt[at] = rng.gen();
            }
            let crc = crc32c(&corrupt[payload_start..]);
            corrupt[20..24].copy_from_slice(&crc.to_le_bytes());
            if let Ok(index) = HnswIndex::read_from(&mut &corrupt[..]) {
                accepted += 1;
                let _ = index.search(&data.queries[0], K, None, None, None, None);
            }
        }
        eprintln!("fuzzed payloads accepted (valid by construction): {accepted}/400");
        // A foreign stream.
        assert!(HnswIndex::read_from(&mut &b"not an index at all, sorry"[..]).is_err());
        assert!(HnswIndex::read_from(&mut &[][..]).is_err());
    }
}

/// CRC32C (Castagnoli), bitwise: the test's own reference, independent of the crate.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn concurrent_searches_while_inserting() {
    let data = Arc::new(Dataset::new(8, 6_000, 50, 32, Metric::Cosine));
    let index = Arc::new(RwLock::new(HnswIndex::new(
        32,
        Metric::Cosine,
        HnswParams::default(),
        Quantization::None,
    )));
    {
        let mut index = index.write().unwrap();
        for (id, v) in data.base.iter().enumerate().take(1_000) {
            index.insert(id as u64, v);
        }
    }
    let writer = {
        let (data, index) = (Arc::clone(&data), Arc::clone(&index));
        std::thread::spawn(move || {
            for (id, v) in data.base.iter().enumerate().skip(1_000) {
                index.write().unwrap().insert(id as u64, v);
            }
        })
    };
    let readers: Vec<_> = (0..3)
        .map(|t| {
            let (data, index) = (Arc::clone(&data), Arc::clone(&index));
            std::thread::spawn(move || {
                let mut searches = 0;
                let filter = |id: u64| id & 1 == 0;
                loop {
                    let query = &data.queries[searches % data.queries.len()];
                    let guard = index.read().unwrap();
                    let live = guard.len();
                    let found = if t == 0 {
                        guard.search(query, K, None, None, Some(&filter), None)
                    } else {
                        guard.search(query, K, None, None, None, None)
                    };
                    drop(guard);
                    assert_eq!(found.len(), K.min(live));
                    assert!(found.windows(2).all(|w| w[0].1 <= w[1].1));
                    searches += 1;
                    if live == data.base.len() && searches > 100 {
                        return searches;
                    }
                }
            })
        })
        .collect();
    writer.join().expect("writer");
    for reader in readers {
        let searches = reader.join().expect("reader");
        assert!(searches > 100);
    }
    let index = index.read().unwrap();
    assert_eq!(index.len(), data.base.len());
    index.assert_invariants();
}
