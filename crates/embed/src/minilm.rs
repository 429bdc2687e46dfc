//! # `local:all-minilm-l6-v2` — a sentence-transformer in pure Rust
//!
//! Owns the forward pass of all-MiniLM-L6-v2 (BERT, 6 layers, 384-d) with candle, the
//! `tokenizers` WordPiece tokenizer, and the sentence-transformers recipe around them:
//! truncation to `max_seq_length` (256 word pieces, `[CLS]`/`[SEP]` included, from the
//! model's `sentence_bert_config.json`), mean pooling over the attention mask, and L2
//! normalisation — so its vectors match sentence-transformers' (checked by
//! `tests/reference.rs` against stored outputs).
//!
//! Speed comes from batching by length: texts are sorted by token count and cut into batches
//! under a token budget, so a batch carries almost no padding, and results are put back in
//! the caller's order.
//!
//! It must never download anything (it reads a directory) and never panic on input: every
//! text, however long or odd, becomes one normalised vector or an error.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Tokenizer, TruncationParams, TruncationStrategy};

use crate::models::{self, ModelError, ModelSpec};
use crate::EmbedError;

/// Most texts in one forward pass.
pub const MAX_BATCH: usize = 64;
/// Most tokens (texts × padded length) in one forward pass: bounds activation memory.
pub const BATCH_TOKENS: usize = 4096;

pub struct MiniLm {
    model: BertModel,
    tokenizer: Tokenizer,
    max_tokens: usize,
    batch: usize,
    device: Device,
}

impl std::fmt::Debug for MiniLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiniLm")
            .field("max_tokens", &self.max_tokens)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

fn load_err(dir: &Path, reason: impl std::fmt::Display) -> ModelError {
    ModelError::Load {
        model: models::MINILM.to_string(),
        dir: dir.to_path_buf(),
        reason: reason.to_string(),
    }
}

impl MiniLm {
    /// Loads the model from `dir` (a directory holding the files [`models::install`] puts
    /// there). `verify` checks the pinned SHA-256 of every file first (always do so for the
    /// managed cache; an explicit `--model-dir` may hold an equivalent copy).
    pub fn load(dir: &Path, verify: bool) -> Result<Self, ModelError> {
        let spec: &ModelSpec =
            models::spec(models::MINILM).ok_or_else(|| load_err(dir, "no spec"))?;
        let files = models::read_files(spec, dir, verify)?;
        let get = |name: &str| {
            files
                .iter()
                .find(|(p, _)| p.file_name().is_some_and(|f| f == name))
                .map(|(_, b)| b.as_slice())
                .ok_or_else(|| load_err(dir, format!("{name} missing")))
        };
        let config: Config =
            serde_json::from_slice(get("config.json")?).map_err(|e| load_err(dir, e))?;
        #[derive(serde::Deserialize)]
        struct SbertConfig {
            max_seq_length: usize,
        }
        let sbert: SbertConfig = serde_json::from_slice(get("sentence_bert_config.json")?)
            .map_err(|e| load_err(dir, e))?;
        let max_tokens = sbert
            .max_seq_length
            .clamp(2, config.max_position_embeddings);
        let mut tokenizer =
            Tokenizer::from_bytes(get("tokenizer.json")?).map_err(|e| load_err(dir, e))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                ..Default::default()
            }))
            .map_err(|e| load_err(dir, e))?;
        tokenizer.with_padding(None);
        let device = Device::Cpu;
        let vb = VarBuilder::from_buffered_safetensors(
            get("model.safetensors")?.to_vec(),
            DType::F32,
            &device,
        )
        .map_err(|e| load_err(dir, e))?;
        let model = BertModel::load(vb, &config).map_err(|e| load_err(dir, e))?;
        let batch = std::env::var("QUIVER_EMBED_BATCH")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(32usize)
            .clamp(1, MAX_BATCH);
        Ok(MiniLm {
            model,
            tokenizer,
            max_tokens,
            batch,
            device,
        })
    }

    /// The token window (256): longer texts are truncated, as sentence-transformers does.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn dimension(&self) -> usize {
        384
    }

    /// Word pieces in `text` (without `[CLS]`/`[SEP]`, before truncation), for chunking.
    pub fn count_tokens(&self, text: &str) -> usize {
        self.tokenizer
            .encode(crate::clip(text), false)
            .map(|e| {
                e.get_ids().len()
                    + e.get_overflowing()
                        .iter()
                        .map(|o| o.get_ids().len())
                        .sum::<usize>()
            })
            .unwrap_or_else(|_| text.split_whitespace().count())
    }

    /// One normalised 384-d vector per text, in order.
    pub fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        crate::check_count(texts)?;
        let mut encoded: Vec<(usize, Vec<u32>)> = Vec::with_capacity(texts.len());
        for (i, t) in texts.iter().enumerate() {
            let e = self.tokenizer.encode(crate::clip(t), true).map_err(|e| {
                EmbedError::InvalidInput(format!("text {i} could not be tokenized: {e}"))
            })?;
            encoded.push((i, e.get_ids().to_vec()));
        }
        // Longest first: the first batch is the biggest, so memory peaks early, and each
        // batch holds texts of nearly the same length (little padding).
        encoded.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        let mut start = 0;
        while start < encoded.len() {
            let longest = encoded[start].1.len().max(1);
            let fit = (BATCH_TOKENS / longest).clamp(1, self.batch);
            let end = (start + fit).min(encoded.len());
            let batch = &encoded[start..end];
            let vectors = self.forward(batch).map_err(|e| {
                EmbedError::Provider(format!("local model {} failed: {e}", models::MINILM))
            })?;
            for ((i, _), v) in batch.iter().zip(vectors) {
                out[*i] = v;
            }
            start = end;
        }
        Ok(out)
    }

    fn forward(&self, batch: &[(usize, Vec<u32>)]) -> candle_core::Result<Vec<Vec<f32>>> {
        let n = batch.len();
        let len = batch
            .iter()
            .map(|(_, ids)| ids.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut ids = vec![0u32; n * len];
        let mut mask = vec![0u32; n * len];
        for (row, (_, t)) in batch.iter().enumerate() {
            ids[row * len..row * len + t.len()].copy_from_slice(t);
            mask[row * len..row * len + t.len()].fill(1);
        }
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?; // (n, len, 384)
        let maskf = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (n, len, 1)
        let summed = hidden.broadcast_mul(&maskf)?.sum(1)?; // (n, 384)
        let counts = maskf.sum(1)?.clamp(1e-9, f64::MAX)?; // (n, 1)
        let mean = summed.broadcast_div(&counts)?;
        let mut rows = mean.to_vec2::<f32>()?;
        for r in &mut rows {
            crate::normalize(r);
        }
        Ok(rows)
    }
}
