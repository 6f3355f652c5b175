//! The few-token path for the common 32-element block formats (Q8_0, Q4_0, Q4_1): each block
//! of a weight row is widened to f32 in registers and dotted at once with up to four tokens'
//! activations, without going through a scratch row. [`widen_row`] widens whole rows (those
//! formats and Q4_K, Q6_K) with AVX-512 for the paths that reuse a widened row. Each weight takes the value the
//! dequantizer gives it (the same f32 operations: `q · d`, `(q − 8) · d`, `q · d + m`), so the
//! results are the widen-then-dot path's up to the order of the sums. AVX-512 and AVX2 kernels,
//! chosen at run time; other formats and processors take the scratch-row path.

use super::gemv::Isa;
use crate::quant::QuantKind;

/// Elements per block of the formats here.
const BLOCK: usize = 32;

/// Whether [`row_dot4`] has a kernel for `kind` on `isa`.
pub fn supports(kind: QuantKind, isa: Isa) -> bool {
    matches!(kind, QuantKind::Q8_0 | QuantKind::Q4_0 | QuantKind::Q4_1) && isa != Isa::Portable
}

/// `out[t] = Σ_i w[i] · xs[t][i]` for one quantized row `row` (whole blocks of `kind` for `k`
/// elements) and up to four activation rows.
///
/// # Panics
/// When [`supports`] is false, or the row or an activation row is shorter than `k`.
pub fn row_dot4(kind: QuantKind, row: &[u8], k: usize, xs: [&[f32]; 4], used: usize, isa: Isa) -> [f32; 4] {
    assert!(k.is_multiple_of(BLOCK) && row.len() >= k / BLOCK * kind.block_bytes(), "quantized row too short");
    for x in &xs[..used] {
        assert!(x.len() >= k, "activation row too short");
    }
    let blocks = k / BLOCK;
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! by_used {
            ($kernel:ident) => {
                match used {
                    1 => x86::$kernel::<1>(row.as_ptr(), blocks, xs),
                    2 => x86::$kernel::<2>(row.as_ptr(), blocks, xs),
                    3 => x86::$kernel::<3>(row.as_ptr(), blocks, xs),
                    _ => x86::$kernel::<4>(row.as_ptr(), blocks, xs),
                }
            };
        }
        // SAFETY: the ISA was detected on this processor; the row holds `blocks` blocks and
        // every used activation row `k` elements (checked above).
        unsafe {
            match (isa, kind) {
                (Isa::Avx512, QuantKind::Q8_0) => return by_used!(q8_0_avx512),
                (Isa::Avx512, QuantKind::Q4_0) => return by_used!(q4_0_avx512),
                (Isa::Avx512, QuantKind::Q4_1) => return by_used!(q4_1_avx512),
                (Isa::Avx2, QuantKind::Q8_0) => return by_used!(q8_0_avx2),
                (Isa::Avx2, QuantKind::Q4_0) => return by_used!(q4_0_avx2),
                (Isa::Avx2, QuantKind::Q4_1) => return by_used!(q4_1_avx2),
                _ => {}
            }
        }
    }
    let _ = (blocks, isa);
    panic!("no fused kernel for {} on {isa:?}", kind.name());
}

/// Widens one row of `kind` blocks into `out` (as [`crate::quant::dequant::dequantize_row`]
/// does, bit for bit) with the vector unit; false, leaving `out` untouched, where there is no
/// kernel for `kind` on `isa`.
pub fn widen_row(kind: QuantKind, row: &[u8], out: &mut [f32], isa: Isa) -> bool {
    let k = out.len();
    let per_block = kind.block_elements();
    if isa != Isa::Avx512 || !k.is_multiple_of(per_block) || row.len() < k / per_block * kind.block_bytes() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the ISA was detected; the row holds `k / per_block` blocks and `out` `k` elements.
    unsafe {
        match kind {
            QuantKind::Q8_0 => x86::widen_q8_0_avx512(row.as_ptr(), out),
            QuantKind::Q4_0 => x86::widen_q4_0_avx512(row.as_ptr(), out),
            QuantKind::Q4_1 => x86::widen_q4_1_avx512(row.as_ptr(), out),
            QuantKind::Q4K => x86::widen_q4_k_avx512(row.as_ptr(), out),
            QuantKind::Q6K => x86::widen_q6_k_avx512(row.as_ptr(), out),
            _ => return false,
        }
        return true;
    }
    #[allow(unreachable_code)]
    false
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::BLOCK;

    /// The f16 at `p` as f32.
    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn half_at(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    /// Sums of the accumulators, one per used token.
    #[inline(always)]
    unsafe fn reduce512<const U: usize>(acc: [__m512; 4]) -> [f32; 4] {
        let mut out = [0.0f32; 4];
        for t in 0..U {
            out[t] = _mm512_reduce_add_ps(acc[t]);
        }
        out
    }

    /// Adds `lo · x[0..16] + hi · x[16..32]` of block `b` to each used token's accumulator.
    #[inline(always)]
    unsafe fn fma_block512<const U: usize>(acc: &mut [__m512; 4], lo: __m512, hi: __m512, xs: &[&[f32]; 4], b: usize) {
        for t in 0..U {
            let x = xs[t].as_ptr().add(b * BLOCK);
            acc[t] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x), acc[t]);
            acc[t] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x.add(16)), acc[t]);
        }
    }

    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn q8_0_avx512<const U: usize>(row: *const u8, blocks: usize, xs: [&[f32]; 4]) -> [f32; 4] {
        let mut acc = [_mm512_setzero_ps(); 4];
        for b in 0..blocks {
            let p = row.add(b * 34);
            let d = _mm512_set1_ps(half_at(p));
            let q0 = _mm_loadu_si128(p.add(2) as *const __m128i);
            let q1 = _mm_loadu_si128(p.add(18) as *const __m128i);
            let lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), d);
            let hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), d);
            fma_block512::<U>(&mut acc, lo, hi, &xs, b);
        }
        reduce512::<U>(acc)
    }

    /// The low and high nibbles of a block's 16 bytes as 32 integers (low nibbles first).
    #[inline(always)]
    unsafe fn nibbles512(p: *const u8) -> (__m512i, __m512i) {
        let qs = _mm_loadu_si128(p as *const __m128i);
        let mask = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(qs, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
        (_mm512_cvtepu8_epi32(lo), _mm512_cvtepu8_epi32(hi))
    }

    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn widen_q8_0_avx512(row: *const u8, out: &mut [f32]) {
        for (b, y) in out.chunks_exact_mut(BLOCK).enumerate() {
            let p = row.add(b * 34);
            let d = _mm512_set1_ps(half_at(p));
            let q0 = _mm_loadu_si128(p.add(2) as *const __m128i);
            let q1 = _mm_loadu_si128(p.add(18) as *const __m128i);
            _mm512_storeu_ps(y.as_mut_ptr(), _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), d));
            _mm512_storeu_ps(y.as_mut_ptr().add(16), _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), d));
        }
    }

    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn widen_q4_0_avx512(row: *const u8, out: &mut [f32]) {
        let eight = _mm512_set1_epi32(8);
        for (b, y) in out.chunks_exact_mut(BLOCK).enumerate() {
            let p = row.add(b * 18);
            let d = _mm512_set1_ps(half_at(p));
            let (lo, hi) = nibbles512(p.add(2));
            _mm512_storeu_ps(y.as_mut_ptr(), _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(lo, eight)), d));
            _mm512_storeu_ps(y.as_mut_ptr().add(16), _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(hi, eight)), d));
        }
    }

    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn widen_q4_1_avx512(row: *const u8, out: &mut [f32]) {
        for (b, y) in out.chunks_exact_mut(BLOCK).enumerate() {
            let p = row.add(b * 20);
            let (d, m) = (_mm512_set1_ps(half_at(p)), _mm512_set1_ps(half_at(p.add(2))));
            let (lo, hi) = nibbles512(p.add(4));
            _mm512_storeu_ps(y.as_mut_ptr(), _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lo), d), m));
            _mm512_storeu_ps(y.as_mut_ptr().add(16), _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), d), m));
        }
    }

    /// 16 bytes at `p` widened to f32 (unsigned), times `d`, minus `min`.
    #[inline(always)]
    unsafe fn scaled16(bytes: __m128i, d: f32, min: f32) -> __m512 {
        let v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
        _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(d), v), _mm512_set1_ps(min))
    }

    /// Scale and minimum `j` of a Q4_K super-block's 12 packed bytes (as the dequantizer).
    #[inline(always)]
    fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
        if j < 4 {
            (q[j] & 63, q[j + 4] & 63)
        } else {
            ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
        }
    }

    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn widen_q4_k_avx512(row: *const u8, out: &mut [f32]) {
        let mask = _mm_set1_epi8(0x0f);
        for (b, y) in out.chunks_exact_mut(256).enumerate() {
            let p = row.add(b * 144);
            let (d, dmin) = (half_at(p), half_at(p.add(2)));
            let scales: [u8; 12] = std::ptr::read_unaligned(p.add(4) as *const [u8; 12]);
            for group in 0..4 {
                let q = p.add(16 + group * 32);
                let (sc1, m1) = scale_min_k4(2 * group, &scales);
                let (sc2, m2) = scale_min_k4(2 * group + 1, &scales);
                let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
                let (d2, min2) = (d * f32::from(sc2), dmin * f32::from(m2));
                let o = y.as_mut_ptr().add(group * 64);
                for half in 0..2 {
                    let bytes = _mm_loadu_si128(q.add(16 * half) as *const __m128i);
                    let lo = _mm_and_si128(bytes, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
                    _mm512_storeu_ps(o.add(16 * half), scaled16(lo, d1, min1));
                    _mm512_storeu_ps(o.add(32 + 16 * half), scaled16(hi, d2, min2));
                }
            }
        }
    }

    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn widen_q6_k_avx512(row: *const u8, out: &mut [f32]) {
        let (low4, low2) = (_mm_set1_epi8(0x0f), _mm_set1_epi8(3));
        let thirty_two = _mm512_set1_epi32(32);
        for (b, y) in out.chunks_exact_mut(256).enumerate() {
            let p = row.add(b * 210);
            let d = half_at(p.add(208));
            for half_block in 0..2 {
                let ql = p.add(half_block * 64);
                let qh = p.add(128 + half_block * 32);
                let sc = p.add(192 + half_block * 8);
                let o = y.as_mut_ptr().add(half_block * 128);
                for c in 0..2 {
                    let lo = _mm_loadu_si128(ql.add(16 * c) as *const __m128i);
                    let hi = _mm_loadu_si128(ql.add(32 + 16 * c) as *const __m128i);
                    let h = _mm_loadu_si128(qh.add(16 * c) as *const __m128i);
                    let top = |shift: i32| {
                        let bits = match shift {
                            0 => h,
                            2 => _mm_srli_epi16(h, 2),
                            4 => _mm_srli_epi16(h, 4),
                            _ => _mm_srli_epi16(h, 6),
                        };
                        _mm_slli_epi16(_mm_and_si128(bits, low2), 4)
                    };
                    let quads = [
                        _mm_or_si128(_mm_and_si128(lo, low4), top(0)),
                        _mm_or_si128(_mm_and_si128(hi, low4), top(2)),
                        _mm_or_si128(_mm_and_si128(_mm_srli_epi16(lo, 4), low4), top(4)),
                        _mm_or_si128(_mm_and_si128(_mm_srli_epi16(hi, 4), low4), top(6)),
                    ];
                    for (n, q) in quads.iter().enumerate() {
                        let scale = d * f32::from(*sc.add(c + 2 * n) as i8);
                        let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(*q), thirty_two));
                        _mm512_storeu_ps(o.add(32 * n + 16 * c), _mm512_mul_ps(_mm512_set1_ps(scale), v));
                    }
                }
            }
        }
    }

    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn q4_0_avx512<const U: usize>(row: *const u8, blocks: usize, xs: [&[f32]; 4]) -> [f32; 4] {
        let mut acc = [_mm512_setzero_ps(); 4];
        let eight = _mm512_set1_epi32(8);
        for b in 0..blocks {
            let p = row.add(b * 18);
            let d = _mm512_set1_ps(half_at(p));
            let (lo, hi) = nibbles512(p.add(2));
            let lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(lo, eight)), d);
            let hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(hi, eight)), d);
            fma_block512::<U>(&mut acc, lo, hi, &xs, b);
        }
        reduce512::<U>(acc)
    }

    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn q4_1_avx512<const U: usize>(row: *const u8, blocks: usize, xs: [&[f32]; 4]) -> [f32; 4] {
        let mut acc = [_mm512_setzero_ps(); 4];
        for b in 0..blocks {
            let p = row.add(b * 20);
            let (d, m) = (_mm512_set1_ps(half_at(p)), _mm512_set1_ps(half_at(p.add(2))));
            let (lo, hi) = nibbles512(p.add(4));
            let lo = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lo), d), m);
            let hi = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), d), m);
            fma_block512::<U>(&mut acc, lo, hi, &xs, b);
        }
        reduce512::<U>(acc)
    }

    /// Sums of the accumulators, one per used token.
    #[inline(always)]
    unsafe fn reduce256<const U: usize>(acc: [__m256; 4]) -> [f32; 4] {
        let mut out = [0.0f32; 4];
        for t in 0..U {
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[t]);
            out[t] = lanes.iter().sum();
        }
        out
    }

    /// Adds `w[j] · x[8j..8j + 8]` for the four 8-wide pieces of block `b`.
    #[inline(always)]
    unsafe fn fma_block256<const U: usize>(acc: &mut [__m256; 4], w: [__m256; 4], xs: &[&[f32]; 4], b: usize) {
        for t in 0..U {
            let x = xs[t].as_ptr().add(b * BLOCK);
            for (j, wj) in w.iter().enumerate() {
                acc[t] = _mm256_fmadd_ps(*wj, _mm256_loadu_ps(x.add(8 * j)), acc[t]);
            }
        }
    }

    /// Four groups of 8 bytes of `lo` then `hi` (16 bytes each) as 8-lane i32 vectors.
    #[inline(always)]
    unsafe fn widen256(lo: __m128i, hi: __m128i, signed: bool) -> [__m256i; 4] {
        let cvt = |v: __m128i| if signed { _mm256_cvtepi8_epi32(v) } else { _mm256_cvtepu8_epi32(v) };
        [cvt(lo), cvt(_mm_srli_si128(lo, 8)), cvt(hi), cvt(_mm_srli_si128(hi, 8))]
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8_0_avx2<const U: usize>(row: *const u8, blocks: usize, xs: [&[f32]; 4]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        for b in 0..blocks {
            let p = row.add(b * 34);
            let d = _mm256_set1_ps(half_at(p));
            let q = widen256(
                _mm_loadu_si128(p.add(2) as *const __m128i),
                _mm_loadu_si128(p.add(18) as *const __m128i),
                true,
            );
            let w = q.map(|v| _mm256_mul_ps(_mm256_cvtepi32_ps(v), d));
            fma_block256::<U>(&mut acc, w, &xs, b);
        }
        reduce256::<U>(acc)
    }

    /// A block's 16 bytes of nibbles split into low and high nibbles.
    #[inline(always)]
    unsafe fn nibbles128(p: *const u8) -> (__m128i, __m128i) {
        let qs = _mm_loadu_si128(p as *const __m128i);
        let mask = _mm_set1_epi8(0x0f);
        (_mm_and_si128(qs, mask), _mm_and_si128(_mm_srli_epi16(qs, 4), mask))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_0_avx2<const U: usize>(row: *const u8, blocks: usize, xs: [&[f32]; 4]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        let eight = _mm256_set1_epi32(8);
        for b in 0..blocks {
            let p = row.add(b * 18);
            let d = _mm256_set1_ps(half_at(p));
            let (lo, hi) = nibbles128(p.add(2));
            let w = widen256(lo, hi, false).map(|v| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(v, eight)), d));
            fma_block256::<U>(&mut acc, w, &xs, b);
        }
        reduce256::<U>(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_1_avx2<const U: usize>(row: *const u8, blocks: usize, xs: [&[f32]; 4]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        for b in 0..blocks {
            let p = row.add(b * 20);
            let (d, m) = (_mm256_set1_ps(half_at(p)), _mm256_set1_ps(half_at(p.add(2))));
            let (lo, hi) = nibbles128(p.add(4));
            let w = widen256(lo, hi, false).map(|v| _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(v), d), m));
            fma_block256::<U>(&mut acc, w, &xs, b);
        }
        reduce256::<U>(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gemv::available_isas;
    use crate::quant::dequant::dequantize_row;
    use crate::quant::test_blocks::random_blocks;

    #[test]
    fn fused_dots_equal_dequantize_then_dot() {
        let k = 256;
        let xs: Vec<Vec<f32>> =
            (0..4).map(|t| (0..k).map(|i| ((i * 7 + t * 13) % 29) as f32 / 29.0 - 0.5).collect()).collect();
        let x: [&[f32]; 4] = std::array::from_fn(|t| xs[t].as_slice());
        for kind in [QuantKind::Q4K, QuantKind::Q6K] {
            let row = random_blocks(kind, 2, 5);
            let mut w = vec![0.0; 512];
            dequantize_row(kind, &row, &mut w);
            if available_isas().contains(&Isa::Avx512) {
                let mut widened = vec![f32::NAN; 512];
                assert!(widen_row(kind, &row, &mut widened, Isa::Avx512), "{kind:?}");
                let same = widened.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{kind:?}: widened in registers differs from the dequantizer");
            }
        }
        for kind in [QuantKind::Q8_0, QuantKind::Q4_0, QuantKind::Q4_1] {
            let row = random_blocks(kind, k / kind.block_elements(), 11);
            let mut w = vec![0.0; k];
            dequantize_row(kind, &row, &mut w);
            for isa in available_isas().into_iter().filter(|&isa| supports(kind, isa)) {
                let mut widened = vec![f32::NAN; k];
                if widen_row(kind, &row, &mut widened, isa) {
                    let same = widened.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{kind:?} {isa:?}: widened in registers differs from the dequantizer");
                }
                for used in 1..=4 {
                    let got = row_dot4(kind, &row, k, x, used, isa);
                    for t in 0..used {
                        let want: f64 = w.iter().zip(&xs[t]).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                        let scale: f64 = w.iter().zip(&xs[t]).map(|(a, b)| f64::from((a * b).abs())).sum();
                        assert!(
                            (f64::from(got[t]) - want).abs() <= 1e-5 * scale.max(1.0),
                            "{kind:?} {isa:?} used {used} token {t}: {} vs {want}",
                            got[t]
                        );
                    }
                }
            }
        }
    }
}
