"""What one step costs the mesh: bytes on the wire per step and the scheduler service's CPU time
per step, with 256 sequences running on a `sim` executor that takes no time
(`--sim-time-scale 0`), so that the mesh's own work is all there is.

    python3 benchmarks/step_cost.py [--model models/stories260K] [--seqs 256]
                                    [--logit-bias 0] [--seconds 8] [--context 4096]

Needs nats-server on PATH and `nats-py`; starts nats-server (with its monitoring port) and the
scheduler, tokenizer, detokenizer and executor as separate processes (binary from
$PAGEMESH_BIN, else target/release/pagemesh). Bytes come from nats-server's /connz (what the
server received from the scheduler's connection and sent to the executor's); CPU time from
/proc/<scheduler pid>/stat; steps from the scheduler's stats. Each request: a 32-token prompt,
`max_tokens` up to the context, `ignore_eos`, greedy, with `--logit-bias` entries. The `sim`
executor needs only the model's configuration: the script serves a copy of it with a
`--context`-token context (default 4096), so that requests outlast the window.
"""

import argparse
import asyncio
import json
import os
import socket
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nats as nats_py

ROOT = Path(__file__).resolve().parents[1]
BIN = os.environ.get("PAGEMESH_BIN", str(ROOT / "target" / "release" / "pagemesh"))
PREFIX = "stepcost"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connections(monitor):
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/connz?limit=1024", timeout=5) as r:
        return {c.get("name", ""): c for c in json.loads(r.read())["connections"]}


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def stats(nc):
    return json.loads((await nc.request(f"{PREFIX}.stats", b"{}", timeout=10)).data)


async def snapshot(nc, monitor, scheduler_pid):
    s = await stats(nc)
    conns = connections(monitor)
    return {
        "steps": sum(e["stats"]["steps"] for e in s["executors"]),
        "running": sum(e["running"] for e in s["executors"]),
        "scheduler_sent": conns["pagemesh-scheduler"]["in_bytes"],
        "executor_received": conns["pagemesh-executor"]["out_bytes"],
        "executor_sent": conns["pagemesh-executor"]["in_bytes"],
        "cpu": cpu_seconds(scheduler_pid),
        "at": time.monotonic(),
    }


async def measure(url, monitor, scheduler_pid, args):
    nc = await nats_py.connect(url)
    try:
        bias = {str(10 + i): -1.0 for i in range(args.logit_bias)}
        body = {"max_tokens": args.context - 64, "ignore_eos": True, "temperature": 0, "stream": True}
        if bias:
            body["logit_bias"] = bias
        subs = []
        for r in range(args.seqs):
            inbox = nc.new_inbox()
            subs.append(await nc.subscribe(inbox))
            prompt = [3 + (i * 31 + r * 17) % 500 for i in range(32)]
            await nc.publish(f"{PREFIX}.generate", json.dumps({**body, "prompt": prompt}).encode(), reply=inbox)
        deadline = time.monotonic() + 120
        while (await stats(nc))["executors"][0]["running"] < args.seqs:
            if time.monotonic() > deadline:
                sys.exit("the requests never all ran at once (is the KV pool large enough?)")
            await asyncio.sleep(0.05)
        first = await snapshot(nc, monitor, scheduler_pid)
        await asyncio.sleep(args.seconds)
        last = await snapshot(nc, monitor, scheduler_pid)
        if last["running"] < args.seqs:
            sys.exit(f"requests finished during the window ({last['running']} running): lower --seconds")
        return first, last
    finally:
        await nc.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "stories260K"))
    parser.add_argument("--seqs", type=int, default=256)
    parser.add_argument("--logit-bias", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--context", type=int, default=4096)
    args = parser.parse_args()
    model_dir = Path(tempfile.mkdtemp(prefix="pagemesh-stepcost-"))
    for f in Path(args.model).iterdir():
        if f.is_file() and f.name != "config.json":
            (model_dir / f.name).symlink_to(f.resolve())
    config = json.loads((Path(args.model) / "config.json").read_text())
    config["max_position_embeddings"] = args.context
    (model_dir / "config.json").write_text(json.dumps(config))
    args.model = str(model_dir)

    port, monitor = free_port(), free_port()
    url = f"nats://127.0.0.1:{port}"
    procs = [subprocess.Popen(["nats-server", "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    common = ["--nats-url", url, "--subject-prefix", PREFIX]
    model = ["--model", args.model]

    def start(*argv):
        p = subprocess.Popen([BIN, *argv, *common], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        return p
    try:
        time.sleep(0.5)
        scheduler = start("scheduler", *model, "--max-num-seqs", str(args.seqs), "--admission-window",
                          str(args.seqs))
        start("tokenizer", *model)
        start("detokenizer", *model)
        start("executor", *model, "--device", "sim", "--sim-time-scale", "0", "--max-num-seqs", str(args.seqs),
              "--num-device-blocks", str(args.seqs * (args.context // 16 + 2)), "--num-host-blocks", "0")
        time.sleep(3)
        first, last = asyncio.run(measure(url, monitor, scheduler.pid, args))
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=10)
        shutil.rmtree(model_dir, ignore_errors=True)
    steps = last["steps"] - first["steps"]
    per = {k: (last[k] - first[k]) / steps for k in ("scheduler_sent", "executor_received", "executor_sent", "cpu")}
    print(json.dumps({
        "seqs": args.seqs, "logit_bias": args.logit_bias, "steps": steps,
        "steps_per_s": round(steps / (last["at"] - first["at"]), 1),
        "bytes_to_executor_per_step": round(per["executor_received"]),
        "bytes_from_executor_per_step": round(per["executor_sent"]),
        "scheduler_bytes_sent_per_step": round(per["scheduler_sent"]),
        "scheduler_cpu_ms_per_step": round(per["cpu"] * 1000, 3),
    }))


if __name__ == "__main__":
    main()
