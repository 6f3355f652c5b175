//! Model loading: a sharded copy of stories260K gives the same logits as the single file, and
//! every broken model is a clear error naming what is wrong (never a panic).

use std::path::{Path, PathBuf};

use pagemesh_executor::{CacheConfig, CpuExecutor, ExecutorError};
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;

mod support;
use support::*;

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pagemesh-loading-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch");
    std::fs::copy(model_dir().join("config.json"), dir.join("config.json")).expect("config");
    dir
}

fn load(dir: &Path) -> Result<CpuExecutor, ExecutorError> {
    CpuExecutor::load(dir, None, CacheConfig { block_size: 16, num_device_blocks: 4, num_host_blocks: 0 })
}

/// Rewrites the model's tensors through `edit` (name, shape, bytes) into `dir/file`.
fn rewrite(dir: &Path, file: &str, edit: impl Fn(&str, &TensorView<'_>) -> Option<(String, TensorView<'static>)>) {
    let bytes = std::fs::read(model_dir().join("model.safetensors")).expect("weights");
    let tensors = SafeTensors::deserialize(&bytes).expect("safetensors");
    let views: Vec<(String, TensorView<'static>)> =
        tensors.tensors().into_iter().filter_map(|(name, view)| edit(&name, &view)).collect();
    safetensors::serialize_to_file(views, None, &dir.join(file)).expect("write");
}

fn owned(view: &TensorView<'_>, shape: Vec<usize>) -> TensorView<'static> {
    let data: &'static [u8] = Box::leak(view.data().to_vec().into_boxed_slice());
    TensorView::new(view.dtype(), shape, data).expect("view")
}

#[test]
fn sharded_weights_give_the_same_logits() {
    let dir = scratch("sharded");
    let mut map = serde_json::Map::new();
    for (shard, keep_layers) in
        [("model-00001-of-00002.safetensors", true), ("model-00002-of-00002.safetensors", false)]
    {
        rewrite(&dir, shard, |name, view| {
            let in_layers = name.starts_with("model.layers.");
            (in_layers == keep_layers).then(|| (name.to_string(), owned(view, view.shape().to_vec())))
        });
        let bytes = std::fs::read(dir.join(shard)).expect("shard");
        for name in SafeTensors::deserialize(&bytes).expect("shard parses").names() {
            map.insert(name.to_string(), serde_json::Value::String(shard.to_string()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("index");
    let sharded = load(&dir).expect("sharded model loads");
    let single = load(&model_dir()).expect("model loads");
    let prompt = [1, 403, 407, 261, 378];
    assert_eq!(sharded.logits_for_prompt(&prompt).expect("logits"), single.logits_for_prompt(&prompt).expect("logits"));
    let _ = std::fs::remove_dir_all(&dir);
}

fn expect_error(dir: &Path, needle: &str) {
    match load(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => assert!(e.to_string().contains(needle), "{e} should mention {needle}"),
    }
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = scratch("missing");
    rewrite(&dir, "model.safetensors", |name, view| {
        (name != "model.layers.3.mlp.up_proj.weight").then(|| (name.to_string(), owned(view, view.shape().to_vec())))
    });
    expect_error(&dir, "model.layers.3.mlp.up_proj.weight");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_wrong_shape_is_named() {
    let dir = scratch("shape");
    rewrite(&dir, "model.safetensors", |name, view| {
        let shape = if name == "model.layers.0.self_attn.k_proj.weight" { vec![64, 32] } else { view.shape().to_vec() };
        Some((name.to_string(), owned(view, shape)))
    });
    expect_error(&dir, "model.layers.0.self_attn.k_proj.weight has shape [64, 32], expected [32, 64]");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unsupported_dtype_is_named() {
    let dir = scratch("dtype");
    rewrite(&dir, "model.safetensors", |name, view| {
        let tensor = if name == "model.norm.weight" {
            let data: &'static [u8] = Box::leak(view.data().to_vec().into_boxed_slice());
            TensorView::new(safetensors::Dtype::I32, view.shape().to_vec(), data).expect("view")
        } else {
            owned(view, view.shape().to_vec())
        };
        Some((name.to_string(), tensor))
    });
    expect_error(&dir, "model.norm.weight has unsupported dtype I32");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unknown_architecture_and_missing_files_are_clear_errors() {
    let dir = scratch("arch");
    let config = std::fs::read_to_string(dir.join("config.json")).expect("config");
    std::fs::write(dir.join("config.json"), config.replace("LlamaForCausalLM", "FalconForCausalLM")).expect("write");
    expect_error(&dir, "unsupported architecture FalconForCausalLM");
    std::fs::write(dir.join("config.json"), config).expect("write");
    expect_error(&dir, "no model.safetensors");
    std::fs::write(dir.join("model.safetensors"), b"garbage").expect("write");
    expect_error(&dir, "model.safetensors");
    std::fs::remove_file(dir.join("config.json")).expect("remove");
    expect_error(&dir, "config.json");
    let _ = std::fs::remove_dir_all(&dir);
}
