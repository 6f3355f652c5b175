"""The rest of the HTTP API: chat completions through the openai client (with a model that has a
chat template), tokenize/detokenize, models, API keys."""

import json
import shutil

import httpx
import openai
import pytest

from conftest import MODEL, Mesh, http_json

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
