//! Causal GQA attention over the paged KV cache — the reference every other backend is
//! checked against.
//!
//! The batch is flat and unpadded: rows of many sequences follow each other, each sequence a
//! prefill chunk or a single decode token. A row at position `p` attends to positions
//! `0 ..= p` of its own sequence, read from the blocks its block table names.

use rayon::prelude::*;

use super::kv_cache::KvCache;
use super::simd::{axpy, dot_portable};

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

/// `out[row, head] = softmax(q·Kᵀ / sqrt(d)) · V` over the row's causal context.
///
/// `q` and `out` are `[rows, num_heads * head_dim]`.
pub fn paged_attention(
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
    let ctx = RowContext { q, keys, values, spans, owner, num_heads, group, scale, shape };
    let avx2 = super::gemv::isa() != super::gemv::Isa::Portable;
    out.par_chunks_mut(width).enumerate().for_each_init(Vec::new, |scores, (row, out_row)| {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the processor has AVX2 and FMA.
            unsafe { attend_row_avx2(&ctx, row, out_row, scores) };
            return;
        }
        let _ = avx2;
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
    scores.resize(context, 0.0);
    for h in 0..ctx.num_heads {
        let kv_head = h / ctx.group;
        let qh = &ctx.q[row * width + h * hd..][..hd];
        for (bi, &block) in span.block_table.iter().enumerate() {
            let first = bi * shape.block_size;
            if first >= context {
                break;
            }
            let n = shape.block_size.min(context - first);
            let base = shape.offset(block as usize, kv_head, 0);
            for j in 0..n {
                scores[first + j] = dot_portable(qh, &ctx.keys[base + j * hd..][..hd]) * ctx.scale;
            }
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        let oh = &mut out_row[h * hd..][..hd];
        oh.fill(0.0);
        for (bi, &block) in span.block_table.iter().enumerate() {
            let first = bi * shape.block_size;
            if first >= context {
                break;
            }
            let n = shape.block_size.min(context - first);
            let base = shape.offset(block as usize, kv_head, 0);
            for j in 0..n {
                axpy(scores[first + j] * inv, &ctx.values[base + j * hd..][..hd], oh);
            }
        }
    }
}
