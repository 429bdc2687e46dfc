//! The wire shapes of writes (documents, chunks, libraries, searches) and their conversion
//! into validated domain values. Shared by every ingest path (REST, batch, NDJSON), so a
//! document means the same thing however it arrives.
//!
//! Conversion is stateless apart from the target library's description; checks that need the
//! rest of the state (does the document exist, is the name free) happen in the engine under
//! its write lock.

use quiver_embed::{Embedder, Purpose};
use quiver_model::limits::CHUNKS_PER_DOCUMENT_LIMIT;
use quiver_model::validate::{self, Invalid};
use quiver_model::{Chunk, Document, Library};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashSet;

use crate::error::EngineError;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ChunkInput {
    pub id: Option<String>,
    #[serde(default)]
    pub text: String,
    pub embedding: Option<Vec<f32>>,
    pub embedding_b64: Option<B64Vector>,
    pub metadata: Option<Map<String, Value>>,
}

/// An `embedding_b64` field, decoded while the JSON is parsed (straight from the request
/// bytes into the f32 buffer, no intermediate string). A bad value is kept as its error, so it
/// is reported as `invalid_vector` for its own chunk rather than as a malformed document.
#[derive(Debug, Clone)]
pub struct B64Vector(pub Result<Vec<f32>, Invalid>);

impl B64Vector {
    pub fn encode(v: &[f32]) -> String {
        use base64::Engine as _;
        let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        base64::engine::general_purpose::STANDARD.encode(raw)
    }
}

impl<'de> Deserialize<'de> for B64Vector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = B64Vector;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a base64 string of little-endian f32 values")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<B64Vector, E> {
                Ok(B64Vector(validate::vector_b64(s)))
            }
        }
        d.deserialize_str(V)
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DocumentInput {
    pub id: Option<String>,
    #[serde(default)]
    pub title: String,
    pub metadata: Option<Map<String, Value>>,
    pub chunks: Option<Vec<ChunkInput>>,
    /// Shorthand: one chunk per text, embedded by the library's model.
    pub texts: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateLibrary {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub index_type: Option<String>,
    /// HNSW parameters (`m`, `m0`, `ef_construction`, `ef_search`); only with
    /// `index_type: "hnsw"`.
    pub index_params: Option<IndexParamsInput>,
    /// `{type: "int8", rescore?, oversampling?}`; only with `index_type: "hnsw"`.
    pub quantization: Option<QuantizationInput>,
    pub metric: Option<String>,
    pub dimension: Option<u64>,
    pub embedding_model: Option<String>,
    pub metadata: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, Copy, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct IndexParamsInput {
    pub m: Option<u32>,
    /// Bottom-layer degree; absent means 2·m.
    pub m0: Option<u32>,
    pub ef_construction: Option<u32>,
    pub ef_search: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizationInput {
    #[serde(rename = "type")]
    pub kind: String,
    pub rescore: Option<bool>,
    pub oversampling: Option<f32>,
}

/// Body of `PUT /v1/libraries/{id}/index`: the index to rebuild the library's searches on.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct IndexChange {
    pub index_type: Option<String>,
    pub index_params: Option<IndexParamsInput>,
    pub quantization: Option<QuantizationInput>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PatchLibrary {
    pub name: Option<String>,
    pub description: Option<String>,
    pub metadata: Option<Map<String, Value>>,
    /// Immutable after creation; accepted only when unchanged, so a client may send back
    /// what it read.
    pub dimension: Option<u64>,
    pub metric: Option<String>,
    pub index_type: Option<String>,
    pub embedding_model: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchInput {
    pub query: Option<String>,
    pub embedding: Option<Vec<f32>>,
    pub embedding_b64: Option<B64Vector>,
    #[serde(default = "default_k")]
    pub k: usize,
    #[serde(default)]
    pub filter: Value,
    pub distance_threshold: Option<f32>,
    #[serde(default)]
    pub include_embeddings: bool,
    /// HNSW only: this query's candidate list size (overrides the library's `ef_search`).
    pub ef_search: Option<u32>,
}

fn default_k() -> usize {
    10
}

/// A random (version 4) id from the thread's RNG: ids are generated per chunk on the ingest
/// path, where a system call each (as `Uuid::new_v4` makes) shows up in profiles.
pub fn new_id() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}

/// A vector from exactly one of `embedding` / `embedding_b64`, or `None` when neither is set.
///
/// A JSON array arrives without its length, so serde grows the vector by doubling: a 384-,
/// 768- or 1536-d vector ends up with room for 512, 1024 or 2048 components. The chunk keeps
/// this vector for as long as it lives, so it is copied into an exact allocation here, once
/// (not `shrink_to_fit`: mimalloc, the server's allocator, keeps a block that shrinks by less
/// than half, so that would free nothing).
pub fn pick_vector(
    embedding: Option<Vec<f32>>,
    b64: Option<B64Vector>,
) -> Result<Option<Vec<f32>>, Invalid> {
    match (embedding, b64) {
        (Some(_), Some(_)) => Err(Invalid::new(
            "invalid_vector",
            "send either `embedding` or `embedding_b64`, not both",
        )),
        (Some(v), None) if v.capacity() > v.len() => Ok(Some(v.as_slice().to_vec())),
        (Some(v), None) => Ok(Some(v)),
        (None, Some(B64Vector(v))) => v.map(Some),
        (None, None) => Ok(None),
    }
}

/// Validates `chunks` against `library` and embeds any that came as text only.
pub fn prepare_chunks(
    library: &Library,
    document_id: &str,
    inputs: Vec<ChunkInput>,
    embedder: &dyn Embedder,
) -> Result<Vec<Chunk>, EngineError> {
    let (mut chunks, needs) = prepare_chunks_deferred(library, document_id, inputs)?;
    let mut one = [(&mut chunks, needs.as_slice())];
    if let Some(e) = embed_pending(library, embedder, &mut one)
        .into_iter()
        .flatten()
        .next()
    {
        return Err(e);
    }
    Ok(chunks)
}

/// Validates `chunks` against `library`; chunks that came as text only are returned with an
/// empty embedding, their positions listed second, for [`embed_pending`] to fill.
pub fn prepare_chunks_deferred(
    library: &Library,
    document_id: &str,
    inputs: Vec<ChunkInput>,
) -> Result<(Vec<Chunk>, Vec<usize>), EngineError> {
    if inputs.len() > CHUNKS_PER_DOCUMENT_LIMIT {
        return Err(Invalid::too_large(
            "too_many_chunks",
            format!(
                "{} chunks; the limit per document is {CHUNKS_PER_DOCUMENT_LIMIT}",
                inputs.len()
            ),
        )
        .into());
    }
    let mut chunks = Vec::with_capacity(inputs.len());
    let mut needs_embedding = Vec::new();
    for (i, c) in inputs.into_iter().enumerate() {
        validate::text(&c.text)?;
        let metadata = c.metadata.unwrap_or_default();
        validate::metadata("chunk", &metadata)?;
        let id = match c.id {
            Some(id) => {
                validate::id("chunk", &id)?;
                id
            }
            None => new_id().simple().to_string(),
        };
        let embedding = match pick_vector(c.embedding, c.embedding_b64)? {
            Some(v) => {
                validate::vector(v, library.dimension, library.metric).map_err(|e| Invalid {
                    detail: format!("chunk {i}: {}", e.detail),
                    ..e
                })?
            }
            None => {
                if c.text.trim().is_empty() {
                    return Err(EngineError::invalid(
                        "missing_vector",
                        format!("chunk {i} has neither text nor a vector"),
                    ));
                }
                needs_embedding.push(i);
                Vec::new()
            }
        };
        chunks.push(Chunk {
            id,
            document_id: document_id.to_string(),
            text: c.text,
            embedding,
            metadata,
        });
    }
    let mut seen = HashSet::with_capacity(chunks.len());
    if let Some(dup) = chunks.iter().find(|c| !seen.insert(c.id.as_str())) {
        return Err(EngineError::invalid(
            "duplicate_chunk_id",
            format!("chunk id {:?} appears twice", dup.id),
        ));
    }
    Ok((chunks, needs_embedding))
}

/// How an embedding failure reaches the client: no model for this library or a model that is
/// not installed (the message names the install command) is 422 `embedding_unavailable`;
/// text the provider refuses is 422 `invalid_text`; a provider that failed or could not be
/// reached is 503 `embedding_failed` with its reason. Nothing is committed in any case.
pub fn embed_error(e: quiver_embed::EmbedError) -> EngineError {
    use quiver_embed::EmbedError as E;
    match e {
        E::Unavailable(_) => EngineError::invalid("embedding_unavailable", e.to_string()),
        E::InvalidInput(_) => EngineError::invalid("invalid_text", e.to_string()),
        E::Provider(_) => EngineError::Unavailable {
            code: "embedding_failed",
            detail: e.to_string(),
        },
    }
}

/// Embeds the text-only chunks of many items in one call (the provider batches and the
/// registry merges concurrent callers), then validates each vector. Returns, per item, the
/// error that item gets: the call's error for every item that needed it, or a bad vector for
/// its own item only. Items that needed nothing always come back `None`.
pub fn embed_pending(
    library: &Library,
    embedder: &dyn Embedder,
    items: &mut [(&mut Vec<Chunk>, &[usize])],
) -> Vec<Option<EngineError>> {
    let mut out: Vec<Option<EngineError>> = (0..items.len()).map(|_| None).collect();
    let texts: Vec<String> = items
        .iter()
        .flat_map(|(chunks, needs)| needs.iter().map(|&i| chunks[i].text.clone()))
        .collect();
    if texts.is_empty() {
        return out;
    }
    let vectors = match embedder.embed(
        library.embedding_model.as_deref(),
        &texts,
        Purpose::Document,
    ) {
        Ok(v) if v.len() == texts.len() => v,
        Ok(v) => {
            let detail = format!(
                "the embedding provider returned {} vectors for {} texts",
                v.len(),
                texts.len()
            );
            for (slot, (_, needs)) in out.iter_mut().zip(items.iter()) {
                if !needs.is_empty() {
                    *slot = Some(EngineError::Unavailable {
                        code: "embedding_failed",
                        detail: detail.clone(),
                    });
                }
            }
            return out;
        }
        Err(e) => {
            for (slot, (_, needs)) in out.iter_mut().zip(items.iter()) {
                if !needs.is_empty() {
                    *slot = Some(embed_error(e.clone()));
                }
            }
            return out;
        }
    };
    let mut vectors = vectors.into_iter();
    for (slot, (chunks, needs)) in out.iter_mut().zip(items.iter_mut()) {
        for &i in needs.iter() {
            let Some(v) = vectors.next() else { break };
            match validate::vector(v, library.dimension, library.metric) {
                Ok(v) => chunks[i].embedding = v,
                Err(e) => {
                    if slot.is_none() {
                        *slot = Some(e.into());
                    }
                }
            }
        }
    }
    out
}

/// Turns a document input into a document for `library`, embedding its text-only chunks.
/// Timestamps are set by the engine when it commits (it knows whether this replaces an
/// existing document).
pub fn prepare_document(
    library: &Library,
    input: DocumentInput,
    embedder: &dyn Embedder,
) -> Result<Document, EngineError> {
    let (mut doc, needs) = prepare_document_deferred(library, input)?;
    let mut one = [(&mut doc.chunks, needs.as_slice())];
    if let Some(e) = embed_pending(library, embedder, &mut one)
        .into_iter()
        .flatten()
        .next()
    {
        return Err(e);
    }
    Ok(doc)
}

/// [`prepare_document`] without the embedding: the positions of text-only chunks come back
/// for [`embed_pending`], so a batch embeds all its texts in one call.
pub fn prepare_document_deferred(
    library: &Library,
    input: DocumentInput,
) -> Result<(Document, Vec<usize>), EngineError> {
    let id = match input.id {
        Some(id) => {
            validate::id("document", &id)?;
            id
        }
        None => new_id().to_string(),
    };
    validate::title(&input.title)?;
    let metadata = input.metadata.unwrap_or_default();
    validate::metadata("document", &metadata)?;
    let mut chunk_inputs = input.chunks.unwrap_or_default();
    if let Some(texts) = input.texts {
        if texts.len() > CHUNKS_PER_DOCUMENT_LIMIT {
            return Err(Invalid::too_large(
                "too_many_chunks",
                format!(
                    "{} texts; the limit per document is {CHUNKS_PER_DOCUMENT_LIMIT}",
                    texts.len()
                ),
            )
            .into());
        }
        chunk_inputs.extend(texts.into_iter().map(|text| ChunkInput {
            text,
            ..Default::default()
        }));
    }
    let (chunks, needs) = prepare_chunks_deferred(library, &id, chunk_inputs)?;
    Ok((
        Document {
            id,
            library_id: library.id.clone(),
            title: input.title,
            metadata,
            created_at_ms: 0,
            updated_at_ms: 0,
            chunks,
        },
        needs,
    ))
}

/// One document as an export line (`GET /v1/libraries/{id}/documents/stream` and the
/// `batch_export` job write it): the shape [`DocumentInput`] reads back on import, with each
/// vector as `embedding_b64` when `include_embeddings`.
pub fn export_line(d: &Document, include_embeddings: bool) -> Value {
    let chunks: Vec<Value> = d
        .chunks
        .iter()
        .map(|c| {
            let mut v = serde_json::json!({"id": c.id, "text": c.text, "metadata": c.metadata});
            if include_embeddings {
                v["embedding_b64"] = serde_json::json!(B64Vector::encode(&c.embedding));
            }
            v
        })
        .collect();
    serde_json::json!({"id": d.id, "title": d.title, "metadata": d.metadata, "chunks": chunks})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vector parsed from JSON keeps no spare capacity (serde alone would leave a 384-d
    /// vector with room for 512).
    #[test]
    fn a_json_vector_is_trimmed_to_its_length() {
        let text = format!("[{}]", vec!["0.5"; 384].join(","));
        let parsed: Vec<f32> = serde_json::from_str(&text).expect("a JSON array");
        assert!(parsed.capacity() > parsed.len(), "serde over-allocates");
        let v = pick_vector(Some(parsed), None)
            .expect("valid")
            .expect("a vector");
        assert_eq!((v.len(), v.capacity()), (384, 384));
    }
}
