//! The CUDA kernels (`kernels/cuda`) and the GPU backend's GEMM and swaps, against the CPU
//! backend, in f32, f16 and bf16 — through [`KernelBackend`], on the backend
//! `PAGEMESH_TEST_DEVICE` names: the SIMT emulation harness by default (`emulated`), or a real
//! GPU (`cuda`, as the device check runs it: `kernels/device-check.sh`).
//!
//! Inputs are random and fresh each run: every test prints its seed, and
//! `PAGEMESH_KERNEL_SEED=<seed>` replays it. Outputs start poisoned (NaN), so an element a
//! kernel fails to write fails the comparison. The error of a result is
//! `max |got - want| / max |want|` over the whole output; it must stay below 1e-5 in f32 and
//! 1e-2 in f16/bf16 (the CPU reference runs in f32 on the same rounded inputs).

use std::sync::{Mutex, MutexGuard, OnceLock};

use half::{bf16, f16};
use pagemesh_executor::cpu::attention::{paged_attention, row_spans, SeqSpan};
use pagemesh_executor::cpu::kv_cache::{BlockShape, KvCache};
use pagemesh_executor::cpu::ops::{inv_frequencies, rms_norm, silu_mul, RopeTable};
use pagemesh_executor::gpu::{CudaBackend, DecodeMeta, EmulatedBackend, GpuElement, KernelBackend, PrefillMeta};
use pagemesh_executor::ModelConfig;
use pagemesh_kernels::geometry::{flatten_tiles, prefill_tiles};
use pagemesh_kernels::{AttentionShape, Dtype, Element};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Whether the tests run on a GPU (`PAGEMESH_TEST_DEVICE=cuda`) instead of the emulation.
fn on_cuda() -> bool {
    match std::env::var("PAGEMESH_TEST_DEVICE").as_deref() {
        Ok("cuda") => true,
        Ok("emulated") | Err(_) => false,
        Ok(other) => panic!("PAGEMESH_TEST_DEVICE={other}: expected cuda or emulated"),
    }
}

/// GPU 0, opened once and used by one test at a time (a cuBLAS handle is not for concurrent use).
fn cuda() -> MutexGuard<'static, CudaBackend> {
    static GPU: OnceLock<Mutex<CudaBackend>> = OnceLock::new();
    let gpu = GPU.get_or_init(|| {
        let started = std::time::Instant::now();
        let backend = CudaBackend::new(0, None).unwrap_or_else(|e| panic!("opening GPU 0: {e}"));
        eprintln!(
            "GPU 0: {} (kernels compiled in {:.2} s)",
            backend.name().unwrap_or_default(),
            started.elapsed().as_secs_f64()
        );
        Mutex::new(backend)
    });
    gpu.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `$body` with `$b` bound to the backend under test (`&EmulatedBackend` or `&CudaBackend`).
macro_rules! with_backend {
    ($b:ident => $body:expr) => {{
        if on_cuda() {
            let guard = cuda();
            let $b: &CudaBackend = &guard;
            $body
        } else {
            let $b = &EmulatedBackend;
            $body
        }
    }};
}

/// Runs `f::<E, _>(backend, args)` once per element type.
macro_rules! each_dtype {
    ($f:ident($($a:expr),*)) => {{
        with_backend!(b => {
            $f::<f32, _>(b, $($a),*);
            $f::<f16, _>(b, $($a),*);
            $f::<bf16, _>(b, $($a),*);
        })
    }};
}

fn to_dev<T: pagemesh_executor::gpu::DeviceValue, E: GpuElement, B: KernelBackend<E>>(
    b: &B,
    data: &[T],
) -> B::Buffer<T> {
    b.upload(data).expect("upload")
}

fn from_dev<E: GpuElement, B: KernelBackend<E>>(b: &B, buf: &B::Buffer<E>) -> Vec<E> {
    b.download(buf).expect("download")
}

/// A fresh (or replayed) seeded generator; prints the seed.
fn rng(test: &str) -> StdRng {
    let seed = std::env::var("PAGEMESH_KERNEL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    eprintln!("{test}: seed {seed} (PAGEMESH_KERNEL_SEED={seed} replays it)");
    StdRng::seed_from_u64(seed)
}

fn uniform(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

fn to_elems<E: Element>(v: &[f32]) -> Vec<E> {
    v.iter().map(|&x| E::from_f32(x)).collect()
}

fn to_f32<E: Element>(v: &[E]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// `v` rounded to `E` and back: what the kernel sees.
fn rounded<E: Element>(v: &[f32]) -> Vec<f32> {
    to_f32(&to_elems::<E>(v))
}

fn poisoned<E: Element>(n: usize) -> Vec<E> {
    vec![E::from_f32(f32::NAN); n]
}

fn tolerance<E: Element>() -> f64 {
    if E::DTYPE == Dtype::F32 {
        1e-5
    } else {
        1e-2
    }
}

/// `max |got - want| / max |want|`; infinite when `got` has a non-finite element.
fn rel_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "output length");
    if got.iter().any(|g| !g.is_finite()) {
        return f64::INFINITY;
    }
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs() as f64)).max(1e-30);
    got.iter().zip(want).fold(0.0f64, |m, (g, w)| m.max((*g as f64 - *w as f64).abs())) / scale
}

fn check<E: Element>(what: &str, got: &[E], want: &[f32]) -> f64 {
    let err = rel_error(&to_f32(got), want);
    assert!(err < tolerance::<E>(), "{what} ({:?}): relative error {err:e}", E::DTYPE);
    err
}

fn embedding_case<E: GpuElement, B: KernelBackend<E>>(b: &B, rng: &mut StdRng) {
    for d in [8usize, 64, 300] {
        let vocab = 50;
        let table = to_elems::<E>(&uniform(rng, vocab * d, 1.0));
        let tokens: Vec<i32> = (0..13).map(|_| rng.gen_range(0..vocab as i32)).collect();
        let mut out = to_dev(b, &poisoned::<E>(tokens.len() * d));
        b.embedding(&mut out, &to_dev(b, &table), &to_dev(b, &tokens), d).expect("embedding");
        let out = from_dev(b, &out);
        let want: Vec<f32> =
            tokens.iter().flat_map(|&t| to_f32(&table[t as usize * d..(t as usize + 1) * d])).collect();
        assert_eq!(check("embedding", &out, &want), 0.0, "a gather is exact");
    }
}

#[test]
fn embedding_gathers_rows() {
    let mut rng = rng("embedding");
    each_dtype!(embedding_case(&mut rng));
}

fn rms_norm_case<E: GpuElement, B: KernelBackend<E>>(b: &B, rng: &mut StdRng) {
    for (rows, d) in [(7usize, 64usize), (3, 8), (5, 300), (2, 4096)] {
        let eps = 1e-5;
        let x = rounded::<E>(&uniform(rng, rows * d, 2.0));
        let w = rounded::<E>(&uniform(rng, d, 1.5));
        let mut want = vec![0.0; rows * d];
        rms_norm(&x, &w, eps, &mut want);
        let mut out = to_dev(b, &poisoned::<E>(rows * d));
        let w_dev = to_dev(b, &to_elems::<E>(&w));
        b.rms_norm(&mut out, &to_dev(b, &to_elems::<E>(&x)), &w_dev, eps).expect("rms_norm");
        let out = from_dev(b, &out);
        check(&format!("rms_norm d {d}"), &out, &want);

        // Fused residual add: residual += delta, out = rms_norm(residual).
        let delta = rounded::<E>(&uniform(rng, rows * d, 1.0));
        let sum: Vec<f32> = x.iter().zip(&delta).map(|(a, b)| a + b).collect();
        let mut want = vec![0.0; rows * d];
        rms_norm(&sum, &w, eps, &mut want);
        let mut residual = to_dev(b, &to_elems::<E>(&x));
        let mut out = to_dev(b, &poisoned::<E>(rows * d));
        b.fused_add_rms_norm(&mut out, &mut residual, &to_dev(b, &to_elems::<E>(&delta)), &w_dev, eps)
            .expect("fused_add_rms_norm");
        let (residual, out) = (from_dev(b, &residual), from_dev(b, &out));
        check(&format!("fused_add_rms_norm residual d {d}"), &residual, &sum);
        check(&format!("fused_add_rms_norm d {d}"), &out, &want);
    }
}

#[test]
fn rms_norm_and_fused_residual_add_match_the_cpu() {
    let mut rng = rng("rms_norm");
    each_dtype!(rms_norm_case(&mut rng));
}

fn rope_config(head_dim: usize, heads: usize, kv_heads: usize, scaling: &str) -> ModelConfig {
    let text = format!(
        r#"{{"architectures":["LlamaForCausalLM"],"hidden_size":{},"intermediate_size":8,"num_hidden_layers":1,
        "num_attention_heads":{heads},"num_key_value_heads":{kv_heads},"head_dim":{head_dim},"vocab_size":4,
        "rope_theta":500000.0,"max_position_embeddings":9000{scaling}}}"#,
        heads * head_dim
    );
    ModelConfig::parse(&text).expect("test config parses")
}

fn rope_case<E: GpuElement, B: KernelBackend<E>>(b: &B, rng: &mut StdRng) {
    let llama3 = r#","rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":1024}"#;
    for (hd, heads, kv_heads, scaling) in [(64, 4, 1, ""), (128, 8, 2, llama3), (8, 8, 4, "")] {
        let config = rope_config(hd, heads, kv_heads, scaling);
        let shape = AttentionShape { num_heads: heads, num_kv_heads: kv_heads, head_dim: hd, block_size: 16 };
        let rows = 9;
        let positions: Vec<i32> = (0..rows).map(|_| rng.gen_range(0..8192)).collect();
        let q = rounded::<E>(&uniform(rng, rows * heads * hd, 1.0));
        let k = rounded::<E>(&uniform(rng, rows * kv_heads * hd, 1.0));
        let table = RopeTable::new(&config, 8192);
        let (mut want_q, mut want_k) = (q.clone(), k.clone());
        for (r, &p) in positions.iter().enumerate() {
            table.apply(&mut want_q[r * heads * hd..(r + 1) * heads * hd], p as usize);
            table.apply(&mut want_k[r * kv_heads * hd..(r + 1) * kv_heads * hd], p as usize);
        }
        let (mut got_q, mut got_k) = (to_dev(b, &to_elems::<E>(&q)), to_dev(b, &to_elems::<E>(&k)));
        b.rope(&mut got_q, &mut got_k, &to_dev(b, &positions), &to_dev(b, &inv_frequencies(&config)), &shape)
            .expect("rope");
        let (got_q, got_k) = (from_dev(b, &got_q), from_dev(b, &got_k));
        check(&format!("rope q hd {hd} {}", if scaling.is_empty() { "plain" } else { "llama3" }), &got_q, &want_q);
        check(&format!("rope k hd {hd}"), &got_k, &want_k);
    }
}

#[test]
fn rope_matches_the_cpu_with_and_without_llama3_scaling() {
    let mut rng = rng("rope");
    each_dtype!(rope_case(&mut rng));
}

fn silu_mul_case<E: GpuElement, B: KernelBackend<E>>(b: &B, rng: &mut StdRng) {
    let n = rng.gen_range(1000..3000);
    let gate = rounded::<E>(&uniform(rng, n, 8.0));
    let up = rounded::<E>(&uniform(rng, n, 2.0));
    let mut want = gate.clone();
    silu_mul(&mut want, &up);
    let mut in_place = to_dev(b, &to_elems::<E>(&gate));
    b.silu_mul_in_place(&mut in_place, &to_dev(b, &to_elems::<E>(&up))).expect("silu_mul");
    let in_place = from_dev(b, &in_place);
    check("silu_mul in place", &in_place, &want);
}

#[test]
fn silu_mul_matches_the_cpu() {
    let mut rng = rng("silu_mul");
    each_dtype!(silu_mul_case(&mut rng));
}

/// Both pools hold the same elements, NaN (never written) included.
fn assert_same_pool<E: Element>(what: &str, got: &[E], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: pool length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let g = g.to_f32();
        assert!(g == *w || (g.is_nan() && w.is_nan()), "{what} ({:?}): element {i} is {g}, want {w}", E::DTYPE);
    }
}

fn cache_case<E: GpuElement, B: KernelBackend<E>>(b: &B, rng: &mut StdRng) {
    for bs in [8usize, 16, 32] {
        for (hd, kv_heads) in [(64usize, 2usize), (128, 1), (8, 4)] {
            let shape = AttentionShape { num_heads: kv_heads, num_kv_heads: kv_heads, head_dim: hd, block_size: bs };
            let blocks = 12;
            let block_shape = BlockShape { block_size: bs, num_kv_heads: kv_heads, head_dim: hd };
            let mut cache = KvCache::new(1, block_shape, blocks, 0);
            cache.device.k[0].fill(f32::NAN);
            cache.device.v[0].fill(f32::NAN);
            let (mut k_pool, mut v_pool) = (
                to_dev(b, &poisoned::<E>(cache.device.k[0].len())),
                to_dev(b, &poisoned::<E>(cache.device.k[0].len())),
            );
            // Distinct slots anywhere in the pool, and one padding row (-1) that is skipped.
            let mut all: Vec<i64> = (0..(blocks * bs) as i64).collect();
            all.shuffle(rng);
            let mut slots: Vec<i64> = all[..3 * bs + 5].to_vec();
            slots.insert(4, -1);
            let width = kv_heads * hd;
            let k = rounded::<E>(&uniform(rng, slots.len() * width, 1.0));
            let v = rounded::<E>(&uniform(rng, slots.len() * width, 1.0));
            for (r, &s) in slots.iter().enumerate() {
                if s >= 0 {
                    cache.write(0, s as usize, &k[r * width..(r + 1) * width], &v[r * width..(r + 1) * width]);
                }
            }
            let (k_dev, v_dev) = (to_dev(b, &to_elems::<E>(&k)), to_dev(b, &to_elems::<E>(&v)));
            b.reshape_and_cache(&k_dev, &v_dev, &mut k_pool, &mut v_pool, &to_dev(b, &slots), &shape)
                .expect("reshape_and_cache");
            assert_same_pool(
                &format!("reshape_and_cache K bs {bs} hd {hd}"),
                &from_dev(b, &k_pool),
                &cache.device.k[0],
            );
            assert_same_pool(
                &format!("reshape_and_cache V bs {bs} hd {hd}"),
                &from_dev(b, &v_pool),
                &cache.device.v[0],
            );

            // Copy-on-write: sources among the written blocks, destinations elsewhere.
            let mut ids: Vec<u32> = (0..blocks as u32).collect();
            ids.shuffle(rng);
            let pairs = [(ids[0], ids[1]), (ids[2], ids[3]), (ids[0], ids[4])];
            for &(s, d) in &pairs {
                cache.copy(s as usize, d as usize);
            }
            b.copy_blocks(&mut k_pool, &mut v_pool, &pairs, &shape).expect("copy_blocks");
            assert_same_pool(&format!("copy_blocks K bs {bs} hd {hd}"), &from_dev(b, &k_pool), &cache.device.k[0]);
            assert_same_pool(&format!("copy_blocks V bs {bs} hd {hd}"), &from_dev(b, &v_pool), &cache.device.v[0]);
        }
    }
}

#[test]
fn reshape_and_cache_and_copy_blocks_match_the_cpu_layout() {
    let mut rng = rng("cache");
    each_dtype!(cache_case(&mut rng));
}

/// Sequences with their blocks scattered over a shared pool, filled with random keys and values
/// (already rounded to the kernel's type).
struct PagedFixture {
    shape: AttentionShape,
    cache: KvCache,
    tables: Vec<Vec<u32>>,
    max_blocks: usize,
}

impl PagedFixture {
    fn new(rng: &mut StdRng, shape: AttentionShape, lens: &[usize], round: fn(&[f32]) -> Vec<f32>) -> Self {
        let bs = shape.block_size;
        let needed: usize = lens.iter().map(|l| l.div_ceil(bs)).sum();
        let total = needed + 5;
        let block_shape = BlockShape { block_size: bs, num_kv_heads: shape.num_kv_heads, head_dim: shape.head_dim };
        let mut cache = KvCache::new(1, block_shape, total, 0);
        let mut free: Vec<u32> = (0..total as u32).collect();
        free.shuffle(rng);
        let width = shape.num_kv_heads * shape.head_dim;
        let max_blocks = lens.iter().map(|l| l.div_ceil(bs)).max().unwrap_or(1);
        let mut tables = Vec::new();
        for &len in lens {
            let table: Vec<u32> = free.drain(..len.div_ceil(bs)).collect();
            let k = round(&uniform(rng, len * width, 1.0));
            let v = round(&uniform(rng, len * width, 1.0));
            for p in 0..len {
                let slot = table[p / bs] as usize * bs + p % bs;
                cache.write(0, slot, &k[p * width..(p + 1) * width], &v[p * width..(p + 1) * width]);
            }
            tables.push(table);
        }
        Self { shape, cache, tables, max_blocks }
    }

    /// The K and V pools on the backend, in its element type.
    fn pools_on<E: GpuElement, B: KernelBackend<E>>(&self, b: &B) -> (B::Buffer<E>, B::Buffer<E>) {
        (to_dev(b, &to_elems::<E>(&self.cache.device.k[0])), to_dev(b, &to_elems::<E>(&self.cache.device.v[0])))
    }

    /// Block tables padded to `max_blocks` (with block 0).
    fn flat_tables(&self) -> Vec<i32> {
        self.tables.iter().flat_map(|t| (0..self.max_blocks).map(|i| t.get(i).map_or(0, |&b| b as i32))).collect()
    }

    /// The CPU reference for the given spans over `rows` query rows.
    fn reference(&self, q: &[f32], spans: &[SeqSpan<'_>], rows: usize) -> Vec<f32> {
        let mut out = vec![0.0; q.len()];
        let isa = pagemesh_executor::cpu::gemv::isa();
        paged_attention(isa, q, &self.cache, 0, spans, &row_spans(spans, rows), self.shape.num_heads, &mut out);
        out
    }
}

/// Every block size, head dim and GQA ratio the kernels are tuned for.
fn attention_shapes() -> Vec<AttentionShape> {
    let mut shapes = Vec::new();
    for block_size in [8, 16, 32] {
        for head_dim in [64, 128] {
            for group in [1, 4, 8] {
                shapes.push(AttentionShape { num_heads: 2 * group, num_kv_heads: 2, head_dim, block_size });
            }
        }
    }
    // The test model's geometry, a head wider than the block of threads, and one that leaves
    // threads idle.
    shapes.push(AttentionShape { num_heads: 8, num_kv_heads: 4, head_dim: 8, block_size: 4 });
    shapes.push(AttentionShape { num_heads: 4, num_kv_heads: 2, head_dim: 256, block_size: 16 });
    shapes.push(AttentionShape { num_heads: 2, num_kv_heads: 1, head_dim: 96, block_size: 16 });
    shapes
}

fn decode_case<E: GpuElement, B: KernelBackend<E>>(b: &B, rng: &mut StdRng, shape: AttentionShape) -> f64 {
    let bs = shape.block_size;
    // Short, exactly whole blocks, a partial last block, and contexts over one and two
    // partition boundaries.
    let contexts = [1usize, 5, 3 * bs, 3 * bs + 1, 37, 600, 1100];
    let fx = PagedFixture::new(rng, shape, &contexts, rounded::<E>);
    let width = shape.num_heads * shape.head_dim;
    // One more query row than sequences: it is not decoded and must stay poisoned.
    let rows = contexts.len() + 1;
    let mut q_rows: Vec<i32> = (0..contexts.len() as i32).collect();
    q_rows.shuffle(rng);
    let q = rounded::<E>(&uniform(rng, rows * width, 1.0));
    let mut spans: Vec<SeqSpan<'_>> = contexts
        .iter()
        .enumerate()
        .map(|(s, &c)| SeqSpan { first_row: q_rows[s] as usize, len: 1, start_pos: c - 1, block_table: &fx.tables[s] })
        .collect();
    // The reference computes every row: give the extra one a span of its own.
    spans.push(SeqSpan { first_row: rows - 1, len: 1, start_pos: 0, block_table: &fx.tables[0] });
    let want = fx.reference(&q, &spans, rows);
    let context_lens: Vec<i32> = contexts.iter().map(|&c| c as i32).collect();
    let mut out = to_dev(b, &poisoned::<E>(rows * width));
    let meta = DecodeMeta {
        q_rows: to_dev(b, &q_rows),
        context_lens: to_dev(b, &context_lens),
        tables: to_dev(b, &fx.flat_tables()),
        max_blocks: fx.max_blocks,
        num_seqs: contexts.len(),
        max_context: contexts.iter().copied().max().unwrap_or(1),
    };
    let (k_pool, v_pool) = fx.pools_on(b);
    b.paged_attention_decode(&mut out, &to_dev(b, &to_elems::<E>(&q)), &k_pool, &v_pool, &meta, &shape)
        .expect("paged_attention_decode");
    let out = from_dev(b, &out);
    let decoded = contexts.len() * width;
    assert!(to_f32(&out[decoded..]).iter().all(|x| x.is_nan()), "a row that is not decoded was written");
    check(&format!("decode {shape:?}"), &out[..decoded], &want[..decoded])
}

/// Runs an attention case over every shape and prints the worst error.
fn over_shapes<E: GpuElement, B: KernelBackend<E>>(
    b: &B,
    kind: &str,
    case: fn(&B, &mut StdRng, AttentionShape) -> f64,
) {
    let mut rng = rng(&format!("{kind} {:?}", E::DTYPE));
    let worst = attention_shapes().into_iter().map(|s| case(b, &mut rng, s)).fold(0.0, f64::max);
    eprintln!("{kind} {:?}: worst relative error {worst:e}", E::DTYPE);
}

/// One test per element type of an attention case over every shape.
macro_rules! attention_tests {
    ($case:ident, $kind:literal: $($test:ident => $e:ty),+) => {$(
        #[test]
        fn $test() {
            with_backend!(b => over_shapes::<$e, _>(b, $kind, $case::<$e, _>));
        }
    )+};
}

attention_tests!(decode_case, "decode":
    decode_attention_matches_the_cpu_f32 => f32,
    decode_attention_matches_the_cpu_f16 => f16,
    decode_attention_matches_the_cpu_bf16 => bf16);

fn prefill_case<E: GpuElement, B: KernelBackend<E>>(b: &B, rng: &mut StdRng, shape: AttentionShape) -> f64 {
    let bs = shape.block_size;
    // (position of the first row, rows): a fresh prompt over two tiles, a chunk that starts
    // mid-block after cached tokens (chunked prefill, a prefix-cache hit), a single row at a
    // block boundary, and a chunk deep into a long context.
    let seqs = [(0usize, 21usize), (37, 18), (2 * bs, 1), (3, 5), (530, 3)];
    let lens: Vec<usize> = seqs.iter().map(|(s, r)| s + r).collect();
    let fx = PagedFixture::new(rng, shape, &lens, rounded::<E>);
    let width = shape.num_heads * shape.head_dim;
    let rows: usize = seqs.iter().map(|s| s.1).sum();
    let q = rounded::<E>(&uniform(rng, rows * width, 1.0));
    let mut spans = Vec::new();
    let mut first = 0;
    for (i, &(start, len)) in seqs.iter().enumerate() {
        spans.push(SeqSpan { first_row: first, len, start_pos: start, block_table: &fx.tables[i] });
        first += len;
    }
    let want = fx.reference(&q, &spans, rows);
    let tiles = prefill_tiles(spans.iter().enumerate().map(|(i, s)| (i, s.first_row, s.len, s.start_pos)));
    let mut out = to_dev(b, &poisoned::<E>(rows * width));
    let meta = PrefillMeta {
        tiles: to_dev(b, &flatten_tiles(&tiles)),
        num_tiles: tiles.len(),
        tables: to_dev(b, &fx.flat_tables()),
        max_blocks: fx.max_blocks,
    };
    let (k_pool, v_pool) = fx.pools_on(b);
    b.paged_attention_prefill(&mut out, &to_dev(b, &to_elems::<E>(&q)), &k_pool, &v_pool, &meta, &shape)
        .expect("paged_attention_prefill");
    let out = from_dev(b, &out);
    check(&format!("prefill {shape:?}"), &out, &want)
}

attention_tests!(prefill_case, "prefill":
    prefill_attention_matches_the_cpu_f32 => f32,
    prefill_attention_matches_the_cpu_f16 => f16,
    prefill_attention_matches_the_cpu_bf16 => bf16);

fn gemm_case<E: GpuElement, B: KernelBackend<E>>(b: &B, rng: &mut StdRng) {
    // One decode row, odd sizes, a prefill-sized batch, and a wide projection.
    for (rows, n, k) in [(1usize, 64usize, 64usize), (7, 300, 96), (33, 1000, 288), (128, 512, 768), (3, 32000, 64)] {
        let x = rounded::<E>(&uniform(rng, rows * k, 1.0));
        let w = rounded::<E>(&uniform(rng, n * k, 1.0));
        let want: Vec<f32> = (0..rows * n)
            .map(|i| {
                let (r, o) = (i / n, i % n);
                x[r * k..(r + 1) * k].iter().zip(&w[o * k..(o + 1) * k]).map(|(a, c)| (a * c) as f64).sum::<f64>()
                    as f32
            })
            .collect();
        let mut out = to_dev(b, &poisoned::<E>(rows * n));
        b.gemm(&mut out, &to_dev(b, &to_elems::<E>(&x)), &to_dev(b, &to_elems::<E>(&w)), rows, n, k).expect("gemm");
        check(&format!("gemm {rows}x{k} · ({n}x{k})ᵀ"), &from_dev(b, &out), &want);
    }
}

#[test]
fn gemm_matches_the_cpu() {
    let mut rng = rng("gemm");
    each_dtype!(gemm_case(&mut rng));
}

fn swap_case<E: GpuElement, B: KernelBackend<E>>(b: &B, rng: &mut StdRng) {
    let (blocks, block_len) = (12usize, 4 * 2 * 64);
    let pool = rounded::<E>(&uniform(rng, blocks * block_len, 1.0));
    let mut device = to_dev(b, &to_elems::<E>(&pool));
    let mut host = b.host_pool(5 * block_len).expect("host pool");
    // Out: device blocks 3, 7 and 11 to host blocks 4, 0 and 2.
    b.swap_out(&device, &mut host, &[(3, 4), (7, 0), (11, 2)], block_len).expect("swap out");
    // The device blocks are reused by others before the sequence comes back.
    let mut overwritten = to_dev(b, &poisoned::<E>(blocks * block_len));
    b.swap_out(&overwritten, &mut b.host_pool(block_len).expect("scratch pool"), &[(0, 0)], block_len)
        .expect("unrelated swap");
    std::mem::swap(&mut device, &mut overwritten);
    // In: to other device blocks.
    b.swap_in(&host, &mut device, &[(4, 5), (0, 9), (2, 0)], block_len).expect("swap in");
    let got = to_f32(&from_dev(b, &device));
    for (dst, src) in [(5usize, 3usize), (9, 7), (0, 11)] {
        assert_eq!(
            got[dst * block_len..(dst + 1) * block_len],
            pool[src * block_len..(src + 1) * block_len],
            "block {src} swapped out and back into block {dst} ({:?})",
            E::DTYPE
        );
    }
    assert!(got[block_len..2 * block_len].iter().all(|x| x.is_nan()), "a block not swapped in was written");
}

#[test]
fn swapping_out_and_back_in_restores_blocks() {
    let mut rng = rng("swap");
    each_dtype!(swap_case(&mut rng));
}

fn add_bias_case<E: GpuElement, B: KernelBackend<E>>(b: &B, rng: &mut StdRng) {
    for (rows, n) in [(1usize, 64usize), (7, 96), (33, 1000)] {
        let x = rounded::<E>(&uniform(rng, rows * n, 2.0));
        let bias = rounded::<E>(&uniform(rng, n, 1.0));
        let want: Vec<f32> = x.iter().enumerate().map(|(i, v)| v + bias[i % n]).collect();
        let mut got = to_dev(b, &to_elems::<E>(&x));
        b.add_bias(&mut got, &to_dev(b, &to_elems::<E>(&bias))).expect("add_bias");
        check(&format!("add_bias {rows}x{n}"), &from_dev(b, &got), &want);
    }
}

#[test]
fn bias_add_matches_the_cpu() {
    let mut rng = rng("add_bias");
    each_dtype!(add_bias_case(&mut rng));
}
