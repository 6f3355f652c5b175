//! Quantized weights as GGUF stores them: blocks of 32 or 256 elements, each with its own
//! scale (and minimum), laid out exactly as ggml lays them out, so that a GGUF tensor is used
//! straight from the memory map. [`QuantKind`] names the block formats the executor computes
//! with; [`dequant`] turns blocks into f32 (row by row, for a panel of a matrix at a time, never
//! a whole model); [`quantize`] makes Q8_0 and Q4_0 blocks from f32 (`--quantization`).

pub mod dequant;
pub mod quantize;
#[cfg(test)]
pub(crate) mod test_blocks;

use crate::gguf::TensorType;

/// The element formats a weight matrix may come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantKind {
    /// 32-bit floats.
    F32,
    /// IEEE half floats.
    F16,
    /// bfloat16.
    BF16,
    /// 32 elements: an f16 scale and 32 signed bytes.
    Q8_0,
    /// 32 elements: an f16 scale and 32 4-bit values, offset by 8.
    Q4_0,
    /// 32 elements: an f16 scale, an f16 minimum and 32 4-bit values.
    Q4_1,
    /// 32 elements: an f16 scale and 32 5-bit values, offset by 16.
    Q5_0,
    /// 32 elements: an f16 scale, an f16 minimum and 32 5-bit values.
    Q5_1,
    /// 256 elements: f16 super-scale and super-minimum, eight 6-bit scales and minimums, 4-bit
    /// values.
    Q4K,
    /// 256 elements: as [`QuantKind::Q4K`] with 5-bit values.
    Q5K,
    /// 256 elements: an f16 super-scale, sixteen 8-bit scales, 6-bit values offset by 32.
    Q6K,
}

impl QuantKind {
    /// Every kind, for tests and error messages.
    pub const ALL: [QuantKind; 11] = [
        QuantKind::F32,
        QuantKind::F16,
        QuantKind::BF16,
        QuantKind::Q8_0,
        QuantKind::Q4_0,
        QuantKind::Q4_1,
        QuantKind::Q5_0,
        QuantKind::Q5_1,
        QuantKind::Q4K,
        QuantKind::Q5K,
        QuantKind::Q6K,
    ];

    /// ggml's name of the format.
    pub fn name(self) -> &'static str {
        match self {
            QuantKind::F32 => "F32",
            QuantKind::F16 => "F16",
            QuantKind::BF16 => "BF16",
            QuantKind::Q8_0 => "Q8_0",
            QuantKind::Q4_0 => "Q4_0",
            QuantKind::Q4_1 => "Q4_1",
            QuantKind::Q5_0 => "Q5_0",
            QuantKind::Q5_1 => "Q5_1",
            QuantKind::Q4K => "Q4_K",
            QuantKind::Q5K => "Q5_K",
            QuantKind::Q6K => "Q6_K",
        }
    }

    /// The format of a GGUF tensor type, if the executor computes with it.
    pub fn from_tensor_type(kind: TensorType) -> Option<Self> {
        QuantKind::ALL.into_iter().find(|k| k.name() == kind.name)
    }

    /// Elements per block.
    pub fn block_elements(self) -> usize {
        match self {
            QuantKind::F32 | QuantKind::F16 | QuantKind::BF16 => 1,
            QuantKind::Q8_0 | QuantKind::Q4_0 | QuantKind::Q4_1 | QuantKind::Q5_0 | QuantKind::Q5_1 => 32,
            QuantKind::Q4K | QuantKind::Q5K | QuantKind::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantKind::F32 => 4,
            QuantKind::F16 | QuantKind::BF16 => 2,
            QuantKind::Q8_0 => 34,
            QuantKind::Q4_0 => 18,
            QuantKind::Q4_1 => 20,
            QuantKind::Q5_0 => 22,
            QuantKind::Q5_1 => 24,
            QuantKind::Q4K => 144,
            QuantKind::Q5K => 176,
            QuantKind::Q6K => 210,
        }
    }

    /// Bytes of a row of `elements` elements, or an error when the row is not whole blocks.
    pub fn row_bytes(self, elements: usize) -> Result<usize, String> {
        let block = self.block_elements();
        if elements == 0 || !elements.is_multiple_of(block) {
            return Err(format!(
                "{} rows are one or more whole blocks of {block} elements; a row has {elements}",
                self.name()
            ));
        }
        Ok(elements / block * self.block_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_geometry_agrees_with_the_gguf_reader() {
        for kind in QuantKind::ALL {
            let code = (0..64).find(|&c| TensorType::from_code(c).is_some_and(|t| t.name == kind.name()));
            let t = TensorType::from_code(code.expect("every kind has a ggml code")).expect("known");
            assert_eq!(QuantKind::from_tensor_type(t), Some(kind));
            assert_eq!(
                (t.block_elements as usize, t.block_bytes as usize),
                (kind.block_elements(), kind.block_bytes())
            );
        }
        assert!(QuantKind::Q4K.row_bytes(100).unwrap_err().contains("whole blocks"));
        assert!(QuantKind::F32.row_bytes(0).is_err());
        assert_eq!(QuantKind::Q4_1.row_bytes(576), Ok(18 * 20));
    }
}
