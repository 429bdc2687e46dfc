//! A library's approximate index: an HNSW graph kept beside the exact [`FlatIndex`], keyed by
//! the engine's chunk keys, with everything needed to rebuild it without stopping searches.
//!
//! The flat index stays the library's store of record for vectors (exact scans, the
//! planner's fallback, rescoring of int8 codes go through it or the documents); the graph is
//! derived data. So it may be missing (being built, or its file damaged) and searches stay
//! correct — just exact instead of approximate — while [`build`] makes a new one beside the
//! live state and swaps it in.
//!
//! This module must never decide what the state *is*: it only mirrors inserts and removes
//! that `state` applies, in the same order, so replay and live writes give the same graph
//! membership.

use crate::state::{index_metric, KeyHasher, Shard};
use quiver_index::{HnswIndex, HnswParams, VectorSource};
use quiver_model::{HnswConfig, Library, Quantization};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

/// Rows copied into a graph under one read lock while rebuilding: bounds how long one
/// builder step keeps a writer of that library waiting.
const BUILD_STEP_ROWS: usize = 512;
/// Changes recorded while a rebuild runs; past this the rebuild starts over from the newer
/// state rather than holding an ever longer journal.
pub(crate) const JOURNAL_OPS_LIMIT: usize = 4_000_000;

pub(crate) fn params_of(c: &HnswConfig) -> HnswParams {
    HnswParams {
        m: c.m as usize,
        m0: c.level0_degree() as usize,
        ef_construction: c.ef_construction as usize,
        ef_search: c.ef_search as usize,
    }
}

/// Whether `graph` was built for `c`: same shape (`m`, `m0`, `ef_construction`,
/// `ef_search`) and same quantization. A graph file that does not fit its library's
/// configuration is rebuilt rather than served under parameters it was not built with.
pub(crate) fn fits(c: &HnswConfig, graph: &HnswIndex) -> bool {
    graph.params() == params_of(c) && graph.quantization() == quantization_of(c)
}

fn quantization_of(c: &HnswConfig) -> quiver_index::Quantization {
    match c.quantization {
        Quantization::None => quiver_index::Quantization::None,
        Quantization::Int8 {
            rescore,
            oversampling,
        } => quiver_index::Quantization::Int8 {
            rescore,
            oversampling,
        },
    }
}

/// The candidate list a search of `k` results needs on this graph: `ef` (or the library's
/// `ef_search`) raised to `k`, times the oversampling when int8 codes are rescored.
pub(crate) fn candidates_needed(c: &HnswConfig, k: usize, ef: Option<usize>) -> usize {
    let base = ef.unwrap_or(c.ef_search as usize).max(k);
    match c.quantization {
        Quantization::Int8 {
            rescore: true,
            oversampling,
        } => base.max((k as f32 * oversampling).ceil() as usize),
        _ => base,
    }
}

/// One HNSW graph and the map from chunk key to graph row.
pub(crate) struct Ann {
    pub config: HnswConfig,
    pub index: HnswIndex,
    rows: HashMap<u64, u32, KeyHasher>,
}

impl Ann {
    pub fn new(library: &Library, config: HnswConfig) -> Ann {
        Ann {
            config,
            index: HnswIndex::new(
                library.dimension as usize,
                index_metric(library.metric),
                params_of(&config),
                quantization_of(&config),
            ),
            rows: HashMap::default(),
        }
    }

    /// Wraps a graph read from disk; its ids are the chunk keys.
    pub fn from_index(config: HnswConfig, index: HnswIndex) -> Ann {
        let rows = (0..index.slot_count() as u32)
            .filter_map(|row| index.id(row).map(|id| (id, row)))
            .collect();
        Ann {
            config,
            index,
            rows,
        }
    }

    /// Inserts `key` unless it is already in the graph (a rebuild may see a row both in its
    /// scan and in its journal).
    pub fn insert(&mut self, key: u64, vector: &[f32]) {
        if self.rows.contains_key(&key) {
            return;
        }
        let row = self.index.insert(key, vector);
        self.rows.insert(key, row);
    }

    pub fn remove(&mut self, key: u64) {
        if let Some(row) = self.rows.remove(&key) {
            self.index.remove(row);
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }
}

/// Progress of a rebuild, readable without the library's lock.
#[derive(Default, Debug)]
pub struct BuildProgress {
    pub current: AtomicU64,
    pub total: AtomicU64,
}

/// The approximate index of a library, if it has one.
pub(crate) enum AnnSlot {
    /// A flat library.
    None,
    /// Being loaded from a snapshot: inserts skip the graph, which the snapshot's graph file
    /// (or a rebuild) supplies once loading ends.
    Deferred(HnswConfig),
    Ready(Box<Ann>),
    /// A new graph is being built beside the live state. Searches use `current` (the old
    /// graph) or the exact scan; inserts and removes go to `current` and to the journal that
    /// the builder replays before it swaps the new graph in.
    Building {
        config: HnswConfig,
        current: Option<Box<Ann>>,
        journal: Vec<(bool, u64)>,
        generation: u64,
        progress: Arc<BuildProgress>,
    },
}

impl AnnSlot {
    /// The graph searches should use now, if any.
    pub fn serving(&self) -> Option<&Ann> {
        match self {
            AnnSlot::Ready(a) => Some(a),
            AnnSlot::Building { current, .. } => current.as_deref(),
            AnnSlot::None | AnnSlot::Deferred(_) => None,
        }
    }

    pub fn insert(&mut self, key: u64, vector: &[f32]) {
        match self {
            AnnSlot::Ready(a) => a.insert(key, vector),
            AnnSlot::Building {
                current, journal, ..
            } => {
                if let Some(a) = current {
                    a.insert(key, vector);
                }
                journal.push((true, key));
            }
            AnnSlot::None | AnnSlot::Deferred(_) => {}
        }
    }

    pub fn remove(&mut self, key: u64) {
        match self {
            AnnSlot::Ready(a) => a.remove(key),
            AnnSlot::Building {
                current, journal, ..
            } => {
                if let Some(a) = current {
                    a.remove(key);
                }
                journal.push((false, key));
            }
            AnnSlot::None | AnnSlot::Deferred(_) => {}
        }
    }

    /// Whether the journal of a running rebuild has outgrown its limit.
    pub fn journal_full(&self) -> bool {
        matches!(self, AnnSlot::Building { journal, .. } if journal.len() >= JOURNAL_OPS_LIMIT)
    }

    pub fn config(&self) -> Option<HnswConfig> {
        match self {
            AnnSlot::None => None,
            AnnSlot::Deferred(c) => Some(*c),
            AnnSlot::Ready(a) => Some(a.config),
            AnnSlot::Building { config, .. } => Some(*config),
        }
    }

    pub fn generation(&self) -> u64 {
        match self {
            AnnSlot::Building { generation, .. } => *generation,
            _ => 0,
        }
    }
}

/// Counter for rebuild generations: a newer rebuild makes an older builder give up.
static GENERATION: AtomicU64 = AtomicU64::new(1);

/// Rebuilds the graph of `shard`'s library with `config` beside the live state: marks the
/// slot as building (searches keep the old graph or the exact scan), then a background
/// thread copies rows under short read locks, replays the journal under the write lock and
/// swaps. Must be called with the shard's write lock held (`slot` is its `ann`).
pub(crate) fn start_rebuild(shard: &Arc<Shard>, slot: &mut AnnSlot, config: HnswConfig) {
    let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
    let current = match std::mem::replace(slot, AnnSlot::None) {
        AnnSlot::Ready(a) => Some(a),
        AnnSlot::Building { current, .. } => current,
        AnnSlot::None | AnnSlot::Deferred(_) => None,
    };
    let progress = Arc::new(BuildProgress::default());
    *slot = AnnSlot::Building {
        config,
        current,
        journal: Vec::new(),
        generation,
        progress: progress.clone(),
    };
    let weak = Arc::downgrade(shard);
    let spawned = std::thread::Builder::new()
        .name("quiver-index-build".into())
        .spawn(move || build(weak, generation, config, progress));
    if let Err(e) = spawned {
        // Searches stay exact (or on the old graph); the next rebuild request tries again.
        tracing::error!("could not start an index build thread: {e}");
    }
}

fn build(shard: Weak<Shard>, generation: u64, config: HnswConfig, progress: Arc<BuildProgress>) {
    let started = std::time::Instant::now();
    let mut ann = {
        let Some(shard) = shard.upgrade() else { return };
        let st = shard.state.read();
        progress
            .total
            .store(st.num_chunks as u64, Ordering::Relaxed);
        Ann::new(&st.library, config)
    };
    let mut row = 0usize;
    loop {
        let Some(shard) = shard.upgrade() else { return };
        let st = shard.state.read();
        if st.ann.generation() != generation {
            return; // superseded by a newer rebuild or a switch back to flat
        }
        let end = (row + BUILD_STEP_ROWS).min(st.index.slot_count());
        if row >= end {
            break;
        }
        for r in row..end {
            if let Some((key, v)) = st.index.get(r as u32) {
                ann.insert(key, v);
            }
        }
        row = end;
        progress.current.store(ann.len() as u64, Ordering::Relaxed);
    }
    let Some(shard) = shard.upgrade() else { return };
    let mut st = shard.state.write();
    if st.ann.generation() != generation {
        return;
    }
    let slot = std::mem::replace(&mut st.ann, AnnSlot::None);
    let AnnSlot::Building { journal, .. } = slot else {
        unreachable!("generation matched a building slot")
    };
    for (insert, key) in journal {
        if insert {
            if let Some(v) = st.vector_of(key) {
                ann.insert(key, v);
            }
        } else {
            ann.remove(key);
        }
    }
    assert_eq!(
        ann.len(),
        st.num_chunks,
        "a rebuilt graph holds every live chunk"
    );
    tracing::info!(
        library = %st.library.id,
        rows = ann.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "index built"
    );
    st.ann = AnnSlot::Ready(Box::new(ann));
}

/// Original vectors for rescoring int8 candidates, looked up through the library's state.
pub(crate) struct StateVectors<'a>(pub &'a crate::state::LibraryState);

impl VectorSource for StateVectors<'_> {
    fn vector(&self, id: u64) -> Option<&[f32]> {
        self.0.vector_of(id)
    }
}

/// Serialises a graph with its ids renumbered by `renumber` (chunk keys as they will be
/// after a snapshot is loaded), for the snapshot's graph file.
pub(crate) fn renumbered(ann: &Ann, renumber: &HashMap<u64, u64, KeyHasher>) -> HnswIndex {
    let mut index = ann.index.clone();
    index.remap_ids(|id| renumber.get(&id).copied().unwrap_or(u64::MAX));
    index
}
