//! Snapshots: the whole state at one `seq`, so start-up replays only the log after it and old
//! log segments can be deleted.
//!
//! A snapshot is a file of log frames (the same framing and CRC as the log): a header frame,
//! one `LibraryCreated` record per library, one `DocumentUpserted` per document, and a trailer
//! frame with the count. Frame numbers run 1, 2, 3… so a missing or repeated frame is caught.
//! It is written beside the live state (readers and writers keep going), then made visible
//! atomically (temp file, fsync, rename, fsync dir) — a crash leaves the old snapshot or the
//! new one, never half of one. A snapshot is only written once the log is durable up to its
//! `seq`, so it never contains a change whose record could still be lost.
//!
//! HNSW graphs are derived data saved beside their snapshot, one file per library
//! (`snapshot-<seq>.<library id>.hnsw`, written atomically before the snapshot itself), with
//! ids renumbered to the chunk keys the snapshot's documents get when loaded. Loading attaches
//! a graph that passes its checks and matches the library's chunk count; anything else is
//! reported and rebuilt in the background while searches run exact.
//!
//! Never trust a snapshot that fails any check: loading falls back to the previous one (and
//! the log must still reach back to it, or start-up stops with a clear error).

use crate::ann::{self, Ann, AnnSlot};
use crate::error::{EngineError, Result};
use crate::state::{self, Catalog};
use parking_lot::RwLock;
use quiver_index::HnswIndex;
use quiver_log::{frame, Seq};
use quiver_model::record::{Change, RecordMeta};
use quiver_model::{Document, Library, Record};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"QVRSNAP1";
const TRAILER: &[u8; 8] = b"QVREND01";
const SUFFIX: &str = ".qsnap";

pub(crate) fn file_name(seq: Seq) -> String {
    format!("snapshot-{seq:020}{SUFFIX}")
}

const GRAPH_SUFFIX: &str = ".hnsw";

pub(crate) fn graph_file_name(seq: Seq, library_id: &str) -> String {
    format!("snapshot-{seq:020}.{library_id}{GRAPH_SUFFIX}")
}

/// Writes one library's graph for the snapshot at `seq`.
pub(crate) fn write_graph(dir: &Path, seq: Seq, library_id: &str, graph: &HnswIndex) -> Result<()> {
    let path = dir.join(graph_file_name(seq, library_id));
    quiver_log::write_atomic(&path, |w| graph.write_to(w))?;
    Ok(())
}

/// Deletes graph files that belong to no snapshot in `keep`.
pub(crate) fn prune_graphs(dir: &Path, keep: &[Seq]) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.ends_with(GRAPH_SUFFIX) {
            continue;
        }
        let seq = name
            .strip_prefix("snapshot-")
            .and_then(|s| s.get(..20))
            .and_then(|s| s.parse::<Seq>().ok());
        if seq.is_some_and(|s| !keep.contains(&s)) {
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!("could not delete old graph {}: {e}", entry.path().display());
            }
        }
    }
}

/// The graph files of the snapshot at `seq`, read and checked, by library id. Runs on its own
/// thread while the snapshot's documents are decoded, so start-up waits for the longer of the
/// two rather than their sum (at 1M vectors: 4.2 s of documents, then 2.7 s of graph).
fn read_graphs(dir: &Path, seq: Seq) -> HashMap<String, std::result::Result<HnswIndex, String>> {
    let prefix = format!("snapshot-{seq:020}.");
    let mut out = HashMap::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(library_id) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|n| n.strip_suffix(GRAPH_SUFFIX))
        else {
            continue;
        };
        let loaded = std::fs::File::open(entry.path())
            .map_err(|e| e.to_string())
            .and_then(|f| {
                let mut r = std::io::BufReader::with_capacity(1 << 20, f);
                HnswIndex::read_from(&mut r).map_err(|e| e.to_string())
            });
        out.insert(library_id.to_string(), loaded);
    }
    out
}

/// Gives every HNSW library of a freshly loaded catalog its graph: the snapshot's graph
/// file (from `graphs`, see [`read_graphs`]) when it is sound and complete, else a background
/// rebuild (searches run exact meanwhile).
fn attach_graphs(
    dir: &Path,
    seq: Seq,
    catalog: &Catalog,
    mut graphs: HashMap<String, std::result::Result<HnswIndex, String>>,
) {
    for shard in catalog.shards() {
        let mut st = shard.state.write();
        let AnnSlot::Deferred(config) = st.ann else {
            continue;
        };
        let path = dir.join(graph_file_name(seq, &st.library.id));
        let loaded = graphs
            .remove(&st.library.id)
            .unwrap_or_else(|| Err("the file is missing".to_string()));
        match loaded {
            Ok(graph)
                if graph.len() == st.num_chunks
                    && graph.dimension() == st.library.dimension as usize
                    && ann::fits(&config, &graph) =>
            {
                st.ann = AnnSlot::Ready(Box::new(Ann::from_index(config, graph)));
            }
            Ok(graph) => {
                tracing::warn!(
                    "graph {} holds {} vectors of {} dimensions, built with {:?} {:?}; the \
                     library has {} of {} with {config:?}; rebuilding it",
                    path.display(),
                    graph.len(),
                    graph.dimension(),
                    graph.params(),
                    graph.quantization(),
                    st.num_chunks,
                    st.library.dimension
                );
                ann::start_rebuild(shard, &mut st.ann, config);
            }
            Err(e) => {
                tracing::warn!("graph {} not used ({e}); rebuilding it", path.display());
                ann::start_rebuild(shard, &mut st.ann, config);
            }
        }
    }
}

/// Snapshots in `dir`, newest first.
pub(crate) fn list(dir: &Path) -> Result<Vec<(Seq, PathBuf)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| EngineError::Io {
        path: dir.display().to_string(),
        source: e,
    })?;
    let mut out = Vec::new();
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = name
            .strip_prefix("snapshot-")
            .and_then(|s| s.strip_suffix(SUFFIX))
            .and_then(|s| s.parse::<Seq>().ok())
        {
            out.push((seq, entry.path()));
        }
    }
    out.sort_by_key(|e| std::cmp::Reverse(e.0));
    Ok(out)
}

/// Writes the snapshot of `libraries` taken at `seq` into `dir`.
pub(crate) fn write(
    dir: &Path,
    seq: Seq,
    libraries: &[(Library, Vec<Arc<Document>>)],
) -> Result<PathBuf> {
    let path = dir.join(file_name(seq));
    let meta = RecordMeta::default();
    let document_count: usize = libraries.iter().map(|(_, d)| d.len()).sum();
    quiver_log::write_atomic(&path, |w| {
        let mut n: u64 = 0;
        let mut buf = Vec::with_capacity(1 << 16);
        let mut put =
            |payload: &[u8], w: &mut std::io::BufWriter<std::fs::File>| -> std::io::Result<()> {
                n += 1;
                buf.clear();
                frame::encode(n, payload, &mut buf);
                w.write_all(&buf)
            };
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&seq.to_le_bytes());
        header.extend_from_slice(&(libraries.len() as u64).to_le_bytes());
        header.extend_from_slice(&(document_count as u64).to_le_bytes());
        put(&header, w)?;
        for (lib, docs) in libraries {
            put(
                &Record::new(meta.clone(), Change::LibraryCreated(lib.clone())).encode(),
                w,
            )?;
            for d in docs {
                put(&Record::encode_document_upserted(&meta, d, false), w)?;
            }
        }
        let items = 1 + libraries.len() as u64 + document_count as u64;
        let mut trailer = TRAILER.to_vec();
        trailer.extend_from_slice(&items.to_le_bytes());
        put(&trailer, w)
    })?;
    Ok(path)
}

fn corrupt(path: &Path, offset: usize, why: impl std::fmt::Display) -> EngineError {
    EngineError::Corrupt(format!(
        "snapshot {} is damaged at byte {offset}: {why}",
        path.display()
    ))
}

/// Loads one snapshot file into a fresh catalog; returns the seq it was taken at. Its graph
/// files are read on a second thread meanwhile (see [`read_graphs`]).
pub(crate) fn load(path: &Path) -> Result<(Seq, Catalog)> {
    let bytes = std::fs::read(path).map_err(|e| EngineError::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::thread::scope(|scope| load_frames(path, dir, &bytes, scope))
}

fn load_frames<'scope>(
    path: &Path,
    dir: &'scope Path,
    bytes: &[u8],
    scope: &'scope std::thread::Scope<'scope, '_>,
) -> Result<(Seq, Catalog)> {
    type Graphs = HashMap<String, std::result::Result<HnswIndex, String>>;
    let mut graphs: Option<std::thread::ScopedJoinHandle<'scope, Graphs>> = None;
    let catalog = RwLock::new(Catalog {
        defer_graphs: true,
        ..Catalog::default()
    });
    let mut offset = 0usize;
    let mut expected: u64 = 1;
    let mut seq: Option<Seq> = None;
    loop {
        let (n, payload, len) = match frame::decode(&bytes[offset..]) {
            frame::DecodeResult::Ok {
                seq,
                payload,
                frame_len,
            } => (seq, &bytes[offset..][payload], frame_len),
            frame::DecodeResult::Incomplete { .. } => {
                return Err(corrupt(
                    path,
                    offset,
                    "the file ends inside a frame (no trailer)",
                ))
            }
            frame::DecodeResult::Bad(why) => return Err(corrupt(path, offset, why)),
        };
        if n != expected {
            return Err(corrupt(
                path,
                offset,
                format!("frame {n} where frame {expected} was expected"),
            ));
        }
        if n == 1 {
            if payload.len() != 32 || &payload[..8] != MAGIC {
                return Err(corrupt(path, offset, "not a Quiver snapshot header"));
            }
            let at = u64::from_le_bytes(payload[8..16].try_into().unwrap_or_default());
            seq = Some(at);
            // If the thread cannot start, the graphs are read after the documents instead.
            graphs = std::thread::Builder::new()
                .name("quiver-graph-load".to_string())
                .spawn_scoped(scope, move || read_graphs(dir, at))
                .ok();
        } else if payload.len() == 16 && &payload[..8] == TRAILER {
            let items = u64::from_le_bytes(payload[8..16].try_into().unwrap_or_default());
            if items != n - 1 {
                return Err(corrupt(
                    path,
                    offset,
                    format!("trailer counts {items} items, found {}", n - 1),
                ));
            }
            if offset + len != bytes.len() {
                return Err(corrupt(path, offset + len, "bytes after the trailer"));
            }
            let seq = seq.ok_or_else(|| corrupt(path, 0, "no header"))?;
            let mut catalog = catalog.into_inner();
            catalog.defer_graphs = false;
            let loaded = match graphs.take() {
                // A panic while reading graphs leaves them to be rebuilt, like a bad file.
                Some(handle) => handle.join().unwrap_or_default(),
                None => read_graphs(dir, seq),
            };
            attach_graphs(dir, seq, &catalog, loaded);
            return Ok((seq, catalog));
        } else {
            let rec = Record::decode(payload).map_err(|e| corrupt(path, offset, e))?;
            match rec.change {
                Change::LibraryCreated(_) | Change::DocumentUpserted { .. } => {}
                _ => {
                    return Err(corrupt(
                        path,
                        offset,
                        "unexpected record kind in a snapshot",
                    ))
                }
            }
            state::apply(&catalog, rec).map_err(|e| corrupt(path, offset, e))?;
        }
        offset += len;
        expected += 1;
    }
}
