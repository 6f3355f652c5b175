//! f32 dot products, compiled for AVX2+FMA when the processor has them (checked once at run
//! time) and portable otherwise. Sixteen independent accumulators let the compiler vectorize
//! without reassociating a single sum.

use std::sync::OnceLock;

const LANES: usize = 16;

#[inline(always)]
fn reduce(acc: [f32; LANES]) -> f32 {
    let mut v = acc;
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            v[i] += v[i + width];
        }
        width /= 2;
    }
    v[0]
}

#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for j in 0..LANES {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s = reduce(acc);
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

#[inline(always)]
fn dot4_portable(w: &[f32], xs: [&[f32]; 4]) -> [f32; 4] {
    let n = w.len();
    let mut acc = [[0.0f32; LANES]; 4];
    let chunks = n / LANES;
    for c in 0..chunks {
        let wc = &w[c * LANES..][..LANES];
        for (acc_t, x) in acc.iter_mut().zip(xs.iter()) {
            let xc = &x[c * LANES..][..LANES];
            for j in 0..LANES {
                acc_t[j] += wc[j] * xc[j];
            }
        }
    }
    let mut out = [0.0f32; 4];
    for t in 0..4 {
        let mut s = reduce(acc[t]);
        for i in chunks * LANES..n {
            s += w[i] * xs[t][i];
        }
        out[t] = s;
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_avx2(w: &[f32], xs: [&[f32]; 4]) -> [f32; 4] {
    dot4_portable(w, xs)
}

fn has_avx2() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `Σ a[i]·b[i]` over the shorter length.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the processor has AVX2 and FMA.
        return unsafe { dot_avx2(a, b) };
    }
    dot_portable(a, b)
}

/// Four dot products of `w` with `xs[t]` (each at least as long as `w`), reading `w` once.
#[inline]
pub fn dot4(w: &[f32], xs: [&[f32]; 4]) -> [f32; 4] {
    for x in &xs {
        assert!(x.len() >= w.len(), "dot4 operand too short");
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the processor has AVX2 and FMA.
        return unsafe { dot4_avx2(w, xs) };
    }
    dot4_portable(w, xs)
}

/// `y[i] += a · x[i]`.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_match_naive_sums_for_odd_lengths() {
        for n in [0, 1, 15, 16, 17, 63, 100] {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.25).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - naive).abs() <= 1e-3 * naive.abs().max(1.0));
            let four = dot4(&a, [&b, &b, &a, &a]);
            assert!((four[0] - naive).abs() <= 1e-3 * naive.abs().max(1.0));
            let sq: f32 = a.iter().map(|x| x * x).sum();
            assert!((four[3] - sq).abs() <= 1e-3 * sq.max(1.0));
        }
    }
}
