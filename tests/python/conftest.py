"""Fixtures of the mesh tests: a real nats-server on a free port and real pagemesh processes.

The `pagemesh` binary is taken from $PAGEMESH_BIN, else target/debug/pagemesh (what
`cargo test` / `cargo build` leave there; tests/run builds it). The stories260K model comes from $PAGEMESH_TEST_MODEL, else
models/stories260K in the repository. Each process's output goes to a log in a
temporary folder, removed when every test passed and named at the end otherwise.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("PAGEMESH_BIN", ROOT / "target" / "debug" / "pagemesh"))
MODEL = Path(os.environ.get("PAGEMESH_TEST_MODEL", ROOT / "models" / "stories260K"))
# The internal protocol version, for tests that speak it as a fake service.
INTERNAL_PROTOCOL_VERSION = int(re.search(r"INTERNAL_PROTOCOL_VERSION: u32 = (\d+);",
                                          (ROOT / "shared" / "src" / "protocol.rs").read_text()).group(1))
# Every process's output, kept only when a test fails.
LOGS = Path(tempfile.mkdtemp(prefix="pagemesh-test-logs-"))


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0:
        shutil.rmtree(LOGS, ignore_errors=True)
    else:
        print(f"\nprocess logs of the mesh tests: {LOGS}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def http_json(url, body=None, method=None, headers=None, timeout=30):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"))
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


async def read_generation(nc, prefix, body, timeout=60, on_chunk=None):
    """Publishes a generation request on the NATS connection `nc` and reads its answer: the
    chunks up to the `done` one (each index once), or the error message (a dict, with the
    chunks that came before it under "chunks"). `on_chunk` is called with each chunk as it
    comes."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(f"{prefix}.generate", json.dumps(body).encode(), reply=inbox)
    chunks = []
    while True:
        data = json.loads((await sub.next_msg(timeout=timeout)).data)
        if "error" in data:
            return {**data, "chunks": chunks}
        # A chunk may come again after a detokenizer's link to NATS came back (what was on
        # the wire is published again): a client drops an index it has seen.
        if chunks and data.get("index", 0) <= chunks[-1].get("index", -1):
            continue
        chunks.append(data)
        if on_chunk:
            on_chunk(data)
        if data.get("done"):
            return chunks


class Process:
    def __init__(self, args, name):
        self.name = name
        self.log = open(LOGS / f"{name}.log", "a")
        self.proc = subprocess.Popen([str(BIN), *args], stdout=self.log, stderr=subprocess.STDOUT)

    def kill(self, sig=9):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


class NatsServer:
    def __init__(self):
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(["nats-server", "-a", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close() or True,
                 what="nats-server")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


class LinkCutter:
    """A TCP relay in front of a nats-server whose links can be cut: the processes that connect
    through `url` lose their connection on `cut()` and cannot connect again until `restore()`
    (the relay takes the connection and closes it at once), while everything else on the
    server carries on: one service reconnecting late, as after a network partition."""

    def __init__(self, nats):
        self.target = ("127.0.0.1", nats.port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.url = f"nats://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        self.links = []
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if not self.open:
                    client.close()
                    continue
                try:
                    server = socket.create_connection(self.target)
                except OSError:
                    client.close()
                    continue
                self.links += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        with self.lock:
            self.open = False
            for s in self.links:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.links = []

    def restore(self):
        with self.lock:
            self.open = True

    def stop(self):
        self.cut()
        self.listener.close()


class Mesh:
    """A mesh: `pagemesh serve` (gateway, tokenizer, scheduler, detokenizer and optionally
    executors) plus any extra service processes."""

    def __init__(self, nats, prefix, serve_args=(), executors_in_process=1, model=MODEL):
        self.nats = nats
        self.prefix = prefix
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.extra = []
        common = ["--nats-url", nats.url, "--subject-prefix", prefix]
        self.common = common
        self.serve = Process(["serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                              "--no-start-nats", "--num-executors", str(executors_in_process), *common,
                              *serve_args], f"serve-{prefix}")
        wait_for(lambda: http_json(self.base + "/health")[0] == 200, what="gateway")

    def start(self, service, *args, nats_url=None):
        """Starts a service process on this mesh (connecting to `nats_url` if given, e.g. a
        `LinkCutter`'s, else to the mesh's server)."""
        common = ["--nats-url", nats_url or self.nats.url, "--subject-prefix", self.prefix]
        p = Process([service, *common, *args], f"{service}-{self.prefix}-{len(self.extra)}")
        self.extra.append(p)
        return p

    def wait_ready(self, executors=1, timeout=60):
        def ready():
            status, body = http_json(self.base + "/ready")
            return status == 200 and body["executors"] >= executors
        wait_for(ready, timeout=timeout, what=f"{executors} executor(s)")

    def stats(self):
        status, body = http_json(self.base + "/stats")
        assert status == 200, body
        return body

    def steps(self):
        """Steps the executors have run so far."""
        return sum(e["stats"]["steps"] for e in self.stats()["executors"])

    def all_blocks_free(self):
        s = self.stats()
        return s["requests"] == 0 and all(
            e["device_blocks_free"] == e["device_blocks_total"] and e["host_blocks_free"] == e["host_blocks_total"]
            for e in s["executors"])

    def stop(self):
        for p in self.extra:
            p.stop()
        self.serve.stop()


@pytest.fixture(scope="session")
def nats():
    server = NatsServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mesh(nats):
    m = Mesh(nats, "pm")
    m.wait_ready()
    yield m
    m.stop()


@pytest.fixture(scope="session")
def reference():
    return json.loads((MODEL / "reference.json").read_text())["cases"]


@pytest.fixture
def fresh_prefix(request):
    return "t" + str(abs(hash(request.node.name)) % 10**8)
