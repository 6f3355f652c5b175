//! A small GGUF writer, for tests and synthetic models: metadata pairs and tensors in, the
//! file's bytes out (tensor data aligned to 32 bytes).

/// A GGUF version 3 file built in memory, key by key and tensor by tensor.
#[derive(Default)]
pub struct Writer {
    kv: Vec<u8>,
    kv_count: u64,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

/// Appends a GGUF string (u64 length, UTF-8 bytes) to `out`.
pub fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Writer {
    /// Adds a metadata pair: `kind` is GGUF's value type code, `value` its encoded bytes.
    pub fn kv(&mut self, key: &str, kind: u32, value: &[u8]) -> &mut Self {
        string(&mut self.kv, key);
        self.kv.extend(kind.to_le_bytes());
        self.kv.extend(value);
        self.kv_count += 1;
        self
    }

    /// Adds a tensor: GGUF dims (fastest first), ggml type code and data.
    pub fn tensor(&mut self, name: &str, dims: &[u64], code: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.into(), dims.to_vec(), code, data));
        self
    }

    /// Adds a string value.
    pub fn kv_str(&mut self, key: &str, value: &str) -> &mut Self {
        let mut v = Vec::new();
        string(&mut v, value);
        self.kv(key, 8, &v)
    }

    /// Adds a `UINT32` value.
    pub fn kv_u32(&mut self, key: &str, value: u32) -> &mut Self {
        self.kv(key, 4, &value.to_le_bytes())
    }

    /// Adds a `BOOL` value.
    pub fn kv_bool(&mut self, key: &str, value: bool) -> &mut Self {
        self.kv(key, 7, &[u8::from(value)])
    }

    /// Adds an array of strings.
    pub fn kv_strings<S: AsRef<str>>(&mut self, key: &str, values: &[S]) -> &mut Self {
        let mut v = 8u32.to_le_bytes().to_vec();
        v.extend((values.len() as u64).to_le_bytes());
        for s in values {
            string(&mut v, s.as_ref());
        }
        self.kv(key, 9, &v)
    }

    /// Adds an array of `INT32`.
    pub fn kv_i32s(&mut self, key: &str, values: &[i32]) -> &mut Self {
        let mut v = 5u32.to_le_bytes().to_vec();
        v.extend((values.len() as u64).to_le_bytes());
        v.extend(values.iter().flat_map(|x| x.to_le_bytes()));
        self.kv(key, 9, &v)
    }

    /// Adds an array of `FLOAT32`.
    pub fn kv_f32s(&mut self, key: &str, values: &[f32]) -> &mut Self {
        let mut v = 6u32.to_le_bytes().to_vec();
        v.extend((values.len() as u64).to_le_bytes());
        v.extend(values.iter().flat_map(|x| x.to_le_bytes()));
        self.kv(key, 9, &v)
    }

    /// The whole file.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend(self.kv_count.to_le_bytes());
        out.extend(&self.kv);
        let mut data = Vec::new();
        for (name, dims, code, bytes) in &self.tensors {
            while !data.len().is_multiple_of(32) {
                data.push(0);
            }
            string(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(code.to_le_bytes());
            out.extend((data.len() as u64).to_le_bytes());
            data.extend(bytes);
        }
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out.extend(data);
        out
    }
}
