"""Throughput of the same work through the mesh (HTTP → gateway → NATS → services) and through
`pagemesh generate` (in process), measured in one run.

    python3 benchmarks/mesh_vs_generate.py --model /tmp/llama-110m-bf16 [--requests 32] [--max-tokens 64] [--repeat 8]

Needs the `openai` package and nats-server on PATH; starts `pagemesh serve` itself (binary from
$PAGEMESH_BIN, else target/release/pagemesh). Work: N requests of 64-token prompts (distinct
token ids), greedy, `ignore_eos`, all submitted at once (N concurrent HTTP requests). With
`--repeat`, the two sides alternate which runs first, and the median cost is printed last. Each
run also reports the steps each side ran and the mesh executor's busy seconds (its step-duration
histogram), which tell the mesh's own overhead from a slower forward pass.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
BIN = os.environ.get("PAGEMESH_BIN", str(ROOT / "target" / "release" / "pagemesh"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n, length, vocab=32000):
    return [[3 + (i * 7919 + r * 104729 + r * r) % (vocab - 3) for i in range(length)] for r in range(n)]


def run_generate(model, work, max_tokens, threads):
    with tempfile.TemporaryDirectory() as d:
        inp, out = Path(d) / "in.jsonl", Path(d) / "out.jsonl"
        inp.write_text("".join(json.dumps({"prompt_token_ids": p, "max_tokens": max_tokens, "temperature": 0,
                                           "ignore_eos": True}) + "\n" for p in work))
        done = subprocess.run([BIN, "generate", "--model", model, "--input", str(inp), "--output", str(out),
                               "--threads", str(threads)], check=True, stderr=subprocess.PIPE, text=True)
        stats = json.loads([l for l in done.stderr.splitlines() if l.startswith("{")][-1])
        elapsed = stats["elapsed_s"]  # from the first submission to the last token, model load excluded
        tokens = sum(len(json.loads(l)["outputs"][0]["token_ids"]) for l in out.read_text().splitlines())
    return tokens, elapsed, {"steps": stats["steps"]}


def scrape(base):
    """The serve process's step counters: steps run and the executor's busy seconds."""
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        metric = name.split("{", 1)[0]
        if metric in ("pagemesh_steps_total", "pagemesh_executor_step_seconds_sum",
                      "pagemesh_executor_step_seconds_count", "pagemesh_step_duration_seconds_sum"):
            values[metric] = values.get(metric, 0.0) + float(value)
    return values


async def run_mesh_requests(base, work, max_tokens):
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", timeout=600)

    async def one(p):
        r = await client.completions.create(model=Path(ARGS.model).name, prompt=p, max_tokens=max_tokens,
                                            temperature=0, extra_body={"ignore_eos": True})
        return r.usage.completion_tokens

    async with client:
        started = time.time()
        counts = await asyncio.gather(*(one(p) for p in work))
        return sum(counts), time.time() - started


def run_mesh(model, work, max_tokens, threads):
    nats_port, http_port = free_port(), free_port()
    nats = subprocess.Popen(["nats-server", "-a", "127.0.0.1", "-p", str(nats_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", nats_port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    serve = subprocess.Popen([BIN, "serve", "--model", model, "--host", "127.0.0.1", "--port", str(http_port),
                              "--nats-url", f"nats://127.0.0.1:{nats_port}", "--no-start-nats",
                              "--threads", str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        asyncio.run(run_mesh_requests(base, work[:2], 4))  # warm up
        before = scrape(base)
        tokens, elapsed = asyncio.run(run_mesh_requests(base, work, max_tokens))
        after = scrape(base)
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        return tokens, elapsed, {"steps": round(delta.get("pagemesh_steps_total", 0)),
                                 "executor_busy_s": delta.get("pagemesh_executor_step_seconds_sum", 0.0),
                                 "scheduler_step_s": delta.get("pagemesh_step_duration_seconds_sum", 0.0)}
    finally:
        serve.terminate()
        serve.wait()
        nats.terminate()
        nats.wait()


def main():
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="alternate generate and mesh this many times")
    ARGS = parser.parse_args()
    work = prompts(ARGS.requests, ARGS.prompt_len)
    costs = []
    for run in range(ARGS.repeat):
        # Which goes first alternates, so that a machine getting faster or slower over the runs
        # does not favour one side.
        if run % 2 == 0:
            g_tokens, g_s, g_stats = run_generate(ARGS.model, work, ARGS.max_tokens, ARGS.threads)
            m_tokens, m_s, m_stats = run_mesh(ARGS.model, work, ARGS.max_tokens, ARGS.threads)
        else:
            m_tokens, m_s, m_stats = run_mesh(ARGS.model, work, ARGS.max_tokens, ARGS.threads)
            g_tokens, g_s, g_stats = run_generate(ARGS.model, work, ARGS.max_tokens, ARGS.threads)
        cost = 1 - (m_tokens / m_s) / (g_tokens / g_s)
        costs.append(cost)
        print(json.dumps({"requests": ARGS.requests, "generate_tokens": g_tokens, "generate_s": g_s,
                          "generate_tok_per_s": g_tokens / g_s, "generate_steps": g_stats["steps"],
                          "mesh_tokens": m_tokens, "mesh_s": m_s, "mesh_tok_per_s": m_tokens / m_s,
                          "mesh_steps": m_stats["steps"], "mesh_executor_busy_s": m_stats["executor_busy_s"],
                          "mesh_cost": cost}), flush=True)
    if ARGS.repeat > 1:
        print(json.dumps({"runs": len(costs), "median_mesh_cost": statistics.median(costs)}))


if __name__ == "__main__":
    sys.exit(main())
