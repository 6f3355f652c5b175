"""Quantized GGUF files of the synthetic TinyLlama-1.1B layout against an independent
reference: greedy tokens and log-probabilities of `pagemesh generate` versus a numpy forward
pass over PyPI gguf's dequantized weights (tests/python/gguf_reference.py), and llama.cpp's own
greedy tokens for comparison.

The files: `pagemesh synth-model --preset tinyllama-1.1b --dtype f32` (random weights) written as
an F32 GGUF by PyPI gguf (query/key rows permuted as llama.cpp's converter does, Llama 2's
SentencePiece vocabulary), then a Q8_0 file quantized by PyPI gguf and a Q4_K_M file (Q4_K and
Q6_K tensors) quantized by llama.cpp (`llama_model_quantize` of llama-cpp-python).

    python benchmarks/synthetic_gguf_check.py --work /tmp/tinyllama-gguf   # in a venv with
        # llama-cpp-python, gguf, numpy, safetensors; needs target/release/pagemesh
"""

import argparse
import ctypes
import json
import os
import pathlib
import subprocess
import sys

import gguf
import llama_cpp as L
import numpy as np
from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))
from gguf_reference import reference_greedy  # noqa: E402

PAGEMESH = pathlib.Path(os.environ.get("PAGEMESH_BIN", ROOT / "target" / "release" / "pagemesh"))
VOCAB = ROOT / "tests" / "fixtures" / "gguf_tokenizers" / "llama2-vocab.gguf"
TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "llama2-32k" / "tokenizer.json"
NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
PROMPTS = [[1, 450, 7483, 310, 3444, 338], [1, 9038, 2501, 263, 931, 29892], [1, 822, 2471], [1, 306, 763, 29871]]
STEPS = 24


def gguf_name(hf):
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, layer, rest = hf.split(".", 3)
    part, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{NAMES[part]}.{suffix}"


def permute(w, heads):
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir, out, quant=None):
    config = json.loads((model_dir / "config.json").read_text())
    tensors = load_file(str(model_dir / "model.safetensors"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config.get("rope_theta", 10000.0))
    w.add_rope_dimension_count(config["hidden_size"] // heads)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant else gguf.LlamaFileType.ALL_F32)
    vocab = gguf.GGUFReader(str(VOCAB))
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab.fields["tokenizer.ggml.tokens"].contents())
    w.add_token_scores(vocab.fields["tokenizer.ggml.scores"].contents())
    w.add_token_types(vocab.fields["tokenizer.ggml.token_type"].contents())
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, t in tensors.items():
        t = t.astype(np.float32)
        if name.endswith("q_proj.weight"):
            t = permute(t, heads)
        elif name.endswith("k_proj.weight"):
            t = permute(t, kv_heads)
        if quant and t.ndim == 2:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(t, quant), raw_dtype=quant)
        else:
            w.add_tensor(gguf_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_quantize(src, dst, ftype):
    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    if L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError("llama_model_quantize failed")


def pagemesh_greedy(path, work):
    requests = work / "requests.jsonl"
    requests.write_text("".join(json.dumps({"prompt_token_ids": p, "max_tokens": STEPS, "temperature": 0,
                                            "ignore_eos": True, "logprobs": 0}) + "\n" for p in PROMPTS))
    out = work / "out.jsonl"
    subprocess.run([str(PAGEMESH), "generate", "--model", str(path), "--input", str(requests), "--output", str(out),
                    "--max-model-len", "256"], check=True, capture_output=True)
    results = [json.loads(line)["outputs"][0] for line in out.read_text().splitlines()]
    return [(r["token_ids"], [t["logprob"] for t in r["logprobs"]]) for r in results]


def llama_cpp_greedy(path):
    llm = L.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    answers = []
    for prompt in PROMPTS:
        llm.reset()
        llm.eval(prompt)
        tokens = []
        for _ in range(STEPS):
            t = llm.sample(temp=0.0)
            tokens.append(int(t))
            llm.eval([t])
        answers.append(tokens)
    return answers


def compare(name, path, work):
    want, _, margins = reference_greedy(path, PROMPTS, STEPS, dtype=np.float32)
    got = pagemesh_greedy(path, work)
    cpp = llama_cpp_greedy(path)
    print(f"\n{name}: {path.stat().st_size / 1e9:.2f} GB")
    worst_abs = worst_rel = 0.0
    for number, ((w_tokens, w_lp), (g_tokens, g_lp), c_tokens, m) in enumerate(zip(want, got, cpp, margins)):
        compared = next((i for i, x in enumerate(m) if x < 1e-3), STEPS)
        agree = next((i for i, (a, b) in enumerate(zip(w_tokens, g_tokens)) if a != b), STEPS)
        cpp_agree = next((i for i, (a, b) in enumerate(zip(w_tokens, c_tokens)) if a != b), STEPS)
        n = min(agree, STEPS)
        diffs = [abs(a - b) for a, b in zip(w_lp[:n], g_lp[:n])]
        rels = [abs(a - b) / max(abs(a), 1e-6) for a, b in zip(w_lp[:n], g_lp[:n])]
        worst_abs, worst_rel = max([worst_abs, *diffs]), max([worst_rel, *rels])
        print(f"  prompt {number + 1}: pagemesh = reference for {agree}/{STEPS} tokens (must: {compared}, "
              f"the first top-2 margin < 1e-3), llama.cpp = reference for {cpp_agree}; smallest margin {min(m):.4f}")
        assert agree >= compared, (name, agree, compared)
    print(f"  chosen-token logprobs, pagemesh vs reference: max abs error {worst_abs:.2e}, max rel error {worst_rel:.2e}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    args = parser.parse_args()
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    hf = work / "tinyllama-f32"
    if not (hf / "model.safetensors").exists():
        subprocess.run([str(PAGEMESH), "synth-model", "--preset", "tinyllama-1.1b", "--dtype", "f32", "--output",
                        str(hf), "--tokenizer", str(TOKENIZER)], check=True)
    f32, q8, q4km = work / "tinyllama-f32.gguf", work / "tinyllama-q8_0.gguf", work / "tinyllama-q4_k_m.gguf"
    if not f32.exists():
        write_gguf(hf, f32)
    if not q8.exists():
        write_gguf(hf, q8, gguf.GGMLQuantizationType.Q8_0)
    if not q4km.exists():
        llama_cpp_quantize(f32, q4km, L.LLAMA_FTYPE_MOSTLY_Q4_K_M)
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(str(q4km)).tensors}
    print("Q4_K_M tensor types:", sorted(kinds))
    compare("Q8_0", q8, work)
    compare("Q4_K_M", q4km, work)


if __name__ == "__main__":
    main()
