"""A late step answer never lands on the executor registered after it: a fake executor (nats-py,
speaking the internal protocol) takes a step, goes silent until the scheduler drops it,
registers again under the same id and incarnation (a healed partition), and only then answers
the old step with a failure. The scheduler drops that answer and counts it as stale; the
request, now running on the new registration, is failed only by its own step's answer."""

import asyncio

import msgpack
import nats as nats_py

from conftest import INTERNAL_PROTOCOL_VERSION, MODEL, Mesh, read_generation, wait_for

INCARNATION = 77


def registration(taken):
    # `taken`: the newest step taken, as [session, step]: the scheduler sends a step again
    # when an executor's heartbeats show it never took it.
    return {"executor_id": "fake", "model": MODEL.name, "block_size": 16, "num_device_blocks": 64,
            "num_host_blocks": 64, "incarnation": INCARNATION, "protocol_version": INTERNAL_PROTOCOL_VERSION,
            "step_taken": taken}


def answer(step_msg, message):
    # A step goes with its fields by position: [incarnation, step, session, plan].
    step = msgpack.unpackb(step_msg.data)[1]
    return msgpack.packb({"incarnation": INCARNATION, "step": step, "reply": {"Failed": message}})


async def scenario(m, prefix):
    nc = await nats_py.connect(m.nats.url)
    steps = asyncio.Queue()
    taken = [None]

    async def on_step(msg):
        _, step, session, _ = msgpack.unpackb(msg.data)
        taken[0] = [session, step]
        steps.put_nowait(msg)
    await nc.subscribe(f"{prefix}.v1.executor.fake.step", cb=on_step)
    beating = asyncio.Event()
    beating.set()

    async def beat():
        while True:
            await beating.wait()
            await nc.publish(f"{prefix}.v1.executor.heartbeat", msgpack.packb(registration(taken[0])))
            await asyncio.sleep(0.2)
    beater = asyncio.create_task(beat())
    loop = asyncio.get_running_loop()

    def executors():
        return len(m.stats()["executors"])
    try:
        await loop.run_in_executor(None, lambda: wait_for(lambda: executors() == 1, 20, "the fake executor"))
        generation = asyncio.create_task(read_generation(nc, prefix, {"prompt": "Once upon a time", "max_tokens": 8},
                                                         timeout=60))
        first = await asyncio.wait_for(steps.get(), 20)

        # Silent: the scheduler drops it (heartbeat timeout 1 s) while the step is unanswered.
        beating.clear()
        await loop.run_in_executor(None, lambda: wait_for(lambda: executors() == 0, 10, "the executor dropped"))
        # Back after the quarantine (2 × the heartbeat timeout): the request is placed on it again.
        await asyncio.sleep(2.5)
        beating.set()
        second = await asyncio.wait_for(steps.get(), 20)

        # The answer to the first step arrives now, late.
        await nc.publish(first.reply, answer(first, "late failure of the dropped executor's step"))
        await loop.run_in_executor(
            None, lambda: wait_for(lambda: m.stats()["stale_step_replies"] == 1, 10, "the late answer counted"))
        await asyncio.sleep(0.5)
        assert not generation.done(), await generation

        # The step now running fails: that ends the request, with that step's message.
        await nc.publish(second.reply, answer(second, "failure of the current step"))
        result = await asyncio.wait_for(generation, 20)
        return result
    finally:
        beater.cancel()
        await nc.close()


def test_a_late_step_answer_is_dropped_not_applied_to_the_executor_registered_since(nats):
    prefix = "stale"
    m = Mesh(nats, prefix, serve_args=["--heartbeat-timeout-ms", "1000"], executors_in_process=0)
    try:
        result = asyncio.run(scenario(m, prefix))
        assert isinstance(result, dict), result
        assert "failure of the current step" in result["error"]["message"], result
        wait_for(lambda: m.stats()["requests"] == 0, 10, "the request released")
    finally:
        m.stop()
