//! Reading GGUF files (llama.cpp's model format, versions 2 and 3): the header, the metadata
//! key/value pairs and the tensor table, with every tensor's bytes located in the memory-mapped
//! file. The file is untrusted input: every count and length is checked against what is left of
//! the file before anything is allocated, and a malformed file is an error, never a panic.
//!
//! The executor reads weights and the model's configuration from it, the tokenizer its
//! vocabulary and chat template; [`writer`] writes small files for tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use memmap2::Mmap;

pub mod writer;

/// A GGUF file that cannot be opened or parsed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GgufError(pub String);

/// Results of this crate.
pub type Result<T> = std::result::Result<T, GgufError>;

/// The four bytes every GGUF file starts with.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Most dimensions of a tensor (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Tensor data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value (serialized as the plain JSON value it holds).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum Value {
    /// `UINT8`.
    U8(u8),
    /// `INT8`.
    I8(i8),
    /// `UINT16`.
    U16(u16),
    /// `INT16`.
    I16(i16),
    /// `UINT32`.
    U32(u32),
    /// `INT32`.
    I32(i32),
    /// `FLOAT32`.
    F32(f32),
    /// `BOOL`.
    Bool(bool),
    /// `STRING` (UTF-8).
    Str(String),
    /// `ARRAY` of values of one type.
    Array(Vec<Value>),
    /// `UINT64`.
    U64(u64),
    /// `INT64`.
    I64(i64),
    /// `FLOAT64`.
    F64(f64),
}

impl Value {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, when it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The string, when the value is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// A tensor element type of ggml, with its block geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorType {
    /// ggml's numeric code.
    pub code: u32,
    /// ggml's name (`F32`, `Q4_K`, ...).
    pub name: &'static str,
    /// Elements per block.
    pub block_elements: u64,
    /// Bytes per block.
    pub block_bytes: u64,
}

/// The tensor types this reader knows the size of (codes as in ggml.h).
const TENSOR_TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (30, "BF16", 1, 2),
];

impl TensorType {
    /// The type of ggml code `code`, if this reader knows it.
    pub fn from_code(code: u32) -> Option<Self> {
        TENSOR_TYPES.iter().find(|t| t.0 == code).map(|&(code, name, block_elements, block_bytes)| TensorType {
            code,
            name,
            block_elements,
            block_bytes,
        })
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The tensor's name (`blk.0.attn_q.weight`, ...).
    pub name: String,
    /// Dimensions as GGUF stores them: fastest-varying first (`[columns, rows]` for a matrix).
    pub dims: Vec<u64>,
    /// The element type.
    pub kind: TensorType,
    /// Where its data starts, from the start of the file.
    pub offset: u64,
    /// Bytes of data.
    pub bytes: u64,
}

impl TensorInfo {
    /// Elements in the tensor.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF header: version, metadata and tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Metadata, by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors, in file order.
    pub tensors: Vec<TensorInfo>,
    /// Where the tensor data section starts.
    pub data_start: u64,
}

/// A GGUF file, memory-mapped, with its header.
pub struct GgufFile {
    /// The parsed header.
    pub header: Header,
    map: Arc<Mmap>,
}

impl GgufFile {
    /// Opens and parses `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| GgufError(format!("cannot open {}: {e}", path.display())))?;
        // SAFETY: the map is read-only and lives as long as this value; a file changed under it
        // by another process is outside what a model loader can defend against.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| GgufError(format!("cannot map {}: {e}", path.display())))?;
        let header = parse(&map).map_err(|e| GgufError(format!("{}: {e}", path.display())))?;
        Ok(Self { header, map: Arc::new(map) })
    }

    /// The bytes of tensor `info` (its offset and size were checked against the file).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.map[info.offset as usize..(info.offset + info.bytes) as usize]
    }

    /// The whole file's mapping (tensors are read in place from it).
    pub fn map(&self) -> &Arc<Mmap> {
        &self.map
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensors.iter().find(|t| t.name == name)
    }
}

/// The GGUF file a `--model` path names: the path itself when it ends in `.gguf`, or the one
/// `.gguf` file of a directory that has no `config.json`.
pub fn model_file(path: &Path) -> Option<PathBuf> {
    let is_gguf = |p: &Path| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if path.is_file() {
        return is_gguf(path).then(|| path.to_path_buf());
    }
    if !path.is_dir() || path.join("config.json").exists() {
        return None;
    }
    let mut found = std::fs::read_dir(path).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| is_gguf(p));
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// The architectures whose GGUF metadata maps onto this executor's Llama-family model, with the
/// Hugging Face names they correspond to.
const ARCHITECTURES: &[(&str, &str, &str)] = &[
    ("llama", "llama", "LlamaForCausalLM"),
    ("mistral", "mistral", "MistralForCausalLM"),
    ("qwen2", "qwen2", "Qwen2ForCausalLM"),
];

impl Header {
    fn meta_u64(&self, key: &str) -> std::result::Result<Option<u64>, String> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| format!("{key} is not a non-negative integer: {v:?}")),
        }
    }

    fn meta_f64(&self, key: &str) -> std::result::Result<Option<f64>, String> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| format!("{key} is not a number: {v:?}")),
        }
    }

    /// The model's configuration as a Hugging Face `config.json` object, from the metadata
    /// (`<arch>.block_count`, `<arch>.embedding_length`, ...), so that the executor's own config
    /// parser checks it like any other. Embeddings are tied when the file has no
    /// `output.weight`.
    pub fn hf_config(&self) -> std::result::Result<serde_json::Value, String> {
        let arch = self
            .metadata
            .get("general.architecture")
            .and_then(Value::as_str)
            .ok_or("general.architecture is missing or not a string")?;
        let &(_, model_type, class) = ARCHITECTURES.iter().find(|a| a.0 == arch).ok_or_else(|| {
            let known: Vec<&str> = ARCHITECTURES.iter().map(|a| a.0).collect();
            format!("architecture {arch} is not supported (known: {})", known.join(", "))
        })?;
        let need = |name: &str| -> std::result::Result<u64, String> {
            self.meta_u64(&format!("{arch}.{name}"))?.ok_or_else(|| format!("{arch}.{name} is missing"))
        };
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let kv_heads = self.meta_u64(&format!("{arch}.attention.head_count_kv"))?.unwrap_or(heads);
        let head_dim = match self.meta_u64(&format!("{arch}.attention.key_length"))? {
            Some(d) => d,
            None if heads > 0 => hidden / heads,
            None => return Err(format!("{arch}.attention.head_count is 0")),
        };
        let vocab = match self.meta_u64(&format!("{arch}.vocab_size"))? {
            Some(v) => v,
            None => match self.metadata.get("tokenizer.ggml.tokens") {
                Some(Value::Array(tokens)) => tokens.len() as u64,
                _ => return Err(format!("neither {arch}.vocab_size nor tokenizer.ggml.tokens gives the vocabulary")),
            },
        };
        let mut config = serde_json::json!({
            "architectures": [class],
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": need("feed_forward_length")?,
            "num_hidden_layers": need("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "vocab_size": vocab,
            "max_position_embeddings": need("context_length")?,
            "rms_norm_eps": self.meta_f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
            "rope_theta": self.meta_f64(&format!("{arch}.rope.freq_base"))?.unwrap_or(10000.0),
            "tie_word_embeddings": !self.tensors.iter().any(|t| t.name == "output.weight"),
            "hidden_act": "silu",
        });
        for (key, field) in
            [("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")]
        {
            if let Some(id) = self.meta_u64(key)? {
                config[field] = id.into();
            }
        }
        Ok(config)
    }
}

/// A cursor over the file's bytes that refuses to read past the end.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        if n > self.left() {
            return Err(format!("the file ends inside {what} (at byte {}, {n} more needed)", self.pos));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items of at least `min_bytes` each, checked against what is left.
    fn count(&mut self, min_bytes: usize, what: &str) -> std::result::Result<usize, String> {
        let n = self.u64(what)?;
        let fits = usize::try_from(n).ok().filter(|&n| n.saturating_mul(min_bytes.max(1)) <= self.left());
        fits.ok_or_else(|| format!("{what}: {n} items cannot fit in the {} bytes left", self.left()))
    }

    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let len = self.count(1, what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn value(&mut self, kind: u32, depth: usize, what: &str) -> std::result::Result<Value, String> {
        Ok(match kind {
            0 => Value::U8(u8::from_le_bytes(self.array(what)?)),
            1 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{what}: {b} is not a boolean")),
            },
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth > 0 {
                    return Err(format!("{what}: arrays of arrays are not supported"));
                }
                let element = self.u32(what)?;
                let min = match element {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    _ => 1,
                };
                let n = self.count(min, what)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(element, depth + 1, what)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(format!("{what}: unknown value type {other}")),
        })
    }
}

/// Parses a GGUF file's header from its bytes, checking every tensor against the file's length.
pub fn parse(bytes: &[u8]) -> std::result::Result<Header, String> {
    let mut c = Cursor { bytes, pos: 0 };
    if c.take(4, "the magic")? != MAGIC {
        return Err("not a GGUF file (it does not start with \"GGUF\")".into());
    }
    let version = c.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} is not supported (2 and 3 are)"));
    }
    // A tensor entry takes at least 8 (name length) + 4 (dims) + 4 (type) + 8 (offset) bytes,
    // a key/value pair at least 8 + 4 + 1.
    let tensor_count = c.count(24, "the tensor count")?;
    let kv_count = c.count(13, "the metadata count")?;
    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key = c.string("a metadata key")?;
        let kind = c.u32(&key)?;
        let value = c.value(kind, 0, &key)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("metadata key {key} appears twice"));
        }
    }
    let mut raw = Vec::with_capacity(tensor_count);
    for _ in 0..tensor_count {
        let name = c.string("a tensor name")?;
        let n_dims = c.u32(&name)? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!("tensor {name}: {n_dims} dimensions (1 to {MAX_DIMS} are possible)"));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(c.u64(&name)?);
        }
        let code = c.u32(&name)?;
        let offset = c.u64(&name)?;
        raw.push((name, dims, code, offset));
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            _ => return Err(format!("general.alignment {v:?} is not a power of two")),
        },
    };
    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, dims, code, offset) in raw {
        let kind = TensorType::from_code(code)
            .ok_or_else(|| format!("tensor {name}: ggml type {code} is not one this reader knows"))?;
        let elements = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let elements = elements.ok_or_else(|| format!("tensor {name}: its dimensions {dims:?} overflow"))?;
        if !elements.is_multiple_of(kind.block_elements) {
            return Err(format!(
                "tensor {name}: {elements} elements are not whole {}-element blocks of {}",
                kind.block_elements, kind.name
            ));
        }
        let bytes_len = elements / kind.block_elements * kind.block_bytes;
        if !offset.is_multiple_of(alignment) {
            return Err(format!("tensor {name}: offset {offset} is not aligned to {alignment}"));
        }
        let start = data_start.checked_add(offset);
        let end = start.and_then(|s| s.checked_add(bytes_len));
        match (start, end) {
            (Some(start), Some(end)) if end <= bytes.len() as u64 => {
                tensors.push(TensorInfo { name, dims, kind, offset: start, bytes: bytes_len })
            }
            _ => {
                return Err(format!(
                    "tensor {name}: {bytes_len} bytes at offset {offset} lie past the end of the file ({} bytes)",
                    bytes.len()
                ))
            }
        }
    }
    Ok(Header { version, metadata, tensors, data_start })
}

#[cfg(test)]
mod tests {
    use super::writer::{string, Writer};
    use super::*;

    fn sample() -> Writer {
        let mut w = Writer::default();
        let mut tokens = 8u32.to_le_bytes().to_vec(); // an array of strings
        tokens.extend(2u64.to_le_bytes());
        string(&mut tokens, "<s>");
        string(&mut tokens, "é");
        w.kv("general.architecture", 8, &{
            let mut v = Vec::new();
            string(&mut v, "llama");
            v
        })
        .kv("llama.block_count", 4, &30u32.to_le_bytes())
        .kv("llama.rope.freq_base", 6, &100000f32.to_le_bytes())
        .kv("tokenizer.ggml.add_bos_token", 7, &[0])
        .kv("tokenizer.ggml.tokens", 9, &tokens)
        .tensor("norm.weight", &[4], 0, [1f32, 2.0, 3.0, 4.0].iter().flat_map(|f| f.to_le_bytes()).collect())
        .tensor("q.weight", &[32, 2], 3, vec![7u8; 40]);
        w
    }

    #[test]
    fn a_written_file_reads_back() {
        let bytes = sample().bytes();
        let h = parse(&bytes).expect("parses");
        assert_eq!(h.version, 3);
        assert_eq!(h.metadata["general.architecture"].as_str(), Some("llama"));
        assert_eq!(h.metadata["llama.block_count"].as_u64(), Some(30));
        assert_eq!(h.metadata["llama.rope.freq_base"].as_f64(), Some(100000.0));
        assert_eq!(h.metadata["tokenizer.ggml.add_bos_token"], Value::Bool(false));
        assert_eq!(
            h.metadata["tokenizer.ggml.tokens"],
            Value::Array(vec![Value::Str("<s>".into()), Value::Str("é".into())])
        );
        let norm = &h.tensors[0];
        assert_eq!((norm.kind.name, norm.dims.clone(), norm.bytes), ("F32", vec![4], 16));
        assert_eq!(&bytes[norm.offset as usize..norm.offset as usize + 4], 1f32.to_le_bytes());
        let q = &h.tensors[1];
        assert_eq!((q.kind.name, q.elements(), q.bytes, q.offset - norm.offset), ("Q4_1", 64, 40, 32));
    }

    #[test]
    fn metadata_becomes_a_hugging_face_config() {
        let mut w = sample();
        for (key, value) in [
            ("llama.embedding_length", 576u32),
            ("llama.feed_forward_length", 1536),
            ("llama.attention.head_count", 9),
            ("llama.attention.head_count_kv", 3),
            ("llama.context_length", 8192),
            ("llama.vocab_size", 49152),
        ] {
            w.kv(key, 4, &value.to_le_bytes());
        }
        let h = parse(&w.bytes()).expect("parses");
        let config = h.hf_config().expect("a config");
        assert_eq!(config["head_dim"], 64);
        assert_eq!(config["tie_word_embeddings"], true, "no output.weight: tied");
        assert_eq!((config["num_hidden_layers"].as_u64(), config["hidden_size"].as_u64()), (Some(30), Some(576)));
        assert_eq!((config["num_key_value_heads"].as_u64(), config["rope_theta"].as_f64()), (Some(3), Some(100000.0)));
        let mut missing = sample();
        missing.kv("llama.embedding_length", 4, &576u32.to_le_bytes());
        let err = parse(&missing.bytes()).expect("parses").hf_config().unwrap_err();
        assert!(err.contains("llama.attention.head_count is missing"), "{err}");
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = sample().bytes();
        for len in 0..bytes.len() {
            assert!(parse(&bytes[..len]).is_err(), "a file cut at {len} bytes parsed");
        }
    }

    #[test]
    fn hostile_counts_and_types_are_refused_before_allocating() {
        let good = sample().bytes();
        // A tensor count of 2^60: refused from the bytes left, nothing reserved.
        let mut huge = good.clone();
        huge[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(parse(&huge).unwrap_err().contains("cannot fit"));
        // A string length of 2^63.
        let mut long = good.clone();
        long[24..32].copy_from_slice(&(1u64 << 63).to_le_bytes());
        assert!(parse(&long).unwrap_err().contains("cannot fit"));
        // An unknown tensor type, and a tensor past the end of the file.
        let mut w = sample();
        w.tensor("odd", &[4], 99, vec![0; 4]);
        assert!(parse(&w.bytes()).unwrap_err().contains("ggml type 99"));
        let bytes = sample().bytes();
        assert!(parse(&bytes[..bytes.len() - 8]).unwrap_err().contains("past the end"));
        // Not GGUF, and an unsupported version.
        assert!(parse(b"GGML\x03\0\0\0").unwrap_err().contains("not a GGUF file"));
        let mut v9 = good;
        v9[4..8].copy_from_slice(&9u32.to_le_bytes());
        assert!(parse(&v9).unwrap_err().contains("version 9"));
    }
}
