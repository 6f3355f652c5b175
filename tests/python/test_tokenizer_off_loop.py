"""Tokenizing long prompts does not stall step dispatch: `pagemesh serve` runs the scheduler and
the tokenizer in one process, and the tokenizer's CPU work runs on a blocking pool, off the
event loop that sends steps. While huge prompts are being tokenized, a running stream keeps
getting its tokens: its longest pause stays well under the time one such prompt takes to
tokenize (both measured in the same run)."""

import asyncio
import json
import time

import nats as nats_py

# About 900 KB of text: well past the context (it is refused after tokenization, with a 400),
# and well inside NATS's 1 MiB message limit.
HUGE_PROMPT = "Once upon a time, there was a little dog who liked to play in the park. " * 12_500


async def timed_error(nc, prefix, body):
    """Sends one request and returns (seconds until its answer, the answer)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    started = time.monotonic()
    await nc.publish(f"{prefix}.generate", json.dumps(body).encode(), reply=inbox)
    answer = json.loads((await sub.next_msg(timeout=120)).data)
    return time.monotonic() - started, answer


async def stream_gaps(nc, prefix, started_streaming, stop_after):
    """Streams long greedy requests one after the other until `stop_after` is set, and returns
    the arrival times of all their chunks."""
    arrivals = []
    body = {"prompt": "The little dog", "max_tokens": 480, "ignore_eos": True, "temperature": 0, "stream": True}
    while not stop_after.is_set():
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(f"{prefix}.generate", json.dumps(body).encode(), reply=inbox)
        while True:
            chunk = json.loads((await sub.next_msg(timeout=60)).data)
            assert "error" not in chunk, chunk
            arrivals.append(time.monotonic())
            if len(arrivals) == 20:
                started_streaming.set()
            if chunk.get("done"):
                break
        await sub.unsubscribe()
    return arrivals


async def scenario(url, prefix):
    nc = await nats_py.connect(url, max_reconnect_attempts=0)
    try:
        # One huge prompt alone: how long tokenizing it takes here.
        alone, answer = await timed_error(nc, prefix, {"prompt": HUGE_PROMPT, "max_tokens": 4})
        assert answer.get("error", {}).get("kind") == "invalid_request", answer
        started_streaming, done = asyncio.Event(), asyncio.Event()
        streaming = asyncio.create_task(stream_gaps(nc, prefix, started_streaming, done))
        await asyncio.wait_for(started_streaming.wait(), 60)
        window_start = time.monotonic()
        huge = await asyncio.gather(*(timed_error(nc, prefix, {"prompt": HUGE_PROMPT, "max_tokens": 4})
                                      for _ in range(4)))
        window_end = time.monotonic()
        done.set()
        arrivals = await asyncio.wait_for(streaming, 60)
        return alone, huge, arrivals, window_start, window_end
    finally:
        await nc.close()


def test_tokenizing_huge_prompts_does_not_stall_a_running_stream(nats, mesh):
    alone, huge, arrivals, start, end = asyncio.run(scenario(nats.url, mesh.prefix))
    assert all(a.get("error", {}).get("kind") == "invalid_request" for _, a in huge), huge
    # Every pause of the stream that overlaps the time the huge prompts were being tokenized.
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:]) if b >= start and a <= end]
    assert arrivals[-1] > end and len(gaps) >= 2, "the stream did not run through the whole window"
    worst = max(gaps)
    # On the event loop, one huge prompt would hold every step for its whole tokenization.
    assert worst < alone / 2, (f"the stream paused {worst:.3f} s while prompts that take {alone:.3f} s "
                               f"each to tokenize were tokenized")
