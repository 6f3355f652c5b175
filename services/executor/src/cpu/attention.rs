//! Causal GQA attention over the paged KV cache — the reference every other backend is
//! checked against.
//!
//! The batch is flat and unpadded: rows of many sequences follow each other, each sequence a
//! prefill chunk or a single decode token. A row at position `p` attends to positions
//! `0 ..= p` of its own sequence, read from the blocks its block table names.

use rayon::prelude::*;

use super::kv_cache::KvCache;
use super::simd::{axpy, exp_approx};

/// One sequence's rows in the flat batch.
#[derive(Debug, Clone, Copy)]
pub struct SeqSpan<'a> {
    /// Index of its first row in the batch.
    pub first_row: usize,
    /// Number of rows.
    pub len: usize,
    /// Position of its first row.
    pub start_pos: usize,
    /// Its block table.
    pub block_table: &'a [u32],
}

/// Which span each row of the batch belongs to.
pub fn row_spans(spans: &[SeqSpan<'_>], rows: usize) -> Vec<u32> {
    let mut owner = vec![0u32; rows];
    for (i, s) in spans.iter().enumerate() {
        owner[s.first_row..s.first_row + s.len].fill(i as u32);
    }
    owner
}

/// `out[row, head] = softmax(q·Kᵀ / sqrt(d)) · V` over the row's causal context, with the
/// instruction set `isa` (the processor's best, [`super::gemv::isa`]; tests run every one the
/// processor has).
///
/// `q` and `out` are `[rows, num_heads * head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    isa: super::gemv::Isa,
    q: &[f32],
    cache: &KvCache,
    layer: usize,
    spans: &[SeqSpan<'_>],
    owner: &[u32],
    num_heads: usize,
    out: &mut [f32],
) {
    let shape = cache.shape;
    let hd = shape.head_dim;
    let width = num_heads * hd;
    let group = num_heads / shape.num_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let keys = &cache.device.k[layer];
    let values = &cache.device.v[layer];
    let avx512 = isa == super::gemv::Isa::Avx512;
    let ctx = RowContext { q, keys, values, spans, owner, num_heads, group, scale, shape, avx512 };
    out.par_chunks_mut(width).enumerate().for_each_init(Vec::new, |scores, (row, out_row)| {
        #[cfg(target_arch = "x86_64")]
        match isa {
            // SAFETY: the processor has the features each variant is compiled for.
            super::gemv::Isa::Avx512 => return unsafe { attend_row_avx512(&ctx, row, out_row, scores) },
            super::gemv::Isa::Avx2 => return unsafe { attend_row_avx2(&ctx, row, out_row, scores) },
            super::gemv::Isa::Portable => {}
        }
        let _ = isa;
        attend_row(&ctx, row, out_row, scores);
    });
}

/// What every row's attention reads.
struct RowContext<'a> {
    q: &'a [f32],
    keys: &'a [f32],
    values: &'a [f32],
    spans: &'a [SeqSpan<'a>],
    owner: &'a [u32],
    num_heads: usize,
    group: usize,
    scale: f32,
    shape: super::kv_cache::BlockShape,
    avx512: bool,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_row_avx512(ctx: &RowContext<'_>, row: usize, out_row: &mut [f32], scores: &mut Vec<f32>) {
    attend_row(ctx, row, out_row, scores)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_row_avx2(ctx: &RowContext<'_>, row: usize, out_row: &mut [f32], scores: &mut Vec<f32>) {
    attend_row(ctx, row, out_row, scores)
}

/// Attention of one row (all its heads) over its sequence's causal context.
#[inline(always)]
fn attend_row(ctx: &RowContext<'_>, row: usize, out_row: &mut [f32], scores: &mut Vec<f32>) {
    let shape = ctx.shape;
    let hd = shape.head_dim;
    let width = ctx.num_heads * hd;
    let span = &ctx.spans[ctx.owner[row] as usize];
    let pos = span.start_pos + (row - span.first_row);
    let context = pos + 1;
    let bs = shape.block_size;
    let blocks = context.div_ceil(bs);
    // Whole blocks of scores (slots past the context are computed and then ignored).
    scores.resize(blocks * bs, 0.0);
    for h in 0..ctx.num_heads {
        let kv_head = h / ctx.group;
        let qh = &ctx.q[row * width + h * hd..][..hd];
        for (bi, &block) in span.block_table[..blocks].iter().enumerate() {
            let keys = &ctx.keys[shape.offset(block as usize, kv_head)..][..hd * bs];
            let out = &mut scores[bi * bs..(bi + 1) * bs];
            #[cfg(target_arch = "x86_64")]
            if bs == 16 && ctx.avx512 {
                // SAFETY: AVX-512F was detected; `keys` is a whole block and `out` 16 scores.
                unsafe { super::attention_avx512::block_scores16(qh, keys, ctx.scale, out) };
                continue;
            }
            match bs {
                8 => block_scores::<8>(qh, keys, ctx.scale, out),
                16 => block_scores::<16>(qh, keys, ctx.scale, out),
                32 => block_scores::<32>(qh, keys, ctx.scale, out),
                _ => {
                    out.fill(0.0);
                    for (d, &qd) in qh.iter().enumerate() {
                        axpy(qd * ctx.scale, &keys[d * bs..(d + 1) * bs], out);
                    }
                }
            }
        }
        let live = &mut scores[..context];
        let max = live.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for s in live.iter_mut() {
            *s = exp_approx(*s - max);
        }
        let sum: f32 = live.iter().sum();
        let inv = 1.0 / sum;
        let oh = &mut out_row[h * hd..][..hd];
        let values = |bi: usize| &ctx.values[shape.offset(span.block_table[bi] as usize, kv_head)..][..hd * bs];
        #[cfg(target_arch = "x86_64")]
        if ctx.avx512 && (hd == 64 || hd == 128) {
            oh.fill(0.0);
            for bi in 0..blocks {
                let first = bi * bs;
                let p = &live[first..first + bs.min(context - first)];
                // SAFETY: AVX-512F was detected; a block holds `bs` value rows of `hd`.
                unsafe {
                    if hd == 64 {
                        super::attention_avx512::accumulate_values::<64>(p, values(bi), oh)
                    } else {
                        super::attention_avx512::accumulate_values::<128>(p, values(bi), oh)
                    }
                }
            }
            for o in oh.iter_mut() {
                *o *= inv;
            }
            continue;
        }
        match hd {
            64 => weighted_values::<64>(live, inv, bs, blocks, values, oh),
            128 => weighted_values::<128>(live, inv, bs, blocks, values, oh),
            _ => {
                oh.fill(0.0);
                for bi in 0..blocks {
                    let first = bi * bs;
                    let vals = values(bi);
                    for j in 0..bs.min(context - first) {
                        axpy(live[first + j] * inv, &vals[j * hd..(j + 1) * hd], oh);
                    }
                }
            }
        }
    }
}

/// Scores of one block's `BS` slots: `out[s] = scale · Σ_d q[d] · K[d][s]` over the block's
/// transposed keys, accumulated in registers.
#[inline(always)]
fn block_scores<const BS: usize>(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
    // Four independent accumulators (dimensions d mod 4) keep the adds from waiting on each other.
    let mut acc = [[0.0f32; BS]; 4];
    let mut quads = q.chunks_exact(4);
    let mut d = 0;
    for quad in &mut quads {
        for (lane, &qd) in quad.iter().enumerate() {
            let column: &[f32; BS] = keys[(d + lane) * BS..(d + lane + 1) * BS].try_into().expect("a block column");
            for s in 0..BS {
                acc[lane][s] += qd * column[s];
            }
        }
        d += 4;
    }
    for (lane, &qd) in quads.remainder().iter().enumerate() {
        let column: &[f32; BS] = keys[(d + lane) * BS..(d + lane + 1) * BS].try_into().expect("a block column");
        for s in 0..BS {
            acc[lane][s] += qd * column[s];
        }
    }
    for (s, o) in out.iter_mut().enumerate() {
        *o = ((acc[0][s] + acc[1][s]) + (acc[2][s] + acc[3][s])) * scale;
    }
}

/// `out = inv · Σ_j p[j] · V[j]` over the live positions, accumulated in registers.
#[inline(always)]
fn weighted_values<'v, const HD: usize>(
    p: &[f32],
    inv: f32,
    bs: usize,
    blocks: usize,
    values: impl Fn(usize) -> &'v [f32],
    out: &mut [f32],
) {
    // Two accumulators (even and odd positions) halve the chain of dependent adds.
    let mut acc = [[0.0f32; HD]; 2];
    for bi in 0..blocks {
        let vals = values(bi);
        let first = bi * bs;
        for j in 0..bs.min(p.len() - first) {
            let v: &[f32; HD] = vals[j * HD..(j + 1) * HD].try_into().expect("a value row");
            let w = p[first + j];
            let a = &mut acc[j & 1];
            for d in 0..HD {
                a[d] += w * v[d];
            }
        }
    }
    for (d, o) in out.iter_mut().enumerate() {
        *o = (acc[0][d] + acc[1][d]) * inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::kv_cache::BlockShape;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// Paged attention against a direct f64 computation, for ragged sequences whose blocks are
    /// scattered over the pool, in every supported block size, head dim and GQA ratio.
    #[test]
    fn matches_a_direct_computation() {
        let mut rng = Lcg(17);
        for &(bs, hd, kv_heads, group) in
            &[(16, 64, 2, 1), (16, 128, 1, 4), (8, 64, 2, 2), (32, 64, 1, 8), (4, 8, 4, 2), (16, 40, 2, 1)]
        {
            let heads = kv_heads * group;
            let shape = BlockShape { block_size: bs, num_kv_heads: kv_heads, head_dim: hd };
            // (context before this step, rows fed this step)
            let seqs = [(0usize, 5usize), (37, 1), (bs * 3 - 1, 1), (bs, bs + 3), (70, 1)];
            let total_blocks: usize = seqs.iter().map(|(c, r)| (c + r).div_ceil(bs)).sum();
            let mut cache = KvCache::new(1, shape, total_blocks + 3, 0);
            let mut free: Vec<u32> = (0..(total_blocks + 3) as u32).collect();
            free.reverse();
            free.rotate_left(2);
            let width = heads * hd;
            let kvw = kv_heads * hd;
            let mut tables = Vec::new();
            let mut all_k = Vec::new();
            let mut all_v = Vec::new();
            for &(ctx, rows) in &seqs {
                let len = ctx + rows;
                let table: Vec<u32> = (0..len.div_ceil(bs)).map(|_| free.pop().expect("block")).collect();
                let k: Vec<f32> = (0..len * kvw).map(|_| rng.next()).collect();
                let v: Vec<f32> = (0..len * kvw).map(|_| rng.next()).collect();
                for p in 0..len {
                    let slot = table[p / bs] as usize * bs + p % bs;
                    cache.write(0, slot, &k[p * kvw..(p + 1) * kvw], &v[p * kvw..(p + 1) * kvw]);
                }
                tables.push(table);
                all_k.push(k);
                all_v.push(v);
            }
            let mut spans = Vec::new();
            let mut first_row = 0;
            for (i, &(ctx, rows)) in seqs.iter().enumerate() {
                spans.push(SeqSpan { first_row, len: rows, start_pos: ctx, block_table: &tables[i] });
                first_row += rows;
            }
            let rows = first_row;
            let q: Vec<f32> = (0..rows * width).map(|_| rng.next()).collect();
            let owner = row_spans(&spans, rows);
            for isa in crate::cpu::gemv::available_isas() {
                let mut out = vec![f32::NAN; rows * width];
                paged_attention(isa, &q, &cache, 0, &spans, &owner, heads, &mut out);
                let scale = 1.0 / (hd as f64).sqrt();
                let mut worst = 0.0f64;
                for (i, span) in spans.iter().enumerate() {
                    for r in 0..span.len {
                        let row = span.first_row + r;
                        let pos = span.start_pos + r;
                        for h in 0..heads {
                            let kh = h / group;
                            let qh = &q[row * width + h * hd..][..hd];
                            let scores: Vec<f64> = (0..=pos)
                                .map(|p| {
                                    let key = &all_k[i][p * kvw + kh * hd..][..hd];
                                    qh.iter().zip(key).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale
                                })
                                .collect();
                            let max = scores.iter().copied().fold(f64::MIN, f64::max);
                            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                            let sum: f64 = weights.iter().sum();
                            for d in 0..hd {
                                let want: f64 =
                                    (0..=pos).map(|p| weights[p] * all_v[i][p * kvw + kh * hd + d] as f64).sum::<f64>()
                                        / sum;
                                let got = out[row * width + h * hd + d] as f64;
                                worst = worst.max((got - want).abs());
                            }
                        }
                    }
                }
                assert!(worst < 1e-5, "{isa:?} bs {bs} hd {hd} group {group}: worst error {worst}");
            }
        }
    }
}
