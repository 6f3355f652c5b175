//! `--quantization q8_0|q4_0`: f32 rows become exactly the blocks PyPI gguf's quantizers make
//! (tests/fixtures/quantize/blocks.json), and stories260K quantized at load keeps its logits
//! close to the f32 model's.
//!
//! Measured here (relative error of all logits as one vector, ‖quantized − f32‖₂ / ‖f32‖₂, over
//! the reference prompts and 120 tokens of their continuations): q8_0 0.0050, q4_0 0.085. The
//! bounds below are 2 to 3 times that; a kernel reading blocks wrongly gives errors of order 1.

use std::path::Path;

use pagemesh_executor::cpu::model::LlamaModel;
use pagemesh_executor::quant::quantize::quantize;
use pagemesh_executor::quant::QuantKind;
use pagemesh_executor::{CacheConfig, CpuExecutor};
use serde_json::Value;

mod support;
use support::*;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn rows_quantize_to_the_blocks_gguf_makes() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/quantize/blocks.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("JSON");
    let rows = fixture["rows"].as_array().expect("rows");
    for (name, kind) in [("q8_0", QuantKind::Q8_0), ("q4_0", QuantKind::Q4_0)] {
        for (i, row) in rows.iter().enumerate() {
            let values: Vec<f32> = row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            let blocks = quantize(kind, &values).expect("quantizes");
            assert_eq!(hex(&blocks), fixture[name][i].as_str().unwrap(), "{name} row {i}");
        }
    }
}

fn executor(quantization: Option<QuantKind>) -> CpuExecutor {
    let cache = CacheConfig { block_size: 16, num_device_blocks: 1, num_host_blocks: 0 };
    let model = LlamaModel::load_quantized(&model_dir(), None, quantization).expect("loads");
    CpuExecutor::new(model, cache)
}

/// ‖b − a‖₂ / ‖a‖₂ over every position's logits.
fn relative_error(a: &CpuExecutor, b: &CpuExecutor) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for seq in reference_sequences(120) {
        for (ra, rb) in
            a.logits_for_prompt(&seq).expect("logits").iter().zip(&b.logits_for_prompt(&seq).expect("logits"))
        {
            for (x, y) in ra.iter().zip(rb) {
                diff += ((x - y) as f64).powi(2);
                norm += (*x as f64).powi(2);
            }
        }
    }
    (diff / norm).sqrt()
}

#[test]
fn stories260k_quantized_at_load_stays_close_to_f32() {
    let reference = executor(None);
    for (kind, bound) in [(QuantKind::Q8_0, 0.015), (QuantKind::Q4_0, 0.2)] {
        let quantized = executor(Some(kind));
        // Rows of 64 weights are whole blocks; down_proj's rows (172) are not and stay f32.
        for (name, format) in quantized.model().dense_formats() {
            let expected = if name.ends_with("down_proj") { QuantKind::F32 } else { kind };
            assert_eq!(format, expected, "{name}");
        }
        let error = relative_error(&reference, &quantized);
        println!("{kind:?}: relative error of all logits {error:.4}");
        assert!(error < bound, "{kind:?}: {error}");
        assert!(error > 1e-4, "{kind:?}: the weights did change ({error})");
    }
    let refused = LlamaModel::load_quantized(&model_dir(), None, Some(QuantKind::Q4K)).err().expect("refused");
    assert!(refused.to_string().contains("cannot quantize to Q4_K"), "{refused}");
}
