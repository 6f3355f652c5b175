"""A step larger than one NATS message still runs: on a nats-server whose `max_payload` is 12 KiB,
eight requests with 500-entry `logit_bias` each start in the same step (their parameters go to
the executor with their first step, about 4 KB each), so the step goes in parts and is put
together by the executor. Every request completes, with the text it gets when it runs alone."""

import asyncio
import socket
import subprocess
import tempfile
from pathlib import Path

import nats as nats_py

from conftest import MODEL, Mesh, free_port, read_generation, wait_for

MAX_PAYLOAD = 12 * 1024


class SmallPayloadNats:
    def __init__(self):
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="pagemesh-nats-"))
        conf = self.dir / "nats.conf"
        conf.write_text(f"listen: 127.0.0.1:{self.port}\nmax_payload: {MAX_PAYLOAD}\n")
        self.proc = subprocess.Popen(["nats-server", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for(lambda: socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close() or True,
                 what="nats-server")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def bodies():
    # A bias for 500 of the model's 512 tokens; each request favours its own token, so each has
    # its own text.
    return [{"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0,
             "logit_bias": {str(t): (100.0 if t == 40 + 7 * k else -0.25) for t in range(3, 503)}}
            for k in range(8)]


def text(answer):
    assert isinstance(answer, list), answer
    return "".join(c["text"] for c in answer)


async def alone(url, prefix):
    nc = await nats_py.connect(url)
    try:
        return [text(await read_generation(nc, prefix, b, timeout=60)) for b in bodies()]
    finally:
        await nc.close()


async def together(url, prefix, start_executor):
    """Sends every request while no executor is there, then starts one: all of them are
    placed at once, in its first step."""
    nc = await nats_py.connect(url)
    try:
        tasks = [asyncio.create_task(read_generation(nc, prefix, b, timeout=60)) for b in bodies()]
        await asyncio.sleep(1.0)
        await asyncio.get_running_loop().run_in_executor(None, start_executor)
        return [text(a) for a in await asyncio.gather(*tasks)]
    finally:
        await nc.close()


def test_a_step_over_the_servers_max_payload_goes_in_parts_and_every_request_completes():
    nats = SmallPayloadNats()
    prefix = "bigstep"
    m = Mesh(nats, prefix, executors_in_process=0)
    executor = ["--model", str(MODEL), "--threads", "1"]
    try:
        first = m.start("executor", *executor, "--executor-id", "e1")
        m.wait_ready()
        one_by_one = asyncio.run(alone(nats.url, prefix))
        assert len(set(one_by_one)) > 1, "the biases should give the requests different texts"
        assert m.stats()["steps_sent_in_parts"] == 0
        first.stop()
        wait_for(lambda: not m.stats()["executors"], timeout=10, what="the executor to leave")

        def start_second():
            m.start("executor", *executor, "--executor-id", "e2")
        at_once = asyncio.run(together(nats.url, prefix, start_second))
        assert at_once == one_by_one
        assert m.stats()["steps_sent_in_parts"] >= 1, "no step needed parts: the test did not test"
        assert [e["executor_id"] for e in m.stats()["executors"]] == ["e2"]
        wait_for(m.all_blocks_free, timeout=10, what="the pool to be free")
    finally:
        m.stop()
        nats.stop()
