//! # `local:potion-base-8m` — a static Model2Vec model
//!
//! Owns loading potion-base-8M (256-d, MIT) through `model2vec-rs` (with its local-only
//! features: no hub, and the pure-Rust regex backend of `tokenizers`). A static model looks up
//! one vector per token and averages them: hundreds of thousands of sentences a second on two
//! cores, for users who ingest millions of chunks and accept lower quality than MiniLM.
//!
//! It must never download anything (it reads a directory whose files are checked against the
//! pinned checksums in [`crate::models`]).

use std::path::Path;

use model2vec_rs::model::StaticModel;

use crate::models::{self, ModelError};
use crate::EmbedError;

/// Token window per text, as `model2vec`'s own `encode` default.
pub const MAX_TOKENS: usize = 512;
/// Texts per internal batch.
const BATCH: usize = 1024;

pub struct Potion {
    model: StaticModel,
}

impl std::fmt::Debug for Potion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Potion")
            .field("dim", &self.model.dim())
            .finish()
    }
}

impl Potion {
    /// Loads the model from `dir`; `verify` checks the pinned SHA-256 of every file first.
    pub fn load(dir: &Path, verify: bool) -> Result<Self, ModelError> {
        let spec = models::spec(models::POTION)
            .ok_or_else(|| ModelError::Unknown(models::POTION.into()))?;
        let files = models::read_files(spec, dir, verify)?;
        let get = |name: &str| {
            files
                .iter()
                .find(|(p, _)| p.file_name().is_some_and(|f| f == name))
                .map(|(_, b)| b.as_slice())
                .unwrap_or_default()
        };
        let model = StaticModel::from_bytes(
            get("tokenizer.json"),
            get("model.safetensors"),
            get("config.json"),
            None,
        )
        .map_err(|e| ModelError::Load {
            model: models::POTION.to_string(),
            dir: dir.to_path_buf(),
            reason: format!("{e:#}"),
        })?;
        Ok(Potion { model })
    }

    pub fn dimension(&self) -> usize {
        self.model.dim()
    }

    /// One 256-d vector per text, in order (normalised, as the model's config asks).
    pub fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        crate::check_count(texts)?;
        let clipped: Vec<String>;
        let texts = if texts.iter().any(|t| t.len() > crate::MAX_TEXT_BYTES) {
            clipped = texts.iter().map(|t| crate::clip(t).to_string()).collect();
            &clipped[..]
        } else {
            texts
        };
        Ok(self.model.encode_with_args(texts, Some(MAX_TOKENS), BATCH))
    }
}
