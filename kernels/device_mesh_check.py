#!/usr/bin/env python3
"""Mesh check of an executor device against another: identical greedy output, and failover.

Starts a nats-server on a free port, `pagemesh serve` with no executor of its own, and two
`pagemesh executor`s: `a` on --device-a (the device under test, e.g. cuda) and `b` on
--device-b (e.g. cpu). Then checks, over the HTTP API only:

  startup          both executors join the mesh (GET /ready, GET /stats).
  identical        every reference case (greedy, max_tokens = its reference length), sent in
                   several concurrent copies until both executors have run steps, returns
                   exactly the reference text, finish_reason "length" and the reference
                   number of tokens.
  baseline         24 greedy requests (max_tokens 400, ignore_eos) complete while both
                   executors are up; their texts are the fault-free answers.
  kill-mid-stream  the same 24 requests, streamed (SSE); once both executors are running some
                   of them, executor `a` gets `kill -9`; every stream still completes with the
                   fault-free text and 400 tokens.
  drain            afterwards the mesh holds no request, only `b` remains, all its KV blocks
                   (device and host) are free, and migrated_requests > 0.

Prints one line per check (`PASS name: numbers` or `FAIL name: why`) and a final
`mesh: N passed, M failed`, writes the same lines to LOGS/mesh_report.txt, and exits 0 only if
every check passed. Every process's output goes to a log file under --logs; every process is
stopped at the end, whatever happened. Standard library only.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PREFIX = "devcheck"
COPIES = 4                # concurrent copies of each reference case per round of `identical`
MAX_ROUNDS = 5            # rounds of `identical` before giving up on both executors stepping
KILL_REQUESTS = 24
KILL_MAX_TOKENS = 400
# The CPU executor's default pool sizes for this model (its log says them).
CPU_POOL_BLOCKS = 8192


class CheckFailed(Exception):
    """A check's condition does not hold; the message says why."""


class ProcessDied(CheckFailed):
    """A process of the mesh exited: no point in waiting any longer."""


class Deadline:
    """The overall time budget (--timeout): every wait and HTTP call is bounded by it."""

    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self, cap=None):
        left = max(0.1, self.end - time.monotonic())
        return left if cap is None else min(cap, left)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, what):
    """Polls `predicate` (exceptions count as false) until true; returns its value."""
    end = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < end:
        try:
            value = predicate()
            if value:
                return value
        except ProcessDied:
            raise
        except Exception as e:  # a service not up yet, a connection refused...
            last_error = e
        time.sleep(0.05)
    detail = f" (last error: {last_error})" if last_error else ""
    raise CheckFailed(f"timed out after {timeout:.0f}s waiting for {what}{detail}")


def http_json(url, body=None, timeout=30):
    """(status, decoded JSON body) of a GET, or of a POST when `body` is given."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def sse_events(url, body, timeout):
    """The JSON payloads of a server-sent event stream, up to `data: [DONE]`."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return events
            events.append(json.loads(data))
    raise CheckFailed(f"the stream ended without [DONE] after {len(events)} events")


class Process:
    """A child process whose stdout and stderr go to LOGS/<name>.log."""

    def __init__(self, args, name, logs):
        self.name = name
        self.log = open(Path(logs) / f"{name}.log", "ab")
        try:
            self.proc = subprocess.Popen([str(a) for a in args], stdout=self.log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        except OSError:
            self.log.close()
            raise

    def alive(self):
        return self.proc.poll() is None

    def kill9(self):
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self):
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


class Mesh:
    """nats-server, `pagemesh serve` (no executor) and the executors `a` and `b`."""

    def __init__(self, args, deadline):
        self.args = args
        self.deadline = deadline
        self.processes = []
        self.executors = {}
        self.nats_port = free_port()
        self.nats_url = f"nats://127.0.0.1:{self.nats_port}"
        self.http_port = free_port()
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.model_name = None

    def spawn(self, argv, name):
        p = Process(argv, name, self.args.logs)
        self.processes.append(p)
        return p

    def start(self):
        a = self.args
        self.spawn([a.nats_server, "-a", "127.0.0.1", "-p", self.nats_port], "nats-server")
        wait_for(lambda: socket.create_connection(("127.0.0.1", self.nats_port), timeout=0.2).close() or True,
                 self.deadline.left(15), "nats-server")
        common = ["--nats-url", self.nats_url, "--subject-prefix", PREFIX]
        self.spawn([a.bin, "serve", "--model", a.model, "--host", "127.0.0.1", "--port", self.http_port,
                    "--no-start-nats", "--num-executors", "0", *common], "serve")
        for eid, device in (("a", a.device_a), ("b", a.device_b)):
            self.executors[eid] = self.spawn([a.bin, "executor", *common, *executor_args(a, device, eid)],
                                             f"executor-{eid}-{device}")

    def wait_ready(self):
        wait_for(lambda: http_json(self.base + "/health", timeout=2)[0] == 200, self.deadline.left(60), "the gateway")

        def both_joined():
            self.check_alive()
            status, body = http_json(self.base + "/ready", timeout=5)
            return status == 200 and body.get("executors", 0) >= 2 and self.executor_ids() == ["a", "b"]
        wait_for(both_joined, self.deadline.left(), "executors a and b to join")
        status, models = http_json(self.base + "/v1/models")
        if status != 200 or not models.get("data"):
            raise CheckFailed(f"GET /v1/models answered {status}: {models}")
        self.model_name = models["data"][0]["id"]

    def check_alive(self):
        for p in self.processes:
            if not p.alive():
                raise ProcessDied(f"{p.name} exited with status {p.proc.returncode} (see {p.name}.log)")

    def stats(self):
        status, body = http_json(self.base + "/stats", timeout=10)
        if status != 200:
            raise CheckFailed(f"GET /stats answered {status}: {body}")
        return body

    def executor_ids(self, stats=None):
        return sorted(e["executor_id"] for e in (stats or self.stats())["executors"])

    def by_executor(self, field, stats=None):
        """{executor_id: value} of one per-executor field ("steps" is read from "stats")."""
        stats = stats or self.stats()
        return {e["executor_id"]: (e["stats"]["steps"] if field == "steps" else e[field])
                for e in stats["executors"]}

    def complete(self, body, timeout):
        status, answer = http_json(self.base + "/v1/completions", {"model": self.model_name, **body}, timeout)
        if status != 200:
            raise CheckFailed(f"POST /v1/completions answered {status}: {answer}")
        choice = answer["choices"][0]
        return choice["text"], choice["finish_reason"], answer["usage"]["completion_tokens"]

    def stream(self, body, timeout):
        body = {"model": self.model_name, **body, "stream": True, "stream_options": {"include_usage": True}}
        events = sse_events(self.base + "/v1/completions", body, timeout)
        errors = [e["error"] for e in events if "error" in e]
        if errors:
            raise CheckFailed(f"the stream carried an error: {errors[0]}")
        choices = [c for e in events for c in e.get("choices", [])]
        usage = [e["usage"] for e in events if e.get("usage")]
        finish = next((c["finish_reason"] for c in reversed(choices) if c.get("finish_reason")), None)
        tokens = usage[-1]["completion_tokens"] if usage else None
        return "".join(c["text"] for c in choices), finish, tokens

    def stop(self):
        for p in reversed(self.processes):
            try:
                p.stop()
            except Exception as e:
                print(f"warning: could not stop {p.name}: {e}", file=sys.stderr)


def executor_args(args, device, eid):
    argv = ["--model", args.model, "--device", device, "--executor-id", eid]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    if device == "cpu":
        argv += ["--threads", "1"]
    else:
        # The same pools as a CPU executor's defaults: the scheduler places a request on the
        # executor with the most free blocks (after prefix-cache hits), so a GPU sized from its
        # memory (millions of blocks) would take every request and the CPU executor none.
        argv += ["--num-device-blocks", str(CPU_POOL_BLOCKS), "--num-host-blocks", str(CPU_POOL_BLOCKS)]
    return argv


def run_all(fn, items, timeout):
    """fn(item) for every item, concurrently; the results in order (exceptions as values)."""
    def guarded(item):
        try:
            return fn(item, timeout)
        except Exception as e:
            return e
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(guarded, items))


def mismatch(got, want):
    """Why the (text, finish_reason, completion_tokens) `got` differs from `want`."""
    (text, finish, tokens), (want_text, want_finish, want_tokens) = got, want
    why = []
    if (finish, tokens) != (want_finish, want_tokens):
        why.append(f"{tokens} tokens, finish {finish} (want {want_tokens}, {want_finish})")
    if text != want_text:
        at = next((i for i, (x, y) in enumerate(zip(text, want_text)) if x != y), min(len(text), len(want_text)))
        why.append(f"text differs at char {at}: {text[max(0, at - 10):at + 20]!r} "
                   f"(want {want_text[max(0, at - 10):at + 20]!r})")
    return "; ".join(why)


# The checks. Each returns the numbers of its PASS line or raises CheckFailed.

def check_startup(mesh, state):
    started = time.monotonic()
    mesh.start()
    mesh.wait_ready()
    return f"executors a ({mesh.args.device_a}) and b ({mesh.args.device_b}) ready in " \
           f"{time.monotonic() - started:.1f}s, model {mesh.model_name}"


def check_identical(mesh, state):
    cases = state["reference"]
    bodies = [{"prompt": c["prompt"], "temperature": 0, "max_tokens": len(c["generated_ids"])}
              for c in cases for _ in range(COPIES)]
    expected = [c for c in cases for _ in range(COPIES)]
    sent = 0
    for _ in range(MAX_ROUNDS):
        results = run_all(mesh.complete, bodies, mesh.deadline.left(120))
        sent += len(bodies)
        bad = [(case["prompt"], why) for case, result in zip(expected, results)
               if (why := case_error(case, result))]
        if bad:
            raise CheckFailed(f"{len(bad)} of {len(bodies)} requests differ from the reference; "
                              f"first: prompt {bad[0][0]!r}: {bad[0][1]}")
        steps = mesh.by_executor("steps")
        if all(steps.get(e, 0) > 0 for e in ("a", "b")):
            return f"{sent} requests ({len(cases)} cases x {COPIES} copies x {sent // len(bodies)} rounds) " \
                   f"equal the reference; steps a={steps['a']} b={steps['b']}"
    raise CheckFailed(f"after {sent} requests (all equal to the reference) not both executors ran steps: {steps}")


def case_error(case, result):
    """Why `result` is not the reference answer of `case` ("" when it is)."""
    if isinstance(result, Exception):
        return str(result)
    return mismatch(result, (case["generated_text"], "length", len(case["generated_ids"])))


def kill_bodies(cases):
    return [{"prompt": cases[i % len(cases)]["prompt"], "temperature": 0, "max_tokens": KILL_MAX_TOKENS,
             "ignore_eos": True} for i in range(KILL_REQUESTS)]


def check_baseline(mesh, state):
    started = time.monotonic()
    results = run_all(mesh.complete, kill_bodies(state["reference"]), mesh.deadline.left(120))
    for i, result in enumerate(results):
        if isinstance(result, Exception):
            raise CheckFailed(f"request {i}: {result}")
        if result[1:] != ("length", KILL_MAX_TOKENS):
            raise CheckFailed(f"request {i}: {mismatch(result, (result[0], 'length', KILL_MAX_TOKENS))}")
    state["baseline"] = [r[0] for r in results]
    return f"{len(results)} requests of {KILL_MAX_TOKENS} tokens in {time.monotonic() - started:.1f}s " \
           f"with both executors up"


def check_kill_mid_stream(mesh, state):
    bodies = kill_bodies(state["reference"])
    results = [None] * len(bodies)

    def run_one(i):
        try:
            results[i] = mesh.stream(bodies[i], mesh.deadline.left(150))
        except Exception as e:
            results[i] = e
    threads = [threading.Thread(target=run_one, args=(i,), daemon=True) for i in range(len(bodies))]
    for t in threads:
        t.start()
    running = wait_for(lambda: both_running(mesh), mesh.deadline.left(30), "both executors to run requests")
    started = time.monotonic()
    mesh.executors["a"].kill9()
    state["killed"] = True
    for t in threads:
        t.join(mesh.deadline.left())
    if any(t.is_alive() for t in threads):
        raise CheckFailed(f"{sum(t.is_alive() for t in threads)} streams still open at the deadline")
    bad = [(i, str(r) if isinstance(r, Exception) else mismatch(r, (want, "length", KILL_MAX_TOKENS)))
           for i, (r, want) in enumerate(zip(results, state["baseline"]))]
    bad = [(i, why) for i, why in bad if why]
    if bad:
        raise CheckFailed(f"{len(bad)} of {len(bodies)} streams differ from the fault-free run; "
                          f"first: stream {bad[0][0]}: {bad[0][1]}")
    return f"kill -9 of a while running a={running['a']} b={running['b']}; {len(bodies)} streams of " \
           f"{KILL_MAX_TOKENS} tokens equal the fault-free run, done {time.monotonic() - started:.1f}s after the kill"


def both_running(mesh):
    mesh.check_alive()
    running = mesh.by_executor("running")
    return running if running.get("a", 0) > 0 and running.get("b", 0) > 0 else None


def drained(stats):
    return stats["requests"] == 0 and all(
        e["device_blocks_free"] == e["device_blocks_total"] and e["host_blocks_free"] == e["host_blocks_total"]
        for e in stats["executors"])


def check_drain(mesh, state):
    def settled():
        s = mesh.stats()
        return s if drained(s) and mesh.executor_ids(s) == ["b"] else None
    try:
        s = wait_for(settled, mesh.deadline.left(30), "no request, only b, all blocks free")
    except CheckFailed as e:
        raise CheckFailed(f"{e}; last /stats: {json.dumps(mesh.stats())}")
    if s["migrated_requests"] <= 0:
        raise CheckFailed(f"migrated_requests is {s['migrated_requests']}")
    b = s["executors"][0]
    return f"requests 0, executors [b], b's blocks free device {b['device_blocks_free']}/{b['device_blocks_total']} " \
           f"host {b['host_blocks_free']}/{b['host_blocks_total']}, migrated_requests {s['migrated_requests']}"


# (name, check, what it needs: the checks that must have passed, or "killed" for a kill done).
CHECKS = [("startup", check_startup, ()),
          ("identical", check_identical, ("startup",)),
          ("baseline", check_baseline, ("startup",)),
          ("kill-mid-stream", check_kill_mid_stream, ("baseline",)),
          ("drain", check_drain, ("killed",))]


class Report:
    """The PASS/FAIL lines, printed as they come and written to LOGS/mesh_report.txt."""

    def __init__(self, logs):
        self.path = Path(logs) / "mesh_report.txt"
        self.lines = []
        self.passed = self.failed = 0

    def add(self, ok, name, detail):
        self.passed += ok
        self.failed += not ok
        self.emit(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")

    def emit(self, line):
        print(line, flush=True)
        self.lines.append(line)

    def finish(self):
        self.emit(f"mesh: {self.passed} passed, {self.failed} failed")
        self.path.write_text("\n".join(self.lines) + "\n")
        return self.failed == 0


def run_checks(mesh, state, report):
    """Runs the checks in order; one whose prerequisite is missing fails as not run."""
    done = set()
    for name, check, needs in CHECKS:
        missing = [n for n in needs if n not in done and not state.get(n)]
        if missing:
            why = "executor a was not killed" if missing[0] == "killed" else f"{missing[0]} failed"
            report.add(False, name, f"not run ({why})")
            continue
        try:
            report.add(True, name, check(mesh, state))
            done.add(name)
        except Exception as e:
            report.add(False, name, str(e) if isinstance(e, CheckFailed) else f"{type(e).__name__}: {e}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bin", required=True, help="the pagemesh binary")
    p.add_argument("--nats-server", required=True, help="the nats-server binary")
    p.add_argument("--model", required=True, help="model directory (stories260K)")
    p.add_argument("--reference", required=True, help="reference.json of the model")
    p.add_argument("--device-a", required=True, help="device of executor a, the one under test (killed)")
    p.add_argument("--device-b", required=True, help="device of executor b")
    p.add_argument("--logs", required=True, help="folder for the process logs and mesh_report.txt")
    p.add_argument("--dtype", help="weight dtype passed to both executors (f32, f16, bf16)")
    p.add_argument("--timeout", type=float, default=240, help="overall time budget in seconds")
    p.add_argument("--kill-max-tokens", type=int, default=KILL_MAX_TOKENS,
                   help="tokens per request in the kill phase (fewer for slow, emulated executors)")
    return p.parse_args()


def main():
    global KILL_MAX_TOKENS
    args = parse_args()
    KILL_MAX_TOKENS = args.kill_max_tokens
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    # A SIGTERM unwinds like an exception, so that the processes are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = Report(args.logs)
    started = time.monotonic()
    mesh = Mesh(args, Deadline(args.timeout))
    try:
        state = {"reference": json.loads(Path(args.reference).read_text())["cases"]}
        run_checks(mesh, state, report)
    except Exception as e:
        report.add(False, "setup", f"{type(e).__name__}: {e}")
    finally:
        mesh.stop()
    ok = report.finish()
    print(f"({time.monotonic() - started:.1f}s; logs in {args.logs})", file=sys.stderr)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
