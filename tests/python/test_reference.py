"""Every reference case through the official `openai` client (completions, temperature 0,
stream and non-stream) and through nats-py on `<prefix>.generate` returns exactly the
reference text."""

import asyncio

import nats as nats_py
import openai

from conftest import read_generation


def client(mesh):
    return openai.OpenAI(base_url=mesh.base + "/v1", api_key="unused")


def test_completions_non_stream_match_the_reference(mesh, reference):
    c = client(mesh)
    for case in reference:
        r = c.completions.create(model="stories260K", prompt=case["prompt"], temperature=0,
                                 max_tokens=len(case["generated_ids"]))
        assert r.choices[0].text == case["generated_text"], case["prompt"]
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(case["prompt_ids"])
        assert r.usage.completion_tokens == len(case["generated_ids"])


def test_completions_stream_match_the_reference(mesh, reference):
    c = client(mesh)
    for case in reference:
        text, finish = "", None
        for event in c.completions.create(model="stories260K", prompt=case["prompt"], temperature=0,
                                          max_tokens=len(case["generated_ids"]), stream=True):
            text += event.choices[0].text
            finish = event.choices[0].finish_reason or finish
        assert text == case["generated_text"], case["prompt"]
        assert finish == "length"


async def generate_over_nats(url, prefix, body, timeout=60):
    nc = await nats_py.connect(url)
    try:
        return await read_generation(nc, prefix, body, timeout)
    finally:
        await nc.close()


def test_nats_generate_matches_the_reference(mesh, reference):
    async def run():
        for case in reference:
            chunks = await generate_over_nats(mesh.nats.url, mesh.prefix, {
                "prompt": case["prompt"], "temperature": 0, "max_tokens": len(case["generated_ids"])})
            assert isinstance(chunks, list), chunks
            assert [c["index"] for c in chunks] == list(range(len(chunks)))
            assert "".join(c["text"] for c in chunks) == case["generated_text"]
            assert [t for c in chunks for t in c["token_ids"]] == case["generated_ids"]
            assert chunks[0]["prompt_token_ids"] == case["prompt_ids"]
            assert chunks[-1]["finish_reason"] == "length"
            assert chunks[-1]["usage"]["completion_tokens"] == len(case["generated_ids"])
    asyncio.run(run())
