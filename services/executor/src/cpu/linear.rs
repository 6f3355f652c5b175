//! Dense layers `y = x · Wᵀ (+ b)` with `W` stored `[out, in]` in f32, f16, bf16 or one of
//! GGUF's quantized block formats.
//!
//! Two paths, both multi-threaded over output rows with rayon and accumulating in f32:
//! * few tokens (decode): a bandwidth-bound kernel that streams each weight row once and
//!   dots it with every token's activations (Q8_0, Q4_0 and Q4_1 blocks are widened in
//!   registers by [`super::qgemv`]; other quantized rows are widened to f32 first, in a scratch
//!   row of the task's own);
//! * many tokens (prefill): the `gemm` crate's f32 GEMM, fed f16/bf16/quantized weights
//!   converted to f32 one row panel at a time.

use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::gemv::{isa, row_dot4, rows4_dot4, Isa, RowsRef};
use super::qgemv;
use crate::weights::TensorData;

/// Token count from which the GEMM path is used.
const GEMM_MIN_TOKENS: usize = 48;
/// Output rows per task on the few-token path.
const GEMV_ROWS_PER_TASK: usize = 32;
/// Output rows per converted panel on the GEMM path.
const GEMM_PANEL_ROWS: usize = 128;

/// A dense layer.
pub struct Linear {
    /// Output width.
    pub out_features: usize,
    /// Input width.
    pub in_features: usize,
    /// `[out_features, in_features]`, row-major.
    pub weight: TensorData,
    /// Optional bias of `out_features`.
    pub bias: Option<Vec<f32>>,
}

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: every task writes a disjoint set of elements.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn ptr(self) -> *mut f32 {
        self.0
    }

    /// Writes the dot products `d[r][j]` of rows `o + r` (`r < rows`) with tokens `t + j`
    /// (`j < used`) into `y` (`[tokens, n]`).
    ///
    /// # Safety
    /// Those elements are inside `y` and written by the calling task only.
    unsafe fn write_block(self, n: usize, t: usize, o: usize, d: &[[f32; 4]; 4], rows: usize, used: usize) {
        for (r, row_out) in d.iter().enumerate().take(rows) {
            for (j, v) in row_out.iter().take(used).enumerate() {
                // SAFETY: as the caller promises.
                unsafe { *self.ptr().add((t + j) * n + o + r) = *v };
            }
        }
    }
}

/// The activations of tokens `t..t + 4` of `x` (`[tokens, k]`; past the last token, the last
/// again) and how many of them are real.
fn token_group(x: &[f32], k: usize, tokens: usize, t: usize) -> ([&[f32]; 4], usize) {
    let xs = std::array::from_fn(|j| {
        let tj = (t + j).min(tokens - 1);
        &x[tj * k..(tj + 1) * k]
    });
    (xs, (tokens - t).min(4))
}

/// Rows `o..o + rows` (at most 4) of `weights` dotted with a token group.
fn dot_block(
    weights: RowsRef<'_>,
    o: usize,
    rows: usize,
    k: usize,
    xs: [&[f32]; 4],
    used: usize,
    isa: Isa,
) -> [[f32; 4]; 4] {
    if rows == 4 {
        return rows4_dot4(weights, o, k, xs, used, isa);
    }
    std::array::from_fn(|r| if r < rows { row_dot4(weights, o + r, k, xs, used, isa) } else { [0.0; 4] })
}

impl Linear {
    /// `y[t, o] = Σ_i x[t, i] · W[o, i] + b[o]` for `tokens` rows of `x`.
    pub fn forward(&self, x: &[f32], tokens: usize, y: &mut [f32]) {
        assert_eq!(x.len(), tokens * self.in_features, "linear input size");
        assert_eq!(y.len(), tokens * self.out_features, "linear output size");
        if tokens == 0 {
            return;
        }
        if tokens < GEMM_MIN_TOKENS {
            self.forward_few(x, tokens, y);
        } else {
            self.forward_gemm(x, tokens, y);
        }
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.out_features) {
                for (v, bias) in row.iter_mut().zip(b) {
                    *v += bias;
                }
            }
        }
    }

    /// Weight row panel `rows` as f32: borrowed for f32 weights, converted into `scratch` else.
    fn panel<'a>(&'a self, rows: std::ops::Range<usize>, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        let k = self.in_features;
        let range = rows.start * k..rows.end * k;
        match &self.weight {
            TensorData::F32(b) => &b.as_slice()[range],
            TensorData::F16(b) => {
                scratch.resize(range.len(), 0.0);
                b.as_slice()[range].convert_to_f32_slice(scratch);
                scratch
            }
            TensorData::BF16(b) => {
                scratch.resize(range.len(), 0.0);
                b.as_slice()[range].convert_to_f32_slice(scratch);
                scratch
            }
            TensorData::Quantized(_) => {
                scratch.resize(range.len(), 0.0);
                for (i, row) in rows.enumerate() {
                    self.weight.row_to_f32(row, k, &mut scratch[i * k..(i + 1) * k]);
                }
                scratch
            }
        }
    }

    fn forward_few(&self, x: &[f32], tokens: usize, y: &mut [f32]) {
        let (n, k) = (self.out_features, self.in_features);
        let out = SharedOut(y.as_mut_ptr());
        let rows = match &self.weight {
            TensorData::F32(b) => RowsRef::F32(b.as_slice()),
            TensorData::F16(b) => RowsRef::F16(b.as_slice()),
            TensorData::BF16(b) => RowsRef::BF16(b.as_slice()),
            TensorData::Quantized(_) => return self.forward_few_quantized(x, tokens, y),
        };
        let isa = isa();
        let tasks = n.div_ceil(GEMV_ROWS_PER_TASK);
        (0..tasks).into_par_iter().for_each(|task| {
            let panel = task * GEMV_ROWS_PER_TASK..((task + 1) * GEMV_ROWS_PER_TASK).min(n);
            // Token groups outside, rows inside: a group's activations stay in L1 while the
            // panel's rows stream past them.
            for t in (0..tokens).step_by(4) {
                let (xs, used) = token_group(x, k, tokens, t);
                let mut o = panel.start;
                while o < panel.end {
                    let block = (panel.end - o).min(4);
                    let d = dot_block(rows, o, block, k, xs, used, isa);
                    // SAFETY: rows o.. of tokens t.. are inside y and in this task's panel.
                    unsafe { out.write_block(n, t, o, &d, block, used) };
                    o += block;
                }
            }
        });
    }

    /// The few-token path for quantized weights: blocks widened in registers where
    /// [`qgemv`] has a kernel for the format, else each row widened once into the task's
    /// scratch row and dotted with every token by the f32 kernel.
    fn forward_few_quantized(&self, x: &[f32], tokens: usize, y: &mut [f32]) {
        let (n, k) = (self.out_features, self.in_features);
        let out = SharedOut(y.as_mut_ptr());
        let isa = isa();
        let tasks = n.div_ceil(GEMV_ROWS_PER_TASK);
        if let TensorData::Quantized(q) = &self.weight {
            // Up to four tokens, blocks are widened in registers for each; more tokens share one
            // widened row (below) instead of widening it again for every group of four.
            if qgemv::supports(q.kind, isa) && tokens <= 4 {
                let row_bytes = q.kind.row_bytes(k).unwrap_or(0);
                let bytes = q.bytes.as_slice();
                (0..tasks).into_par_iter().for_each(|task| {
                    let panel = task * GEMV_ROWS_PER_TASK..((task + 1) * GEMV_ROWS_PER_TASK).min(n);
                    for t in (0..tokens).step_by(4) {
                        let (xs, used) = token_group(x, k, tokens, t);
                        for o in panel.clone() {
                            let row = &bytes[o * row_bytes..(o + 1) * row_bytes];
                            let d = qgemv::row_dot4(q.kind, row, k, xs, used, isa);
                            for (j, v) in d.iter().take(used).enumerate() {
                                // SAFETY: (t + j, o) is inside y and written by this task only.
                                unsafe { *out.ptr().add((t + j) * n + o) = *v };
                            }
                        }
                    }
                });
                return;
            }
        }
        // Four rows at a time are widened into the task's scratch rows, then dotted with every
        // group of four tokens by the f32 4-rows × 4-tokens kernel.
        (0..tasks).into_par_iter().for_each_init(Vec::new, |scratch: &mut Vec<f32>, task| {
            scratch.resize(4 * k, 0.0);
            let panel = task * GEMV_ROWS_PER_TASK..((task + 1) * GEMV_ROWS_PER_TASK).min(n);
            let mut o = panel.start;
            while o < panel.end {
                let block = (panel.end - o).min(4);
                for r in 0..block {
                    self.weight.row_to_f32(o + r, k, &mut scratch[r * k..(r + 1) * k]);
                }
                for t in (0..tokens).step_by(4) {
                    let (xs, used) = token_group(x, k, tokens, t);
                    let d = dot_block(RowsRef::F32(scratch), 0, block, k, xs, used, isa);
                    // SAFETY: rows o.. of tokens t.. are inside y and in this task's panel.
                    unsafe { out.write_block(n, t, o, &d, block, used) };
                }
                o += block;
            }
        });
    }

    fn forward_gemm(&self, x: &[f32], tokens: usize, y: &mut [f32]) {
        let (n, k) = (self.out_features, self.in_features);
        let out = SharedOut(y.as_mut_ptr());
        let panels = n.div_ceil(GEMM_PANEL_ROWS);
        (0..panels).into_par_iter().for_each_init(Vec::new, |scratch, p| {
            let rows = p * GEMM_PANEL_ROWS..((p + 1) * GEMM_PANEL_ROWS).min(n);
            let cols = rows.len();
            let first = rows.start;
            let w = self.panel(rows, scratch);
            // SAFETY: dst covers y[.., first..first + cols] (row stride n), written by this task
            // only; lhs is x [tokens, k]; rhs is the panel read as [k, cols] (col stride k).
            unsafe {
                gemm::gemm(
                    tokens,
                    cols,
                    k,
                    out.ptr().add(first),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::test_blocks::random_blocks;
    use crate::quant::QuantKind;
    use crate::weights::{Buffer, QuantData, WeightDtype};
    use std::sync::Arc;

    fn reference(w: &[f32], x: &[f32], n: usize, k: usize, t: usize) -> Vec<f32> {
        let mut y = vec![0.0f64; t * n];
        for ti in 0..t {
            for o in 0..n {
                y[ti * n + o] = (0..k).map(|i| x[ti * k + i] as f64 * w[o * k + i] as f64).sum();
            }
        }
        y.into_iter().map(|v| v as f32).collect()
    }

    fn pseudo(len: usize, seed: u32) -> Vec<f32> {
        (0..len).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    #[test]
    fn both_paths_match_a_reference_in_every_block_format() {
        let (n, k) = (37, 512);
        for kind in QuantKind::ALL.into_iter().filter(|k| k.block_elements() > 1) {
            let blocks = n * k / kind.block_elements();
            let bytes = random_blocks(kind, blocks, kind.block_bytes() as u64);
            let data =
                TensorData::Quantized(QuantData { kind, bytes: Buffer::Owned(Arc::new(bytes)), elements: n * k });
            let widened = data.to_f32();
            let lin = Linear { out_features: n, in_features: k, weight: data, bias: None };
            for t in [1, 2, 5, 48, 50] {
                let x = pseudo(t * k, 11);
                let mut y = vec![f32::NAN; t * n];
                lin.forward(&x, t, &mut y);
                let expect = reference(&widened, &x, n, k, t);
                let scale = expect.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                for (a, b) in y.iter().zip(&expect) {
                    assert!((a - b).abs() <= 1e-5 * scale, "{} t={t}: {a} vs {b}", kind.name());
                }
            }
        }
    }

    #[test]
    fn both_paths_match_a_reference_in_every_dtype() {
        let (n, k) = (70, 45);
        let w = pseudo(n * k, 7);
        for dtype in [WeightDtype::F32, WeightDtype::F16, WeightDtype::BF16] {
            let data = TensorData::F32(Buffer::Owned(Arc::new(w.clone()))).convert(dtype);
            let rounded = data.to_f32();
            let lin = Linear { out_features: n, in_features: k, weight: data, bias: Some(vec![0.5; n]) };
            for t in [1, 3, 5, 8, 33, 47, 48, 60] {
                let x = pseudo(t * k, 3);
                let mut y = vec![f32::NAN; t * n];
                lin.forward(&x, t, &mut y);
                let expect = reference(&rounded, &x, n, k, t);
                for (a, b) in y.iter().zip(&expect) {
                    assert!((a - (b + 0.5)).abs() < 1e-4, "{dtype:?} t={t}: {a} vs {}", b + 0.5);
                }
            }
        }
    }
}
