//! [`KernelBackend`] on an NVIDIA GPU through cudarc: the kernels of `kernels/cuda` compiled
//! at start-up by NVRTC for the device's architecture, matmuls through cuBLAS, one compute
//! stream, and a second stream for swaps into and out of pinned host memory.
//!
//! Every call checks for the libraries first ([`probe_cuda`]), so a missing driver is an error,
//! never a panic. This backend has been compiled and type-checked but not yet run on a GPU (see
//! docs/cuda.md); the kernels it launches are the ones the emulation tests check.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchArgs, LaunchConfig, PinnedHostSlice,
    PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use pagemesh_kernels::geometry::{self, AttentionShape, Launch};
use pagemesh_kernels::signature::{signature, Elem, Param};
use pagemesh_kernels::source::SOURCES;
use pagemesh_kernels::Dtype;

use super::backend::{DecodeMeta, DeviceValue, GpuElement, KernelBackend, PrefillMeta};
use super::device::probe_cuda;
use super::libraries::search_dirs;
use crate::error::{ExecutorError, Result};

fn dev(what: &str) -> impl Fn(cudarc::driver::DriverError) -> ExecutorError + '_ {
    move |e| ExecutorError::Device(format!("{what}: {e}"))
}

fn int(n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| ExecutorError::Device(format!("{n} does not fit a kernel int")))
}

fn config(l: Launch) -> LaunchConfig {
    LaunchConfig { grid_dim: l.grid, block_dim: (l.block, 1, 1), shared_mem_bytes: 0 }
}

/// Where `cuda_fp16.h` and `cuda_bf16.h` are: `PAGEMESH_CUDA_INCLUDE`, `$CUDA_HOME/include`,
/// `/usr/local/cuda/include`, or the `include` beside a library directory found for
/// `--cuda-lib-dir` (a Python environment's `nvidia/cu13/include`, `nvidia/cuda_runtime/include`).
fn cuda_include_dir(lib_dir: Option<&Path>) -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = [
        std::env::var_os("PAGEMESH_CUDA_INCLUDE").map(PathBuf::from),
        std::env::var_os("CUDA_HOME").map(|h| Path::new(&h).join("include")),
        Some(PathBuf::from("/usr/local/cuda/include")),
    ]
    .into_iter()
    .flatten()
    .collect();
    for dir in search_dirs(lib_dir) {
        if let Some(package) = dir.parent() {
            candidates.push(package.join("include"));
            if let Some(nvidia) = package.parent() {
                candidates.push(nvidia.join("cuda_runtime/include"));
            }
        }
    }
    candidates.into_iter().find(|d| d.join("cuda_fp16.h").is_file()).ok_or_else(|| {
        ExecutorError::Device(
            "--device cuda: cuda_fp16.h not found: set PAGEMESH_CUDA_INCLUDE (or CUDA_HOME) to a CUDA 13 or 12 \
             include directory (the nvidia-cuda-runtime wheels have one)"
                .into(),
        )
    })
}

/// cuBLAS's (column-major) view of row-major `out[rows, n] = x[rows, k] · w[n, k]ᵀ`:
/// `outᵀ = w · xᵀ` with `a = w` (read as `k × n`, transposed) and `b = x` (read as `k × rows`).
fn gemm_config<E: GpuElement>(rows: usize, n: usize, k: usize) -> Result<GemmConfig<E>> {
    Ok(GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: int(n)?,
        n: int(rows)?,
        k: int(k)?,
        alpha: E::from_f32(1.0),
        lda: int(k)?,
        ldb: int(k)?,
        beta: E::from_f32(0.0),
        ldc: int(n)?,
    })
}

/// One GPU, its streams, cuBLAS and the loaded kernels.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    swap_stream: Arc<CudaStream>,
    blas: CudaBlas,
    functions: HashMap<String, CudaFunction>,
}

impl CudaBackend {
    /// Opens GPU `ordinal` and compiles every kernel for it; `lib_dir` is where CUDA's
    /// libraries are looked for first (`--cuda-lib-dir`).
    pub fn new(ordinal: usize, lib_dir: Option<&Path>) -> Result<Self> {
        probe_cuda(lib_dir)?;
        let count = CudaContext::device_count().map_err(dev("counting GPUs"))?;
        if ordinal >= count as usize {
            return Err(ExecutorError::Device(format!(
                "--cuda-device {ordinal}: the driver sees {count} GPU(s), numbered from 0"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(dev("opening the GPU"))?;
        // cudarc records an event for every buffer of every launch once a context has two
        // streams, to order uses across them: about 10 µs per launch, most of a decode step's
        // fixed cost on an H200 (0.75 ms for 5 layers). The backend orders its two streams
        // itself (every swap joins the compute stream before and after its copies).
        // SAFETY: no buffer exists yet; the only buffers the swap stream touches are the KV
        // pools and the pinned host pool, which live as long as the backend's cache, are
        // allocated before any swap, and are used by the swap stream only between joins with
        // the compute stream, so no use overlaps a write or outlives its buffer.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability().map_err(dev("compute capability"))?;
        if major < 8 {
            return Err(ExecutorError::Device(format!(
                "--device cuda: compute capability {major}.{minor}; the kernels need 8.0 or newer (bf16)"
            )));
        }
        let arch: &'static str = match (major, minor) {
            (8, 0) => "compute_80",
            (8, 6) => "compute_86",
            (8, 7) => "compute_87",
            (8, 9) => "compute_89",
            (9, _) => "compute_90",
            _ => "compute_80",
        };
        let include = cuda_include_dir(lib_dir)?;
        let mut functions = HashMap::new();
        for source in SOURCES {
            let opts = CompileOptions {
                arch: Some(arch),
                include_paths: vec![include.display().to_string()],
                options: vec!["--std=c++17".into()],
                ..Default::default()
            };
            let ptx = compile_ptx_with_opts(source.translation_unit(), opts)
                .map_err(|e| ExecutorError::Device(format!("NVRTC compiling {}: {e}", source.file)))?;
            let module = ctx.load_module(ptx).map_err(dev(source.file))?;
            for dtype in Dtype::ALL {
                for name in source.kernel_names(dtype) {
                    let f = module.load_function(&name).map_err(dev(&name))?;
                    functions.insert(name, f);
                }
            }
        }
        let stream = ctx.default_stream();
        let swap_stream = ctx.new_stream().map_err(dev("swap stream"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| ExecutorError::Device(format!("starting cuBLAS: {e}")))?;
        Ok(Self { ctx, stream, swap_stream, blas, functions })
    }

    /// Free and total device memory, in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(dev("memory info"))
    }

    /// The device's name.
    pub fn name(&self) -> Result<String> {
        self.ctx.name().map_err(dev("device name"))
    }

    fn function(&self, kernel: &str, dtype: Dtype) -> Result<&CudaFunction> {
        let name = format!("{kernel}_{}", dtype.suffix());
        self.functions.get(&name).ok_or_else(|| ExecutorError::Device(format!("kernel {name} is not loaded")))
    }
}

/// Checks the arguments pushed for a kernel against its signature.
fn check_args(kernel: &str, pushed: &[Param]) -> Result<()> {
    match signature(kernel) {
        Some(expected) if expected == pushed => Ok(()),
        Some(expected) => Err(ExecutorError::Device(format!(
            "launch of {kernel}: arguments {pushed:?} do not match its parameters {expected:?}"
        ))),
        None => Err(ExecutorError::Device(format!("no signature for kernel {kernel}"))),
    }
}

/// A kernel launch being built: every argument is pushed with its kind, and the kinds are
/// checked against the kernel's signature before it runs.
struct Args<'a, E> {
    kernel: &'static str,
    builder: LaunchArgs<'a>,
    pushed: Vec<Param>,
    element: std::marker::PhantomData<E>,
}

impl<'a, E: GpuElement> Args<'a, E> {
    fn new(backend: &'a CudaBackend, kernel: &'static str) -> Result<Self> {
        let f = backend.function(kernel, E::DTYPE)?;
        Ok(Self { kernel, builder: backend.stream.launch_builder(f), pushed: Vec::new(), element: Default::default() })
    }

    fn push(mut self, kind: Param, push: impl FnOnce(&mut LaunchArgs<'a>)) -> Self {
        push(&mut self.builder);
        self.pushed.push(kind);
        self
    }

    fn t_out(self, b: &'a mut CudaSlice<E>) -> Self {
        self.push(Param::Ptr(Elem::T, true), |l| {
            l.arg(b);
        })
    }
    fn t_in(self, b: &'a CudaSlice<E>) -> Self {
        self.push(Param::Ptr(Elem::T, false), |l| {
            l.arg(b);
        })
    }
    /// A raw device pointer to elements of `E` (an argument that aliases another).
    fn t_raw(self, ptr: &'a u64, writes: bool) -> Self {
        self.push(Param::Ptr(Elem::T, writes), |l| {
            l.arg(ptr);
        })
    }
    fn f32_out(self, b: &'a mut CudaSlice<f32>) -> Self {
        self.push(Param::Ptr(Elem::F32, true), |l| {
            l.arg(b);
        })
    }
    fn f32_in(self, b: &'a CudaSlice<f32>) -> Self {
        self.push(Param::Ptr(Elem::F32, false), |l| {
            l.arg(b);
        })
    }
    fn i32_in(self, b: &'a CudaSlice<i32>) -> Self {
        self.push(Param::Ptr(Elem::I32, false), |l| {
            l.arg(b);
        })
    }
    fn i64_in(self, b: &'a CudaSlice<i64>) -> Self {
        self.push(Param::Ptr(Elem::I64, false), |l| {
            l.arg(b);
        })
    }
    fn int(self, v: &'a i32) -> Self {
        self.push(Param::Int, |l| {
            l.arg(v);
        })
    }
    fn long(self, v: &'a i64) -> Self {
        self.push(Param::Long, |l| {
            l.arg(v);
        })
    }
    fn float(self, v: &'a f32) -> Self {
        self.push(Param::Float, |l| {
            l.arg(v);
        })
    }

    /// Checks the arguments and launches.
    ///
    /// # Safety
    /// The buffers must be as large as the kernel reads and writes for this launch.
    unsafe fn launch(mut self, launch: Launch) -> Result<()> {
        check_args(self.kernel, &self.pushed)?;
        // SAFETY: the arguments match the kernel's parameters; sizes are the caller's promise.
        unsafe { self.builder.launch(config(launch)) }
            .map(drop)
            .map_err(|e| ExecutorError::Device(format!("launching {}: {e}", self.kernel)))
    }
}

impl<E: GpuElement> KernelBackend<E> for CudaBackend
where
    CudaBlas: Gemm<E>,
{
    type Buffer<T: DeviceValue> = CudaSlice<T>;
    type HostPool = PinnedHostSlice<E>;

    fn upload<T: DeviceValue>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        if data.is_empty() {
            return self.stream.alloc_zeros::<T>(1).map_err(dev("allocating"));
        }
        self.stream.clone_htod(data).map_err(dev("copying to the GPU"))
    }

    fn zeros<T: DeviceValue>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(len.max(1)).map_err(dev("allocating"))
    }

    fn download(&self, buf: &CudaSlice<E>) -> Result<Vec<E>> {
        self.stream.clone_dtoh(buf).map_err(dev("copying from the GPU"))
    }

    fn host_pool(&self, len: usize) -> Result<PinnedHostSlice<E>> {
        // SAFETY: the pinned memory is zeroed below before anything reads it.
        let mut pool = unsafe { self.ctx.alloc_pinned::<E>(len.max(1)) }.map_err(dev("allocating pinned memory"))?;
        pool.as_mut_slice().map_err(dev("pinned memory"))?.fill(E::default());
        Ok(pool)
    }

    fn swap_out(
        &self,
        device: &CudaSlice<E>,
        host: &mut PinnedHostSlice<E>,
        pairs: &[(u32, u32)],
        block_len: usize,
    ) -> Result<()> {
        // The swap stream starts after every kernel issued so far and the compute stream goes
        // on only after the copies: a block is read after its last write and before reuse.
        self.swap_stream.join(&self.stream).map_err(dev("ordering a swap"))?;
        let base = host.as_mut_ptr().map_err(dev("pinned memory"))?;
        for &(d, h) in pairs {
            let (d, h) = (d as usize * block_len, h as usize * block_len);
            let src = device.slice(d..d + block_len);
            let (ptr, _record) = src.device_ptr(&self.swap_stream);
            // SAFETY: host block h lies inside the pool (checked by the cache); the pinned
            // memory outlives the copy, which is ordered before any later use on both streams.
            unsafe {
                let dst = std::slice::from_raw_parts_mut(base.add(h), block_len);
                cudarc::driver::result::memcpy_dtoh_async(dst, ptr, self.swap_stream.cu_stream())
            }
            .map_err(dev("swap-out copy"))?;
        }
        self.stream.join(&self.swap_stream).map_err(dev("ordering a swap"))
    }

    fn swap_in(
        &self,
        host: &PinnedHostSlice<E>,
        device: &mut CudaSlice<E>,
        pairs: &[(u32, u32)],
        block_len: usize,
    ) -> Result<()> {
        self.swap_stream.join(&self.stream).map_err(dev("ordering a swap"))?;
        let base = host.as_ptr().map_err(dev("pinned memory"))?;
        for &(h, d) in pairs {
            let (h, d) = (h as usize * block_len, d as usize * block_len);
            let mut dst = device.slice_mut(d..d + block_len);
            let (ptr, _record) = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut dst, &self.swap_stream);
            // SAFETY: as in swap_out.
            unsafe {
                let src = std::slice::from_raw_parts(base.add(h), block_len);
                cudarc::driver::result::memcpy_htod_async(ptr, src, self.swap_stream.cu_stream())
            }
            .map_err(dev("swap-in copy"))?;
        }
        self.stream.join(&self.swap_stream).map_err(dev("ordering a swap"))
    }

    fn gemm(
        &self,
        out: &mut CudaSlice<E>,
        x: &CudaSlice<E>,
        w: &CudaSlice<E>,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let cfg = gemm_config::<E>(rows, n, k)?;
        // SAFETY: w is [n, k], x [rows, k] and out [rows, n], as the caller sized them.
        unsafe { self.blas.gemm(cfg, w, x, out) }.map_err(|e| ExecutorError::Device(format!("cuBLAS gemm: {e}")))
    }

    fn embedding(&self, out: &mut CudaSlice<E>, table: &CudaSlice<E>, tokens: &CudaSlice<i32>, d: usize) -> Result<()> {
        let d = int(d)?;
        let launch = geometry::per_row(tokens.len());
        let args = Args::new(self, "embedding")?.t_out(out).t_in(table).i32_in(tokens).int(&d);
        // SAFETY: out holds tokens.len() rows of d; every token is below the table's rows.
        unsafe { args.launch(launch) }
    }

    fn rms_norm(&self, out: &mut CudaSlice<E>, x: &CudaSlice<E>, w: &CudaSlice<E>, eps: f32) -> Result<()> {
        let d = int(w.len())?;
        let launch = geometry::per_row(x.len() / w.len().max(1));
        let args = Args::new(self, "rms_norm")?.t_out(out).t_in(x).t_in(w).float(&eps).int(&d);
        // SAFETY: x and out are rows × d.
        unsafe { args.launch(launch) }
    }

    fn fused_add_rms_norm(
        &self,
        out: &mut CudaSlice<E>,
        residual: &mut CudaSlice<E>,
        delta: &CudaSlice<E>,
        w: &CudaSlice<E>,
        eps: f32,
    ) -> Result<()> {
        let d = int(w.len())?;
        let launch = geometry::per_row(residual.len() / w.len().max(1));
        let args =
            Args::new(self, "fused_add_rms_norm")?.t_out(out).t_out(residual).t_in(delta).t_in(w).float(&eps).int(&d);
        // SAFETY: all three are rows × d.
        unsafe { args.launch(launch) }
    }

    fn rope(
        &self,
        q: &mut CudaSlice<E>,
        k: &mut CudaSlice<E>,
        positions: &CudaSlice<i32>,
        inv_freq: &CudaSlice<f32>,
        shape: &AttentionShape,
    ) -> Result<()> {
        let (heads, kv_heads, hd) = (int(shape.num_heads)?, int(shape.num_kv_heads)?, int(shape.head_dim)?);
        let launch = geometry::per_row(positions.len());
        let args = Args::new(self, "rope")?;
        let args = args.t_out(q).t_out(k).i32_in(positions).f32_in(inv_freq).int(&heads).int(&kv_heads).int(&hd);
        // SAFETY: q and k hold one row per position; inv_freq head_dim / 2 entries.
        unsafe { args.launch(launch) }
    }

    fn add_bias(&self, x: &mut CudaSlice<E>, bias: &CudaSlice<E>) -> Result<()> {
        let (n, total) = (int(bias.len())?, x.len() as i64);
        if bias.is_empty() || !x.len().is_multiple_of(bias.len()) {
            return Err(ExecutorError::Device(format!(
                "add_bias: {} elements are not rows of {}",
                x.len(),
                bias.len()
            )));
        }
        let launch = geometry::per_element(x.len());
        let args = Args::<E>::new(self, "add_bias")?.t_out(x).t_in(bias).int(&n).long(&total);
        // SAFETY: x holds whole rows of bias.len() elements.
        unsafe { args.launch(launch) }
    }

    fn silu_mul_in_place(&self, gate: &mut CudaSlice<E>, up: &CudaSlice<E>) -> Result<()> {
        let n = gate.len() as i64;
        let launch = geometry::per_element(gate.len());
        let (ptr, _record) = cudarc::driver::DevicePtrMut::device_ptr_mut(gate, &self.stream);
        // The kernel's output is its gate input: the same pointer twice.
        let args = Args::<E>::new(self, "silu_mul")?.t_raw(&ptr, true).t_raw(&ptr, false).t_in(up).long(&n);
        // SAFETY: gate and up hold n elements.
        unsafe { args.launch(launch) }
    }

    fn reshape_and_cache(
        &self,
        k: &CudaSlice<E>,
        v: &CudaSlice<E>,
        k_cache: &mut CudaSlice<E>,
        v_cache: &mut CudaSlice<E>,
        slots: &CudaSlice<i64>,
        shape: &AttentionShape,
    ) -> Result<()> {
        let (kv_heads, hd, bs) = (int(shape.num_kv_heads)?, int(shape.head_dim)?, int(shape.block_size)?);
        let launch = geometry::per_row(slots.len());
        let args = Args::new(self, "reshape_and_cache")?;
        let args = args.t_in(k).t_in(v).t_out(k_cache).t_out(v_cache).i64_in(slots).int(&kv_heads).int(&hd).int(&bs);
        // SAFETY: every slot is inside the pools (checked by the forward pass).
        unsafe { args.launch(launch) }
    }

    fn copy_blocks(
        &self,
        k_cache: &mut CudaSlice<E>,
        v_cache: &mut CudaSlice<E>,
        pairs: &[(u32, u32)],
        shape: &AttentionShape,
    ) -> Result<()> {
        let flat: Vec<i32> = pairs.iter().flat_map(|&(s, d)| [s as i32, d as i32]).collect();
        let flat = <Self as KernelBackend<E>>::upload(self, &flat)?;
        let len = shape.block_len() as i64;
        let args = Args::new(self, "copy_blocks")?.t_out(k_cache).t_out(v_cache).i32_in(&flat).long(&len);
        // SAFETY: every block is inside the pools (checked by the cache).
        unsafe { args.launch(geometry::per_row(pairs.len())) }
    }

    fn paged_attention_decode(
        &self,
        out: &mut CudaSlice<E>,
        q: &CudaSlice<E>,
        k_cache: &CudaSlice<E>,
        v_cache: &CudaSlice<E>,
        meta: &DecodeMeta<CudaSlice<i32>>,
        shape: &AttentionShape,
    ) -> Result<()> {
        let launch = geometry::decode(shape, meta.num_seqs, meta.max_context);
        let parts = launch.grid.2 as usize;
        let slots = meta.num_seqs * shape.num_heads * parts;
        let mut part_out = self.stream.alloc_zeros::<f32>(slots * shape.head_dim).map_err(dev("allocating"))?;
        let mut part_sum = self.stream.alloc_zeros::<f32>(slots).map_err(dev("allocating"))?;
        let mut part_max = self.stream.alloc_zeros::<f32>(slots).map_err(dev("allocating"))?;
        let (max_blocks, heads, kv_heads) = (int(meta.max_blocks)?, int(shape.num_heads)?, int(shape.num_kv_heads)?);
        let (hd, bs, scale, max_parts) = (int(shape.head_dim)?, int(shape.block_size)?, shape.scale(), int(parts)?);
        let args = Args::new(self, "paged_attention_decode")?
            .f32_out(&mut part_out)
            .f32_out(&mut part_sum)
            .f32_out(&mut part_max)
            .t_in(q)
            .i32_in(&meta.q_rows)
            .t_in(k_cache)
            .t_in(v_cache)
            .i32_in(&meta.tables)
            .int(&max_blocks)
            .i32_in(&meta.context_lens)
            .int(&heads)
            .int(&kv_heads)
            .int(&hd)
            .int(&bs)
            .float(&scale);
        // SAFETY: the metadata was built from a checked batch: rows, blocks and contexts are in range.
        unsafe { args.launch(launch) }?;
        let args = Args::new(self, "paged_attention_reduce")?
            .t_out(out)
            .f32_in(&part_out)
            .f32_in(&part_sum)
            .f32_in(&part_max)
            .i32_in(&meta.q_rows)
            .i32_in(&meta.context_lens)
            .int(&heads)
            .int(&hd)
            .int(&max_parts);
        // SAFETY: as above; the partition buffers match the decode launch.
        unsafe { args.launch(geometry::decode_reduce(shape, meta.num_seqs)) }
    }

    fn paged_attention_prefill(
        &self,
        out: &mut CudaSlice<E>,
        q: &CudaSlice<E>,
        k_cache: &CudaSlice<E>,
        v_cache: &CudaSlice<E>,
        meta: &PrefillMeta<CudaSlice<i32>>,
        shape: &AttentionShape,
    ) -> Result<()> {
        let (max_blocks, heads, kv_heads) = (int(meta.max_blocks)?, int(shape.num_heads)?, int(shape.num_kv_heads)?);
        let (hd, bs, scale) = (int(shape.head_dim)?, int(shape.block_size)?, shape.scale());
        let args = Args::new(self, "paged_attention_prefill")?
            .t_out(out)
            .t_in(q)
            .t_in(k_cache)
            .t_in(v_cache)
            .i32_in(&meta.tables)
            .int(&max_blocks)
            .i32_in(&meta.tiles)
            .int(&heads)
            .int(&kv_heads)
            .int(&hd)
            .int(&bs)
            .float(&scale);
        // SAFETY: the tiles were built from a checked batch.
        unsafe { args.launch(geometry::prefill(shape, meta.num_tiles)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cuBLAS's gemm as its documentation defines it: column-major operands, `op` transposing
    /// when asked, `C = α·op(A)·op(B) + β·C`.
    fn cublas_reference(cfg: &GemmConfig<f32>, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (m, n, k) = (cfg.m as usize, cfg.n as usize, cfg.k as usize);
        let t = |op| op == cublasOperation_t::CUBLAS_OP_T;
        let at =
            |i: usize, p: usize| if t(cfg.transa) { a[p + i * cfg.lda as usize] } else { a[i + p * cfg.lda as usize] };
        let bt =
            |p: usize, j: usize| if t(cfg.transb) { b[j + p * cfg.ldb as usize] } else { b[p + j * cfg.ldb as usize] };
        for i in 0..m {
            for j in 0..n {
                let dot: f32 = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
                let slot = &mut c[i + j * cfg.ldc as usize];
                *slot = cfg.alpha * dot + cfg.beta * *slot;
            }
        }
    }

    #[test]
    fn launch_arguments_are_checked_against_the_signature() {
        let good = [
            Param::Ptr(Elem::T, true),
            Param::Ptr(Elem::T, false),
            Param::Ptr(Elem::T, false),
            Param::Float,
            Param::Int,
        ];
        assert!(check_args("rms_norm", &good).is_ok());
        let swapped = [
            Param::Ptr(Elem::T, true),
            Param::Ptr(Elem::T, false),
            Param::Ptr(Elem::T, false),
            Param::Int,
            Param::Float,
        ];
        let err = check_args("rms_norm", &swapped).unwrap_err().to_string();
        assert!(err.contains("do not match"), "{err}");
        assert!(check_args("rms_norm", &good[..4]).is_err());
        assert!(check_args("no_such_kernel", &good).is_err());
    }

    #[test]
    fn the_gemm_configuration_computes_x_times_w_transposed() {
        let (rows, n, k) = (3, 5, 4);
        let x: Vec<f32> = (0..rows * k).map(|i| i as f32 * 0.5 - 2.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i * 7 % 11) as f32 - 5.0).collect();
        let cfg = gemm_config::<f32>(rows, n, k).expect("small sizes");
        let mut out = vec![0.0; rows * n];
        cublas_reference(&cfg, &w, &x, &mut out);
        for r in 0..rows {
            for o in 0..n {
                let want: f32 = (0..k).map(|i| x[r * k + i] * w[o * k + i]).sum();
                assert_eq!(out[r * n + o], want, "row {r} output {o}");
            }
        }
    }
}
