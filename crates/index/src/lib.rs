//! # quiver-index — exact and approximate nearest-neighbour search over dense `f32` vectors
//!
//! This crate owns the in-memory vector index of Quiver: how vectors are laid out in memory,
//! how the distance between two vectors is computed (and how fast), and how the `k` nearest
//! rows to a query are selected. It answers "which caller ids are closest to this query" and
//! nothing else.
//!
//! It must never do I/O, take locks, spawn threads or validate untrusted input. The engine
//! owns durability (the log), concurrency (its own `RwLock` around an index) and validation
//! (`quiver-model`); keeping the index plain data makes it `Send + Sync`, lets `search(&self)`
//! run concurrently from many readers, and keeps every cost here a CPU cost that a benchmark
//! can see. Malformed input (wrong dimension, non-finite components, an out-of-range row) is a
//! caller bug and is met with an assertion, not an error value.
//!
//! Layout:
//! - [`kernels`] — distance kernels (`dot`, `l2_squared`, `norm`), a portable version and an
//!   AVX2+FMA version picked once at run time.
//! - [`topk`] — [`TopK`], the bounded max-heap that keeps the `k` smallest distances.
//! - [`flat`] — [`FlatIndex`], contiguous row-major storage with a fused, exact scan.
//! - [`hnsw`] — [`HnswIndex`], an HNSW graph: filters applied during traversal with a planner
//!   that falls back to an exact scan for selective filters, tombstone deletes with row reuse,
//!   optional int8 codes with rescoring on the caller's originals, a checksummed binary format.
//! - [`sq8`] — [`Sq8`], per-dimension int8 scalar quantization and its `u8 × f32` kernel.
//!
//! Distance convention (always ascending = closer first):
//! - [`Metric::Cosine`]: `1 − dot(q̂, v)`; stored vectors are L2-normalised by the caller, the
//!   query is normalised by the index.
//! - [`Metric::Dot`]: `−dot(q, v)`.
//! - [`Metric::L2`]: Euclidean distance `sqrt(l2_squared(q, v))`, compared squared internally.

pub mod flat;
pub mod hnsw;
pub mod kernels;
pub mod sq8;
pub mod topk;

pub use flat::{FlatIndex, ROW_LIMIT};
pub use hnsw::{
    HnswIndex, HnswParams, IndexFormatError, Plan, Quantization, VectorSource, EF_LIMIT, M_LIMIT,
};
pub use sq8::Sq8;
pub use topk::{TopK, TOPK_LIMIT};

/// The largest vector dimension any index accepts. Bounds the per-query scratch (one query
/// copy) and the cost of one distance evaluation.
pub const DIMENSION_LIMIT: usize = 4096;

/// How distance between a query and a stored vector is measured. See the crate docs for the
/// exact formula of each; every metric is reported so that smaller means closer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// `1 − cosine similarity`, in `[0, 2]` for normalised vectors.
    Cosine,
    /// Negated inner product: `−dot(q, v)`.
    Dot,
    /// Euclidean distance.
    L2,
}
