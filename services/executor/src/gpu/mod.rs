//! The GPU path: the model's forward pass written once over [`KernelBackend`], the kernels of
//! `kernels/cuda` plus device memory and a GEMM.
//!
//! * [`emulated`]: the kernels built for the CPU through the SIMT emulation harness, with a CPU
//!   GEMM standing in for cuBLAS — what the tests run;
//! * [`cuda`]: the kernels on an NVIDIA GPU through cudarc, cuBLAS for the matmuls;
//! * [`device`]: finding a CUDA driver and device (`--device cuda`), failing with a clear
//!   message where there is none; [`libraries`]: finding cuBLAS and NVRTC of CUDA 13 or 12;
//! * [`loader`]: a model onto either backend, pools sized, step plans run.

pub mod backend;
pub mod cuda;
pub mod device;
pub mod emulated;
pub mod executor;
pub mod libraries;
pub mod loader;
pub mod model;

pub use backend::{DecodeMeta, DeviceValue, GpuElement, KernelBackend, PrefillMeta};
pub use cuda::CudaBackend;
pub use emulated::EmulatedBackend;
pub use executor::GpuExecutor;
pub use loader::{CudaExecutor, DtypeExecutor, EmulatedExecutor, GpuLoadConfig, PoolSizes};
pub use model::{GpuCache, GpuModel};
