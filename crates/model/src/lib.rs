//! # quiver-model — the nouns of Quiver and their one binary encoding
//!
//! This crate owns the domain types (libraries, documents, chunks), the limits every layer
//! enforces, input validation that needs no state, and [`record::Record`]: the versioned
//! binary payload of one log record. Everything durable in Quiver is a `Record`, so this is
//! the one place that decides what bytes mean.
//!
//! It must never do I/O, hold locks or know about HTTP: the log, the engine and the server all
//! depend on it, and it depends on none of them. That keeps the format testable in isolation
//! (the codec is fuzzed in `record::tests`) and keeps a change of shape visible in one diff.
//!
//! Layout:
//! - [`limits`] — every bound in the product, with its unit in its name.
//! - [`types`] — `Library`, `Document`, `Chunk`, `Metric`, `IndexType`.
//! - [`validate`] — stateless checks on names, ids, metadata and vectors.
//! - [`codec`] — a small bounds-checked binary reader/writer (no allocation driven by
//!   untrusted lengths beyond the bytes actually present).
//! - [`record`] — the log record enum and its versioned encoding.
//! - [`time`] — milliseconds since the epoch and their RFC 3339 rendering.

pub mod codec;
pub mod limits;
pub mod record;
pub mod time;
pub mod types;
pub mod validate;

pub use record::{Record, RecordMeta};
pub use types::{Chunk, Document, HnswConfig, IndexType, Library, Metric, Quantization};
