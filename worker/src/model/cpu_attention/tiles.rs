//! The attention's register-tiled kernel for AVX-512, for head dimensions that are whole
//! registers (16 · 1..=8 channels): a tile of queries against a block of keys at a time, every
//! partial result in registers or in a few kilobytes of scores that stay in L1.
//!
//! Why not two matrix products with a softmax between (the portable path): at the tiny model's
//! head dimension of 16 a product has 16 multiply-adds per score, so writing the block's scores
//! out, reading them for the softmax and again for the second product (and gemm packing both
//! operands) cost more than the arithmetic. Here the keys are stored transposed in panels of 16,
//! so a query's scores against a panel are `d` multiply-adds of one broadcast channel by one
//! panel row, with no horizontal sums; each value row is loaded once per tile and multiplied
//! into every query's accumulators.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::{Dims, Inputs, Scratch};
use crate::model::cpu_math::{exp2, EXP2_POLY};

/// Keys per panel: one register's lanes.
pub(super) const PANEL: usize = 16;
/// Keys per block: a block's key panels and value rows (16 KiB at head dimension 16, 64 KiB at
/// 64) stay in cache while every query tile of a work item passes over them.
pub(super) const KEY_BLOCK: usize = 128;

/// Whether the tile kernel takes this head dimension.
pub(super) fn takes(d: usize) -> bool {
    d.is_multiple_of(PANEL) && (1..=8).contains(&(d / PANEL))
}

/// `k` (`lk × d`, row-major) in panels of 16 keys: panel `p` holds, channel by channel, the
/// 16 keys' values (`out[(p · d + c) · 16 + lane]` = key `16p + lane`, channel `c`); the last
/// panel's missing keys are zero. `out` has `lk.div_ceil(16) · d · 16` values.
pub(super) fn pack_keys(k: &[f32], lk: usize, d: usize, out: &mut [f32]) {
    out.fill(0.0);
    for (key, row) in k.chunks_exact(d).take(lk).enumerate() {
        let (panel, lane) = (key / PANEL, key % PANEL);
        let base = panel * d * PANEL + lane;
        for (c, &x) in row.iter().enumerate() {
            out[base + c * PANEL] = x;
        }
    }
}

/// One block of queries (`inputs.q`, `rows × d`) against every key of its head (`inputs.k`: the
/// head's keys packed by [`pack_keys`], `inputs.v`: its `lk × d` values), the tile kernel's
/// version of the portable `block`.
///
/// # Safety
/// The CPU must have AVX-512F, and [`takes`]`(d)`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn block(
    inputs: Inputs<'_>,
    out: &mut [MaybeUninit<f32>],
    lse: &mut [MaybeUninit<f32>],
    dims: Dims,
    scratch: &mut Scratch,
) {
    // tile rows: as many queries as keep their output accumulators and one value row in the 32
    // registers; key panels per step of the scores: as many as keep 12-16 chains of
    // multiply-adds in flight
    match dims.d / PANEL {
        1 => tiled::<1, 8, 2>(inputs, out, lse, dims, scratch),
        2 => tiled::<2, 8, 2>(inputs, out, lse, dims, scratch),
        3 => tiled::<3, 8, 2>(inputs, out, lse, dims, scratch),
        4 => tiled::<4, 6, 2>(inputs, out, lse, dims, scratch),
        5 => tiled::<5, 4, 4>(inputs, out, lse, dims, scratch),
        6 => tiled::<6, 4, 4>(inputs, out, lse, dims, scratch),
        7 => tiled::<7, 3, 4>(inputs, out, lse, dims, scratch),
        8 => tiled::<8, 3, 4>(inputs, out, lse, dims, scratch),
        _ => unreachable!("the tile kernel takes head dimensions of 16 to 128 in steps of 16"),
    }
}

/// [`block`] in tiles of `QI` queries of `DR` registers each, scores `KP` panels at a time; key blocks outermost, so that a
/// block's panels and values are reused from cache by every tile.
#[target_feature(enable = "avx512f")]
unsafe fn tiled<const DR: usize, const QI: usize, const KP: usize>(
    Inputs {
        q, k: panels, v, ..
    }: Inputs<'_>,
    out: &mut [MaybeUninit<f32>],
    lse: &mut [MaybeUninit<f32>],
    Dims { rows, lk, d, scale }: Dims,
    scratch: &mut Scratch,
) {
    let tiles = rows.div_ceil(QI);
    let Scratch {
        scores,
        queries,
        max,
        sum,
        acc,
        ..
    } = scratch;
    // the queries scaled, the last tile padded with zero queries (their outputs are dropped)
    queries.clear();
    queries.extend(q.iter().map(|x| x * scale));
    queries.resize(tiles * QI * d, 0.0);
    acc.clear();
    acc.resize(tiles * QI * d, 0.0);
    max.clear();
    max.resize(tiles * QI, f32::NEG_INFINITY);
    sum.clear();
    sum.resize(tiles * QI, 0.0);
    scores.resize(QI * KEY_BLOCK, 0.0);
    for start in (0..lk).step_by(KEY_BLOCK) {
        let nk = KEY_BLOCK.min(lk - start);
        let block_panels = &panels[start / PANEL * d * PANEL..];
        let values = &v[start * d..];
        for t in 0..tiles {
            attend_block::<DR, QI, KP>(
                &queries[t * QI * d..],
                block_panels,
                values,
                nk,
                TileState {
                    max: &mut max[t * QI..][..QI],
                    sum: &mut sum[t * QI..][..QI],
                    acc: &mut acc[t * QI * d..][..QI * d],
                },
                scores,
            );
        }
    }
    for r in 0..rows {
        let inv = 1.0 / sum[r];
        for (o, a) in out[r * d..][..d].iter_mut().zip(&acc[r * d..][..d]) {
            o.write(a * inv);
        }
        // back to the natural log
        lse[r].write((max[r] + sum[r].log2()) * std::f32::consts::LN_2);
    }
}

/// The running state of one tile's `QI` queries: the maxima and sums of their scaled scores
/// (base 2) and their unnormalised outputs (`QI × d`).
struct TileState<'a> {
    max: &'a mut [f32],
    sum: &'a mut [f32],
    acc: &'a mut [f32],
}

/// Attends `QI` queries (`q`: `QI × d`, already scaled by log2(e)/√d) to one block of `nk ≤
/// KEY_BLOCK` keys (`panels`: their packed panels, `v`: their `nk × d` value rows), updating
/// `state` by the online softmax; `scores` is `QI × KEY_BLOCK` of scratch.
///
/// # Safety
/// The CPU must have AVX-512F; `panels` must hold `nk.div_ceil(16) · d · 16` values.
#[target_feature(enable = "avx512f")]
unsafe fn attend_block<const DR: usize, const QI: usize, const KP: usize>(
    q: &[f32],
    panels: &[f32],
    v: &[f32],
    nk: usize,
    state: TileState<'_>,
    scores: &mut [f32],
) {
    let d = DR * PANEL;
    assert!(q.len() >= QI * d && v.len() >= nk * d && state.acc.len() >= QI * d);
    assert!(state.max.len() >= QI && state.sum.len() >= QI);
    assert!(panels.len() >= nk.div_ceil(PANEL) * d * PANEL && scores.len() >= QI * KEY_BLOCK);
    assert!(nk <= KEY_BLOCK);
    let (q, panels, v, scores) = (q.as_ptr(), panels.as_ptr(), v.as_ptr(), scores.as_mut_ptr());
    let n_panels = nk.div_ceil(PANEL);
    let last_lanes: __mmask16 = match nk % PANEL {
        0 => 0xFFFF,
        r => (1u16 << r) - 1,
    };
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);

    // Scores, `KP` panels at a time (12-16 independent chains of multiply-adds: one panel's 3-8
    // chains left the FMA units waiting on their latency, the kernel 1.4x slower), and each
    // query's lane-wise maximum.
    let mut lane_max = [neg_inf; QI];
    let mut keep = |p: usize, s: &[__m512; QI]| {
        let valid = if p + 1 == n_panels {
            last_lanes
        } else {
            0xFFFF
        };
        for (i, s) in s.iter().enumerate() {
            // the last panel's missing keys score −∞, so they change no maximum
            let s = _mm512_mask_blend_ps(valid, neg_inf, *s);
            _mm512_storeu_ps(scores.add(i * KEY_BLOCK + p * PANEL), s);
            lane_max[i] = _mm512_max_ps(lane_max[i], s);
        }
    };
    let mut p = 0;
    while p + KP <= n_panels {
        let s = panel_scores::<QI, KP>(q, panels.add(p * d * PANEL), d);
        for (t, s) in s.iter().enumerate() {
            keep(p + t, s);
        }
        p += KP;
    }
    while p < n_panels {
        let [s] = panel_scores::<QI, 1>(q, panels.add(p * d * PANEL), d);
        keep(p, &s);
        p += 1;
    }

    // Each query's new maximum, the rescaling of what it held, and its probabilities in place.
    let mut correction = [0f32; QI];
    for i in 0..QI {
        let new_max = state.max[i].max(_mm512_reduce_max_ps(lane_max[i]));
        correction[i] = exp2(state.max[i] - new_max);
        state.max[i] = new_max;
        let new_max = _mm512_set1_ps(new_max);
        let mut total = _mm512_setzero_ps();
        for p in 0..n_panels {
            let at = scores.add(i * KEY_BLOCK + p * PANEL);
            let valid = if p + 1 == n_panels {
                last_lanes
            } else {
                0xFFFF
            };
            let e = _mm512_maskz_mov_ps(
                valid,
                exp2_lanes(_mm512_sub_ps(_mm512_loadu_ps(at), new_max)),
            );
            _mm512_storeu_ps(at, e);
            total = _mm512_add_ps(total, e);
        }
        state.sum[i] = state.sum[i] * correction[i] + _mm512_reduce_add_ps(total);
    }

    // Outputs: rescaled, then every value row times each query's probability of it.
    let acc = state.acc.as_mut_ptr();
    let mut out = [[_mm512_setzero_ps(); DR]; QI];
    for (i, row) in out.iter_mut().enumerate() {
        let c = _mm512_set1_ps(correction[i]);
        for (r, o) in row.iter_mut().enumerate() {
            *o = _mm512_mul_ps(_mm512_loadu_ps(acc.add(i * d + r * PANEL)), c);
        }
    }
    for j in 0..nk {
        let mut value = [_mm512_setzero_ps(); DR];
        for (r, x) in value.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(v.add(j * d + r * PANEL));
        }
        for (i, row) in out.iter_mut().enumerate() {
            let p = _mm512_set1_ps(*scores.add(i * KEY_BLOCK + j));
            for (o, x) in row.iter_mut().zip(&value) {
                *o = _mm512_fmadd_ps(p, *x, *o);
            }
        }
    }
    for (i, row) in out.iter().enumerate() {
        for (r, o) in row.iter().enumerate() {
            _mm512_storeu_ps(acc.add(i * d + r * PANEL), *o);
        }
    }
}

/// The scores of `QI` queries (`q`, `QI × d`) against `KP` consecutive panels of keys.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn panel_scores<const QI: usize, const KP: usize>(
    q: *const f32,
    panels: *const f32,
    d: usize,
) -> [[__m512; QI]; KP] {
    let mut s = [[_mm512_setzero_ps(); QI]; KP];
    for c in 0..d {
        let keys: [__m512; KP] =
            std::array::from_fn(|t| _mm512_loadu_ps(panels.add((t * d + c) * PANEL)));
        for i in 0..QI {
            let query = _mm512_set1_ps(*q.add(i * d + c));
            for (s, keys) in s.iter_mut().zip(&keys) {
                s[i] = _mm512_fmadd_ps(query, *keys, s[i]);
            }
        }
    }
    s
}

/// [`exp2`] of 16 lanes, the same arithmetic (so the same bits) for x in [−126, 0]: x = n + f
/// with n the nearest integer, the polynomial in f, then 2^n by `vscalefps`. No clamp: the scores
/// minus their maximum are never above 0, and below −126 `vscalefps` goes to 0 on its own (−∞,
/// the missing keys' score, gives NaN, which the caller masks).
#[target_feature(enable = "avx512f")]
pub(super) fn exp2_lanes(x: __m512) -> __m512 {
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
    let f = _mm512_sub_ps(x, n);
    let mut p = _mm512_set1_ps(EXP2_POLY[5]);
    for &c in EXP2_POLY[..5].iter().rev() {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lanes_exp2_has_the_scalar_bits() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let lanes_exp2 = |xs: &[f32]| -> Vec<f32> {
            xs.chunks(PANEL)
                .flat_map(|chunk| {
                    let mut lanes = [0f32; PANEL];
                    lanes[..chunk.len()].copy_from_slice(chunk);
                    let mut got = [0f32; PANEL];
                    // SAFETY: the CPU has AVX-512F (checked above).
                    unsafe {
                        _mm512_storeu_ps(
                            got.as_mut_ptr(),
                            exp2_lanes(_mm512_loadu_ps(lanes.as_ptr())),
                        )
                    };
                    got.into_iter().take(chunk.len())
                })
                .collect()
        };
        let xs: Vec<f32> = (0..=64_000)
            .map(|i| -126.0 + 126.0 * i as f32 / 64_000.0)
            .chain([-0.5, -1.5, -2.5, -125.5])
            .collect();
        for (x, got) in xs.iter().zip(lanes_exp2(&xs)) {
            assert_eq!(got.to_bits(), exp2(*x).to_bits(), "2^{x}");
        }
        // below the scalar's clamp: towards 0, never above 2^−126
        for got in lanes_exp2(&[-126.5, -140.0, -1e4, -1e30]) {
            assert!((0.0..=exp2(-126.0)).contains(&got), "{got:e}");
        }
    }
}
