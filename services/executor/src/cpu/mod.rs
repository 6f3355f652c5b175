//! The CPU backend: the reference implementation of the model over the paged KV cache.

pub mod attention;
#[cfg(target_arch = "x86_64")]
pub mod attention_avx512;
pub mod gemv;
pub mod kv_cache;
pub mod linear;
pub mod model;
pub mod ops;
pub mod qgemv;
pub mod simd;
