//! The paged KV cache: a device pool and a host (swap) pool of fixed-size blocks per layer.
//!
//! Layout of one layer's pools: K is `[num_blocks, num_kv_heads, head_dim, block_size]` (each
//! block transposed, so that the scores of a block's slots are one vector per head dimension,
//! with no horizontal sums), V is `[num_blocks, num_kv_heads, block_size, head_dim]` (a slot's
//! value vector is contiguous). Block `b`'s slot `s` holds the token
//! at position `p` of a sequence whose block table maps `p / block_size` to `b`, with
//! `s = p % block_size`.

/// K and V pools of every layer, for one pool (device or host).
pub struct BlockPool {
    /// Per layer, K blocks.
    pub k: Vec<Vec<f32>>,
    /// Per layer, V blocks.
    pub v: Vec<Vec<f32>>,
    /// Number of blocks.
    pub num_blocks: usize,
}

/// Geometry of one block.
#[derive(Debug, Clone, Copy)]
pub struct BlockShape {
    /// Tokens per block.
    pub block_size: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl BlockShape {
    /// Floats of K (or V) in one block of one layer.
    pub fn block_len(&self) -> usize {
        self.block_size * self.num_kv_heads * self.head_dim
    }

    /// Offset of (block, head) within a layer's K or V pool: where that head's
    /// `block_size × head_dim` values of the block start.
    #[inline]
    pub fn offset(&self, block: usize, head: usize) -> usize {
        (block * self.num_kv_heads + head) * self.block_size * self.head_dim
    }
}

impl BlockPool {
    fn new(layers: usize, num_blocks: usize, shape: BlockShape) -> Self {
        let len = num_blocks * shape.block_len();
        Self { k: vec![vec![0.0; len]; layers], v: vec![vec![0.0; len]; layers], num_blocks }
    }
}

/// The device pool, the host pool and the copies between them.
pub struct KvCache {
    /// Block geometry.
    pub shape: BlockShape,
    /// Blocks the forward pass reads and writes.
    pub device: BlockPool,
    /// Blocks that hold swapped-out sequences.
    pub host: BlockPool,
}

fn copy_block(src: &[Vec<f32>], src_block: usize, dst: &mut [Vec<f32>], dst_block: usize, len: usize) {
    for (s, d) in src.iter().zip(dst.iter_mut()) {
        d[dst_block * len..][..len].copy_from_slice(&s[src_block * len..][..len]);
    }
}

impl KvCache {
    /// A cache of `layers` layers with the given pool sizes.
    pub fn new(layers: usize, shape: BlockShape, device_blocks: usize, host_blocks: usize) -> Self {
        Self {
            shape,
            device: BlockPool::new(layers, device_blocks, shape),
            host: BlockPool::new(layers, host_blocks, shape),
        }
    }

    /// Copies device block `src` to host block `dst` in every layer.
    pub fn swap_out(&mut self, src: usize, dst: usize) {
        let len = self.shape.block_len();
        copy_block(&self.device.k, src, &mut self.host.k, dst, len);
        copy_block(&self.device.v, src, &mut self.host.v, dst, len);
    }

    /// Copies host block `src` to device block `dst` in every layer.
    pub fn swap_in(&mut self, src: usize, dst: usize) {
        let len = self.shape.block_len();
        copy_block(&self.host.k, src, &mut self.device.k, dst, len);
        copy_block(&self.host.v, src, &mut self.device.v, dst, len);
    }

    /// Copies device block `src` to device block `dst` in every layer (copy-on-write).
    pub fn copy(&mut self, src: usize, dst: usize) {
        let len = self.shape.block_len();
        for layer in self.device.k.iter_mut().chain(self.device.v.iter_mut()) {
            layer.copy_within(src * len..(src + 1) * len, dst * len);
        }
    }

    /// Writes one token's K and V (`[num_kv_heads, head_dim]` each) into `layer` at `slot`
    /// (`block * block_size + offset`).
    pub fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let s = self.shape;
        let (block, off) = (slot / s.block_size, slot % s.block_size);
        for h in 0..s.num_kv_heads {
            let base = s.offset(block, h);
            let keys = &mut self.device.k[layer][base..base + s.block_size * s.head_dim];
            for (d, &value) in k[h * s.head_dim..][..s.head_dim].iter().enumerate() {
                keys[d * s.block_size + off] = value;
            }
            let at = base + off * s.head_dim;
            self.device.v[layer][at..at + s.head_dim].copy_from_slice(&v[h * s.head_dim..][..s.head_dim]);
        }
    }
}
