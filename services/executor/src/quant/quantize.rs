//! Quantizing f32 rows into ggml's Q8_0 and Q4_0 blocks, exactly as ggml's reference quantizers
//! (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`) and PyPI gguf's numpy ones do, for
//! `--quantization` on Hugging Face models: their matrices then run as a GGUF file of that
//! format would.

use half::f16;

use super::QuantKind;

/// Elements per Q8_0 / Q4_0 block.
const BLOCK: usize = 32;

/// The formats `--quantization` can make.
pub const TARGETS: [QuantKind; 2] = [QuantKind::Q8_0, QuantKind::Q4_0];

/// The blocks of `values` (a whole number of 32-element blocks) in `kind`, Q8_0 or Q4_0.
pub fn quantize(kind: QuantKind, values: &[f32]) -> Result<Vec<u8>, String> {
    if !values.len().is_multiple_of(BLOCK) {
        return Err(format!("{} values are not a whole number of {BLOCK}-element blocks", values.len()));
    }
    let mut out = Vec::with_capacity(values.len() / BLOCK * kind.block_bytes());
    for block in values.chunks_exact(BLOCK) {
        match kind {
            QuantKind::Q8_0 => q8_0_block(block, &mut out),
            QuantKind::Q4_0 => q4_0_block(block, &mut out),
            other => return Err(format!("quantizing to {} is not supported (q8_0, q4_0)", other.name())),
        }
    }
    Ok(out)
}

/// A scale of `amax / 127` and the values rounded (half away from zero) to multiples of it.
fn q8_0_block(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(f16::from_f32(d).to_le_bytes());
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

/// A scale of `max / -8` (`max`: the value of largest magnitude, with its sign) and 4-bit
/// values offset by 8, the first 16 in the low nibbles and the last 16 in the high ones.
fn q4_0_block(x: &[f32], out: &mut Vec<u8>) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(f16::from_f32(d).to_le_bytes());
    let nibble = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    out.extend((0..BLOCK / 2).map(|j| nibble(x[j]) | (nibble(x[j + BLOCK / 2]) << 4)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequant::dequantize_row;

    fn random_row(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
            })
            .collect()
    }

    #[test]
    fn quantized_rows_dequantize_within_half_a_step() {
        let row = random_row(256, 7);
        for kind in TARGETS {
            let blocks = quantize(kind, &row).expect("quantizes");
            assert_eq!(blocks.len(), 256 / 32 * kind.block_bytes());
            let mut back = vec![0.0; 256];
            dequantize_row(kind, &blocks, &mut back);
            for (block, (x, y)) in row.chunks(32).zip(back.chunks(32)).enumerate() {
                let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                // Half a step; Q4_0 has 8 steps on the side of the largest magnitude and 7 on
                // the other, where a value near -max clamps by up to a whole step.
                let bound = if kind == QuantKind::Q8_0 { amax / 127.0 * 0.5 } else { amax / 8.0 };
                for (a, b) in x.iter().zip(y) {
                    // Plus the rounding of the f16 scale.
                    assert!((a - b).abs() <= bound + amax * 2e-3, "{kind:?} block {block}: {a} -> {b}");
                }
            }
        }
        assert!(quantize(QuantKind::Q8_0, &row[..31]).is_err());
        assert!(quantize(QuantKind::Q4K, &row).is_err());
    }

    #[test]
    fn zeros_and_extremes_stay_in_range() {
        let zeros = quantize(QuantKind::Q4_0, &[0.0; 32]).expect("quantizes");
        assert_eq!(&zeros[2..], &[0x88; 16], "zero is the offset 8 in both nibbles");
        let mut x = [1.0f32; 32];
        x[3] = -4.0;
        let q = quantize(QuantKind::Q4_0, &x).expect("quantizes");
        assert_eq!(f16::from_le_bytes([q[0], q[1]]).to_f32(), 0.5, "scale: -4 / -8");
        assert_eq!(q[2 + 3] & 0x0f, 0, "the largest magnitude maps to 0");
        let q = quantize(QuantKind::Q8_0, &x).expect("quantizes");
        assert_eq!(q[2 + 3] as i8, -127);
    }
}
