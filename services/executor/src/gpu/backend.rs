//! What the GPU forward pass needs from a backend: device buffers, a GEMM and the kernels.

use pagemesh_kernels::{AttentionShape, Element};

use crate::error::Result;

/// A value that lives in device buffers: plain data the CUDA driver can copy and zero.
pub trait DeviceValue:
    Copy + Default + Send + Sync + 'static + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits
{
}

impl<T> DeviceValue for T where
    T: Copy + Default + Send + Sync + 'static + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits
{
}

/// An element type the GPU path computes in (f32, f16, bf16).
pub trait GpuElement: Element + DeviceValue {}

impl<T: Element + DeviceValue> GpuElement for T {}

/// Decode sequences of one step, on the device.
pub struct DecodeMeta<I> {
    /// Batch row of every sequence's query.
    pub q_rows: I,
    /// Context length of every sequence (its query's position + 1).
    pub context_lens: I,
    /// Block tables, `[num_seqs][max_blocks]`.
    pub tables: I,
    /// Entries of one block table row.
    pub max_blocks: usize,
    /// Sequences.
    pub num_seqs: usize,
    /// Longest context.
    pub max_context: usize,
}

/// Prefill chunks of one step, on the device.
pub struct PrefillMeta<I> {
    /// Tiles, four ints each (see `pagemesh_kernels::geometry::flatten_tiles`).
    pub tiles: I,
    /// Number of tiles.
    pub num_tiles: usize,
    /// Block tables, `[sequences][max_blocks]`.
    pub tables: I,
    /// Entries of one block table row.
    pub max_blocks: usize,
}

/// Device memory, a GEMM and the kernels of `kernels/cuda` for element type `E`.
///
/// Buffers are sized exactly; every method checks (or trusts the kernel geometry to match)
/// the lengths its caller passes.
pub trait KernelBackend<E: GpuElement> {
    /// A device buffer of `len` elements of `T`.
    type Buffer<T: DeviceValue>;

    /// A buffer holding `data`.
    fn upload<T: DeviceValue>(&self, data: &[T]) -> Result<Self::Buffer<T>>;
    /// A zeroed buffer of `len` elements.
    fn zeros<T: DeviceValue>(&self, len: usize) -> Result<Self::Buffer<T>>;
    /// The contents of a buffer.
    fn download(&self, buf: &Self::Buffer<E>) -> Result<Vec<E>>;

    /// Host memory that holds swapped-out blocks (pinned on a GPU).
    type HostPool: Send;
    /// A zeroed host pool of `len` elements.
    fn host_pool(&self, len: usize) -> Result<Self::HostPool>;
    /// Copies device blocks to host blocks, `(device, host)` pairs of `block_len` elements,
    /// after every kernel already issued and before every kernel issued later.
    fn swap_out(
        &self,
        device: &Self::Buffer<E>,
        host: &mut Self::HostPool,
        pairs: &[(u32, u32)],
        block_len: usize,
    ) -> Result<()>;
    /// Copies host blocks to device blocks, `(host, device)` pairs, ordered like [`swap_out`](Self::swap_out).
    fn swap_in(
        &self,
        host: &Self::HostPool,
        device: &mut Self::Buffer<E>,
        pairs: &[(u32, u32)],
        block_len: usize,
    ) -> Result<()>;

    /// `out[t, o] = Σ_i x[t, i] · w[o, i]` for `rows` rows, `w` being `[n, k]`.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        out: &mut Self::Buffer<E>,
        x: &Self::Buffer<E>,
        w: &Self::Buffer<E>,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<()>;
    /// `out[r] = table[tokens[r]]`, rows of `d` (also a row gather).
    fn embedding(
        &self,
        out: &mut Self::Buffer<E>,
        table: &Self::Buffer<E>,
        tokens: &Self::Buffer<i32>,
        d: usize,
    ) -> Result<()>;
    /// RMSNorm of every row.
    fn rms_norm(&self, out: &mut Self::Buffer<E>, x: &Self::Buffer<E>, w: &Self::Buffer<E>, eps: f32) -> Result<()>;
    /// `residual += delta`, then `out = rms_norm(residual)`.
    fn fused_add_rms_norm(
        &self,
        out: &mut Self::Buffer<E>,
        residual: &mut Self::Buffer<E>,
        delta: &Self::Buffer<E>,
        w: &Self::Buffer<E>,
        eps: f32,
    ) -> Result<()>;
    /// Rotate-half RoPE of q and k in place.
    fn rope(
        &self,
        q: &mut Self::Buffer<E>,
        k: &mut Self::Buffer<E>,
        positions: &Self::Buffer<i32>,
        inv_freq: &Self::Buffer<f32>,
        shape: &AttentionShape,
    ) -> Result<()>;
    /// `x[r][i] += bias[i]` for every row of `x`.
    fn add_bias(&self, x: &mut Self::Buffer<E>, bias: &Self::Buffer<E>) -> Result<()>;
    /// `gate = silu(gate) · up`.
    fn silu_mul_in_place(&self, gate: &mut Self::Buffer<E>, up: &Self::Buffer<E>) -> Result<()>;
    /// Writes every row's K and V into its slot of one layer's pools.
    fn reshape_and_cache(
        &self,
        k: &Self::Buffer<E>,
        v: &Self::Buffer<E>,
        k_cache: &mut Self::Buffer<E>,
        v_cache: &mut Self::Buffer<E>,
        slots: &Self::Buffer<i64>,
        shape: &AttentionShape,
    ) -> Result<()>;
    /// Copies blocks `(src, dst)` (flattened pairs) in one layer's pools.
    fn copy_blocks(
        &self,
        k_cache: &mut Self::Buffer<E>,
        v_cache: &mut Self::Buffer<E>,
        pairs: &[(u32, u32)],
        shape: &AttentionShape,
    ) -> Result<()>;
    /// Decode attention of the sequences in `meta`, writing their rows of `out`.
    #[allow(clippy::too_many_arguments)]
    fn paged_attention_decode(
        &self,
        out: &mut Self::Buffer<E>,
        q: &Self::Buffer<E>,
        k_cache: &Self::Buffer<E>,
        v_cache: &Self::Buffer<E>,
        meta: &DecodeMeta<Self::Buffer<i32>>,
        shape: &AttentionShape,
    ) -> Result<()>;
    /// Prefill attention of the tiles in `meta`, writing their rows of `out`.
    fn paged_attention_prefill(
        &self,
        out: &mut Self::Buffer<E>,
        q: &Self::Buffer<E>,
        k_cache: &Self::Buffer<E>,
        v_cache: &Self::Buffer<E>,
        meta: &PrefillMeta<Self::Buffer<i32>>,
        shape: &AttentionShape,
    ) -> Result<()>;
}
