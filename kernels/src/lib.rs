//! The pagemesh CUDA kernels.
//!
//! * [`source`]: the CUDA C++ sources (`cuda/*.cu`), ready for NVRTC, and the names of every
//!   kernel they define;
//! * [`geometry`]: the launch constants shared with the sources and the grid of every kernel,
//!   computed once for every backend that launches them;
//! * [`signature`]: every kernel's parameter list, checked against the sources, for launchers to
//!   check their arguments against;
//! * [`emu`]: the very same sources built as host C++ through the SIMT emulation harness
//!   (`emu/simt.h`), callable on slices, so that tests check the kernels without a GPU.
//!
//! Cache layout (the CPU backend's): K is `[blocks][kv_heads][head_dim][block_size]`, V is
//! `[blocks][kv_heads][block_size][head_dim]`, per layer.

pub mod element;
pub mod emu;
pub mod geometry;
pub mod signature;
pub mod source;

pub use element::{Dtype, Element};
pub use geometry::{AttentionShape, PrefillTile};
