//! Random but finite blocks of every format, for tests of the layers that compute with them.

use half::f16;

use super::QuantKind;

/// Byte offsets of a block format's f16 scale (and minimum).
fn half_fields(kind: QuantKind) -> &'static [usize] {
    match kind {
        QuantKind::Q8_0 | QuantKind::Q4_0 | QuantKind::Q5_0 => &[0],
        QuantKind::Q4_1 | QuantKind::Q5_1 | QuantKind::Q4K | QuantKind::Q5K => &[0, 2],
        QuantKind::Q6K => &[208],
        QuantKind::F32 | QuantKind::F16 | QuantKind::BF16 => &[],
    }
}

/// `blocks` blocks of a quantized `kind`: pseudo-random bytes from `seed`, with small finite
/// scales.
pub fn random_blocks(kind: QuantKind, blocks: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let size = kind.block_bytes();
    let mut bytes: Vec<u8> = (0..blocks * size).map(|_| next() as u8).collect();
    for block in bytes.chunks_exact_mut(size) {
        for &at in half_fields(kind) {
            let scale = (next() % 2000) as f32 / 40000.0 - 0.025;
            block[at..at + 2].copy_from_slice(&f16::from_f32(scale).to_le_bytes());
        }
    }
    bytes
}
