//! [`Sq8`]: per-dimension int8 scalar quantization and its asymmetric distance kernels.
//!
//! This module owns the mapping between an `f32` vector and its one-byte-per-component code
//! (`x[d] ≈ min[d] + scale[d] · code[d]`, `code ∈ 0..=255`), the training of `min`/`scale`
//! from sample rows, and the kernels that rank codes against a float query without decoding
//! them. For dot products a query is *prepared* once (`q'[d] = q[d] · scale[d]`,
//! `constant = q · min`), after which `q · x̂ = constant + Σ q'[d] · code[d]` — one `u8 × f32`
//! dot product per row (AVX2: bytes widened to `i32`, converted to `f32`, FMA; portable code
//! otherwise). For L2 it is prepared as `r = q − min`, and `‖q − x̂‖² = Σ (r[d] − scale[d] ·
//! code[d])²` — two FMAs per component, and no per-row norm to store.
//!
//! It must never allocate on the distance path, never produce a non-finite parameter (a
//! dimension whose training values are all equal gets `scale = 0` and code 0, decoding to the
//! exact value), and never promise exact distances: codes lose up to `scale/2` per component,
//! which is why the HNSW index rescores its final candidates on the caller's originals. Values
//! outside the trained range are clamped (the training range is widened by a margin first).

use crate::kernels::{self, Backend};

/// Rows an int8 index collects (as `f32`) before it trains its quantizer and drops the floats.
pub const TRAIN_ROWS: usize = 1_000;

/// Fraction of each trained range added on both sides, so later rows slightly outside the
/// training sample are not clamped.
const RANGE_MARGIN: f32 = 0.05;

/// A trained per-dimension scalar quantizer.
#[derive(Clone, Debug, PartialEq)]
pub struct Sq8 {
    /// Lower end of each dimension's range.
    pub(crate) min: Vec<f32>,
    /// Step of one code unit per dimension: `(max − min) / 255`, ≥ 0.
    pub(crate) scale: Vec<f32>,
}

impl Sq8 {
    /// Trains min/max per dimension over `rows` (each `dimension` long), widened by a margin,
    /// and clipped to `bound` (e.g. `[-1, 1]` for unit vectors) when given.
    pub fn train<'a>(
        dimension: usize,
        rows: impl Iterator<Item = &'a [f32]>,
        bound: Option<f32>,
    ) -> Sq8 {
        let mut low = vec![f32::INFINITY; dimension];
        let mut high = vec![f32::NEG_INFINITY; dimension];
        for row in rows {
            assert_eq!(row.len(), dimension, "Sq8::train: dimension mismatch");
            for ((l, h), &x) in low.iter_mut().zip(high.iter_mut()).zip(row) {
                *l = l.min(x);
                *h = h.max(x);
            }
        }
        let mut min = Vec::with_capacity(dimension);
        let mut scale = Vec::with_capacity(dimension);
        for (&l, &h) in low.iter().zip(&high) {
            let (mut l, mut h) = if l.is_finite() && h.is_finite() {
                (l, h)
            } else {
                (0.0, 0.0)
            };
            let margin = (h - l) * RANGE_MARGIN;
            l -= margin;
            h += margin;
            if let Some(b) = bound {
                l = l.max(-b);
                h = h.min(b);
            }
            min.push(l);
            scale.push(((h - l) / 255.0).max(0.0));
        }
        let sq8 = Sq8 { min, scale };
        sq8.assert_invariants();
        sq8
    }

    /// The number of components this quantizer codes.
    pub fn dimension(&self) -> usize {
        self.min.len()
    }

    /// Bytes held by the parameters, by capacity.
    pub fn memory_bytes(&self) -> usize {
        (self.min.capacity() + self.scale.capacity()) * std::mem::size_of::<f32>()
    }

    /// Writes the code of `vector` into `out` (nearest code, clamped to the range).
    pub fn encode(&self, vector: &[f32], out: &mut [u8]) {
        assert_eq!(vector.len(), self.dimension(), "Sq8::encode: dimension");
        assert_eq!(out.len(), self.dimension(), "Sq8::encode: output length");
        for (((o, &x), &min), &scale) in out.iter_mut().zip(vector).zip(&self.min).zip(&self.scale)
        {
            *o = if scale > 0.0 {
                ((x - min) / scale).round().clamp(0.0, 255.0) as u8
            } else {
                0
            };
        }
    }

    /// Writes the decoded vector `min + scale · code` into `out`.
    pub fn decode(&self, code: &[u8], out: &mut [f32]) {
        assert_eq!(code.len(), self.dimension(), "Sq8::decode: dimension");
        assert_eq!(out.len(), self.dimension(), "Sq8::decode: output length");
        for (((o, &c), &min), &scale) in out.iter_mut().zip(code).zip(&self.min).zip(&self.scale) {
            *o = min + scale * c as f32;
        }
    }

    /// Prepares `query` for [`dot_code`]: fills `prepared` with `q ⊙ scale` and returns
    /// `q · min`, so that `q · decode(code) = returned + dot_code(prepared, code)`.
    pub fn prepare(&self, query: &[f32], prepared: &mut Vec<f32>) -> f32 {
        assert_eq!(query.len(), self.dimension(), "Sq8::prepare: dimension");
        prepared.clear();
        prepared.extend(query.iter().zip(&self.scale).map(|(q, s)| q * s));
        kernels::dot(query, &self.min)
    }

    /// Prepares `query` for [`l2_code`]: fills `prepared` with `q − min`, so that
    /// `‖q − decode(code)‖² = l2_code(prepared, scale, code)` with no per-row norm stored.
    pub fn prepare_l2(&self, query: &[f32], prepared: &mut Vec<f32>) {
        assert_eq!(query.len(), self.dimension(), "Sq8::prepare_l2: dimension");
        prepared.clear();
        prepared.extend(query.iter().zip(&self.min).map(|(q, m)| q - m));
    }

    /// The step of one code unit per dimension (the `scale` that [`l2_code`] takes).
    pub fn scale(&self) -> &[f32] {
        &self.scale
    }

    /// Checks that every parameter is finite and every scale non-negative.
    pub fn assert_invariants(&self) {
        assert_eq!(self.min.len(), self.scale.len());
        assert!(
            self.min.iter().all(|x| x.is_finite()),
            "Sq8: non-finite min"
        );
        assert!(
            self.scale.iter().all(|s| s.is_finite() && *s >= 0.0),
            "Sq8: bad scale"
        );
    }
}

/// `Σ prepared[d] · code[d]`. Panics if the lengths differ.
#[inline]
pub fn dot_code(prepared: &[f32], code: &[u8]) -> f32 {
    assert_eq!(prepared.len(), code.len(), "dot_code: length mismatch");
    dot_code_with(kernels::backend(), prepared, code)
}

/// [`dot_code`] on a chosen backend (one the CPU has: see [`Backend::available`]).
#[inline]
pub(crate) fn dot_code_with(backend: Backend, prepared: &[f32], code: &[u8]) -> f32 {
    match backend {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx2Fma` is only reported after the CPU said it has AVX2 and FMA.
        Backend::Avx2Fma => unsafe { avx2::dot_code(prepared, code) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx512` is only reported after the CPU said it has AVX-512F.
        Backend::Avx512 => unsafe { avx512::dot_code(prepared, code) },
        _ => portable_dot_code(prepared, code),
    }
}

/// `Σ (prepared[d] − scale[d] · code[d])²`: the squared L2 distance from a query prepared by
/// [`Sq8::prepare_l2`] to the decoded code. Panics if the lengths differ.
#[inline]
pub fn l2_code(prepared: &[f32], scale: &[f32], code: &[u8]) -> f32 {
    assert_eq!(prepared.len(), code.len(), "l2_code: length mismatch");
    assert_eq!(scale.len(), code.len(), "l2_code: length mismatch");
    l2_code_with(kernels::backend(), prepared, scale, code)
}

/// [`l2_code`] on a chosen backend (one the CPU has: see [`Backend::available`]).
#[inline]
pub(crate) fn l2_code_with(backend: Backend, prepared: &[f32], scale: &[f32], code: &[u8]) -> f32 {
    match backend {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: both are only reported after the CPU said it has AVX2 and FMA (`Avx512`
        // additionally AVX-512F; see `kernels::detect`), which is all the AVX2 kernel needs.
        Backend::Avx2Fma | Backend::Avx512 => unsafe { avx2::l2_code(prepared, scale, code) },
        _ => portable_l2_code(prepared, scale, code),
    }
}

/// Plain-Rust [`l2_code`] with eight independent accumulators.
#[inline]
pub(crate) fn portable_l2_code(prepared: &[f32], scale: &[f32], code: &[u8]) -> f32 {
    assert!(prepared.len() == code.len() && scale.len() == code.len());
    let mut acc = [0.0f32; 8];
    let mut chunks = prepared
        .chunks_exact(8)
        .zip(scale.chunks_exact(8))
        .zip(code.chunks_exact(8));
    for ((p, s), c) in &mut chunks {
        for i in 0..8 {
            let d = p[i] - s[i] * c[i] as f32;
            acc[i] += d * d;
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    let done = code.len() / 8 * 8;
    for i in done..code.len() {
        let d = prepared[i] - scale[i] * code[i] as f32;
        sum += d * d;
    }
    sum
}

/// Plain-Rust `u8 × f32` dot with eight independent accumulators.
#[inline]
pub(crate) fn portable_dot_code(prepared: &[f32], code: &[u8]) -> f32 {
    assert_eq!(prepared.len(), code.len());
    let mut acc = [0.0f32; 8];
    let p_chunks = prepared.chunks_exact(8);
    let c_chunks = code.chunks_exact(8);
    let (p_tail, c_tail) = (p_chunks.remainder(), c_chunks.remainder());
    for (p, c) in p_chunks.zip(c_chunks) {
        for i in 0..8 {
            acc[i] += p[i] * c[i] as f32;
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (p, &c) in p_tail.iter().zip(c_tail) {
        sum += p * c as f32;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::kernels::avx2::hsum;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must have AVX2 and FMA. Lengths are asserted before any load.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn dot_code(prepared: &[f32], code: &[u8]) -> f32 {
        assert_eq!(prepared.len(), code.len());
        let n = code.len();
        let (pp, pc) = (prepared.as_ptr(), code.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut acc2 = _mm256_setzero_ps();
        let mut acc3 = _mm256_setzero_ps();
        let mut i = 0;
        // A macro, not a closure: closures do not inherit `target_feature`.
        macro_rules! widen {
            ($offset:expr) => {
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    pc.add($offset) as *const __m128i
                )))
            };
        }
        while i + 32 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pp.add(i)), widen!(i), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pp.add(i + 8)), widen!(i + 8), acc1);
            acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(pp.add(i + 16)), widen!(i + 16), acc2);
            acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(pp.add(i + 24)), widen!(i + 24), acc3);
            i += 32;
        }
        while i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pp.add(i)), widen!(i), acc0);
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
        let mut sum = hsum(v);
        while i < n {
            sum += *pp.add(i) * *pc.add(i) as f32;
            i += 1;
        }
        sum
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA. Lengths are asserted before any load.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn l2_code(prepared: &[f32], scale: &[f32], code: &[u8]) -> f32 {
        assert!(prepared.len() == code.len() && scale.len() == code.len());
        let n = code.len();
        let (pp, ps, pc) = (prepared.as_ptr(), scale.as_ptr(), code.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut acc2 = _mm256_setzero_ps();
        let mut acc3 = _mm256_setzero_ps();
        let mut i = 0;
        // One lane group: d = p − s·c, acc += d² (two dependent FMAs, so four accumulators
        // keep the chains short). A macro: closures do not inherit `target_feature`.
        macro_rules! step {
            ($offset:expr, $acc:ident) => {
                let codes = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    pc.add($offset) as *const __m128i,
                )));
                let d = _mm256_fnmadd_ps(
                    _mm256_loadu_ps(ps.add($offset)),
                    codes,
                    _mm256_loadu_ps(pp.add($offset)),
                );
                $acc = _mm256_fmadd_ps(d, d, $acc);
            };
        }
        while i + 32 <= n {
            step!(i, acc0);
            step!(i + 8, acc1);
            step!(i + 16, acc2);
            step!(i + 24, acc3);
            i += 32;
        }
        while i + 8 <= n {
            step!(i, acc0);
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
        let mut sum = hsum(v);
        while i < n {
            let d = *pp.add(i) - *ps.add(i) * *pc.add(i) as f32;
            sum += d * d;
            i += 1;
        }
        sum
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must have AVX-512F. Lengths are asserted before any load; the tail is read
    /// with masked loads that touch no byte past either slice.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn dot_code(prepared: &[f32], code: &[u8]) -> f32 {
        assert_eq!(prepared.len(), code.len());
        let n = code.len();
        let (pp, pc) = (prepared.as_ptr(), code.as_ptr());
        let mut acc0 = _mm512_setzero_ps();
        let mut acc1 = _mm512_setzero_ps();
        let mut i = 0;
        macro_rules! widen {
            ($offset:expr) => {
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                    pc.add($offset) as *const __m128i
                )))
            };
        }
        while i + 32 <= n {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pp.add(i)), widen!(i), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(pp.add(i + 16)), widen!(i + 16), acc1);
            i += 32;
        }
        while i + 16 <= n {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pp.add(i)), widen!(i), acc0);
            i += 16;
        }
        if i < n {
            let mask = crate::kernels::avx512::tail_mask(n - i);
            // Masked byte loads need AVX-512BW; widen a zero-padded copy of the tail instead.
            let mut tail = [0u8; 16];
            tail[..n - i].copy_from_slice(&code[i..]);
            let codes = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                tail.as_ptr() as *const __m128i
            )));
            acc1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, pp.add(i)), codes, acc1);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let dimension = 37;
        let rows: Vec<Vec<f32>> = (0..200)
            .map(|_| (0..dimension).map(|_| rng.gen_range(-3.0..2.0)).collect())
            .collect();
        let sq8 = Sq8::train(dimension, rows.iter().map(|r| &r[..]), None);
        let mut code = vec![0u8; dimension];
        let mut decoded = vec![0f32; dimension];
        for row in &rows {
            sq8.encode(row, &mut code);
            sq8.decode(&code, &mut decoded);
            for d in 0..dimension {
                assert!((row[d] - decoded[d]).abs() <= sq8.scale[d] * 0.5 + 1e-5);
            }
        }
    }

    /// For each dimension: a quantizer trained on 50 rows drawn from `rows`, a query drawn
    /// from `queries`, and every row's code with its decoded vector, handed to `check`.
    fn for_each_coded_row(
        seed: u64,
        dimensions: &[usize],
        rows: std::ops::Range<f32>,
        queries: std::ops::Range<f32>,
        bound: Option<f32>,
        mut check: impl FnMut(&Sq8, &[f32], &[u8], &[f32]),
    ) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for &dimension in dimensions {
            let sample: Vec<Vec<f32>> = (0..50)
                .map(|_| {
                    (0..dimension)
                        .map(|_| rng.gen_range(rows.clone()))
                        .collect()
                })
                .collect();
            let sq8 = Sq8::train(dimension, sample.iter().map(|r| &r[..]), bound);
            let query: Vec<f32> = (0..dimension)
                .map(|_| rng.gen_range(queries.clone()))
                .collect();
            let mut code = vec![0u8; dimension];
            let mut decoded = vec![0f32; dimension];
            for row in &sample {
                sq8.encode(row, &mut code);
                sq8.decode(&code, &mut decoded);
                check(&sq8, &query, &code, &decoded);
            }
        }
    }

    #[test]
    fn prepared_dot_matches_decoded_dot_on_every_backend() {
        let dimensions = [1, 7, 8, 9, 31, 32, 33, 100, 384, 385];
        let mut prepared = Vec::new();
        for_each_coded_row(
            4,
            &dimensions,
            -1.0..1.0,
            -1.0..1.0,
            Some(1.0),
            |sq8, query, code, decoded| {
                let constant = sq8.prepare(query, &mut prepared);
                let want: f64 = query
                    .iter()
                    .zip(decoded)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                let close = |got: f32| (got as f64 - want).abs() < 1e-3;
                let portable = constant + portable_dot_code(&prepared, code);
                assert!(close(portable), "portable: {portable} vs {want}");
                let dispatched = constant + dot_code(&prepared, code);
                assert!(close(dispatched), "dispatched: {dispatched} vs {want}");
                for backend in Backend::available() {
                    let got = constant + dot_code_with(backend, &prepared, code);
                    assert!(close(got), "{backend:?}: {got} vs {want}");
                }
            },
        );
    }

    #[test]
    fn prepared_l2_matches_decoded_l2_on_every_backend() {
        let dimensions = [1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 128, 385];
        let mut prepared = Vec::new();
        for_each_coded_row(
            5,
            &dimensions,
            0.0..60.0,
            -5.0..70.0,
            None,
            |sq8, query, code, decoded| {
                sq8.prepare_l2(query, &mut prepared);
                let want: f64 = query
                    .iter()
                    .zip(decoded)
                    .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                    .sum();
                let close = |got: f32| (got as f64 - want).abs() <= 1e-4 * want.max(1.0);
                let portable = portable_l2_code(&prepared, sq8.scale(), code);
                assert!(close(portable), "portable: {portable} vs {want}");
                let dispatched = l2_code(&prepared, sq8.scale(), code);
                assert!(close(dispatched), "dispatched: {dispatched} vs {want}");
                for backend in Backend::available() {
                    let got = l2_code_with(backend, &prepared, sq8.scale(), code);
                    assert!(close(got), "{backend:?}: {got} vs {want}");
                }
            },
        );
    }

    #[test]
    fn constant_dimension_gets_zero_scale() {
        let rows = [vec![1.0f32, 2.0], vec![1.0, 3.0]];
        let sq8 = Sq8::train(2, rows.iter().map(|r| &r[..]), None);
        assert_eq!(sq8.scale[0], 0.0);
        let mut code = [9u8; 2];
        sq8.encode(&[1.0, 2.5], &mut code);
        assert_eq!(code[0], 0);
        let mut out = [0f32; 2];
        sq8.decode(&code, &mut out);
        assert_eq!(out[0], 1.0);
    }
}
