//! [`FlatIndex`]: exact search over vectors stored contiguously, row after row.
//!
//! This module owns the storage layout of an index (one `Vec<f32>` of `rows × dimension`
//! floats, row-major, plus the caller id and a live flag per row), the reuse of deleted rows
//! (tombstone + LIFO free list), and the exact scan behind [`FlatIndex::search`].
//!
//! The scan walks rows strictly in memory order (the access pattern hardware prefetchers
//! serve best; the scan is memory-bound) with the kernel inlined into one AVX2 loop; each
//! distance is compared with the heap's current worst before the heap is touched, so the heap
//! costs nothing once it is full of good results. The filter runs *during* the scan, before a row's distance is computed, so a
//! filtered search is exactly the top-k of the matching rows (no post-filter shortfall).
//!
//! It must never reorder or compact rows behind the caller's back (a row number, once
//! returned by [`FlatIndex::insert`], names that vector until [`FlatIndex::remove`]), never
//! lock (the engine wraps the index in its own `RwLock`; `search(&self)` is read-only and runs
//! concurrently), and never accept a malformed vector: dimension and finiteness are asserted,
//! because the engine validates first and a bad vector here is a bug, not user input.
//!
//! Internally every metric is ranked by a *key* that orders like the reported distance but is
//! cheaper: `−dot` for Cosine and Dot, the squared distance for L2. Keys become distances
//! (`1 + key`, `key`, `sqrt(key)`) only when a row is about to be kept, and at the end.

use crate::kernels::{self, Backend};
use crate::topk::{TopK, TOPK_LIMIT};
use crate::{Metric, DIMENSION_LIMIT};

/// Rows are addressed by `u32`; one index holds at most this many (live + tombstoned) rows.
pub const ROW_LIMIT: usize = u32::MAX as usize;

/// Exact (brute-force) vector index. See the module docs for layout and invariants.
#[derive(Clone, Debug)]
pub struct FlatIndex {
    dimension: usize,
    metric: Metric,
    /// `ids.len() × dimension` floats; row `r` is `vectors[r·dimension .. (r+1)·dimension]`.
    vectors: Vec<f32>,
    /// Caller id of each row, live or not (a tombstoned row keeps its stale id).
    ids: Vec<u64>,
    /// Whether each row is live. `live.len() == ids.len()`.
    live: Vec<bool>,
    /// Tombstoned rows awaiting reuse, most recently freed last. Each appears once.
    free_rows: Vec<u32>,
    /// Number of `true` entries in `live`.
    live_count: usize,
}

impl FlatIndex {
    /// An empty index. Asserts `1 <= dimension <= DIMENSION_LIMIT`.
    pub fn new(dimension: usize, metric: Metric) -> Self {
        assert!(
            (1..=DIMENSION_LIMIT).contains(&dimension),
            "FlatIndex: dimension {dimension} outside 1..={DIMENSION_LIMIT}"
        );
        FlatIndex {
            dimension,
            metric,
            vectors: Vec::new(),
            ids: Vec::new(),
            live: Vec::new(),
            free_rows: Vec::new(),
            live_count: 0,
        }
    }

    /// The number of components of every vector in this index.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// The metric search ranks by.
    pub fn metric(&self) -> Metric {
        self.metric
    }

    /// Live rows.
    pub fn len(&self) -> usize {
        self.live_count
    }

    /// True when no row is live.
    pub fn is_empty(&self) -> bool {
        self.live_count == 0
    }

    /// Row slots ever allocated (live + tombstoned); valid row numbers are `0..slot_count()`.
    pub fn slot_count(&self) -> usize {
        self.ids.len()
    }

    /// Bytes held by this index's heap allocations, by capacity (what the allocator gave us,
    /// not what is in use), plus the struct itself.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.vectors.capacity() * std::mem::size_of::<f32>()
            + self.ids.capacity() * std::mem::size_of::<u64>()
            + self.live.capacity() * std::mem::size_of::<bool>()
            + self.free_rows.capacity() * std::mem::size_of::<u32>()
    }

    /// Reserves room for `additional_rows` more rows beyond the current slots, so a bulk
    /// load allocates once instead of doubling its way up.
    pub fn reserve(&mut self, additional_rows: usize) {
        let rows = self.ids.len().saturating_add(additional_rows);
        assert!(rows <= ROW_LIMIT, "FlatIndex: reserve beyond ROW_LIMIT");
        let additional_floats = additional_rows
            .checked_mul(self.dimension)
            .expect("FlatIndex: reserve overflows usize");
        self.vectors.reserve(additional_floats);
        self.ids.reserve(additional_rows);
        self.live.reserve(additional_rows);
    }

    /// Stores `vector` under caller id `id` and returns its row. A tombstoned row is reused if
    /// there is one (the most recently freed first), otherwise a row is appended.
    ///
    /// Panics if `vector.len() != dimension`, if a component is not finite, or if the index
    /// already holds [`ROW_LIMIT`] rows: the caller validates first. The index does not check
    /// that `id` is unique; that is the caller's mapping to keep.
    pub fn insert(&mut self, id: u64, vector: &[f32]) -> u32 {
        assert_eq!(
            vector.len(),
            self.dimension,
            "FlatIndex::insert: dimension mismatch"
        );
        assert!(
            vector.iter().all(|x| x.is_finite()),
            "FlatIndex::insert: non-finite component"
        );
        let row = if let Some(row) = self.free_rows.pop() {
            let index = row as usize;
            assert!(!self.live[index], "free list holds a live row");
            self.row_mut(row).copy_from_slice(vector);
            self.ids[index] = id;
            self.live[index] = true;
            row
        } else {
            assert!(self.ids.len() < ROW_LIMIT, "FlatIndex: ROW_LIMIT reached");
            let row = self.ids.len() as u32;
            self.vectors.extend_from_slice(vector);
            self.ids.push(id);
            self.live.push(true);
            row
        };
        self.live_count += 1;
        debug_assert_eq!(self.vectors.len(), self.ids.len() * self.dimension);
        debug_assert!(self.live_count <= self.ids.len());
        row
    }

    /// Tombstones `row` and queues its slot for reuse. Removing an already-removed row is a
    /// no-op. Panics if `row` was never allocated.
    pub fn remove(&mut self, row: u32) {
        let index = row as usize;
        assert!(
            index < self.ids.len(),
            "FlatIndex::remove: row {row} out of range"
        );
        if self.live[index] {
            self.live[index] = false;
            self.live_count -= 1;
            self.free_rows.push(row);
        }
        debug_assert_eq!(self.free_rows.len() + self.live_count, self.ids.len());
    }

    /// The caller id and vector of a live row; `None` for a tombstoned or unknown row.
    pub fn get(&self, row: u32) -> Option<(u64, &[f32])> {
        let index = row as usize;
        if index < self.ids.len() && self.live[index] {
            Some((self.ids[index], self.row(row)))
        } else {
            None
        }
    }

    /// Every live row as `(row, id, vector)`, in row order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u64, &[f32])> + '_ {
        self.live
            .iter()
            .zip(&self.ids)
            .zip(self.vectors.chunks_exact(self.dimension))
            .enumerate()
            .filter(|(_, ((live, _), _))| **live)
            .map(|(row, ((_, id), vector))| (row as u32, *id, vector))
    }

    /// Exact k-nearest search.
    ///
    /// Returns up to `k` `(id, distance)` pairs ascending by distance (ties by id ascending),
    /// taken only from live rows for which `filter(id)` holds (all rows when `None`) and, when
    /// `max_distance` is given, whose distance is `<= max_distance`. For Cosine the query is
    /// normalised here (a zero query is left as is, so every distance is 1).
    ///
    /// Panics if `query.len() != dimension`, a query component is not finite, `max_distance`
    /// is NaN, or `k > TOPK_LIMIT`. `k == 0` returns nothing.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        max_distance: Option<f32>,
        filter: Option<&dyn Fn(u64) -> bool>,
    ) -> Vec<(u64, f32)> {
        self.search_with(kernels::backend(), query, k, max_distance, filter)
    }

    /// [`FlatIndex::search`] on a chosen kernel backend (tests run every available one).
    pub(crate) fn search_with(
        &self,
        backend: Backend,
        query: &[f32],
        k: usize,
        max_distance: Option<f32>,
        filter: Option<&dyn Fn(u64) -> bool>,
    ) -> Vec<(u64, f32)> {
        assert_eq!(
            query.len(),
            self.dimension,
            "FlatIndex::search: dimension mismatch"
        );
        assert!(
            query.iter().all(|x| x.is_finite()),
            "FlatIndex::search: non-finite query component"
        );
        assert!(
            k <= TOPK_LIMIT,
            "FlatIndex::search: k {k} exceeds TOPK_LIMIT"
        );
        assert!(
            !max_distance.is_some_and(f32::is_nan),
            "FlatIndex::search: NaN max_distance"
        );
        if k == 0 || self.live_count == 0 {
            return Vec::new();
        }

        let normalised: Vec<f32>;
        let query = if self.metric == Metric::Cosine {
            let length = kernels::dot_with(backend, query, query).sqrt();
            if length > 0.0 {
                normalised = query.iter().map(|x| x / length).collect();
                &normalised[..]
            } else {
                query
            }
        } else {
            query
        };

        let mut topk = TopK::new(k.min(self.live_count));
        let scan = Scan {
            index: self,
            query,
            max_distance,
            filter,
        };
        match backend {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx2Fma` and `Avx512` only exist after the CPU reported AVX2 and FMA
            // (the flat scan has no AVX-512 path of its own).
            Backend::Avx2Fma | Backend::Avx512 => unsafe { scan_avx2(&scan, &mut topk) },
            _ => {
                // SAFETY: the portable kernels have no CPU requirement.
                unsafe { scan.run::<PortableRows>(&mut topk) }
            }
        }

        let results: Vec<(u64, f32)> = topk
            .into_sorted_vec()
            .into_iter()
            .map(|(key, id)| (id, distance_of_key(self.metric, key)))
            .collect();
        debug_assert!(results.len() <= k);
        results
    }

    /// Checks every structural invariant; O(rows). For tests and the engine's debug checks.
    pub fn assert_invariants(&self) {
        assert!((1..=DIMENSION_LIMIT).contains(&self.dimension));
        assert!(self.ids.len() <= ROW_LIMIT);
        assert_eq!(self.vectors.len(), self.ids.len() * self.dimension);
        assert_eq!(self.live.len(), self.ids.len());
        let live = self.live.iter().filter(|l| **l).count();
        assert_eq!(live, self.live_count);
        assert_eq!(self.free_rows.len(), self.ids.len() - self.live_count);
        let mut seen = vec![false; self.ids.len()];
        for &row in &self.free_rows {
            let index = row as usize;
            assert!(index < self.ids.len(), "free row out of range");
            assert!(!self.live[index], "free row is live");
            assert!(!seen[index], "free row listed twice");
            seen[index] = true;
        }
        for (_, _, vector) in self.iter() {
            assert!(vector.iter().all(|x| x.is_finite()));
        }
    }

    #[inline]
    fn row(&self, row: u32) -> &[f32] {
        let start = row as usize * self.dimension;
        &self.vectors[start..start + self.dimension]
    }

    fn row_mut(&mut self, row: u32) -> &mut [f32] {
        let start = row as usize * self.dimension;
        &mut self.vectors[start..start + self.dimension]
    }
}

/// The reported distance of an internal ranking key (see the module docs).
#[inline]
fn distance_of_key(metric: Metric, key: f32) -> f32 {
    match metric {
        Metric::Cosine => 1.0 + key,
        Metric::Dot => key,
        Metric::L2 => key.sqrt(),
    }
}

/// Distance kernels as the scan needs them.
///
/// # Safety
/// Implementations may require CPU features; callers must only use one that the CPU has.
trait RowKernels {
    unsafe fn dot(q: &[f32], row: &[f32]) -> f32;
    unsafe fn l2_squared(q: &[f32], row: &[f32]) -> f32;
}

struct PortableRows;

impl RowKernels for PortableRows {
    #[inline(always)]
    unsafe fn dot(q: &[f32], row: &[f32]) -> f32 {
        kernels::portable::dot(q, row)
    }
    #[inline(always)]
    unsafe fn l2_squared(q: &[f32], row: &[f32]) -> f32 {
        kernels::portable::l2_squared(q, row)
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx2Rows;

#[cfg(target_arch = "x86_64")]
impl RowKernels for Avx2Rows {
    #[inline(always)]
    unsafe fn dot(q: &[f32], row: &[f32]) -> f32 {
        kernels::avx2::dot(q, row)
    }
    #[inline(always)]
    unsafe fn l2_squared(q: &[f32], row: &[f32]) -> f32 {
        kernels::avx2::l2_squared(q, row)
    }
}

/// The whole scan compiled with AVX2+FMA enabled, so the generic scan and the kernel inline
/// into one loop with no call or dispatch per row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scan_avx2(scan: &Scan<'_>, topk: &mut TopK) {
    scan.run::<Avx2Rows>(topk)
}

/// One query's scan over one index.
struct Scan<'a> {
    index: &'a FlatIndex,
    /// Already normalised for Cosine.
    query: &'a [f32],
    max_distance: Option<f32>,
    filter: Option<&'a dyn Fn(u64) -> bool>,
}

impl Scan<'_> {
    /// Feeds every live, filter-matching row to `topk`.
    ///
    /// # Safety
    /// `K` must be runnable on this CPU.
    #[inline(always)]
    unsafe fn run<K: RowKernels>(&self, topk: &mut TopK) {
        // One copy of the loop per metric family, so the loop body has no metric branch.
        if self.index.metric == Metric::L2 {
            self.run_metric::<K, true>(topk)
        } else {
            self.run_metric::<K, false>(topk)
        }
    }

    /// Rows are visited strictly in memory order, one at a time. A fused kernel that
    /// interleaves four rows (loading each query chunk once) was measured ~1.5× slower at
    /// 100k × 384 on the benchmark machine (AMD EPYC, data ≫ L3): four interleaved streams
    /// 1.5 KB apart defeat the hardware prefetcher, and this scan is memory-bound, not
    /// FMA-bound, so the saved query loads buy nothing.
    #[inline(always)]
    unsafe fn run_metric<K: RowKernels, const L2: bool>(&self, topk: &mut TopK) {
        let index = self.index;
        let rows = index
            .live
            .iter()
            .zip(&index.ids)
            .zip(index.vectors.chunks_exact(index.dimension));
        for ((live, id), row) in rows {
            if !*live {
                continue;
            }
            if let Some(filter) = self.filter {
                if !filter(*id) {
                    continue;
                }
            }
            let key = if L2 {
                K::l2_squared(self.query, row)
            } else {
                -K::dot(self.query, row)
            };
            self.offer(topk, key, *id);
        }
    }

    /// Offers one computed row to the heap: cheap rejection against the current worst first,
    /// then the distance threshold, then the heap.
    #[inline(always)]
    fn offer(&self, topk: &mut TopK, key: f32, id: u64) {
        // `<=` lets an equal key with a smaller id displace the worst; NaN fails it. Keys are
        // never NaN past this point, so neither are distances.
        if key <= topk.worst_distance() {
            if let Some(max_distance) = self.max_distance {
                let distance = distance_of_key(self.index.metric, key);
                if distance > max_distance {
                    return;
                }
            }
            topk.push(key, id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const METRICS: [Metric; 3] = [Metric::Cosine, Metric::Dot, Metric::L2];

    /// The reported distance computed naively in f64.
    fn reference_distance(metric: Metric, query: &[f32], vector: &[f32]) -> f64 {
        match metric {
            Metric::Cosine => {
                let length: f64 = query
                    .iter()
                    .map(|&x| x as f64 * x as f64)
                    .sum::<f64>()
                    .sqrt();
                let dot: f64 = query
                    .iter()
                    .zip(vector)
                    .map(|(&x, &y)| x as f64 * y as f64)
                    .sum();
                1.0 - if length > 0.0 { dot / length } else { dot }
            }
            Metric::Dot => -query
                .iter()
                .zip(vector)
                .map(|(&x, &y)| x as f64 * y as f64)
                .sum::<f64>(),
            Metric::L2 => query
                .iter()
                .zip(vector)
                .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
                .sum::<f64>()
                .sqrt(),
        }
    }

    /// Brute force: every live matching row, sorted by (distance, id), thresholded, cut at k.
    fn reference_search(
        index: &FlatIndex,
        query: &[f32],
        k: usize,
        max_distance: Option<f64>,
        filter: Option<&dyn Fn(u64) -> bool>,
    ) -> Vec<(u64, f64)> {
        let mut all: Vec<(u64, f64)> = index
            .iter()
            .filter(|(_, id, _)| filter.is_none() || filter.is_some_and(|f| f(*id)))
            .map(|(_, id, vector)| (id, reference_distance(index.metric(), query, vector)))
            .filter(|(_, distance)| {
                max_distance.is_none() || max_distance.is_some_and(|m| *distance <= m)
            })
            .collect();
        all.sort_by(|a, b| a.1.partial_cmp(&b.1).unwrap().then(a.0.cmp(&b.0)));
        all.truncate(k);
        all
    }

    fn normalised(mut vector: Vec<f32>) -> Vec<f32> {
        let length = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        for x in &mut vector {
            *x /= length;
        }
        vector
    }

    fn random_vector(rng: &mut impl Rng, dimension: usize, metric: Metric) -> Vec<f32> {
        let vector: Vec<f32> = (0..dimension)
            .map(|_| rng.gen_range(-1.0f32..1.0))
            .collect();
        if metric == Metric::Cosine {
            normalised(vector)
        } else {
            vector
        }
    }

    /// Integer components: every dot and squared distance is exact in f32, so results can be
    /// compared for exact equality, ties (frequent here) included.
    fn integer_vector(rng: &mut impl Rng, dimension: usize) -> Vec<f32> {
        (0..dimension)
            .map(|_| rng.gen_range(-2..=2) as f32)
            .collect()
    }

    /// Float results: the i-th distance equals the reference's i-th within `tolerance`, every
    /// returned id is a legitimate match whose own reference distance agrees, and ids agree
    /// wherever the reference has no near-tie.
    fn assert_close(
        index: &FlatIndex,
        query: &[f32],
        got: &[(u64, f32)],
        want: &[(u64, f64)],
        tolerance: f64,
    ) {
        assert_eq!(got.len(), want.len(), "result count");
        let by_id: std::collections::HashMap<u64, &[f32]> =
            index.iter().map(|(_, id, vector)| (id, vector)).collect();
        let every: Vec<(u64, f64)> = by_id
            .iter()
            .map(|(&id, vector)| (id, reference_distance(index.metric(), query, vector)))
            .collect();
        for (i, (&(got_id, got_distance), &(want_id, want_distance))) in
            got.iter().zip(want).enumerate()
        {
            assert!(
                (got_distance as f64 - want_distance).abs() <= tolerance,
                "rank {i}: {got_distance} vs {want_distance}"
            );
            let own = reference_distance(index.metric(), query, by_id[&got_id]);
            assert!((got_distance as f64 - own).abs() <= tolerance);
            // Any row (matching or not) this close could legitimately swap places.
            let near_tie = every
                .iter()
                .any(|&(id, d)| id != want_id && (d - want_distance).abs() <= 2.0 * tolerance);
            if !near_tie {
                assert_eq!(got_id, want_id, "rank {i}");
            }
        }
        for pair in got.windows(2) {
            assert!(
                pair[0].1 < pair[1].1 || (pair[0].1 == pair[1].1 && pair[0].0 < pair[1].0),
                "results not ascending"
            );
        }
    }

    fn build(rng: &mut impl Rng, dimension: usize, metric: Metric, rows: usize) -> FlatIndex {
        let mut index = FlatIndex::new(dimension, metric);
        for id in 0..rows as u64 {
            // Ids are not row numbers: shuffle them through a multiplier.
            let row = index.insert(id * 31 + 5, &random_vector(rng, dimension, metric));
            assert_eq!(row as u64, id);
        }
        index
    }

    #[test]
    fn float_search_matches_brute_force() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let by_seven = |id: u64| matches!(id % 7, 0);
        for backend in Backend::available() {
            for metric in METRICS {
                for dimension in [1, 3, 8, 17, 64, 384] {
                    let rows = rng.gen_range(0..400);
                    let index = build(&mut rng, dimension, metric, rows);
                    index.assert_invariants();
                    for _ in 0..4 {
                        let query = random_vector(&mut rng, dimension, metric);
                        let tolerance = 1e-5 * (dimension as f64 + 1.0);
                        for k in [1, 5, 10, 50, 1000] {
                            for filter in [None, Some(&by_seven as &dyn Fn(u64) -> bool)] {
                                let got = index.search_with(backend, &query, k, None, filter);
                                let want = reference_search(&index, &query, k, None, filter);
                                assert_close(&index, &query, &got, &want, tolerance);
                            }
                        }
                        // A threshold halfway between two reference distances, so rounding
                        // cannot move a row across it.
                        let all = reference_search(&index, &query, usize::MAX, None, None);
                        if all.len() >= 2 {
                            let cut = rng.gen_range(0..all.len() - 1);
                            let threshold = (all[cut].1 + all[cut + 1].1) / 2.0;
                            if all[cut + 1].1 - all[cut].1 > 4.0 * tolerance {
                                let got = index.search_with(
                                    backend,
                                    &query,
                                    20,
                                    Some(threshold as f32),
                                    None,
                                );
                                let want =
                                    reference_search(&index, &query, 20, Some(threshold), None);
                                assert_close(&index, &query, &got, &want, tolerance);
                                assert!(got.iter().all(|(_, d)| (*d as f64) <= threshold));
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn integer_search_is_exact_with_ties_removes_and_reuse() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        for backend in Backend::available() {
            for metric in [Metric::Dot, Metric::L2] {
                for dimension in [1, 5, 16, 33, 384] {
                    let mut index = FlatIndex::new(dimension, metric);
                    let mut next_id = 1000u64;
                    let mut rows: Vec<u32> = Vec::new();
                    for round in 0..6 {
                        // Insert, then remove a random third, then insert again (reusing).
                        for _ in 0..rng.gen_range(10..120) {
                            let freed = index.free_rows.last().copied();
                            let row = index.insert(next_id, &integer_vector(&mut rng, dimension));
                            if let Some(freed) = freed {
                                assert_eq!(row, freed, "most recently freed slot is reused");
                            }
                            rows.push(row);
                            next_id += 7;
                        }
                        for _ in 0..rows.len() / 3 {
                            let victim = rows.swap_remove(rng.gen_range(0..rows.len()));
                            index.remove(victim);
                            index.remove(victim); // idempotent
                            assert!(index.get(victim).is_none());
                        }
                        index.assert_invariants();
                        assert_eq!(index.len(), rows.len());

                        let query = integer_vector(&mut rng, dimension);
                        let odd = |id: u64| id % 2 == 1;
                        let by_seven = |id: u64| matches!(id % 7, 0);
                        let filters: [Option<&dyn Fn(u64) -> bool>; 3] =
                            [None, Some(&odd), Some(&by_seven)];
                        for k in [1, 3, 10, 64, 10_000] {
                            for filter in filters {
                                let all =
                                    reference_search(&index, &query, usize::MAX, None, filter);
                                // Thresholds: none, exactly a present distance (inclusive), below all.
                                let mut thresholds = vec![None, Some(-1e9)];
                                if !all.is_empty() {
                                    thresholds.push(Some(all[rng.gen_range(0..all.len())].1));
                                }
                                for threshold in thresholds {
                                    let got = index.search_with(
                                        backend,
                                        &query,
                                        k,
                                        threshold.map(|t| t as f32),
                                        filter,
                                    );
                                    let want =
                                        reference_search(&index, &query, k, threshold, filter);
                                    let want: Vec<(u64, f32)> =
                                        want.into_iter().map(|(id, d)| (id, d as f32)).collect();
                                    assert_eq!(got, want, "round {round} k {k} d {dimension}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn k_larger_than_matches_and_empty_cases() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let mut index = build(&mut rng, 8, Metric::L2, 10);
        let query = random_vector(&mut rng, 8, Metric::L2);
        assert_eq!(index.search(&query, 100, None, None).len(), 10);
        let none = |_: u64| false;
        assert!(index.search(&query, 100, None, Some(&none)).is_empty());
        assert!(index.search(&query, 0, None, None).is_empty());
        for row in 0..10 {
            index.remove(row);
        }
        assert!(index.is_empty());
        assert!(index.search(&query, 5, None, None).is_empty());
        index.assert_invariants();
    }

    #[test]
    fn cosine_normalises_the_query_and_handles_zero() {
        let mut index = FlatIndex::new(2, Metric::Cosine);
        index.insert(1, &[1.0, 0.0]);
        index.insert(2, &[0.0, 1.0]);
        let got = index.search(&[10.0, 0.0], 2, None, None);
        assert_eq!(got, vec![(1, 0.0), (2, 1.0)]);
        let zero = index.search(&[0.0, 0.0], 2, None, None);
        assert_eq!(zero, vec![(1, 1.0), (2, 1.0)]);
    }

    #[test]
    fn get_iter_and_memory() {
        let mut index = FlatIndex::new(3, Metric::Dot);
        let before = index.memory_bytes();
        let a = index.insert(42, &[1.0, 2.0, 3.0]);
        let b = index.insert(43, &[4.0, 5.0, 6.0]);
        assert_eq!(index.get(a), Some((42, &[1.0, 2.0, 3.0][..])));
        assert_eq!(index.get(99), None);
        index.remove(a);
        assert_eq!(index.get(a), None);
        let live: Vec<_> = index.iter().collect();
        assert_eq!(live, vec![(b, 43, &[4.0, 5.0, 6.0][..])]);
        let c = index.insert(44, &[7.0, 8.0, 9.0]);
        assert_eq!(c, a, "slot reused");
        assert_eq!(index.slot_count(), 2);
        index.reserve(1000);
        assert!(index.memory_bytes() >= before + 1000 * (3 * 4 + 8 + 1));
        assert_eq!(index.dimension(), 3);
        assert_eq!(index.metric(), Metric::Dot);
    }

    #[test]
    fn index_is_send_and_sync_and_searches_concurrently() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<FlatIndex>();
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        let index = build(&mut rng, 48, Metric::Cosine, 300);
        let queries: Vec<Vec<f32>> = (0..4)
            .map(|_| random_vector(&mut rng, 48, Metric::Cosine))
            .collect();
        let sequential: Vec<_> = queries
            .iter()
            .map(|q| index.search(q, 7, None, None))
            .collect();
        let concurrent: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = queries
                .iter()
                .map(|q| scope.spawn(|| index.search(q, 7, None, None)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(sequential, concurrent);
    }

    #[test]
    #[should_panic(expected = "dimension mismatch")]
    fn insert_rejects_wrong_dimension() {
        FlatIndex::new(4, Metric::L2).insert(1, &[1.0, 2.0]);
    }

    #[test]
    #[should_panic(expected = "non-finite")]
    fn insert_rejects_nan() {
        FlatIndex::new(2, Metric::L2).insert(1, &[1.0, f32::NAN]);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn remove_rejects_unknown_row() {
        FlatIndex::new(2, Metric::L2).remove(0);
    }

    #[test]
    #[should_panic(expected = "dimension")]
    fn dimension_is_bounded() {
        FlatIndex::new(DIMENSION_LIMIT + 1, Metric::L2);
    }
}
