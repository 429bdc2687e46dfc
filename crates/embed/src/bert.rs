//! # A packed BERT encoder forward pass for MiniLM, written for throughput
//!
//! Owns the fast path of [`crate::minilm`]: the weights of a BERT encoder (embeddings,
//! N layers of self-attention + feed-forward, post-LayerNorm, erf GELU) read straight from
//! `model.safetensors`, and a forward pass over a *packed* batch — every token of every text
//! in one `tokens × hidden` matrix, no padding — with attention computed per text, the
//! query/key/value projections fused into one matrix multiply, and mean pooling per text.
//!
//! The matrix multiplies run on AMX tiles in bf16 with f32 accumulation ([`crate::amx`]);
//! everything else (LayerNorm, softmax, GELU, residuals, pooling) stays f32. The alternative
//! f32 matrix multiply ([`Gemm::F32`]) is plain and slow: it exists to test this code on any
//! machine and to measure what bf16 costs in accuracy, not to be a fallback — machines without
//! AMX use the candle path in [`crate::minilm`].
//!
//! It must never read outside a tensor it was given (shapes are checked at load, token ids
//! and positions are clamped), never allocate without a bound (a batch's buffers grow with its
//! token count, which the caller bounds), and never download or write anything.

// Lane loops (`for l in 0..16 { acc[l] += … }`) are how these kernels ask LLVM for vector code.
#![allow(clippy::needless_range_loop)]

use std::collections::HashMap;

use crate::amx;

/// How the linear layers multiply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gemm {
    /// AMX bf16 tiles (only when [`amx::available`]).
    Amx,
    /// Plain f32 dot products (tests and accuracy checks).
    F32,
}

/// The parts of a BERT `config.json` the forward needs.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
}

struct Linear {
    n: usize,
    k: usize,
    /// `n` × `k`, as torch stores it (`y = x·Wᵀ + b`); empty when packed for AMX.
    w: Vec<f32>,
    bias: Vec<f32>,
    packed: Option<amx::PackedB>,
}

struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

struct Layer {
    qkv: Linear,
    attn_out: Linear,
    norm1: Norm,
    ff_in: Linear,
    ff_out: Linear,
    norm2: Norm,
}

/// The encoder's weights and shape.
pub struct Bert {
    cfg: BertConfig,
    gemm: Gemm,
    word: Vec<f32>,
    position: Vec<f32>,
    /// Token type 0's embedding (sentence-transformers passes type 0 everywhere).
    token_type0: Vec<f32>,
    norm0: Norm,
    layers: Vec<Layer>,
    eps: f32,
}

/// Reusable buffers of one worker thread.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    /// The bf16 copy of a matrix multiply's input (`rows × hidden`).
    a_bf16: Vec<u16>,
    /// The feed-forward's inner activations in bf16 (`rows × ff`, AMX path).
    ff_bf16: Vec<u16>,
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    tmp: Vec<f32>,
    /// The feed-forward's inner activations in f32 (f32 path only).
    ff: Vec<f32>,
    attn: AttnScratch,
}

#[derive(Default)]
struct AttnScratch {
    /// One head's keys, transposed (`d × len` padded to 16).
    kt: Vec<f32>,
    scores: Vec<f32>,
}

/// Tensors by name: shape and f32 values.
type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;
/// Takes one named tensor of the expected shape out of [`Tensors`].
type TakeTensor<'a> = dyn FnMut(&str, &[usize]) -> Result<Vec<f32>, String> + 'a;

/// The f32 tensors of a safetensors file, by name, with their shapes.
fn read_safetensors(bytes: &[u8]) -> Result<Tensors, String> {
    #[derive(serde::Deserialize)]
    struct Entry {
        dtype: String,
        shape: Vec<usize>,
        data_offsets: [usize; 2],
    }
    let header_len = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .ok_or("safetensors file shorter than its header")?;
    let header_end = usize::try_from(header_len)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&end| end <= bytes.len())
        .ok_or("safetensors header length out of range")?;
    let header: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..header_end]).map_err(|e| e.to_string())?;
    let data = &bytes[header_end..];
    let mut out = HashMap::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let e: Entry = serde_json::from_value(v).map_err(|e| format!("{name}: {e}"))?;
        if e.dtype != "F32" {
            continue;
        }
        let [start, end] = e.data_offsets;
        let count: usize = e.shape.iter().product();
        let raw = data
            .get(start..end)
            .filter(|r| r.len() == count * 4)
            .ok_or_else(|| format!("{name}: data offsets out of range"))?;
        let values = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(name, (e.shape, values));
    }
    Ok(out)
}

impl Bert {
    /// Builds the encoder from a `config.json` and `model.safetensors` (BERT names, without a
    /// `bert.` prefix). Refuses shapes this code does not handle (the caller then uses candle).
    pub fn load(config: &BertConfig, safetensors: &[u8], gemm: Gemm) -> Result<Bert, String> {
        let c = config;
        let (h, ff) = (c.hidden_size, c.intermediate_size);
        if c.hidden_act != "gelu" {
            return Err(format!("activation {:?} is not gelu", c.hidden_act));
        }
        if h == 0
            || c.num_attention_heads == 0
            || !h.is_multiple_of(c.num_attention_heads)
            || !h.is_multiple_of(amx::COL_BLOCK)
            || !ff.is_multiple_of(amx::COL_BLOCK)
            || c.max_position_embeddings == 0
            || c.vocab_size == 0
            || c.type_vocab_size == 0
        {
            return Err(format!(
                "unsupported shape: hidden {h}, heads {}, ff {ff}",
                c.num_attention_heads
            ));
        }
        if gemm == Gemm::Amx && !amx::available() {
            return Err("AMX-BF16 is not available on this machine".into());
        }
        let mut t = read_safetensors(safetensors)?;
        let mut take = |name: &str, shape: &[usize]| -> Result<Vec<f32>, String> {
            let (s, v) = t
                .remove(name)
                .ok_or_else(|| format!("tensor {name} missing"))?;
            if s != shape {
                return Err(format!("tensor {name}: shape {s:?}, expected {shape:?}"));
            }
            Ok(v)
        };
        let norm = |take: &mut TakeTensor<'_>, p: &str| -> Result<Norm, String> {
            Ok(Norm {
                gamma: take(&format!("{p}.weight"), &[h])?,
                beta: take(&format!("{p}.bias"), &[h])?,
            })
        };
        let linear = |w: Vec<f32>, bias: Vec<f32>, n: usize, k: usize| -> Result<Linear, String> {
            let packed = match gemm {
                Gemm::Amx => Some(
                    amx::PackedB::pack(&w, n, k).ok_or_else(|| format!("cannot pack {n}×{k}"))?,
                ),
                Gemm::F32 => None,
            };
            let w = if packed.is_some() { Vec::new() } else { w };
            Ok(Linear {
                n,
                k,
                w,
                bias,
                packed,
            })
        };
        let word = take("embeddings.word_embeddings.weight", &[c.vocab_size, h])?;
        let position = take(
            "embeddings.position_embeddings.weight",
            &[c.max_position_embeddings, h],
        )?;
        let mut token_type0 = take(
            "embeddings.token_type_embeddings.weight",
            &[c.type_vocab_size, h],
        )?;
        token_type0.truncate(h);
        let norm0 = norm(&mut take, "embeddings.LayerNorm")?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let mut wqkv = Vec::with_capacity(3 * h * h);
            let mut bqkv = Vec::with_capacity(3 * h);
            for part in ["query", "key", "value"] {
                wqkv.extend(take(&format!("{p}.attention.self.{part}.weight"), &[h, h])?);
                bqkv.extend(take(&format!("{p}.attention.self.{part}.bias"), &[h])?);
            }
            let qkv = linear(wqkv, bqkv, 3 * h, h)?;
            let attn_out = linear(
                take(&format!("{p}.attention.output.dense.weight"), &[h, h])?,
                take(&format!("{p}.attention.output.dense.bias"), &[h])?,
                h,
                h,
            )?;
            let norm1 = norm(&mut take, &format!("{p}.attention.output.LayerNorm"))?;
            let ff_in = linear(
                take(&format!("{p}.intermediate.dense.weight"), &[ff, h])?,
                take(&format!("{p}.intermediate.dense.bias"), &[ff])?,
                ff,
                h,
            )?;
            let ff_out = linear(
                take(&format!("{p}.output.dense.weight"), &[h, ff])?,
                take(&format!("{p}.output.dense.bias"), &[h])?,
                h,
                ff,
            )?;
            let norm2 = norm(&mut take, &format!("{p}.output.LayerNorm"))?;
            layers.push(Layer {
                qkv,
                attn_out,
                norm1,
                ff_in,
                ff_out,
                norm2,
            });
        }
        Ok(Bert {
            cfg: c.clone(),
            gemm,
            word,
            position,
            token_type0,
            norm0,
            layers,
            eps: c.layer_norm_eps as f32,
        })
    }

    pub fn gemm(&self) -> Gemm {
        self.gemm
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    /// Mean-pooled (not normalised) last hidden states, one per sequence of token ids
    /// (`[CLS]` … `[SEP]`, already truncated to the model's window). An empty sequence gives
    /// a zero vector.
    pub fn embed_packed(&self, seqs: &[&[u32]], s: &mut Scratch) -> Vec<Vec<f32>> {
        match self.gemm {
            // SAFETY: a Bert with Gemm::Amx is only built when amx::available() (checked in
            // `load`), which includes AVX-512F/BW and FMA.
            #[cfg(target_arch = "x86_64")]
            Gemm::Amx => unsafe { self.forward_avx512(seqs, s) },
            _ => self.forward(seqs, s),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn forward_avx512(&self, seqs: &[&[u32]], s: &mut Scratch) -> Vec<Vec<f32>> {
        self.forward(seqs, s)
    }

    #[inline(always)]
    fn forward(&self, seqs: &[&[u32]], s: &mut Scratch) -> Vec<Vec<f32>> {
        let c = &self.cfg;
        let (h, ff) = (c.hidden_size, c.intermediate_size);
        let tokens: usize = seqs.iter().map(|q| q.len()).sum();
        let rows = tokens.max(1).div_ceil(amx::ROW_BLOCK) * amx::ROW_BLOCK;
        s.x.resize(rows * h, 0.0);
        s.a_bf16.resize(rows * h, 0);
        s.qkv.resize(rows * 3 * h, 0.0);
        s.ctx.resize(rows * h, 0.0);
        s.tmp.resize(rows * h, 0.0);
        match self.gemm {
            Gemm::Amx => s.ff_bf16.resize(rows * ff, 0),
            Gemm::F32 => s.ff.resize(rows * ff, 0.0),
        }
        // Embeddings: word + position + type 0, then LayerNorm.
        let mut row = 0;
        for seq in seqs {
            for (p, &id) in seq.iter().enumerate() {
                let id = (id as usize).min(c.vocab_size - 1);
                let p = p.min(c.max_position_embeddings - 1);
                let x = &mut s.x[row * h..][..h];
                let w = &self.word[id * h..][..h];
                let pe = &self.position[p * h..][..h];
                for i in 0..h {
                    x[i] = w[i] + pe[i] + self.token_type0[i];
                }
                row += 1;
            }
        }
        for x in s.x[..tokens * h].chunks_exact_mut(h) {
            layer_norm(x, &self.norm0, self.eps);
        }
        for layer in &self.layers {
            self.project(&layer.qkv, tokens, rows, &s.x, &mut s.a_bf16, &mut s.qkv);
            self.attention(seqs, s);
            self.project(
                &layer.attn_out,
                tokens,
                rows,
                &s.ctx,
                &mut s.a_bf16,
                &mut s.tmp,
            );
            add_norm(&mut s.x, &s.tmp, tokens, h, &layer.norm1, self.eps);
            self.feed_forward(layer, tokens, rows, s);
            add_norm(&mut s.x, &s.tmp, tokens, h, &layer.norm2, self.eps);
        }
        // Mean pooling per sequence.
        let mut out = Vec::with_capacity(seqs.len());
        let mut start = 0;
        for seq in seqs {
            let mut v = vec![0f32; h];
            for r in start..start + seq.len() {
                for (o, x) in v.iter_mut().zip(&s.x[r * h..][..h]) {
                    *o += *x;
                }
            }
            if !seq.is_empty() {
                let inv = 1.0 / seq.len() as f32;
                v.iter_mut().for_each(|x| *x *= inv);
            }
            out.push(v);
            start += seq.len();
        }
        out
    }

    #[inline(always)]
    fn attention(&self, seqs: &[&[u32]], s: &mut Scratch) {
        let (h, heads) = (self.cfg.hidden_size, self.cfg.num_attention_heads);
        #[cfg(target_arch = "x86_64")]
        if self.gemm == Gemm::Amx && h == heads * 32 {
            // SAFETY: Gemm::Amx implies AVX-512 (checked in `load`); the head size is 32.
            unsafe { attention_avx512(&s.qkv, &mut s.ctx, seqs, h, heads, &mut s.attn) };
            return;
        }
        attention(&s.qkv, &mut s.ctx, seqs, h, heads, &mut s.attn);
    }

    /// `out[..tokens] = a[..tokens] · Wᵀ + b` (`a`: tokens × k, `out`: rows × n).
    #[inline(always)]
    fn project(
        &self,
        l: &Linear,
        tokens: usize,
        rows: usize,
        a: &[f32],
        a_bf16: &mut [u16],
        out: &mut [f32],
    ) {
        let k = l.k;
        match &l.packed {
            Some(p) => {
                // SAFETY: packed weights exist only when AMX (and AVX-512) is available.
                unsafe {
                    amx::to_bf16(&a[..tokens * k], &mut a_bf16[..tokens * k]);
                    amx_bias(&a_bf16[..rows * k], rows, p, &l.bias, out);
                }
            }
            None => linear_f32(l, tokens, a, out),
        }
    }

    /// `tmp = GELU(x·W₁ᵀ + b₁)·W₂ᵀ + b₂`. On AMX the inner activations go from the first
    /// multiply's epilogue straight to bf16, never to an f32 matrix.
    #[inline(always)]
    fn feed_forward(&self, layer: &Layer, tokens: usize, rows: usize, s: &mut Scratch) {
        let (h, ff) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        match (&layer.ff_in.packed, &layer.ff_out.packed) {
            (Some(p_in), Some(p_out)) => {
                let bias = &layer.ff_in.bias;
                let ffb = &mut s.ff_bf16;
                // SAFETY: packed weights exist only when AMX (and AVX-512) is available.
                unsafe {
                    amx::to_bf16(&s.x[..tokens * h], &mut s.a_bf16[..tokens * h]);
                    amx::gemm_blocks(&s.a_bf16[..rows * h], rows, p_in, |r0, c0, block| {
                        let b = &bias[c0..][..amx::COL_BLOCK];
                        for (r, src) in block.chunks_exact(amx::COL_BLOCK).enumerate() {
                            let dst = &mut ffb[(r0 + r) * ff + c0..][..amx::COL_BLOCK];
                            for ((d, v), b) in dst.iter_mut().zip(src).zip(b) {
                                *d = amx::bf16(gelu(v + b));
                            }
                        }
                    });
                    amx_bias(
                        &s.ff_bf16[..rows * ff],
                        rows,
                        p_out,
                        &layer.ff_out.bias,
                        &mut s.tmp,
                    );
                }
            }
            _ => {
                linear_f32(&layer.ff_in, tokens, &s.x, &mut s.ff);
                for v in &mut s.ff[..tokens * ff] {
                    *v = gelu(*v);
                }
                linear_f32(&layer.ff_out, tokens, &s.ff, &mut s.tmp);
            }
        }
    }
}

/// `out = a·Wᵀ + b` on AMX, `a` already bf16 (`rows` × k), `out` f32 (`rows` × n).
///
/// # Safety
/// [`amx::available`] must be true.
#[inline(always)]
unsafe fn amx_bias(a: &[u16], rows: usize, p: &amx::PackedB, bias: &[f32], out: &mut [f32]) {
    let n = p.n;
    // SAFETY: the caller's contract.
    unsafe {
        amx::gemm_blocks(a, rows, p, |r0, c0, block| {
            amx::add_bias(
                block,
                &bias[c0..],
                &mut out[r0 * n + c0..],
                n,
                amx::ROW_BLOCK,
            );
        });
    }
}

/// `out[..tokens] = a[..tokens]·Wᵀ + b` with f32 dot products.
#[inline(always)]
fn linear_f32(l: &Linear, tokens: usize, a: &[f32], out: &mut [f32]) {
    let (n, k) = (l.n, l.k);
    for i in 0..tokens {
        let x = &a[i * k..][..k];
        for (j, o) in out[i * n..][..n].iter_mut().enumerate() {
            *o = dot(x, &l.w[j * k..][..k]) + l.bias[j];
        }
    }
}

/// Self-attention per sequence and head: `ctx = softmax(q·kᵀ/√d)·v`, reading q, k, v from
/// the fused projection (`tokens × 3h`), writing `ctx` (`tokens × h`). Keys are transposed per
/// head so a query's scores are computed 16 keys at a time.
#[inline(always)]
fn attention(
    qkv: &[f32],
    ctx: &mut [f32],
    seqs: &[&[u32]],
    h: usize,
    heads: usize,
    sc: &mut AttnScratch,
) {
    const LANES: usize = 16;
    let d = h / heads;
    let scale = 1.0 / (d as f32).sqrt();
    let stride = 3 * h;
    let mut start = 0;
    for seq in seqs {
        let len = seq.len();
        let padded = len.div_ceil(LANES) * LANES;
        sc.kt.clear();
        sc.kt.resize(d * padded, 0.0);
        sc.scores.resize(padded, 0.0);
        for head in 0..heads {
            let off = head * d;
            for j in 0..len {
                let k = &qkv[(start + j) * stride + h + off..][..d];
                for (dd, kv) in k.iter().enumerate() {
                    sc.kt[dd * padded + j] = *kv;
                }
            }
            for i in 0..len {
                let q = &qkv[(start + i) * stride + off..][..d];
                let scores = &mut sc.scores[..padded];
                scores.fill(0.0);
                for (dd, qv) in q.iter().enumerate() {
                    let qd = qv * scale;
                    let krow = &sc.kt[dd * padded..][..padded];
                    for (s16, k16) in scores.chunks_exact_mut(LANES).zip(krow.chunks_exact(LANES)) {
                        for l in 0..LANES {
                            s16[l] += qd * k16[l];
                        }
                    }
                }
                softmax(&mut scores[..len]);
                let c = &mut ctx[(start + i) * h + off..][..d];
                c.fill(0.0);
                for (j, p) in scores[..len].iter().enumerate() {
                    let v = &qkv[(start + j) * stride + 2 * h + off..][..d];
                    for (o, x) in c.iter_mut().zip(v) {
                        *o += p * x;
                    }
                }
            }
        }
        start += len;
    }
}

/// `x = LayerNorm(x + y)` row by row over the first `tokens` rows.
#[inline(always)]
fn add_norm(x: &mut [f32], y: &[f32], tokens: usize, h: usize, norm: &Norm, eps: f32) {
    for (xr, yr) in x[..tokens * h]
        .chunks_exact_mut(h)
        .zip(y[..tokens * h].chunks_exact(h))
    {
        for (a, b) in xr.iter_mut().zip(yr) {
            *a += *b;
        }
        layer_norm(xr, norm, eps);
    }
}

#[inline(always)]
fn layer_norm(x: &mut [f32], norm: &Norm, eps: f32) {
    let n = x.len() as f32;
    let mean = sum(x) / n;
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest: f32 = chunks
        .remainder()
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum();
    for c in chunks {
        for l in 0..16 {
            let d = c[l] - mean;
            acc[l] += d * d;
        }
    }
    let var = (acc.iter().sum::<f32>() + rest) / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, g), b) in x.iter_mut().zip(&norm.gamma).zip(&norm.beta) {
        *v = (*v - mean) * inv * g + b;
    }
}

/// Sum with 16 independent accumulators (so it vectorises).
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..16 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + rest
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + rest
}

#[inline(always)]
fn softmax(x: &mut [f32]) {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let mut max = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for l in 0..16 {
            lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
        }
    }
    for l in lanes {
        max = max.max(l);
    }
    for v in x.iter_mut() {
        *v = exp(*v - max);
    }
    let inv = 1.0 / sum(x);
    x.iter_mut().for_each(|v| *v *= inv);
}

/// e^x for finite x, relative error ≈ 2e-7, written so loops over it vectorise: range
/// reduction by ln 2 (rounding with the 1.5·2²³ trick), a degree-6 polynomial, and the power
/// of two built from the exponent bits.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23
    let x = x.clamp(-87.0, 88.0);
    let big = x * LOG2E + ROUND;
    let n = big - ROUND;
    let ni = (big.to_bits() as i32).wrapping_sub(0x4b40_0000);
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((ni + 127) << 23) as u32)
}

/// GELU as BERT defines it, `x·Φ(x) = ½x(1 + erf(x/√2))`, with erf from Abramowitz & Stegun
/// 7.1.26 (absolute error ≤ 1.5e-7).
#[inline(always)]
fn gelu(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let erf = (1.0 - poly * exp(-a * a)).copysign(z);
    0.5 * x * (1.0 + erf)
}

/// [`attention`] for heads of exactly 32 dimensions with AVX-512: scores for blocks of 16
/// queries × 16 keys and the weighted sums for blocks of 8 queries are kept in registers.
///
/// # Safety
/// AVX-512F must be available; `h / heads` must be 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn attention_avx512(
    qkv: &[f32],
    ctx: &mut [f32],
    seqs: &[&[u32]],
    h: usize,
    heads: usize,
    sc: &mut AttnScratch,
) {
    use std::arch::x86_64::*;
    const D: usize = 32;
    const L: usize = 16;
    assert_eq!(h, heads * D);
    let scale = 1.0 / (D as f32).sqrt();
    let stride = 3 * h;
    let tokens: usize = seqs.iter().map(|q| q.len()).sum();
    assert!(qkv.len() >= tokens * stride && ctx.len() >= tokens * h);
    let mut start = 0;
    for seq in seqs {
        let len = seq.len();
        if len == 0 {
            continue;
        }
        let padded = len.div_ceil(L) * L;
        sc.kt.clear();
        sc.kt.resize(D * padded, 0.0);
        sc.scores.clear();
        sc.scores.resize(len * padded, 0.0);
        let last = start + len - 1;
        for head in 0..heads {
            let off = head * D;
            for j in 0..len {
                let k = &qkv[(start + j) * stride + h + off..][..D];
                for (dd, kv) in k.iter().enumerate() {
                    sc.kt[dd * padded + j] = *kv;
                }
            }
            // Scores: S[i][j] = q_i · k_j / √d, 16 × 16 at a time.
            for ib in (0..len).step_by(L) {
                let rows = (len - ib).min(L);
                for jb in (0..padded).step_by(L) {
                    let mut acc = [_mm512_setzero_ps(); L];
                    for dd in 0..D {
                        let kv = _mm512_loadu_ps(sc.kt[dd * padded + jb..][..L].as_ptr());
                        for (r, a) in acc.iter_mut().enumerate() {
                            // Rows past the end repeat the last token; their results are dropped.
                            let t = (start + ib + r).min(last);
                            let q = _mm512_set1_ps(qkv[t * stride + off + dd]);
                            *a = _mm512_fmadd_ps(q, kv, *a);
                        }
                    }
                    let s = _mm512_set1_ps(scale);
                    for (r, a) in acc.iter().enumerate().take(rows) {
                        let dst = &mut sc.scores[(ib + r) * padded + jb..][..L];
                        _mm512_storeu_ps(dst.as_mut_ptr(), _mm512_mul_ps(*a, s));
                    }
                }
            }
            for row in sc.scores.chunks_exact_mut(padded) {
                softmax(&mut row[..len]);
                row[len..].fill(0.0);
            }
            // ctx_i = Σ_j p_ij v_j, 8 queries at a time (two registers of 16 dims each).
            const Q: usize = 8;
            for ib in (0..len).step_by(Q) {
                let rows = (len - ib).min(Q);
                let mut lo = [_mm512_setzero_ps(); Q];
                let mut hi = [_mm512_setzero_ps(); Q];
                for j in 0..len {
                    let v = &qkv[(start + j) * stride + 2 * h + off..][..D];
                    let v0 = _mm512_loadu_ps(v.as_ptr());
                    let v1 = _mm512_loadu_ps(v[L..].as_ptr());
                    for r in 0..Q {
                        let i = (ib + r).min(len - 1);
                        let p = _mm512_set1_ps(sc.scores[i * padded + j]);
                        lo[r] = _mm512_fmadd_ps(p, v0, lo[r]);
                        hi[r] = _mm512_fmadd_ps(p, v1, hi[r]);
                    }
                }
                for r in 0..rows {
                    let dst = &mut ctx[(start + ib + r) * h + off..][..D];
                    _mm512_storeu_ps(dst.as_mut_ptr(), lo[r]);
                    _mm512_storeu_ps(dst[L..].as_mut_ptr(), hi[r]);
                }
            }
        }
        start += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        for i in -8000..8000 {
            let x = i as f32 / 100.0;
            let (got, want) = (exp(x), x.exp());
            assert!(
                ((got - want) / want).abs() < 1e-6,
                "exp({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn gelu_matches_the_erf_definition() {
        // Reference erf values (x, erf(x)).
        for (x, erf) in [
            (0.5f64, 0.520_499_877_8),
            (1.0, 0.842_700_792_9),
            (2.0, 0.995_322_265),
        ] {
            for s in [1.0, -1.0] {
                let v = s * x * std::f64::consts::SQRT_2;
                let want = 0.5 * v * (1.0 + s * erf);
                let got = gelu(v as f32) as f64;
                assert!((got - want).abs() < 1e-6, "gelu({v}) = {got}, want {want}");
            }
        }
        assert_eq!(gelu(0.0), 0.0);
        assert!(gelu(-20.0).abs() < 1e-6 && (gelu(20.0) - 20.0).abs() < 1e-5);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = [1.0, 2.0, 3.0, -50.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[2] > x[1] && x[1] > x[0] && x[3] < 1e-20);
    }
}
