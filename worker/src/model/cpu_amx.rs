//! f32 matrix products on Intel AMX tiles, at f32's accuracy, for the CPU's linear layers.
//!
//! AMX multiplies bf16 (8-bit mantissa) matrices into f32 accumulators, one 16 × 16 × 32 block per
//! instruction: many times the f32 multiply-adds of AVX-512 a cycle. To keep f32 results, every
//! operand is split into two bf16 parts, `x = hi + lo` (`hi` = x rounded to bf16, `lo` = the rest
//! rounded to bf16: 16 bits of mantissa between them), and a product is the three largest of the
//! four partial products, `a_hi·b_hi + a_hi·b_lo + a_lo·b_hi` (the "bf16×3" split); what it drops is
//! below f32's own rounding of a long sum (relative L2 about 4e-6 against an f32 product on the
//! transformer's shapes, where a different summation order alone gives 1e-7).
//!
//! Measured on the development machine's Xeon (one thread, the mid model's FFN input product,
//! 2688 × 512 × 2048): the `gemm` crate's AVX-512 f32 kernel 98 GFLOP/s, these tiles 337 (the
//! tile loop alone; splitting the activations costs 15% more). The right operand (the layer's
//! weights) is split and laid out once per layer ([`PackedWeights`]), the left (the activations)
//! per call.
//!
//! Only x86-64 Linux with AMX-BF16, and only once the kernel has granted the process the tile
//! state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); elsewhere, and with `LONGTAKE_CPU_AMX=0`, [`available`]
//! is false and callers keep their f32 path. Shapes whose inner and output sizes are not
//! multiples of 32 keep it too.

use std::mem::MaybeUninit;

/// Rows and columns of a block of the output computed in the tiles at once (2 × 2 tiles).
const BLOCK: usize = 32;
/// The inner dimension one tile instruction consumes (16 pairs of bf16).
const K_STEP: usize = 32;
/// Output columns (in 16-column panels) whose packed weights a thread sweeps before moving on to
/// the next rows: 16 panels of a 512-wide layer are 64 KiB of bf16 pairs, kept in L2.
const PANELS_PER_SWEEP: usize = 16;

/// The smallest inner size worth the tiles: below it the output's loads and stores into the tiles
/// and the splitting of the activations outweigh the products (the built-in tiny model's 64-wide
/// layers ran 7% slower on them).
const MIN_INNER: usize = 128;

/// Whether this process can run the AMX product: the CPU has AMX-BF16 and the OS has granted the
/// tile state. Asked once; `LONGTAKE_CPU_AMX=0` turns it off (to measure against the f32 path).
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if std::env::var("LONGTAKE_CPU_AMX").is_ok_and(|v| v == "0") {
            return false;
        }
        imp::enable()
    })
}

/// Whether a product of inner size `k` into `n` outputs can run on the tiles.
pub fn fits(k: usize, n: usize) -> bool {
    k >= MIN_INNER && tiles_cover(k, n)
}

/// Whether whole tiles cover a product of inner size `k` into `n` outputs.
fn tiles_cover(k: usize, n: usize) -> bool {
    k > 0 && n > 0 && k.is_multiple_of(K_STEP) && n.is_multiple_of(BLOCK)
}

/// A layer's weights `W (n × k)`, read as the right operand `Wᵀ (k × n)`, split into bf16 parts
/// and laid out for the tiles: for every 16-column panel and every 32-deep step of `k`, the `hi`
/// tile then the `lo` tile, each 16 rows of 16 column pairs (the VNNI layout: row `r` holds
/// `Wᵀ[2r][c], Wᵀ[2r+1][c]` for each column `c`).
#[derive(Debug)]
pub struct PackedWeights {
    k: usize,
    n: usize,
    tiles: Vec<u16>,
}

/// bf16 values in one tile (16 rows × 32).
const TILE: usize = 512;

impl PackedWeights {
    /// `w` is `n × k` row-major (a linear layer's `(out, in)`); `k` and `n` are multiples of 32.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert!(w.len() == n * k, "AMX weights {n} × {k}");
        Self::build(k, n, |i, c| w[c * k + i])
    }

    /// `rhs` is `k × n` row-major (a convolution tap's `(C_in, C_out)`); `k` and `n` are
    /// multiples of 32.
    pub fn pack_columns(rhs: &[f32], k: usize, n: usize) -> Self {
        assert!(rhs.len() == k * n, "AMX weights {k} × {n}");
        Self::build(k, n, |i, c| rhs[i * n + c])
    }

    /// From `value(i, c)`, the right operand's row `i` (of `k`) and column `c` (of `n`).
    fn build(k: usize, n: usize, value: impl Fn(usize, usize) -> f32) -> Self {
        assert!(tiles_cover(k, n), "AMX weights {k} × {n}: not whole tiles");
        let steps = k / K_STEP;
        let mut tiles = vec![0u16; 2 * n * k];
        for panel in 0..n / 16 {
            for step in 0..steps {
                let at = (panel * steps + step) * 2 * TILE;
                for c in 0..16 {
                    for i in 0..K_STEP {
                        let (hi, lo) = split(value(step * K_STEP + i, panel * 16 + c));
                        let slot = (i / 2) * 32 + c * 2 + i % 2;
                        tiles[at + slot] = hi;
                        tiles[at + TILE + slot] = lo;
                    }
                }
            }
        }
        Self { k, n, tiles }
    }

    pub fn inner(&self) -> usize {
        self.k
    }

    pub fn outputs(&self) -> usize {
        self.n
    }
}

/// What the output's sums start from.
#[derive(Clone, Copy)]
pub enum Start<'a> {
    /// The values in the output (accumulate into them).
    Out,
    /// Zero (the output is only written).
    Zero,
    /// This `(n,)` row added to every row of the sums (the output is only written). Added after
    /// the sums, as `sum + bias`: what a layer whose product and bias are apart (a tensor-parallel
    /// row shard's) computes, so that the two agree bit for bit.
    Bias(&'a [f32]),
}

/// The left operand of a product: f32 values, split into bf16 parts block by block as they are
/// laid out for the tiles, or values split once beforehand ([`split_values`]), for an operand
/// whose values many rows read (a convolution's overlapping rows and taps read each input value
/// up to 27 times).
#[derive(Clone, Copy)]
pub enum Left<'a> {
    Values(&'a [f32]),
    Split { hi: &'a [u16], lo: &'a [u16] },
}

impl<'a> Left<'a> {
    fn len(&self) -> usize {
        match self {
            Left::Values(values) => values.len(),
            Left::Split { hi, .. } => hi.len(),
        }
    }

    /// The operand from value `at` on.
    pub fn from(self, at: usize) -> Self {
        match self {
            Left::Values(values) => Left::Values(&values[at..]),
            Left::Split { hi, lo } => Left::Split {
                hi: &hi[at..],
                lo: &lo[at..],
            },
        }
    }
}

/// `values` split into bf16 parts `hi` and `lo` (as long as `values`), for [`Left::Split`]; on
/// the calling thread.
pub fn split_values(values: &[f32], hi: &mut [u16], lo: &mut [u16]) {
    assert!(available(), "AMX split without the tile state");
    assert!(
        hi.len() == values.len() && lo.len() == values.len(),
        "AMX split: lengths differ"
    );
    imp::split_run(values, hi, lo);
}

/// `out (m × n) = bias + x (m × k) · Wᵀ` on the calling thread, writing every value of `out`
/// (never reading it: it may be uninitialised).
pub fn biased(out: &mut [MaybeUninit<f32>], x: &[f32], weights: &PackedWeights, bias: &[f32]) {
    assert_eq!(
        bias.len(),
        weights.n,
        "AMX product: the bias is not one per output"
    );
    // SAFETY: `Start::Bias` reads nothing of `out`.
    unsafe { rows_into(out, Left::Values(x), weights.k, weights, Start::Bias(bias)) };
}

/// `out (m × n) = start + lhs · rhs`, row `r` of the left operand being the `k` values of `lhs`
/// from `r · step` (rows overlap when `step < k`, as a convolution's shifted views do), on the
/// calling thread.
pub fn product_rows(
    out: &mut [f32],
    lhs: Left<'_>,
    step: usize,
    weights: &PackedWeights,
    start: Start<'_>,
) {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, `out` is initialised (what `Start::Out`
    // reads), and `rows_into` writes only values.
    let out = unsafe {
        std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<MaybeUninit<f32>>(), out.len())
    };
    // SAFETY: as above.
    unsafe { rows_into(out, lhs, step, weights, start) };
}

/// [`product_rows`] into `out`, which is read only where `start` is `Out`.
///
/// # Safety
/// With `Start::Out`, every value of `out` is initialised.
unsafe fn rows_into(
    out: &mut [MaybeUninit<f32>],
    lhs: Left<'_>,
    step: usize,
    weights: &PackedWeights,
    start: Start<'_>,
) {
    let (k, n) = (weights.k, weights.n);
    let m = out.len() / n;
    assert!(
        out.len() == m * n && (m == 0 || lhs.len() >= (m - 1) * step + k),
        "AMX product of {m} rows × {k} × {n}: operands out of bounds"
    );
    assert!(available(), "AMX product without the tile state");
    let mut left = vec![0u16; 2 * BLOCK * k];
    let mut tail: Vec<f32> = Vec::new();
    for first in (0..m).step_by(BLOCK) {
        let rows = BLOCK.min(m - first);
        pack_rows(lhs.from(first * step), rows, step, k, &mut left);
        let out = &mut out[first * n..(first + rows) * n];
        if rows == BLOCK {
            // SAFETY: `left` is a packed block of 32 rows, `out` holds 32 rows of `n` (read only
            // with `Start::Out`, when the caller has initialised them), `weights` is laid out
            // for `k × n`; `available()` held.
            unsafe { imp::block_row(out.as_mut_ptr().cast(), n, &left, weights, start) };
        } else {
            // the last rows: through 32 rows of scratch (the packed left block is zero-padded)
            tail.clear();
            if let Start::Out = start {
                // SAFETY: initialised with `Start::Out` (the caller's promise).
                tail.extend(out.iter().map(|v| unsafe { v.assume_init() }));
            }
            tail.resize(BLOCK * n, 0.0);
            // SAFETY: as above, on the 32-row scratch.
            unsafe { imp::block_row(tail.as_mut_ptr(), n, &left, weights, start) };
            for (o, t) in out.iter_mut().zip(&tail) {
                o.write(*t);
            }
        }
        // SAFETY: every value of the block was written just above.
        let block = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast(), out.len()) };
        add_bias(block, start);
    }
}

/// The bias of `Start::Bias` added to each row of a block of sums, while it is in the cache.
fn add_bias(block: &mut [f32], start: Start<'_>) {
    if let Start::Bias(bias) = start {
        for row in block.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }
}

/// Up to 32 rows of the left operand (row `r`: `lhs[r · step..][..k]`) split into bf16 parts, as
/// two 16-row halves: for each half and each 32-deep step of `k`, the `hi` tile then the `lo`
/// tile (16 rows × 32). Missing rows are 0.
fn pack_rows(lhs: Left<'_>, rows: usize, step: usize, k: usize, packed: &mut [u16]) {
    let steps = k / K_STEP;
    if rows < BLOCK {
        packed.fill(0);
    }
    for r in 0..rows {
        let (half, row) = (r / 16, r % 16);
        for s in 0..steps {
            let at = (half * steps + s) * 2 * TILE + row * K_STEP;
            let (hi, lo) = packed[at..at + TILE + K_STEP].split_at_mut(TILE);
            let (hi, lo) = (&mut hi[..K_STEP], &mut lo[..K_STEP]);
            let from = r * step + s * K_STEP;
            match lhs {
                Left::Values(values) => imp::split_run(&values[from..][..K_STEP], hi, lo),
                Left::Split { hi: h, lo: l } => {
                    hi.copy_from_slice(&h[from..][..K_STEP]);
                    lo.copy_from_slice(&l[from..][..K_STEP]);
                }
            }
        }
    }
}

/// `x` as `hi + lo`, each rounded to the nearest bf16 (ties to even).
#[inline(always)]
pub(crate) fn split(x: f32) -> (u16, u16) {
    let hi = to_bf16(x);
    (hi, to_bf16(x - f32::from_bits(u32::from(hi) << 16)))
}

/// Branch-free, so that a run of them vectorises.
#[inline(always)]
fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((bits >> 16) | 0x40) as u16;
    if x.is_nan() {
        quiet_nan
    } else {
        rounded
    }
}

/// `split` over a run of values.
#[inline(always)]
fn split_each(values: &[f32], hi: &mut [u16], lo: &mut [u16]) {
    for ((&x, h), l) in values.iter().zip(hi).zip(lo) {
        (*h, *l) = split(x);
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(crate) use imp::{configure_full_tiles, release_tiles};

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use std::arch::asm;

    use super::{PackedWeights, Start, BLOCK, K_STEP, PANELS_PER_SWEEP, TILE};

    /// The tile configuration `ldtilecfg` reads: palette 1, eight tiles of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    const SYS_ARCH_PRCTL: i64 = 158;

    /// `split` over a run, in AVX-512 registers (every CPU with AMX has AVX-512).
    pub(super) fn split_run(values: &[f32], hi: &mut [u16], lo: &mut [u16]) {
        #[target_feature(enable = "avx512f,avx512bw")]
        fn wide(values: &[f32], hi: &mut [u16], lo: &mut [u16]) {
            super::split_each(values, hi, lo)
        }
        // SAFETY: reached only through `accumulate`, after `available()`: the CPU has AMX, so
        // AVX-512F and BW too.
        unsafe { wide(values, hi, lo) }
    }

    /// Loads the tile configuration every kernel here uses: eight tiles of 16 rows × 64 bytes.
    ///
    /// # Safety
    /// The tile state is granted (`enable()` returned true).
    pub(crate) unsafe fn configure_full_tiles() {
        let mut config = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            config.bytes_per_row[t] = 64;
            config.rows[t] = 16;
        }
        asm!("ldtilecfg [{}]", in(reg) &config as *const TileConfig, options(nostack, readonly));
    }

    /// Gives the tile state back (the next kernel configures it again).
    ///
    /// # Safety
    /// As for [`configure_full_tiles`].
    pub(crate) unsafe fn release_tiles() {
        asm!("tilerelease", options(nostack, nomem));
    }

    pub(super) fn enable() -> bool {
        // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE
        let leaf = std::arch::x86_64::__cpuid_count(7, 0);
        if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
            return false;
        }
        let result: i64;
        // SAFETY: the arch_prctl system call only reads its two integer arguments; a kernel
        // without AMX support answers with an error.
        unsafe {
            asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL => result,
                 in("rdi") ARCH_REQ_XCOMP_PERM, in("rsi") XFEATURE_XTILEDATA,
                 lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        result == 0
    }

    /// One 32-row block of the output, every column: `out (32 × n, row stride n) = start +
    /// left · weights`, `left` packed by `pack_rows`.
    ///
    /// # Safety
    /// The tile state is granted (`enable()` returned true); `out` points to at least 32 rows of
    /// `n` (initialised where `start` is `Out`); `left` holds `2 × 32 × k` values; `weights` is
    /// laid out for `k × n`; a bias holds `n` values.
    pub(super) unsafe fn block_row(
        out: *mut f32,
        n: usize,
        left: &[u16],
        weights: &PackedWeights,
        start: Start<'_>,
    ) {
        debug_assert!(left.len() >= 2 * BLOCK * weights.k);
        configure_full_tiles();
        let steps = weights.k / K_STEP;
        let panels = n / 16;
        let row_bytes = n * 4;
        let left = left.as_ptr();
        let right = weights.tiles.as_ptr();
        for sweep in (0..panels).step_by(PANELS_PER_SWEEP) {
            for panel in (sweep..(sweep + PANELS_PER_SWEEP).min(panels)).step_by(2) {
                let c00 = out.add(panel * 16);
                let c01 = c00.add(16);
                let c10 = c00.add(16 * n);
                let c11 = c10.add(16);
                match start {
                    Start::Out => asm!(
                        "tileloadd tmm0, [{c00} + {s}*1]", "tileloadd tmm1, [{c01} + {s}*1]",
                        "tileloadd tmm2, [{c10} + {s}*1]", "tileloadd tmm3, [{c11} + {s}*1]",
                        c00 = in(reg) c00, c01 = in(reg) c01, c10 = in(reg) c10,
                        c11 = in(reg) c11, s = in(reg) row_bytes, options(nostack, readonly)),
                    // a bias is added to the finished sums (`product_rows`)
                    Start::Zero | Start::Bias(_) => asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        options(nostack, nomem)
                    ),
                }
                for step in 0..steps {
                    // (left part, right part) of the three products: hi·hi, hi·lo, lo·hi
                    for (a, b) in [(0, 0), (0, 1), (1, 0)] {
                        let a0 = left.add((step * 2 + a) * TILE);
                        let a1 = left.add(((steps + step) * 2 + a) * TILE);
                        let b0 = right.add(((panel * steps + step) * 2 + b) * TILE);
                        let b1 = right.add((((panel + 1) * steps + step) * 2 + b) * TILE);
                        asm!(
                            "tileloadd tmm4, [{a0} + {s}*1]", "tileloadd tmm5, [{a1} + {s}*1]",
                            "tileloadd tmm6, [{b0} + {s}*1]", "tileloadd tmm7, [{b1} + {s}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6", "tdpbf16ps tmm1, tmm4, tmm7",
                            "tdpbf16ps tmm2, tmm5, tmm6", "tdpbf16ps tmm3, tmm5, tmm7",
                            a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1,
                            s = in(reg) 64usize, options(nostack, readonly));
                    }
                }
                asm!(
                    "tilestored [{c00} + {s}*1], tmm0", "tilestored [{c01} + {s}*1], tmm1",
                    "tilestored [{c10} + {s}*1], tmm2", "tilestored [{c11} + {s}*1], tmm3",
                    c00 = in(reg) c00, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11,
                    s = in(reg) row_bytes, options(nostack));
            }
        }
        release_tiles();
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod imp {
    use super::{PackedWeights, Start};

    pub(super) fn enable() -> bool {
        false
    }

    pub(super) fn split_run(values: &[f32], hi: &mut [u16], lo: &mut [u16]) {
        super::split_each(values, hi, lo)
    }

    pub(super) unsafe fn block_row(_: *mut f32, _: usize, _: &[u16], _: &PackedWeights, _: Start) {
        unreachable!("AMX product on a CPU without AMX")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bf16 rounding: ties to even, and the two parts of a split carry 16 bits of mantissa.
    #[test]
    fn a_split_keeps_sixteen_bits() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: to even (1)
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        let mut worst = 0f32;
        for i in 0..10_000 {
            let x = ((i as f32) * 0.618_034).sin() * 3.7;
            let (hi, lo) = split(x);
            let back = f32::from_bits(u32::from(hi) << 16) + f32::from_bits(u32::from(lo) << 16);
            worst = worst.max(((back - x) / x.abs().max(1e-30)).abs());
        }
        assert!(worst < 1.0 / 65536.0, "split error {worst:e}");
    }

    /// Against a product in f64, with a bias (started from it, and added to an output holding
    /// it), over row counts that leave a partial last block and widths of one sweep and of
    /// several. On a CPU without AMX it says so and checks the
    /// packing only.
    #[test]
    fn tiles_give_the_f32_product() {
        let mut seed = 0x9e37_79b9_u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed as f32 / u32::MAX as f32) * 2.0 - 1.0
        };
        for (m, k, n) in [(5, 32, 32), (70, 96, 64), (33, 64, 608)] {
            let x: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| next() * 0.1).collect();
            let bias: Vec<f32> = (0..n).map(|_| next()).collect();
            let packed = PackedWeights::pack(&w, n, k);
            assert_eq!((packed.inner(), packed.outputs()), (k, n));
            if !available() {
                eprintln!("no AMX on this CPU: the tile product is not exercised");
                return;
            }
            // the sums then the bias, bit for bit what a product and a bias apart give
            let mut out = vec![MaybeUninit::uninit(); m * n];
            biased(&mut out, &x, &packed, &bias);
            // SAFETY: `biased` wrote every value.
            let out: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
            let mut apart = vec![f32::NAN; m * n];
            product_rows(&mut apart, Left::Values(&x), k, &packed, Start::Zero);
            // the same from values split beforehand, bit for bit
            let (mut hi, mut lo) = (vec![0u16; x.len()], vec![0u16; x.len()]);
            split_values(&x, &mut hi, &mut lo);
            let mut from_split = vec![f32::NAN; m * n];
            let split = Left::Split { hi: &hi, lo: &lo };
            product_rows(&mut from_split, split, k, &packed, Start::Zero);
            assert_eq!(apart, from_split);
            for (row, want) in apart.chunks_exact(n).zip(out.chunks_exact(n)) {
                let sum: Vec<f32> = row.iter().zip(&bias).map(|(v, b)| v + b).collect();
                assert_eq!(sum, want);
            }
            // and added to an output holding the bias
            let mut added: Vec<f32> = (0..m).flat_map(|_| bias.iter().copied()).collect();
            product_rows(&mut added, Left::Values(&x), k, &packed, Start::Out);
            let (mut err, mut norm, mut err_added) = (0f64, 0f64, 0f64);
            for i in 0..m {
                for j in 0..n {
                    let want = f64::from(bias[j])
                        + (0..k)
                            .map(|l| f64::from(x[i * k + l]) * f64::from(w[j * k + l]))
                            .sum::<f64>();
                    err += (f64::from(out[i * n + j]) - want).powi(2);
                    err_added += (f64::from(added[i * n + j]) - want).powi(2);
                    norm += want * want;
                }
            }
            for (name, err) in [("from the bias", err), ("added", err_added)] {
                let rel = (err / norm).sqrt();
                assert!(rel < 2e-5, "{m} × {k} × {n} {name}: relative L2 {rel:e}");
            }
        }
    }

    /// A row's values do not depend on which rows share its block (a group of ranks cuts the
    /// rows differently from the single process, which must agree with it bit for bit).
    #[test]
    fn rows_do_not_depend_on_their_block() {
        if !available() {
            return;
        }
        let (m, k, n) = (70, 128, 64);
        let x: Vec<f32> = (0..m * k)
            .map(|i| (i * 7919 % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| (i * 104729 % 1000) as f32 / 5000.0 - 0.1)
            .collect();
        let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
        let packed = PackedWeights::pack(&w, n, k);
        let mut whole = vec![MaybeUninit::uninit(); m * n];
        biased(&mut whole, &x, &packed, &bias);
        let whole: Vec<u32> = whole
            .iter()
            .map(|v| unsafe { v.assume_init() }.to_bits())
            .collect();
        for cut in [1, 5, 16, 32, 37] {
            let mut a = vec![MaybeUninit::uninit(); cut * n];
            biased(&mut a, &x[..cut * k], &packed, &bias);
            let mut b = vec![MaybeUninit::uninit(); (m - cut) * n];
            biased(&mut b, &x[cut * k..], &packed, &bias);
            let parts: Vec<u32> = a
                .iter()
                .chain(&b)
                .map(|v| unsafe { v.assume_init() }.to_bits())
                .collect();
            let differ = parts.iter().zip(&whole).filter(|(p, q)| p != q).count();
            assert_eq!(differ, 0, "cut {cut}: {differ} values differ");
        }
    }
}
