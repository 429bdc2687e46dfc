//! The live per-library statistics projection: documents, chunks, events by type, last seq
//! and last update time of every library, folded from the log.
//!
//! It owns the fold only; the runner ([`crate::projection`]) owns checkpoints and catch-up.
//! It must never read the engine's state or a clock (a replay from seq 1 must equal the live
//! state exactly), and never keep an entry for a library that was deleted or never created
//! (application events naming unknown libraries are not counted, so arbitrary ids cannot
//! grow it). Why: it is the proof that a read model can be a pure fold of the log.

use crate::projection::Projection;
use quiver_log::Seq;
use quiver_model::record::Change;
use quiver_model::Record;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Distinct event types counted per library; further types are counted as `"other"`.
pub const TYPES_PER_LIBRARY_LIMIT: usize = 100;

/// One library's figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LibraryStats {
    pub library_id: String,
    pub name: String,
    pub documents: u64,
    pub chunks: u64,
    pub events_total: u64,
    pub events_by_type: BTreeMap<String, u64>,
    pub created_seq: Seq,
    pub last_seq: Seq,
    pub updated_at_ms: u64,
    /// Chunks per document (needed to fold deletes and replacements).
    doc_chunks: BTreeMap<String, u64>,
}

impl LibraryStats {
    /// The public rendering (without the per-document table).
    pub fn to_json(&self) -> Value {
        json!({
            "library_id": self.library_id,
            "name": self.name,
            "documents": self.documents,
            "chunks": self.chunks,
            "events_total": self.events_total,
            "events_by_type": self.events_by_type,
            "created_seq": self.created_seq,
            "last_seq": self.last_seq,
            "updated_at": quiver_model::time::rfc3339_ms(self.updated_at_ms),
        })
    }

    fn count(&mut self, seq: Seq, record: &Record) {
        let t = record.change.event_type();
        let key = if self.events_by_type.contains_key(t)
            || self.events_by_type.len() < TYPES_PER_LIBRARY_LIMIT
        {
            t
        } else {
            "other"
        };
        *self.events_by_type.entry(key.to_string()).or_insert(0) += 1;
        self.events_total += 1;
        self.last_seq = seq;
        self.updated_at_ms = record.meta.timestamp_ms;
    }
}

/// Every live library's figures, by id.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LibraryStatsProjection {
    pub libraries: BTreeMap<String, LibraryStats>,
}

impl LibraryStatsProjection {
    pub fn get(&self, library_id: &str) -> Option<&LibraryStats> {
        self.libraries.get(library_id)
    }
}

impl Projection for LibraryStatsProjection {
    const NAME: &'static str = "library_stats";

    fn apply(&mut self, seq: Seq, record: &Record) {
        match &record.change {
            Change::LibraryCreated(l) => {
                let mut s = LibraryStats {
                    library_id: l.id.clone(),
                    name: l.name.clone(),
                    created_seq: seq,
                    ..LibraryStats::default()
                };
                s.count(seq, record);
                self.libraries.insert(l.id.clone(), s);
            }
            Change::LibraryDeleted { library_id, .. } => {
                self.libraries.remove(library_id);
            }
            change => {
                let Some(id) = change.library_id() else {
                    return;
                };
                let Some(s) = self.libraries.get_mut(id) else {
                    return;
                };
                match change {
                    Change::LibraryUpdated(l) => s.name = l.name.clone(),
                    Change::DocumentUpserted { document, .. } => {
                        let n = document.chunks.len() as u64;
                        match s.doc_chunks.insert(document.id.clone(), n) {
                            Some(old) => s.chunks = s.chunks.saturating_sub(old),
                            None => s.documents += 1,
                        }
                        s.chunks += n;
                    }
                    Change::DocumentDeleted { document_id, .. } => {
                        if let Some(old) = s.doc_chunks.remove(document_id) {
                            s.documents = s.documents.saturating_sub(1);
                            s.chunks = s.chunks.saturating_sub(old);
                        }
                    }
                    Change::ChunksAdded {
                        document_id,
                        chunks,
                        ..
                    } => {
                        if let Some(c) = s.doc_chunks.get_mut(document_id) {
                            *c += chunks.len() as u64;
                            s.chunks += chunks.len() as u64;
                        }
                    }
                    Change::ChunkDeleted { document_id, .. } => {
                        if let Some(c) = s.doc_chunks.get_mut(document_id) {
                            if *c > 0 {
                                *c -= 1;
                                s.chunks = s.chunks.saturating_sub(1);
                            }
                        }
                    }
                    _ => {}
                }
                s.count(seq, record);
            }
        }
    }
}
