//! # quiver-engine — state as a fold of the log
//!
//! The engine owns the in-memory state (libraries, documents, vector indexes) and the only
//! path that changes it: validate → append to the log → apply in `seq` order → acknowledge
//! once durable. On start it loads the newest snapshot and replays the log after it; in the
//! background it writes new snapshots and lets the log drop segments nobody needs.
//!
//! It must never change state except by applying a record that is in the log, and never
//! publish anything: subscribers read the log itself, so an event exists exactly when its
//! change committed.
//!
//! Layout:
//! - [`engine`] — `Engine`: open/recover, the write paths, reads and search, snapshots.
//! - [`state`] — the catalog and per-library shards; `apply(record)`.
//! - `ann` — a library's HNSW graph beside its exact index: mirrored inserts/removes, rebuilds
//!   beside the live state, swaps.
//! - [`input`] — wire shapes of writes and their validation into domain values.
//! - [`filter`] — metadata filters, parsed once and evaluated during the scan.
//! - [`snapshot`] — the snapshot file format (log frames) and its checks.
//! - `replica` — being one replica of a log kept in NATS JetStream: the position in the stream
//!   at start-up and the follower thread (commits and folds are the engine's).
//! - [`error`] — `EngineError`, one variant per kind of HTTP status.

mod ann;
pub mod engine;
pub mod error;
pub mod events;
pub mod filter;
pub mod input;
mod replica;
mod snapshot;
pub mod state;

pub use engine::{
    AppEventInput, Committed, Engine, EngineConfig, EngineStats, Hit, ItemOutcome, LibraryInfo,
    WriteCtx,
};
pub use error::{EngineError, Result};
pub use quiver_log::{FsyncPolicy, JetStreamConfig, Retention, Seq};
