#!/usr/bin/env python3
"""Runs `pagemesh bench sim` over the configurations of docs/BENCHMARKS.md and prints the
tables as Markdown.

    cargo build --release
    python3 benchmarks/sim_tables.py [--bin target/release/pagemesh] [--num-requests 10000]
"""

import argparse
import json
import subprocess


def sim(binary, **flags):
    args = [binary, "bench", "sim", "--json"]
    for key, value in flags.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def allocators(binary, n, model, gpu, rate="inf"):
    print(f"\n{model} on {gpu}, ShareGPT-like, {n} requests, rate {rate}, seed 1\n")
    print("| allocator | KV utilization | peak running | mean running | output tok/s | req/s "
          "| preemptions | TTFT p50 / p99 (s) | TPOT p50 (s) | wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for allocator in ("paged", "contiguous", "contiguous-max-len"):
        r = sim(binary, model=model, gpu=gpu, workload="sharegpt", num_requests=n, request_rate=rate,
                allocator=allocator, seed=1)
        rows[allocator] = r
        print(f"| {allocator} | {r['kv_utilization']:.1%} | {r['peak_running']} | {r['mean_running']:.1f} "
              f"| {r['output_tokens_per_s']:.0f} | {r['request_throughput']:.2f} | {r['preemptions']} "
              f"| {r['ttft_p50_s']:.1f} / {r['ttft_p99_s']:.1f} | {r['tpot_p50_s']:.4f} | {r['wall_s']:.1f} |")
    paged = rows["paged"]
    for base in ("contiguous", "contiguous-max-len"):
        b = rows[base]
        print(f"\npaged / {base}: peak running {paged['peak_running'] / b['peak_running']:.2f}×, "
              f"mean running {paged['mean_running'] / b['mean_running']:.2f}×, "
              f"throughput {paged['output_tokens_per_s'] / b['output_tokens_per_s']:.2f}×")
    return rows


def rate_sweep(binary, n, model, gpu, rates):
    print(f"\n{model} on {gpu}, ShareGPT-like, {n} requests: mean normalized latency "
          "(end-to-end latency / output tokens, s/token) by request rate\n")
    print("| req/s | " + " | ".join(("paged", "contiguous", "contiguous-max-len")) + " |")
    print("|---|---|---|---|")
    for rate in rates:
        cells = []
        for allocator in ("paged", "contiguous", "contiguous-max-len"):
            r = sim(binary, model=model, gpu=gpu, workload="sharegpt", num_requests=n, request_rate=rate,
                    allocator=allocator, seed=1)
            cells.append(f"{r['e2e_mean_s'] / r['mean_output_len']:.3f}")
        print(f"| {rate} | " + " | ".join(cells) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default="target/release/pagemesh")
    p.add_argument("--num-requests", type=int, default=10000)
    a = p.parse_args()
    allocators(a.bin, a.num_requests, "llama-2-13b", "a100-80gb")
    rate_sweep(a.bin, 2000, "llama-2-13b", "a100-80gb", [1, 2, 3, 4, 5, 6, 8])
    others = (("llama-2-13b", "a100-40gb"), ("llama-2-7b", "rtx4090-24gb"), ("llama-3-8b", "rtx4090-24gb"),
              ("llama-3-8b", "h100-80gb"))
    for model, gpu in others:
        allocators(a.bin, a.num_requests, model, gpu)
    print("\nchatglm3-6b on 24 GB cards, ShareGPT-like, all at once\n")
    print("| GPU | max-num-seqs | KV pool (tokens) | peak running | mean running | output tok/s | TPOT p50 (s) |")
    print("|---|---|---|---|---|---|---|")
    for gpu in ("rtx4090-24gb", "a10-24gb"):
        for seqs in (256, 1024):
            r = sim(a.bin, model="chatglm3-6b", gpu=gpu, workload="sharegpt", num_requests=a.num_requests,
                    seed=1, max_num_seqs=seqs)
            print(f"| {gpu} | {seqs} | {r['kv_capacity_tokens']} | {r['peak_running']} | {r['mean_running']:.1f} "
                  f"| {r['output_tokens_per_s']:.0f} | {r['tpot_p50_s']:.4f} |")
    r = sim(a.bin, model="llama-3-8b", gpu="h100-80gb", workload="sharegpt", num_requests=a.num_requests, seed=1)
    print(f"\nScheduler time (llama-3-8b on h100-80gb, {a.num_requests} requests): "
          f"{r['scheduler_us_per_step']:.1f} µs/step over {r['steps']} steps; "
          f"{r['scheduler_us_per_step_at_256_running']:.1f} µs/step over the {r['steps_at_256_running']} steps "
          f"with 256 running; whole run {r['wall_s']:.1f} s wall")


if __name__ == "__main__":
    main()
