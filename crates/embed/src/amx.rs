//! # AMX bf16 matrix multiply — the fast path's GEMM on x86-64 CPUs with AMX
//!
//! Owns the one operation the packed BERT forward ([`crate::bert`]) spends most of its time
//! in: `C = A · Bᵀ`, A being activations (rows of bf16), B a linear layer's weights packed
//! once at load time into AMX's "VNNI" tile layout, C f32. It also owns the runtime check
//! that this CPU and kernel let us use AMX ([`available`]): CPUID says AMX-TILE + AMX-BF16,
//! and Linux grants the process the tile-data state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`).
//!
//! Why here, by hand: stable Rust has no AMX intrinsics, but inline `asm!` is stable, and a
//! tile multiply does 16 × 16 × 32 multiply-adds per instruction — an order of magnitude more
//! than AVX-512 f32 FMAs — which is what makes MiniLM faster than torch's f32 GEMMs here.
//!
//! It must never run on a CPU where [`available`] is false (every entry point is `unsafe`
//! with that as its contract), never read or write outside the slices it is given (shapes are
//! checked with `assert!` before any tile instruction), and never leave tile state configured
//! after a call (`tilerelease`), so other code in the thread is unaffected.

use std::arch::asm;
use std::sync::OnceLock;

/// Rows of an A or C tile.
const TILE_ROWS: usize = 16;
/// bf16 values of K per tile step (64 bytes per tile row).
pub const TILE_K: usize = 32;
/// Rows the output is processed in per block (two A tiles): A and C must hold a multiple.
pub const ROW_BLOCK: usize = 32;
/// Columns per block (two B tiles): N must be a multiple.
pub const COL_BLOCK: usize = 32;
/// Rows of A per chunk in [`gemm_blocks`] (a multiple of [`ROW_BLOCK`]).
const ROW_CHUNK: usize = 256;
/// u16 values in one packed B tile (16 rows of 64 bytes).
const B_TILE: usize = TILE_ROWS * TILE_K;

/// Whether this CPU and OS let the process use AMX-BF16 (checked once).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if !(std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("fma"))
        {
            return false;
        }
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let amx_bf16 = (leaf7.edx >> 22) & 1 == 1;
        let amx_tile = (leaf7.edx >> 24) & 1 == 1;
        amx_bf16 && amx_tile && os_permits_tiles()
    })
}

/// Asks Linux for the AMX tile-data state (XFEATURE 18) for this process.
#[cfg(target_os = "linux")]
fn os_permits_tiles() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with this request only changes the process's permitted xsave
    // features; it reads and writes no user memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    r == 0
}

#[cfg(not(target_os = "linux"))]
fn os_permits_tiles() -> bool {
    false
}

/// f32 → bf16 bits, rounding to nearest even (inputs are finite activations).
#[inline(always)]
pub fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let round = ((b >> 16) & 1) + 0x7fff;
    (b.wrapping_add(round) >> 16) as u16
}

/// Converts `src` into `dst` (same length) as bf16 bits.
///
/// # Safety
/// AVX-512F must be available (it is whenever [`available`] is true).
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn to_bf16(src: &[f32], dst: &mut [u16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = bf16(*s);
    }
}

/// A linear layer's weight `W` (`n` × `k`, row-major as stored by torch: `y = x·Wᵀ`), in
/// tiles of 16 output columns × 32 inputs, each laid out as AMX wants B: 16 rows of
/// (16 columns × 2 consecutive k) bf16 values.
#[derive(Clone)]
pub struct PackedB {
    pub n: usize,
    pub k: usize,
    tiles: Vec<u16>,
}

impl PackedB {
    /// Packs `w` (`n` × `k`). `n` must be a multiple of [`COL_BLOCK`], `k` of [`TILE_K`].
    pub fn pack(w: &[f32], n: usize, k: usize) -> Option<PackedB> {
        if n == 0
            || k == 0
            || !n.is_multiple_of(COL_BLOCK)
            || !k.is_multiple_of(TILE_K)
            || w.len() != n * k
        {
            return None;
        }
        let kb_count = k / TILE_K;
        let mut tiles = vec![0u16; n * k];
        for nb in 0..n / TILE_ROWS {
            for kb in 0..kb_count {
                let tile = &mut tiles[(nb * kb_count + kb) * B_TILE..][..B_TILE];
                for r in 0..TILE_ROWS {
                    for c in 0..TILE_ROWS {
                        for j in 0..2 {
                            let (row, col) = (nb * TILE_ROWS + c, kb * TILE_K + 2 * r + j);
                            tile[r * TILE_K + c * 2 + j] = bf16(w[row * k + col]);
                        }
                    }
                }
            }
        }
        Some(PackedB { n, k, tiles })
    }
}

/// The tile configuration (palette 1): tiles 0–7 all 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    fn new() -> Self {
        let mut c = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        c.colsb[..8].fill(64);
        c.rows[..8].fill(TILE_ROWS as u8);
        c
    }
}

/// A 32 × 32 block of the product (row-major, stride 32), handed to the epilogue.
pub type Block = [f32; ROW_BLOCK * COL_BLOCK];

/// `a[..rows × b.k] · Wᵀ`, `a` being bf16 bits with row stride `b.k`, computed in blocks of
/// 32 rows × 32 columns; each finished block goes to `epilogue(first_row, first_col, block)`
/// while it is still in L1 (bias, activation, conversion and the store are the caller's).
/// `rows` must be a multiple of [`ROW_BLOCK`] (pad with anything: rows are independent, and
/// the epilogue may ignore padded rows).
///
/// # Safety
/// [`available`] must have returned true.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
pub unsafe fn gemm_blocks(
    a: &[u16],
    rows: usize,
    b: &PackedB,
    mut epilogue: impl FnMut(usize, usize, &Block),
) {
    let (n, k) = (b.n, b.k);
    assert!(
        rows.is_multiple_of(ROW_BLOCK) && n.is_multiple_of(COL_BLOCK) && k.is_multiple_of(TILE_K)
    );
    assert!(a.len() >= rows * k && b.tiles.len() == n * k);
    if rows == 0 {
        return;
    }
    let kb_count = k / TILE_K;
    let a_stride = k * 2;
    let cfg = TileConfig::new();
    let mut block: Block = [0.0; ROW_BLOCK * COL_BLOCK];
    // SAFETY (all asm below): AMX is available (the caller's contract); every tile load reads
    // 16 rows of 64 bytes at the given stride, and every store writes 16 rows of 64 bytes:
    // the asserts above keep all loads inside `a` and `b.tiles` (row blocks of 32 ≤ rows,
    // column blocks of 32 ≤ n, k steps of 32 ≤ k), and the stores fill exactly `block`.
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly));
    }
    let a_ptr = a.as_ptr();
    let b_ptr = b.tiles.as_ptr();
    // Rows in chunks of ROW_CHUNK: within a chunk, each 32-column panel of B is loaded from
    // far caches once and reused from L1 for every 32-row block, while the chunk's rows of A
    // stay in L2.
    for m0 in (0..rows).step_by(ROW_CHUNK) {
        for nb2 in (0..n).step_by(COL_BLOCK) {
            for mb in (m0..(m0 + ROW_CHUNK).min(rows)).step_by(ROW_BLOCK) {
                let nb = nb2 / TILE_ROWS;
                unsafe {
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        options(nostack, nomem)
                    );
                }
                for kb in 0..kb_count {
                    unsafe {
                        let a0 = a_ptr.add(mb * k + kb * TILE_K);
                        let a1 = a0.add(TILE_ROWS * k);
                        let b0 = b_ptr.add((nb * kb_count + kb) * B_TILE);
                        let b1 = b0.add(kb_count * B_TILE);
                        asm!(
                            "tileloadd tmm4, [{a0} + {sa}*1]",
                            "tileloadd tmm5, [{a1} + {sa}*1]",
                            "tileloadd tmm6, [{b0} + {sb}*1]",
                            "tileloadd tmm7, [{b1} + {sb}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            a0 = in(reg) a0,
                            a1 = in(reg) a1,
                            b0 = in(reg) b0,
                            b1 = in(reg) b1,
                            sa = in(reg) a_stride,
                            sb = in(reg) 64usize,
                            options(nostack, readonly)
                        );
                    }
                }
                unsafe {
                    let c0 = block.as_mut_ptr();
                    let c1 = c0.add(TILE_ROWS);
                    let c2 = c0.add(TILE_ROWS * COL_BLOCK);
                    let c3 = c2.add(TILE_ROWS);
                    asm!(
                        "tilestored [{c0} + {sc}*1], tmm0",
                        "tilestored [{c1} + {sc}*1], tmm1",
                        "tilestored [{c2} + {sc}*1], tmm2",
                        "tilestored [{c3} + {sc}*1], tmm3",
                        c0 = in(reg) c0,
                        c1 = in(reg) c1,
                        c2 = in(reg) c2,
                        c3 = in(reg) c3,
                        sc = in(reg) COL_BLOCK * 4,
                        options(nostack)
                    );
                }
                epilogue(mb, nb2, &block);
            }
        }
    }
    unsafe {
        asm!("tilerelease", options(nostack, nomem));
    }
}

/// Epilogue helper: `dst[r][..32] = block[r] + bias` for the first `rows` rows of `block`,
/// `dst` having row stride `stride` from its start.
///
/// # Safety
/// AVX-512F must be available.
#[target_feature(enable = "avx512f")]
pub unsafe fn add_bias(block: &Block, bias: &[f32], dst: &mut [f32], stride: usize, rows: usize) {
    use std::arch::x86_64::*;
    let bias = &bias[..COL_BLOCK];
    let rows = rows.min(ROW_BLOCK);
    if rows == 0 {
        return;
    }
    assert!(dst.len() >= (rows - 1) * stride + COL_BLOCK);
    let b0 = _mm512_loadu_ps(bias.as_ptr());
    let b1 = _mm512_loadu_ps(bias[16..].as_ptr());
    for (r, src) in block.chunks_exact(COL_BLOCK).take(rows).enumerate() {
        let d = &mut dst[r * stride..][..COL_BLOCK];
        let s0 = _mm512_loadu_ps(src.as_ptr());
        let s1 = _mm512_loadu_ps(src[16..].as_ptr());
        _mm512_storeu_ps(d.as_mut_ptr(), _mm512_add_ps(s0, b0));
        _mm512_storeu_ps(d[16..].as_mut_ptr(), _mm512_add_ps(s1, b1));
    }
}

/// `c[..rows × b.n] = a[..rows × b.k] · Wᵀ` in f32 (row stride `b.n`); see [`gemm_blocks`].
///
/// # Safety
/// [`available`] must have returned true.
pub unsafe fn gemm(a: &[u16], rows: usize, b: &PackedB, c: &mut [f32]) {
    let n = b.n;
    assert!(c.len() >= rows * n);
    // SAFETY: the caller's contract.
    unsafe {
        gemm_blocks(a, rows, b, |r0, c0, block| {
            for (r, src) in block.chunks_exact(COL_BLOCK).enumerate() {
                c[(r0 + r) * n + c0..][..COL_BLOCK].copy_from_slice(src);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between two bf16 values: ties to even (down).
        assert_eq!(bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16(-2.5), 0xc020);
    }

    #[test]
    fn packing_refuses_odd_shapes() {
        assert!(PackedB::pack(&[0.0; 16 * 32], 16, 32).is_none());
        assert!(PackedB::pack(&[0.0; 32 * 16], 32, 16).is_none());
        assert!(PackedB::pack(&[0.0; 32 * 32], 32, 32).is_some());
    }

    #[test]
    fn gemm_matches_a_plain_product() {
        if !available() {
            eprintln!("SKIPPED: no AMX-BF16 here");
            return;
        }
        let (rows, n, k) = (64, 96, 128);
        // Values exact in bf16, so the products are exact in f32.
        let a: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 4.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 8.0)
            .collect();
        let mut ab = vec![0u16; a.len()];
        unsafe { to_bf16(&a, &mut ab) };
        let b = PackedB::pack(&w, n, k).unwrap();
        let mut c = vec![0f32; rows * n];
        unsafe { gemm(&ab, rows, &b, &mut c) };
        for i in 0..rows {
            for j in 0..n {
                let want: f32 = (0..k).map(|x| a[i * k + x] * w[j * k + x]).sum();
                assert_eq!(c[i * n + j], want, "({i}, {j})");
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    #[test]
    #[ignore]
    fn gemm_speed() {
        assert!(available());
        for (rows, n, k) in [
            (4096, 1536, 384),
            (4096, 384, 1536),
            (4096, 1152, 384),
            (1024, 1152, 384),
        ] {
            let a = vec![0x3f80u16; rows * k];
            let w = vec![0.5f32; n * k];
            let b = PackedB::pack(&w, n, k).unwrap();
            let mut c = vec![0f32; rows * n];
            let cpu = || {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
                ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
            };
            let t = cpu();
            let reps = 20;
            for _ in 0..reps {
                unsafe { gemm(&a, rows, &b, &mut c) };
            }
            let s = cpu() - t;
            let gflops = 2.0 * (rows * n * k * reps) as f64 / s / 1e9;
            eprintln!(
                "{rows}x{n}x{k}: {gflops:.0} GFLOP/s ({:.3} ms each)",
                s * 1e3 / reps as f64
            );
        }
    }
}
