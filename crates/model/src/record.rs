//! The log record: one durable change. Its binary encoding is versioned (first byte) so the
//! format can evolve; a reader refuses versions it does not know rather than guess.
//!
//! A `Record` carries everything its event needs (type, library, data, trace id, time), so the
//! event stream is a pure function of the log and never needs the state at the time of
//! writing. Records must stay deterministic to apply: the engine replays them on start.
//!
//! Layout (version 1): `[version u8][meta][tag u8][body]`, fields as in [`crate::codec`].

use crate::codec::{DecodeError, Reader, Writer};
use crate::types::{Chunk, Document, HnswConfig, IndexType, Library, Metric, Quantization};
use serde_json::Value;

pub const RECORD_VERSION: u8 = 1;

/// What every record carries besides its change: when it committed, which request caused it
/// (`trace_id`, from W3C `traceparent` or `X-Request-ID`), and who said so (`source`).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct RecordMeta {
    pub timestamp_ms: u64,
    pub trace_id: Option<String>,
    pub source: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    LibraryCreated(Library),
    /// The library's new descriptive state (its documents are untouched).
    LibraryUpdated(Library),
    LibraryDeleted {
        library_id: String,
        name: String,
    },
    /// A whole document, new or replacing one with the same id (`replaced`).
    DocumentUpserted {
        document: Document,
        replaced: bool,
    },
    DocumentDeleted {
        library_id: String,
        document_id: String,
    },
    ChunksAdded {
        library_id: String,
        document_id: String,
        chunks: Vec<Chunk>,
    },
    ChunkDeleted {
        library_id: String,
        document_id: String,
        chunk_id: String,
    },
    /// A re-embedding of a library began: vectors from `model` (`dimension`) will be staged
    /// beside the live ones, which keep serving searches until the switch. Replaces any
    /// earlier staging of the library.
    ReembedStarted {
        library_id: String,
        model: String,
        dimension: u32,
    },
    /// New vectors for one document's chunks (ids and vectors in chunk order), staged for the
    /// running re-embedding; not searchable until [`Change::Reembedded`]. A later change to
    /// the document drops its staged vectors (it is staged again).
    ReembedStaged {
        library_id: String,
        document_id: String,
        chunk_ids: Vec<String>,
        vectors: Vec<Vec<f32>>,
    },
    /// Every document is staged: the staged vectors replace the live ones, and the library
    /// takes the new model and dimension (the library's new description).
    Reembedded(Library),
    /// The staging was abandoned (cancelled or failed); the live vectors never changed.
    ReembedDiscarded {
        library_id: String,
    },
    /// An application-defined event: no effect on state, only on the stream.
    AppEvent {
        event_type: String,
        library_id: Option<String>,
        data: Value,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub meta: RecordMeta,
    pub change: Change,
}

mod tag {
    pub const LIBRARY_CREATED: u8 = 1;
    pub const LIBRARY_UPDATED: u8 = 2;
    pub const LIBRARY_DELETED: u8 = 3;
    pub const DOCUMENT_UPSERTED: u8 = 4;
    pub const DOCUMENT_DELETED: u8 = 5;
    pub const CHUNKS_ADDED: u8 = 6;
    pub const CHUNK_DELETED: u8 = 7;
    pub const APP_EVENT: u8 = 8;
    pub const REEMBED_STARTED: u8 = 9;
    pub const REEMBED_STAGED: u8 = 10;
    pub const REEMBEDDED: u8 = 11;
    pub const REEMBED_DISCARDED: u8 = 12;
}

/// The public event type of a record of `tag` (`replaced` for document upserts); `None` for
/// application events, whose type is their own.
fn system_event_type(tag: u8, replaced: bool) -> Option<&'static str> {
    Some(match tag {
        tag::LIBRARY_CREATED => "library.created",
        tag::LIBRARY_UPDATED => "library.updated",
        tag::LIBRARY_DELETED => "library.deleted",
        tag::DOCUMENT_UPSERTED if replaced => "document.updated",
        tag::DOCUMENT_UPSERTED => "document.added",
        tag::DOCUMENT_DELETED => "document.deleted",
        tag::CHUNKS_ADDED => "chunk.added",
        tag::CHUNK_DELETED => "chunk.deleted",
        tag::REEMBED_STARTED => "library.reembedding_started",
        tag::REEMBED_STAGED => "library.reembedding_staged",
        tag::REEMBEDDED => "library.reembedded",
        tag::REEMBED_DISCARDED => "library.reembedding_discarded",
        _ => return None,
    })
}

/// The event type of an encoded record, read from its header only — no vectors or texts are
/// decoded or copied (the event bus counts types this way when nobody listens live).
pub fn peek_event_type(buf: &[u8]) -> Result<std::borrow::Cow<'_, str>, DecodeError> {
    let mut r = Reader::new(buf);
    let version = r.u8()?;
    if version != RECORD_VERSION {
        return Err(r.err(format!("record version {version} is not supported")));
    }
    r.u64()?;
    for _ in 0..2 {
        if r.u8()? == 1 {
            r.bytes()?;
        }
    }
    let t = r.u8()?;
    if t == tag::APP_EVENT {
        let b = r.bytes()?;
        return std::str::from_utf8(b)
            .map(std::borrow::Cow::Borrowed)
            .map_err(|_| r.err("event type is not UTF-8"));
    }
    let replaced = t == tag::DOCUMENT_UPSERTED && r.bool()?;
    system_event_type(t, replaced)
        .map(std::borrow::Cow::Borrowed)
        .ok_or_else(|| r.err(format!("unknown record tag {t}")))
}

impl Change {
    fn tag(&self) -> u8 {
        match self {
            Change::LibraryCreated(_) => tag::LIBRARY_CREATED,
            Change::LibraryUpdated(_) => tag::LIBRARY_UPDATED,
            Change::LibraryDeleted { .. } => tag::LIBRARY_DELETED,
            Change::DocumentUpserted { .. } => tag::DOCUMENT_UPSERTED,
            Change::DocumentDeleted { .. } => tag::DOCUMENT_DELETED,
            Change::ChunksAdded { .. } => tag::CHUNKS_ADDED,
            Change::ChunkDeleted { .. } => tag::CHUNK_DELETED,
            Change::AppEvent { .. } => tag::APP_EVENT,
            Change::ReembedStarted { .. } => tag::REEMBED_STARTED,
            Change::ReembedStaged { .. } => tag::REEMBED_STAGED,
            Change::Reembedded(_) => tag::REEMBEDDED,
            Change::ReembedDiscarded { .. } => tag::REEMBED_DISCARDED,
        }
    }

    /// The public event type of this change (`document.added`, …, or an application type).
    pub fn event_type(&self) -> &str {
        match self {
            Change::AppEvent { event_type, .. } => event_type,
            Change::DocumentUpserted { replaced, .. } => {
                system_event_type(self.tag(), *replaced).unwrap_or("unknown")
            }
            other => system_event_type(other.tag(), false).unwrap_or("unknown"),
        }
    }

    /// The library this change belongs to, if any.
    pub fn library_id(&self) -> Option<&str> {
        match self {
            Change::LibraryCreated(l) | Change::LibraryUpdated(l) | Change::Reembedded(l) => {
                Some(&l.id)
            }
            Change::LibraryDeleted { library_id, .. }
            | Change::ReembedStarted { library_id, .. }
            | Change::ReembedStaged { library_id, .. }
            | Change::ReembedDiscarded { library_id }
            | Change::DocumentDeleted { library_id, .. }
            | Change::ChunksAdded { library_id, .. }
            | Change::ChunkDeleted { library_id, .. } => Some(library_id),
            Change::DocumentUpserted { document, .. } => Some(&document.library_id),
            Change::AppEvent { library_id, .. } => library_id.as_deref(),
        }
    }
}

impl Record {
    pub fn new(meta: RecordMeta, change: Change) -> Self {
        Record { meta, change }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(self.size_hint_bytes());
        put_meta(&mut w, &self.meta);
        match &self.change {
            Change::LibraryCreated(l) => {
                w.u8(tag::LIBRARY_CREATED);
                put_library(&mut w, l);
            }
            Change::LibraryUpdated(l) => {
                w.u8(tag::LIBRARY_UPDATED);
                put_library(&mut w, l);
            }
            Change::LibraryDeleted { library_id, name } => {
                w.u8(tag::LIBRARY_DELETED);
                w.str(library_id);
                w.str(name);
            }
            Change::DocumentUpserted { document, replaced } => {
                w.u8(tag::DOCUMENT_UPSERTED);
                w.bool(*replaced);
                put_document(&mut w, document);
            }
            Change::DocumentDeleted {
                library_id,
                document_id,
            } => {
                w.u8(tag::DOCUMENT_DELETED);
                w.str(library_id);
                w.str(document_id);
            }
            Change::ChunksAdded {
                library_id,
                document_id,
                chunks,
            } => {
                w.u8(tag::CHUNKS_ADDED);
                w.str(library_id);
                w.str(document_id);
                w.u32(chunks.len() as u32);
                for c in chunks {
                    put_chunk(&mut w, c);
                }
            }
            Change::ChunkDeleted {
                library_id,
                document_id,
                chunk_id,
            } => {
                w.u8(tag::CHUNK_DELETED);
                w.str(library_id);
                w.str(document_id);
                w.str(chunk_id);
            }
            Change::AppEvent {
                event_type,
                library_id,
                data,
            } => {
                w.u8(tag::APP_EVENT);
                w.str(event_type);
                w.opt_str(library_id.as_deref());
                w.json(data);
            }
            Change::ReembedStarted {
                library_id,
                model,
                dimension,
            } => {
                w.u8(tag::REEMBED_STARTED);
                w.str(library_id);
                w.str(model);
                w.u32(*dimension);
            }
            Change::ReembedStaged {
                library_id,
                document_id,
                chunk_ids,
                vectors,
            } => {
                w.u8(tag::REEMBED_STAGED);
                w.str(library_id);
                w.str(document_id);
                w.u32(chunk_ids.len() as u32);
                for id in chunk_ids {
                    w.str(id);
                }
                w.u32(vectors.len() as u32);
                for v in vectors {
                    w.f32s(v);
                }
            }
            Change::Reembedded(l) => {
                w.u8(tag::REEMBEDDED);
                put_library(&mut w, l);
            }
            Change::ReembedDiscarded { library_id } => {
                w.u8(tag::REEMBED_DISCARDED);
                w.str(library_id);
            }
        }
        w.buf
    }

    /// Encodes a `DocumentUpserted` record straight from a borrowed document (snapshots write
    /// every document this way without cloning it). Same bytes as `encode` would produce.
    pub fn encode_document_upserted(
        meta: &RecordMeta,
        document: &Document,
        replaced: bool,
    ) -> Vec<u8> {
        let mut w = Writer::with_capacity(document_size_hint_bytes(document));
        put_meta(&mut w, meta);
        w.u8(tag::DOCUMENT_UPSERTED);
        w.bool(replaced);
        put_document(&mut w, document);
        w.buf
    }

    fn size_hint_bytes(&self) -> usize {
        match &self.change {
            Change::DocumentUpserted { document, .. } => {
                256 + document
                    .chunks
                    .iter()
                    .map(|c| 64 + c.text.len() + c.embedding.len() * 4)
                    .sum::<usize>()
            }
            Change::ReembedStaged { vectors, .. } => {
                256 + vectors.iter().map(|v| 64 + v.len() * 4).sum::<usize>()
            }
            Change::ChunksAdded { chunks, .. } => {
                256 + chunks
                    .iter()
                    .map(|c| 64 + c.text.len() + c.embedding.len() * 4)
                    .sum::<usize>()
            }
            _ => 256,
        }
    }

    pub fn decode(buf: &[u8]) -> Result<Record, DecodeError> {
        let mut r = Reader::new(buf);
        let version = r.u8()?;
        if version != RECORD_VERSION {
            return Err(r.err(format!(
                "record version {version} is not supported (this build reads version {RECORD_VERSION})"
            )));
        }
        let meta = RecordMeta {
            timestamp_ms: r.u64()?,
            trace_id: r.opt_string()?,
            source: r.opt_string()?,
        };
        let change = match r.u8()? {
            tag::LIBRARY_CREATED => Change::LibraryCreated(get_library(&mut r)?),
            tag::LIBRARY_UPDATED => Change::LibraryUpdated(get_library(&mut r)?),
            tag::LIBRARY_DELETED => Change::LibraryDeleted {
                library_id: r.string()?,
                name: r.string()?,
            },
            tag::DOCUMENT_UPSERTED => {
                let replaced = r.bool()?;
                Change::DocumentUpserted {
                    replaced,
                    document: get_document(&mut r)?,
                }
            }
            tag::DOCUMENT_DELETED => Change::DocumentDeleted {
                library_id: r.string()?,
                document_id: r.string()?,
            },
            tag::CHUNKS_ADDED => {
                let library_id = r.string()?;
                let document_id = r.string()?;
                let n = r.count(16)?;
                let mut chunks = Vec::with_capacity(n);
                for _ in 0..n {
                    chunks.push(get_chunk(&mut r, &document_id)?);
                }
                Change::ChunksAdded {
                    library_id,
                    document_id,
                    chunks,
                }
            }
            tag::CHUNK_DELETED => Change::ChunkDeleted {
                library_id: r.string()?,
                document_id: r.string()?,
                chunk_id: r.string()?,
            },
            tag::APP_EVENT => Change::AppEvent {
                event_type: r.string()?,
                library_id: r.opt_string()?,
                data: r.json()?,
            },
            tag::REEMBED_STARTED => Change::ReembedStarted {
                library_id: r.string()?,
                model: r.string()?,
                dimension: r.u32()?,
            },
            tag::REEMBED_STAGED => {
                let library_id = r.string()?;
                let document_id = r.string()?;
                let n = r.count(4)?;
                let mut chunk_ids = Vec::with_capacity(n);
                for _ in 0..n {
                    chunk_ids.push(r.string()?);
                }
                let n = r.count(4)?;
                let mut vectors = Vec::with_capacity(n);
                for _ in 0..n {
                    vectors.push(r.f32s()?);
                }
                Change::ReembedStaged {
                    library_id,
                    document_id,
                    chunk_ids,
                    vectors,
                }
            }
            tag::REEMBEDDED => Change::Reembedded(get_library(&mut r)?),
            tag::REEMBED_DISCARDED => Change::ReembedDiscarded {
                library_id: r.string()?,
            },
            t => return Err(r.err(format!("unknown record tag {t}"))),
        };
        if !r.is_empty() {
            return Err(r.err(format!("{} trailing bytes after the record", r.remaining())));
        }
        Ok(Record { meta, change })
    }
}

fn document_size_hint_bytes(d: &Document) -> usize {
    256 + d
        .chunks
        .iter()
        .map(|c| 64 + c.text.len() + c.embedding.len() * 4)
        .sum::<usize>()
}

fn put_meta(w: &mut Writer, meta: &RecordMeta) {
    w.u8(RECORD_VERSION);
    w.u64(meta.timestamp_ms);
    w.opt_str(meta.trace_id.as_deref());
    w.opt_str(meta.source.as_deref());
}

fn put_library(w: &mut Writer, l: &Library) {
    w.str(&l.id);
    w.str(&l.name);
    w.str(&l.description);
    w.u32(l.dimension);
    w.u8(l.metric.code());
    put_index_type(w, l.index_type);
    w.opt_str(l.embedding_model.as_deref());
    w.u64(l.created_at_ms);
    w.u64(l.updated_at_ms);
    w.map(&l.metadata);
}

/// Index type code, then (for HNSW only) its parameters: code 0 (`flat`) is one byte, as in
/// logs written before HNSW existed, so those logs still read. HNSW with a bottom-layer degree
/// of its own (`m0`) is code [`HNSW_WITH_M0_CODE`] with `m0` after `m`, so that HNSW records
/// without one stay byte for byte what earlier builds wrote and read.
fn put_index_type(w: &mut Writer, t: IndexType) {
    match t {
        IndexType::Hnsw(HnswConfig { m0: Some(_), .. }) => w.u8(HNSW_WITH_M0_CODE),
        _ => w.u8(t.code()),
    }
    if let IndexType::Hnsw(c) = t {
        w.u32(c.m);
        if let Some(m0) = c.m0 {
            w.u32(m0);
        }
        w.u32(c.ef_construction);
        w.u32(c.ef_search);
        match c.quantization {
            Quantization::None => w.u8(0),
            Quantization::Int8 {
                rescore,
                oversampling,
            } => {
                w.u8(1);
                w.bool(rescore);
                w.u32(oversampling.to_bits());
            }
        }
    }
}

/// The record code of an HNSW index type that carries `m0` (see [`put_index_type`]).
const HNSW_WITH_M0_CODE: u8 = 2;

fn get_index_type(r: &mut Reader) -> Result<IndexType, DecodeError> {
    match r.u8()? {
        0 => Ok(IndexType::Flat),
        code @ (1 | HNSW_WITH_M0_CODE) => {
            let m = r.u32()?;
            let m0 = if code == HNSW_WITH_M0_CODE {
                Some(r.u32()?)
            } else {
                None
            };
            let ef_construction = r.u32()?;
            let ef_search = r.u32()?;
            let quantization = match r.u8()? {
                0 => Quantization::None,
                1 => Quantization::Int8 {
                    rescore: r.bool()?,
                    oversampling: f32::from_bits(r.u32()?),
                },
                q => return Err(r.err(format!("unknown quantization code {q}"))),
            };
            let c = HnswConfig {
                m,
                m0,
                ef_construction,
                ef_search,
                quantization,
            };
            c.validate().map_err(|e| r.err(e))?;
            Ok(IndexType::Hnsw(c))
        }
        c => Err(r.err(format!("unknown index type code {c}"))),
    }
}

fn get_library(r: &mut Reader) -> Result<Library, DecodeError> {
    Ok(Library {
        id: r.string()?,
        name: r.string()?,
        description: r.string()?,
        dimension: r.u32()?,
        metric: {
            let c = r.u8()?;
            Metric::from_code(c).ok_or_else(|| r.err(format!("unknown metric code {c}")))?
        },
        index_type: get_index_type(r)?,
        embedding_model: r.opt_string()?,
        created_at_ms: r.u64()?,
        updated_at_ms: r.u64()?,
        metadata: r.map()?,
    })
}

fn put_document(w: &mut Writer, d: &Document) {
    w.str(&d.id);
    w.str(&d.library_id);
    w.str(&d.title);
    w.map(&d.metadata);
    w.u64(d.created_at_ms);
    w.u64(d.updated_at_ms);
    w.u32(d.chunks.len() as u32);
    for c in &d.chunks {
        debug_assert_eq!(c.document_id, d.id, "a chunk belongs to its document");
        put_chunk(w, c);
    }
}

fn get_document(r: &mut Reader) -> Result<Document, DecodeError> {
    let id = r.string()?;
    let library_id = r.string()?;
    let title = r.string()?;
    let metadata = r.map()?;
    let created_at_ms = r.u64()?;
    let updated_at_ms = r.u64()?;
    let n = r.count(16)?;
    let mut chunks = Vec::with_capacity(n);
    for _ in 0..n {
        chunks.push(get_chunk(r, &id)?);
    }
    Ok(Document {
        id,
        library_id,
        title,
        metadata,
        created_at_ms,
        updated_at_ms,
        chunks,
    })
}

/// A chunk's document id is its parent's; it is not repeated on disk.
fn put_chunk(w: &mut Writer, c: &Chunk) {
    w.str(&c.id);
    w.str(&c.text);
    w.f32s(&c.embedding);
    w.map(&c.metadata);
}

fn get_chunk(r: &mut Reader, document_id: &str) -> Result<Chunk, DecodeError> {
    Ok(Chunk {
        id: r.string()?,
        document_id: document_id.to_string(),
        text: r.string()?,
        embedding: r.f32s()?,
        metadata: r.map()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    fn sample() -> Vec<Record> {
        let meta = RecordMeta {
            timestamp_ms: 1_790_000_000_000,
            trace_id: Some("t-1".into()),
            source: None,
        };
        let lib = Library {
            id: "lib".into(),
            name: "docs".into(),
            description: "d".into(),
            dimension: 3,
            metric: Metric::L2,
            index_type: IndexType::Flat,
            embedding_model: None,
            created_at_ms: 1,
            updated_at_ms: 2,
            metadata: json!({"team": "search"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        };
        let chunk = Chunk {
            id: "c1".into(),
            document_id: "d1".into(),
            text: "hello".into(),
            embedding: vec![1.0, -2.5, 3.25],
            metadata: json!({"page": 3}).as_object().cloned().unwrap_or_default(),
        };
        let doc = Document {
            id: "d1".into(),
            library_id: "lib".into(),
            title: "T".into(),
            metadata: Default::default(),
            created_at_ms: 5,
            updated_at_ms: 6,
            chunks: vec![chunk.clone()],
        };
        vec![
            Record::new(meta.clone(), Change::LibraryCreated(lib.clone())),
            Record::new(meta.clone(), Change::LibraryUpdated(lib.clone())),
            Record::new(
                meta.clone(),
                Change::LibraryUpdated(Library {
                    index_type: IndexType::Hnsw(HnswConfig {
                        m: 24,
                        m0: Some(30),
                        ef_construction: 150,
                        ef_search: 40,
                        quantization: Quantization::Int8 {
                            rescore: true,
                            oversampling: 3.0,
                        },
                    }),
                    ..lib.clone()
                }),
            ),
            Record::new(
                meta.clone(),
                Change::LibraryCreated(Library {
                    index_type: IndexType::Hnsw(HnswConfig::default()),
                    ..lib
                }),
            ),
            Record::new(
                meta.clone(),
                Change::LibraryDeleted {
                    library_id: "lib".into(),
                    name: "docs".into(),
                },
            ),
            Record::new(
                meta.clone(),
                Change::DocumentUpserted {
                    document: doc,
                    replaced: true,
                },
            ),
            Record::new(
                meta.clone(),
                Change::DocumentDeleted {
                    library_id: "lib".into(),
                    document_id: "d1".into(),
                },
            ),
            Record::new(
                meta.clone(),
                Change::ChunksAdded {
                    library_id: "lib".into(),
                    document_id: "d1".into(),
                    chunks: vec![chunk],
                },
            ),
            Record::new(
                meta.clone(),
                Change::ChunkDeleted {
                    library_id: "lib".into(),
                    document_id: "d1".into(),
                    chunk_id: "c1".into(),
                },
            ),
            Record::new(
                meta.clone(),
                Change::ReembedStarted {
                    library_id: "lib".into(),
                    model: "local:all-minilm-l6-v2".into(),
                    dimension: 384,
                },
            ),
            Record::new(
                meta.clone(),
                Change::ReembedStaged {
                    library_id: "lib".into(),
                    document_id: "d1".into(),
                    chunk_ids: vec!["c1".into(), "c2".into()],
                    vectors: vec![vec![0.5, 0.25], vec![-1.0, 2.0]],
                },
            ),
            Record::new(
                meta.clone(),
                Change::ReembedDiscarded {
                    library_id: "lib".into(),
                },
            ),
            Record::new(
                meta,
                Change::AppEvent {
                    event_type: "app.thing".into(),
                    library_id: None,
                    data: json!({"x": [1, 2]}),
                },
            ),
        ]
    }

    #[test]
    fn round_trip_every_change() {
        for rec in sample() {
            let bytes = rec.encode();
            assert_eq!(Record::decode(&bytes).unwrap(), rec);
        }
    }

    #[test]
    fn peeked_type_equals_decoded_type() {
        for rec in sample() {
            assert_eq!(
                peek_event_type(&rec.encode()).unwrap(),
                rec.change.event_type()
            );
        }
        assert!(peek_event_type(&[9, 9]).is_err());
    }

    #[test]
    fn borrowed_document_encoding_matches() {
        for rec in sample() {
            if let Change::DocumentUpserted { document, replaced } = &rec.change {
                assert_eq!(
                    Record::encode_document_upserted(&rec.meta, document, *replaced),
                    rec.encode()
                );
            }
        }
    }

    /// An HNSW type without `m0` is written exactly as before `m0` existed (code 1, then
    /// m, ef_construction, ef_search, quantization), so old builds read it; one with `m0` is
    /// code 2, reads back whole, and an `m0` out of `m..=2m` is refused when read.
    #[test]
    fn index_type_codes_keep_old_records_readable() {
        let encode = |t: IndexType| {
            let mut w = Writer::with_capacity(32);
            put_index_type(&mut w, t);
            w.buf
        };
        let plain = HnswConfig {
            m: 12,
            ef_construction: 100,
            ef_search: 50,
            ..HnswConfig::default()
        };
        let mut before_m0 = vec![1];
        for v in [12u32, 100, 50] {
            before_m0.extend_from_slice(&v.to_le_bytes());
        }
        before_m0.push(0);
        assert_eq!(encode(IndexType::Hnsw(plain)), before_m0);
        assert_eq!(
            get_index_type(&mut Reader::new(&before_m0)).unwrap(),
            IndexType::Hnsw(plain)
        );

        let lean = HnswConfig {
            m0: Some(12),
            ..plain
        };
        let bytes = encode(IndexType::Hnsw(lean));
        assert_eq!(bytes[0], HNSW_WITH_M0_CODE);
        assert_eq!(bytes.len(), before_m0.len() + 4);
        assert_eq!(
            get_index_type(&mut Reader::new(&bytes)).unwrap(),
            IndexType::Hnsw(lean)
        );
        for bad in [11u32, 25] {
            let bytes = encode(IndexType::Hnsw(HnswConfig {
                m0: Some(bad),
                ..plain
            }));
            let err = get_index_type(&mut Reader::new(&bytes)).unwrap_err();
            assert!(err.reason.contains("m0"), "{}", err.reason);
        }
    }

    #[test]
    fn refuses_unknown_version_and_trailing_bytes() {
        let mut bytes = sample()[0].encode();
        bytes.push(0);
        assert!(Record::decode(&bytes).is_err());
        bytes.pop();
        bytes[0] = 9;
        assert!(Record::decode(&bytes)
            .unwrap_err()
            .reason
            .contains("version 9"));
    }

    /// Fuzz: random bytes, truncations and bit flips of valid records never panic.
    #[test]
    fn fuzz_decode_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let valid: Vec<Vec<u8>> = sample().iter().map(|r| r.encode()).collect();
        for i in 0..20_000 {
            let mut bytes = if i % 2 == 0 {
                valid[rng.gen_range(0..valid.len())].clone()
            } else {
                (0..rng.gen_range(0..200)).map(|_| rng.gen()).collect()
            };
            if !bytes.is_empty() {
                match rng.gen_range(0..3) {
                    0 => bytes.truncate(rng.gen_range(0..bytes.len())),
                    1 => {
                        let at = rng.gen_range(0..bytes.len());
                        bytes[at] ^= 1 << rng.gen_range(0..8);
                    }
                    _ => {
                        let at = rng.gen_range(0..bytes.len());
                        bytes[at] = rng.gen();
                    }
                }
            }
            let _ = Record::decode(&bytes);
        }
    }
}
