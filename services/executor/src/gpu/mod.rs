//! The GPU path: the model's forward pass written once over [`KernelBackend`], the kernels of
//! `kernels/cuda` plus device memory and a GEMM.
//!
//! * [`emulated`]: the kernels built for the CPU through the SIMT emulation harness, with a CPU
//!   GEMM standing in for cuBLAS — what the tests run;
//! * [`cuda`]: the kernels on an NVIDIA GPU through cudarc, cuBLAS for the matmuls;
//! * [`device`]: finding a CUDA driver and device (`--device cuda`), failing with a clear
//!   message where there is none.

pub mod backend;
pub mod cuda;
pub mod cuda_executor;
pub mod device;
pub mod emulated;
pub mod executor;
pub mod model;

pub use backend::{DecodeMeta, DeviceValue, GpuElement, KernelBackend, PrefillMeta};
pub use cuda::CudaBackend;
pub use cuda_executor::{CudaExecutor, CudaExecutorConfig, PoolSizes};
pub use emulated::EmulatedBackend;
pub use executor::GpuExecutor;
pub use model::{GpuCache, GpuModel};
