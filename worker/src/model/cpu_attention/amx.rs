//! The attention's kernel on AMX tiles ([`crate::model::cpu_amx`]): per block of keys, both
//! products (scores = queries · keysᵀ, outputs += probabilities · values) as bf16×3 tile
//! products, the online softmax between them in AVX-512 registers.
//!
//! Why: the AVX-512 tile kernel ([`super::tiles`]) spends `2d` multiply-adds per score, all on the
//! vector units; at the mid model's head dimension of 64 that was a third of its forward, and at
//! the tiny model's 16 (where the exponential weighs as much as the products) three quarters. The
//! tiles do the products several times faster and leave the vector units the softmax: an
//! exponential per score and the split of each probability into its two bf16 parts. That pays
//! from head dimension 32 ([`FASTER_FROM`]); at 16 the split and the tiles' loads and stores cost
//! what the products save, and the AVX-512 kernel serves.
//!
//! Layout: a head's keys and values are split and laid out once per call ([`pack_head`]), in
//! chunks of 32 keys: the keys as the right operand of the scores (rows of channel pairs, columns
//! of keys), the values as the right operand of the outputs (rows of key pairs, columns of
//! channels); the head dimension is padded with zero channels to whole 32-channel steps. A tile
//! of 16 queries meets a block of keys at a time: its scores (16 × [`KEY_BLOCK`]) go through the
//! softmax into probabilities split into bf16 parts, laid out as the left operand of the second
//! product, and its unnormalised outputs are loaded into tiles, accumulated and stored back. Every
//! output row depends on its own query only, so a row gives the same bits whichever work item
//! holds it (the sequence-parallel paths cut queries differently from the single process).

use std::arch::asm;
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::tiles::exp2_lanes;
use super::{Dims, Inputs, Scratch};
use crate::model::cpu_amx::{self, configure_full_tiles, release_tiles};
use crate::model::cpu_math::exp2;

/// Keys per pair of score tiles, and per step of the outputs' product (a tile's inner size).
const CHUNK: usize = 32;
/// Queries per tile.
const ROWS: usize = 16;
/// Keys per block of scores: a tile's scores (16 KiB) and split probabilities (16 KiB) stay in L1
/// between the two products.
pub(super) const KEY_BLOCK: usize = 256;
/// bf16 values per tile (16 rows × 32).
const TILE: usize = 512;
/// Bytes per tile row.
const TILE_ROW: usize = 64;

/// Whether this process runs attention of head dimension `d` on the tiles: AMX granted, the
/// AVX-512 BF16 conversions, and `d` a whole number of 16-channel output tiles up to 128.
pub(super) fn takes(d: usize) -> bool {
    static BF16: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let bf16 = *BF16.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512bw")
    });
    bf16 && cpu_amx::available() && d.is_multiple_of(16) && (16..=128).contains(&d)
}

/// The smallest head dimension at which the tiles beat the AVX-512 kernel: at 16 (the built-in
/// tiny model's) a score has 32 multiply-adds to the softmax's exponential and split, and the
/// tiles' loads and stores around them cost what the products saved (`cargo bench -p
/// longtake-worker --bench model attention`: 74 ms against 70 on the tiny model's shape; at 32,
/// the toy model's, 27-28 against 31-32; at 64, 20 against 28).
pub(super) const FASTER_FROM: usize = 32;

/// Where a head's tiles lie in its packed run of bf16 values.
#[derive(Clone, Copy)]
pub(super) struct HeadLayout {
    lk: usize,
    d: usize,
}

impl HeadLayout {
    pub(super) fn new(lk: usize, d: usize) -> Self {
        Self { lk, d }
    }

    fn chunks(self) -> usize {
        self.lk.div_ceil(CHUNK)
    }

    /// 32-channel steps of the scores' product.
    fn steps(self) -> usize {
        self.d.div_ceil(CHUNK)
    }

    /// 16-channel tiles of the output.
    fn channel_tiles(self) -> usize {
        self.d / 16
    }

    fn key_values(self) -> usize {
        self.chunks() * self.steps() * 4 * TILE
    }

    /// bf16 values in a head's packed run.
    pub(super) fn len(self) -> usize {
        self.key_values() + self.chunks() * self.channel_tiles() * 2 * TILE
    }

    /// The keys' tile for chunk `chunk`, channel step `step`, 16-key panel `panel` (0 or 1),
    /// part `part` (0: hi, 1: lo).
    fn key(self, chunk: usize, step: usize, panel: usize, part: usize) -> usize {
        (((chunk * self.steps() + step) * 2 + panel) * 2 + part) * TILE
    }

    /// The values' tile for chunk `chunk`, 16-channel output tile `tile`, part `part`.
    fn value(self, chunk: usize, tile: usize, part: usize) -> usize {
        self.key_values() + ((chunk * self.channel_tiles() + tile) * 2 + part) * TILE
    }
}

/// Where value `(row, column)` of an operand's 32-deep step lies in its tile (the VNNI layout:
/// tile row `row / 2` holds each column's pair of rows).
fn slot(row: usize, column: usize) -> usize {
    (row / 2) * 32 + column * 2 + row % 2
}

/// One head's keys and values (`lk × d` each, row-major) split and laid out for [`block`]: split
/// in vector registers first ([`cpu_amx::split_values`]), then the bf16 parts moved into place.
pub(super) fn pack_head(k: &[f32], v: &[f32], lk: usize, d: usize, out: &mut [u16]) {
    let layout = HeadLayout::new(lk, d);
    assert!(out.len() == layout.len() && k.len() >= lk * d && v.len() >= lk * d);
    out.fill(0);
    let mut parts = [vec![0u16; lk * d], vec![0u16; lk * d]];
    let [hi, lo] = &mut parts;
    cpu_amx::split_values(&k[..lk * d], hi, lo);
    for (part, split) in parts.iter().enumerate() {
        for (key, row) in split.chunks_exact(d).enumerate() {
            let (chunk, panel, column) = (key / CHUNK, key % CHUNK / 16, key % 16);
            for step in 0..layout.steps() {
                let tile = &mut out[layout.key(chunk, step, panel, part)..][..TILE];
                let channels = &row[step * CHUNK..(step * CHUNK + CHUNK).min(d)];
                for (pair, xs) in channels.chunks_exact(2).enumerate() {
                    tile[slot(2 * pair, column)..][..2].copy_from_slice(xs);
                }
            }
        }
    }
    let [hi, lo] = &mut parts;
    cpu_amx::split_values(&v[..lk * d], hi, lo);
    for (part, split) in parts.iter().enumerate() {
        for (pair, rows) in split.chunks(2 * d).enumerate() {
            let (chunk, depth) = (pair * 2 / CHUNK, pair * 2 % CHUNK);
            for (within, row) in rows.chunks_exact(d).enumerate() {
                for (tile, channels) in row.chunks_exact(16).enumerate() {
                    let at = layout.value(chunk, tile, part) + slot(depth + within, 0);
                    for (column, &x) in channels.iter().enumerate() {
                        out[at + 2 * column] = x;
                    }
                }
            }
        }
    }
}

/// One block of queries (`q`, `rows × d`) against every key of its head (`split`: the head's
/// run from [`pack_head`]), the tiles' version of the portable `block`.
///
/// # Safety
/// [`takes`]`(d)` held.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn block(
    Inputs {
        q, split: packed, ..
    }: Inputs<'_>,
    out: &mut [MaybeUninit<f32>],
    lse: &mut [MaybeUninit<f32>],
    Dims { rows, lk, d, scale }: Dims,
    scratch: &mut Scratch,
) {
    let layout = HeadLayout::new(lk, d);
    assert!(packed.len() >= layout.len() && q.len() >= rows * d && out.len() >= rows * d);
    let padded = layout.steps() * CHUNK;
    let tiles = rows.div_ceil(ROWS);
    let Scratch {
        scores,
        max,
        sum,
        acc,
        halves,
        ..
    } = scratch;
    // the queries scaled and split, padded with zero channels and zero rows (whose outputs are
    // dropped); then two buffers of probabilities, each row's two parts side by side
    let query_values = tiles * ROWS * padded;
    let probability_values = ROWS * 2 * KEY_BLOCK;
    halves.clear();
    halves.resize(2 * query_values + 2 * probability_values, 0);
    let (q_hi, rest) = halves.split_at_mut(query_values);
    let (q_lo, probs) = rest.split_at_mut(query_values);
    for (r, row) in q.chunks_exact(d).take(rows).enumerate() {
        scores.clear();
        scores.extend(row.iter().map(|x| x * scale));
        let at = r * padded;
        cpu_amx::split_values(scores, &mut q_hi[at..at + d], &mut q_lo[at..at + d]);
    }
    acc.clear();
    acc.resize(tiles * ROWS * d, 0.0);
    max.clear();
    max.resize(tiles * ROWS, f32::NEG_INFINITY);
    sum.clear();
    sum.resize(tiles * ROWS, 0.0);
    scores.clear();
    scores.resize(2 * ROWS * KEY_BLOCK, 0.0);
    let (scores, probs, acc_ptr) = (scores.as_mut_ptr(), probs.as_mut_ptr(), acc.as_mut_ptr());
    let score_buffer = |t: usize| scores.add(t % 2 * ROWS * KEY_BLOCK);
    let probability_buffer = |t: usize| probs.add(t % 2 * probability_values);
    let (q_hi, q_lo, packed) = (q_hi.as_ptr(), q_lo.as_ptr(), packed.as_ptr());
    let tile_acc = |t: usize| acc_ptr.add(t * ROWS * d);
    configure_full_tiles();
    for start in (0..lk).step_by(KEY_BLOCK) {
        let keys = KEY_BLOCK.min(lk - start);
        let span = Span {
            first: start / CHUNK,
            chunks: keys.div_ceil(CHUNK),
            keys,
        };
        let scores_of = |t: usize| {
            let queries = t * ROWS * padded;
            tile_scores(
                q_hi.add(queries),
                q_lo.add(queries),
                padded,
                packed,
                layout,
                span,
                score_buffer(t),
            )
        };
        // Pipelined, two buffers each of scores and probabilities: the tiles compute the next
        // tile's scores while the vector units take this tile's softmax, and a tile's outputs are
        // accumulated one softmax after its probabilities were stored (a tile load waits for the
        // stores of what it reads to leave the store buffer; it is not forwarded from them).
        scores_of(0);
        for t in 0..tiles {
            if t + 1 < tiles {
                scores_of(t + 1);
            }
            probabilities(
                score_buffer(t),
                span,
                TileState {
                    max: max.as_mut_ptr().add(t * ROWS),
                    sum: sum.as_mut_ptr().add(t * ROWS),
                    acc: tile_acc(t),
                    d,
                },
                probability_buffer(t),
            );
            if t > 0 {
                tile_outputs(
                    probability_buffer(t - 1),
                    packed,
                    layout,
                    span,
                    tile_acc(t - 1),
                );
            }
        }
        tile_outputs(
            probability_buffer(tiles - 1),
            packed,
            layout,
            span,
            tile_acc(tiles - 1),
        );
    }
    release_tiles();
    for r in 0..rows {
        let inv = 1.0 / sum[r];
        for (o, a) in out[r * d..][..d].iter_mut().zip(&acc[r * d..][..d]) {
            o.write(a * inv);
        }
        // back to the natural log
        lse[r].write((max[r] + sum[r].log2()) * std::f32::consts::LN_2);
    }
}

/// A block of keys: its first chunk in the head, its chunks, its keys.
#[derive(Clone, Copy)]
struct Span {
    first: usize,
    chunks: usize,
    keys: usize,
}

/// A tile's running maxima and sums of its scaled scores (base 2) (16 each) and its unnormalised
/// outputs (`16 × d`), in its work item's buffers.
struct TileState {
    max: *mut f32,
    sum: *mut f32,
    acc: *mut f32,
    d: usize,
}

/// The scores of 16 queries (their split values, `padded` channels a row) against a block of
/// keys into `scores` (16 × [`KEY_BLOCK`]); the padding keys of the last chunk score 0.
///
/// # Safety
/// The tiles are configured; the pointers span what the layout and the span say.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tile_scores(
    q_hi: *const u16,
    q_lo: *const u16,
    padded: usize,
    packed: *const u16,
    layout: HeadLayout,
    span: Span,
    scores: *mut f32,
) {
    let query_stride = padded * 2;
    let score_stride = KEY_BLOCK * 4;
    for c in 0..span.chunks {
        asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
        for step in 0..layout.steps() {
            let chunk = span.first + c;
            let k0 = packed.add(layout.key(chunk, step, 0, 0));
            let k1 = packed.add(layout.key(chunk, step, 1, 0));
            // hi·hi, lo·hi, hi·lo into each of the two panels' scores
            asm!(
                "tileloadd tmm2, [{qh} + {qs}*1]", "tileloadd tmm3, [{ql} + {qs}*1]",
                "tileloadd tmm4, [{k0h} + {ts}*1]", "tileloadd tmm6, [{k1h} + {ts}*1]",
                "tdpbf16ps tmm0, tmm2, tmm4", "tdpbf16ps tmm1, tmm2, tmm6",
                "tileloadd tmm5, [{k0l} + {ts}*1]", "tileloadd tmm7, [{k1l} + {ts}*1]",
                "tdpbf16ps tmm0, tmm3, tmm4", "tdpbf16ps tmm1, tmm3, tmm6",
                "tdpbf16ps tmm0, tmm2, tmm5", "tdpbf16ps tmm1, tmm2, tmm7",
                qh = in(reg) q_hi.add(step * CHUNK), ql = in(reg) q_lo.add(step * CHUNK),
                qs = in(reg) query_stride,
                k0h = in(reg) k0, k0l = in(reg) k0.add(TILE),
                k1h = in(reg) k1, k1l = in(reg) k1.add(TILE),
                ts = in(reg) TILE_ROW, options(nostack, readonly));
        }
        let at = scores.add(c * CHUNK);
        asm!("tilestored [{a} + {s}*1], tmm0", "tilestored [{b} + {s}*1], tmm1",
             a = in(reg) at, b = in(reg) at.add(16), s = in(reg) score_stride, options(nostack));
    }
}

/// The online softmax of a tile's block of scores (16 × [`KEY_BLOCK`]): each query's new maximum,
/// the rescaling of its sum and outputs, and its probabilities split into bf16 parts (`probs`:
/// row `i`'s `hi` part at `2i · KEY_BLOCK`, its `lo` part after it; zero past the block's keys up
/// to its last whole chunk).
///
/// # Safety
/// The pointers span what the comments say.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn probabilities(scores: *const f32, span: Span, state: TileState, probs: *mut u16) {
    let TileState { max, sum, acc, d } = state;
    let vectors = span.keys.div_ceil(16);
    let last: __mmask16 = match span.keys % 16 {
        0 => 0xFFFF,
        r => (1u16 << r) - 1,
    };
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in 0..ROWS {
        let row = scores.add(i * KEY_BLOCK);
        let mut lane_max = neg_inf;
        for v in 0..vectors {
            let mask = if v + 1 == vectors { last } else { 0xFFFF };
            lane_max = _mm512_max_ps(
                lane_max,
                _mm512_mask_loadu_ps(neg_inf, mask, row.add(v * 16)),
            );
        }
        let (max, sum) = (&mut *max.add(i), &mut *sum.add(i));
        let new_max = max.max(_mm512_reduce_max_ps(lane_max));
        let correction = exp2(*max - new_max);
        *max = new_max;
        let new_max = _mm512_set1_ps(new_max);
        let mut total = _mm512_setzero_ps();
        let hi = probs.add(2 * i * KEY_BLOCK);
        let lo = hi.add(KEY_BLOCK);
        let probability = |v: usize| {
            if v < vectors {
                let mask = if v + 1 == vectors { last } else { 0xFFFF };
                _mm512_maskz_mov_ps(
                    mask,
                    exp2_lanes(_mm512_sub_ps(_mm512_loadu_ps(row.add(v * 16)), new_max)),
                )
            } else {
                _mm512_setzero_ps()
            }
        };
        for c in 0..span.chunks {
            let (e0, e1) = (probability(2 * c), probability(2 * c + 1));
            total = _mm512_add_ps(total, _mm512_add_ps(e0, e1));
            let (h, l) = split_pair(e0, e1);
            _mm512_storeu_si512(hi.add(c * CHUNK).cast(), h);
            _mm512_storeu_si512(lo.add(c * CHUNK).cast(), l);
        }
        *sum = *sum * correction + _mm512_reduce_add_ps(total);
        let correction = _mm512_set1_ps(correction);
        let acc = acc.add(i * d);
        for c in (0..d).step_by(16) {
            _mm512_storeu_ps(
                acc.add(c),
                _mm512_mul_ps(_mm512_loadu_ps(acc.add(c)), correction),
            );
        }
    }
}

/// 32 non-negative finite values (`e0` then `e1`) as `hi + lo` in bf16: `hi` their top 16 bits
/// (truncated), `lo` the exact rest rounded to the nearest bf16, so 16 bits of mantissa between
/// them (an error below 2^-16 of the value). Truncating `hi` costs the rounded split's last bit
/// and saves its conversions: a mask and a subtraction per 16 values, one permutation per 32
/// (the split and its stores were a third of the kernel at head dimension 16).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn split_pair(e0: __m512, e1: __m512) -> (__m512i, __m512i) {
    let top = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
    let rest = |e: __m512| {
        _mm512_sub_ps(
            e,
            _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(e), top)),
        )
    };
    // the odd 16-bit words (each value's top half) of `e0`, then of `e1`
    let odd_words = _mm512_set_epi16(
        63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27, 25, 23, 21, 19,
        17, 15, 13, 11, 9, 7, 5, 3, 1,
    );
    let hi = _mm512_permutex2var_epi16(_mm512_castps_si512(e0), odd_words, _mm512_castps_si512(e1));
    // SAFETY: `__m512bh` and `__m512i` are both 512 bits of plain data.
    let lo: __m512i = unsafe { std::mem::transmute(_mm512_cvtne2ps_pbh(rest(e1), rest(e0))) };
    (hi, lo)
}

/// A tile's outputs (`acc`, 16 × `d` f32, already rescaled) plus its probabilities times the
/// block's values, up to four 16-channel tiles at a time.
///
/// # Safety
/// The tiles are configured; the pointers span what the layout and the span say.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tile_outputs(
    probs: *const u16,
    packed: *const u16,
    layout: HeadLayout,
    span: Span,
    acc: *mut f32,
) {
    let acc_stride = layout.d * 4;
    let p_stride = 2 * KEY_BLOCK * 2;
    let channel_tiles = layout.channel_tiles();
    for group in (0..channel_tiles).step_by(4) {
        let n = (channel_tiles - group).min(4);
        let at = |t: usize| acc.add((group + t) * 16);
        // the outputs into tmm0..tmm(n-1)
        macro_rules! outputs {
            ($op:literal, $($t:literal),*) => {
                $(if $t < n {
                    asm!(concat!($op, " tmm", $t, ", [{a} + {s}*1]"),
                         a = in(reg) at($t), s = in(reg) acc_stride, options(nostack, readonly));
                })*
            };
        }
        outputs!("tileloadd", 0, 1, 2, 3);
        for c in 0..span.chunks {
            asm!("tileloadd tmm4, [{h} + {s}*1]", "tileloadd tmm5, [{l} + {s}*1]",
                 h = in(reg) probs.add(c * CHUNK), l = in(reg) probs.add(KEY_BLOCK + c * CHUNK),
                 s = in(reg) p_stride, options(nostack, readonly));
            macro_rules! accumulate {
                ($($t:literal),*) => {
                    $(if $t < n {
                        let v = packed.add(layout.value(span.first + c, group + $t, 0));
                        asm!("tileloadd tmm6, [{vh} + {s}*1]", "tileloadd tmm7, [{vl} + {s}*1]",
                             concat!("tdpbf16ps tmm", $t, ", tmm4, tmm6"),
                             concat!("tdpbf16ps tmm", $t, ", tmm5, tmm6"),
                             concat!("tdpbf16ps tmm", $t, ", tmm4, tmm7"),
                             vh = in(reg) v, vl = in(reg) v.add(TILE), s = in(reg) TILE_ROW,
                             options(nostack, readonly));
                    })*
                };
            }
            accumulate!(0, 1, 2, 3);
        }
        // stored back: the asm writes memory
        macro_rules! store {
            ($($t:literal),*) => {
                $(if $t < n {
                    asm!(concat!("tilestored [{a} + {s}*1], tmm", $t),
                         a = in(reg) at($t), s = in(reg) acc_stride, options(nostack));
                })*
            };
        }
        store!(0, 1, 2, 3);
    }
}
