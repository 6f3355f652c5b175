"""The rest of the HTTP API: chat completions through the openai client (with a model that has a
chat template), tokenize/detokenize, models, API keys, logprobs, batched prompts."""

import json
import shutil

import httpx
import openai
import pytest

from conftest import MODEL, Mesh, http_json, wait_for

TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}{{ m['content'] }}"
            "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def chat_mesh(nats, tmp_path_factory):
    model = tmp_path_factory.mktemp("models") / "stories-chat"
    shutil.copytree(MODEL, model, ignore=shutil.ignore_patterns("llama2c", "tools", "verification"))
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    m = Mesh(nats, "chat", serve_args=["--api-key", "sekret"], model=model)
    m.wait_ready()
    yield m
    m.stop()


def test_chat_completions_render_the_template_and_stream(chat_mesh):
    c = openai.OpenAI(base_url=chat_mesh.base + "/v1", api_key="sekret")
    messages = [{"role": "user", "content": "Once upon a time"}]
    r = c.chat.completions.create(model="stories-chat", messages=messages, max_tokens=30, temperature=0)
    assert r.choices[0].message.role == "assistant"
    # The template renders "<s>Once upon a time": the same ids as the plain prompt, so the same text.
    plain = c.completions.create(model="stories-chat", prompt="Once upon a time", max_tokens=30, temperature=0)
    assert r.choices[0].message.content == plain.choices[0].text
    assert r.usage.prompt_tokens == 5
    streamed, roles = "", []
    for chunk in c.chat.completions.create(model="stories-chat", messages=messages, max_tokens=30, temperature=0,
                                           stream=True):
        delta = chunk.choices[0].delta
        roles.append(delta.role)
        streamed += delta.content or ""
    assert roles[0] == "assistant"
    assert streamed == plain.choices[0].text


def test_chat_without_max_tokens_runs_to_a_stop_or_the_context(chat_mesh):
    c = openai.OpenAI(base_url=chat_mesh.base + "/v1", api_key="sekret")
    r = c.chat.completions.create(model="stories-chat", messages=[{"role": "user", "content": "Hi"}],
                                  temperature=0, stop=["."])
    assert r.choices[0].finish_reason == "stop"
    assert "." not in r.choices[0].message.content


def test_api_keys_are_enforced(chat_mesh):
    status, body = http_json(chat_mesh.base + "/v1/models")
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, body = http_json(chat_mesh.base + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert status == 401
    status, body = http_json(chat_mesh.base + "/v1/models", headers={"Authorization": "Bearer sekret"})
    assert status == 200 and body["data"][0]["id"] == "stories-chat"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=chat_mesh.base + "/v1", api_key="nope").models.list()


def test_tokenize_detokenize_and_models(mesh, reference):
    case = reference[0]
    status, body = http_json(mesh.base + "/tokenize", {"prompt": case["prompt"]})
    assert status == 200 and body["tokens"] == case["prompt_ids"] and body["count"] == len(case["prompt_ids"])
    status, body = http_json(mesh.base + "/detokenize", {"tokens": case["generated_ids"][:10]})
    assert status == 200 and case["generated_text"].startswith(body["prompt"].lstrip())
    status, body = http_json(mesh.base + "/detokenize", {"tokens": [10**6]})
    assert status == 400
    models = openai.OpenAI(base_url=mesh.base + "/v1", api_key="x").models.list()
    assert [m.id for m in models.data] == ["stories260K"]
    r = httpx.get(mesh.base + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]


def logit_gaps(pairs):
    """Values sorted high to low, as gaps below the highest: log-softmax and raw logits agree on
    these."""
    values = sorted(pairs, reverse=True)
    return [v - values[0] for v in values]


def test_completion_logprobs_follow_the_openai_format_and_the_reference_logits(mesh, reference):
    client = openai.OpenAI(base_url=mesh.base + "/v1", api_key="x")
    for case in reference[:3]:
        positions = case["first_decode_positions_top5"]
        kwargs = dict(model="stories260K", prompt=case["prompt_ids"], max_tokens=len(positions), temperature=0,
                      logprobs=5)
        choice = client.completions.create(**kwargs).choices[0]
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(positions)
        # Token texts (leading spaces included) add up to the text, and offsets follow them.
        assert "".join(lp.tokens) == choice.text == case["generated_text"][:len(choice.text)]
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        for k, position in enumerate(positions):
            top = lp.top_logprobs[k]
            assert 1 <= len(top) <= 5
            # Greedy: the chosen token is the most likely one, and is listed with its logprob.
            assert lp.token_logprobs[k] == max(top.values()) == top[lp.tokens[k]] <= 0
            # The gaps between the alternatives are those between the reference's logits.
            reference_gaps = logit_gaps(v for _, v in position["top5"])[:len(top)]
            assert logit_gaps(top.values()) == pytest.approx(reference_gaps, abs=1e-4)
        # Streamed, the same objects arrive a token at a time, offsets continuing across chunks.
        streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for chunk in client.completions.create(**kwargs, stream=True):
            if chunk.choices and chunk.choices[0].logprobs:
                for key in streamed:
                    streamed[key] += getattr(chunk.choices[0].logprobs, key)
        assert streamed == {key: getattr(lp, key) for key in streamed}


def test_chat_logprobs_list_tokens_with_bytes_and_alternatives(chat_mesh):
    client = openai.OpenAI(base_url=chat_mesh.base + "/v1", api_key="sekret")
    kwargs = dict(model="stories-chat", messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=8,
                  temperature=0, logprobs=True, top_logprobs=3)
    choice = client.chat.completions.create(**kwargs).choices[0]
    content = choice.logprobs.content
    assert len(content) == 8
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert t.bytes == list(t.token.encode())
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob <= 0
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
    streamed = [t for chunk in client.chat.completions.create(**kwargs, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.content]
    assert streamed == content
    # Without `logprobs`, none.
    plain = client.chat.completions.create(**{**kwargs, "logprobs": None, "top_logprobs": None}).choices[0]
    assert plain.logprobs is None and plain.message.content == choice.message.content


def test_a_list_of_prompts_fans_out_into_n_choices_per_prompt_in_order(mesh, reference):
    client = openai.OpenAI(base_url=mesh.base + "/v1", api_key="x")
    cases = reference[:3]
    max_tokens = 12
    for prompts in ([c["prompt"] for c in cases], [c["prompt_ids"] for c in cases]):
        kwargs = dict(model="stories260K", prompt=prompts, max_tokens=max_tokens, temperature=0, n=2)
        r = client.completions.create(**kwargs)
        assert [c.index for c in r.choices] == list(range(2 * len(cases)))
        for choice in r.choices:
            # Choice k * n + s is sample s of prompt k: greedy, the reference's text for that prompt.
            expected = cases[choice.index // 2]["generated_text"]
            assert choice.text and expected.startswith(choice.text), (choice.index, choice.text)
            assert choice.finish_reason == "length"
        assert r.usage.prompt_tokens == sum(len(c["prompt_ids"]) for c in cases)
        assert r.usage.completion_tokens == 2 * len(cases) * max_tokens
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        # Streamed: the same choices, one finish per choice, one usage chunk at the very end.
        texts, finishes, usages, ids = {}, {}, [], set()
        for chunk in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
            assert not usages, "nothing follows the usage chunk"
            ids.add(chunk.id)
            if chunk.usage:
                usages.append(chunk.usage)
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
                if c.finish_reason:
                    assert c.index not in finishes
                    finishes[c.index] = c.finish_reason
        assert texts == {c.index: c.text for c in r.choices}
        assert finishes == {c.index: "length" for c in r.choices}
        assert usages == [r.usage]
        assert len(ids) == 1 and ids.pop().startswith("cmpl-")
    wait_for(mesh.all_blocks_free, timeout=5.0, what="blocks freed after the batched requests")


def test_a_batched_request_that_fails_or_is_dropped_frees_every_block(mesh):
    client = openai.OpenAI(base_url=mesh.base + "/v1", api_key="x", max_retries=0)
    too_long = "once upon a time " * 400
    wait_for(mesh.all_blocks_free, timeout=5.0, what="an idle mesh")
    steps_before = mesh.steps()
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="stories260K", prompt=["Once upon a time", too_long, "Lily"],
                                  max_tokens=300, extra_body={"ignore_eos": True})
    assert "prompt" in refused.value.message
    wait_for(mesh.all_blocks_free, timeout=5.0, what="the other prompts aborted after the error")
    # Run to the end, the other two prompts would have taken 300 steps.
    assert mesh.steps() - steps_before < 150
    steps_before = mesh.steps()
    with httpx.Client(timeout=30) as h:
        body = {"model": "stories260K", "prompt": ["Once upon a time", "Lily", "The cat"], "max_tokens": 400,
                "ignore_eos": True, "stream": True}
        with h.stream("POST", mesh.base + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = (line for line in r.iter_lines() if line.startswith("data: "))
            indices = {json.loads(next(events)[6:])["choices"][0]["index"] for _ in range(6)}
            assert indices <= {0, 1, 2} and mesh.stats()["requests"] == 3
    wait_for(mesh.all_blocks_free, timeout=2.0, what="every prompt aborted after the disconnect")
    assert mesh.steps() - steps_before < 200
    for prompt, why in (([], "empty"), (["a", 3], "mixed"), ([[1, 2], []], "empty ids")):
        status, answer = http_json(mesh.base + "/v1/completions", {"model": "stories260K", "prompt": prompt})
        assert status == 400 and answer["error"]["param"] == "prompt", why


def test_logit_bias_steers_greedy_decoding_and_bad_biases_are_refused(mesh, reference):
    client = openai.OpenAI(base_url=mesh.base + "/v1", api_key="x", max_retries=0)
    case = reference[0]
    best, runner_up = (token for token, _ in case["first_decode_positions_top5"][0]["top5"][:2])
    kwargs = dict(model="stories260K", prompt=case["prompt_ids"], max_tokens=1, temperature=0, logprobs=2)
    plain = client.completions.create(**kwargs).choices[0].logprobs
    # -100 on the reference's first token: greedy takes the runner-up instead. The reported
    # logprobs stay the model's, so the chosen token is the second most likely one listed.
    biased = client.completions.create(**kwargs, logit_bias={str(best): -100}).choices[0].logprobs
    ranked = sorted(plain.top_logprobs[0], key=plain.top_logprobs[0].get, reverse=True)
    assert plain.tokens[0] == ranked[0] and biased.tokens[0] == ranked[1]
    assert biased.top_logprobs[0] == plain.top_logprobs[0]
    # +100 on one token: it is chosen at every step (the same token text four times), where
    # greedy decoding alone follows the reference.
    forced = client.completions.create(**{**kwargs, "max_tokens": 4, "logprobs": 0},
                                       logit_bias={str(runner_up + 7): 100}).choices[0]
    tokens = forced.logprobs.tokens
    assert len(tokens) == 4 and len(set(tokens)) == 1 and "".join(tokens) == forced.text
    status, alone = http_json(mesh.base + "/detokenize", {"tokens": [runner_up + 7]})
    assert status == 200 and tokens[0].strip() == alone["prompt"].strip()
    assert not case["generated_text"].startswith(forced.text)
    for bias, why in (({"abc": 1}, "not an id"), ({str(best): 101}, "over 100"), ({"99999": 1}, "out of vocabulary")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(**kwargs, logit_bias=bias)
        assert "logit_bias" in refused.value.message, why


def test_stop_strings_can_stay_in_the_text_and_special_tokens_can_show(mesh, reference):
    client = openai.OpenAI(base_url=mesh.base + "/v1", api_key="x")
    case = reference[0]
    text, stop = case["generated_text"], "Lily"
    at = text.index(stop)
    kwargs = dict(model="stories260K", prompt=case["prompt"], max_tokens=40, temperature=0, stop=[stop])
    for stream in (False, True):
        def run(**extra):
            r = client.completions.create(**kwargs, stream=stream, extra_body=extra)
            if not stream:
                return r.choices[0].text, r.choices[0].finish_reason
            chunks = [c.choices[0] for c in r if c.choices]
            return "".join(c.text for c in chunks), chunks[-1].finish_reason
        assert run() == (text[:at], "stop")
        assert run(include_stop_str_in_output=True) == (text[:at + len(stop)], "stop")
    # The model emits BOS (a special token) in this case: left out of the text by default,
    # shown with skip_special_tokens false; the text before it is the same either way.
    case = next(c for c in reference if c["runc_bos_stop_index"] is not None)
    kwargs = dict(model="stories260K", prompt=case["prompt_ids"], max_tokens=case["runc_bos_stop_index"] + 3,
                  temperature=0)
    plain = client.completions.create(**kwargs).choices[0].text
    shown = client.completions.create(**kwargs, extra_body={"skip_special_tokens": False}).choices[0].text
    assert "<s>" not in plain and case["generated_text"].startswith(plain)
    assert "<s>" in shown and shown[:shown.index("<s>")] == plain[:shown.index("<s>")]


def test_continuous_usage_stats_count_tokens_as_they_stream(mesh, reference):
    client = openai.OpenAI(base_url=mesh.base + "/v1", api_key="x")
    kwargs = dict(model="stories260K", prompt=[c["prompt"] for c in reference[:2]], max_tokens=10, n=2,
                  temperature=0, stream=True)
    chunks = list(client.completions.create(**kwargs, stream_options={"include_usage": True,
                                                                      "continuous_usage_stats": True}))
    final = chunks[-1].usage
    assert not chunks[-1].choices and final.completion_tokens == 2 * 2 * 10
    running = [c.usage for c in chunks[:-1]]
    assert all(u is not None for u in running)
    completions = [u.completion_tokens for u in running]
    assert completions == sorted(completions) and completions[0] > 0
    assert running[-1] == final
    assert all(u.total_tokens == u.prompt_tokens + u.completion_tokens for u in running)
    # Without it, only the last chunk carries usage.
    plain = list(client.completions.create(**kwargs, stream_options={"include_usage": True}))
    assert [c.usage is not None for c in plain] == [False] * (len(plain) - 1) + [True]
    assert plain[-1].usage == final
