//! [`TopK`]: the bounded selection of the `k` smallest `(distance, id)` pairs.
//!
//! This module owns the ordering of search results: ascending distance, ties broken by id
//! ascending, so that equal inputs give byte-identical outputs whatever order rows were
//! scanned in. It is a binary max-heap of at most `k` entries whose root is the current worst
//! kept entry; a scan compares a candidate against [`TopK::worst_distance`] first and only
//! touches the heap when the candidate can enter.
//!
//! It must never grow past `k` entries nor allocate after construction (the heap is sized
//! once), and must never accept a NaN distance: NaN has no place in a total order, and letting
//! one in would make results depend on scan order. `k` is bounded by [`TOPK_LIMIT`] so that
//! one query's scratch memory is bounded too.

use std::cmp::Ordering;

/// The largest `k` one query may ask for. Bounds the heap to 10 000 × 16 B = 160 KB.
pub const TOPK_LIMIT: usize = 10_000;

/// Keeps the `k` smallest `(distance, id)` pairs pushed into it.
#[derive(Clone, Debug)]
pub struct TopK {
    k: usize,
    /// Max-heap by `(distance, id)`: `heap[0]` is the worst entry kept.
    heap: Vec<(f32, u64)>,
}

/// Total order on entries: distance, then id. Distances are never NaN (asserted on entry),
/// and `-0.0 == 0.0` here, consistently in the heap and in the final sort.
#[inline]
fn compare(a: (f32, u64), b: (f32, u64)) -> Ordering {
    match a.0.partial_cmp(&b.0) {
        Some(Ordering::Equal) => a.1.cmp(&b.1),
        Some(ordering) => ordering,
        None => unreachable!("NaN distance in TopK"),
    }
}

impl TopK {
    /// An empty selection of at most `k` entries. Asserts `1 <= k <= TOPK_LIMIT`.
    pub fn new(k: usize) -> Self {
        assert!(k >= 1, "TopK: k must be at least 1");
        assert!(
            k <= TOPK_LIMIT,
            "TopK: k {k} exceeds TOPK_LIMIT {TOPK_LIMIT}"
        );
        TopK {
            k,
            heap: Vec::with_capacity(k),
        }
    }

    /// The bound this selection was created with.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Entries kept so far (at most `k`).
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// True before the first accepted push.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// True once `k` entries are kept; from then on each accepted push evicts the worst.
    pub fn is_full(&self) -> bool {
        self.heap.len() == self.k
    }

    /// The distance a candidate must not exceed to possibly enter: the worst kept distance
    /// when full, `+∞` before. A candidate with exactly this distance enters only if its id
    /// is smaller than the worst entry's id.
    #[inline]
    pub fn worst_distance(&self) -> f32 {
        if self.heap.len() < self.k {
            f32::INFINITY
        } else {
            self.heap[0].0
        }
    }

    /// Offers one candidate; returns whether it was kept. Panics on a NaN distance.
    #[inline]
    pub fn push(&mut self, distance: f32, id: u64) -> bool {
        assert!(!distance.is_nan(), "TopK: NaN distance for id {id}");
        let entry = (distance, id);
        if self.heap.len() < self.k {
            self.heap.push(entry);
            self.sift_up(self.heap.len() - 1);
            true
        } else if compare(entry, self.heap[0]) == Ordering::Less {
            self.heap[0] = entry;
            self.sift_down(0);
            true
        } else {
            false
        }
    }

    /// The kept entries, ascending by distance, ties by id ascending.
    pub fn into_sorted_vec(self) -> Vec<(f32, u64)> {
        let mut entries = self.heap;
        entries.sort_unstable_by(|a, b| compare(*a, *b));
        entries
    }

    fn sift_up(&mut self, mut index: usize) {
        while index > 0 {
            let parent = (index - 1) / 2;
            if compare(self.heap[index], self.heap[parent]) != Ordering::Greater {
                break;
            }
            self.heap.swap(index, parent);
            index = parent;
        }
    }

    fn sift_down(&mut self, mut index: usize) {
        let len = self.heap.len();
        loop {
            let left = 2 * index + 1;
            if left >= len {
                break;
            }
            let right = left + 1;
            let mut largest = left;
            if right < len && compare(self.heap[right], self.heap[left]) == Ordering::Greater {
                largest = right;
            }
            if compare(self.heap[largest], self.heap[index]) != Ordering::Greater {
                break;
            }
            self.heap.swap(index, largest);
            index = largest;
        }
    }

    /// Checks the heap property and the bound; O(k). For tests and debug assertions.
    pub fn assert_invariants(&self) {
        assert!(self.heap.len() <= self.k);
        for index in 1..self.heap.len() {
            let parent = (index - 1) / 2;
            assert_ne!(
                compare(self.heap[index], self.heap[parent]),
                Ordering::Greater,
                "heap property violated at {index}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn reference(stream: &[(f32, u64)], k: usize) -> Vec<(f32, u64)> {
        let mut all = stream.to_vec();
        all.sort_by(|a, b| compare(*a, *b));
        all.truncate(k);
        all
    }

    #[test]
    fn random_streams_match_sort() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for round in 0..500 {
            let k = rng.gen_range(1..=64);
            let n = rng.gen_range(0..300);
            // Few distinct distances in some rounds, so ties (broken by id) are common.
            let distinct = if round % 2 == 0 { 5 } else { 1_000_000 };
            let stream: Vec<(f32, u64)> = (0..n)
                .map(|i| {
                    let distance = rng.gen_range(0..distinct) as f32 / 7.0 - 3.0;
                    (distance, i as u64 * 13 % 1009)
                })
                .collect();
            let mut topk = TopK::new(k);
            for &(distance, id) in &stream {
                let could_enter = distance <= topk.worst_distance();
                let kept = topk.push(distance, id);
                assert!(
                    could_enter || !kept,
                    "worst_distance must be a safe pre-filter"
                );
                topk.assert_invariants();
            }
            assert_eq!(topk.len(), n.min(k));
            assert_eq!(topk.into_sorted_vec(), reference(&stream, k));
        }
    }

    #[test]
    fn ties_break_by_id_whatever_the_order() {
        let mut forward = TopK::new(3);
        let mut backward = TopK::new(3);
        for id in 0..10u64 {
            forward.push(1.0, id);
            backward.push(1.0, 9 - id);
        }
        let want = vec![(1.0, 0), (1.0, 1), (1.0, 2)];
        assert_eq!(forward.into_sorted_vec(), want);
        assert_eq!(backward.into_sorted_vec(), want);
    }

    #[test]
    fn worst_distance_is_infinite_until_full() {
        let mut topk = TopK::new(2);
        assert!(topk.is_empty());
        assert_eq!(topk.worst_distance(), f32::INFINITY);
        topk.push(5.0, 1);
        assert_eq!(topk.worst_distance(), f32::INFINITY);
        topk.push(3.0, 2);
        assert!(topk.is_full());
        assert_eq!(topk.worst_distance(), 5.0);
        assert!(!topk.push(6.0, 0));
        assert!(topk.push(4.0, 3));
        assert_eq!(topk.worst_distance(), 4.0);
        assert_eq!(topk.k(), 2);
    }

    #[test]
    #[should_panic(expected = "NaN")]
    fn nan_is_rejected() {
        TopK::new(1).push(f32::NAN, 0);
    }

    #[test]
    #[should_panic(expected = "TOPK_LIMIT")]
    fn k_is_bounded() {
        TopK::new(TOPK_LIMIT + 1);
    }
}
