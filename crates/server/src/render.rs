//! JSON renderings of domain values. One function per shape, so every route shows a library,
//! a document or a hit the same way. Library reads never include vectors; documents include
//! them only when asked (`include_embeddings=true`).

use quiver_engine::state::IndexStatus;
use quiver_engine::{Hit, LibraryInfo};
use quiver_model::time::rfc3339_ms;
use quiver_model::{Chunk, Document, IndexType, Quantization};
use serde_json::{json, Value};

/// `index_params` and `quantization` of an index type (`null` for flat).
fn index_params(t: IndexType) -> (Value, Value) {
    match t {
        IndexType::Flat => (Value::Null, Value::Null),
        IndexType::Hnsw(c) => (
            json!({"m": c.m, "m0": c.level0_degree(), "ef_construction": c.ef_construction,
                   "ef_search": c.ef_search}),
            match c.quantization {
                Quantization::None => Value::Null,
                Quantization::Int8 {
                    rescore,
                    oversampling,
                } => json!({"type": "int8", "rescore": rescore, "oversampling": oversampling}),
            },
        ),
    }
}

pub fn index(st: &IndexStatus) -> Value {
    let (params, quantization) = index_params(st.index_type);
    json!({
        "index_type": st.index_type.as_str(),
        "index_params": params,
        "quantization": quantization,
        "serving": st.serving,
        "num_vectors": st.vectors,
        "graph_rows": st.graph_rows,
        "tombstones": st.tombstones,
        "memory_bytes": {
            "exact": st.flat_memory_bytes,
            "graph": st.graph_memory_bytes,
        },
        "build": {
            "state": if st.building { "building" } else { "ready" },
            "progress": st.progress.map(|(current, total)| json!({
                "current": current,
                "total": total,
                "percentage": if total == 0 { 100.0 } else { current as f64 * 100.0 / total as f64 },
            })),
        },
    })
}

pub fn library(info: &LibraryInfo) -> Value {
    let l = &info.library;
    let (params, quantization) = index_params(l.index_type);
    json!({
        "id": l.id,
        "name": l.name,
        "description": l.description,
        "dimension": l.dimension,
        "metric": l.metric.as_str(),
        "index_type": l.index_type.as_str(),
        "index_params": params,
        "quantization": quantization,
        "embedding_model": l.embedding_model,
        "created_at": rfc3339_ms(l.created_at_ms),
        "updated_at": rfc3339_ms(l.updated_at_ms),
        "metadata": l.metadata,
        "num_documents": info.num_documents,
        "num_chunks": info.num_chunks,
        "index": {"type": l.index_type.as_str(), "memory_bytes": info.index_memory_bytes},
    })
}

pub fn chunk(c: &Chunk, include_embedding: bool) -> Value {
    let mut v =
        json!({"id": c.id, "document_id": c.document_id, "text": c.text, "metadata": c.metadata});
    if include_embedding {
        v["embedding"] = json!(c.embedding);
    }
    v
}

pub fn document(d: &Document, include_embeddings: bool) -> Value {
    json!({
        "id": d.id,
        "library_id": d.library_id,
        "title": d.title,
        "metadata": d.metadata,
        "created_at": rfc3339_ms(d.created_at_ms),
        "updated_at": rfc3339_ms(d.updated_at_ms),
        "num_chunks": d.chunks.len(),
        "chunks": d.chunks.iter().map(|c| chunk(c, include_embeddings)).collect::<Vec<_>>(),
    })
}

/// A document without its chunks, for lists.
pub fn document_summary(d: &Document) -> Value {
    json!({
        "id": d.id,
        "library_id": d.library_id,
        "title": d.title,
        "metadata": d.metadata,
        "created_at": rfc3339_ms(d.created_at_ms),
        "updated_at": rfc3339_ms(d.updated_at_ms),
        "num_chunks": d.chunks.len(),
    })
}

pub fn hit(h: &Hit, include_embedding: bool) -> Value {
    let c = &h.document.chunks[h.chunk_index];
    let mut chunk = json!({"id": c.id, "text": c.text, "metadata": c.metadata});
    if include_embedding {
        chunk["embedding"] = json!(c.embedding);
    }
    json!({
        "chunk": chunk,
        "document_id": h.document.id,
        "document_title": h.document.title,
        "distance": h.distance,
    })
}

/// Adds `"seq": seq` to a JSON object.
pub fn with_seq(mut v: Value, seq: u64) -> Value {
    if let Value::Object(m) = &mut v {
        m.insert("seq".into(), json!(seq));
    }
    v
}
