//! [`KernelBackend`] over the kernels built for the CPU (`pagemesh_kernels::emu`), host
//! vectors as "device" buffers, and a CPU GEMM in place of cuBLAS.

use pagemesh_kernels::emu::{self, BlockTables};
use pagemesh_kernels::AttentionShape;
use rayon::prelude::*;

use super::backend::{DecodeMeta, DeviceValue, GpuElement, KernelBackend, PrefillMeta};
use crate::error::Result;

/// The emulated GPU.
#[derive(Debug, Default, Clone, Copy)]
pub struct EmulatedBackend;

impl<E: GpuElement> KernelBackend<E> for EmulatedBackend {
    type Buffer<T: DeviceValue> = Vec<T>;

    fn upload<T: DeviceValue>(&self, data: &[T]) -> Result<Vec<T>> {
        Ok(data.to_vec())
    }

    fn zeros<T: DeviceValue>(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::default(); len])
    }

    fn download(&self, buf: &Vec<E>) -> Result<Vec<E>> {
        Ok(buf.clone())
    }

    type HostPool = Vec<E>;

    fn host_pool(&self, len: usize) -> Result<Vec<E>> {
        Ok(vec![E::default(); len])
    }

    fn swap_out(&self, device: &Vec<E>, host: &mut Vec<E>, pairs: &[(u32, u32)], block_len: usize) -> Result<()> {
        for &(d, h) in pairs {
            let (d, h) = (d as usize * block_len, h as usize * block_len);
            host[h..h + block_len].copy_from_slice(&device[d..d + block_len]);
        }
        Ok(())
    }

    fn swap_in(&self, host: &Vec<E>, device: &mut Vec<E>, pairs: &[(u32, u32)], block_len: usize) -> Result<()> {
        for &(h, d) in pairs {
            let (h, d) = (h as usize * block_len, d as usize * block_len);
            device[d..d + block_len].copy_from_slice(&host[h..h + block_len]);
        }
        Ok(())
    }

    fn gemm(&self, out: &mut Vec<E>, x: &Vec<E>, w: &Vec<E>, rows: usize, n: usize, k: usize) -> Result<()> {
        assert!(out.len() == rows * n && x.len() == rows * k && w.len() == n * k, "gemm shapes");
        let x: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let w: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        out.par_chunks_mut(n).zip(x.par_chunks(k)).for_each(|(o, xr)| {
            for (oi, wr) in o.iter_mut().zip(w.chunks_exact(k)) {
                *oi = E::from_f32(xr.iter().zip(wr).map(|(a, b)| a * b).sum());
            }
        });
        Ok(())
    }

    fn embedding(&self, out: &mut Vec<E>, table: &Vec<E>, tokens: &Vec<i32>, d: usize) -> Result<()> {
        emu::embedding(out, table, tokens, d);
        Ok(())
    }

    fn rms_norm(&self, out: &mut Vec<E>, x: &Vec<E>, w: &Vec<E>, eps: f32) -> Result<()> {
        emu::rms_norm(out, x, w, eps);
        Ok(())
    }

    fn fused_add_rms_norm(
        &self,
        out: &mut Vec<E>,
        residual: &mut Vec<E>,
        delta: &Vec<E>,
        w: &Vec<E>,
        eps: f32,
    ) -> Result<()> {
        emu::fused_add_rms_norm(out, residual, delta, w, eps);
        Ok(())
    }

    fn rope(
        &self,
        q: &mut Vec<E>,
        k: &mut Vec<E>,
        positions: &Vec<i32>,
        inv_freq: &Vec<f32>,
        shape: &AttentionShape,
    ) -> Result<()> {
        emu::rope(q, k, positions, inv_freq, shape);
        Ok(())
    }

    fn add_bias(&self, x: &mut Vec<E>, bias: &Vec<E>) -> Result<()> {
        emu::add_bias(x, bias);
        Ok(())
    }

    fn silu_mul_in_place(&self, gate: &mut Vec<E>, up: &Vec<E>) -> Result<()> {
        emu::silu_mul_in_place(gate, up);
        Ok(())
    }

    fn reshape_and_cache(
        &self,
        k: &Vec<E>,
        v: &Vec<E>,
        k_cache: &mut Vec<E>,
        v_cache: &mut Vec<E>,
        slots: &Vec<i64>,
        shape: &AttentionShape,
    ) -> Result<()> {
        emu::reshape_and_cache(k, v, k_cache, v_cache, slots, shape);
        Ok(())
    }

    fn copy_blocks(
        &self,
        k_cache: &mut Vec<E>,
        v_cache: &mut Vec<E>,
        pairs: &[(u32, u32)],
        shape: &AttentionShape,
    ) -> Result<()> {
        emu::copy_blocks(k_cache, v_cache, pairs, shape.block_len());
        Ok(())
    }

    fn paged_attention_decode(
        &self,
        out: &mut Vec<E>,
        q: &Vec<E>,
        k_cache: &Vec<E>,
        v_cache: &Vec<E>,
        meta: &DecodeMeta<Vec<i32>>,
        shape: &AttentionShape,
    ) -> Result<()> {
        let tables = BlockTables { tables: &meta.tables, max_blocks: meta.max_blocks };
        emu::paged_attention_decode(out, q, k_cache, v_cache, &meta.q_rows, &meta.context_lens, tables, shape);
        Ok(())
    }

    fn paged_attention_prefill(
        &self,
        out: &mut Vec<E>,
        q: &Vec<E>,
        k_cache: &Vec<E>,
        v_cache: &Vec<E>,
        meta: &PrefillMeta<Vec<i32>>,
        shape: &AttentionShape,
    ) -> Result<()> {
        let tables = BlockTables { tables: &meta.tables, max_blocks: meta.max_blocks };
        emu::paged_attention_prefill(out, q, k_cache, v_cache, &meta.tiles, tables, shape);
        Ok(())
    }
}
