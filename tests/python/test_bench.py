"""`pagemesh bench serve` against real meshes: its report must add up and agree with the
workload that `pagemesh bench sim` draws from the same seed."""

import json
import subprocess

import pytest

from conftest import BIN, ROOT, Mesh, wait_for

LLAMA2_TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "llama2-32k" / "tokenizer.json"


def run_json(*args, timeout=300):
    out = subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def workload_output_tokens(workload, n, seed, max_model_len):
    """Tokens the workload asks for, as `bench sim` (same generator, same seed) sees them."""
    sim = run_json("bench", "sim", "--model", "llama-2-7b", "--gpu", "a100-80gb", "--workload", workload,
                   "--num-requests", str(n), "--seed", str(seed), "--max-model-len", str(max_model_len), "--json")
    assert sim["completed"] == n and sim["failed"] == 0
    return round(sim["mean_output_len"] * n)


def check_report(r, n):
    assert r["completed"] + r["failed"] == r["num_prompts"] == n
    assert r["failed"] == 0, r["errors"]
    assert r["duration_s"] > 0
    assert r["request_throughput"] == pytest.approx(r["completed"] / r["duration_s"])
    assert r["output_throughput"] == pytest.approx(r["total_output_tokens"] / r["duration_s"])
    assert r["total_token_throughput"] == pytest.approx(
        (r["total_input_tokens"] + r["total_output_tokens"]) / r["duration_s"])
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < r[f"median_{name}_ms"] <= r[f"p99_{name}_ms"], (name, r)
        assert r[f"mean_{name}_ms"] > 0
    assert r["median_ttft_ms"] <= r["median_e2el_ms"]
    assert r["p99_e2el_ms"] <= r["duration_s"] * 1000


@pytest.fixture(scope="module")
def model_110m(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama-110m")
    subprocess.run([str(BIN), "synth-model", "--preset", "llama-110m", "--dtype", "bf16", "--tokenizer",
                    str(LLAMA2_TOKENIZER), "--output", str(out)], check=True, capture_output=True, timeout=120)
    return out


def test_bench_serve_over_http_against_the_110m_model(nats, model_110m):
    mesh = Mesh(nats, "bench110", model=model_110m, serve_args=["--max-model-len", "256"])
    try:
        mesh.wait_ready()
        r = run_json("bench", "serve", "--url", mesh.base, "--workload", "alpaca", "--num-prompts", "6",
                     "--max-concurrency", "3", "--seed", "3", "--max-model-len", "256", "--json")
        check_report(r, 6)
        assert r["backend"] == "openai"
        assert r["total_output_tokens"] == workload_output_tokens("alpaca", 6, 3, 256)
        wait_for(mesh.all_blocks_free, timeout=10, what="all blocks free")
    finally:
        mesh.stop()


def test_bench_serve_over_nats_against_sim_executors(nats):
    mesh = Mesh(nats, "benchsim", serve_args=["--device", "sim", "--sim-model", "llama-2-7b",
                                              "--sim-gpu", "h100-80gb", "--sim-time-scale", "0.05"])
    try:
        mesh.wait_ready()
        r = run_json("bench", "serve", "--backend", "nats", "--nats-url", nats.url, "--subject-prefix", "benchsim",
                     "--workload", "sharegpt", "--num-prompts", "60", "--request-rate", "40", "--seed", "5",
                     "--max-model-len", "512", "--json")
        check_report(r, 60)
        assert r["backend"] == "nats"
        assert r["total_output_tokens"] == workload_output_tokens("sharegpt", 60, 5, 512)
        sim = run_json("bench", "sim", "--model", "llama-2-7b", "--gpu", "h100-80gb", "--num-requests", "1", "--json")
        assert mesh.stats()["executors"][0]["device_blocks_total"] == sim["num_device_blocks"], \
            "the executor's pool is what the simulated GPU holds"
        wait_for(mesh.all_blocks_free, timeout=10, what="all blocks free")
    finally:
        mesh.stop()


def test_bench_serve_reports_failures_instead_of_hiding_them(nats, mesh):
    r = run_json("bench", "serve", "--url", mesh.base, "--model", "no-such-model", "--workload", "alpaca",
                 "--num-prompts", "3", "--max-model-len", "256", "--json")
    assert (r["completed"], r["failed"]) == (0, 3)
    assert any("404" in e for e in r["errors"]), r["errors"]


def test_bench_sim_prints_the_fields_scripts_depend_on():
    runs = {}
    for allocator in ("paged", "contiguous"):
        runs[allocator] = run_json("bench", "sim", "--model", "llama-2-13b", "--gpu", "a100-80gb", "--workload",
                                   "sharegpt", "--num-requests", "500", "--request-rate", "20",
                                   "--allocator", allocator, "--seed", "4", "--json")
    for r in runs.values():
        assert r["completed"] == 500 and r["failed"] == 0
        assert 0 < r["kv_utilization"] <= 1
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"]
        assert r["tpot_p50_s"] > 0 and r["output_tokens_per_s"] > 0 and r["scheduler_us_per_step"] > 0
        assert isinstance(r["peak_running"], int) and isinstance(r["preemptions"], int)
    paged, contiguous = runs["paged"], runs["contiguous"]
    assert paged["kv_utilization"] >= 0.96 > contiguous["kv_utilization"]
    assert paged["peak_running"] > contiguous["peak_running"]
    assert contiguous["preemptions"] == 0


def test_bench_commands_refuse_bad_flags_with_a_message():
    for args, words in ((["sim", "--model", "llama-2-13b", "--gpu", "v100"], "unknown GPU"),
                        (["sim", "--model", "gpt-9", "--gpu", "a100-80gb"], "unknown model"),
                        (["sim", "--model", "llama-2-13b", "--gpu", "24gb"], "no room"),
                        (["sim", "--model", "llama-2-7b", "--gpu", "a100-80gb", "--workload", "/nonexistent.jsonl"],
                         "cannot read workload"),
                        (["serve", "--url", "http://127.0.0.1:9", "--num-prompts", "1"], "cannot list models")):
        out = subprocess.run([str(BIN), "bench", *args], capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and words in out.stderr, (args, out.stderr)
        assert "panicked" not in out.stderr
