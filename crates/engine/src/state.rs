//! In-memory state: the fold of the log. One [`Shard`] per library holds its documents and
//! its vector index behind one `RwLock`, so searches in a library run concurrently with each
//! other and with writes to other libraries, and a write to a library is applied atomically
//! (a reader never sees half a document).
//!
//! Applying a record is deterministic and is the only way state changes — the live write
//! path and start-up replay call the same [`Catalog::apply`]. It must never read a clock,
//! generate an id or consult anything outside the record, or replay would diverge.

use crate::ann::{self, Ann, AnnSlot};
use parking_lot::RwLock;
use quiver_index::FlatIndex;
use quiver_model::record::Change;
use quiver_model::{Chunk, Document, Library, Metric, Record};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

pub(crate) fn index_metric(m: Metric) -> quiver_index::Metric {
    match m {
        Metric::Cosine => quiver_index::Metric::Cosine,
        Metric::Dot => quiver_index::Metric::Dot,
        Metric::L2 => quiver_index::Metric::L2,
    }
}

/// Hashing for the engine's own u64 chunk keys (sequential, never chosen by a client, so no
/// flooding risk): one multiply instead of SipHash on the ingest and filter paths.
#[derive(Clone, Copy, Default)]
pub(crate) struct KeyHasher;

impl std::hash::BuildHasher for KeyHasher {
    type Hasher = KeyHash;
    fn build_hasher(&self) -> KeyHash {
        KeyHash(0)
    }
}

pub(crate) struct KeyHash(u64);

impl std::hash::Hasher for KeyHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: spreads sequential keys over the high bits hashbrown uses.
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// What `GET /v1/libraries/{id}/index` reports.
#[derive(Clone, Debug)]
pub struct IndexStatus {
    pub index_type: quiver_model::IndexType,
    pub vectors: usize,
    /// The exact index (also the store the graph is rebuilt and rescored from).
    pub flat_memory_bytes: usize,
    /// The graph serving searches, when there is one.
    pub graph_memory_bytes: Option<usize>,
    pub graph_rows: Option<usize>,
    pub tombstones: Option<usize>,
    /// `"hnsw"` or `"flat"`: what answers searches right now.
    pub serving: &'static str,
    pub building: bool,
    /// (current, total) rows of a running build.
    pub progress: Option<(u64, u64)>,
}

/// Where an index row's chunk lives: its document (shared, immutable) and its position.
#[derive(Clone)]
pub(crate) struct ChunkLoc {
    pub doc: Arc<Document>,
    pub idx: u32,
}

pub(crate) struct DocEntry {
    pub doc: Arc<Document>,
    /// (key, index row) per chunk, in chunk order.
    pub rows: Vec<(u64, u32)>,
}

/// New vectors being staged for a library by a re-embedding (see [`Change::ReembedStarted`]):
/// held beside the live index, never searched, swapped in by [`Change::Reembedded`].
pub(crate) struct Staging {
    pub model: String,
    pub dimension: u32,
    /// Document id → (chunk ids, vectors), both in chunk order.
    pub docs: HashMap<String, (Vec<String>, Vec<Vec<f32>>)>,
}

impl Staging {
    /// Whether `doc` is staged with exactly its current chunks.
    pub(crate) fn covers(&self, doc: &Document) -> bool {
        self.docs.get(&doc.id).is_some_and(|(ids, _)| {
            ids.len() == doc.chunks.len() && ids.iter().zip(&doc.chunks).all(|(i, c)| *i == c.id)
        })
    }
}

/// One library's state.
pub struct LibraryState {
    pub library: Library,
    pub(crate) docs: BTreeMap<String, DocEntry>,
    pub(crate) index: FlatIndex,
    pub(crate) locs: HashMap<u64, ChunkLoc, KeyHasher>,
    /// The approximate index, for `hnsw` libraries (see [`crate::ann`]).
    pub(crate) ann: AnnSlot,
    next_key: u64,
    pub num_chunks: usize,
    /// A running re-embedding's staged vectors, if any.
    pub(crate) staging: Option<Staging>,
}

pub struct Shard {
    pub state: RwLock<LibraryState>,
}

/// Why a record could not be applied. Live writes are validated first, so this only happens
/// when a log disagrees with itself — start-up treats it as corruption.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ApplyError(pub String);

impl LibraryState {
    /// A new, empty library. `defer_graph` (snapshot loading) leaves an HNSW graph to be
    /// attached afterwards instead of growing it insert by insert.
    fn new(library: Library, defer_graph: bool) -> Self {
        let index = FlatIndex::new(library.dimension as usize, index_metric(library.metric));
        let ann = match library.index_type.hnsw() {
            None => AnnSlot::None,
            Some(c) if defer_graph => AnnSlot::Deferred(c),
            Some(c) => AnnSlot::Ready(Box::new(Ann::new(&library, c))),
        };
        LibraryState {
            library,
            docs: BTreeMap::new(),
            index,
            locs: HashMap::default(),
            ann,
            next_key: 0,
            num_chunks: 0,
            staging: None,
        }
    }

    /// A change to a document drops its staged vectors: they were made from its old chunks.
    fn unstage(&mut self, id: &str) {
        if let Some(s) = &mut self.staging {
            s.docs.remove(id);
        }
    }

    /// The target `(model, dimension)` of a running re-embedding, and how many of the
    /// library's documents are staged for it.
    pub fn staging(&self) -> Option<(&str, u32, usize)> {
        self.staging.as_ref().map(|s| {
            let staged = self.docs.values().filter(|e| s.covers(&e.doc)).count();
            (s.model.as_str(), s.dimension, staged)
        })
    }

    /// Ids of documents not (or no longer) staged for the running re-embedding, in id order.
    pub fn unstaged_documents(&self) -> Vec<String> {
        match &self.staging {
            None => Vec::new(),
            Some(s) => self
                .docs
                .values()
                .filter(|e| !s.covers(&e.doc))
                .map(|e| e.doc.id.clone())
                .collect(),
        }
    }

    /// Replaces every chunk's vector by its staged one and takes `lib` (new model and
    /// dimension): a fresh exact index is filled; the caller gives HNSW libraries their graph.
    /// Checks first, so a failure changes nothing.
    fn switch_embeddings(&mut self, lib: Library) -> Result<(), ApplyError> {
        let ok = match &self.staging {
            None => Err("no re-embedding is staged".to_string()),
            Some(s)
                if Some(&s.model) != lib.embedding_model.as_ref()
                    || s.dimension != lib.dimension =>
            {
                Err(format!(
                    "the staged re-embedding is for {} ({}-d), not {:?} ({}-d)",
                    s.model, s.dimension, lib.embedding_model, lib.dimension
                ))
            }
            Some(s) => match self.docs.values().find(|e| !s.covers(&e.doc)) {
                Some(e) => Err(format!("document {:?} is not staged", e.doc.id)),
                None => Ok(()),
            },
        };
        ok.map_err(|why| ApplyError(format!("library {}: {why}", lib.id)))?;
        let Some(mut staging) = self.staging.take() else {
            unreachable!("checked above")
        };
        let flat = Library {
            index_type: quiver_model::IndexType::Flat,
            ..lib.clone()
        };
        let mut fresh = LibraryState::new(flat, false);
        for (id, entry) in std::mem::take(&mut self.docs) {
            let mut doc = (*entry.doc).clone();
            if let Some((_, vectors)) = staging.docs.remove(&id) {
                for (c, v) in doc.chunks.iter_mut().zip(vectors) {
                    c.embedding = v;
                }
            }
            fresh.upsert(doc);
        }
        fresh.library = lib;
        *self = fresh;
        Ok(())
    }

    /// The stored (normalised, for cosine) vector of a chunk key.
    pub(crate) fn vector_of(&self, key: u64) -> Option<&[f32]> {
        self.locs
            .get(&key)
            .map(|l| &l.doc.chunks[l.idx as usize].embedding[..])
    }

    /// A copy of the serving graph with ids renumbered to the keys this state's chunks get
    /// when a snapshot of it is loaded (documents in id order, chunks in order, from 0);
    /// `None` for flat libraries and while a graph is being built.
    pub(crate) fn graph_for_snapshot(&self) -> Option<quiver_index::HnswIndex> {
        let AnnSlot::Ready(graph) = &self.ann else {
            return None;
        };
        let mut renumber: HashMap<u64, u64, KeyHasher> = HashMap::default();
        renumber.reserve(self.num_chunks);
        let mut next = 0u64;
        for entry in self.docs.values() {
            for &(key, _) in &entry.rows {
                renumber.insert(key, next);
                next += 1;
            }
        }
        Some(ann::renumbered(graph, &renumber))
    }

    /// Type, parameters, size and build state of the library's index.
    pub fn index_status(&self) -> IndexStatus {
        let (building, progress) = match &self.ann {
            AnnSlot::Building { progress, .. } => (
                true,
                Some((
                    progress.current.load(std::sync::atomic::Ordering::Relaxed),
                    progress.total.load(std::sync::atomic::Ordering::Relaxed),
                )),
            ),
            AnnSlot::Deferred(_) => (true, None),
            _ => (false, None),
        };
        let serving = self.ann.serving();
        IndexStatus {
            index_type: self.library.index_type,
            vectors: self.num_chunks,
            flat_memory_bytes: self.index.memory_bytes(),
            graph_memory_bytes: serving.map(|a| a.index.memory_bytes()),
            graph_rows: serving.map(Ann::len),
            tombstones: serving.map(|a| a.index.tombstones()),
            serving: if serving.is_some() { "hnsw" } else { "flat" },
            building,
            progress,
        }
    }

    pub fn num_documents(&self) -> usize {
        self.docs.len()
    }

    pub fn document(&self, id: &str) -> Option<&Arc<Document>> {
        self.docs.get(id).map(|e| &e.doc)
    }

    /// Memory of the exact index plus the serving graph, measured from their allocations.
    pub fn index_memory_bytes(&self) -> usize {
        self.index.memory_bytes() + self.ann.serving().map_or(0, |a| a.index.memory_bytes())
    }

    /// Documents in id order, starting after `after`.
    pub fn documents_after(&self, after: Option<&str>, limit: usize) -> Vec<Arc<Document>> {
        use std::ops::Bound;
        let lower = match after {
            Some(a) => Bound::Excluded(a.to_string()),
            None => Bound::Unbounded,
        };
        self.docs
            .range((lower, Bound::Unbounded))
            .take(limit)
            .map(|(_, e)| e.doc.clone())
            .collect()
    }

    pub fn all_documents(&self) -> Vec<Arc<Document>> {
        self.docs.values().map(|e| e.doc.clone()).collect()
    }

    fn insert_rows(&mut self, doc: &Arc<Document>, from: usize) -> Vec<(u64, u32)> {
        let mut rows = Vec::with_capacity(doc.chunks.len() - from);
        for (i, c) in doc.chunks.iter().enumerate().skip(from) {
            assert_eq!(
                c.embedding.len(),
                self.library.dimension as usize,
                "validated before apply"
            );
            let key = self.next_key;
            self.next_key += 1;
            let row = self.index.insert(key, &c.embedding);
            self.ann.insert(key, &c.embedding);
            self.locs.insert(
                key,
                ChunkLoc {
                    doc: doc.clone(),
                    idx: i as u32,
                },
            );
            rows.push((key, row));
        }
        self.num_chunks += rows.len();
        rows
    }

    fn remove_rows(&mut self, rows: &[(u64, u32)]) {
        for &(key, row) in rows {
            self.index.remove(row);
            self.ann.remove(key);
            self.locs.remove(&key);
        }
        self.num_chunks -= rows.len();
    }

    fn upsert(&mut self, doc: Document) {
        self.unstage(&doc.id);
        if let Some(old) = self.docs.remove(&doc.id) {
            self.remove_rows(&old.rows);
        }
        let doc = Arc::new(doc);
        let rows = self.insert_rows(&doc, 0);
        self.docs.insert(doc.id.clone(), DocEntry { doc, rows });
    }

    fn delete(&mut self, id: &str) -> Result<(), ApplyError> {
        self.unstage(id);
        let old = self
            .docs
            .remove(id)
            .ok_or_else(|| ApplyError(format!("document {id:?} does not exist")))?;
        self.remove_rows(&old.rows);
        Ok(())
    }

    /// Replaces a document's value (after adding or removing chunks) and repoints its rows.
    fn repoint(&mut self, id: &str, doc: Arc<Document>, rows: Vec<(u64, u32)>) {
        for (i, &(key, _)) in rows.iter().enumerate() {
            self.locs.insert(
                key,
                ChunkLoc {
                    doc: doc.clone(),
                    idx: i as u32,
                },
            );
        }
        self.docs.insert(id.to_string(), DocEntry { doc, rows });
    }

    fn add_chunks(&mut self, id: &str, chunks: Vec<Chunk>, at_ms: u64) -> Result<(), ApplyError> {
        self.unstage(id);
        let entry = self
            .docs
            .remove(id)
            .ok_or_else(|| ApplyError(format!("document {id:?} does not exist")))?;
        let mut doc = (*entry.doc).clone();
        let from = doc.chunks.len();
        doc.chunks.extend(chunks);
        doc.updated_at_ms = at_ms;
        let doc = Arc::new(doc);
        let mut rows = entry.rows;
        rows.extend(self.insert_rows(&doc, from));
        self.repoint(id, doc, rows);
        Ok(())
    }

    fn delete_chunk(&mut self, id: &str, chunk_id: &str, at_ms: u64) -> Result<(), ApplyError> {
        let entry = self
            .docs
            .get(id)
            .ok_or_else(|| ApplyError(format!("document {id:?} does not exist")))?;
        let pos = entry
            .doc
            .chunks
            .iter()
            .position(|c| c.id == chunk_id)
            .ok_or_else(|| {
                ApplyError(format!(
                    "chunk {chunk_id:?} does not exist in document {id:?}"
                ))
            })?;
        self.unstage(id);
        let Some(entry) = self.docs.remove(id) else {
            unreachable!("checked above")
        };
        let mut doc = (*entry.doc).clone();
        doc.chunks.remove(pos);
        doc.updated_at_ms = at_ms;
        let mut rows = entry.rows;
        let gone = rows.remove(pos);
        self.remove_rows(&[gone]);
        self.repoint(id, Arc::new(doc), rows);
        Ok(())
    }
}

/// All libraries, by id and by name.
#[derive(Default)]
pub struct Catalog {
    pub(crate) by_id: HashMap<String, Arc<Shard>>,
    pub(crate) by_name: HashMap<String, String>,
    /// Set while a snapshot loads: HNSW graphs come from the snapshot's graph files.
    pub(crate) defer_graphs: bool,
}

impl Catalog {
    pub fn shard(&self, id: &str) -> Option<&Arc<Shard>> {
        self.by_id.get(id)
    }

    /// Finds a library by id, then by name (so `--library docs` works as well as a uuid).
    pub fn resolve(&self, id_or_name: &str) -> Option<&Arc<Shard>> {
        self.by_id.get(id_or_name).or_else(|| {
            self.by_name
                .get(id_or_name)
                .and_then(|id| self.by_id.get(id))
        })
    }

    pub fn id_for_name(&self, name: &str) -> Option<&str> {
        self.by_name.get(name).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn shards(&self) -> impl Iterator<Item = &Arc<Shard>> {
        self.by_id.values()
    }

    fn library_shard(&self, id: &str) -> Result<Arc<Shard>, ApplyError> {
        self.by_id
            .get(id)
            .cloned()
            .ok_or_else(|| ApplyError(format!("library {id:?} does not exist")))
    }
}

/// A rebuild whose journal of concurrent changes outgrew its limit starts over from the
/// current state (bounded memory; the old graph or the exact scan keeps serving).
fn restart_overgrown_build(shard: &Arc<Shard>, st: &mut LibraryState) {
    if st.ann.journal_full() {
        if let Some(c) = st.ann.config() {
            ann::start_rebuild(shard, &mut st.ann, c);
        }
    }
}

/// Folds one record into the state. Library changes take the catalog's write lock; document
/// and chunk changes take it only to find the shard, so they never stall searches in other
/// libraries while they wait for that library's readers.
pub fn apply(catalog: &RwLock<Catalog>, record: Record) -> Result<(), ApplyError> {
    let at_ms = record.meta.timestamp_ms;
    let shard_of = |id: &str| catalog.read().library_shard(id);
    match record.change {
        Change::LibraryCreated(lib) => {
            let mut cat = catalog.write();
            if cat.by_id.contains_key(&lib.id) || cat.by_name.contains_key(&lib.name) {
                return Err(ApplyError(format!(
                    "library {:?} ({}) already exists",
                    lib.name, lib.id
                )));
            }
            cat.by_name.insert(lib.name.clone(), lib.id.clone());
            let defer = cat.defer_graphs;
            cat.by_id.insert(
                lib.id.clone(),
                Arc::new(Shard {
                    state: RwLock::new(LibraryState::new(lib, defer)),
                }),
            );
        }
        Change::LibraryUpdated(lib) => {
            let mut cat = catalog.write();
            let shard = cat.library_shard(&lib.id)?;
            let mut st = shard.state.write();
            if st.library.dimension != lib.dimension || st.library.metric != lib.metric {
                return Err(ApplyError(format!(
                    "library {} changed dimension or metric",
                    lib.id
                )));
            }
            if st.library.index_type != lib.index_type {
                // The index changes: flat drops the graph; a graph is built beside the live
                // state (or starts empty) while searches keep what serves them now.
                let st = &mut *st;
                match lib.index_type.hnsw() {
                    None => st.ann = AnnSlot::None,
                    Some(c) if cat.defer_graphs => st.ann = AnnSlot::Deferred(c),
                    Some(c) if st.num_chunks == 0 => {
                        st.ann = AnnSlot::Ready(Box::new(Ann::new(&lib, c)))
                    }
                    Some(c) => ann::start_rebuild(&shard, &mut st.ann, c),
                }
            }
            if st.library.name != lib.name {
                if cat.by_name.contains_key(&lib.name) {
                    return Err(ApplyError(format!("library name {:?} is taken", lib.name)));
                }
                cat.by_name.remove(&st.library.name);
                cat.by_name.insert(lib.name.clone(), lib.id.clone());
            }
            st.library = lib;
        }
        Change::LibraryDeleted { library_id, .. } => {
            let mut cat = catalog.write();
            let shard = cat
                .by_id
                .remove(&library_id)
                .ok_or_else(|| ApplyError(format!("library {library_id:?} does not exist")))?;
            let name = shard.state.read().library.name.clone();
            cat.by_name.remove(&name);
        }
        Change::DocumentUpserted { document, .. } => {
            let shard = shard_of(&document.library_id)?;
            let mut st = shard.state.write();
            st.upsert(document);
            restart_overgrown_build(&shard, &mut st);
        }
        Change::DocumentDeleted {
            library_id,
            document_id,
        } => {
            shard_of(&library_id)?.state.write().delete(&document_id)?;
        }
        Change::ChunksAdded {
            library_id,
            document_id,
            chunks,
        } => {
            let shard = shard_of(&library_id)?;
            let mut st = shard.state.write();
            st.add_chunks(&document_id, chunks, at_ms)?;
            restart_overgrown_build(&shard, &mut st);
        }
        Change::ChunkDeleted {
            library_id,
            document_id,
            chunk_id,
        } => {
            shard_of(&library_id)?
                .state
                .write()
                .delete_chunk(&document_id, &chunk_id, at_ms)?;
        }
        Change::ReembedStarted {
            library_id,
            model,
            dimension,
        } => {
            shard_of(&library_id)?.state.write().staging = Some(Staging {
                model,
                dimension,
                docs: HashMap::new(),
            });
        }
        Change::ReembedStaged {
            library_id,
            document_id,
            chunk_ids,
            vectors,
        } => {
            let shard = shard_of(&library_id)?;
            let mut st = shard.state.write();
            let st = &mut *st;
            let staging = st.staging.as_mut().ok_or_else(|| {
                ApplyError(format!("library {library_id}: no re-embedding is staged"))
            })?;
            if chunk_ids.len() != vectors.len()
                || vectors
                    .iter()
                    .any(|v| v.len() != staging.dimension as usize)
            {
                return Err(ApplyError(format!(
                    "staged vectors of document {document_id:?} do not match its chunks or the dimension {}",
                    staging.dimension
                )));
            }
            if !st.docs.contains_key(&document_id) {
                return Err(ApplyError(format!(
                    "document {document_id:?} does not exist"
                )));
            }
            staging.docs.insert(document_id, (chunk_ids, vectors));
        }
        Change::Reembedded(lib) => {
            let cat = catalog.read();
            let shard = cat.library_shard(&lib.id)?;
            let mut st = shard.state.write();
            if st.library.metric != lib.metric || st.library.name != lib.name {
                return Err(ApplyError(format!(
                    "library {}: a re-embedding changed its name or metric",
                    lib.id
                )));
            }
            let config = lib.index_type.hnsw();
            st.switch_embeddings(lib)?;
            let st = &mut *st;
            match config {
                None => {}
                Some(c) if cat.defer_graphs => st.ann = AnnSlot::Deferred(c),
                Some(c) if st.num_chunks == 0 => {
                    st.ann = AnnSlot::Ready(Box::new(Ann::new(&st.library, c)))
                }
                // Built in the background; searches run exact meanwhile.
                Some(c) => ann::start_rebuild(&shard, &mut st.ann, c),
            }
        }
        Change::ReembedDiscarded { library_id } => {
            shard_of(&library_id)?.state.write().staging = None;
        }
        Change::AppEvent { .. } => {}
    }
    Ok(())
}
