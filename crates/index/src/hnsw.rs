//! [`HnswIndex`]: approximate k-nearest-neighbour search on a hierarchical navigable
//! small-world graph, with filters applied during traversal, tombstone deletes, optional int8
//! scalar quantization with rescoring, and a versioned, checksummed binary format.
//!
//! This module owns the graph (rows, levels, neighbour lists), the vectors or their int8
//! codes, the search planner (graph traversal vs. exact scan for selective filters), the
//! delete/reuse policy and the on-disk encoding of all of it. It follows the HNSW paper
//! (Malkov & Yashunin) and hnswlib's choices: level-0 lists hold `m0` neighbours (`2m` unless
//! the caller asks for fewer, which saves `2m − m0` links per row and lowers the recall a
//! given `ef` reaches), upper levels `m`; neighbours are chosen by the diversity heuristic (a
//! candidate is kept only if it is closer to the new node than to every neighbour kept so far);
//! levels are drawn as `⌊−ln(U)/ln(m)⌋`.
//!
//! Layout (chosen for the search loop, after hnswlib): one [`Arena`] block of words per row
//! holding its level-0 links bit-packed at `⌈log₂ (rows + 1)⌉` bits each (a short list ends at
//! an all-ones mark, so no count word) and its vector (or codes), so scoring a node brings in
//! the lines that expanding it later reads, and a list of `2m` links costs `2m · 17` bits at
//! 100k rows instead of `2m · 32`; upper levels (≈ 1/m of rows) sit in a pooled `Vec<u32>`
//! reached through a table sorted by row that holds only those rows ([`UpperOffsets`]); ids
//! are 4 bytes while they fit ([`RowIds`]). The visited set is a per-thread array of
//! generation stamps (no clearing per query), and a node's unvisited neighbours are all
//! prefetched (first payload line) before any is scored, the rest of the next one while the
//! current one is; a candidate's block head (its links) is prefetched when it is queued.
//!
//! It must never do I/O beyond the caller's `Write`/`Read`, lock, spawn threads or keep state
//! between searches in `self`: `search(&self)` runs concurrently from many threads, so all
//! per-query scratch (visited stamps, heaps) is thread-local. It must never return a removed
//! row, never renumber rows (a row returned by [`HnswIndex::insert`] names that vector until
//! [`HnswIndex::remove`]), never panic on bytes read from disk (every field is validated, and
//! errors are values), and in int8 mode never keep an `f32` copy of the vectors once trained
//! (memory is the point of quantization; the caller holds the originals, see
//! [`VectorSource`]). Malformed *calls* (wrong dimension, non-finite components, a limit
//! exceeded) are caller bugs and are met with assertions, as in [`crate::FlatIndex`].
//!
//! **Delete policy.** [`HnswIndex::remove`] tombstones a row: it stays in the graph as a
//! waypoint (its edges keep the graph connected), is never returned, and is queued for reuse.
//! [`HnswIndex::insert`] reuses the most recently freed row (never the entry point): the row's
//! out-edges are rebuilt from scratch by a normal insertion at level `max(old, drawn)` (so every
//! edge that points at it stays valid), while in-edges from other nodes now lead to the new
//! vector; the neighbour heuristic prunes such edges as lists fill. No rebuild is needed; recall
//! after deleting and re-inserting 30 % of a set is measured in `tests/hnsw.rs`. Searches and
//! insertions only *collect* live rows, so tombstones cost traversal steps, not results.
//!
//! **Filters and the planner.** A filter is evaluated during traversal: every node is
//! traversed, only live matching nodes enter the result set, and the search does not stop
//! until it holds `ef` matches (or the reachable graph is exhausted) — `ef` widens by itself
//! with selectivity. Before searching, [`HnswIndex::plan`] estimates the filter's selectivity
//! `s` from up to [`PLANNER_SAMPLE_ROWS`] rows at a fixed stride and chooses the exact scan when
//! `live · (s + 0.1) ≤ m · ef / s` — the scan's cost (a distance per match plus a filter call,
//! ≈ 0.1 distance, per row) against the traversal's (≈ `m` distances per collected candidate,
//! `ef / s` candidates). A graph search that comes back with fewer than `k` results falls back
//! to the exact scan, so `k` results come back whenever `k` rows match.
//!
//! **Int8.** With [`Quantization::Int8`] the first [`TRAIN_ROWS`] rows are kept as `f32`;
//! at that point the per-dimension quantizer ([`Sq8`]) is trained on them, every row is encoded
//! and the floats are dropped. Traversal scores codes against the float query (asymmetric:
//! one `u8 × f32` SIMD dot per row, or for L2 the squared difference straight from the codes,
//! so a row is its codes and nothing else). With `rescore` and a [`VectorSource`], the best
//! `⌈k · oversampling⌉` candidates are re-ranked on the caller's original vectors; without a
//! source (or for an id the source does not know) the int8 approximation is returned as is.
//!
//! Internally rows are ranked by the same keys as the flat index: `−dot` for Cosine and Dot,
//! the squared distance for L2 (see the crate docs for the reported distances).

use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::io::{Read, Write};

use crate::kernels::{self, Backend};
use crate::sq8::{self, Sq8, TRAIN_ROWS};
use crate::topk::{TopK, TOPK_LIMIT};
use crate::{Metric, DIMENSION_LIMIT, ROW_LIMIT};

/// Largest `m` accepted. Level-0 lists hold at most `2m` rows, so this bounds a node to 1 KB of
/// links.
pub const M_LIMIT: usize = 128;
/// Largest `ef_construction` / `ef_search` accepted: bounds per-query heaps and work.
pub const EF_LIMIT: usize = 4_096;
/// Levels are `0..LEVEL_LIMIT`; a draw above is clamped (at m = 2 that is p ≈ 2⁻¹⁶ per row).
pub const LEVEL_LIMIT: usize = 16;
/// Largest int8 oversampling factor: rescoring reads at most `k · 16` originals.
pub const OVERSAMPLING_LIMIT: f32 = 16.0;
/// Rows the planner evaluates the filter on to estimate its selectivity.
pub const PLANNER_SAMPLE_ROWS: usize = 256;

/// Cache lines of a vector prefetched ahead of scoring it (the hardware streams the rest).
const PREFETCH_LINES: usize = 4;
/// Relative cost of one filter call against one distance, in the planner's rule.
const FILTER_COST: f64 = 0.1;
/// Largest `upper_links` pool: its offsets are `u32`.
const UPPER_POOL_WORDS_LIMIT: usize = u32::MAX as usize;
/// The arena doubles below this size and grows by an eighth from it on (see `push_row`).
const ARENA_GEOMETRIC_BYTES_MAX: usize = 64 << 20;
const MAGIC: &[u8; 8] = b"QVHNSW\0\0";
/// The newest format read and written. An index with `m0 = 2m` is still written in format 2,
/// so that builds from before `m0` read it.
const FORMAT_VERSION: u32 = 3;

/// Graph parameters. `m`: neighbours per node on upper levels; `m0`: neighbours per node on
/// level 0 (`2m` by default, as in the HNSW paper; a smaller `m0` trades recall at a given
/// `ef` for `(2m − m0) · link width` bits less per row, which is what lets an int8 index of
/// low dimension weigh under 30 % of the float one); `ef_construction`: candidate-list size
/// while inserting; `ef_search`: default candidate-list size while searching (per-query
/// override in [`HnswIndex::search`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HnswParams {
    pub m: usize,
    pub m0: usize,
    pub ef_construction: usize,
    pub ef_search: usize,
}

impl Default for HnswParams {
    fn default() -> Self {
        HnswParams::with_m(16, 200, 64)
    }
}

impl HnswParams {
    /// The paper's shape: `m0 = 2m`.
    pub fn with_m(m: usize, ef_construction: usize, ef_search: usize) -> HnswParams {
        HnswParams {
            m,
            m0: 2 * m,
            ef_construction,
            ef_search,
        }
    }

    /// Checks `2 ≤ m ≤ M_LIMIT`, `m ≤ m0 ≤ 2m`, `1 ≤ ef_construction, ef_search ≤ EF_LIMIT`.
    pub fn validate(&self) -> Result<(), String> {
        if !(2..=M_LIMIT).contains(&self.m) {
            return Err(format!("m must be in 2..={M_LIMIT}, got {}", self.m));
        }
        // Below m, level 0 would be sparser than the levels above it; above 2m, lists outgrow
        // the bound M_LIMIT sets on a node's links.
        if !(self.m..=2 * self.m).contains(&self.m0) {
            return Err(format!(
                "m0 must be in m..=2m ({}..={}), got {}",
                self.m,
                2 * self.m,
                self.m0
            ));
        }
        if !(1..=EF_LIMIT).contains(&self.ef_construction) {
            return Err(format!(
                "ef_construction must be in 1..={EF_LIMIT}, got {}",
                self.ef_construction
            ));
        }
        if !(1..=EF_LIMIT).contains(&self.ef_search) {
            return Err(format!(
                "ef_search must be in 1..={EF_LIMIT}, got {}",
                self.ef_search
            ));
        }
        Ok(())
    }
}

/// How vectors are stored inside the index.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Quantization {
    /// `f32` rows (4 bytes per component); exact distances.
    None,
    /// One byte per component after [`TRAIN_ROWS`] rows. `rescore`: re-rank the best
    /// `⌈k · oversampling⌉` candidates on originals from a [`VectorSource`].
    Int8 { rescore: bool, oversampling: f32 },
}

impl Quantization {
    /// Checks `1 ≤ oversampling ≤ OVERSAMPLING_LIMIT` (and finite) for int8.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Quantization::None => Ok(()),
            Quantization::Int8 { oversampling, .. } => {
                if oversampling.is_finite() && (1.0..=OVERSAMPLING_LIMIT).contains(&oversampling) {
                    Ok(())
                } else {
                    Err(format!(
                        "oversampling must be in 1..={OVERSAMPLING_LIMIT}, got {oversampling}"
                    ))
                }
            }
        }
    }
}

/// The caller's original vectors, by caller id, for int8 rescoring. For Cosine they must be
/// the same normalised vectors that were inserted.
pub trait VectorSource {
    fn vector(&self, id: u64) -> Option<&[f32]>;
}

/// How one search is executed; see the module docs for the rule [`HnswIndex::plan`] applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Best-first traversal of the graph, filter applied to what is collected.
    Graph,
    /// Every live matching row is scored (on codes when int8).
    Exact,
}

/// Why bytes could not be read back as an index.
#[derive(Debug)]
pub enum IndexFormatError {
    /// The reader failed (including an unexpected end of the stream).
    Io(std::io::Error),
    /// The stream does not start with this format's magic bytes.
    BadMagic,
    /// A format version this build does not read.
    UnsupportedVersion(u32),
    /// The payload's CRC32C does not match the header.
    Checksum { expected: u32, actual: u32 },
    /// The payload is well-checksummed but describes an impossible index.
    Invalid(String),
}

impl std::fmt::Display for IndexFormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IndexFormatError::Io(e) => write!(f, "hnsw index: read failed: {e}"),
            IndexFormatError::BadMagic => write!(f, "hnsw index: bad magic bytes"),
            IndexFormatError::UnsupportedVersion(v) => {
                write!(f, "hnsw index: unsupported format version {v}")
            }
            IndexFormatError::Checksum { expected, actual } => write!(
                f,
                "hnsw index: checksum mismatch (header {expected:08x}, payload {actual:08x})"
            ),
            IndexFormatError::Invalid(why) => write!(f, "hnsw index: invalid payload: {why}"),
        }
    }
}

impl std::error::Error for IndexFormatError {}

impl From<std::io::Error> for IndexFormatError {
    fn from(e: std::io::Error) -> Self {
        IndexFormatError::Io(e)
    }
}

/// Level-0 storage, one fixed-size block of `u32` words per row (hnswlib's layout: scoring a
/// node and later expanding it touch the same few cache lines):
/// `[level-0 links, bit-packed: link_words][payload]`. The payload is the `f32` vector
/// (`dimension` words) or, once int8 is trained, the codes (`⌈dimension / 4⌉` words; L2
/// distances come from the codes too, so no norm is kept). Links take `link_bits` bits
/// each, the fewest that number every row the arena is laid out for (at least
/// [`MIN_LINK_BITS`]); when rows outgrow them the arena is laid out again with one more bit,
/// so a list of `2m` links costs `2m · ⌈log₂ (rows + 1)⌉` bits instead of `2m · 32`. A list
/// shorter than `2m` ends at the first slot holding the all-ones value ([`Arena::end_mark`]),
/// which no row number takes, so a block spends no word on a count.
#[derive(Clone, Debug)]
struct Arena {
    words: Vec<u32>,
    link_bits: u32,
    /// Most links a block holds (`2m`).
    link_capacity: usize,
    link_words: usize,
    payload_words: usize,
    block_words: usize,
}

/// Fewest bits per packed link (so a growing index is not laid out again for its first rows).
const MIN_LINK_BITS: u32 = 8;

/// Bits that number rows `0..rows` and leave the all-ones value free for the end-of-list
/// mark (at least [`MIN_LINK_BITS`], at most 32).
fn link_bits_for(rows: usize) -> u32 {
    (u64::BITS - (rows as u64).leading_zeros()).clamp(MIN_LINK_BITS, 32)
}

/// The words of a block's float payload as `f32`s.
#[inline]
fn as_floats(words: &[u32]) -> &[f32] {
    // SAFETY: `u32` and `f32` have the same size and alignment and every bit pattern is a
    // valid `f32`; the slice keeps the borrow of `words`.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<f32>(), words.len()) }
}

/// The words of a block's code payload as bytes (in memory order).
#[inline]
fn as_bytes(words: &[u32]) -> &[u8] {
    // SAFETY: `u8` has alignment 1, the length covers exactly the words' bytes, and every
    // bit pattern is a valid `u8`; the slice keeps the borrow of `words`.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), words.len() * 4) }
}

/// Asks Linux to back `words`' allocation with transparent huge pages where it can (the
/// 2 MB-aligned part of it). The search touches blocks at random across the whole arena, so
/// with 4 KB pages nearly every block costs a TLB miss and a page walk; with 2 MB pages the
/// arena of a 100k × 384 index fits in the TLB. Only a hint: failures are ignored, and
/// nothing changes where THP is off or not Linux. Call it before the pages are first touched.
fn advise_huge_pages(words: &Vec<u32>) {
    #[cfg(target_os = "linux")]
    {
        const HUGE_PAGE_BYTES: usize = 2 << 20;
        let start = words.as_ptr() as usize;
        let end = start + words.capacity() * 4;
        let aligned_start = start.next_multiple_of(HUGE_PAGE_BYTES);
        let aligned_end = end / HUGE_PAGE_BYTES * HUGE_PAGE_BYTES;
        if aligned_end > aligned_start {
            // SAFETY: madvise only changes how the kernel backs this range, which lies inside
            // the Vec's own allocation; MADV_HUGEPAGE never changes its contents.
            unsafe {
                libc::madvise(
                    aligned_start as *mut libc::c_void,
                    aligned_end - aligned_start,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = words;
}

/// Packs bytes into words in memory order (the inverse of [`as_bytes`]), zero-padding the tail.
fn pack_bytes(bytes: &[u8], words: &mut [u32]) {
    debug_assert!(bytes.len() <= words.len() * 4);
    for (word, chunk) in words.iter_mut().zip(bytes.chunks(4)) {
        let mut quad = [0u8; 4];
        quad[..chunk.len()].copy_from_slice(chunk);
        *word = u32::from_ne_bytes(quad);
    }
}

impl Arena {
    fn new(link_bits: u32, link_capacity: usize, payload_words: usize) -> Arena {
        assert!((MIN_LINK_BITS..=32).contains(&link_bits) && payload_words >= 1);
        let link_words = (link_capacity * link_bits as usize).div_ceil(32);
        Arena {
            words: Vec::new(),
            link_bits,
            link_capacity,
            link_words,
            payload_words,
            block_words: link_words + payload_words,
        }
    }

    fn rows(&self) -> usize {
        self.words.len() / self.block_words
    }

    /// Rows whose numbers fit in `link_bits` below the end mark.
    fn row_capacity(&self) -> usize {
        if self.link_bits >= 32 {
            ROW_LIMIT
        } else {
            (1usize << self.link_bits) - 1
        }
    }

    /// The link value that ends a list shorter than `2m`: all ones, never a row.
    #[inline]
    fn end_mark(&self) -> u32 {
        (((1u64) << self.link_bits) - 1) as u32
    }

    fn memory_bytes(&self) -> usize {
        self.words.capacity() * 4
    }

    #[inline]
    fn block(&self, row: u32) -> &[u32] {
        let start = row as usize * self.block_words;
        &self.words[start..start + self.block_words]
    }

    /// Link `i` of `block` (`i < 2m`), or [`Arena::end_mark`] past the end of its list. The
    /// read of the following word stays inside the block: the payload (at least one word)
    /// follows the links.
    #[inline]
    fn link(&self, block: &[u32], i: usize) -> u32 {
        let bit = i * self.link_bits as usize;
        let word = bit / 32;
        let pair = block[word] as u64 | (block[word + 1] as u64) << 32;
        ((pair >> (bit % 32)) & ((1u64 << self.link_bits) - 1)) as u32
    }

    fn links_into(&self, row: u32, out: &mut Vec<u32>) {
        out.clear();
        let block = self.block(row);
        let end = self.end_mark();
        out.extend(
            (0..self.link_capacity)
                .map(|i| self.link(block, i))
                .take_while(|&link| link != end),
        );
    }

    fn set_links(&mut self, row: u32, links: &[u32]) {
        assert!(links.len() <= self.link_capacity, "Arena: too many links");
        let bits = self.link_bits;
        let end = self.end_mark();
        if let Some(&bad) = links.iter().find(|&&link| link >= end) {
            panic!("Arena: link {bad} needs more than {bits} bits");
        }
        // The list, then end marks to `2m`, packed low bits first into whole words; the
        // unused high bits of the last word are ones, as in a new block.
        let start = row as usize * self.block_words;
        let words = &mut self.words[start..start + self.link_words];
        let marks = std::iter::repeat_n(end, self.link_capacity - links.len());
        let (mut pending, mut pending_bits, mut next) = (0u64, 0u32, 0usize);
        for link in links.iter().copied().chain(marks) {
            pending |= u64::from(link) << pending_bits;
            pending_bits += bits;
            if pending_bits >= 32 {
                words[next] = pending as u32;
                next += 1;
                pending >>= 32;
                pending_bits -= 32;
            }
        }
        if pending_bits > 0 {
            words[next] = pending as u32 | (u32::MAX << pending_bits);
            next += 1;
        }
        debug_assert_eq!(next, self.link_words);
    }

    #[inline]
    fn payload(&self, row: u32) -> &[u32] {
        let start = row as usize * self.block_words + self.link_words;
        &self.words[start..start + self.payload_words]
    }

    fn payload_mut(&mut self, row: u32) -> &mut [u32] {
        let start = row as usize * self.block_words + self.link_words;
        &mut self.words[start..start + self.payload_words]
    }

    /// Appends a block with no links and a zero payload. The arena doubles while small and
    /// grows by an eighth once it is [`ARENA_GEOMETRIC_BYTES_MAX`] or more: growth that large
    /// is a remap, not a copy (see `reserve_words`), so small steps cost little, and doubling
    /// would leave up to half of a large arena allocated but unused — the first insert into a
    /// million-row graph loaded from a file doubled its 600 MB (and `memory_bytes` with it).
    fn push_row(&mut self) {
        let needed = self.words.len() + self.block_words;
        let capacity = self.words.capacity();
        if needed > capacity {
            let grown = if capacity * 4 >= ARENA_GEOMETRIC_BYTES_MAX {
                capacity + capacity / 8
            } else {
                capacity * 2
            };
            self.reserve_words(needed.max(grown));
        }
        let start = self.words.len();
        self.words.resize(needed, 0);
        // All-ones link words: every slot reads as the end mark, an empty list.
        self.words[start..start + self.link_words].fill(u32::MAX);
    }

    /// Makes the capacity at least `capacity_words` (exactly that when it grows). The first
    /// allocation is advised to use huge pages before its pages are touched. Later growth is
    /// a `realloc`, which for a block this large remaps its pages (mremap on Linux) instead of
    /// copying them: the first insert into a million-row graph loaded from a file took a
    /// second copying 600 MB; remapped, it takes milliseconds. The grown range is advised too.
    fn reserve_words(&mut self, capacity_words: usize) {
        if capacity_words <= self.words.capacity() {
            return;
        }
        if self.words.capacity() == 0 {
            let next = Vec::with_capacity(capacity_words);
            advise_huge_pages(&next);
            self.words = next;
            return;
        }
        self.words.reserve_exact(capacity_words - self.words.len());
        advise_huge_pages(&self.words);
    }

    /// Address of byte `offset` of `row`'s block, for prefetching only (never dereferenced).
    #[inline]
    fn address(&self, row: u32, offset_bytes: usize) -> *const u8 {
        (self.words.as_ptr() as *const u8)
            .wrapping_add(row as usize * self.block_words * 4 + offset_bytes)
    }

    /// The same rows laid out with `link_bits` and `payload_words`, with room for
    /// `capacity_rows` rows; `convert(old, new)` fills each row's new payload from its old one.
    fn relaid(
        &self,
        link_bits: u32,
        payload_words: usize,
        capacity_rows: usize,
        mut convert: impl FnMut(&[u32], &mut [u32]),
    ) -> Arena {
        let rows = self.rows();
        let mut next = Arena::new(link_bits, self.link_capacity, payload_words);
        next.reserve_words(capacity_rows.max(rows).saturating_mul(next.block_words));
        let mut links = Vec::with_capacity(self.link_capacity);
        for row in 0..rows as u32 {
            next.push_row();
            self.links_into(row, &mut links);
            next.set_links(row, &links);
            convert(self.payload(row), next.payload_mut(row));
        }
        next
    }
}

/// Grows `v` to hold `additional` more elements by at least an eighth of its capacity (not
/// by doubling), so a pool that grows with the rows keeps at most ⅛ of it unused: doubling
/// left the upper link pool of a million-row graph half empty (4 B per row of slack).
fn reserve_by_eighths<T>(v: &mut Vec<T>, additional: usize) {
    let needed = v.len().saturating_add(additional);
    if needed > v.capacity() {
        let grown = v.capacity() + v.capacity() / 8;
        v.reserve_exact(needed.max(grown) - v.len());
    }
}

/// The caller id of every row: 4 bytes each while every id fits in a `u32` (the engine's
/// chunk keys count up from 0, and so do most callers' row numbers), 8 from the first id that
/// does not, for good. At 128 dimensions with int8 codes the 4 bytes saved are 2 % of a row.
#[derive(Clone, Debug)]
enum RowIds {
    Narrow(Vec<u32>),
    Wide(Vec<u64>),
}

impl Default for RowIds {
    fn default() -> Self {
        RowIds::Narrow(Vec::new())
    }
}

impl From<Vec<u64>> for RowIds {
    fn from(ids: Vec<u64>) -> Self {
        if ids.iter().all(|&id| u32::try_from(id).is_ok()) {
            RowIds::Narrow(ids.into_iter().map(|id| id as u32).collect())
        } else {
            RowIds::Wide(ids)
        }
    }
}

impl RowIds {
    fn len(&self) -> usize {
        match self {
            RowIds::Narrow(v) => v.len(),
            RowIds::Wide(v) => v.len(),
        }
    }

    /// Rows there is room for without growing.
    fn capacity(&self) -> usize {
        match self {
            RowIds::Narrow(v) => v.capacity(),
            RowIds::Wide(v) => v.capacity(),
        }
    }

    fn memory_bytes(&self) -> usize {
        match self {
            RowIds::Narrow(v) => v.capacity() * 4,
            RowIds::Wide(v) => v.capacity() * 8,
        }
    }

    fn reserve(&mut self, additional: usize) {
        match self {
            RowIds::Narrow(v) => v.reserve(additional),
            RowIds::Wide(v) => v.reserve(additional),
        }
    }

    #[inline]
    fn get(&self, index: usize) -> u64 {
        match self {
            RowIds::Narrow(v) => u64::from(v[index]),
            RowIds::Wide(v) => v[index],
        }
    }

    /// Widens every id to 8 bytes, keeping the capacity (in rows).
    fn widen(&mut self) {
        if let RowIds::Narrow(v) = self {
            let mut wide = Vec::with_capacity(v.capacity());
            wide.extend(v.iter().map(|&id| u64::from(id)));
            *self = RowIds::Wide(wide);
        }
    }

    fn set(&mut self, index: usize, id: u64) {
        if u32::try_from(id).is_err() {
            self.widen();
        }
        match self {
            RowIds::Narrow(v) => v[index] = id as u32,
            RowIds::Wide(v) => v[index] = id,
        }
    }

    fn push(&mut self, id: u64) {
        if u32::try_from(id).is_err() {
            self.widen();
        }
        match self {
            RowIds::Narrow(v) => v.push(id as u32),
            RowIds::Wide(v) => v.push(id),
        }
    }

    fn to_vec(&self) -> Vec<u64> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }
}

/// The offset of each upper-level block in `upper_links`, for the rows that have one.
///
/// Only ≈ 1/m of rows live above level 0, so a `u32` per row (4 B, of which 15 in 16 said
/// "none") is replaced by a table sorted by row: 8 B per upper row, ≈ 0.5 B per row at
/// m = 16. A lookup is a binary search; the search loop does one per upper-level hop (a few per
/// query), never on level 0. New rows are numbered past every old one, so they append; a
/// reused row that rises above level 0 is inserted in place.
#[derive(Clone, Debug, Default)]
struct UpperOffsets {
    /// `(row, offset)`, strictly increasing by row.
    entries: Vec<(u32, u32)>,
}

impl UpperOffsets {
    fn with_capacity(rows: usize) -> UpperOffsets {
        UpperOffsets {
            entries: Vec::with_capacity(rows),
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn memory_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<(u32, u32)>()
    }

    #[inline]
    fn get(&self, row: u32) -> Option<u32> {
        self.entries
            .binary_search_by_key(&row, |&(r, _)| r)
            .ok()
            .map(|i| self.entries[i].1)
    }

    /// Points `row` at `offset` (a new entry, or a moved block for a row that rose).
    fn set(&mut self, row: u32, offset: u32) {
        match self.entries.last() {
            Some(&(last, _)) if last >= row => {
                match self.entries.binary_search_by_key(&row, |&(r, _)| r) {
                    Ok(i) => self.entries[i].1 = offset,
                    Err(i) => {
                        reserve_by_eighths(&mut self.entries, 1);
                        self.entries.insert(i, (row, offset));
                    }
                }
            }
            _ => {
                reserve_by_eighths(&mut self.entries, 1);
                self.entries.push((row, offset));
            }
        }
    }

    fn assert_invariants(&self) {
        assert!(
            self.entries.windows(2).all(|w| w[0].0 < w[1].0),
            "upper offsets out of row order"
        );
    }
}

/// Payload words of one row: the float vector, or the codes.
fn payload_words_for(dimension: usize, quantized: bool) -> usize {
    if quantized {
        dimension.div_ceil(4)
    } else {
        dimension
    }
}

/// Approximate nearest-neighbour index. See the module docs.
#[derive(Clone, Debug)]
pub struct HnswIndex {
    dimension: usize,
    metric: Metric,
    params: HnswParams,
    quantization: Quantization,
    /// The trained int8 quantizer: `Some` iff the arena's payloads are codes.
    quantizer: Option<Sq8>,
    /// Level-0 links and vectors (or codes), one block per row.
    arena: Arena,
    /// Caller id per row (a tombstoned row keeps its stale id).
    ids: RowIds,
    live: Vec<bool>,
    /// Top level of each row's node.
    levels: Vec<u8>,
    /// Offset of each upper block in `upper_links`, for the rows above level 0 only.
    upper_offsets: UpperOffsets,
    /// Blocks of `level × (1 + m)`: for levels 1..=level, a count then up to `m` rows.
    upper_links: Vec<u32>,
    /// Tombstoned rows awaiting reuse; exactly the rows that are not live.
    free_rows: Vec<u32>,
    live_count: usize,
    /// Row of the top node (may be tombstoned: it still routes). `None` iff no rows.
    entry: Option<u32>,
    max_level: usize,
    /// splitmix64 state for level draws (persisted, so a loaded index continues the stream).
    rng_state: u64,
}

/// A query as the distance function wants it: the (normalised) float query, or for int8
/// codes the prepared query (`q ⊙ scale` and its constant term for Cosine and Dot, `q − min`
/// for L2); and the kernel backend, chosen once per query.
struct Probe<'a> {
    vector: &'a [f32],
    constant: f32,
    backend: Backend,
}

/// `(key, row)` ordered by key then row (keys are never NaN: vectors are finite).
#[derive(Clone, Copy, PartialEq)]
struct Near(f32, u32);

impl Eq for Near {}

impl PartialOrd for Near {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Near {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

/// Per-thread search scratch: generation-stamped visited marks, the two heaps and the list of
/// a node's unvisited neighbours (all reused, so a search allocates nothing here).
#[derive(Default)]
struct Scratch {
    marks: Vec<u16>,
    generation: u16,
    candidates: BinaryHeap<Reverse<Near>>,
    results: BinaryHeap<Near>,
    pending: Vec<u32>,
}

impl Scratch {
    /// Starts a new traversal over `slots` rows: nothing is visited afterwards.
    fn begin(&mut self, slots: usize) {
        if self.marks.len() < slots {
            self.marks.resize(slots, 0);
        }
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.marks.fill(0);
            self.generation = 1;
        }
        self.candidates.clear();
        self.results.clear();
        self.pending.clear();
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch, or a fresh one if it is already in use (a filter
/// closure that searches another index on the same thread).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut Scratch::default()),
    })
}

#[inline]
fn distance_of_key(metric: Metric, key: f32) -> f32 {
    match metric {
        Metric::Cosine => 1.0 + key,
        Metric::Dot => key,
        Metric::L2 => key.max(0.0).sqrt(),
    }
}

#[inline]
fn prefetch<T>(pointer: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint and never faults, whatever the address; SSE is baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch(pointer as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = pointer;
}

impl HnswIndex {
    /// An empty index. Asserts `1 ≤ dimension ≤ DIMENSION_LIMIT` and valid parameters.
    pub fn new(
        dimension: usize,
        metric: Metric,
        params: HnswParams,
        quantization: Quantization,
    ) -> Self {
        assert!(
            (1..=DIMENSION_LIMIT).contains(&dimension),
            "HnswIndex: dimension {dimension} outside 1..={DIMENSION_LIMIT}"
        );
        if let Err(why) = params.validate() {
            panic!("HnswIndex: {why}");
        }
        if let Err(why) = quantization.validate() {
            panic!("HnswIndex: {why}");
        }
        HnswIndex {
            dimension,
            metric,
            params,
            quantization,
            quantizer: None,
            arena: Arena::new(
                MIN_LINK_BITS,
                params.m0,
                payload_words_for(dimension, false),
            ),
            ids: RowIds::default(),
            live: Vec::new(),
            levels: Vec::new(),
            upper_offsets: UpperOffsets::default(),
            upper_links: Vec::new(),
            free_rows: Vec::new(),
            live_count: 0,
            entry: None,
            max_level: 0,
            rng_state: 0x5157_4956_4552_4853, // "QWIVERHS": any fixed seed
        }
    }

    pub fn dimension(&self) -> usize {
        self.dimension
    }

    pub fn metric(&self) -> Metric {
        self.metric
    }

    pub fn params(&self) -> HnswParams {
        self.params
    }

    pub fn quantization(&self) -> Quantization {
        self.quantization
    }

    /// Live rows.
    pub fn len(&self) -> usize {
        self.live_count
    }

    pub fn is_empty(&self) -> bool {
        self.live_count == 0
    }

    /// Tombstoned rows (removed, not yet reused).
    pub fn tombstones(&self) -> usize {
        self.free_rows.len()
    }

    /// Row slots ever allocated (live + tombstoned).
    pub fn slot_count(&self) -> usize {
        self.ids.len()
    }

    /// Whether vectors are held as int8 codes now (int8 mode after [`TRAIN_ROWS`] rows).
    pub fn is_quantized(&self) -> bool {
        self.quantizer.is_some()
    }

    /// Bits each level-0 link takes in memory now (grows with the row count).
    pub fn link_bits(&self) -> u32 {
        self.arena.link_bits
    }

    /// Bytes held by this index's heap allocations, by capacity, plus the struct itself.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.quantizer.as_ref().map_or(0, Sq8::memory_bytes)
            + self.arena.memory_bytes()
            + self.ids.memory_bytes()
            + self.live.capacity()
            + self.levels.capacity()
            + self.upper_offsets.memory_bytes()
            + (self.upper_links.capacity() + self.free_rows.capacity()) * 4
    }

    /// `row`'s level-0 neighbours (tombstoned ones included: they stay waypoints), into
    /// `out`. For inspecting the graph (degrees, link statistics: `examples/hnsw_links.rs`);
    /// searches read the arena directly. Asserts `row < slot_count()`.
    pub fn level0_neighbours(&self, row: u32, out: &mut Vec<u32>) {
        assert!(
            (row as usize) < self.ids.len(),
            "HnswIndex::level0_neighbours: row {row} out of range"
        );
        self.arena.links_into(row, out);
    }

    /// Reserves room for `additional_rows` more rows (vectors or codes, ids, links).
    pub fn reserve(&mut self, additional_rows: usize) {
        let rows = self.ids.len().saturating_add(additional_rows);
        assert!(rows <= ROW_LIMIT, "HnswIndex: reserve beyond ROW_LIMIT");
        // An int8 index holds floats only for its first TRAIN_ROWS rows: reserve codes when it
        // trains (sized from `ids`' capacity), not floats now.
        let untrained_int8 =
            matches!(self.quantization, Quantization::Int8 { .. }) && self.quantizer.is_none();
        let bits = link_bits_for(rows);
        if bits > self.arena.link_bits {
            let capacity = if untrained_int8 { 0 } else { rows };
            self.relay(bits, self.arena.payload_words, capacity, |old, new| {
                new.copy_from_slice(old)
            });
        } else if !untrained_int8 {
            let words = (self.ids.len().saturating_add(additional_rows))
                .saturating_mul(self.arena.block_words);
            self.arena.reserve_words(words);
        }
        self.ids.reserve(additional_rows);
        self.live.reserve(additional_rows);
        self.levels.reserve(additional_rows);
    }

    /// Replaces the arena by a copy with `link_bits` and `payload_words` (see [`Arena::relaid`]).
    fn relay(
        &mut self,
        link_bits: u32,
        payload_words: usize,
        capacity_rows: usize,
        convert: impl FnMut(&[u32], &mut [u32]),
    ) {
        let next = self
            .arena
            .relaid(link_bits, payload_words, capacity_rows, convert);
        self.arena = next;
    }

    #[inline]
    fn stride_upper(&self) -> usize {
        1 + self.params.m
    }

    #[inline]
    fn max_neighbours(&self, level: usize) -> usize {
        if level == 0 {
            self.params.m0
        } else {
            self.params.m
        }
    }

    /// Offset of `row`'s list at `level ≥ 1` in `upper_links`.
    #[inline]
    fn upper_offset(&self, row: u32, level: usize) -> usize {
        debug_assert!(level >= 1);
        let base = self
            .upper_offsets
            .get(row)
            .expect("a row above level 0 has a block");
        debug_assert!(level <= self.levels[row as usize] as usize);
        base as usize + (level - 1) * self.stride_upper()
    }

    /// `row`'s neighbours at `level ≥ 1`.
    #[inline]
    fn upper_neighbours(&self, row: u32, level: usize) -> &[u32] {
        let offset = self.upper_offset(row, level);
        let list = &self.upper_links[offset..offset + self.stride_upper()];
        &list[1..1 + (list[0] as usize).min(self.params.m)]
    }

    /// `row`'s neighbours at any level, into `out`.
    fn neighbours_into(&self, row: u32, level: usize, out: &mut Vec<u32>) {
        if level == 0 {
            self.arena.links_into(row, out);
        } else {
            out.clear();
            out.extend_from_slice(self.upper_neighbours(row, level));
        }
    }

    fn set_neighbours(&mut self, row: u32, level: usize, neighbours: &[u32]) {
        assert!(neighbours.len() <= self.max_neighbours(level));
        if level == 0 {
            self.arena.set_links(row, neighbours);
        } else {
            let offset = self.upper_offset(row, level);
            let list = &mut self.upper_links[offset..offset + 1 + self.params.m];
            list[0] = neighbours.len() as u32;
            list[1..1 + neighbours.len()].copy_from_slice(neighbours);
        }
    }

    /// The ranking key of `row` for `probe` (smaller is closer).
    #[inline]
    fn key(&self, probe: &Probe<'_>, row: u32) -> f32 {
        let payload = self.arena.payload(row);
        match &self.quantizer {
            None => {
                let vector = as_floats(payload);
                if self.metric == Metric::L2 {
                    kernels::l2_squared_with(probe.backend, probe.vector, vector)
                } else {
                    -kernels::dot_with(probe.backend, probe.vector, vector)
                }
            }
            Some(quantizer) => {
                let codes = &as_bytes(payload)[..self.dimension];
                if self.metric == Metric::L2 {
                    sq8::l2_code_with(probe.backend, probe.vector, quantizer.scale(), codes)
                } else {
                    -(probe.constant + sq8::dot_code_with(probe.backend, probe.vector, codes))
                }
            }
        }
    }

    /// The exact key of a float vector (used for rescoring originals).
    #[inline]
    fn exact_key(&self, query: &[f32], vector: &[f32]) -> f32 {
        if self.metric == Metric::L2 {
            kernels::l2_squared(query, vector)
        } else {
            -kernels::dot(query, vector)
        }
    }

    /// Prefetches cache lines `lines` (64 bytes each) of `row`'s payload, clipped to it.
    #[inline]
    fn prefetch_row(&self, row: u32, lines: std::ops::Range<usize>) {
        let start_bytes = self.arena.link_words * 4;
        let payload_bytes = self.arena.payload_words * 4;
        for line in lines {
            let offset = line * 64;
            if offset >= payload_bytes {
                break;
            }
            prefetch(self.arena.address(row, start_bytes + offset));
        }
    }

    /// Prefetches `row`'s level-0 links (the head of its block).
    #[inline]
    fn prefetch_links0(&self, row: u32) {
        let end_bytes = self.arena.link_words * 4;
        let mut offset = 0;
        while offset < end_bytes {
            prefetch(self.arena.address(row, offset));
            offset += 64;
        }
        prefetch(self.arena.address(row, end_bytes - 1));
    }

    /// A probe for a float vector (already normalised for Cosine).
    fn probe<'a>(&self, vector: &'a [f32], buffer: &'a mut Vec<f32>) -> Probe<'a> {
        let backend = kernels::backend();
        match &self.quantizer {
            None => Probe {
                vector,
                constant: 0.0,
                backend,
            },
            Some(quantizer) if self.metric == Metric::L2 => {
                quantizer.prepare_l2(vector, buffer);
                let buffer: &'a Vec<f32> = buffer;
                Probe {
                    vector: buffer,
                    constant: 0.0,
                    backend,
                }
            }
            Some(quantizer) => {
                let constant = quantizer.prepare(vector, buffer);
                let buffer: &'a Vec<f32> = buffer;
                Probe {
                    vector: buffer,
                    constant,
                    backend,
                }
            }
        }
    }

    /// A probe for a stored row (decoded first when int8).
    fn row_probe<'a>(
        &'a self,
        row: u32,
        decoded: &'a mut Vec<f32>,
        prepared: &'a mut Vec<f32>,
    ) -> Probe<'a> {
        let payload = self.arena.payload(row);
        match &self.quantizer {
            None => Probe {
                vector: as_floats(payload),
                constant: 0.0,
                backend: kernels::backend(),
            },
            Some(quantizer) => {
                decoded.resize(self.dimension, 0.0);
                quantizer.decode(&as_bytes(payload)[..self.dimension], decoded);
                let decoded: &'a Vec<f32> = decoded;
                self.probe(decoded, prepared)
            }
        }
    }

    fn next_level(&mut self) -> usize {
        // splitmix64
        self.rng_state = self.rng_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // Uniform in (0, 1]: never ln(0).
        let uniform = ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let level = (-uniform.ln() / (self.params.m as f64).ln()).floor();
        (level as usize).min(LEVEL_LIMIT - 1)
    }

    /// Stores `vector` under caller id `id` and returns its row: the most recently freed row
    /// (other than the entry point) if any, else a new one. Cosine vectors must arrive
    /// normalised (the engine normalises; see the crate docs).
    ///
    /// Panics on a wrong dimension, a non-finite component or [`ROW_LIMIT`] rows.
    pub fn insert(&mut self, id: u64, vector: &[f32]) -> u32 {
        assert_eq!(
            vector.len(),
            self.dimension,
            "HnswIndex::insert: dimension mismatch"
        );
        assert!(
            vector.iter().all(|x| x.is_finite()),
            "HnswIndex::insert: non-finite component"
        );
        let drawn = self.next_level();
        let reused = self
            .free_rows
            .iter()
            .rposition(|&r| Some(r) != self.entry)
            .map(|position| self.free_rows.swap_remove(position));
        let (row, level) = match reused {
            Some(row) => {
                let index = row as usize;
                assert!(!self.live[index], "free list holds a live row");
                let old_level = self.levels[index] as usize;
                // Never lower a node: edges at its old levels may point at it.
                let level = old_level.max(drawn);
                if level > old_level {
                    let offset = self.allocate_upper(level);
                    self.upper_offsets.set(row, offset);
                }
                self.levels[index] = level as u8;
                self.ids.set(index, id);
                (row, level)
            }
            None => {
                assert!(self.ids.len() < ROW_LIMIT, "HnswIndex: ROW_LIMIT reached");
                let row = self.ids.len() as u32;
                if self.ids.len() + 1 > self.arena.row_capacity() {
                    // Rows outgrew the link width: one more bit doubles the rows it numbers.
                    let capacity = self.arena.words.capacity() / self.arena.block_words;
                    self.relay(
                        self.arena.link_bits + 1,
                        self.arena.payload_words,
                        capacity,
                        |old, new| new.copy_from_slice(old),
                    );
                }
                self.ids.push(id);
                self.live.push(false);
                self.levels.push(drawn as u8);
                if drawn > 0 {
                    let offset = self.allocate_upper(drawn);
                    self.upper_offsets.set(row, offset);
                }
                self.arena.push_row();
                (row, drawn)
            }
        };
        let payload = self.payload_of(vector);
        self.arena.payload_mut(row).copy_from_slice(&payload);
        for l in 0..=level {
            self.set_neighbours(row, l, &[]);
        }

        match self.entry {
            None => {
                self.entry = Some(row);
                self.max_level = level;
            }
            Some(entry) => {
                self.link(row, vector, level, entry);
                if level > self.max_level {
                    self.entry = Some(row);
                    self.max_level = level;
                }
            }
        }
        self.live[row as usize] = true;
        self.live_count += 1;
        self.maybe_train();
        debug_assert_eq!(self.live_count + self.free_rows.len(), self.ids.len());
        row
    }

    fn allocate_upper(&mut self, level: usize) -> u32 {
        let offset = self.upper_links.len();
        let length = level * self.stride_upper();
        assert!(
            offset + length <= UPPER_POOL_WORDS_LIMIT,
            "HnswIndex: upper link pool full"
        );
        reserve_by_eighths(&mut self.upper_links, length);
        self.upper_links.resize(offset + length, 0);
        offset as u32
    }

    /// The arena payload for `vector` in the current storage mode.
    fn payload_of(&self, vector: &[f32]) -> Vec<u32> {
        let mut payload = vec![0u32; self.arena.payload_words];
        encode_payload(self.quantizer.as_ref(), vector, &mut payload);
        payload
    }

    /// Trains the int8 quantizer once [`TRAIN_ROWS`] rows exist, then drops the floats.
    fn maybe_train(&mut self) {
        let Quantization::Int8 { .. } = self.quantization else {
            return;
        };
        if self.quantizer.is_some() || self.ids.len() < TRAIN_ROWS {
            return;
        }
        let d = self.dimension;
        let bound = (self.metric == Metric::Cosine).then_some(1.0);
        let arena = &self.arena;
        let quantizer = Sq8::train(
            d,
            (0..self.ids.len() as u32)
                .filter(|&row| self.live[row as usize])
                .map(|row| as_floats(arena.payload(row))),
            bound,
        );
        // Keep the capacity the caller reserved (in rows) for the codes.
        let capacity = self.ids.capacity();
        self.relay(
            self.arena.link_bits,
            payload_words_for(d, true),
            capacity,
            |old, new| encode_payload(Some(&quantizer), as_floats(old), new),
        );
        self.quantizer = Some(quantizer);
    }

    /// Connects the (unlinked, not yet live) node `row` at levels `0..=level`.
    fn link(&mut self, row: u32, vector: &[f32], level: usize, entry: u32) {
        let mut buffer = Vec::new();
        let probe = self.probe(vector, &mut buffer);
        let mut current = entry;
        let mut current_key = self.key(&probe, current);
        for l in (level + 1..=self.max_level).rev() {
            (current, current_key) = self.greedy(&probe, current, current_key, l);
        }
        let mut entries = vec![Near(current_key, current)];
        let ef = self.params.ef_construction.max(self.params.m);
        for l in (0..=level.min(self.max_level)).rev() {
            let found = with_scratch(|scratch| {
                self.search_layer(&probe, &entries, l, ef, |r| self.live[r as usize], scratch)
            });
            let selected = self.select_neighbours(&found, self.params.m);
            self.set_neighbours(row, l, &selected);
            for &neighbour in &selected {
                self.add_link(neighbour, row, l);
            }
            if !found.is_empty() {
                entries = found;
            }
        }
    }

    /// Adds the edge `from → to` at `level`, pruning `from`'s list by the heuristic if full.
    fn add_link(&mut self, from: u32, to: u32, level: usize) {
        let capacity = self.max_neighbours(level);
        let mut list = Vec::with_capacity(capacity + 1);
        self.neighbours_into(from, level, &mut list);
        if list.contains(&to) {
            return;
        }
        list.push(to);
        if list.len() <= capacity {
            self.set_neighbours(from, level, &list);
            return;
        }
        let (mut decoded, mut prepared) = (Vec::new(), Vec::new());
        let probe = self.row_probe(from, &mut decoded, &mut prepared);
        let mut candidates: Vec<Near> =
            list.iter().map(|&r| Near(self.key(&probe, r), r)).collect();
        candidates.sort_unstable();
        let selected = self.select_neighbours(&candidates, capacity);
        self.set_neighbours(from, level, &selected);
    }

    /// hnswlib's heuristic: walking `candidates` (ascending), keep one only if no kept
    /// neighbour is closer to it than the query is.
    fn select_neighbours(&self, candidates: &[Near], m: usize) -> Vec<u32> {
        if candidates.len() <= m {
            return candidates.iter().map(|n| n.1).collect();
        }
        let mut selected: Vec<u32> = Vec::with_capacity(m);
        let (mut decoded, mut prepared) = (Vec::new(), Vec::new());
        for &Near(key, candidate) in candidates {
            if selected.len() >= m {
                break;
            }
            let probe = self.row_probe(candidate, &mut decoded, &mut prepared);
            if selected.iter().all(|&s| self.key(&probe, s) >= key) {
                selected.push(candidate);
            }
        }
        selected
    }

    /// Greedy descent on one upper level (≥ 1): moves to a closer neighbour until none is.
    fn greedy(
        &self,
        probe: &Probe<'_>,
        mut current: u32,
        mut key: f32,
        level: usize,
    ) -> (u32, f32) {
        loop {
            let mut changed = false;
            for &neighbour in self.upper_neighbours(current, level) {
                let k = self.key(probe, neighbour);
                if k < key {
                    key = k;
                    current = neighbour;
                    changed = true;
                }
            }
            if !changed {
                return (current, key);
            }
        }
    }

    /// Best-first search of one level from `entries`, keeping the `ef` closest rows for which
    /// `accept` holds; every reached node is traversed whether accepted or not. Returns the
    /// kept rows ascending by key.
    fn search_layer(
        &self,
        probe: &Probe<'_>,
        entries: &[Near],
        level: usize,
        ef: usize,
        accept: impl Fn(u32) -> bool,
        scratch: &mut Scratch,
    ) -> Vec<Near> {
        scratch.begin(self.ids.len());
        let Scratch {
            marks,
            generation,
            candidates,
            results,
            pending,
        } = scratch;
        let generation = *generation;
        // Marks `row` visited; returns whether it already was.
        let mut visit = |row: u32| -> bool {
            let mark = &mut marks[row as usize];
            let seen = *mark == generation;
            *mark = generation;
            seen
        };
        for &entry in entries {
            if visit(entry.1) {
                continue;
            }
            candidates.push(Reverse(entry));
            if accept(entry.1) {
                results.push(entry);
                if results.len() > ef {
                    results.pop();
                }
            }
        }
        while let Some(Reverse(Near(key, row))) = candidates.pop() {
            if results.len() >= ef {
                let worst = results.peek().map_or(f32::INFINITY, |n| n.0);
                if key > worst {
                    break;
                }
            }
            // Two passes: mark the unvisited neighbours and prefetch the head of each of
            // their vectors (many misses in flight at once), then score them, prefetching the
            // rest of the next one's vector while scoring this one.
            pending.clear();
            if level == 0 {
                let block = self.arena.block(row);
                let end = self.arena.end_mark();
                for i in 0..self.arena.link_capacity {
                    let neighbour = self.arena.link(block, i);
                    if neighbour == end {
                        break;
                    }
                    if !visit(neighbour) {
                        self.prefetch_row(neighbour, 0..1);
                        pending.push(neighbour);
                    }
                }
            } else {
                for &neighbour in self.upper_neighbours(row, level) {
                    if !visit(neighbour) {
                        self.prefetch_row(neighbour, 0..1);
                        pending.push(neighbour);
                    }
                }
            }
            for (i, &neighbour) in pending.iter().enumerate() {
                if let Some(&next) = pending.get(i + 1) {
                    self.prefetch_row(next, 1..PREFETCH_LINES);
                }
                let k = self.key(probe, neighbour);
                let full = results.len() >= ef;
                let worst = results.peek().map_or(f32::INFINITY, |n| n.0);
                if !full || k < worst {
                    // It may be expanded soon: fetch the head of its block (its links, just
                    // before the vector that was read) while the search goes on.
                    if level == 0 {
                        self.prefetch_links0(neighbour);
                    }
                    candidates.push(Reverse(Near(k, neighbour)));
                    if accept(neighbour) {
                        results.push(Near(k, neighbour));
                        if results.len() > ef {
                            results.pop();
                        }
                    }
                }
            }
        }
        let mut found: Vec<Near> = results.drain().collect();
        found.sort_unstable();
        found
    }

    /// Tombstones `row` (see the module docs for the policy). Removing a removed row is a
    /// no-op; panics if `row` was never allocated.
    pub fn remove(&mut self, row: u32) {
        let index = row as usize;
        assert!(
            index < self.ids.len(),
            "HnswIndex::remove: row {row} out of range"
        );
        if self.live[index] {
            self.live[index] = false;
            self.live_count -= 1;
            self.free_rows.push(row);
        }
        debug_assert_eq!(self.live_count + self.free_rows.len(), self.ids.len());
    }

    /// The caller id of a live row.
    pub fn id(&self, row: u32) -> Option<u64> {
        let index = row as usize;
        (index < self.ids.len() && self.live[index]).then(|| self.ids.get(index))
    }

    /// Renames every live row's caller id through `f` (the graph is unchanged). The engine
    /// uses it to save a graph under the ids its rows will have when a snapshot is loaded.
    pub fn remap_ids(&mut self, mut f: impl FnMut(u64) -> u64) {
        for (index, &live) in self.live.iter().enumerate() {
            if live {
                let id = f(self.ids.get(index));
                self.ids.set(index, id);
            }
        }
    }

    /// Which plan [`HnswIndex::search`] would use for this filter and candidate-list size:
    /// the exact scan when the estimated selectivity `s` (from up to [`PLANNER_SAMPLE_ROWS`]
    /// rows at a fixed stride; 0 matches counts as ½) satisfies `live · (s + 0.1) ≤ m · ef / s`,
    /// the graph otherwise (always without a filter).
    pub fn plan(&self, ef: usize, filter: Option<&dyn Fn(u64) -> bool>) -> Plan {
        let Some(filter) = filter else {
            return Plan::Graph;
        };
        let slots = self.ids.len();
        if slots == 0 {
            return Plan::Exact;
        }
        let stride = (slots / PLANNER_SAMPLE_ROWS).max(1);
        let (mut sampled, mut matched) = (0usize, 0usize);
        for row in (0..slots).step_by(stride).take(PLANNER_SAMPLE_ROWS) {
            if self.live[row] {
                sampled += 1;
                if filter(self.ids.get(row)) {
                    matched += 1;
                }
            }
        }
        if sampled == 0 {
            return Plan::Exact;
        }
        let selectivity = (matched as f64).max(0.5) / sampled as f64;
        let live = self.live_count as f64;
        let exact_cost = live * (selectivity + FILTER_COST);
        let graph_cost = (self.params.m * ef) as f64 / selectivity;
        if exact_cost <= graph_cost {
            Plan::Exact
        } else {
            Plan::Graph
        }
    }

    /// Approximate k-nearest search: up to `k` `(id, distance)` pairs ascending by distance
    /// (ties by id), from live rows for which `filter(id)` holds, within `max_distance` when
    /// given. `ef` overrides `ef_search` (raised to `k`, or to `⌈k · oversampling⌉` when
    /// rescoring). With int8 codes, `rescore` and a `source`, the candidates are re-ranked on
    /// the originals and exact distances are returned; otherwise int8 distances are
    /// approximate. Same distance convention and result shape as [`crate::FlatIndex::search`].
    ///
    /// Panics on a wrong dimension, a non-finite query, a NaN `max_distance`,
    /// `k > TOPK_LIMIT` or `ef > EF_LIMIT`.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: Option<usize>,
        max_distance: Option<f32>,
        filter: Option<&dyn Fn(u64) -> bool>,
        source: Option<&dyn VectorSource>,
    ) -> Vec<(u64, f32)> {
        self.search_planned(query, k, ef, max_distance, filter, source, None)
    }

    /// [`HnswIndex::search`] with the plan forced (`Some`) or chosen by [`HnswIndex::plan`]
    /// (`None`). For tests and benchmarks that measure each plan.
    #[allow(clippy::too_many_arguments)]
    pub fn search_planned(
        &self,
        query: &[f32],
        k: usize,
        ef: Option<usize>,
        max_distance: Option<f32>,
        filter: Option<&dyn Fn(u64) -> bool>,
        source: Option<&dyn VectorSource>,
        plan: Option<Plan>,
    ) -> Vec<(u64, f32)> {
        assert_eq!(
            query.len(),
            self.dimension,
            "HnswIndex::search: dimension mismatch"
        );
        assert!(
            query.iter().all(|x| x.is_finite()),
            "HnswIndex::search: non-finite query component"
        );
        assert!(
            k <= TOPK_LIMIT,
            "HnswIndex::search: k {k} exceeds TOPK_LIMIT"
        );
        assert!(
            !max_distance.is_some_and(f32::is_nan),
            "HnswIndex::search: NaN max_distance"
        );
        if let Some(ef) = ef {
            assert!(
                (1..=EF_LIMIT).contains(&ef),
                "HnswIndex::search: ef {ef} outside 1..={EF_LIMIT}"
            );
        }
        if k == 0 || self.live_count == 0 {
            return Vec::new();
        }

        let normalised: Vec<f32>;
        let query = if self.metric == Metric::Cosine {
            let length = kernels::norm(query);
            if length > 0.0 {
                normalised = query.iter().map(|x| x / length).collect();
                &normalised[..]
            } else {
                query
            }
        } else {
            query
        };

        let (rescore, oversampling) = match self.quantization {
            Quantization::Int8 {
                rescore,
                oversampling,
            } => (
                rescore && self.is_quantized() && source.is_some(),
                oversampling,
            ),
            Quantization::None => (false, 1.0),
        };
        let fetch = if rescore {
            ((k as f64 * oversampling as f64).ceil() as usize).clamp(k, TOPK_LIMIT)
        } else {
            k
        };
        let ef = ef.unwrap_or(self.params.ef_search).max(fetch);
        let plan = plan.unwrap_or_else(|| self.plan(ef, filter));

        let mut buffer = Vec::new();
        let probe = self.probe(query, &mut buffer);
        let accept = |row: u32| {
            let index = row as usize;
            self.live[index]
                && match filter {
                    Some(f) => f(self.ids.get(index)),
                    None => true,
                }
        };
        let mut found = match plan {
            Plan::Graph => self.graph_search(&probe, ef, &accept),
            Plan::Exact => Vec::new(),
        };
        if plan == Plan::Exact || found.len() < fetch.min(self.live_count) {
            // The planner's choice, or a graph search that came up short: scan everything.
            found = self.exact_scan(&probe, fetch, &accept);
        }
        found.truncate(fetch);

        let mut results: Vec<(u64, f32)> = found
            .into_iter()
            .map(|Near(key, row)| {
                let id = self.ids.get(row as usize);
                let key = match source.filter(|_| rescore).and_then(|s| s.vector(id)) {
                    Some(original) => {
                        assert_eq!(
                            original.len(),
                            self.dimension,
                            "VectorSource: dimension mismatch for id {id}"
                        );
                        self.exact_key(query, original)
                    }
                    None => key,
                };
                (id, distance_of_key(self.metric, key))
            })
            .filter(|(_, distance)| match max_distance {
                Some(m) => *distance <= m,
                None => true,
            })
            .collect();
        results.sort_unstable_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        results.truncate(k);
        results
    }

    fn graph_search(
        &self,
        probe: &Probe<'_>,
        ef: usize,
        accept: &dyn Fn(u32) -> bool,
    ) -> Vec<Near> {
        let Some(entry) = self.entry else {
            return Vec::new();
        };
        let mut current = entry;
        let mut key = self.key(probe, current);
        for level in (1..=self.max_level).rev() {
            (current, key) = self.greedy(probe, current, key, level);
        }
        with_scratch(|scratch| {
            self.search_layer(probe, &[Near(key, current)], 0, ef, accept, scratch)
        })
    }

    fn exact_scan(&self, probe: &Probe<'_>, n: usize, accept: &dyn Fn(u32) -> bool) -> Vec<Near> {
        let mut topk = TopK::new(n.clamp(1, TOPK_LIMIT));
        for row in 0..self.ids.len() as u32 {
            if accept(row) {
                let key = self.key(probe, row);
                if key <= topk.worst_distance() {
                    topk.push(key, row as u64);
                }
            }
        }
        topk.into_sorted_vec()
            .into_iter()
            .map(|(key, row)| Near(key, row as u32))
            .collect()
    }

    /// Checks every structural invariant; O(rows · m). For tests and after reading.
    pub fn assert_invariants(&self) {
        assert!((1..=DIMENSION_LIMIT).contains(&self.dimension));
        self.params.validate().expect("valid params");
        self.quantization.validate().expect("valid quantization");
        let slots = self.ids.len();
        assert!(slots <= ROW_LIMIT);
        assert_eq!(self.live.len(), slots);
        assert_eq!(self.levels.len(), slots);
        self.upper_offsets.assert_invariants();
        assert_eq!(
            self.upper_offsets.len(),
            self.levels.iter().filter(|&&l| l > 0).count(),
            "one upper block per row above level 0"
        );
        let arena = &self.arena;
        assert_eq!(arena.words.len(), slots * arena.block_words);
        assert_eq!(arena.link_capacity, self.params.m0);
        assert!(
            slots <= arena.row_capacity(),
            "links too narrow for the rows"
        );
        assert_eq!(
            arena.payload_words,
            payload_words_for(self.dimension, self.quantizer.is_some())
        );
        match &self.quantizer {
            None => {
                if matches!(self.quantization, Quantization::Int8 { .. }) {
                    assert!(
                        slots < TRAIN_ROWS,
                        "int8 index holding floats after training"
                    );
                }
            }
            Some(quantizer) => {
                assert!(matches!(self.quantization, Quantization::Int8 { .. }));
                assert_eq!(quantizer.dimension(), self.dimension);
                quantizer.assert_invariants();
            }
        }
        assert_eq!(self.live.iter().filter(|l| **l).count(), self.live_count);
        assert_eq!(self.free_rows.len(), slots - self.live_count);
        let mut seen = vec![false; slots];
        for &row in &self.free_rows {
            let index = row as usize;
            assert!(
                index < slots && !self.live[index] && !seen[index],
                "bad free row {row}"
            );
            seen[index] = true;
        }
        match self.entry {
            None => assert_eq!(slots, 0),
            Some(entry) => {
                assert!((entry as usize) < slots);
                assert_eq!(self.levels[entry as usize] as usize, self.max_level);
            }
        }
        let mut list = Vec::new();
        for row in 0..slots as u32 {
            let level = self.levels[row as usize] as usize;
            assert!(level <= self.max_level && level < LEVEL_LIMIT);
            if level > 0 {
                let base = self.upper_offsets.get(row).expect("upper block") as usize;
                assert!(base + level * self.stride_upper() <= self.upper_links.len());
            }
            for l in 0..=level {
                self.neighbours_into(row, l, &mut list);
                let count = if l == 0 {
                    // A list ends at the first end mark; no slot after it holds a link.
                    let block = arena.block(row);
                    assert!(
                        (list.len()..arena.link_capacity)
                            .all(|i| arena.link(block, i) == arena.end_mark()),
                        "row {row}: a link after the end of its list"
                    );
                    list.len()
                } else {
                    self.upper_links[self.upper_offset(row, l)] as usize
                };
                assert!(
                    count <= self.max_neighbours(l),
                    "row {row} level {l}: too many links"
                );
                for &n in &list {
                    assert!((n as usize) < slots, "row {row}: link {n} out of range");
                    assert!(
                        self.levels[n as usize] as usize >= l,
                        "link below its level"
                    );
                }
            }
        }
    }

    // ---- persistence -------------------------------------------------------------------

    /// Writes the whole index: `magic[8] · version u32 · payload_len u64 · crc32c u32 ·
    /// payload` (little-endian). The payload is encoded twice (once to size and checksum it,
    /// once to write it) so no copy of the index is held in memory.
    pub fn write_to(&self, w: &mut dyn Write) -> std::io::Result<()> {
        let version = if self.params.m0 == 2 * self.params.m {
            2
        } else {
            FORMAT_VERSION
        };
        self.write_version(w, version)
    }

    /// [`HnswIndex::write_to`] in format `version` (1 only for tests of reading old files).
    fn write_version(&self, w: &mut dyn Write, version: u32) -> std::io::Result<()> {
        let mut sizing = Encoder::new(None);
        self.encode(&mut sizing, version)?;
        sizing.flush()?;
        let (length, crc) = (sizing.length, sizing.crc);
        w.write_all(MAGIC)?;
        w.write_all(&version.to_le_bytes())?;
        w.write_all(&length.to_le_bytes())?;
        w.write_all(&crc.to_le_bytes())?;
        let mut writer = Encoder::new(Some(w));
        self.encode(&mut writer, version)?;
        writer.flush()?;
        debug_assert_eq!((writer.length, writer.crc), (length, crc));
        Ok(())
    }

    /// Format 3 (format 2 when `m0 = 2m`, which it omits): header fields (format 3 adds `m0`
    /// after `ef_search`), ids, live flags, levels, the vectors (`f32` rows) or the
    /// quantizer, codes and (L2) norms, then each row's level-0 list as `count u32` and
    /// `count` rows (exact size; format 1 padded every list to `2m`), the upper blocks in row
    /// order and the free rows.
    fn encode(&self, e: &mut Encoder<'_>, version: u32) -> std::io::Result<()> {
        e.u32(self.dimension as u32)?;
        e.u8(match self.metric {
            Metric::Cosine => 0,
            Metric::Dot => 1,
            Metric::L2 => 2,
        })?;
        e.u32(self.params.m as u32)?;
        e.u32(self.params.ef_construction as u32)?;
        e.u32(self.params.ef_search as u32)?;
        if version >= 3 {
            e.u32(self.params.m0 as u32)?;
        }
        match self.quantization {
            Quantization::None => e.u8(0)?,
            Quantization::Int8 {
                rescore,
                oversampling,
            } => {
                e.u8(1)?;
                e.u8(rescore as u8)?;
                e.f32s(&[oversampling])?;
            }
        }
        e.u64(self.rng_state)?;
        let slots = self.ids.len();
        e.u64(slots as u64)?;
        e.u32(self.entry.unwrap_or(u32::MAX))?;
        e.u8(self.max_level as u8)?;
        e.u64s(&self.ids.to_vec())?;
        let live: Vec<u8> = self.live.iter().map(|&l| l as u8).collect();
        e.bytes(&live)?;
        e.bytes(&self.levels)?;
        let rows = 0..slots as u32;
        match &self.quantizer {
            None => {
                e.u8(0)?;
                for row in rows.clone() {
                    e.f32s(as_floats(self.arena.payload(row)))?;
                }
            }
            Some(quantizer) => {
                e.u8(1)?;
                e.f32s(&quantizer.min)?;
                e.f32s(&quantizer.scale)?;
                for row in rows.clone() {
                    e.bytes(&as_bytes(self.arena.payload(row))[..self.dimension])?;
                }
                if self.metric == Metric::L2 {
                    // Format 2 stores each L2 row's decoded squared norm. The index no longer
                    // keeps it (distances come from the codes, see `sq8::l2_code`), so it is
                    // recomputed here and ignored, after validation, on read.
                    let mut decoded = vec![0.0; self.dimension];
                    for row in rows.clone() {
                        let codes = &as_bytes(self.arena.payload(row))[..self.dimension];
                        quantizer.decode(codes, &mut decoded);
                        e.f32s(&[kernels::dot(&decoded, &decoded)])?;
                    }
                }
            }
        }
        let mut list = Vec::with_capacity(self.arena.link_capacity);
        for row in rows {
            self.arena.links_into(row, &mut list);
            e.u32(list.len() as u32)?;
            if version == 1 {
                list.resize(self.arena.link_capacity, 0);
            }
            e.u32s(&list)?;
        }
        // Upper blocks in row order (this compacts blocks orphaned by reuse).
        for row in 0..slots {
            let level = self.levels[row] as usize;
            if level > 0 {
                let base = self.upper_offsets.get(row as u32).expect("upper block") as usize;
                e.u32s(&self.upper_links[base..base + level * self.stride_upper()])?;
            }
        }
        e.u64(self.free_rows.len() as u64)?;
        e.u32s(&self.free_rows)?;
        Ok(())
    }

    /// Reads an index written by [`HnswIndex::write_to`] (format 2, or format 1 of earlier
    /// builds). Every field is validated; corrupt, truncated or foreign bytes give an error,
    /// never a panic, and allocation is bounded by the bytes actually present. The payload is
    /// read whole before it is parsed, so loading needs about twice the index's size
    /// transiently.
    pub fn read_from(r: &mut dyn Read) -> Result<HnswIndex, IndexFormatError> {
        let mut header = [0u8; 24];
        r.read_exact(&mut header)?;
        if &header[0..8] != MAGIC {
            return Err(IndexFormatError::BadMagic);
        }
        let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        if !(1..=FORMAT_VERSION).contains(&version) {
            return Err(IndexFormatError::UnsupportedVersion(version));
        }
        let length = u64::from_le_bytes(header[12..20].try_into().expect("8 bytes"));
        let expected = u32::from_le_bytes(header[20..24].try_into().expect("4 bytes"));
        let mut payload = Vec::new();
        r.take(length).read_to_end(&mut payload)?;
        if payload.len() as u64 != length {
            return Err(IndexFormatError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("payload truncated: {} of {length} bytes", payload.len()),
            )));
        }
        let actual = crc32c::crc32c(&payload);
        if actual != expected {
            return Err(IndexFormatError::Checksum { expected, actual });
        }
        let index = Self::decode(
            &mut Decoder {
                bytes: &payload,
                position: 0,
            },
            version,
        )
        .map_err(IndexFormatError::Invalid)?;
        index.assert_invariants();
        Ok(index)
    }

    fn decode(d: &mut Decoder<'_>, version: u32) -> Result<HnswIndex, String> {
        let dimension = d.u32()? as usize;
        if !(1..=DIMENSION_LIMIT).contains(&dimension) {
            return Err(format!("dimension {dimension}"));
        }
        let metric = match d.u8()? {
            0 => Metric::Cosine,
            1 => Metric::Dot,
            2 => Metric::L2,
            other => return Err(format!("metric tag {other}")),
        };
        let mut params =
            HnswParams::with_m(d.u32()? as usize, d.u32()? as usize, d.u32()? as usize);
        // Formats 1 and 2 knew only m0 = 2m.
        if version >= 3 {
            params.m0 = d.u32()? as usize;
        }
        params.validate()?;
        let quantization = match d.u8()? {
            0 => Quantization::None,
            1 => {
                let rescore = match d.u8()? {
                    0 => false,
                    1 => true,
                    other => return Err(format!("rescore flag {other}")),
                };
                let oversampling = d.f32s(1)?[0];
                Quantization::Int8 {
                    rescore,
                    oversampling,
                }
            }
            other => return Err(format!("quantization tag {other}")),
        };
        quantization.validate()?;
        let mut index = HnswIndex::new(dimension, metric, params, quantization);
        index.rng_state = d.u64()?;
        let slots = d.u64()?;
        if slots > ROW_LIMIT as u64 || slots > d.remaining() as u64 {
            return Err(format!("{slots} rows"));
        }
        let slots = slots as usize;
        let entry = d.u32()?;
        let max_level = d.u8()? as usize;
        if max_level >= LEVEL_LIMIT {
            return Err(format!("max level {max_level}"));
        }
        index.ids = RowIds::from(d.u64s(slots)?);
        index.live = d
            .bytes(slots)?
            .iter()
            .map(|&b| match b {
                0 => Ok(false),
                1 => Ok(true),
                other => Err(format!("live flag {other}")),
            })
            .collect::<Result<_, _>>()?;
        index.live_count = index.live.iter().filter(|l| **l).count();
        index.levels = d.bytes(slots)?.to_vec();
        if index.levels.iter().any(|&l| l as usize > max_level) {
            return Err("a level above the max level".into());
        }
        let components = slots.checked_mul(dimension).ok_or("row count overflows")?;
        let link_bits = link_bits_for(slots);
        match d.u8()? {
            0 => {
                if matches!(quantization, Quantization::Int8 { .. }) && slots >= TRAIN_ROWS {
                    return Err("int8 index holding floats after training".into());
                }
                let vectors = d.sized(components, 4)?;
                let mut arena =
                    Arena::new(link_bits, params.m0, payload_words_for(dimension, false));
                arena.reserve_words(slots * arena.block_words);
                for (row, vector) in vectors.chunks_exact(dimension * 4).enumerate() {
                    arena.push_row();
                    for (word, bytes) in arena
                        .payload_mut(row as u32)
                        .iter_mut()
                        .zip(vector.chunks_exact(4))
                    {
                        let x = f32::from_le_bytes(bytes.try_into().expect("4"));
                        if !x.is_finite() {
                            return Err("non-finite vector component".into());
                        }
                        *word = x.to_bits();
                    }
                }
                index.arena = arena;
            }
            1 => {
                if quantization == Quantization::None {
                    return Err("codes in an unquantized index".into());
                }
                let min = d.f32s(dimension)?;
                let scale = d.f32s(dimension)?;
                if !min.iter().all(|x| x.is_finite())
                    || !scale.iter().all(|s| s.is_finite() && *s >= 0.0)
                {
                    return Err("bad quantizer parameters".into());
                }
                let codes = d.bytes(components)?;
                let norms = if metric == Metric::L2 {
                    d.f32s(slots)?
                } else {
                    Vec::new()
                };
                if !norms.iter().all(|x| x.is_finite()) {
                    return Err("non-finite norm".into());
                }
                let mut arena =
                    Arena::new(link_bits, params.m0, payload_words_for(dimension, true));
                arena.reserve_words(slots * arena.block_words);
                let code_words = dimension.div_ceil(4);
                for (row, code) in codes.chunks_exact(dimension).enumerate() {
                    arena.push_row();
                    pack_bytes(code, &mut arena.payload_mut(row as u32)[..code_words]);
                }
                index.arena = arena;
                index.quantizer = Some(Sq8 { min, scale });
            }
            other => return Err(format!("storage tag {other}")),
        }
        let capacity0 = params.m0;
        let mut list = Vec::with_capacity(capacity0);
        for row in 0..slots as u32 {
            let count = d.u32()? as usize;
            if count > capacity0 {
                return Err(format!("row {row} level 0: {count} links"));
            }
            // Format 1 padded every level-0 list to `2m` rows.
            let stored = if version == 1 { capacity0 } else { count };
            list.clear();
            list.extend(d.u32s(stored)?.into_iter().take(count));
            if let Some(&bad) = list.iter().find(|&&n| n as usize >= slots) {
                return Err(format!("row {row} level 0: bad link {bad}"));
            }
            index.arena.set_links(row, &list);
        }
        let stride_upper = index.stride_upper();
        // Sized exactly from the levels (each ≤ LEVEL_LIMIT, so no overflow): no growth slack.
        let upper_rows = index.levels.iter().filter(|&&l| l > 0).count();
        let upper_words: usize = index
            .levels
            .iter()
            .map(|&l| l as usize * stride_upper)
            .sum();
        if upper_words > UPPER_POOL_WORDS_LIMIT {
            return Err("upper link pool overflows".into());
        }
        if upper_words > d.remaining() / 4 {
            return Err(format!(
                "levels need {upper_words} upper link words, more than the payload holds"
            ));
        }
        index.upper_offsets = UpperOffsets::with_capacity(upper_rows);
        index.upper_links = Vec::with_capacity(upper_words);
        for row in 0..slots {
            let level = index.levels[row] as usize;
            if level > 0 {
                let offset = index.upper_links.len();
                index.upper_offsets.set(row as u32, offset as u32);
                let block = d.u32s(level * stride_upper)?;
                index.upper_links.extend_from_slice(&block);
            }
        }
        for row in 0..slots {
            let level = index.levels[row] as usize;
            for l in 1..=level {
                let base = index.upper_offsets.get(row as u32).expect("set above") as usize
                    + (l - 1) * stride_upper;
                let list = &index.upper_links[base..base + stride_upper];
                let count = list[0] as usize;
                if count > params.m {
                    return Err(format!("row {row} level {l}: {count} links"));
                }
                for &n in &list[1..1 + count] {
                    if n as usize >= slots || (index.levels[n as usize] as usize) < l {
                        return Err(format!("row {row} level {l}: bad link {n}"));
                    }
                }
            }
        }
        let free_count = d.u64()?;
        if free_count != (slots - index.live_count) as u64 {
            return Err(format!(
                "{free_count} free rows for {} dead",
                slots - index.live_count
            ));
        }
        index.free_rows = d.u32s(free_count as usize)?;
        let mut seen = vec![false; slots];
        for &row in &index.free_rows {
            let i = row as usize;
            if i >= slots || index.live[i] || seen[i] {
                return Err(format!("bad free row {row}"));
            }
            seen[i] = true;
        }
        if slots == 0 {
            if entry != u32::MAX || max_level != 0 {
                return Err("entry point in an empty index".into());
            }
        } else {
            if entry as usize >= slots || index.levels[entry as usize] as usize != max_level {
                return Err(format!("bad entry point {entry}"));
            }
            index.entry = Some(entry);
            index.max_level = max_level;
        }
        if d.remaining() != 0 {
            return Err(format!("{} trailing bytes", d.remaining()));
        }
        Ok(index)
    }
}

/// Writes `vector` as an arena payload: its `f32` bits, or (with a quantizer) its codes.
fn encode_payload(quantizer: Option<&Sq8>, vector: &[f32], payload: &mut [u32]) {
    match quantizer {
        None => {
            debug_assert_eq!(payload.len(), vector.len());
            for (word, x) in payload.iter_mut().zip(vector) {
                *word = x.to_bits();
            }
        }
        Some(quantizer) => {
            let d = vector.len();
            let mut codes = vec![0u8; d];
            quantizer.encode(vector, &mut codes);
            pack_bytes(&codes, payload);
        }
    }
}

struct Encoder<'a> {
    sink: Option<&'a mut dyn Write>,
    buffer: Vec<u8>,
    length: u64,
    crc: u32,
}

impl<'a> Encoder<'a> {
    const BUFFER_BYTES: usize = 1 << 16;

    fn new(sink: Option<&'a mut dyn Write>) -> Self {
        Encoder {
            sink,
            buffer: Vec::with_capacity(Self::BUFFER_BYTES),
            length: 0,
            crc: 0,
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.crc = crc32c::crc32c_append(self.crc, &self.buffer);
        self.length += self.buffer.len() as u64;
        if let Some(sink) = self.sink.as_mut() {
            sink.write_all(&self.buffer)?;
        }
        self.buffer.clear();
        Ok(())
    }

    fn bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        for chunk in bytes.chunks(Self::BUFFER_BYTES) {
            if self.buffer.len() + chunk.len() > Self::BUFFER_BYTES {
                self.flush()?;
            }
            self.buffer.extend_from_slice(chunk);
        }
        Ok(())
    }

    fn u8(&mut self, v: u8) -> std::io::Result<()> {
        self.bytes(&[v])
    }

    fn u32(&mut self, v: u32) -> std::io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }

    fn u64(&mut self, v: u64) -> std::io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }

    fn u32s(&mut self, values: &[u32]) -> std::io::Result<()> {
        for chunk in values.chunks(1024) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.bytes(&bytes)?;
        }
        Ok(())
    }

    fn u64s(&mut self, values: &[u64]) -> std::io::Result<()> {
        for chunk in values.chunks(1024) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.bytes(&bytes)?;
        }
        Ok(())
    }

    fn f32s(&mut self, values: &[f32]) -> std::io::Result<()> {
        for chunk in values.chunks(1024) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.bytes(&bytes)?;
        }
        Ok(())
    }
}

/// Bounds-checked little-endian reader over a payload; every read is an `Err` past the end.
struct Decoder<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Decoder<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.position
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "needs {n} bytes at offset {}, {} left",
                self.position,
                self.remaining()
            ));
        }
        let slice = &self.bytes[self.position..self.position + n];
        self.position += n;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.bytes(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().expect("4")))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().expect("8")))
    }

    fn sized(&mut self, count: usize, width: usize) -> Result<&'a [u8], String> {
        let n = count.checked_mul(width).ok_or("length overflows")?;
        self.bytes(n)
    }

    fn u32s(&mut self, count: usize) -> Result<Vec<u32>, String> {
        Ok(self
            .sized(count, 4)?
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4")))
            .collect())
    }

    fn u64s(&mut self, count: usize) -> Result<Vec<u64>, String> {
        Ok(self
            .sized(count, 8)?
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8")))
            .collect())
    }

    fn f32s(&mut self, count: usize) -> Result<Vec<f32>, String> {
        Ok(self
            .sized(count, 4)?
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4")))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(metric: Metric, quantization: Quantization, rows: usize) -> HnswIndex {
        tiny_with(metric, quantization, rows, HnswParams::with_m(4, 32, 16))
    }

    fn tiny_with(
        metric: Metric,
        quantization: Quantization,
        rows: usize,
        params: HnswParams,
    ) -> HnswIndex {
        let mut index = HnswIndex::new(4, metric, params, quantization);
        for i in 0..rows {
            let x = i as f32;
            let mut v = vec![(x * 0.37).sin(), (x * 0.11).cos(), (x * 0.07).sin(), 0.5];
            if metric == Metric::Cosine {
                let n = kernels::norm(&v);
                v.iter_mut().for_each(|c| *c /= n);
            }
            index.insert(i as u64, &v);
        }
        index
    }

    #[test]
    fn params_are_validated() {
        assert!(HnswParams::default().validate().is_ok());
        let bad = HnswParams {
            m: 1,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = HnswParams {
            ef_search: EF_LIMIT + 1,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let q = Quantization::Int8 {
            rescore: true,
            oversampling: 0.5,
        };
        assert!(q.validate().is_err());
    }

    #[test]
    fn small_index_finds_itself_and_keeps_invariants() {
        for metric in [Metric::Cosine, Metric::L2, Metric::Dot] {
            let index = tiny(metric, Quantization::None, 300);
            index.assert_invariants();
            let found = index.search(&[0.0, 1.0, 0.0, 0.5], 5, None, None, None, None);
            assert_eq!(found.len(), 5);
            assert!(found.windows(2).all(|w| w[0].1 <= w[1].1));
        }
    }

    #[test]
    fn removed_rows_are_never_returned_and_are_reused() {
        let mut index = tiny(Metric::L2, Quantization::None, 200);
        for row in (0..200).step_by(2) {
            index.remove(row);
        }
        assert_eq!(index.len(), 100);
        assert_eq!(index.tombstones(), 100);
        let found = index.search(&[0.0, 1.0, 0.0, 0.5], 150, Some(200), None, None, None);
        assert_eq!(found.len(), 100);
        assert!(found.iter().all(|(id, _)| id % 2 == 1));
        let row = index.insert(1000, &[0.0, 1.0, 0.0, 0.5]);
        assert!(row < 200);
        index.assert_invariants();
        let found = index.search(&[0.0, 1.0, 0.0, 0.5], 1, None, None, None, None);
        assert_eq!(found[0].0, 1000);
    }

    #[test]
    fn lists_end_at_the_end_mark_and_links_widen_before_it_is_a_row() {
        // 8 bits number rows 0..=254: 255 is the end mark, so row 255 needs a ninth bit.
        let index = tiny(Metric::L2, Quantization::None, 255);
        assert_eq!(index.link_bits(), 8);
        index.assert_invariants();
        let index = tiny(Metric::L2, Quantization::None, 256);
        assert_eq!(index.link_bits(), 9);
        index.assert_invariants();
        // Every row has links and none past its list's end; full and short lists both occur.
        let mut list = Vec::new();
        let (mut full, mut short) = (0, 0);
        for row in 0..256 {
            index.level0_neighbours(row, &mut list);
            assert!(!list.is_empty() && list.iter().all(|&n| n < 256 && n != row));
            if list.len() == index.params().m0 {
                full += 1;
            } else {
                short += 1;
            }
        }
        assert!(full > 0 && short > 0, "full {full}, short {short}");
    }

    #[test]
    fn ids_past_u32_widen_the_id_table_and_survive_a_round_trip() {
        let mut index = tiny(Metric::L2, Quantization::None, 300);
        let narrow_bytes = index.memory_bytes();
        // Far from every `tiny` row (their components lie in [-1, 1]): its own nearest.
        let probe = [3.0, -3.0, 3.0, 0.5];
        let big = (1u64 << 40) + 7;
        index.remove(3);
        let row = index.insert(big, &probe);
        assert_eq!(row, 3, "the freed row is reused");
        assert_eq!(index.id(row), Some(big));
        assert!(
            index.memory_bytes() >= narrow_bytes + 300 * 4,
            "ids are 8 bytes now"
        );
        index.assert_invariants();
        let found = index.search(&probe, 1, None, None, None, None);
        assert_eq!(found[0].0, big);
        let only_big = |id: u64| id == big;
        let found = index.search(&probe, 1, None, None, Some(&only_big), None);
        assert_eq!(found, vec![(big, found[0].1)]);
        let mut bytes = Vec::new();
        index.write_to(&mut bytes).expect("write");
        let back = HnswIndex::read_from(&mut &bytes[..]).expect("read");
        back.assert_invariants();
        assert_eq!(back.id(3), Some(big));
        assert_eq!(back.id(4), Some(4));
        // Renamed back below 2³², ids read back 4 bytes wide again.
        let mut renamed = back.clone();
        renamed.remap_ids(|id| if id == big { 3 } else { id });
        let mut bytes = Vec::new();
        renamed.write_to(&mut bytes).expect("write");
        let narrow = HnswIndex::read_from(&mut &bytes[..]).expect("read");
        assert_eq!(narrow.id(3), Some(3));
        assert!(narrow.memory_bytes() + 300 * 4 <= back.memory_bytes());
    }

    #[test]
    fn upper_offsets_stay_sorted_when_a_reused_row_rises() {
        let mut index = tiny(Metric::L2, Quantization::None, 400);
        let upper_before = index.upper_offsets.len();
        // Free every level-0 row, then reinsert until some reused row draws a level above 0.
        let ground: Vec<u32> = (0..400u32)
            .filter(|&r| index.levels[r as usize] == 0 && Some(r) != index.entry)
            .collect();
        for &row in &ground {
            index.remove(row);
        }
        let mut risen = 0;
        for i in 0..ground.len() {
            let x = i as f32 + 0.5;
            let reused = index.insert(10_000 + i as u64, &[x.sin(), x.cos(), 0.3, 0.5]);
            assert!(ground.contains(&reused), "a freed row is reused");
            if index.levels[reused as usize] > 0 {
                risen += 1;
            }
        }
        assert!(risen > 0, "some reused row rose above level 0");
        assert_eq!(index.upper_offsets.len(), upper_before + risen);
        index.assert_invariants();
    }

    #[test]
    fn format_1_files_are_still_read_and_links_widen_with_rows() {
        let q = Quantization::Int8 {
            rescore: false,
            oversampling: 2.0,
        };
        for (metric, quantization) in [(Metric::L2, Quantization::None), (Metric::L2, q)] {
            // 1,500 rows: past int8 training and past 10 bits per link.
            let index = tiny(metric, quantization, 1_500);
            assert_eq!(index.link_bits(), 11);
            index.assert_invariants();
            let (mut v1, mut v2) = (Vec::new(), Vec::new());
            index.write_version(&mut v1, 1).expect("write v1");
            index.write_to(&mut v2).expect("write v2");
            assert!(
                v2.len() < v1.len(),
                "format 2 stores lists at their exact size"
            );
            let from_v1 = HnswIndex::read_from(&mut &v1[..]).expect("read v1");
            let from_v2 = HnswIndex::read_from(&mut &v2[..]).expect("read v2");
            let probe = [0.0, 1.0, 0.0, 0.5];
            let want = index.search(&probe, 10, None, None, None, None);
            assert_eq!(from_v1.search(&probe, 10, None, None, None, None), want);
            assert_eq!(from_v2.search(&probe, 10, None, None, None, None), want);
            let mut again = Vec::new();
            from_v1.write_to(&mut again).expect("rewrite");
            assert_eq!(
                again, v2,
                "v1 → v2 gives the same bytes as writing v2 directly"
            );
        }
    }

    /// `m0 < 2m` caps every level-0 list at `m0`, costs `(2m − m0)` links less per row, and
    /// is written in format 3 (which carries `m0`); `m0 = 2m` stays format 2.
    #[test]
    fn a_smaller_level0_degree_caps_lists_and_round_trips_in_format_3() {
        let q = Quantization::Int8 {
            rescore: false,
            oversampling: 2.0,
        };
        let version_of = |bytes: &[u8]| u32::from_le_bytes(bytes[8..12].try_into().expect("4"));
        for quantization in [Quantization::None, q] {
            let full = tiny(Metric::L2, quantization, 1_500);
            let lean_params = HnswParams {
                m0: 5,
                ..HnswParams::with_m(4, 32, 16)
            };
            let lean = tiny_with(Metric::L2, quantization, 1_500, lean_params);
            lean.assert_invariants();
            assert_eq!(lean.params(), lean_params);
            let (mut list, mut full_lists) = (Vec::new(), 0);
            for row in 0..1_500 {
                lean.level0_neighbours(row, &mut list);
                assert!(!list.is_empty() && list.len() <= 5, "row {row}: {list:?}");
                full_lists += usize::from(list.len() == 5);
            }
            assert!(full_lists > 0, "some list reaches m0");
            // Same link width (11 bits at 1,500 rows), 3 links fewer per row.
            assert_eq!(lean.link_bits(), full.link_bits());
            let saved = full.memory_bytes() - lean.memory_bytes();
            assert!(
                saved >= 1_500 * 3 * 11 / 8,
                "{saved} bytes saved, {} and {}",
                full.memory_bytes(),
                lean.memory_bytes()
            );

            let (mut v_full, mut v_lean) = (Vec::new(), Vec::new());
            full.write_to(&mut v_full).expect("write full");
            lean.write_to(&mut v_lean).expect("write lean");
            assert_eq!(version_of(&v_full), 2);
            assert_eq!(version_of(&v_lean), 3);
            let back = HnswIndex::read_from(&mut &v_lean[..]).expect("read format 3");
            assert_eq!(back.params(), lean_params);
            for i in [0usize, 77, 1_234] {
                let x = i as f32;
                let probe = [(x * 0.37).sin(), (x * 0.11).cos(), (x * 0.07).sin(), 0.5];
                let want = lean.search(&probe, 10, None, None, None, None);
                assert_eq!(want[0].0, i as u64, "a stored vector finds itself");
                assert_eq!(back.search(&probe, 10, None, None, None, None), want);
            }
            let mut again = Vec::new();
            back.write_to(&mut again).expect("rewrite");
            assert_eq!(again, v_lean);

            // A format 3 file whose m0 is out of range is refused, not trusted.
            let mut bad = v_lean.clone();
            // payload: dimension u32, metric u8, m, ef_construction, ef_search, then m0.
            let at = 24 + 4 + 1 + 12;
            bad[at..at + 4].copy_from_slice(&9u32.to_le_bytes());
            let crc = crc32c::crc32c(&bad[24..]);
            bad[20..24].copy_from_slice(&crc.to_le_bytes());
            let err = HnswIndex::read_from(&mut &bad[..]).expect_err("m0 9 > 2m");
            assert!(err.to_string().contains("m0"), "{err}");
        }
    }

    #[test]
    fn int8_trains_after_train_rows_and_drops_floats() {
        let q = Quantization::Int8 {
            rescore: false,
            oversampling: 2.0,
        };
        let index = tiny(Metric::L2, q, TRAIN_ROWS - 1);
        assert!(!index.is_quantized());
        let index = tiny(Metric::L2, q, TRAIN_ROWS + 10);
        assert!(index.is_quantized());
        index.assert_invariants();
        let found = index.search(&[0.0, 1.0, 0.0, 0.5], 3, None, None, None, None);
        assert_eq!(found.len(), 3);
    }
}
