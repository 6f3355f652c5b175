"""An independent greedy reference for GGUF Llama models: a numpy forward pass over the weights
PyPI `gguf` dequantizes, with llama.cpp's conventions. Shared by the tests and by the script that
makes the SmolLM2 chat fixture (tests/fixtures/smollm2_chats)."""

import gguf
import numpy as np


def reference_greedy(path, prompts, steps, dtype=np.float64):
    """For each prompt, greedy tokens and their logprobs from a numpy forward pass over weights
    dequantized by PyPI gguf, with llama.cpp's conventions (query/key rows as the GGUF stores
    them, RoPE on interleaved pairs): independent of pagemesh's loader, its row order and its
    kernels. Also the smallest top-2 logit margin met, and per prompt the margin at each step.

    The pass computes in `dtype`: float64 by default (the dequantized f32 weights exactly, a
    reference more precise than any f32 kernel), float32 for models too large for that."""
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    w = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(dtype, copy=False)
         .reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    layers, heads, kv_heads = meta["llama.block_count"], meta["llama.attention.head_count"], \
        meta["llama.attention.head_count_kv"]
    eps, base = meta["llama.attention.layer_norm_rms_epsilon"], meta["llama.rope.freq_base"]
    hidden = meta["llama.embedding_length"]
    hd = hidden // heads

    def norm(x, weight):
        return x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps).astype(dtype) * weight

    def rope(x, n_heads, start):  # x: [seq, n_heads * hd] at positions start..; pairs (2i, 2i+1)
        seq = x.shape[0]
        x = x.reshape(seq, n_heads, hd // 2, 2)
        theta = (start + np.arange(seq))[:, None] * base ** (-np.arange(0, hd, 2) / hd)
        cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        out = np.stack([x[..., 0] * cos - x[..., 1] * sin, x[..., 0] * sin + x[..., 1] * cos], -1)
        return out.reshape(seq, n_heads * hd).astype(dtype)

    def logits(ids, cache):
        """Logits after `ids`, which follow the positions held in `cache` (per layer K and V)."""
        x = w["token_embd.weight"][ids]
        seq, start = len(ids), len(cache[0][0]) if cache else 0
        mask = np.triu(np.full((seq, start + seq), -np.inf, dtype=dtype), start + 1)
        for i in range(layers):
            b = f"blk.{i}."
            h = norm(x, w[b + "attn_norm.weight"])
            q = rope(h @ w[b + "attn_q.weight"].T, heads, start).reshape(seq, heads, hd)
            k = rope(h @ w[b + "attn_k.weight"].T, kv_heads, start).reshape(seq, kv_heads, hd)
            v = (h @ w[b + "attn_v.weight"].T).reshape(seq, kv_heads, hd)
            if len(cache) <= i:
                cache.append((k, v))
            else:
                cache[i] = (np.concatenate([cache[i][0], k]), np.concatenate([cache[i][1], v]))
            k, v = (np.repeat(t, heads // kv_heads, 1) for t in cache[i])
            scores = np.einsum("qhd,khd->hqk", q, k) / dtype(np.sqrt(hd)) + mask
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            x = x + np.einsum("hqk,khd->qhd", p, v).reshape(seq, hidden) @ w[b + "attn_output.weight"].T
            h = norm(x, w[b + "ffn_norm.weight"])
            g, u = h @ w[b + "ffn_gate.weight"].T, h @ w[b + "ffn_up.weight"].T
            x = x + (g / (1 + np.exp(-g)) * u) @ w[b + "ffn_down.weight"].T
        out = w.get("output.weight", w["token_embd.weight"])
        return (norm(x[-1:], w["output_norm.weight"]) @ out.T)[0].astype(np.float64)

    answers, margins = [], []
    for prompt in prompts:
        ids, tokens, logprobs, step_margins, cache = list(prompt), [], [], [], []
        for _ in range(steps):
            z = logits(ids, cache)
            top2 = np.sort(z)[-2:]
            step_margins.append(float(top2[1] - top2[0]))
            t = int(np.argmax(z))
            logprobs.append(float(z[t] - z.max() - np.log(np.exp(z - z.max()).sum())))
            tokens.append(t)
            ids = [t]
        answers.append((tokens, logprobs))
        margins.append(step_margins)
    return answers, min(min(m) for m in margins), margins
