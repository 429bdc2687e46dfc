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

use crate::bert::{Bert, BertConfig, Gemm, Scratch};
use crate::chunk::ChunkConfig;
use crate::models::{self, ModelError, ModelSpec};
use crate::EmbedError;

/// Most texts in one forward pass.
pub const MAX_BATCH: usize = 64;
/// Most tokens (texts × padded length) in one forward pass: bounds activation memory.
pub const BATCH_TOKENS: usize = 4096;

/// Most tokens one worker thread runs through the packed forward at once (one text longer
/// than this still runs whole, up to the 256-token window). Small on purpose: a run's
/// activations (≈ 256 × 8 KB) then stay in the core's L2 cache between the layers' matrix
/// multiplies, which measured faster here than runs of 512 or 4096 tokens; the weights are
/// streamed per 256 rows either way.
pub const PACKED_TOKENS: usize = 256;
/// Most worker threads one `embed` call uses.
pub const MAX_THREADS: usize = 16;

/// Which forward pass runs the model.
enum Engine {
    /// The packed forward ([`crate::bert`]): AMX bf16 where available.
    Packed(Box<Bert>),
    /// candle's BERT: the portable path.
    Candle(Box<BertModel>, Device),
}

pub struct MiniLm {
    engine: Engine,
    tokenizer: Tokenizer,
    max_tokens: usize,
    batch: usize,
    threads: usize,
}

impl std::fmt::Debug for MiniLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiniLm")
            .field("backend", &self.backend())
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
    ///
    /// The forward pass is chosen by `QUIVER_EMBED_BACKEND` (see [`Backend`]); by default the
    /// packed AMX forward where the CPU has AMX-BF16, else candle.
    pub fn load(dir: &Path, verify: bool) -> Result<Self, ModelError> {
        let backend = Backend::from_env().map_err(|e| load_err(dir, e))?;
        Self::load_with(dir, verify, backend)
    }

    /// [`MiniLm::load`] with an explicit forward pass.
    pub fn load_with(dir: &Path, verify: bool, backend: Backend) -> Result<Self, ModelError> {
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
        let batch = std::env::var("QUIVER_EMBED_BATCH")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(32usize)
            .clamp(1, MAX_BATCH);
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, MAX_THREADS);
        let weights = get("model.safetensors")?;
        let engine = match backend {
            Backend::Auto if crate::amx::available() => packed(
                get("config.json")?,
                weights,
                Gemm::Amx,
            )
            .or_else(|e| {
                tracing::warn!(reason = %e, "packed MiniLM forward unavailable; using candle");
                candle(&config, weights)
            })
            .map_err(|e| load_err(dir, e))?,
            Backend::Auto | Backend::Candle => {
                candle(&config, weights).map_err(|e| load_err(dir, e))?
            }
            Backend::PackedF32 => {
                packed(get("config.json")?, weights, Gemm::F32).map_err(|e| load_err(dir, e))?
            }
            Backend::PackedAmx => {
                packed(get("config.json")?, weights, Gemm::Amx).map_err(|e| load_err(dir, e))?
            }
        };
        Ok(MiniLm {
            engine,
            tokenizer,
            max_tokens,
            batch,
            threads,
        })
    }

    /// Which forward runs: `"amx-bf16"`, `"packed-f32"` or `"candle"`.
    pub fn backend(&self) -> &'static str {
        match &self.engine {
            Engine::Packed(b) if b.gemm() == Gemm::Amx => "amx-bf16",
            Engine::Packed(_) => "packed-f32",
            Engine::Candle(..) => "candle",
        }
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

    /// `text` cut into chunks whose budget counts this model's word pieces (see
    /// [`crate::chunk`]). `cfg.max_tokens` above the window less `[CLS]`/`[SEP]` is lowered to
    /// it, so no chunk is ever truncated by the model.
    pub fn chunk(&self, text: &str, cfg: &ChunkConfig) -> Vec<String> {
        let window = self.max_tokens.saturating_sub(2).max(1);
        let cfg = ChunkConfig {
            max_tokens: cfg.max_tokens.min(window),
            overlap_tokens: cfg.overlap_tokens,
        };
        crate::chunk::chunk_with(text, &cfg, &|s: &str| self.count_tokens(s))
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
        if let Engine::Packed(bert) = &self.engine {
            return self.embed_packed(bert, encoded);
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

    /// The packed path: texts cut into runs of at most [`PACKED_TOKENS`] tokens (smaller when
    /// that leaves a worker idle), run on up to `threads` scoped threads.
    fn embed_packed(
        &self,
        bert: &Bert,
        encoded: Vec<(usize, Vec<u32>)>,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let total: usize = encoded.iter().map(|(_, t)| t.len()).sum();
        let budget = total
            .div_ceil(self.threads)
            .clamp(crate::amx::ROW_BLOCK, PACKED_TOKENS);
        let mut runs: Vec<&[(usize, Vec<u32>)]> = Vec::new();
        let (mut start, mut tokens) = (0, 0);
        for (i, (_, t)) in encoded.iter().enumerate() {
            if i > start && tokens + t.len() > budget {
                runs.push(&encoded[start..i]);
                (start, tokens) = (i, 0);
            }
            tokens += t.len();
        }
        if start < encoded.len() {
            runs.push(&encoded[start..]);
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let work = || {
            let mut scratch = Scratch::default();
            let mut done: Vec<(usize, Vec<f32>)> = Vec::new();
            loop {
                let r = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(run) = runs.get(r) else {
                    return done;
                };
                let seqs: Vec<&[u32]> = run.iter().map(|(_, t)| t.as_slice()).collect();
                let vectors = bert.embed_packed(&seqs, &mut scratch);
                for ((i, _), mut v) in run.iter().zip(vectors) {
                    crate::normalize(&mut v);
                    done.push((*i, v));
                }
            }
        };
        let threads = self.threads.min(runs.len()).max(1);
        let parts: Vec<Vec<(usize, Vec<f32>)>> = std::thread::scope(|s| {
            let mut handles = Vec::with_capacity(threads);
            for _ in 1..threads {
                match std::thread::Builder::new()
                    .name("quiver-minilm".into())
                    .spawn_scoped(s, work)
                {
                    Ok(h) => handles.push(h),
                    // Fewer threads is slower, not wrong: the others take the runs.
                    Err(e) => tracing::warn!(error = %e, "could not start an embedding thread"),
                }
            }
            let mut parts = vec![work()];
            for h in handles {
                match h.join() {
                    Ok(p) => parts.push(p),
                    Err(_) => {
                        return Err(EmbedError::Provider(format!(
                            "local model {} failed: a worker thread panicked",
                            models::MINILM
                        )))
                    }
                }
            }
            Ok(parts)
        })?;
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); encoded.len()];
        for (i, v) in parts.into_iter().flatten() {
            out[i] = v;
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
        let device = match &self.engine {
            Engine::Candle(_, d) => d,
            Engine::Packed(_) => &Device::Cpu,
        };
        let ids = Tensor::from_vec(ids, (n, len), device)?;
        let mask = Tensor::from_vec(mask, (n, len), device)?;
        let types = ids.zeros_like()?;
        let Engine::Candle(model, _) = &self.engine else {
            return Err(candle_core::Error::Msg("not the candle engine".into()));
        };
        let hidden = model.forward(&ids, &types, Some(&mask))?; // (n, len, 384)
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

/// `QUIVER_EMBED_BACKEND`: `auto` (default: AMX where available, else candle), `candle`,
/// `packed-amx` (fail to load without AMX) or `packed-f32` (slow; for accuracy checks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The packed AMX forward where available, else candle.
    Auto,
    /// candle's BERT (portable).
    Candle,
    /// The packed forward with AMX bf16 matrix multiplies; loading fails without AMX.
    PackedAmx,
    /// The packed forward with plain f32 matrix multiplies: slow, exact; for checks.
    PackedF32,
}

impl Backend {
    /// From `QUIVER_EMBED_BACKEND` (unset or empty: [`Backend::Auto`]).
    pub fn from_env() -> Result<Backend, String> {
        match std::env::var("QUIVER_EMBED_BACKEND").ok().as_deref() {
            None | Some("") | Some("auto") => Ok(Backend::Auto),
            Some("candle") => Ok(Backend::Candle),
            Some("packed-amx") => Ok(Backend::PackedAmx),
            Some("packed-f32") => Ok(Backend::PackedF32),
            Some(other) => Err(format!(
                "QUIVER_EMBED_BACKEND={other:?}; expected auto, candle, packed-amx or packed-f32"
            )),
        }
    }
}

fn packed(config: &[u8], weights: &[u8], gemm: Gemm) -> Result<Engine, String> {
    let cfg: BertConfig = serde_json::from_slice(config).map_err(|e| e.to_string())?;
    Ok(Engine::Packed(Box::new(Bert::load(&cfg, weights, gemm)?)))
}

fn candle(config: &Config, weights: &[u8]) -> Result<Engine, String> {
    let device = Device::Cpu;
    let vb = VarBuilder::from_buffered_safetensors(weights.to_vec(), DType::F32, &device)
        .map_err(|e| e.to_string())?;
    let model = BertModel::load(vb, config).map_err(|e| e.to_string())?;
    Ok(Engine::Candle(Box::new(model), device))
}
