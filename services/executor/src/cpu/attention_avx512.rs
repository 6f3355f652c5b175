//! AVX-512 inner loops of the CPU attention for the common shapes: block size 16 (one key
//! column per register) and head dims that are multiples of 16. Several independent
//! accumulators keep the fused multiply-adds from waiting on each other.

use std::arch::x86_64::*;

/// `out[s] = scale · Σ_d q[d] · K[d][s]` for one block of 16 transposed keys.
///
/// # Safety
/// The processor must have AVX-512F; `keys` holds at least `16 · q.len()` values and `out` 16.
#[target_feature(enable = "avx512f")]
pub unsafe fn block_scores16(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
    debug_assert!(keys.len() >= 16 * q.len() && out.len() >= 16);
    let mut acc = [_mm512_setzero_ps(); 4];
    let k = keys.as_ptr();
    let mut d = 0;
    while d + 4 <= q.len() {
        for (lane, a) in acc.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(_mm512_set1_ps(q[d + lane]), _mm512_loadu_ps(k.add((d + lane) * 16)), *a);
        }
        d += 4;
    }
    while d < q.len() {
        acc[0] = _mm512_fmadd_ps(_mm512_set1_ps(q[d]), _mm512_loadu_ps(k.add(d * 16)), acc[0]);
        d += 1;
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_storeu_ps(out.as_mut_ptr(), _mm512_mul_ps(sum, _mm512_set1_ps(scale)));
}

/// `out += Σ_j p[j] · V[j]` over `p.len()` value rows of `HD` values (`HD` a multiple of 16,
/// at most 256), two rows at a time into separate accumulators.
///
/// # Safety
/// The processor must have AVX-512F; `values` holds at least `HD · p.len()` values and `out` `HD`.
#[target_feature(enable = "avx512f")]
pub unsafe fn accumulate_values<const HD: usize>(p: &[f32], values: &[f32], out: &mut [f32]) {
    const MAX_VECTORS: usize = 16;
    let vectors = HD / 16;
    debug_assert!(HD.is_multiple_of(16) && vectors <= MAX_VECTORS && values.len() >= HD * p.len());
    let mut even = [_mm512_setzero_ps(); MAX_VECTORS];
    let mut odd = [_mm512_setzero_ps(); MAX_VECTORS];
    let v = values.as_ptr();
    let mut j = 0;
    while j + 2 <= p.len() {
        let (w0, w1) = (_mm512_set1_ps(p[j]), _mm512_set1_ps(p[j + 1]));
        for (c, (e, o)) in even.iter_mut().zip(odd.iter_mut()).take(vectors).enumerate() {
            *e = _mm512_fmadd_ps(w0, _mm512_loadu_ps(v.add(j * HD + 16 * c)), *e);
            *o = _mm512_fmadd_ps(w1, _mm512_loadu_ps(v.add((j + 1) * HD + 16 * c)), *o);
        }
        j += 2;
    }
    if j < p.len() {
        let w0 = _mm512_set1_ps(p[j]);
        for (c, e) in even.iter_mut().take(vectors).enumerate() {
            *e = _mm512_fmadd_ps(w0, _mm512_loadu_ps(v.add(j * HD + 16 * c)), *e);
        }
    }
    let o = out.as_mut_ptr();
    for (c, (e, od)) in even.iter().zip(&odd).take(vectors).enumerate() {
        let total = _mm512_add_ps(_mm512_loadu_ps(o.add(16 * c)), _mm512_add_ps(*e, *od));
        _mm512_storeu_ps(o.add(16 * c), total);
    }
}
