//! `--device cuda`: finding the CUDA driver and libraries before anything touches them.
//!
//! cudarc loads the driver and cuBLAS lazily and panics when a library is missing, so the
//! executor checks first and turns every missing piece into an [`ExecutorError::Device`] that
//! says what is missing and how to get it.

use std::path::Path;

use pagemesh_shared::limits::DEFAULT_MAX_EXECUTOR_BLOCKS;

use super::libraries::{open_cuda_libraries, LIB_DIR_ENV};
use crate::error::{ExecutorError, Result};

/// The compute device an executor runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The CPU backend.
    Cpu,
    /// An NVIDIA GPU through CUDA.
    Cuda,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            other => Err(format!("unknown device {other:?} (cpu or cuda)")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
}

/// Checks that the CUDA driver, cuBLAS and NVRTC (CUDA 13 or 12) can be loaded and that a GPU
/// is visible, without panicking when they cannot. `lib_dir` is `--cuda-lib-dir`, searched
/// first (see [`libraries`](super::libraries)).
pub fn probe_cuda(lib_dir: Option<&Path>) -> Result<()> {
    // SAFETY: only tries to open the library (dlopen), resolving no symbol.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(ExecutorError::Device(
            "--device cuda: the NVIDIA driver library (libcuda.so.1) was not found; install the NVIDIA \
             driver (535 or newer for CUDA 12, 580 or newer for CUDA 13) on a machine with an NVIDIA GPU of \
             compute capability 8.0 or newer, or run with --device cpu"
                .into(),
        ));
    }
    open_cuda_libraries(lib_dir).map_err(ExecutorError::Device)?;
    // SAFETY: as above.
    let found = unsafe { cudarc::cublas::sys::is_culib_present() && cudarc::nvrtc::sys::is_culib_present() };
    if !found {
        return Err(ExecutorError::Device(format!(
            "--device cuda: cuBLAS or NVRTC (libcublas.so.13/.12, libnvrtc.so.13/.12) could not be opened; \
             point --cuda-lib-dir or {LIB_DIR_ENV} at the directory holding them"
        )));
    }
    let count = cudarc::driver::CudaContext::device_count()
        .map_err(|e| ExecutorError::Device(format!("--device cuda: the CUDA driver failed to start: {e}")))?;
    if count == 0 {
        return Err(ExecutorError::Device("--device cuda: the CUDA driver sees no GPU".into()));
    }
    Ok(())
}

/// KV blocks that fit a GPU: of `total_bytes`, the executor may use `utilization`; what is
/// already taken (`total_bytes - free_bytes`, measured after the weights and workspaces are
/// loaded) comes off that, and the rest is cut into blocks of `bytes_per_block` (K and V of
/// every layer), at most [`DEFAULT_MAX_EXECUTOR_BLOCKS`] (what the scheduler accepts).
pub fn kv_pool_blocks(total_bytes: u64, free_bytes: u64, utilization: f64, bytes_per_block: u64) -> usize {
    let budget = (total_bytes as f64 * utilization.clamp(0.0, 1.0)) as u64;
    let used = total_bytes.saturating_sub(free_bytes);
    let blocks = budget.saturating_sub(used) / bytes_per_block.max(1);
    blocks.min(u64::from(DEFAULT_MAX_EXECUTOR_BLOCKS)) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_gets_the_budget_left_after_the_weights() {
        let gib = 1u64 << 30;
        // 80 GiB, 14 GiB taken by weights: 0.9 * 80 - 14 = 58 GiB of 2 MiB blocks.
        assert_eq!(kv_pool_blocks(80 * gib, 66 * gib, 0.9, 2 << 20), (72 * gib - 14 * gib) as usize / (2 << 20));
        assert_eq!(kv_pool_blocks(80 * gib, 4 * gib, 0.9, 2 << 20), 0, "weights over the budget leave nothing");
        // A 260K-parameter model (4 KiB blocks) on a 141 GiB GPU: 33 million blocks fit, more
        // than the scheduler accepts; the pool stops at its limit (found on an H200).
        assert_eq!(kv_pool_blocks(141 * gib, 140 * gib, 0.9, 4096), DEFAULT_MAX_EXECUTOR_BLOCKS as usize);
    }

    #[test]
    fn devices_parse() {
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda));
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert!("tpu".parse::<Device>().is_err());
    }

    #[test]
    fn probing_without_a_gpu_is_an_error_not_a_panic() {
        // Here there is no NVIDIA driver; with one, a GPU may be found and the probe passes.
        if let Err(e) = probe_cuda(None) {
            assert!(e.to_string().contains("--device cuda"), "{e}");
        }
    }
}
