"""`--model` with a Hugging Face Hub id, resolved from a Hugging Face cache laid out like the
real one (blobs named by hash, snapshot files linking to them, a ref naming the commit). There
is no network here: these tests cover the cache and offline paths; a real download is not
exercised.
"""

import hashlib
import json
import os
import subprocess

import pytest

from conftest import BIN, MODEL, Mesh, http_json

REPO = "pagemesh-test/stories260K"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
FILES = ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
         "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf")
    repo = home / "hub" / ("models--" + REPO.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in FILES:
        data = (MODEL / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs" / "main").write_text(COMMIT)
    return home


def run(args, hf_home, offline=True):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1" if offline else "0"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([str(BIN), *args], env=env, capture_output=True, text=True, timeout=120)


def snapshot_dir(hf_home):
    return hf_home / "hub" / ("models--" + REPO.replace("/", "--")) / "snapshots" / COMMIT


def test_fetch_finds_the_cached_snapshot_offline_and_online(hf_home):
    for offline in (True, False):
        # Cached and complete: no network is needed either way (none is reachable here).
        r = run(["fetch", "--model", REPO], hf_home, offline=offline)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == str(snapshot_dir(hf_home))
    r = run(["fetch", "--model", f"{REPO}@{COMMIT}"], hf_home)
    assert r.returncode == 0 and r.stdout.strip() == str(snapshot_dir(hf_home)), r.stderr


def test_an_uncached_model_offline_is_a_clear_error(hf_home):
    r = run(["fetch", "--model", "pagemesh-test/absent"], hf_home)
    assert r.returncode == 1
    assert "pagemesh-test/absent" in r.stderr and "HF_HUB_OFFLINE" in r.stderr
    r = run(["fetch", "--model", f"{REPO}@other-branch"], hf_home)
    assert r.returncode == 1 and "HF_HUB_OFFLINE" in r.stderr


def test_generate_from_a_hub_id_equals_generate_from_the_directory(hf_home, tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}) + "\n")
    outputs = []
    for model in (REPO, str(MODEL)):
        out = tmp_path / f"out-{len(outputs)}.jsonl"
        r = run(["generate", "--model", model, "--input", str(prompts), "--output", str(out), "--threads", "1"],
                hf_home)
        assert r.returncode == 0, r.stderr
        outputs.append([json.loads(line)["outputs"][0]["token_ids"] for line in out.read_text().splitlines()])
    assert outputs[0] == outputs[1] and len(outputs[0][0]) == 24


def test_a_mesh_serves_a_hub_id_under_its_repository_name(nats, hf_home, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mesh = Mesh(nats, "hub", model=REPO)
    try:
        mesh.wait_ready()
        status, body = http_json(mesh.base + "/v1/models")
        assert status == 200 and [m["id"] for m in body["data"]] == ["stories260K"]
        status, body = http_json(mesh.base + "/v1/completions",
                                 {"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 8})
        assert status == 200 and body["usage"]["completion_tokens"] == 8
    finally:
        mesh.stop()
