//! Element-wise math for the CPU kernels, written so that a loop of it vectorises: a polynomial
//! 2^x in place of libm's `exp` (a call per element that LLVM cannot vectorise), the logistic
//! function built on it, and the fused activations of the transformer's feed-forward (GELU,
//! tanh approximation) and the VAE's norms (SiLU).
//!
//! Profiled on the toy model's render, candle's scalar GELU (`tanh` through libm's `expm1f` per
//! element) took 30% of the denoising time, more than the attention. The kernels are compiled
//! once per [`Isa`] and the best the CPU has is chosen at run time (the portable variant stays
//! portable: `mul_add` without FMA is a libm call, slow but exact).

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The instruction set a CPU kernel is compiled for: each kernel is compiled once per variant
/// (`#[target_feature]`) and the best one the CPU has is chosen at run time, so the portable
/// build stays portable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Portable,
    /// AVX2 and FMA: 8 lanes of f32.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    /// AVX-512F (with AVX2 and FMA): 16 lanes.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// The widest variant this CPU runs.
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                return if has!("avx512f") {
                    Isa::Avx512
                } else {
                    Isa::Avx2Fma
                };
            }
        }
        Isa::Portable
    }

    /// Every variant this CPU runs (for tests that compare them).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        let mut all = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            let best = Isa::detect();
            if best != Isa::Portable {
                all.push(Isa::Avx2Fma);
            }
            if best == Isa::Avx512 {
                all.push(Isa::Avx512);
            }
        }
        all
    }
}

/// The polynomial of [`exp2`]'s 2^f on [−½, ½], lowest degree first: degree 5 with 2^0 = 1
/// exactly, fitted for the least largest relative error (9.1e-8 in exact arithmetic, 1.9e-7
/// evaluated in f32: as good as the degree-6 Taylor series it replaced, one multiply-add
/// cheaper).
// the linear coefficient is the fit's, which rounds to ln 2's f32 neighbour, not ln 2 itself
#[allow(clippy::approx_constant)]
pub(crate) const EXP2_POLY: [f32; 6] = [
    1.0,
    0.693_147,
    0.240_222_42,
    0.055_507_336,
    0.009_671_513,
    0.001_326_472_7,
];

/// 2^x for x in [−126, 126] (clamped to it), relative error about 2e-7: x = n + f with n the
/// nearest integer and |f| ≤ 1/2, 2^f by [`EXP2_POLY`], 2^n into the exponent bits.
/// Branch-free, so a loop of it vectorises.
#[inline(always)]
pub(crate) fn exp2(x: f32) -> f32 {
    // round to nearest by adding and taking away 1.5 · 2^23 (no libm call, so it vectorises)
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-126.0, 126.0);
    let shifted = x + ROUND; // n sits in the low bits of the mantissa
    let n = shifted - ROUND;
    let f = x - n;
    let c = EXP2_POLY;
    let p = c[5]
        .mul_add(f, c[4])
        .mul_add(f, c[3])
        .mul_add(f, c[2])
        .mul_add(f, c[1])
        .mul_add(f, c[0]);
    // n's two's complement from the bits, not `n as i32`: Rust's saturating float-to-int cast
    // is a compare and branch per lane, which kept this loop scalar
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// The logistic function 1 / (1 + e^−x); saturates to 0 and 1 without overflow.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp2(-x * std::f32::consts::LOG2_E))
}

/// x · sigmoid(x).
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// GELU with the tanh approximation (PyTorch's `approximate="tanh"`, diffusers'
/// `gelu-approximate`, candle's `gelu`): ½x(1 + tanh u) with u = √(2/π)(x + 0.044715x³),
/// computed as x · sigmoid(2u) (the same function: ½(1 + tanh u) = sigmoid(2u)).
#[inline(always)]
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * x * (0.044_715 * x * x + 1.0);
    x * sigmoid(2.0 * u)
}

/// [`gelu_tanh`] of every element of `x`: fused on the CPU in f32, candle's `gelu` elsewhere
/// (other devices, other dtypes).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?
            .apply_op1_no_bwd(&Gelu { isa: Isa::detect() })
    } else {
        x.gelu()
    }
}

struct Gelu {
    isa: Isa,
}

/// The values of a contiguous f32 operand of a CPU kernel (`what` names the kernel in the error).
pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => candle_core::bail!("{what}: the CPU kernel needs contiguous f32 operands"),
    }
}

/// `dst (m × n) = lhs (m × k) · rhs (k × n)`, or `+=` when `accumulate`, on this thread, through
/// the `gemm` crate: `dst` and `lhs` row-major with row strides `dst_rs` and `lhs_rs`, `rhs` with
/// row and column strides `rhs_rs`, `rhs_cs` (a transposed operand is a matter of strides).
///
/// # Safety
/// Every pointer must span the matrix its dimensions and strides describe, and no one else may
/// touch `dst` meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        1,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// Elements per rayon task: large enough to amortise the task, small enough to spread.
const CHUNK: usize = 16 * 1024;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout, "gelu")?;
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(dst, src)| map_slice(src, dst, gelu_tanh, self.isa));
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// `dst[i] = f(src[i])`, through `isa`'s compilation (`f` is a generic, not a pointer, so that
/// it is inlined into each compilation and vectorised there).
#[inline(always)]
pub(crate) fn map_slice(src: &[f32], dst: &mut [f32], f: impl Fn(f32) -> f32, isa: Isa) {
    // SAFETY (both): `isa` comes from `Isa::detect`, so the CPU has the features.
    match isa {
        Isa::Portable => map_slice_portable(src, dst, f),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { map_slice_avx2(src, dst, f) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { map_slice_avx512(src, dst, f) },
    }
}

#[inline(always)]
fn map_slice_portable(src: &[f32], dst: &mut [f32], f: impl Fn(f32) -> f32) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f(s);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn map_slice_avx2(src: &[f32], dst: &mut [f32], f: impl Fn(f32) -> f32) {
    map_slice_portable(src, dst, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn map_slice_avx512(src: &[f32], dst: &mut [f32], f: impl Fn(f32) -> f32) {
    map_slice_portable(src, dst, f)
}

/// A new vector of `len` values that `fill` writes, never zeroed: the outputs are written whole,
/// and a zeroing pass over tens of megabytes per convolution or linear layer showed in their time.
///
/// # Safety
/// `fill` must write every element.
pub(crate) unsafe fn written(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut values: Vec<MaybeUninit<f32>> = Vec::with_capacity(len);
    // SAFETY: `MaybeUninit` values need no initialisation, and the capacity is `len`.
    unsafe { values.set_len(len) };
    fill(&mut values);
    let mut values = std::mem::ManuallyDrop::new(values);
    // SAFETY: every element is initialised (the caller's promise), `MaybeUninit<f32>` has the
    // layout of `f32`, and the allocation is handed over whole.
    unsafe { Vec::from_raw_parts(values.as_mut_ptr().cast::<f32>(), len, values.capacity()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::compare::relative_l2;
    use candle_core::Device;

    #[test]
    fn exp2_is_within_a_few_ulps_of_libm() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -100.0 + 200.0 * i as f32 / 200_000.0;
            let got = exp2(x) as f64;
            let want = (x as f64).exp2();
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 5e-7, "relative error {worst:e}");
        assert_eq!(exp2(f32::NEG_INFINITY), exp2(-126.0));
        assert_eq!(exp2(f32::INFINITY), exp2(126.0));
        assert_eq!(exp2(0.0), 1.0);
    }

    #[test]
    fn the_activations_match_their_definitions() {
        let mut worst = [0f64; 2];
        for i in 0..=100_000 {
            let x = -30.0 + 60.0 * i as f64 / 100_000.0;
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3));
            let want_gelu = 0.5 * x * (1.0 + u.tanh());
            let want_silu = x / (1.0 + (-x).exp());
            for (k, (got, want)) in [
                (gelu_tanh(x as f32), want_gelu),
                (silu(x as f32), want_silu),
            ]
            .into_iter()
            .enumerate()
            {
                // absolute near zero (where both pass through 0), relative elsewhere
                let err = (got as f64 - want).abs() / want.abs().max(1.0);
                worst[k] = worst[k].max(err);
            }
        }
        assert!(worst[0] < 1e-6 && worst[1] < 1e-6, "gelu, silu: {worst:?}");
        assert_eq!(sigmoid(1e30), 1.0);
        assert!(sigmoid(-1e30) < 1e-37);
    }

    /// Both compilations, against candle's own `gelu`, on a tensor that is not contiguous and
    /// spans several chunks.
    #[test]
    fn the_fused_gelu_equals_candles() -> Result<()> {
        let x = Tensor::randn(0f32, 3.0, (CHUNK / 64 + 3, 130), &Device::Cpu)?.t()?;
        let want = x.gelu()?;
        assert!(relative_l2(&gelu(&x)?, &want)? < 1e-6);
        let flat = x.flatten_all()?.to_vec1::<f32>()?;
        for isa in Isa::available() {
            let mut out = vec![0f32; flat.len()];
            map_slice(&flat, &mut out, gelu_tanh, isa);
            let got = Tensor::from_vec(out, x.shape(), &Device::Cpu)?;
            assert!(relative_l2(&got, &want)? < 1e-6);
        }
        Ok(())
    }
}
