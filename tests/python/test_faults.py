"""No client waits on a part that is gone: `kill -9` of the scheduler (no standby) or of the
last detokenizer ends every stream with an error within 10 s, and new requests are refused
as unavailable; a 20 s NATS outage is ridden through and in-flight requests complete."""

import asyncio
import json
import subprocess
import time

import nats as nats_py

from conftest import MODEL, LinkCutter, Mesh, NatsServer, Process, free_port, http_json, read_generation, wait_for
from test_failover import PROMPTS, run_with_link_cut, short_bodies, texts
from test_reference import generate_over_nats


class ServiceMesh:
    """Every service in its own process (so that each can be killed alone)."""

    def __init__(self, nats, prefix, detokenizers=1, schedulers=1, executor_model=MODEL, scheduler_url=None):
        self.nats, self.prefix = nats, prefix
        self.http_port = free_port()
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.processes = {}
        model = ["--model", str(MODEL)]
        for i in range(schedulers):
            self.start(f"scheduler{i}", "scheduler", *model, "--heartbeat-timeout-ms", "1500", url=scheduler_url)
        self.start("tokenizer", "tokenizer", *model)
        for i in range(detokenizers):
            self.start(f"detokenizer{i}", "detokenizer", *model, "--detokenizer-id", f"d{i}")
        self.start("executor", "executor", "--model", str(executor_model), "--served-model-name", MODEL.name,
                   "--threads", "1", "--executor-id", "e0")
        self.start("gateway", "gateway", "--host", "127.0.0.1", "--port", str(self.http_port))

        def ready():
            status, body = http_json(self.base + "/ready")
            return status == 200 and body["executors"] == 1 and body["detokenizers"] == detokenizers
        wait_for(ready, timeout=60, what="the mesh")

    def start(self, name, service, *args, url=None):
        common = ["--nats-url", url or self.nats.url, "--subject-prefix", self.prefix]
        self.processes[name] = Process([service, *common, *args], f"{name}-{self.prefix}")

    stats = Mesh.stats
    steps = Mesh.steps
    all_blocks_free = Mesh.all_blocks_free

    def stop(self):
        for p in self.processes.values():
            p.stop()


def long_bodies(count=8):
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "temperature": 0, "max_tokens": 480, "ignore_eos": True}
            for i in range(count)]


async def stream(url, prefix, body, first_chunk, timeout=60):
    """Chunks of one request (or its error), recording when it ended; `first_chunk` is set
    when the first chunk arrives."""
    nc = await nats_py.connect(url)
    try:
        answer = await read_generation(nc, prefix, body, timeout, on_chunk=lambda _: first_chunk.set())
    finally:
        await nc.close()
    if isinstance(answer, dict):
        return {"error": answer["error"], "chunks": answer["chunks"], "ended": time.monotonic()}
    return {"chunks": answer, "ended": time.monotonic()}


def ended_with_error(result):
    if "error" in result:
        return True
    last = result["chunks"][-1]
    return last.get("done") and last.get("finish_reason") == "error"


def assert_all_ended_with_an_error_within_10_s(results, fault_at):
    for r in results:
        assert ended_with_error(r), r
        assert r["ended"] - fault_at < 10, f"a stream ended {r['ended'] - fault_at:.1f} s after the fault"


async def streams_then(url, prefix, fault, count=8):
    """Starts `count` long streams, runs `fault` once every one has a first chunk, and returns
    the results with the time of the fault."""
    firsts = [asyncio.Event() for _ in range(count)]
    tasks = [asyncio.create_task(stream(url, prefix, b, e)) for b, e in zip(long_bodies(count), firsts)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), timeout=60)
    at = time.monotonic()
    fault()
    return await asyncio.gather(*tasks), at


def test_killing_the_scheduler_without_a_standby_ends_every_stream_with_an_error_within_10_s(nats):
    m = ServiceMesh(nats, "schedkill")
    try:
        results, killed_at = asyncio.run(streams_then(nats.url, "schedkill",
                                                      lambda: m.processes["scheduler0"].kill(9)))
        assert_all_ended_with_an_error_within_10_s(results, killed_at)
        # A new request is refused as unavailable, quickly, over NATS and over HTTP.
        started = time.monotonic()
        r = asyncio.run(stream(nats.url, "schedkill", long_bodies(1)[0], asyncio.Event()))
        assert "error" in r and r["error"]["kind"] == "unavailable", r
        status, body = http_json(m.base + "/v1/completions", {"prompt": "Once", "max_tokens": 4}, timeout=30)
        assert status == 503, body
        assert time.monotonic() - started < 20
    finally:
        m.stop()


def test_killing_the_last_detokenizer_ends_every_stream_with_an_error_within_10_s(nats):
    m = ServiceMesh(nats, "detokkill")
    try:
        results, killed_at = asyncio.run(streams_then(nats.url, "detokkill",
                                                      lambda: m.processes["detokenizer0"].kill(9)))
        assert_all_ended_with_an_error_within_10_s(results, killed_at)
        assert all(r.get("error", {}).get("kind") == "unavailable" for r in results), results
    finally:
        m.stop()


def test_in_flight_requests_complete_through_a_20_s_nats_outage():
    own = NatsServer()
    m = Mesh(own, "outage")
    try:
        m.wait_ready()

        async def fault_free():
            return await asyncio.gather(*(stream(own.url, "outage", b, asyncio.Event()) for b in long_bodies(4)))
        reference = texts([r["chunks"] for r in asyncio.run(fault_free())])

        def outage():
            own.proc.terminate()
            own.proc.wait(timeout=10)
            time.sleep(20)
            own.proc = subprocess.Popen(["nats-server", "-a", "127.0.0.1", "-p", str(own.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        async def with_outage():
            firsts = [asyncio.Event() for _ in range(4)]
            tasks = [asyncio.create_task(stream(own.url, "outage", b, e, timeout=90))
                     for b, e in zip(long_bodies(4), firsts)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), timeout=60)
            await asyncio.get_running_loop().run_in_executor(None, outage)
            return await asyncio.gather(*tasks)

        results = asyncio.run(with_outage())
        for r in results:
            assert "error" not in r, r
            indices = [c["index"] for c in r["chunks"]]
            assert indices == list(range(len(indices))), "a chunk was lost"
        assert texts([r["chunks"] for r in results]) == reference
        wait_for(m.all_blocks_free, timeout=10, what="every block free")
    finally:
        m.stop()
        own.stop()


def test_killing_the_scheduler_with_a_standby_running_loses_no_stream(nats):
    m = ServiceMesh(nats, "standby", schedulers=2, detokenizers=2)
    try:
        async def fault_free():
            return await asyncio.gather(*(stream(nats.url, "standby", b, asyncio.Event()) for b in long_bodies()))
        reference = texts([r["chunks"] for r in asyncio.run(fault_free())])
        active = http_json(m.base + "/stats")[1]["scheduler"]
        names = [name for name in ("scheduler0", "scheduler1")]

        def kill_active():
            # Each scheduler logs its id when it starts serving; the active one is named in /stats.
            for name in names:
                log = (m.processes[name].log.name)
                if active in open(log).read():
                    m.processes[name].kill(9)
                    return
            raise AssertionError(f"no process logged the active scheduler {active}")

        results, _ = asyncio.run(streams_then(nats.url, "standby", kill_active))
        for r in results:
            assert "error" not in r, r
            indices = [c["index"] for c in r["chunks"]]
            assert indices == list(range(len(indices))), "a chunk was lost or repeated"
        assert texts([r["chunks"] for r in results]) == reference
        after = http_json(m.base + "/stats")[1]
        assert after["scheduler"] != active and after["term"] > 1, after
        assert after["migrated_requests"] > 0, after
        wait_for(lambda: (lambda s: s["requests"] == 0 and all(
            e["device_blocks_free"] == e["device_blocks_total"] for e in s["executors"]))(
                http_json(m.base + "/stats")[1]), timeout=10, what="every block free")
    finally:
        m.stop()


def test_a_step_refused_for_one_request_ends_that_request_and_no_other(nats, tmp_path):
    """An executor that refuses a sequence (here: its copy of the model has a shorter context
    than the scheduler's) fails that request alone; the others in the same steps complete
    exactly, and the executor stays registered (no loss, no wedge)."""
    import shutil
    short = tmp_path / "stories260K-short"
    shutil.copytree(MODEL, short)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (short / "config.json").write_text(json.dumps(config))
    m = ServiceMesh(nats, "blame", executor_model=short)
    try:
        innocents = [{"prompt": PROMPTS[i], "temperature": 0, "max_tokens": 40, "ignore_eos": True} for i in range(4)]

        async def alone():
            return await asyncio.gather(*(stream(nats.url, "blame", b, asyncio.Event()) for b in innocents))
        reference = texts([r["chunks"] for r in asyncio.run(alone())])
        # Longer than the executor's context from its first step on.
        culprit = {"prompt": " ".join(PROMPTS) * 3, "temperature": 0, "max_tokens": 20}

        async def together():
            firsts = [asyncio.Event() for _ in innocents]
            tasks = [asyncio.create_task(stream(nats.url, "blame", b, e)) for b, e in zip(innocents, firsts)]
            await asyncio.gather(*(e.wait() for e in firsts))
            # Sent while the others decode: its prefill shares a step with them.
            blamed = await stream(nats.url, "blame", culprit, asyncio.Event())
            return [blamed, *await asyncio.gather(*tasks)]
        blamed, *others = asyncio.run(together())
        assert ended_with_error(blamed), blamed
        message = blamed["error"]["message"] if "error" in blamed else ""
        assert "error" not in blamed or "max model length" in message, blamed
        assert texts([r["chunks"] for r in others]) == reference
        s = http_json(m.base + "/stats")[1]
        assert [e["executor_id"] for e in s["executors"]] == ["e0"]
        wait_for(lambda: http_json(m.base + "/stats")[1]["requests"] == 0, timeout=10, what="no request left")
        # And the mesh goes on serving.
        again = asyncio.run(alone())
        assert texts([r["chunks"] for r in again]) == reference
    finally:
        m.stop()


def test_a_scheduler_that_reconnects_late_loses_no_step(nats):
    # Step answers (and steps) lost while its link was down are sent again: no step waits out
    # its deadline, so no executor is dropped and no request moves.
    proxy = LinkCutter(nats)
    m = ServiceMesh(nats, "latesched", scheduler_url=proxy.url)
    try:
        async def run_all():
            return await asyncio.gather(*(generate_over_nats(nats.url, m.prefix, b, timeout=120)
                                          for b in short_bodies()))
        fault_free = texts(asyncio.run(run_all()))
        for _ in range(3):
            assert texts(run_with_link_cut(m, proxy, short_bodies())) == fault_free
        wait_for(m.all_blocks_free, timeout=10, what="all blocks free")
        s = m.stats()
        assert [e["executor_id"] for e in s["executors"]] == ["e0"]
        assert s["migrated_requests"] == 0, s
    finally:
        m.stop()
        proxy.stop()



def test_chunks_wait_for_clients_that_reconnect_after_the_mesh(nats):
    # NATS comes back; the mesh reconnects at once and its steps go on, but the clients
    # reconnect on their own schedule: what the detokenizer publishes before a client has
    # subscribed again is dropped by the server. It holds it for a while after its link
    # returns, so every stream still arrives whole. Simulated steps of about 100 ms, so that
    # the links can be cut between two steps' chunks (a cut loses what is on the wire).
    mesh_link, client_link = LinkCutter(nats), LinkCutter(nats)
    m = Mesh(mesh_link, "rejoin", serve_args=["--device", "sim", "--sim-model", "llama-2-7b",
                                              "--sim-gpu", "h100-80gb", "--sim-time-scale", "25"])
    bodies = [{"prompt": PROMPTS[i], "max_tokens": 60, "ignore_eos": True} for i in range(4)]
    try:
        m.wait_ready()
        chunk_came = asyncio.Event()

        async def client(body):
            nc = await nats_py.connect(client_link.url, reconnect_time_wait=1, max_reconnect_attempts=-1)
            try:
                return await read_generation(nc, "rejoin", body, timeout=60, on_chunk=lambda _: chunk_came.set())
            finally:
                await nc.close()

        def outage():
            mesh_link.cut()
            client_link.cut()
            time.sleep(1)
            mesh_link.restore()
            m.wait_ready(timeout=30)
            # The mesh is back and generating; the clients are not, for a while.
            time.sleep(0.5)
            client_link.restore()

        async def with_outage():
            tasks = [asyncio.create_task(client(b)) for b in bodies]
            for _ in range(3):
                chunk_came.clear()
                await asyncio.wait_for(chunk_came.wait(), timeout=60)
            # Between two steps: nothing on the wire.
            await asyncio.sleep(0.03)
            await asyncio.get_running_loop().run_in_executor(None, outage)
            return await asyncio.gather(*tasks)

        results = asyncio.run(with_outage())
        texts(results)  # every index once, in order, up to the last chunk
        assert [sum(len(c["token_ids"]) for c in chunks) for chunks in results] == [60] * 4
        wait_for(m.all_blocks_free, timeout=10, what="every block free")
    finally:
        m.stop()
        mesh_link.stop()
        client_link.stop()
