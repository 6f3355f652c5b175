//! Portable f32 reductions written so that the compiler vectorizes them for whatever target
//! features the calling function is compiled with. Sixteen independent accumulators let it
//! vectorize without reassociating a single sum.

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

/// `Σ a[i]·b[i]` over the shorter length.
#[inline(always)]
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
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

/// Up to four dot products of a weight row (widened by `widen`) with activation rows.
#[inline(always)]
pub fn dot4_portable_widened<W>(w: &[W], widen: impl Fn(&W) -> f32, xs: [&[f32]; 4], used: usize) -> [f32; 4] {
    let mut out = [0.0f32; 4];
    let mut acc = [[0.0f32; LANES]; 4];
    let chunks = w.len() / LANES;
    let mut row = [0.0f32; LANES];
    for c in 0..chunks {
        for (r, v) in row.iter_mut().zip(&w[c * LANES..][..LANES]) {
            *r = widen(v);
        }
        for t in 0..used {
            let xc = &xs[t][c * LANES..][..LANES];
            for j in 0..LANES {
                acc[t][j] += row[j] * xc[j];
            }
        }
    }
    for t in 0..used {
        let mut s = reduce(acc[t]);
        for i in chunks * LANES..w.len() {
            s += widen(&w[i]) * xs[t][i];
        }
        out[t] = s;
    }
    out
}

/// `e^x` to within about 2 ulp for `x` in [-87, 88] (clamped outside), in plain arithmetic
/// that vectorizes: `x = n·ln2 + r`, a degree-7 polynomial for `e^r`, `2^n` by exponent bits.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting rounds to nearest
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `y[i] += a · x[i]`.
#[inline(always)]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_is_accurate() {
        let mut worst = 0.0f64;
        for i in -8700..8800 {
            let x = i as f32 / 100.0;
            let want = (x as f64).exp();
            worst = worst.max(((exp_approx(x) as f64 - want) / want).abs());
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_approx(0.0), 1.0);
        assert!(exp_approx(-1000.0) < 1e-37);
    }

    #[test]
    fn dots_match_naive_sums_for_odd_lengths() {
        for n in [0, 1, 15, 16, 17, 63, 100] {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.25).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot_portable(&a, &b) - naive).abs() <= 1e-3 * naive.abs().max(1.0));
            let four = dot4_portable_widened(&a, |v| *v, [&b, &b, &a, &a], 3);
            assert!((four[0] - naive).abs() <= 1e-3 * naive.abs().max(1.0));
            let sq: f32 = a.iter().map(|x| x * x).sum();
            assert!((four[2] - sq).abs() <= 1e-3 * sq.max(1.0));
            assert_eq!(four[3], 0.0, "unused entries stay zero");
        }
    }
}
