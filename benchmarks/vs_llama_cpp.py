"""pagemesh and llama.cpp side by side on the same GGUF file and thread count, runs alternated:
batch-1 decode, prefill of 128-token prompts, and aggregate decode of 8 and 32 sequences.
Prints every run, then the best of each side and the ratio pagemesh / llama.cpp.

pagemesh: `pagemesh bench engine` (release build): greedy sampling included, every step through
the scheduler and the paged KV cache. llama.cpp: its C API through PyPI llama-cpp-python (which
builds llama.cpp from source), one context with a sequence per request, tokens fed in batches
as llama.cpp's batched-bench does (no sampling, which favours llama.cpp slightly).

    cargo build --release -p pagemesh
    python benchmarks/vs_llama_cpp.py --model FILE.gguf [--threads 2] [--rounds 2]

(in a venv with llama-cpp-python; machine-wide figures drift between runs, so compare only the
ratios of one run.)
"""

import argparse
import ctypes
import json
import pathlib
import subprocess
import time

import llama_cpp as L

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPT, DECODE = 128, 64


class LlamaCpp:
    def __init__(self, path, threads, max_seqs):
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
        params = L.llama_context_default_params()
        params.n_ctx = max_seqs * (PROMPT + DECODE) + 256
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = max_seqs
        params.n_threads = params.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, params)
        self.batch = L.llama_batch_init(4096, 0, max_seqs)
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))

    def decode(self, entries):
        """entries: (token, position, sequence, wants logits), fed 512 at a time."""
        for start in range(0, len(entries), 512):
            part = entries[start:start + 512]
            self.batch.n_tokens = len(part)
            for i, (tok, pos, seq, logits) in enumerate(part):
                self.batch.token[i], self.batch.pos[i] = tok, pos
                self.batch.n_seq_id[i] = 1
                self.batch.seq_id[i][0] = seq
                self.batch.logits[i] = logits
            if L.llama_decode(self.ctx, self.batch) != 0:
                raise RuntimeError("llama_decode failed")

    def prompt(self, salt):
        return [3 + (i * 7919 + salt * 104729) % (self.vocab - 3) for i in range(PROMPT)]

    def run(self, seqs, steps):
        """Prefills `seqs` prompts, then decodes `steps` tokens for each; returns (prefill tok/s,
        decode tok/s)."""
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        entries = [(t, p, s, p == PROMPT - 1) for s in range(seqs) for p, t in enumerate(self.prompt(s))]
        started = time.perf_counter()
        self.decode(entries)
        prefill = len(entries) / (time.perf_counter() - started)
        started = time.perf_counter()
        for step in range(steps):
            self.decode([(13 + step, PROMPT + step, s, True) for s in range(seqs)])
        return prefill, seqs * steps / (time.perf_counter() - started)


def pagemesh(path, threads, batch_sizes, prefill_requests):
    out = subprocess.run([str(ROOT / "target" / "release" / "pagemesh"), "bench", "engine", "--model", str(path),
                          "--threads", str(threads), "--prompt-len", str(PROMPT), "--decode-tokens", str(DECODE),
                          "--batch-sizes", ",".join(map(str, batch_sizes)),
                          "--prefill-requests", str(prefill_requests), "--max-model-len", "1024"],
                         capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return report["prefill_tokens_per_s"], {d["batch"]: d["tokens_per_s"] for d in report["decode"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-sizes", default="1,8,32")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    cpp = LlamaCpp(args.model, args.threads, max(batch_sizes))
    best = {"pagemesh": {}, "llama.cpp": {}}

    def keep(side, key, value):
        best[side][key] = max(best[side].get(key, 0.0), value)

    for round_ in range(args.rounds):
        prefill, decode = pagemesh(args.model, args.threads, batch_sizes, 4)
        keep("pagemesh", "prefill", prefill)
        for b, v in decode.items():
            keep("pagemesh", f"decode {b}", v)
        print(f"round {round_ + 1} pagemesh:  prefill {prefill:8.1f}  " +
              "  ".join(f"decode@{b} {v:7.1f}" for b, v in decode.items()), flush=True)
        line = []
        prefill, _ = cpp.run(4, 1)
        keep("llama.cpp", "prefill", prefill)
        line.append(f"prefill {prefill:8.1f}")
        for b in batch_sizes:
            _, v = cpp.run(b, DECODE)
            keep("llama.cpp", f"decode {b}", v)
            line.append(f"decode@{b} {v:7.1f}")
        print(f"round {round_ + 1} llama.cpp: " + "  ".join(line), flush=True)
    print(f"\n{pathlib.Path(args.model).name}, {args.threads} threads, best of {args.rounds} (tokens/s):")
    print(f"{'':14} {'pagemesh':>10} {'llama.cpp':>10} {'ratio':>7}")
    for key in ["decode 1", "prefill"] + [f"decode {b}" for b in batch_sizes if b != 1]:
        p, c = best["pagemesh"].get(key), best["llama.cpp"].get(key)
        if p and c:
            print(f"{key:14} {p:10.1f} {c:10.1f} {p / c:6.2f}x")


if __name__ == "__main__":
    main()
