"""Failover: with two executors, requests land on both; `kill -9` of one mid-stream and every
request still completes with text identical to a fault-free run, and the
survivor's pool is all free after the drain. The same for a detokenizer, and for a restart of
the NATS server. With no executor, requests wait (bounded) and then fail clearly."""

import asyncio

from conftest import MODEL, LinkCutter, Mesh, wait_for
from test_reference import generate_over_nats

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park", "A cat", "",
           "Tom said, \"Look at the big tree!\" Mia smiled."]


def bodies():
    # Greedy (a re-prefill is not bit-identical to the decode steps it replaces, so only greedy
    # output is certain to be identical), half of them with a frequency penalty: a moved request
    # must still count its earlier tokens as output.
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "temperature": 0, "frequency_penalty": 0.5 if i % 2 else 0,
             "max_tokens": 450, "ignore_eos": True}
            for i in range(24)]


def texts(results):
    out = []
    for chunks in results:
        assert isinstance(chunks, list), chunks
        assert [c["index"] for c in chunks] == list(range(len(chunks)))
        assert chunks[-1]["done"]
        out.append("".join(c["text"] for c in chunks))
    return out


def test_killing_an_executor_mid_stream_loses_nothing(nats):
    m = Mesh(nats, "failover", executors_in_process=0)
    try:
        first = m.start("executor", "--model", str(MODEL), "--threads", "1", "--executor-id", "e1")
        m.start("executor", "--model", str(MODEL), "--threads", "1", "--executor-id", "e2")
        m.wait_ready(executors=2)

        async def run_all():
            return await asyncio.gather(*(generate_over_nats(nats.url, "failover", b, timeout=120) for b in bodies()))

        fault_free = texts(asyncio.run(run_all()))

        async def run_with_kill():
            tasks = [asyncio.create_task(generate_over_nats(nats.url, "failover", b, timeout=120)) for b in bodies()]

            def both_busy():
                s = m.stats()
                busy = [e for e in s["executors"] if e["running"] > 0]
                return len(busy) == 2
            await asyncio.get_running_loop().run_in_executor(None, lambda: wait_for(both_busy, 30, "both executors busy"))
            first.kill(9)
            return await asyncio.gather(*tasks)

        after_kill = texts(asyncio.run(run_with_kill()))
        assert after_kill == fault_free
        wait_for(m.all_blocks_free, timeout=5, what="the survivor's pool to be free")
        s = m.stats()
        assert [e["executor_id"] for e in s["executors"]] == ["e2"]
        assert s["migrated_requests"] > 0, s
    finally:
        m.stop()


def test_killing_the_detokenizer_of_a_stream_loses_nothing(nats):
    m = Mesh(nats, "detokfail", serve_args=["--num-detokenizers", "0"])
    try:
        first = m.start("detokenizer", "--model", str(MODEL), "--detokenizer-id", "d1")
        m.start("detokenizer", "--model", str(MODEL), "--detokenizer-id", "d2")

        def two_detokenizers():
            return m.stats()["detokenizers"] == 2
        wait_for(two_detokenizers, 30, "two detokenizers")
        m.wait_ready()

        async def run_all():
            return await asyncio.gather(*(generate_over_nats(nats.url, "detokfail", b, timeout=120) for b in bodies()))

        fault_free = texts(asyncio.run(run_all()))

        async def run_with_kill():
            tasks = [asyncio.create_task(generate_over_nats(nats.url, "detokfail", b, timeout=120)) for b in bodies()]
            await asyncio.sleep(0.5)
            first.kill(9)
            return await asyncio.gather(*tasks)

        after_kill = asyncio.run(run_with_kill())
        assert texts(after_kill) == fault_free
        for chunks in after_kill:
            assert [c["index"] for c in chunks] == list(range(len(chunks))), "a chunk was lost"
        wait_for(m.all_blocks_free, timeout=5, what="all blocks free")
        assert m.stats()["detokenizers"] == 1
    finally:
        m.stop()


def run_with_link_cut(m, proxy, bodies, seconds=0.6):
    """Runs `bodies` over NATS, half of them started while `proxy`'s links are cut for
    `seconds` (the other half already streaming); returns every request's chunks."""
    async def run():
        first = [asyncio.create_task(generate_over_nats(m.nats.url, m.prefix, b, timeout=120))
                 for b in bodies[::2]]
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: wait_for(lambda: m.steps() > 20, 30, "requests under way"))
        proxy.cut()
        second = [asyncio.create_task(generate_over_nats(m.nats.url, m.prefix, b, timeout=120))
                  for b in bodies[1::2]]
        await asyncio.sleep(seconds)
        proxy.restore()
        done = await asyncio.gather(*first, *second)
        half = len(first)
        out = [None] * len(bodies)
        out[::2], out[1::2] = done[:half], done[half:]
        return out
    return asyncio.run(run())


def short_bodies():
    return [{**b, "max_tokens": 120} for b in bodies()[:12]]


def test_a_detokenizer_that_reconnects_late_loses_nothing(nats):
    # Its events (stream openings, tokens) published while it was away are gone: it must get
    # them again, and every stream must end with the text of a fault-free run.
    m = Mesh(nats, "latedetok", serve_args=["--num-detokenizers", "0"])
    proxy = LinkCutter(nats)
    try:
        m.start("detokenizer", "--model", str(MODEL), "--detokenizer-id", "d1", nats_url=proxy.url)
        wait_for(lambda: m.stats()["detokenizers"] == 1, 30, "the detokenizer")
        m.wait_ready()

        async def run_all():
            return await asyncio.gather(*(generate_over_nats(nats.url, m.prefix, b, timeout=120)
                                          for b in short_bodies()))
        fault_free = texts(asyncio.run(run_all()))
        assert m.stats()["stream_resends"] == 0
        assert texts(run_with_link_cut(m, proxy, short_bodies())) == fault_free
        wait_for(m.all_blocks_free, timeout=10, what="all blocks free")
        s = m.stats()
        assert s["detokenizers"] == 1
        # Openings sent while it was away were lost: the streams were sent again.
        assert s["stream_resends"] > 0, s
    finally:
        m.stop()
        proxy.stop()


def test_an_executor_that_reconnects_late_loses_nothing(nats):
    # Step commands or their answers lost while it was away: no request waits for them.
    m = Mesh(nats, "lateexec", executors_in_process=0)
    proxy = LinkCutter(nats)
    try:
        m.start("executor", "--model", str(MODEL), "--threads", "1", "--executor-id", "e1", nats_url=proxy.url)
        m.wait_ready()

        async def run_all():
            return await asyncio.gather(*(generate_over_nats(nats.url, m.prefix, b, timeout=120)
                                          for b in short_bodies()))
        fault_free = texts(asyncio.run(run_all()))
        assert texts(run_with_link_cut(m, proxy, short_bodies())) == fault_free
        wait_for(m.all_blocks_free, timeout=10, what="all blocks free")
        assert [e["executor_id"] for e in m.stats()["executors"]] == ["e1"]
    finally:
        m.stop()
        proxy.stop()


def test_the_mesh_survives_a_nats_restart():
    from conftest import NatsServer, http_json
    own = NatsServer()
    m = Mesh(own, "reconnect")
    try:
        m.wait_ready()
        body = {"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        status, before = http_json(m.base + "/v1/completions", body)
        assert status == 200
        own.proc.terminate()
        own.proc.wait(timeout=10)
        import subprocess
        own.proc = subprocess.Popen(["nats-server", "-a", "127.0.0.1", "-p", str(own.port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        m.wait_ready(timeout=60)
        status, after = http_json(m.base + "/v1/completions", body)
        assert status == 200, after
        assert after["choices"][0]["text"] == before["choices"][0]["text"]
    finally:
        m.stop()
        own.stop()


def test_without_executors_requests_wait_then_fail_or_run_when_one_comes(nats):
    m = Mesh(nats, "noexec", serve_args=["--unplaced-timeout-s", "4"], executors_in_process=0)
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0}
        result = asyncio.run(generate_over_nats(nats.url, "noexec", body, timeout=30))
        assert result["error"]["kind"] == "unavailable", result

        async def late_executor():
            task = asyncio.create_task(generate_over_nats(nats.url, "noexec", body, timeout=60))
            await asyncio.sleep(0.5)
            m.start("executor", "--model", str(MODEL), "--threads", "1")
            return await task

        chunks = asyncio.run(late_executor())
        assert isinstance(chunks, list) and chunks[-1]["done"], chunks
        assert "".join(c["text"] for c in chunks).startswith(", there was")
    finally:
        m.stop()
