//! Element-wise and per-row operations of the Llama block: RMSNorm, RoPE, SiLU·mul.

use super::simd::exp_approx;
use crate::config::{ModelConfig, RopeScaling};

/// `out = x / sqrt(mean(x²) + eps) · w`, row by row.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(weight) {
            *o = w * (v * inv);
        }
    }
}

/// `gate[i] = silu(gate[i]) · up[i]`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::gemv::isa() == super::gemv::Isa::Avx512 {
        // SAFETY: the processor has AVX-512F.
        return unsafe { silu_mul_avx512(gate, up) };
    }
    silu_mul_portable(gate, up)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_mul_avx512(gate: &mut [f32], up: &[f32]) {
    silu_mul_portable(gate, up)
}

#[inline(always)]
fn silu_mul_portable(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = (*g / (1.0 + exp_approx(-*g))) * u;
    }
}

/// Cos/sin tables of rotate-half RoPE for every position up to a length.
pub struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// Inverse frequencies `theta^(-2i/d)`, scaled as the config says.
pub fn inv_frequencies(config: &ModelConfig) -> Vec<f32> {
    let d = config.head_dim;
    let base: Vec<f32> = (0..d / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / d as f32;
            (1.0 / config.rope_theta.powf(exponent as f64)) as f32
        })
        .collect();
    match config.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| (*f as f64 / factor) as f32).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let low_wavelen = original_max_position_embeddings / low_freq_factor;
            let high_wavelen = original_max_position_embeddings / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let f = f as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let scaled = if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    };
                    scaled as f32
                })
                .collect()
        }
    }
}

impl RopeTable {
    /// Tables for positions `0 .. max_len`.
    pub fn new(config: &ModelConfig, max_len: usize) -> Self {
        let inv = inv_frequencies(config);
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_len * half);
        let mut sin = Vec::with_capacity(max_len * half);
        for p in 0..max_len {
            for f in &inv {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self { half, cos, sin }
    }

    /// Number of positions covered.
    pub fn max_len(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// Rotates every head of one token's `[heads, head_dim]` vector at `position`.
    pub fn apply(&self, x: &mut [f32], position: usize) {
        let half = self.half;
        let cos = &self.cos[position * half..][..half];
        let sin = &self.sin[position * half..][..half];
        for head in x.chunks_exact_mut(2 * half) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x0, x1) = (a[i], b[i]);
                a[i] = x0 * cos[i] - x1 * sin[i];
                b[i] = x1 * cos[i] + x0 * sin[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_normalizes_rows() {
        let x = [3.0, 4.0, 0.0, 0.0];
        let mut out = [0.0; 4];
        rms_norm(&x, &[1.0, 2.0], 1e-6, &mut out);
        let inv = 1.0 / (12.5f32 + 1e-6).sqrt();
        assert!((out[0] - 3.0 * inv).abs() < 1e-6 && (out[1] - 8.0 * inv).abs() < 1e-6);
        assert_eq!(&out[2..], &[0.0, 0.0]);
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let cfg = ModelConfig::parse(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2,"vocab_size":4}"#,
        )
        .unwrap();
        let table = RopeTable::new(&cfg, 10);
        let mut x = [1.0, 2.0, 3.0, 4.0, -1.0, 0.5, 2.0, 1.0];
        let orig = x;
        table.apply(&mut x, 0);
        assert_eq!(x, orig);
        table.apply(&mut x, 7);
        let n0: f32 = orig.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
        assert_ne!(x, orig);
    }
}
