//! Launch constants (mirroring `cuda/common.cuh`) and the grid of every kernel.

/// Threads of an attention block (`PM_ATTN_THREADS`).
pub const ATTN_THREADS: u32 = 128;
/// Tokens of one decode partition (`PM_PARTITION_SIZE`).
pub const PARTITION_SIZE: usize = 512;
/// Query rows of one prefill tile (`PM_PREFILL_ROWS`).
pub const PREFILL_ROWS: usize = 16;
/// Widest supported head (`PM_MAX_HEAD_DIM`).
pub const MAX_HEAD_DIM: usize = 256;
/// Threads of the row kernels (`PM_ROW_THREADS`).
pub const ROW_THREADS: u32 = 256;

/// A kernel launch: grid (x, y, z) and threads per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    /// Blocks along x, y and z.
    pub grid: (u32, u32, u32),
    /// Threads of one block (x only).
    pub block: u32,
}

/// Heads and cache geometry of an attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (divides `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head (even, at most [`MAX_HEAD_DIM`]).
    pub head_dim: usize,
    /// Tokens per cache block.
    pub block_size: usize,
}

impl AttentionShape {
    /// Checks what the kernels assume.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!("{} query heads are not a multiple of {} KV heads", self.num_heads, self.num_kv_heads));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) || self.head_dim > MAX_HEAD_DIM {
            return Err(format!("head dim {} is not even and at most {MAX_HEAD_DIM}", self.head_dim));
        }
        if self.block_size == 0 {
            return Err("block size 0".into());
        }
        Ok(())
    }

    /// Elements of one layer's K (or V) in one cache block.
    pub fn block_len(&self) -> usize {
        self.num_kv_heads * self.head_dim * self.block_size
    }

    /// The softmax scale, `1 / sqrt(head_dim)`.
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

fn dim(n: usize) -> u32 {
    u32::try_from(n).expect("grid dimension fits u32")
}

/// One block per row (embedding, norms, RoPE, cache writes, block copies).
pub fn per_row(rows: usize) -> Launch {
    Launch { grid: (dim(rows), 1, 1), block: ROW_THREADS }
}

/// One thread per element (SiLU·mul).
pub fn per_element(n: usize) -> Launch {
    Launch { grid: (dim(n.div_ceil(ROW_THREADS as usize).max(1)), 1, 1), block: ROW_THREADS }
}

/// Partitions of a context of `context` tokens.
pub fn partitions(context: usize) -> usize {
    context.div_ceil(PARTITION_SIZE).max(1)
}

/// The decode kernel for `num_seqs` sequences of at most `max_context` tokens.
pub fn decode(shape: &AttentionShape, num_seqs: usize, max_context: usize) -> Launch {
    Launch { grid: (dim(shape.num_heads), dim(num_seqs), dim(partitions(max_context))), block: ATTN_THREADS }
}

/// The partition reduction after [`decode`].
pub fn decode_reduce(shape: &AttentionShape, num_seqs: usize) -> Launch {
    Launch { grid: (dim(shape.num_heads), dim(num_seqs), 1), block: ATTN_THREADS }
}

/// The prefill kernel over `tiles` tiles.
pub fn prefill(shape: &AttentionShape, tiles: usize) -> Launch {
    Launch { grid: (dim(tiles), dim(shape.num_heads), 1), block: ATTN_THREADS }
}

/// Up to [`PREFILL_ROWS`] consecutive query rows of one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillTile {
    /// Row of the sequence's block table.
    pub seq: u32,
    /// Batch row of the tile's first query.
    pub first_row: u32,
    /// Query rows.
    pub rows: u32,
    /// Position of the first query in its sequence.
    pub first_pos: u32,
}

/// Cuts sequences — (block table row, first batch row, rows, position of the first row) —
/// into tiles.
pub fn prefill_tiles(seqs: impl IntoIterator<Item = (usize, usize, usize, usize)>) -> Vec<PrefillTile> {
    let mut tiles = Vec::new();
    for (seq, first_row, rows, first_pos) in seqs {
        for start in (0..rows).step_by(PREFILL_ROWS) {
            tiles.push(PrefillTile {
                seq: seq as u32,
                first_row: (first_row + start) as u32,
                rows: (rows - start).min(PREFILL_ROWS) as u32,
                first_pos: (first_pos + start) as u32,
            });
        }
    }
    tiles
}

/// Tiles as the kernel reads them: four `int`s each.
pub fn flatten_tiles(tiles: &[PrefillTile]) -> Vec<i32> {
    tiles.iter().flat_map(|t| [t.seq as i32, t.first_row as i32, t.rows as i32, t.first_pos as i32]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_every_row_once() {
        let tiles = prefill_tiles([(0, 0, 40, 5), (1, 40, 1, 99), (2, 41, 16, 0)]);
        assert_eq!(tiles.len(), 3 + 1 + 1);
        assert_eq!(tiles[2], PrefillTile { seq: 0, first_row: 32, rows: 8, first_pos: 37 });
        assert_eq!(tiles.iter().map(|t| t.rows).sum::<u32>(), 57);
        assert_eq!(flatten_tiles(&tiles[3..4]), vec![1, 40, 1, 99]);
    }

    #[test]
    fn shapes_are_checked() {
        let ok = AttentionShape { num_heads: 8, num_kv_heads: 2, head_dim: 64, block_size: 16 };
        assert!(ok.validate().is_ok());
        assert!(AttentionShape { num_kv_heads: 3, ..ok }.validate().is_err());
        assert!(AttentionShape { head_dim: 512, ..ok }.validate().is_err());
        assert_eq!(decode(&ok, 3, 1025).grid, (8, 3, 3));
    }
}
