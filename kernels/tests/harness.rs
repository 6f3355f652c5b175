//! The SIMT emulation harness (`emu/simt.h`) on kernels written to fail without its guarantees:
//! barriers that wait, threads that exit early, warp shuffles and votes, atomics, and
//! round-to-nearest-even 16-bit conversions.

use half::{bf16, f16};
// The harness test kernels are built into the library (build.rs): link it.
use pagemesh_kernels as _;

extern "C" {
    fn pm_harness_rotate(out: *mut i32, blocks: u32, threads: u32);
    fn pm_harness_early_exit(out: *mut i32, threads: u32);
    fn pm_harness_warp_ops(out: *mut i32, threads: u32);
    fn pm_harness_atomics(counter: *mut i32, maximum: *mut i32, blocks: u32, threads: u32);
    fn pm_harness_float2half(x: f32) -> u16;
    fn pm_harness_half2float(x: u16) -> f32;
    fn pm_harness_float2bfloat16(x: f32) -> u16;
}

#[test]
fn syncthreads_waits_for_the_whole_block() {
    for threads in [32u32, 100, 256, 1024] {
        let blocks = 3;
        let mut out = vec![i32::MIN; (blocks * threads) as usize];
        // SAFETY: out holds blocks × threads ints.
        unsafe { pm_harness_rotate(out.as_mut_ptr(), blocks, threads) };
        for (i, &v) in out.iter().enumerate() {
            let t = (i as u32 % threads + 1) % threads;
            assert_eq!(v, (t * t) as i32, "{threads} threads, element {i}");
        }
    }
}

#[test]
fn threads_that_return_do_not_hold_the_barrier() {
    let threads = 128;
    let mut out = vec![0i32; threads as usize / 2];
    // SAFETY: out holds threads / 2 ints.
    unsafe { pm_harness_early_exit(out.as_mut_ptr(), threads) };
    let want: i32 = (1..=64).sum();
    assert!(out.iter().all(|&v| v == want), "{out:?}");
}

#[test]
fn warp_shuffles_and_votes_follow_cuda() {
    let threads = 64;
    let mut out = vec![0i32; threads * 7];
    // SAFETY: out holds 7 ints per thread.
    unsafe { pm_harness_warp_ops(out.as_mut_ptr(), threads as u32) };
    let ballot = (0..32).filter(|l| l % 3 == 0).fold(0u32, |m, l| m | 1 << l) as i32;
    for t in 0..threads {
        let lane = (t % 32) as i32;
        let o = &out[t * 7..t * 7 + 7];
        assert_eq!(o[0], 496, "xor sum, thread {t}");
        assert_eq!(o[1], 30, "shfl from lane 3, thread {t}");
        assert_eq!(o[2], if lane < 31 { lane + 1 } else { lane }, "shfl_down, thread {t}");
        assert_eq!(o[3], if lane >= 2 { lane - 2 } else { lane }, "shfl_up, thread {t}");
        assert_eq!(o[4], ballot, "ballot, thread {t}");
        assert_eq!(o[5], i32::from(t < 32), "any: only the first warp has a lane that votes");
        assert_eq!(o[6], 1, "all, thread {t}");
    }
}

#[test]
fn atomics_count_every_thread() {
    let (mut counter, mut maximum) = (0i32, -1i32);
    // SAFETY: both point to one int.
    unsafe { pm_harness_atomics(&mut counter, &mut maximum, 5, 96) };
    assert_eq!((counter, maximum), (480, 479));
}

#[test]
fn half_conversions_round_to_nearest_even() {
    let mut values = vec![0.0f32, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 1e-8, 5.9604645e-8, 2.9802322e-8, -3.0e-5];
    values.extend([f32::INFINITY, f32::NEG_INFINITY, f32::MIN_POSITIVE, 1.0 + 1.0 / 2048.0, 1.0 + 3.0 / 2048.0]);
    let mut x = 0x0001_0000u32;
    while x < 0x7f80_0000 {
        values.push(f32::from_bits(x));
        values.push(-f32::from_bits(x.wrapping_mul(2_654_435_761) & 0x7fff_ffff).min(1e5));
        x = x.wrapping_add(0x0003_1337);
    }
    for v in values {
        // SAFETY: plain value conversions.
        let (h, b) = unsafe { (pm_harness_float2half(v), pm_harness_float2bfloat16(v)) };
        assert_eq!(h, f16::from_f32(v).to_bits(), "f16 of {v:e}");
        assert_eq!(b, bf16::from_f32(v).to_bits(), "bf16 of {v:e}");
        // SAFETY: as above.
        let back = unsafe { pm_harness_half2float(h) };
        assert_eq!(back.to_bits(), f16::from_bits(h).to_f32().to_bits(), "f16 {h:#06x} widened");
    }
    // SAFETY: as above.
    assert!(unsafe { pm_harness_half2float(pm_harness_float2half(f32::NAN)) }.is_nan());
}
