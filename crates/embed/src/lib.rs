//! # quiver-embed — the seam between text and vectors
//!
//! This crate owns the [`Embedder`] trait: given a library's `embedding_model` and some texts,
//! return one vector per text. The engine calls it for chunks sent as text without a vector
//! and for `{"query": "…"}` searches; everything else in Quiver only ever sees vectors.
//!
//! It must never touch the log or state, and a failure must change nothing: the engine embeds
//! *before* it validates and appends, so an embedding error simply fails the request.
//!
//! Today the only provider is [`NoEmbedder`], which refuses with a clear reason; local models
//! and remote providers plug in here (the embeddings issue) without touching the engine.

use std::fmt;

/// Why a text is embedded: some providers embed documents and queries differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Document,
    Query,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EmbedError {
    /// No provider can serve this model here (e.g. none configured, or not installed).
    #[error("{0}")]
    Unavailable(String),
    /// The provider answered with an error.
    #[error("embedding provider failed: {0}")]
    Provider(String),
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
}
