//! Distance kernels: `dot`, `l2_squared` and `norm` over `f32` slices.
//!
//! This module owns every floating-point inner loop of the crate and the run-time choice of
//! instruction set ([`Backend`]). There are two implementations of each kernel:
//! - `portable`: plain Rust over 16 independent accumulators, written so that LLVM vectorises
//!   it for whatever baseline the target has (SSE2 on x86-64, NEON on aarch64);
//! - `avx2` (x86-64 only): explicit AVX2+FMA intrinsics, four 8-lane accumulators (32
//!   independent partial sums) so FMA latency never stalls the loop;
//! - `avx512` (x86-64 only): AVX-512F intrinsics, four 16-lane accumulators and a masked load
//!   for the tail (no scalar remainder loop: 100 or 128 components are a few full vectors).
//!
//! The choice is made once per process with `is_x86_feature_detected!` and cached in an
//! atomic, so the per-call cost of dispatch is one relaxed load and a predictable branch.
//!
//! This module must never allocate, panic on the hot path beyond its length assertions, or
//! assume more than the CPU reports: running an AVX2 instruction on a CPU without it is
//! undefined behaviour, which is why the only `unsafe` calls into `avx2` sit behind
//! [`backend`]. The two backends sum in different orders, so their results may differ in the
//! last bits; callers (and tests) must not expect bit-identical results across backends.

use std::sync::atomic::{AtomicU8, Ordering};

/// Which implementation of the kernels runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Plain Rust, auto-vectorised for the compile-time baseline.
    Portable,
    /// x86-64 AVX2 + FMA intrinsics. Only ever returned by [`backend`] when the CPU has both.
    Avx2Fma,
    /// x86-64 AVX-512F intrinsics. Only ever returned by [`backend`] when the CPU has
    /// AVX-512F, AVX2 and FMA (callers without an AVX-512 path use their AVX2 one).
    Avx512,
}

impl Backend {
    /// A short, stable name for logs and benchmark output.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Portable => "portable",
            Backend::Avx2Fma => "avx2+fma",
            Backend::Avx512 => "avx512f",
        }
    }

    /// Every backend this CPU can run, the portable one first. Tests use it to check each.
    pub fn available() -> Vec<Backend> {
        let mut backends = vec![Backend::Portable];
        let best = detect();
        if best != Backend::Portable {
            backends.push(Backend::Avx2Fma);
        }
        if best == Backend::Avx512 {
            backends.push(Backend::Avx512);
        }
        backends
    }
}

/// 0 = not detected yet, otherwise `1 + Backend as u8`.
static BACKEND_CACHE: AtomicU8 = AtomicU8::new(0);

/// The fastest backend this CPU supports, detected once and cached.
#[inline]
pub fn backend() -> Backend {
    match BACKEND_CACHE.load(Ordering::Relaxed) {
        1 => Backend::Portable,
        2 => Backend::Avx2Fma,
        3 => Backend::Avx512,
        _ => {
            let detected = detect();
            let code = match detected {
                Backend::Portable => 1,
                Backend::Avx2Fma => 2,
                Backend::Avx512 => 3,
            };
            // Racing detections all store the same value, so a plain store suffices.
            BACKEND_CACHE.store(code, Ordering::Relaxed);
            detected
        }
    }
}

fn detect() -> Backend {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            if is_x86_feature_detected!("avx512f") {
                return Backend::Avx512;
            }
            return Backend::Avx2Fma;
        }
    }
    Backend::Portable
}

/// Inner product `Σ a[i]·b[i]`. Panics if the lengths differ.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: length mismatch");
    dot_with(backend(), a, b)
}

/// Squared Euclidean distance `Σ (a[i] − b[i])²`. Panics if the lengths differ.
#[inline]
pub fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "l2_squared: length mismatch");
    l2_squared_with(backend(), a, b)
}

/// Euclidean norm `sqrt(Σ a[i]²)`.
#[inline]
pub fn norm(a: &[f32]) -> f32 {
    dot_with(backend(), a, a).sqrt()
}

/// [`dot`] on a chosen backend. The caller guarantees equal lengths (asserted in debug).
#[inline]
pub(crate) fn dot_with(backend: Backend, a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    match backend {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx2Fma` is only produced by `detect`, after the CPU reported AVX2 and FMA.
        Backend::Avx2Fma => unsafe { avx2::dot(a, b) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx512` is only produced by `detect`, after the CPU reported AVX-512F.
        Backend::Avx512 => unsafe { avx512::dot(a, b) },
        _ => portable::dot(a, b),
    }
}

/// [`l2_squared`] on a chosen backend. The caller guarantees equal lengths.
#[inline]
pub(crate) fn l2_squared_with(backend: Backend, a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    match backend {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot_with`.
        Backend::Avx2Fma => unsafe { avx2::l2_squared(a, b) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Backend::Avx512 => unsafe { avx512::l2_squared(a, b) },
        _ => portable::l2_squared(a, b),
    }
}

/// Plain-Rust kernels. Sixteen independent accumulators break the floating-point dependency
/// chain (Rust never reassociates float adds on its own), which is what lets LLVM keep them in
/// vector registers.
pub(crate) mod portable {
    pub(crate) const LANES: usize = 16;

    #[inline]
    pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let mut acc = [0.0f32; LANES];
        let a_chunks = a.chunks_exact(LANES);
        let b_chunks = b.chunks_exact(LANES);
        let (a_tail, b_tail) = (a_chunks.remainder(), b_chunks.remainder());
        for (ca, cb) in a_chunks.zip(b_chunks) {
            let ca: &[f32; LANES] = ca.try_into().expect("chunks_exact yields LANES");
            let cb: &[f32; LANES] = cb.try_into().expect("chunks_exact yields LANES");
            for ((s, x), y) in acc.iter_mut().zip(ca).zip(cb) {
                *s += x * y;
            }
        }
        let mut sum = reduce(acc);
        for (x, y) in a_tail.iter().zip(b_tail) {
            sum += x * y;
        }
        sum
    }

    #[inline]
    pub(crate) fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let mut acc = [0.0f32; LANES];
        let a_chunks = a.chunks_exact(LANES);
        let b_chunks = b.chunks_exact(LANES);
        let (a_tail, b_tail) = (a_chunks.remainder(), b_chunks.remainder());
        for (ca, cb) in a_chunks.zip(b_chunks) {
            let ca: &[f32; LANES] = ca.try_into().expect("chunks_exact yields LANES");
            let cb: &[f32; LANES] = cb.try_into().expect("chunks_exact yields LANES");
            for ((s, x), y) in acc.iter_mut().zip(ca).zip(cb) {
                let d = x - y;
                *s += d * d;
            }
        }
        let mut sum = reduce(acc);
        for (x, y) in a_tail.iter().zip(b_tail) {
            let d = x - y;
            sum += d * d;
        }
        sum
    }

    /// Pairwise (tree) reduction: fewer rounding steps than a left fold.
    #[inline]
    fn reduce(acc: [f32; LANES]) -> f32 {
        let mut width = LANES;
        let mut acc = acc;
        while width > 1 {
            width /= 2;
            for i in 0..width {
                acc[i] += acc[i + width];
            }
        }
        acc[0]
    }
}

/// AVX2 + FMA kernels. Every function here is `unsafe` because it must only run on a CPU
/// with both features; lengths are asserted before any raw-pointer load, so memory safety
/// does not depend on the caller.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// Horizontal sum of the eight lanes (also the reduction of `sq8`'s code kernels).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi); // 4 lanes
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s)); // lanes 0,1
        let s = _mm_add_ss(s, _mm_movehdup_ps(s)); // lane 0
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut acc2 = _mm256_setzero_ps();
        let mut acc3 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 32 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                acc1,
            );
            acc2 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 16)),
                _mm256_loadu_ps(pb.add(i + 16)),
                acc2,
            );
            acc3 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 24)),
                _mm256_loadu_ps(pb.add(i + 24)),
                acc3,
            );
            i += 32;
        }
        while i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            i += 8;
        }
        let mut sum = hsum(_mm256_add_ps(
            _mm256_add_ps(acc0, acc1),
            _mm256_add_ps(acc2, acc3),
        ));
        while i < n {
            sum += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        sum
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut acc2 = _mm256_setzero_ps();
        let mut acc3 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 32 <= n {
            let d0 = _mm256_sub_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)));
            let d1 = _mm256_sub_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
            );
            let d2 = _mm256_sub_ps(
                _mm256_loadu_ps(pa.add(i + 16)),
                _mm256_loadu_ps(pb.add(i + 16)),
            );
            let d3 = _mm256_sub_ps(
                _mm256_loadu_ps(pa.add(i + 24)),
                _mm256_loadu_ps(pb.add(i + 24)),
            );
            acc0 = _mm256_fmadd_ps(d0, d0, acc0);
            acc1 = _mm256_fmadd_ps(d1, d1, acc1);
            acc2 = _mm256_fmadd_ps(d2, d2, acc2);
            acc3 = _mm256_fmadd_ps(d3, d3, acc3);
            i += 32;
        }
        while i + 8 <= n {
            let d = _mm256_sub_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)));
            acc0 = _mm256_fmadd_ps(d, d, acc0);
            i += 8;
        }
        let mut sum = hsum(_mm256_add_ps(
            _mm256_add_ps(acc0, acc1),
            _mm256_add_ps(acc2, acc3),
        ));
        while i < n {
            let d = *pa.add(i) - *pb.add(i);
            sum += d * d;
            i += 1;
        }
        sum
    }
}

/// AVX-512F kernels. `unsafe` for the same reason as [`avx2`]: they must only run on a CPU
/// with AVX-512F; lengths are asserted before any raw-pointer load, and the tail is read with
/// a masked load that touches no byte past the slices.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    /// Lanes `0..remaining` set (remaining < 16).
    #[inline]
    pub(crate) fn tail_mask(remaining: usize) -> __mmask16 {
        debug_assert!(remaining < 16);
        ((1u32 << remaining) - 1) as __mmask16
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm512_setzero_ps();
        let mut acc1 = _mm512_setzero_ps();
        let mut acc2 = _mm512_setzero_ps();
        let mut acc3 = _mm512_setzero_ps();
        let mut i = 0;
        while i + 64 <= n {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm512_fmadd_ps(
                _mm512_loadu_ps(pa.add(i + 16)),
                _mm512_loadu_ps(pb.add(i + 16)),
                acc1,
            );
            acc2 = _mm512_fmadd_ps(
                _mm512_loadu_ps(pa.add(i + 32)),
                _mm512_loadu_ps(pb.add(i + 32)),
                acc2,
            );
            acc3 = _mm512_fmadd_ps(
                _mm512_loadu_ps(pa.add(i + 48)),
                _mm512_loadu_ps(pb.add(i + 48)),
                acc3,
            );
            i += 64;
        }
        while i + 16 <= n {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc0);
            i += 16;
        }
        if i < n {
            let mask = tail_mask(n - i);
            acc1 = _mm512_fmadd_ps(
                _mm512_maskz_loadu_ps(mask, pa.add(i)),
                _mm512_maskz_loadu_ps(mask, pb.add(i)),
                acc1,
            );
        }
        _mm512_reduce_add_ps(_mm512_add_ps(
            _mm512_add_ps(acc0, acc1),
            _mm512_add_ps(acc2, acc3),
        ))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm512_setzero_ps();
        let mut acc1 = _mm512_setzero_ps();
        let mut acc2 = _mm512_setzero_ps();
        let mut acc3 = _mm512_setzero_ps();
        let mut i = 0;
        while i + 64 <= n {
            let d0 = _mm512_sub_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)));
            let d1 = _mm512_sub_ps(
                _mm512_loadu_ps(pa.add(i + 16)),
                _mm512_loadu_ps(pb.add(i + 16)),
            );
            let d2 = _mm512_sub_ps(
                _mm512_loadu_ps(pa.add(i + 32)),
                _mm512_loadu_ps(pb.add(i + 32)),
            );
            let d3 = _mm512_sub_ps(
                _mm512_loadu_ps(pa.add(i + 48)),
                _mm512_loadu_ps(pb.add(i + 48)),
            );
            acc0 = _mm512_fmadd_ps(d0, d0, acc0);
            acc1 = _mm512_fmadd_ps(d1, d1, acc1);
            acc2 = _mm512_fmadd_ps(d2, d2, acc2);
            acc3 = _mm512_fmadd_ps(d3, d3, acc3);
            i += 64;
        }
        while i + 16 <= n {
            let d = _mm512_sub_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)));
            acc0 = _mm512_fmadd_ps(d, d, acc0);
            i += 16;
        }
        if i < n {
            let mask = tail_mask(n - i);
            let d = _mm512_sub_ps(
                _mm512_maskz_loadu_ps(mask, pa.add(i)),
                _mm512_maskz_loadu_ps(mask, pb.add(i)),
            );
            acc1 = _mm512_fmadd_ps(d, d, acc1);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(
            _mm512_add_ps(acc0, acc1),
            _mm512_add_ps(acc2, acc3),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn naive_dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }

    fn naive_l2_squared(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| {
                let d = x as f64 - y as f64;
                d * d
            })
            .sum()
    }

    fn random_vector(rng: &mut impl Rng, dimension: usize) -> Vec<f32> {
        (0..dimension)
            .map(|_| rng.gen_range(-1.0f32..1.0))
            .collect()
    }

    /// Float error of an n-term sum of products bounded by |x|·|y| ≤ 1 grows like n·ε; be
    /// generous but far below any real bug (a wrong lane or a dropped tail is ≥ 1e-3).
    fn tolerance(dimension: usize, magnitude: f64) -> f64 {
        1e-6 * (dimension as f64 + 1.0) * magnitude.max(1.0)
    }

    fn dimensions() -> Vec<usize> {
        let mut dimensions: Vec<usize> = (1..=300).collect();
        dimensions.extend([383, 384, 385, 768, 1024, 1536, 4095, 4096]);
        dimensions
    }

    #[test]
    fn kernels_match_f64_reference_on_every_backend() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for backend in Backend::available() {
            for dimension in dimensions() {
                let a = random_vector(&mut rng, dimension);
                let b = random_vector(&mut rng, dimension);
                let want_dot = naive_dot(&a, &b);
                let want_l2 = naive_l2_squared(&a, &b);
                let got_dot = dot_with(backend, &a, &b) as f64;
                let got_l2 = l2_squared_with(backend, &a, &b) as f64;
                assert!(
                    (got_dot - want_dot).abs() <= tolerance(dimension, want_dot.abs()),
                    "{backend:?} dot d={dimension}: {got_dot} vs {want_dot}"
                );
                assert!(
                    (got_l2 - want_l2).abs() <= tolerance(dimension, want_l2),
                    "{backend:?} l2 d={dimension}: {got_l2} vs {want_l2}"
                );
            }
        }
    }

    #[test]
    fn public_kernels_match_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        for dimension in dimensions() {
            let a = random_vector(&mut rng, dimension);
            let b = random_vector(&mut rng, dimension);
            let want_norm = naive_dot(&a, &a).sqrt();
            assert!((norm(&a) as f64 - want_norm).abs() <= tolerance(dimension, want_norm));
            let want_dot = naive_dot(&a, &b);
            assert!((dot(&a, &b) as f64 - want_dot).abs() <= tolerance(dimension, want_dot.abs()));
            let want_l2 = naive_l2_squared(&a, &b);
            assert!((l2_squared(&a, &b) as f64 - want_l2).abs() <= tolerance(dimension, want_l2));
        }
        assert_eq!(dot(&[], &[]), 0.0);
        assert_eq!(l2_squared(&[], &[]), 0.0);
        assert_eq!(norm(&[]), 0.0);
    }

    #[test]
    fn integer_vectors_are_exact() {
        // Small integers multiply and add exactly in f32, whatever the summation order.
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for backend in Backend::available() {
            for dimension in [1, 7, 8, 9, 31, 33, 384, 4096] {
                let a: Vec<f32> = (0..dimension)
                    .map(|_| rng.gen_range(-4..=4) as f32)
                    .collect();
                let b: Vec<f32> = (0..dimension)
                    .map(|_| rng.gen_range(-4..=4) as f32)
                    .collect();
                assert_eq!(dot_with(backend, &a, &b) as f64, naive_dot(&a, &b));
                assert_eq!(
                    l2_squared_with(backend, &a, &b) as f64,
                    naive_l2_squared(&a, &b)
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "length mismatch")]
    fn mismatched_lengths_panic() {
        dot(&[1.0, 2.0], &[1.0]);
    }

    #[test]
    fn backend_is_cached_and_stable() {
        let first = backend();
        assert_eq!(first, backend());
        assert_eq!(
            first,
            *Backend::available()
                .last()
                .expect("portable is always there")
        );
    }
}
