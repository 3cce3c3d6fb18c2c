//! Fused scaled dot-product attention for the CPU: queries in blocks, keys in blocks, an online
//! softmax (running maximum and sum per query), so no score matrix is ever held: memory is the
//! inputs, the output and one block of scores per thread. What PyTorch's CPU flash attention
//! does; without it a long clip's self-attention (5,376 tokens for the tiny model's default
//! render) wrote and read a score matrix of hundreds of megabytes per layer.
//!
//! The work is split over `batch · heads · query blocks` with rayon; per block of keys the two
//! products (scores, then probabilities × values) go through the `gemm` crate (its own SIMD
//! kernels, chosen at run time), and the softmax between them is plain slices that LLVM
//! vectorises: on x86-64 compiled a second time for AVX2 and FMA and chosen at run time when the
//! CPU has them, so the portable build stays portable. The exponential is `cpu_math`'s polynomial
//! 2^x, since a libm `exp` per score cost more than the products.

use candle_core::{DType, Device, Result, Tensor, D};
use rayon::prelude::*;

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, Storage};

use crate::model::cpu_math::{exp2, product, written, Isa};

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx;
#[cfg(target_arch = "x86_64")]
mod tiles;

/// Queries per work item: enough rows to reuse each block of keys from cache.
const QUERY_BLOCK: usize = 128;
/// Keys per block of scores.
const KEY_BLOCK: usize = 512;

/// `softmax(q kᵀ / √d) v` and each query's log-sum-exp of its scaled scores (natural log, f32,
/// `(B, H, Lq)`): what [`crate::model::attention`] computes, fused. `q` is `(B, H, Lq, D)`, `k`
/// and `v` `(B, H, Lk, D)`, all on the CPU; the output is in `q`'s dtype (computed in f32).
pub fn attention_with_lse(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    fused(q, k, v, Path::best(q.dim(D::Minus1)?))
}

fn fused(q: &Tensor, k: &Tensor, v: &Tensor, path: Path) -> Result<(Tensor, Tensor)> {
    let (b, h, lq, d) = q.dims4()?;
    let (kb, kh, lk, kd) = k.dims4()?;
    if (kb, kh, kd) != (b, h, d) || v.dims4()? != (b, h, lk, d) {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit together",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if lk == 0 {
        candle_core::bail!("attention over no keys");
    }
    let (q_values, k_values, v_values) = (Values::of(q)?, Values::of(k)?, Values::of(v)?);
    let (qs, ks, vs) = (q_values.get(), k_values.get(), v_values.get());
    #[cfg(target_arch = "x86_64")]
    if matches!(path, Path::Tiles) && !tiles::takes(d) {
        candle_core::bail!("attention: the tile kernel does not take head dimension {d}");
    }
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if matches!(path, Path::Amx) && !amx::takes(d) {
        candle_core::bail!("attention: the AMX kernel does not take head dimension {d}");
    }
    // per head, for AMX the keys and values split and packed, for the tile kernel the keys in
    // panels, for the products the keys as they are
    let (split, head_split) = match path {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        Path::Amx => {
            let per_head = amx::HeadLayout::new(lk, d).len();
            let mut packed = vec![0u16; b * h * per_head];
            packed
                .par_chunks_mut(per_head)
                .zip(ks.par_chunks(lk * d).zip(vs.par_chunks(lk * d)))
                .for_each(|(out, (k, v))| amx::pack_head(k, v, lk, d, out));
            (packed, per_head)
        }
        _ => (Vec::new(), 0),
    };
    let panels = match path {
        #[cfg(target_arch = "x86_64")]
        Path::Tiles => {
            let per_head = lk.div_ceil(tiles::PANEL) * d * tiles::PANEL;
            let mut packed = vec![0f32; b * h * per_head];
            packed
                .par_chunks_mut(per_head)
                .zip(ks.par_chunks(lk * d))
                .for_each(|(out, k)| tiles::pack_keys(k, lk, d, out));
            packed
        }
        _ => Vec::new(),
    };
    let (keys, head_keys): (&[f32], usize) = match path {
        #[cfg(target_arch = "x86_64")]
        Path::Tiles => (&panels, panels.len() / (b * h)),
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        Path::Amx => (&[], 0),
        Path::Products(_) => (ks, lk * d),
    };
    // the softmax in base 2: exp(s) = 2^(s · log2 e), the factor folded into the queries' scale
    let scale = std::f32::consts::LOG2_E / (d as f32).sqrt();
    // a block of queries never crosses heads
    let blocks_per_head = lq.div_ceil(QUERY_BLOCK);
    let items: Vec<(usize, usize)> = (0..b * h)
        .flat_map(|head| (0..blocks_per_head).map(move |blk| (head, blk)))
        .collect();
    let mut lse = Vec::new();
    let fill = |out: &mut [MaybeUninit<f32>], lse: &mut [MaybeUninit<f32>]| {
        let out_ptr = SharedOut(out.as_mut_ptr(), lse.as_mut_ptr());
        items
            .par_iter()
            .for_each_init(Scratch::default, |scratch, &(head, blk)| {
                let row0 = blk * QUERY_BLOCK;
                let rows = QUERY_BLOCK.min(lq - row0);
                let q = &qs[(head * lq + row0) * d..][..rows * d];
                let k = &keys[head * head_keys..][..head_keys];
                let v = &vs[head * lk * d..][..lk * d];
                let split = &split[head * head_split..][..head_split];
                // SAFETY: each (head, block) writes its own disjoint rows of `out` and `lse`,
                // which outlive this parallel loop.
                let (o, l) = unsafe { out_ptr.rows(head * lq + row0, rows, d) };
                run(
                    path,
                    Inputs { q, k, v, split },
                    o,
                    l,
                    Dims { rows, lk, d, scale },
                    scratch,
                );
            });
    };
    // SAFETY: the work items cover every row of both outputs, and every path writes each value
    // of its rows (`run`).
    let out = unsafe {
        written(b * h * lq * d, |out| {
            lse = written(b * h * lq, |lse| fill(out, lse));
        })
    };
    let device = q.device();
    let out = Tensor::from_vec(out, (b, h, lq, d), device)?.to_dtype(q.dtype())?;
    let lse = Tensor::from_vec(lse, (b, h, lq), device)?;
    Ok((out, lse))
}

/// Whether the fused kernel serves attention on `device` (the CPU; other devices keep the
/// chunked path of [`crate::model::attention`]).
pub fn serves(device: &Device) -> bool {
    device.is_cpu()
}

/// A tensor's f32 values: its own storage when it is a contiguous f32 CPU tensor (no copy),
/// else a copy.
enum Values<'a> {
    Borrowed(
        Box<dyn std::ops::Deref<Target = Storage> + 'a>,
        usize,
        usize,
    ),
    Owned(Vec<f32>),
}

impl<'a> Values<'a> {
    fn of(t: &'a Tensor) -> Result<Self> {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(_)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(Values::Borrowed(Box::new(storage), start, end));
        }
        drop(storage);
        Ok(Values::Owned(
            t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
        ))
    }

    fn get(&self) -> &[f32] {
        match self {
            Values::Borrowed(storage, start, end) => match &***storage {
                Storage::Cpu(CpuStorage::F32(values)) => &values[*start..*end],
                _ => unreachable!("borrowed only from f32 CPU storage"),
            },
            Values::Owned(values) => values,
        }
    }
}

/// The output and log-sum-exp buffers, written by many threads at disjoint rows.
#[derive(Clone, Copy)]
struct SharedOut(*mut MaybeUninit<f32>, *mut MaybeUninit<f32>);
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Rows `first .. first + rows` of the output (`d` values each) and of the log-sum-exp.
    ///
    /// # Safety
    /// No two callers may hold overlapping rows at once, and the buffers must outlive the use.
    unsafe fn rows<'a>(
        self,
        first: usize,
        rows: usize,
        d: usize,
    ) -> (&'a mut [MaybeUninit<f32>], &'a mut [MaybeUninit<f32>]) {
        (
            std::slice::from_raw_parts_mut(self.0.add(first * d), rows * d),
            std::slice::from_raw_parts_mut(self.1.add(first), rows),
        )
    }
}

/// One work item's queries (`rows × d`) and its head's keys (`lk × d`, or packed for the tile
/// kernel) and values (`lk × d`), or for the AMX kernel its head's keys and values split and
/// packed (`split`; empty for the other paths).
#[derive(Clone, Copy)]
struct Inputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    split: &'a [u16],
}

#[derive(Clone, Copy)]
struct Dims {
    rows: usize,
    lk: usize,
    d: usize,
    /// log2(e) / √d.
    scale: f32,
}

/// Per-thread buffers: a block of scores, the work item's scaled queries, running maxima, sums,
/// (for the tile kernels) output accumulators and (for AMX) the split queries and probabilities.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    queries: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
    #[cfg_attr(
        not(all(target_arch = "x86_64", target_os = "linux")),
        allow(dead_code)
    )]
    halves: Vec<u16>,
}

/// How a call's blocks are computed.
#[derive(Clone, Copy, Debug)]
enum Path {
    /// Two matrix products per block of keys with the softmax between, through `isa`'s
    /// compilation: any head dimension, any CPU.
    Products(Isa),
    /// The AVX-512 tile kernel ([`tiles`]), for head dimensions of whole registers.
    #[cfg(target_arch = "x86_64")]
    Tiles,
    /// Both products on AMX tiles ([`amx`]), where the process has them.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    Amx,
}

impl Path {
    /// The fastest path this CPU has for head dimension `d`.
    fn best(d: usize) -> Self {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if amx::takes(d) && d >= amx::FASTER_FROM {
            return Path::Amx;
        }
        let isa = Isa::detect();
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 && tiles::takes(d) {
            return Path::Tiles;
        }
        let _ = d;
        Path::Products(isa)
    }

    /// Every path this CPU has for head dimension `d` (for tests that compare them).
    #[cfg(test)]
    fn available(d: usize) -> Vec<Self> {
        let mut all: Vec<Self> = Isa::available().into_iter().map(Path::Products).collect();
        #[cfg(target_arch = "x86_64")]
        if Isa::detect() == Isa::Avx512 && tiles::takes(d) {
            all.push(Path::Tiles);
        }
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if amx::takes(d) {
            all.push(Path::Amx);
        }
        let _ = d;
        all
    }
}

/// One work item through `path`, writing every value of `out` and `lse`.
fn run(
    path: Path,
    inputs: Inputs<'_>,
    out: &mut [MaybeUninit<f32>],
    lse: &mut [MaybeUninit<f32>],
    dims: Dims,
    scratch: &mut Scratch,
) {
    // The products accumulate into their output: it starts at zero.
    let zeroed = |out: &mut [MaybeUninit<f32>], lse: &mut [MaybeUninit<f32>]| {
        out.fill(MaybeUninit::new(0.0));
        lse.fill(MaybeUninit::new(0.0));
        // SAFETY: both were just initialised, and `MaybeUninit<f32>` has `f32`'s layout.
        unsafe {
            (
                std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<f32>(), out.len()),
                std::slice::from_raw_parts_mut(lse.as_mut_ptr().cast::<f32>(), lse.len()),
            )
        }
    };
    // SAFETY (all): the instruction set comes from `Isa::detect`, so the CPU has the features;
    // the tile path is taken only for the head dimensions it takes.
    match path {
        Path::Products(Isa::Portable) => {
            let (out, lse) = zeroed(out, lse);
            block(inputs, out, lse, dims, scratch)
        }
        #[cfg(target_arch = "x86_64")]
        Path::Products(Isa::Avx2Fma) => {
            let (out, lse) = zeroed(out, lse);
            unsafe { block_avx2(inputs, out, lse, dims, scratch) }
        }
        #[cfg(target_arch = "x86_64")]
        Path::Products(Isa::Avx512) => {
            let (out, lse) = zeroed(out, lse);
            unsafe { block_avx512(inputs, out, lse, dims, scratch) }
        }
        #[cfg(target_arch = "x86_64")]
        Path::Tiles => unsafe { tiles::block(inputs, out, lse, dims, scratch) },
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        Path::Amx => unsafe { amx::block(inputs, out, lse, dims, scratch) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(
    inputs: Inputs<'_>,
    out: &mut [f32],
    lse: &mut [f32],
    dims: Dims,
    scratch: &mut Scratch,
) {
    block(inputs, out, lse, dims, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn block_avx512(
    inputs: Inputs<'_>,
    out: &mut [f32],
    lse: &mut [f32],
    dims: Dims,
    scratch: &mut Scratch,
) {
    block(inputs, out, lse, dims, scratch)
}

/// One block of queries against every key, online softmax: per block of keys, the scores by one
/// matrix product, their exponentials and running sums, then the output by another product.
/// `q`: `rows × d`; `k`, `v`: `lk × d`; `out`: `rows × d`; `lse`: `rows`.
#[inline(always)]
fn block(
    Inputs { q, k, v, .. }: Inputs<'_>,
    out: &mut [f32],
    lse: &mut [f32],
    dims: Dims,
    scratch: &mut Scratch,
) {
    let Dims { rows, lk, d, scale } = dims;
    let Scratch {
        scores,
        queries,
        max,
        sum,
        ..
    } = scratch;
    queries.clear();
    queries.extend(q.iter().map(|x| x * scale));
    max.clear();
    max.resize(rows, f32::NEG_INFINITY);
    sum.clear();
    sum.resize(rows, 0.0);
    out.fill(0.0);
    scores.resize(rows * KEY_BLOCK, 0.0);
    let mut start = 0;
    while start < lk {
        let n = KEY_BLOCK.min(lk - start);
        let keys = &k[start * d..][..n * d];
        let values = &v[start * d..][..n * d];
        // scores (rows × n, row-major) = queries (rows × d) · keysᵀ (d × n)
        // SAFETY: every pointer spans the matrix its strides describe (checked above by the
        // slices' lengths), and nothing else writes `scores` meanwhile.
        unsafe {
            product(
                (rows, n, d),
                scores.as_mut_ptr(),
                n,
                false,
                queries.as_ptr(),
                d,
                keys.as_ptr(),
                (1, d),
            );
        }
        for r in 0..rows {
            let s = &mut scores[r * n..][..n];
            let new_max = max[r].max(lanes_max(s));
            let block_sum = exp2_in_place_sum(s, new_max);
            let correction = exp2(max[r] - new_max);
            max[r] = new_max;
            sum[r] = sum[r] * correction + block_sum;
            for x in &mut out[r * d..][..d] {
                *x *= correction;
            }
        }
        // out (rows × d) += probabilities (rows × n) · values (n × d)
        // SAFETY: as above; `out` is this work item's own rows.
        unsafe {
            product(
                (rows, d, n),
                out.as_mut_ptr(),
                d,
                true,
                scores.as_ptr(),
                n,
                values.as_ptr(),
                (d, 1),
            );
        }
        start += n;
    }
    for r in 0..rows {
        let inv = 1.0 / sum[r];
        for x in &mut out[r * d..][..d] {
            *x *= inv;
        }
        // back to the natural log
        lse[r] = (max[r] + sum[r].log2()) * std::f32::consts::LN_2;
    }
}

/// Lanes of partial results: reductions in sixteen independent lanes vectorise (one AVX-512
/// register, two AVX2 ones) (one running
/// value would fix the order of the additions, and LLVM keeps that order).
const LANES: usize = 16;

/// The largest of `xs`.
#[inline(always)]
fn lanes_max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    acc.iter().fold(tail, |m, &x| m.max(x))
}

/// Replaces each `x` of `xs` by 2^(x − `max`) and returns their sum.
#[inline(always)]
fn exp2_in_place_sum(xs: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *x = exp2(*x - max);
            *a += *x;
        }
    }
    let mut total: f32 = 0.0;
    for x in chunks.into_remainder() {
        *x = exp2(*x - max);
        total += *x;
    }
    total + acc.iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention::attention_unchunked;
    use crate::model::compare::relative_l2;

    /// Odd sizes (ragged query tiles, query and key blocks; head dims of 8 and 24, which only
    /// the products take, and 16 to 128, which the tile kernel takes), and every kernel.
    #[test]
    fn fused_attention_equals_the_score_matrix_reference() -> Result<()> {
        let dev = Device::Cpu;
        for (b, h, lq, lk, d) in [
            (2, 3, 37, 29, 8),
            (1, 2, 300, 600, 16),
            (1, 1, 5, 1, 24),
            (1, 1, 5, 1, 16),
            (2, 1, 131, 257, 32),
            (1, 2, 70, 133, 48),
            (1, 2, 45, 300, 64),
            (1, 1, 13, 140, 80),
            (1, 1, 9, 77, 96),
            (1, 1, 10, 129, 112),
            (2, 2, 29, 200, 128),
        ] {
            // seeded, so that a run's rounding is every run's
            let normal = |stream: u64, scale: f64, l: usize| -> Result<Tensor> {
                let values = crate::model::noise::gaussian(d as u64, stream, 0, b * h * l * d);
                Tensor::from_vec(values, (b, h, l, d), &dev)? * scale
            };
            let (q, k, v) = (
                normal(0, 2.0, lq)?,
                normal(1, 2.0, lk)?,
                normal(2, 1.0, lk)?,
            );
            let want = attention_unchunked(&q, &k, &v)?;
            let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
            let max = scores.max_keepdim(3)?;
            let want_lse =
                (scores.broadcast_sub(&max)?.exp()?.sum_keepdim(3)?.log()? + max)?.squeeze(3)?;
            for path in Path::available(d) {
                let (got, lse) = fused(&q, &k, &v, path)?;
                let err = relative_l2(&got, &want)?;
                // the f32 rounding of sums over up to 128 channels, on either side; on AMX
                // tiles the bf16×3 products' (16 bits of each operand), on scores of up to ±20
                let (bound, lse_bound) = match path {
                    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
                    Path::Amx => (3e-5, 1e-5),
                    _ => (2e-6, 1e-6),
                };
                assert!(
                    err < bound,
                    "{path:?} {:?}: relative L2 {err:e}",
                    (b, h, lq, lk, d)
                );
                let lse_err = relative_l2(&lse, &want_lse)?;
                assert!(lse_err < lse_bound, "{path:?}: log-sum-exp {lse_err:e}");
            }
        }
        Ok(())
    }
}
