//! The few-token path of dense layers: each weight row is streamed once from memory, widened
//! to f32 in registers (bf16 by a shift, f16 by `vcvtph2ps`) and dotted with up to four
//! tokens' activations at a time. Explicit AVX-512 and AVX2 kernels, chosen once at run time,
//! with a portable fallback.

use half::{bf16, f16};

use super::simd::dot4_portable_widened;

/// Weight element types the kernels read.
#[derive(Clone, Copy)]
pub enum RowsRef<'a> {
    /// f32 rows.
    F32(&'a [f32]),
    /// f16 rows.
    F16(&'a [f16]),
    /// bf16 rows.
    BF16(&'a [bf16]),
}

/// Instruction sets the kernels are built for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Isa {
    /// AVX-512F (16 lanes).
    Avx512,
    /// AVX2 + FMA + F16C (8 lanes).
    Avx2,
    /// Plain Rust.
    Portable,
}

/// The best instruction set this processor has (checked once).
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var_os("PAGEMESH_NO_AVX512").is_none() && is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    })
}

/// Every instruction set this processor can run, best first.
pub fn available_isas() -> Vec<Isa> {
    match isa() {
        Isa::Avx512 => vec![Isa::Avx512, Isa::Avx2, Isa::Portable],
        Isa::Avx2 => vec![Isa::Avx2, Isa::Portable],
        Isa::Portable => vec![Isa::Portable],
    }
}

/// Calls a kernel instantiated for the number of used activation rows (1 to 4), so that its
/// accumulators stay in registers.
#[cfg(target_arch = "x86_64")]
macro_rules! by_used {
    ($used:expr, $kernel:ident, $($arg:expr),*) => {
        match $used {
            1 => x86::$kernel::<1>($($arg),*),
            2 => x86::$kernel::<2>($($arg),*),
            3 => x86::$kernel::<3>($($arg),*),
            _ => x86::$kernel::<4>($($arg),*),
        }
    };
}

/// `out[t] = Σ_i w[row, i] · xs[t][i]` for one weight row of width `k` and up to four
/// activation rows (unused entries of `xs` are ignored).
#[inline]
pub fn row_dot4(rows: RowsRef<'_>, row: usize, k: usize, xs: [&[f32]; 4], used: usize, isa: Isa) -> [f32; 4] {
    let range = row * k..(row + 1) * k;
    for x in &xs[..used] {
        assert!(x.len() >= k, "activation row too short");
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the ISA was detected on this processor; slices are at least `k` long.
        unsafe {
            match (isa, rows) {
                (Isa::Avx512, RowsRef::F32(w)) => return by_used!(used, f32_avx512, w[range].as_ptr(), k, xs),
                (Isa::Avx512, RowsRef::F16(w)) => return by_used!(used, f16_avx512, w[range].as_ptr(), k, xs),
                (Isa::Avx512, RowsRef::BF16(w)) => return by_used!(used, bf16_avx512, w[range].as_ptr(), k, xs),
                (Isa::Avx2, RowsRef::F32(w)) => return by_used!(used, f32_avx2, w[range].as_ptr(), k, xs),
                (Isa::Avx2, RowsRef::F16(w)) => return by_used!(used, f16_avx2, w[range].as_ptr(), k, xs),
                (Isa::Avx2, RowsRef::BF16(w)) => return by_used!(used, bf16_avx2, w[range].as_ptr(), k, xs),
                (Isa::Portable, _) => {}
            }
        }
    }
    let _ = isa;
    match rows {
        RowsRef::F32(w) => dot4_portable_widened(&w[range], |v| *v, xs, used),
        RowsRef::F16(w) => dot4_portable_widened(&w[range], |v| v.to_f32(), xs, used),
        RowsRef::BF16(w) => dot4_portable_widened(&w[range], |v| v.to_f32(), xs, used),
    }
}

/// Like [`row_dot4`] for four adjacent rows `row .. row + 4` at once.
#[inline]
pub fn rows4_dot4(rows: RowsRef<'_>, row: usize, k: usize, xs: [&[f32]; 4], used: usize, isa: Isa) -> [[f32; 4]; 4] {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && used == 1 {
        assert!(xs[0].len() >= k, "activation row too short");
        // SAFETY: AVX-512F was detected; rows and the activation are at least `k` long.
        return std::array::from_fn(|r| {
            let range = (row + r) * k..(row + r + 1) * k;
            let v = unsafe {
                match rows {
                    RowsRef::F32(w) => x86::f32_avx512_single(w[range].as_ptr(), k, xs[0]),
                    RowsRef::F16(w) => x86::f16_avx512_single(w[range].as_ptr(), k, xs[0]),
                    RowsRef::BF16(w) => x86::bf16_avx512_single(w[range].as_ptr(), k, xs[0]),
                }
            };
            [v, 0.0, 0.0, 0.0]
        });
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        for x in &xs[..used] {
            assert!(x.len() >= k, "activation row too short");
        }
        fn ptrs<T>(w: &[T], row: usize, k: usize) -> [*const T; 4] {
            std::array::from_fn(|r| w[(row + r) * k..(row + r + 1) * k].as_ptr())
        }
        // SAFETY: AVX-512F was detected; rows and activations are at least `k` long.
        unsafe {
            return match rows {
                RowsRef::F32(w) => by_used!(used, f32_avx512_4, ptrs(w, row, k), k, xs),
                RowsRef::F16(w) => by_used!(used, f16_avx512_4, ptrs(w, row, k), k, xs),
                RowsRef::BF16(w) => by_used!(used, bf16_avx512_4, ptrs(w, row, k), k, xs),
            };
        }
    }
    std::array::from_fn(|r| row_dot4(rows, row + r, k, xs, used, isa))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    macro_rules! kernel512 {
        ($name:ident, $elem:ty, $load:expr) => {
            #[target_feature(enable = "avx512f")]
            pub unsafe fn $name<const U: usize>(w: *const $elem, k: usize, xs: [&[f32]; 4]) -> [f32; 4] {
                let used = U;
                let load = $load;
                let mut acc = [_mm512_setzero_ps(); 4];
                let mut i = 0;
                while i + 16 <= k {
                    let wv = load(w.add(i));
                    for t in 0..4 {
                        if t < used {
                            acc[t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xs[t].as_ptr().add(i)), acc[t]);
                        }
                    }
                    i += 16;
                }
                let mut out = [0.0f32; 4];
                for t in 0..used {
                    let mut s = _mm512_reduce_add_ps(acc[t]);
                    for j in i..k {
                        s += widen(*w.add(j)) * xs[t][j];
                    }
                    out[t] = s;
                }
                out
            }
        };
    }

    macro_rules! kernel512_4rows {
        ($name:ident, $elem:ty, $load:expr) => {
            #[target_feature(enable = "avx512f")]
            pub unsafe fn $name<const U: usize>(w: [*const $elem; 4], k: usize, xs: [&[f32]; 4]) -> [[f32; 4]; 4] {
                let used = U;
                let load = $load;
                let mut acc = [[_mm512_setzero_ps(); 4]; 4];
                let mut i = 0;
                while i + 16 <= k {
                    let wv = [load(w[0].add(i)), load(w[1].add(i)), load(w[2].add(i)), load(w[3].add(i))];
                    for t in 0..4 {
                        if t < used {
                            let xv = _mm512_loadu_ps(xs[t].as_ptr().add(i));
                            for r in 0..4 {
                                acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
                            }
                        }
                    }
                    i += 16;
                }
                let mut out = [[0.0f32; 4]; 4];
                for r in 0..4 {
                    for t in 0..used {
                        let mut s = _mm512_reduce_add_ps(acc[r][t]);
                        for j in i..k {
                            s += widen(*w[r].add(j)) * xs[t][j];
                        }
                        out[r][t] = s;
                    }
                }
                out
            }
        };
    }

    macro_rules! kernel512_single {
        ($name:ident, $elem:ty, $load:expr) => {
            /// One weight row against one activation row, four accumulator chains.
            #[target_feature(enable = "avx512f")]
            pub unsafe fn $name(w: *const $elem, k: usize, x: &[f32]) -> f32 {
                let load = $load;
                let mut acc = [_mm512_setzero_ps(); 4];
                let mut i = 0;
                while i + 64 <= k {
                    for (c, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(load(w.add(i + 16 * c)), _mm512_loadu_ps(x.as_ptr().add(i + 16 * c)), *a);
                    }
                    i += 64;
                }
                while i + 16 <= k {
                    acc[0] = _mm512_fmadd_ps(load(w.add(i)), _mm512_loadu_ps(x.as_ptr().add(i)), acc[0]);
                    i += 16;
                }
                let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
                let mut s = _mm512_reduce_add_ps(sum);
                for j in i..k {
                    s += widen(*w.add(j)) * x[j];
                }
                s
            }
        };
    }

    macro_rules! kernel256 {
        ($name:ident, $elem:ty, $load:expr) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name<const U: usize>(w: *const $elem, k: usize, xs: [&[f32]; 4]) -> [f32; 4] {
                let used = U;
                let load = $load;
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut i = 0;
                while i + 8 <= k {
                    let wv = load(w.add(i));
                    for t in 0..4 {
                        if t < used {
                            acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs[t].as_ptr().add(i)), acc[t]);
                        }
                    }
                    i += 8;
                }
                let mut out = [0.0f32; 4];
                for t in 0..used {
                    let mut lanes = [0.0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), acc[t]);
                    let mut s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
                    for j in i..k {
                        s += widen(*w.add(j)) * xs[t][j];
                    }
                    out[t] = s;
                }
                out
            }
        };
    }

    trait Widen {
        fn widen(self) -> f32;
    }
    impl Widen for f32 {
        fn widen(self) -> f32 {
            self
        }
    }
    impl Widen for f16 {
        fn widen(self) -> f32 {
            self.to_f32()
        }
    }
    impl Widen for bf16 {
        fn widen(self) -> f32 {
            self.to_f32()
        }
    }
    fn widen<T: Widen>(v: T) -> f32 {
        v.widen()
    }

    kernel512!(f32_avx512, f32, |p: *const f32| _mm512_loadu_ps(p));
    kernel512!(f16_avx512, f16, |p: *const f16| _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)));
    kernel512!(bf16_avx512, bf16, |p: *const bf16| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i))
    )));
    kernel512_4rows!(f32_avx512_4, f32, |p: *const f32| _mm512_loadu_ps(p));
    kernel512_4rows!(f16_avx512_4, f16, |p: *const f16| _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)));
    kernel512_4rows!(bf16_avx512_4, bf16, |p: *const bf16| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i))
    )));
    kernel512_single!(f32_avx512_single, f32, |p: *const f32| _mm512_loadu_ps(p));
    kernel512_single!(f16_avx512_single, f16, |p: *const f16| _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)));
    kernel512_single!(bf16_avx512_single, bf16, |p: *const bf16| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i))
    )));
    kernel256!(f32_avx2, f32, |p: *const f32| _mm256_loadu_ps(p));
    kernel256!(f16_avx2, f16, |p: *const f16| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)));
    kernel256!(bf16_avx2, bf16, |p: *const bf16| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
        _mm_loadu_si128(p as *const __m128i)
    ))));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_matches_a_scalar_reference() {
        let k = 37;
        let w: Vec<f32> = (0..4 * k).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
        let x: Vec<Vec<f32>> =
            (0..4).map(|t| (0..k).map(|i| ((i + t * 13) % 17) as f32 / 8.0 - 1.0).collect()).collect();
        let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        for isa in available_isas() {
            for (rows, values) in [
                (RowsRef::F32(&w), w.clone()),
                (RowsRef::F16(&wh), wh.iter().map(|v| v.to_f32()).collect::<Vec<_>>()),
                (RowsRef::BF16(&wb), wb.iter().map(|v| v.to_f32()).collect::<Vec<_>>()),
            ] {
                for used in 1..=4 {
                    let xs: [&[f32]; 4] = std::array::from_fn(|t| x[t].as_slice());
                    let four = rows4_dot4(rows, 0, k, xs, used, isa);
                    for r in 0..4 {
                        let one = row_dot4(rows, r, k, xs, used, isa);
                        for t in 0..used {
                            let want: f32 = (0..k).map(|i| values[r * k + i] * x[t][i]).sum();
                            assert!((one[t] - want).abs() < 1e-4, "{isa:?} row {r} token {t}");
                            assert!((four[r][t] - want).abs() < 1e-4, "{isa:?} x4 row {r} token {t}");
                        }
                    }
                }
            }
        }
    }
}
