//! The kernels built for the CPU through the SIMT emulation harness (`emu/simt.h`).
//!
//! Each function checks its slices (the emulated kernels read and write host memory, so a bad
//! index would be undefined behaviour rather than a fault), computes the launch with
//! [`geometry`](crate::geometry) exactly as a GPU backend does, and runs the kernel of the same
//! name from `cuda/`. Thread blocks run one after another on the calling thread; calls from
//! several threads run at once.

use std::ffi::c_void;

use crate::element::{Dtype, Element};
use crate::geometry::{self, AttentionShape, Launch, PrefillTile};

type Mut = *mut c_void;
type Ptr = *const c_void;

macro_rules! ffi {
    ($($f32:ident $f16:ident $bf16:ident ($($p:ident : $t:ty),*);)*) => {
        extern "C" {
            $(
                fn $f32(gx: u32, gy: u32, gz: u32, bx: u32, $($p: $t),*);
                fn $f16(gx: u32, gy: u32, gz: u32, bx: u32, $($p: $t),*);
                fn $bf16(gx: u32, gy: u32, gz: u32, bx: u32, $($p: $t),*);
            )*
        }
    };
}

ffi! {
    pm_emu_embedding_f32 pm_emu_embedding_f16 pm_emu_embedding_bf16
        (out: Mut, table: Ptr, tokens: *const i32, d: i32);
    pm_emu_rms_norm_f32 pm_emu_rms_norm_f16 pm_emu_rms_norm_bf16
        (out: Mut, x: Ptr, w: Ptr, eps: f32, d: i32);
    pm_emu_fused_add_rms_norm_f32 pm_emu_fused_add_rms_norm_f16 pm_emu_fused_add_rms_norm_bf16
        (out: Mut, residual: Mut, delta: Ptr, w: Ptr, eps: f32, d: i32);
    pm_emu_rope_f32 pm_emu_rope_f16 pm_emu_rope_bf16
        (q: Mut, k: Mut, positions: *const i32, inv_freq: *const f32, num_heads: i32, num_kv_heads: i32,
         head_dim: i32);
    pm_emu_silu_mul_f32 pm_emu_silu_mul_f16 pm_emu_silu_mul_bf16
        (out: Mut, gate: Ptr, up: Ptr, n: i64);
    pm_emu_add_bias_f32 pm_emu_add_bias_f16 pm_emu_add_bias_bf16
        (x: Mut, bias: Ptr, n: i32, total: i64);
    pm_emu_reshape_and_cache_f32 pm_emu_reshape_and_cache_f16 pm_emu_reshape_and_cache_bf16
        (k: Ptr, v: Ptr, k_cache: Mut, v_cache: Mut, slots: *const i64, num_kv_heads: i32, head_dim: i32,
         block_size: i32);
    pm_emu_copy_blocks_f32 pm_emu_copy_blocks_f16 pm_emu_copy_blocks_bf16
        (k_cache: Mut, v_cache: Mut, pairs: *const i32, block_len: i64);
    pm_emu_paged_attention_decode_f32 pm_emu_paged_attention_decode_f16 pm_emu_paged_attention_decode_bf16
        (part_out: *mut f32, part_sum: *mut f32, part_max: *mut f32, q: Ptr, q_rows: *const i32, k_cache: Ptr,
         v_cache: Ptr, block_tables: *const i32, max_blocks: i32, context_lens: *const i32, num_heads: i32,
         num_kv_heads: i32, head_dim: i32, block_size: i32, scale: f32);
    pm_emu_paged_attention_reduce_f32 pm_emu_paged_attention_reduce_f16 pm_emu_paged_attention_reduce_bf16
        (out: Mut, part_out: *const f32, part_sum: *const f32, part_max: *const f32, q_rows: *const i32,
         context_lens: *const i32, num_heads: i32, head_dim: i32, max_partitions: i32);
    pm_emu_paged_attention_prefill_f32 pm_emu_paged_attention_prefill_f16 pm_emu_paged_attention_prefill_bf16
        (out: Mut, q: Ptr, k_cache: Ptr, v_cache: Ptr, block_tables: *const i32, max_blocks: i32,
         tiles: *const i32, num_heads: i32, num_kv_heads: i32, head_dim: i32, block_size: i32, scale: f32);
}

/// Calls the instance of a kernel for `E` with a launch and arguments.
macro_rules! launch {
    ($e:ty, $l:expr, [$f32:ident, $f16:ident, $bf16:ident]($($a:expr),* $(,)?)) => {{
        let l: Launch = $l;
        let (gx, gy, gz) = l.grid;
        if gx > 0 && gy > 0 && gz > 0 {
            // SAFETY: the caller checked every slice against the geometry the kernel reads.
            unsafe {
                match <$e as Element>::DTYPE {
                    Dtype::F32 => $f32(gx, gy, gz, l.block, $($a),*),
                    Dtype::F16 => $f16(gx, gy, gz, l.block, $($a),*),
                    Dtype::BF16 => $bf16(gx, gy, gz, l.block, $($a),*),
                }
            }
        }
    }};
}

fn int(n: usize) -> i32 {
    i32::try_from(n).expect("size fits a kernel int")
}

fn ptr<E>(s: &[E]) -> Ptr {
    s.as_ptr().cast()
}

fn mptr<E>(s: &mut [E]) -> Mut {
    s.as_mut_ptr().cast()
}

/// `out[r] = table[tokens[r]]`, rows of `d`.
pub fn embedding<E: Element>(out: &mut [E], table: &[E], tokens: &[i32], d: usize) {
    assert_eq!(out.len(), tokens.len() * d, "embedding output");
    let vocab = table.len() / d.max(1);
    assert!(tokens.iter().all(|&t| t >= 0 && (t as usize) < vocab), "token outside the table");
    launch!(
        E,
        geometry::per_row(tokens.len()),
        [pm_emu_embedding_f32, pm_emu_embedding_f16, pm_emu_embedding_bf16](
            mptr(out),
            ptr(table),
            tokens.as_ptr(),
            int(d)
        )
    );
}

/// RMSNorm of every row of `x` (rows of `w.len()`).
pub fn rms_norm<E: Element>(out: &mut [E], x: &[E], w: &[E], eps: f32) {
    let d = w.len();
    assert!(d > 0 && x.len().is_multiple_of(d) && out.len() == x.len(), "rms_norm shapes");
    launch!(
        E,
        geometry::per_row(x.len() / d),
        [pm_emu_rms_norm_f32, pm_emu_rms_norm_f16, pm_emu_rms_norm_bf16](mptr(out), ptr(x), ptr(w), eps, int(d))
    );
}

/// `residual += delta`, then `out = rms_norm(residual)`.
pub fn fused_add_rms_norm<E: Element>(out: &mut [E], residual: &mut [E], delta: &[E], w: &[E], eps: f32) {
    let d = w.len();
    assert!(d > 0 && residual.len().is_multiple_of(d), "fused_add_rms_norm shapes");
    assert!(out.len() == residual.len() && delta.len() == residual.len(), "fused_add_rms_norm shapes");
    launch!(
        E,
        geometry::per_row(residual.len() / d),
        [pm_emu_fused_add_rms_norm_f32, pm_emu_fused_add_rms_norm_f16, pm_emu_fused_add_rms_norm_bf16](
            mptr(out),
            mptr(residual),
            ptr(delta),
            ptr(w),
            eps,
            int(d)
        )
    );
}

/// Rotate-half RoPE of `q` (`[rows][num_heads][head_dim]`) and `k` (`[rows][num_kv_heads][head_dim]`)
/// in place, row `r` at `positions[r]`, with `head_dim / 2` inverse frequencies.
pub fn rope<E: Element>(q: &mut [E], k: &mut [E], positions: &[i32], inv_freq: &[f32], shape: &AttentionShape) {
    let rows = positions.len();
    assert_eq!(q.len(), rows * shape.num_heads * shape.head_dim, "rope q");
    assert_eq!(k.len(), rows * shape.num_kv_heads * shape.head_dim, "rope k");
    assert_eq!(inv_freq.len(), shape.head_dim / 2, "rope frequencies");
    launch!(
        E,
        geometry::per_row(rows),
        [pm_emu_rope_f32, pm_emu_rope_f16, pm_emu_rope_bf16](
            mptr(q),
            mptr(k),
            positions.as_ptr(),
            inv_freq.as_ptr(),
            int(shape.num_heads),
            int(shape.num_kv_heads),
            int(shape.head_dim)
        )
    );
}

/// `out[i] = silu(gate[i]) · up[i]`.
pub fn silu_mul<E: Element>(out: &mut [E], gate: &[E], up: &[E]) {
    assert!(gate.len() == out.len() && up.len() == out.len(), "silu_mul shapes");
    launch!(
        E,
        geometry::per_element(out.len()),
        [pm_emu_silu_mul_f32, pm_emu_silu_mul_f16, pm_emu_silu_mul_bf16](
            mptr(out),
            ptr(gate),
            ptr(up),
            out.len() as i64
        )
    );
}

/// `gate[i] = silu(gate[i]) · up[i]` (the kernel with its output on its input).
pub fn silu_mul_in_place<E: Element>(gate: &mut [E], up: &[E]) {
    assert_eq!(gate.len(), up.len(), "silu_mul shapes");
    let g = mptr(gate);
    launch!(
        E,
        geometry::per_element(gate.len()),
        [pm_emu_silu_mul_f32, pm_emu_silu_mul_f16, pm_emu_silu_mul_bf16](g, g.cast_const(), ptr(up), gate.len() as i64)
    );
}

/// `x[r][i] += bias[i]` for every row of `x` (rows of `bias.len()`).
pub fn add_bias<E: Element>(x: &mut [E], bias: &[E]) {
    assert!(!bias.is_empty() && x.len().is_multiple_of(bias.len()), "add_bias shapes");
    let n = i32::try_from(bias.len()).expect("a bias fits an int");
    launch!(
        E,
        geometry::per_element(x.len()),
        [pm_emu_add_bias_f32, pm_emu_add_bias_f16, pm_emu_add_bias_bf16](mptr(x), ptr(bias), n, x.len() as i64)
    );
}

/// Writes row `r` of `k` and `v` (`[rows][num_kv_heads][head_dim]`) into cache slot `slots[r]`
/// (skipped when negative).
pub fn reshape_and_cache<E: Element>(
    k: &[E],
    v: &[E],
    k_cache: &mut [E],
    v_cache: &mut [E],
    slots: &[i64],
    shape: &AttentionShape,
) {
    let width = shape.num_kv_heads * shape.head_dim;
    assert!(k.len() == slots.len() * width && v.len() == k.len(), "reshape_and_cache inputs");
    assert!(k_cache.len() == v_cache.len() && k_cache.len().is_multiple_of(shape.block_len()), "cache pools");
    let slots_total = (k_cache.len() / shape.block_len() * shape.block_size) as i64;
    assert!(slots.iter().all(|&s| s < slots_total), "slot outside the cache");
    launch!(
        E,
        geometry::per_row(slots.len()),
        [pm_emu_reshape_and_cache_f32, pm_emu_reshape_and_cache_f16, pm_emu_reshape_and_cache_bf16](
            ptr(k),
            ptr(v),
            mptr(k_cache),
            mptr(v_cache),
            slots.as_ptr(),
            int(shape.num_kv_heads),
            int(shape.head_dim),
            int(shape.block_size)
        )
    );
}

/// Copies block `src` to block `dst` for every `(src, dst)` in both pools of one layer.
pub fn copy_blocks<E: Element>(k_cache: &mut [E], v_cache: &mut [E], pairs: &[(u32, u32)], block_len: usize) {
    assert!(k_cache.len() == v_cache.len() && block_len > 0 && k_cache.len().is_multiple_of(block_len), "cache pools");
    let blocks = k_cache.len() / block_len;
    assert!(pairs.iter().all(|&(s, d)| (s as usize) < blocks && (d as usize) < blocks), "block outside the cache");
    let flat: Vec<i32> = pairs.iter().flat_map(|&(s, d)| [s as i32, d as i32]).collect();
    launch!(
        E,
        geometry::per_row(pairs.len()),
        [pm_emu_copy_blocks_f32, pm_emu_copy_blocks_f16, pm_emu_copy_blocks_bf16](
            mptr(k_cache),
            mptr(v_cache),
            flat.as_ptr(),
            block_len as i64
        )
    );
}

/// Sequences' block tables, `[seqs][max_blocks]` (unused entries any valid block).
#[derive(Debug, Clone, Copy)]
pub struct BlockTables<'a> {
    /// The tables, row-major.
    pub tables: &'a [i32],
    /// Entries of one row.
    pub max_blocks: usize,
}

impl BlockTables<'_> {
    fn check(&self, cache_blocks: usize) {
        assert!(self.max_blocks > 0 && self.tables.len().is_multiple_of(self.max_blocks), "block tables");
        assert!(self.tables.iter().all(|&b| b >= 0 && (b as usize) < cache_blocks), "block outside the cache");
    }

    fn seqs(&self) -> usize {
        self.tables.len() / self.max_blocks
    }
}

fn check_attention<E>(q: &[E], out: &[E], k_cache: &[E], v_cache: &[E], shape: &AttentionShape) -> usize {
    shape.validate().expect("attention shape");
    let width = shape.num_heads * shape.head_dim;
    assert!(q.len() == out.len() && q.len().is_multiple_of(width), "attention q/out");
    assert!(k_cache.len() == v_cache.len() && k_cache.len().is_multiple_of(shape.block_len()), "cache pools");
    k_cache.len() / shape.block_len()
}

/// Decode attention: sequence `s` (row `s` of `tables`) attends with query row `q_rows[s]` of
/// `q` over its first `context_lens[s]` tokens, writing row `q_rows[s]` of `out`.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_decode<E: Element>(
    out: &mut [E],
    q: &[E],
    k_cache: &[E],
    v_cache: &[E],
    q_rows: &[i32],
    context_lens: &[i32],
    tables: BlockTables<'_>,
    shape: &AttentionShape,
) {
    let blocks = check_attention(q, out, k_cache, v_cache, shape);
    tables.check(blocks);
    let seqs = q_rows.len();
    let rows = q.len() / (shape.num_heads * shape.head_dim);
    assert!(context_lens.len() == seqs && tables.seqs() == seqs, "one context and table per sequence");
    assert!(q_rows.iter().all(|&r| r >= 0 && (r as usize) < rows), "query row outside q");
    let capacity = tables.max_blocks * shape.block_size;
    assert!(context_lens.iter().all(|&c| c > 0 && c as usize <= capacity), "context outside its block table");
    let max_context = context_lens.iter().copied().max().unwrap_or(1) as usize;
    let launch = geometry::decode(shape, seqs, max_context);
    let parts = launch.grid.2 as usize;
    let slots = seqs * shape.num_heads * parts;
    let mut part_out = vec![0.0f32; slots * shape.head_dim];
    let mut part_sum = vec![0.0f32; slots];
    let mut part_max = vec![0.0f32; slots];
    launch!(
        E,
        launch,
        [pm_emu_paged_attention_decode_f32, pm_emu_paged_attention_decode_f16, pm_emu_paged_attention_decode_bf16](
            part_out.as_mut_ptr(),
            part_sum.as_mut_ptr(),
            part_max.as_mut_ptr(),
            ptr(q),
            q_rows.as_ptr(),
            ptr(k_cache),
            ptr(v_cache),
            tables.tables.as_ptr(),
            int(tables.max_blocks),
            context_lens.as_ptr(),
            int(shape.num_heads),
            int(shape.num_kv_heads),
            int(shape.head_dim),
            int(shape.block_size),
            shape.scale()
        )
    );
    launch!(
        E,
        geometry::decode_reduce(shape, seqs),
        [pm_emu_paged_attention_reduce_f32, pm_emu_paged_attention_reduce_f16, pm_emu_paged_attention_reduce_bf16](
            mptr(out),
            part_out.as_ptr(),
            part_sum.as_ptr(),
            part_max.as_ptr(),
            q_rows.as_ptr(),
            context_lens.as_ptr(),
            int(shape.num_heads),
            int(shape.head_dim),
            int(parts)
        )
    );
}

/// Prefill attention over tiles of consecutive query rows, flattened as the kernel reads them
/// (see [`geometry::prefill_tiles`] and [`geometry::flatten_tiles`]): each row attends causally
/// to its sequence's positions up to its own, read from the cache.
pub fn paged_attention_prefill<E: Element>(
    out: &mut [E],
    q: &[E],
    k_cache: &[E],
    v_cache: &[E],
    flat_tiles: &[i32],
    tables: BlockTables<'_>,
    shape: &AttentionShape,
) {
    let blocks = check_attention(q, out, k_cache, v_cache, shape);
    tables.check(blocks);
    let rows = q.len() / (shape.num_heads * shape.head_dim);
    let capacity = tables.max_blocks * shape.block_size;
    assert!(flat_tiles.len().is_multiple_of(4), "tiles are four ints each");
    for t in flat_tiles.chunks_exact(4) {
        let t = PrefillTile { seq: t[0] as u32, first_row: t[1] as u32, rows: t[2] as u32, first_pos: t[3] as u32 };
        assert!((t.seq as usize) < tables.seqs(), "tile of an unknown sequence");
        assert!(t.rows > 0 && t.rows as usize <= geometry::PREFILL_ROWS, "tile rows");
        assert!((t.first_row + t.rows) as usize <= rows, "tile outside q");
        assert!((t.first_pos + t.rows) as usize <= capacity, "tile outside its block table");
    }
    let flat = flat_tiles;
    launch!(
        E,
        geometry::prefill(shape, flat_tiles.len() / 4),
        [pm_emu_paged_attention_prefill_f32, pm_emu_paged_attention_prefill_f16, pm_emu_paged_attention_prefill_bf16](
            mptr(out),
            ptr(q),
            ptr(k_cache),
            ptr(v_cache),
            tables.tables.as_ptr(),
            int(tables.max_blocks),
            flat.as_ptr(),
            int(shape.num_heads),
            int(shape.num_kv_heads),
            int(shape.head_dim),
            int(shape.block_size),
            shape.scale()
        )
    );
}
