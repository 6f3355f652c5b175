"""The bus as an attacker finds it: a real nats-server with the configuration `pagemesh
nats-config` writes (accounts, per-role NKey users, clients in accounts of their own), and
`pagemesh serve` connecting each service with its role's seed.

Clients and anonymous connections try the attacks of the bus issue; services' own users send
hostile internal messages (as a compromised or buggy service would). Each attack must be
refused by NATS permissions or answered with an error, the mesh must keep serving the
reference outputs, and the KV pool must be free afterwards.
"""

import asyncio
import json
import os
import socket
import subprocess
import tempfile
from pathlib import Path

import msgpack
import nats as nats_py
import pytest

from conftest import (BIN, INTERNAL_PROTOCOL_VERSION, MODEL, Mesh, Process, free_port, http_json, read_generation,
                      wait_for)

PREFIX = "sec"


class SecuredBus:
    """A nats-server with the shipped accounts and permissions, and the folder of seeds."""

    def __init__(self, clients=("alice", "bob")):
        self.dir = Path(tempfile.mkdtemp(prefix="pagemesh-bus-"))
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        out = subprocess.run([str(BIN), "nats-config", "--out", str(self.dir), "--listen", f"127.0.0.1:{self.port}",
                              "--subject-prefix", PREFIX, "--client", ",".join(clients)],
                             capture_output=True, text=True, check=True)
        assert "nats.conf" in out.stdout
        self.proc = subprocess.Popen(["nats-server", "-c", str(self.dir / "nats.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close() or True,
                 what="nats-server")

    def seed(self, name):
        return str(self.dir / f"{name}.nk")

    async def connect(self, name):
        """A connection as user `name`; permission errors the server reports are collected
        in `.violations`."""
        violations = []

        async def on_error(e):
            violations.append(str(e).lower())

        # The scheduler's requests (steps) use its private inbox prefix, like the service's.
        inbox = b"_INBOX_scheduler" if name == "scheduler" else b"_INBOX"
        nc = await nats_py.connect(self.url, nkeys_seed=self.seed(name), error_cb=on_error,
                                   max_reconnect_attempts=0, inbox_prefix=inbox)
        nc.violations = violations
        return nc

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def bus():
    b = SecuredBus()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def secured_mesh(bus):
    m = Mesh(bus, PREFIX, serve_args=["--nats-auth-dir", str(bus.dir)])
    m.wait_ready()
    yield m.base
    m.stop()


def run(coro):
    return asyncio.run(coro)


def completion(base, case):
    status, body = http_json(base + "/v1/completions", {"prompt": case["prompt"], "temperature": 0,
                                                        "max_tokens": len(case["generated_ids"])})
    assert status == 200, body
    return body["choices"][0]["text"]


def stats(base):
    status, body = http_json(base + "/stats")
    assert status == 200, body
    return body


def assert_serving_and_free(base, reference):
    """The mesh still answers the reference exactly, with one executor, and every block is free."""
    for case in reference[:2]:
        assert completion(base, case) == case["generated_text"]

    def drained():
        s = stats(base)
        return s["requests"] == 0 and all(e["device_blocks_free"] == e["device_blocks_total"]
                                          and e["host_blocks_free"] == e["host_blocks_total"] for e in s["executors"])
    wait_for(drained, timeout=10, what="every KV block to be free")
    assert len(stats(base)["executors"]) == 1


def invalid_count(base, service, message):
    with __import__("urllib.request").request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("pagemesh_invalid_messages_total{") and f'service="{service}"' in line \
                and f'message="{message}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def generate(nc, body, timeout=30):
    return await read_generation(nc, PREFIX, body, timeout)


def test_anonymous_and_unknown_connections_are_refused(bus, secured_mesh):
    async def attempt(**kwargs):
        try:
            nc = await nats_py.connect(bus.url, max_reconnect_attempts=0, allow_reconnect=False,
                                       connect_timeout=3, **kwargs)
        except Exception as e:  # noqa: BLE001 - any refusal will do; the message is checked
            return str(e)
        await nc.close()
        return "connected"

    assert "authorization violation" in run(attempt()).lower()
    assert "authorization violation" in run(attempt(user="pagemesh", password="pagemesh")).lower()


def test_a_client_gets_answers_and_nothing_internal(bus, secured_mesh, reference):
    case = reference[0]

    async def scenario():
        nc = await bus.connect("alice")
        try:
            chunks = await generate(nc, {"prompt": case["prompt"], "temperature": 0,
                                         "max_tokens": len(case["generated_ids"])})
            assert "".join(c["text"] for c in chunks) == case["generated_text"]
            tokens = json.loads((await nc.request(f"{PREFIX}.tokenize", b'{"prompt": "hi"}', timeout=5)).data)
            assert tokens["count"] >= 1
            # Every internal subject and every wildcard is out of reach.
            for subject in [">", f"{PREFIX}.>", f"{PREFIX}.v1.>", f"{PREFIX}.v1.scheduler.submit", "_R_.>"]:
                await nc.subscribe(subject)
            hostile = {
                f"{PREFIX}.v1.scheduler.submit": {"request_id": "x", "reply_to": "_INBOX.x", "prompt_token_ids": [1],
                                                  "params": {"n": 10**12}, "seed": 0, "stop": [], "stream": True},
                f"{PREFIX}.v1.executor.heartbeat": {"executor_id": "spy", "model": "stories260K", "block_size": 16,
                                                    "num_device_blocks": 4294967294, "num_host_blocks": 0},
                f"{PREFIX}.v1.detokenizer.heartbeat": {"id": "spy"},
                f"{PREFIX}.v1.scheduler.abort": {"request_id": "x"},
                f"{PREFIX}.v1.executor.e1.step": {"incarnation": 0, "step": 0, "session": 0, "plan": {}},
                f"{PREFIX}.stats": {},
                "_INBOX.forged": {"request_id": "x", "index": 0, "sample_index": 0, "text": "forged", "token_ids": []},
            }
            for subject, body in hostile.items():
                internal = subject.startswith(f"{PREFIX}.v1.")
                await nc.publish(subject, msgpack.packb(body) if internal else json.dumps(body).encode())
            await nc.flush()
            await asyncio.sleep(0.5)
            for subject in [">", f"{PREFIX}.>", f"{PREFIX}.v1.>", "_R_.>", *hostile]:
                assert any(subject.lower() in v and "permissions violation" in v for v in nc.violations), \
                    (subject, nc.violations)
        finally:
            await nc.close()

    run(scenario())
    s = stats(secured_mesh)
    assert [e["executor_id"] for e in s["executors"]] != ["spy"] and s["detokenizers"] == 1
    assert_serving_and_free(secured_mesh, reference)


def test_clients_never_see_each_others_prompts_or_answers(bus, secured_mesh, reference):
    case = reference[1]

    async def scenario():
        alice, bob = await bus.connect("alice"), await bus.connect("bob")
        try:
            spied = []

            async def spy(msg):
                spied.append(msg)
            # The only subjects alice may subscribe to are her own account's inboxes.
            await alice.subscribe("_INBOX.>", cb=spy)
            await alice.flush()
            chunks = await generate(bob, {"prompt": case["prompt"], "temperature": 0,
                                          "max_tokens": len(case["generated_ids"])})
            assert "".join(c["text"] for c in chunks) == case["generated_text"]
            await asyncio.sleep(0.3)
            assert spied == [], "a client saw another client's stream"
            assert not alice.violations, alice.violations
        finally:
            await alice.close()
            await bob.close()

    run(scenario())


def test_hostile_messages_from_service_users_are_refused_with_errors(bus, secured_mesh, reference):
    before = {kind: invalid_count(secured_mesh, "scheduler", kind)
              for kind in ["submit", "executor_heartbeat", "abort", "detokenizer_heartbeat", "detokenizer_ack"]}

    async def scenario():
        tokenizer = await bus.connect("tokenizer")
        gateway = await bus.connect("gateway")
        executor = await bus.connect("executor")
        detokenizer = await bus.connect("detokenizer")
        try:
            inbox = gateway.new_inbox()
            replies = await gateway.subscribe(inbox)
            await gateway.flush()

            counter = iter(range(10**6))

            def submit(**over):
                # Distinct ids: a submit repeated with the same id and inbox is only acknowledged.
                body = {"request_id": f"hostile-{next(counter)}", "reply_to": inbox, "prompt_token_ids": [1, 2, 3],
                        "params": {"max_tokens": 4, "temperature": 0}, "seed": 0, "stop": [], "stream": True}
                body.update(over)
                return msgpack.packb(body)

            expectations = [
                (submit(params={"n": 10**12, "max_tokens": 4}), "n must be"),
                (submit(prompt_token_ids=[1, 100000]), "outside the vocabulary"),
                (submit(params={"max_tokens": 10**15}), "maximum context length"),
                (submit(prompt_token_ids=[]), "empty"),
                (submit(request_id="r" * 100_000), "request_id"),
                (submit(stop=["s"] * 1000), "stop strings"),
            ]
            for payload, expected in expectations:
                await tokenizer.publish(f"{PREFIX}.v1.scheduler.submit", payload)
                answer = json.loads((await replies.next_msg(timeout=5)).data)
                assert answer["error"]["kind"] == "invalid_request", answer
                assert expected in answer["error"]["message"], (expected, answer)
            # A reply subject with a wildcard is never published to.
            await tokenizer.publish(f"{PREFIX}.v1.scheduler.submit", submit(reply_to=f"{PREFIX}.v1.>"))
            await tokenizer.publish(f"{PREFIX}.v1.scheduler.submit", b"\xc1 not msgpack")
            # Heartbeats declaring absurd pools, or ids that would become wildcard subjects.
            for beat in [{"executor_id": "huge", "model": "stories260K", "block_size": 16,
                          "num_device_blocks": 4294967294, "num_host_blocks": 0},
                         {"executor_id": "bad.>", "model": "stories260K", "block_size": 16,
                          "num_device_blocks": 8, "num_host_blocks": 0},
                         {"executor_id": "zero", "model": "stories260K", "block_size": 0,
                          "num_device_blocks": 8, "num_host_blocks": 0}]:
                await executor.publish(f"{PREFIX}.v1.executor.heartbeat",
                                       msgpack.packb({**beat, "incarnation": 1,
                                                      "protocol_version": INTERNAL_PROTOCOL_VERSION}))
            await detokenizer.publish(f"{PREFIX}.v1.detokenizer.heartbeat", msgpack.packb({"id": "*"}))
            # 1 MB abort ids, many of them: refused before anything is remembered.
            for _ in range(30):
                await detokenizer.publish(f"{PREFIX}.v1.scheduler.abort",
                                          msgpack.packb({"request_id": "a" * 1_000_000}))
            await detokenizer.publish(f"{PREFIX}.v1.scheduler.detokenizer_ack",
                                      msgpack.packb({"request_id": "x", "next_index": 0, "consumed": [0] * 100_000,
                                                     "closed": []}))
            # Forged asks for resent events: a wildcard detokenizer id (the scheduler would
            # publish to it), 100,000 samples, and an ask for a stream nobody opened.
            for ask in [{"detokenizer": "bad.>", "received": None}, {"detokenizer": "d1", "received": [0] * 100_000}]:
                await detokenizer.publish(f"{PREFIX}.v1.scheduler.detokenizer_ack",
                                          msgpack.packb({"request_id": "x", "next_index": 0, "consumed": [],
                                                         "closed": [], "ask": ask}))
            await detokenizer.publish(f"{PREFIX}.v1.scheduler.detokenizer_ack",
                                      msgpack.packb({"request_id": "never-opened", "next_index": 0, "consumed": [0],
                                                     "closed": [False],
                                                     "ask": {"detokenizer": "ghost", "received": [0]}}))
            for nc in (tokenizer, executor, detokenizer):
                await nc.flush()
            await asyncio.sleep(1.0)
            for nc in (tokenizer, gateway, executor, detokenizer):
                assert not nc.violations, nc.violations
        finally:
            for nc in (tokenizer, gateway, executor, detokenizer):
                await nc.close()

    run(scenario())
    after = {kind: invalid_count(secured_mesh, "scheduler", kind) for kind in before}
    assert after["submit"] - before["submit"] >= 8, (before, after)
    assert after["executor_heartbeat"] - before["executor_heartbeat"] >= 3, (before, after)
    assert after["abort"] - before["abort"] >= 30, (before, after)
    assert after["detokenizer_heartbeat"] - before["detokenizer_heartbeat"] >= 1, (before, after)
    assert after["detokenizer_ack"] - before["detokenizer_ack"] >= 3, (before, after)
    s = stats(secured_mesh)
    assert [e["executor_id"] for e in s["executors"]] not in (["huge"], ["zero"]) and len(s["executors"]) == 1
    assert s["detokenizers"] == 1
    assert_serving_and_free(secured_mesh, reference)


def test_hostile_steps_and_detokenizer_events_are_refused(bus, secured_mesh, reference):
    executor_id = stats(secured_mesh)["executors"][0]["executor_id"]
    metrics_port = free_port()
    # A detokenizer whose id the test knows, so that events can be sent to it.
    extra = Process(["detokenizer", "--model", str(MODEL), "--detokenizer-id", "known", "--metrics-port",
                     str(metrics_port), "--nats-url", bus.url, "--nats-auth-dir", str(bus.dir),
                     "--subject-prefix", PREFIX], "detokenizer-secured")
    metrics = f"http://127.0.0.1:{metrics_port}"
    wait_for(lambda: stats(secured_mesh)["detokenizers"] == 2, timeout=30, what="the second detokenizer")
    try:
        async def scenario():
            scheduler = await bus.connect("scheduler")
            try:
                # The executor's incarnation, from its heartbeat (steps for another are refused early).
                beats = await scheduler.subscribe(f"{PREFIX}.v1.executor.heartbeat")
                incarnation = None
                while incarnation is None:
                    beat = msgpack.unpackb((await beats.next_msg(timeout=5)).data)
                    if beat["executor_id"] == executor_id:
                        incarnation = beat["incarnation"]
                await beats.unsubscribe()
                seq = {"seq_id": 1, "tokens": [10**6], "start_pos": 2**63, "block_table": [10**9], "new_blocks": [],
                       "history": None,
                       "sample": {"params": {"n": 1}, "seed": 0, "sample_index": 0, "num_samples": 4_000_000_000,
                                  "prompt_len": 1, "output_len": 0, "banned_tokens": []}}
                plans = [
                    {"step_id": 1, "swap_out": [[10**9, 0]], "swap_in": [], "copy": [], "released": [], "seqs": []},
                    {"step_id": 2, "swap_out": [], "swap_in": [], "copy": [], "released": [], "seqs": [seq]},
                    {"step_id": 3, "swap_out": [], "swap_in": [], "copy": [], "released": [],
                     "seqs": [{**seq, "tokens": [1], "start_pos": 0, "block_table": [0]}]},
                    # Blocks appended to a table the executor never had, parameters never sent.
                    {"step_id": 4, "swap_out": [], "swap_in": [], "copy": [], "released": [],
                     "seqs": [{**seq, "seq_id": 77, "tokens": [1], "start_pos": 0, "block_table": None, "new_blocks": [0]}]},
                    {"step_id": 5, "swap_out": [], "swap_in": [], "copy": [], "released": [],
                     "seqs": [{**seq, "seq_id": 78, "tokens": [1], "start_pos": 0, "block_table": [0],
                               "sample": {**seq["sample"], "params": None, "num_samples": 1}}]},
                ]
                for number, plan in enumerate(plans):
                    request = {"incarnation": incarnation, "step": number, "session": 10**9 + number, "plan": plan}
                    answer = await scheduler.request(f"{PREFIX}.v1.executor.{executor_id}.step",
                                                     msgpack.packb(request), timeout=10)
                    # Steps and their answers go with fields by position: [incarnation, step, reply].
                    refusal = msgpack.unpackb(answer.data)[2]
                    assert "Failed" in refusal or "Refused" in refusal, refusal
                garbage = await scheduler.request(f"{PREFIX}.v1.executor.{executor_id}.step", b"\x00\x01", timeout=10)
                assert "Failed" in msgpack.unpackb(garbage.data)[2]
                events = [
                    {"Open": {"request_id": "e", "reply_to": "_INBOX.>", "prompt_token_ids": [1], "n": 1, "stop": [],
                              "stream": True, "logprobs": False}},
                    {"Open": {"request_id": "e", "reply_to": "_INBOX.e", "prompt_token_ids": [1], "n": 10**9,
                              "stop": [], "stream": True, "logprobs": False}},
                    {"Tokens": {"request_id": "e" * 10_000, "tokens": []}},
                    {"Tokens": {"request_id": "e", "tokens": [{"sample_index": 4000000000, "token": None,
                                                              "finish": None}]}},
                ]
                for event in events:
                    message = {"term": 10**6, "events": [event]}
                    await scheduler.publish(f"{PREFIX}.v1.detokenizer.known.events", msgpack.packb(message))
                await scheduler.publish(f"{PREFIX}.v1.detokenizer.known.events", b"\x92\x01")
                await scheduler.flush()
                assert not scheduler.violations, scheduler.violations
            finally:
                await scheduler.close()

        run(scenario())
        wait_for(lambda: invalid_count(metrics, "detokenizer", "event") >= 5, timeout=10,
                 what="the detokenizer to count 5 refused events")
        assert extra.proc.poll() is None, "the detokenizer died"
    finally:
        extra.stop()
    wait_for(lambda: stats(secured_mesh)["detokenizers"] == 1, timeout=10, what="the extra detokenizer to leave")
    assert_serving_and_free(secured_mesh, reference)


def test_serve_starts_a_secured_bus_by_default(tmp_path, reference):
    nats_port, http_port = free_port(), free_port()
    env_home = tmp_path / "home"
    env_home.mkdir()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(BIN), "serve", "--model", str(MODEL), "--host", "127.0.0.1", "--port", str(http_port),
                             "--nats-url", f"nats://127.0.0.1:{nats_port}"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HOME": str(env_home)})
    base = f"http://127.0.0.1:{http_port}"
    try:
        wait_for(lambda: http_json(base + "/ready")[0] == 200, timeout=60, what="serve")
        auth_dir = env_home / ".pagemesh" / f"nats-{nats_port}"
        seed = auth_dir / "client.nk"
        assert seed.exists() and (seed.stat().st_mode & 0o077) == 0
        printed = (tmp_path / "serve.log").read_text()
        assert str(seed) in printed, printed

        async def scenario():
            try:
                await nats_py.connect(f"nats://127.0.0.1:{nats_port}", max_reconnect_attempts=0,
                                      allow_reconnect=False, connect_timeout=3)
                anonymous = "connected"
            except Exception as e:  # noqa: BLE001
                anonymous = str(e)
            assert "authorization violation" in anonymous.lower()
            nc = await nats_py.connect(f"nats://127.0.0.1:{nats_port}", nkeys_seed=str(seed))
            try:
                case = reference[0]
                chunks = await generate_on(nc, "pagemesh", case)
                assert "".join(c["text"] for c in chunks) == case["generated_text"]
            finally:
                await nc.close()

        run(scenario())
        assert completion(base, reference[0]) == reference[0]["generated_text"]
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()
    # serve stops the nats-server it started.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", nats_port), timeout=0.5).close()


async def generate_on(nc, prefix, case):
    body = {"prompt": case["prompt"], "temperature": 0, "max_tokens": len(case["generated_ids"])}
    answer = await read_generation(nc, prefix, body)
    assert isinstance(answer, list), answer
    return answer


def test_only_the_client_that_sent_a_request_can_abort_it(bus, secured_mesh):
    async def scenario():
        alice, bob = await bus.connect("alice"), await bus.connect("bob")
        try:
            async def run(request_id, aborter):
                inbox = bob.new_inbox()
                sub = await bob.subscribe(inbox)
                body = {"request_id": request_id, "prompt": "Once upon a time", "max_tokens": 400,
                        "ignore_eos": True, "temperature": 0}
                await bob.publish(f"{PREFIX}.generate", json.dumps(body).encode(), reply=inbox)
                chunks, aborted = [], False
                while True:
                    data = json.loads((await sub.next_msg(timeout=30)).data)
                    assert "error" not in data, data
                    chunks.append(data)
                    if not aborted:
                        await aborter.publish(f"{PREFIX}.abort", json.dumps({"request_id": request_id}).encode())
                        await aborter.flush()
                        aborted = True
                    if data.get("done"):
                        return chunks

            stolen = await run("bob-1", alice)
            assert stolen[-1]["finish_reason"] == "length", stolen[-1]
            assert sum(len(c["token_ids"]) for c in stolen) == 400
            own = await run("bob-2", bob)
            assert own[-1]["finish_reason"] == "abort", own[-1]
            assert not alice.violations and not bob.violations
        finally:
            await alice.close()
            await bob.close()

    before = invalid_count(secured_mesh, "scheduler", "abort")
    run(scenario())
    assert invalid_count(secured_mesh, "scheduler", "abort") > before
