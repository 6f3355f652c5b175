//! Blocks to f32, format by format, in ggml's block layouts and with ggml's order of operations
//! (a block's scale times its value, minus its minimum), so that the numbers are those of any
//! GGUF reader.

use half::{bf16, f16};

use super::QuantKind;

/// Elements of a K-quant super-block.
const QK_K: usize = 256;

fn half(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Dequantizes one row: `bytes` holds whole blocks of `kind` for exactly `out.len()` elements.
///
/// # Panics
/// When `bytes` is not `kind.row_bytes(out.len())` long (callers check shapes at load).
pub fn dequantize_row(kind: QuantKind, bytes: &[u8], out: &mut [f32]) {
    let expected = kind.row_bytes(out.len()).unwrap_or(usize::MAX);
    assert_eq!(bytes.len(), expected, "{} row of {} elements", kind.name(), out.len());
    let (block_bytes, block_elements) = (kind.block_bytes(), kind.block_elements());
    match kind {
        QuantKind::F32 => {
            for (y, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        QuantKind::F16 => {
            for (y, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *y = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        QuantKind::BF16 => {
            for (y, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *y = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        _ => {
            let block = match kind {
                QuantKind::Q8_0 => q8_0,
                QuantKind::Q4_0 => q4_0,
                QuantKind::Q4_1 => q4_1,
                QuantKind::Q5_0 => q5_0,
                QuantKind::Q5_1 => q5_1,
                QuantKind::Q4K => q4_k,
                QuantKind::Q5K => q5_k,
                _ => q6_k,
            };
            for (b, y) in bytes.chunks_exact(block_bytes).zip(out.chunks_exact_mut(block_elements)) {
                block(b, y);
            }
        }
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for (v, &q) in y.iter_mut().zip(&b[2..34]) {
        *v = f32::from(q as i8) * d;
    }
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = f32::from((qs[j] & 0x0f) as i8 - 8) * d;
        y[j + 16] = f32::from((qs[j] >> 4) as i8 - 8) * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = f32::from(qs[j] & 0x0f) * d + m;
        y[j + 16] = f32::from(qs[j] >> 4) * d + m;
    }
}

/// The fifth bits of a 5-bit block: bit `j` of the little-endian word is element `j`'s.
fn high_bits(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let qh = high_bits(&b[2..6]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = f32::from(((qs[j] & 0x0f) | h0) as i8 - 16) * d;
        y[j + 16] = f32::from(((qs[j] >> 4) | h1) as i8 - 16) * d;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qh = high_bits(&b[4..8]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = f32::from((qs[j] & 0x0f) | h0) * d + m;
        y[j + 16] = f32::from((qs[j] >> 4) | h1) * d + m;
    }
}

/// Scale and minimum `j` (of 8) of a Q4_K/Q5_K super-block: 6 bits each, packed in 12 bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (group, out) in y.chunks_exact_mut(64).enumerate().take(QK_K / 64) {
        let q = &qs[group * 32..group * 32 + 32];
        let (sc1, m1) = scale_min_k4(2 * group, scales);
        let (sc2, m2) = scale_min_k4(2 * group + 1, scales);
        let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, min2) = (d * f32::from(sc2), dmin * f32::from(m2));
        for l in 0..32 {
            out[l] = d1 * f32::from(q[l] & 0x0f) - min1;
            out[l + 32] = d2 * f32::from(q[l] >> 4) - min2;
        }
    }
}

fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (group, out) in y.chunks_exact_mut(64).enumerate().take(QK_K / 64) {
        let ql = &qs[group * 32..group * 32 + 32];
        let (u1, u2) = (1u8 << (2 * group), 2u8 << (2 * group));
        let (sc1, m1) = scale_min_k4(2 * group, scales);
        let (sc2, m2) = scale_min_k4(2 * group + 1, scales);
        let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, min2) = (d * f32::from(sc2), dmin * f32::from(m2));
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            out[l] = d1 * f32::from((ql[l] & 0x0f) + h1) - min1;
            out[l + 32] = d2 * f32::from((ql[l] >> 4) + h2) - min2;
        }
    }
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let scales = &b[192..208];
    let d = half(b, 208);
    for (half_block, out) in y.chunks_exact_mut(128).enumerate().take(QK_K / 128) {
        let ql = &ql_all[half_block * 64..half_block * 64 + 64];
        let qh = &qh_all[half_block * 32..half_block * 32 + 32];
        let sc = &scales[half_block * 8..half_block * 8 + 8];
        let scale = |i: usize| d * f32::from(sc[i] as i8);
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            out[l] = scale(is) * f32::from(q1);
            out[l + 32] = scale(is + 2) * f32::from(q2);
            out[l + 64] = scale(is + 4) * f32::from(q3);
            out[l + 96] = scale(is + 6) * f32::from(q4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    #[test]
    fn simple_blocks_decode_by_hand() {
        // Q8_0: scale 0.5, values -128..=127 step.
        let mut b = f16_bytes(0.5).to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut y = [0.0; 32];
        dequantize_row(QuantKind::Q8_0, &b, &mut y);
        assert_eq!(y[0], -8.0);
        assert_eq!(y[31], 7.5);
        // Q4_1: scale 2, minimum -1, low nibbles 3, high nibbles 15.
        let mut b = f16_bytes(2.0).to_vec();
        b.extend(f16_bytes(-1.0));
        b.extend([0xf3u8; 16]);
        dequantize_row(QuantKind::Q4_1, &b, &mut y);
        assert_eq!((y[0], y[16]), (5.0, 29.0));
        // Q4_0: nibble 0 is -8.
        let mut b = f16_bytes(1.0).to_vec();
        b.extend([0x80u8; 16]);
        dequantize_row(QuantKind::Q4_0, &b, &mut y);
        assert_eq!((y[0], y[16]), (-8.0, 0.0));
        // Q5_0: element 0's fifth bit set, element 16's not: 16 - 16 and 0 - 16.
        let mut b = f16_bytes(1.0).to_vec();
        b.extend(1u32.to_le_bytes());
        b.extend([0u8; 16]);
        dequantize_row(QuantKind::Q5_0, &b, &mut y);
        assert_eq!((y[0], y[1], y[16]), (0.0, -16.0, -16.0));
    }

    #[test]
    fn rows_are_whole_blocks() {
        let result = std::panic::catch_unwind(|| {
            let mut y = [0.0; 32];
            dequantize_row(QuantKind::Q4_1, &[0u8; 19], &mut y);
        });
        assert!(result.is_err());
    }
}
