//! Memory-mapped safetensors weights (one file or a sharded set), in f32, f16 or bf16.
//!
//! Tensors are read in place from the mapping when their bytes are aligned for their element
//! type (the usual case), so weights are not copied; a dtype conversion asked for at load time
//! makes one owned copy. Quantized matrices ([`QuantData`], GGUF's block formats) stay in their
//! blocks and are widened a row at a time where they are used.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{ExecutorError, Result};
use crate::quant::dequant::dequantize_row;
use crate::quant::QuantKind;

/// Element types of weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

impl std::str::FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            other => Err(format!("unknown dtype '{other}' (expected f32, f16 or bf16)")),
        }
    }
}

impl WeightDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }
}

/// A contiguous run of elements, either borrowed from a file mapping or owned.
#[derive(Clone)]
pub enum Buffer<T: bytemuck::Pod> {
    /// Elements read in place from a memory-mapped file.
    Mapped {
        /// The mapping, kept alive as long as the buffer.
        map: Arc<Mmap>,
        /// Byte offset of the first element.
        offset: usize,
        /// Number of elements.
        len: usize,
    },
    /// Elements in memory of their own.
    Owned(Arc<Vec<T>>),
}

impl<T: bytemuck::Pod> Buffer<T> {
    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        match self {
            Self::Mapped { map, offset, len } => {
                let bytes = &map[*offset..*offset + len * std::mem::size_of::<T>()];
                // Alignment was checked when the buffer was made.
                bytemuck::cast_slice(bytes)
            }
            Self::Owned(v) => v,
        }
    }
}

/// Elements in one of ggml's block formats: whole blocks, rows back to back.
#[derive(Clone)]
pub struct QuantData {
    /// The block format.
    pub kind: QuantKind,
    /// The blocks.
    pub bytes: Buffer<u8>,
    /// Elements they hold.
    pub elements: usize,
}

/// A tensor's elements in their stored type.
#[derive(Clone)]
pub enum TensorData {
    /// f32 elements.
    F32(Buffer<f32>),
    /// f16 elements.
    F16(Buffer<f16>),
    /// bf16 elements.
    BF16(Buffer<bf16>),
    /// Quantized blocks.
    Quantized(QuantData),
}

impl TensorData {
    /// The storage format.
    pub fn format(&self) -> QuantKind {
        match self {
            Self::F32(_) => QuantKind::F32,
            Self::F16(_) => QuantKind::F16,
            Self::BF16(_) => QuantKind::BF16,
            Self::Quantized(q) => q.kind,
        }
    }

    /// The element type, for unquantized data.
    pub fn dtype(&self) -> Option<WeightDtype> {
        match self {
            Self::F32(_) => Some(WeightDtype::F32),
            Self::F16(_) => Some(WeightDtype::F16),
            Self::BF16(_) => Some(WeightDtype::BF16),
            Self::Quantized(_) => None,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(b) => b.as_slice().len(),
            Self::F16(b) => b.as_slice().len(),
            Self::BF16(b) => b.as_slice().len(),
            Self::Quantized(q) => q.elements,
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All elements as f32 (a copy).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Self::F32(b) => b.as_slice().to_vec(),
            Self::F16(b) => b.as_slice().iter().map(|v| v.to_f32()).collect(),
            Self::BF16(b) => b.as_slice().iter().map(|v| v.to_f32()).collect(),
            Self::Quantized(q) => {
                let mut out = vec![0.0; q.elements];
                dequantize_row(q.kind, q.bytes.as_slice(), &mut out);
                out
            }
        }
    }

    /// The same values in another element type (no copy when it already is that type).
    pub fn convert(self, dtype: WeightDtype) -> Self {
        if self.dtype() == Some(dtype) {
            return self;
        }
        let values = self.to_f32();
        match dtype {
            WeightDtype::F32 => Self::F32(Buffer::Owned(Arc::new(values))),
            WeightDtype::F16 => Self::F16(Buffer::Owned(Arc::new(values.iter().map(|&v| f16::from_f32(v)).collect()))),
            WeightDtype::BF16 => {
                Self::BF16(Buffer::Owned(Arc::new(values.iter().map(|&v| bf16::from_f32(v)).collect())))
            }
        }
    }

    /// The values quantized into `kind`'s blocks (Q8_0 or Q4_0; the element count a whole
    /// number of blocks, so that the rows of a matrix whose width is too stay apart).
    pub fn quantize(&self, kind: QuantKind) -> std::result::Result<Self, String> {
        let bytes = crate::quant::quantize::quantize(kind, &self.to_f32())?;
        Ok(Self::Quantized(QuantData { kind, bytes: Buffer::Owned(Arc::new(bytes)), elements: self.len() }))
    }

    /// Copies row `row` of a `[rows, width]` matrix into `out` as f32.
    pub fn row_to_f32(&self, row: usize, width: usize, out: &mut [f32]) {
        let range = row * width..(row + 1) * width;
        match self {
            Self::F32(b) => out.copy_from_slice(&b.as_slice()[range]),
            Self::F16(b) => {
                for (o, v) in out.iter_mut().zip(&b.as_slice()[range]) {
                    *o = v.to_f32();
                }
            }
            Self::BF16(b) => {
                for (o, v) in out.iter_mut().zip(&b.as_slice()[range]) {
                    *o = v.to_f32();
                }
            }
            Self::Quantized(q) => {
                let row_bytes = q.kind.row_bytes(width).unwrap_or(0);
                let bytes = &q.bytes.as_slice()[row * row_bytes..(row + 1) * row_bytes];
                if !crate::cpu::qgemv::widen_row(q.kind, bytes, out, crate::cpu::gemv::isa()) {
                    dequantize_row(q.kind, bytes, out);
                }
            }
        }
    }
}

/// A named tensor: shape and data.
#[derive(Clone)]
pub struct Tensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Elements, row-major.
    pub data: TensorData,
}

struct Location {
    file: usize,
    offset: usize,
    /// Bytes of data.
    bytes: usize,
    format: QuantKind,
    shape: Vec<usize>,
    /// Heads whose rows are RoPE-interleaved (query/key tensors of Llama GGUF files).
    rope_heads: Option<usize>,
}

/// Where a GGUF tensor lies in its file, and what it holds.
pub struct GgufTensor {
    /// Byte offset from the start of the file.
    pub offset: usize,
    /// Bytes of data.
    pub bytes: usize,
    /// The element format.
    pub kind: QuantKind,
    /// Dimensions, outermost first (Hugging Face order).
    pub shape: Vec<usize>,
    /// Heads whose rows are RoPE-interleaved, to be put back in Hugging Face order.
    pub rope_heads: Option<usize>,
}

/// Every tensor of a model's weights file(s), by name: a directory's safetensors file(s), or a
/// GGUF file ([`crate::gguf_weights`]).
pub struct WeightStore {
    maps: Vec<Arc<Mmap>>,
    tensors: HashMap<String, Location>,
}

fn read_error(path: &Path, source: std::io::Error) -> ExecutorError {
    ExecutorError::Io { path: path.display().to_string(), source }
}

impl WeightStore {
    /// Maps `model.safetensors`, or every shard named by `model.safetensors.index.json`, or the
    /// GGUF file `model_dir` names ([`crate::gguf_weights::model_file`]).
    pub fn open(model_dir: &Path) -> Result<Self> {
        if let Some(file) = crate::gguf_weights::model_file(model_dir) {
            return Self::open_gguf(&file);
        }
        let index = model_dir.join("model.safetensors.index.json");
        let files: Vec<std::path::PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| read_error(&index, e))?;
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ExecutorError::Weights(format!("{}: {e}", index.display())))?;
            let map = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ExecutorError::Weights(format!("{} has no weight_map", index.display())))?;
            let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            names.into_iter().map(|n| model_dir.join(n)).collect()
        } else {
            let single = model_dir.join("model.safetensors");
            if !single.exists() {
                return Err(ExecutorError::Weights(format!(
                    "no model.safetensors or model.safetensors.index.json in {}",
                    model_dir.display()
                )));
            }
            vec![single]
        };
        let mut store = Self::empty();
        for path in files {
            store.add_file(&path)?;
        }
        Ok(store)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = std::fs::File::open(path).map_err(|e| read_error(path, e))?;
        // SAFETY: the mapping is read-only; weights files are not modified while served.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| read_error(path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| ExecutorError::Weights(format!("{}: {e}", path.display())))?;
        let data_start = 8 + header_len;
        let file_index = self.maps.len();
        for (name, info) in metadata.tensors() {
            let dtype = match info.dtype {
                Dtype::F32 => WeightDtype::F32,
                Dtype::F16 => WeightDtype::F16,
                Dtype::BF16 => WeightDtype::BF16,
                other => {
                    return Err(ExecutorError::Weights(format!(
                        "tensor {name} has unsupported dtype {other:?} (supported: F32, F16, BF16)"
                    )))
                }
            };
            let (begin, end) = info.data_offsets;
            let count: usize = info.shape.iter().product();
            if end - begin != count * dtype.size() {
                return Err(ExecutorError::Weights(format!("tensor {name}: byte size does not match its shape")));
            }
            let format = match dtype {
                WeightDtype::F32 => QuantKind::F32,
                WeightDtype::F16 => QuantKind::F16,
                WeightDtype::BF16 => QuantKind::BF16,
            };
            self.tensors.insert(
                name,
                Location {
                    file: file_index,
                    offset: data_start + begin,
                    bytes: end - begin,
                    format,
                    shape: info.shape.clone(),
                    rope_heads: None,
                },
            );
        }
        self.maps.push(Arc::new(map));
        Ok(())
    }

    /// A store with no tensors.
    pub fn empty() -> Self {
        Self { maps: Vec::new(), tensors: HashMap::new() }
    }

    /// Keeps a file mapping alive for tensors read from it; returns its index.
    pub fn add_map(&mut self, map: Arc<Mmap>) -> usize {
        self.maps.push(map);
        self.maps.len() - 1
    }

    /// Adds a tensor of a GGUF file mapped with [`add_map`](Self::add_map) (its offset and size
    /// were checked against the file).
    pub fn insert_gguf(&mut self, name: String, map: usize, t: GgufTensor) {
        let location = Location {
            file: map,
            offset: t.offset,
            bytes: t.bytes,
            format: t.kind,
            shape: t.shape,
            rope_heads: t.rope_heads,
        };
        self.tensors.insert(name, location);
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The stored dtype of a tensor.
    pub fn dtype_of(&self, name: &str) -> Option<WeightDtype> {
        self.tensors.get(name).and_then(|l| match l.format {
            QuantKind::F32 => Some(WeightDtype::F32),
            QuantKind::F16 => Some(WeightDtype::F16),
            QuantKind::BF16 => Some(WeightDtype::BF16),
            _ => None,
        })
    }

    /// The stored format of a tensor.
    pub fn format_of(&self, name: &str) -> Option<QuantKind> {
        self.tensors.get(name).map(|l| l.format)
    }

    /// A tensor with the expected shape, or an error naming what is wrong.
    pub fn get(&self, name: &str, expected_shape: &[usize]) -> Result<Tensor> {
        let loc = self.tensors.get(name).ok_or_else(|| ExecutorError::Weights(format!("missing tensor {name}")))?;
        if loc.shape != expected_shape {
            return Err(ExecutorError::Weights(format!(
                "tensor {name} has shape {:?}, expected {:?}",
                loc.shape, expected_shape
            )));
        }
        let (rows, width) = match loc.shape[..] {
            [rows, width] => (rows, width),
            [width] => (1, width),
            _ => (1, loc.shape.iter().product()),
        };
        let fits = loc.format.row_bytes(width).ok().and_then(|b| b.checked_mul(rows)) == Some(loc.bytes);
        if !fits {
            return Err(ExecutorError::Weights(format!(
                "tensor {name}: {} bytes do not hold shape {:?} in {}",
                loc.bytes,
                loc.shape,
                loc.format.name()
            )));
        }
        let map = &self.maps[loc.file];
        let stored = &map[loc.offset..loc.offset + loc.bytes];
        let owned = match loc.rope_heads {
            Some(heads) => Some(
                crate::gguf_weights::unpermute_rows(stored, loc.shape[0], heads)
                    .map_err(|e| ExecutorError::Weights(format!("tensor {name}: {e}")))?,
            ),
            None => None,
        };
        let elements = rows * width;
        let data = match (loc.format, owned) {
            (QuantKind::F32, None) => TensorData::F32(buffer(map, loc.offset, elements)),
            (QuantKind::F16, None) => TensorData::F16(buffer(map, loc.offset, elements)),
            (QuantKind::BF16, None) => TensorData::BF16(buffer(map, loc.offset, elements)),
            (QuantKind::F32, Some(b)) => TensorData::F32(Buffer::Owned(Arc::new(bytemuck::pod_collect_to_vec(&b)))),
            (QuantKind::F16, Some(b)) => TensorData::F16(Buffer::Owned(Arc::new(bytemuck::pod_collect_to_vec(&b)))),
            (QuantKind::BF16, Some(b)) => TensorData::BF16(Buffer::Owned(Arc::new(bytemuck::pod_collect_to_vec(&b)))),
            (kind, None) => TensorData::Quantized(QuantData {
                kind,
                bytes: Buffer::Mapped { map: map.clone(), offset: loc.offset, len: loc.bytes },
                elements,
            }),
            (kind, Some(b)) => TensorData::Quantized(QuantData { kind, bytes: Buffer::Owned(Arc::new(b)), elements }),
        };
        Ok(Tensor { shape: loc.shape.clone(), data })
    }
}

/// A buffer over the mapping when aligned for `T`, else an owned copy.
fn buffer<T: bytemuck::Pod>(map: &Arc<Mmap>, offset: usize, len: usize) -> Buffer<T> {
    let bytes = &map[offset..offset + len * std::mem::size_of::<T>()];
    match bytemuck::try_cast_slice::<u8, T>(bytes) {
        Ok(_) => Buffer::Mapped { map: map.clone(), offset, len },
        Err(_) => Buffer::Owned(Arc::new(bytemuck::pod_collect_to_vec(bytes))),
    }
}
