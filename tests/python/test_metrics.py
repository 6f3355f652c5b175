"""Metrics, seen for real: every service of the mesh runs as its own process with its own
/metrics port, a real Prometheus (the Debian package) scrapes them with the project's
monitoring/prometheus.yml and alert rules (addresses rewritten for loopback), and the openai
client sends traffic. Also checks that every metric the Grafana dashboard and the alert rules
name is in the live output, that every dashboard query returns data, and promtool's verdict
on monitoring/.
"""

import json
import re
import shutil
import subprocess
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from openai import OpenAI

from conftest import MODEL, ROOT, Process, free_port, http_json, wait_for

MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "pagemesh.json"
PREFIX = "metrics"
SERVICES = ["gateway", "tokenizer", "scheduler", "executor", "detokenizer"]


def tool(name):
    path = shutil.which(name)
    assert path, f"{name} is not on PATH (Debian: apt-get install --no-install-recommends prometheus)"
    return path


def get_text(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


class SplitMesh:
    """Each service in its own process, each with a /metrics port; two executors with small
    KV pools so that requests get preempted."""

    def __init__(self, nats):
        common = ["--nats-url", nats.url, "--subject-prefix", PREFIX]
        self.http_port = free_port()
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.metrics_ports = {}
        self.processes = []

        def start(service, name, *args):
            port = free_port()
            self.metrics_ports.setdefault(service, []).append(port)
            self.processes.append(Process([service, *common, "--metrics-port", str(port), "--metrics-host",
                                           "127.0.0.1", *args], f"{name}-{PREFIX}"))

        model = ["--model", str(MODEL)]
        start("scheduler", "scheduler", *model)
        start("tokenizer", "tokenizer", *model)
        start("detokenizer", "detokenizer", *model)
        for i in range(2):
            start("executor", f"executor{i}", *model, "--threads", "1", "--num-device-blocks", "48",
                  "--executor-id", f"exec-{i}")
        start("gateway", "gateway", "--host", "127.0.0.1", "--port", str(self.http_port))

        def ready():
            status, body = http_json(self.base + "/ready")
            return status == 200 and body["executors"] == 2
        wait_for(ready, timeout=60, what="the split mesh")

    def metrics_urls(self):
        return {service: [f"http://127.0.0.1:{p}/metrics" for p in ports]
                for service, ports in self.metrics_ports.items()}

    def stop(self):
        for p in self.processes:
            p.stop()


class Prometheus:
    """A real Prometheus with the project's configuration, its targets rewritten to loopback."""

    def __init__(self, mesh, data_dir):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = loopback_config(mesh, self.port)
        path = data_dir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.log = open(data_dir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={path}", f"--storage.tsdb.path={data_dir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: urllib.request.urlopen(self.base + "/-/ready", timeout=1).status == 200,
                 timeout=60, what="prometheus")

    def api(self, path, **params):
        query = urllib.parse.urlencode(params)
        body = json.loads(get_text(f"{self.base}/api/v1/{path}?{query}"))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr):
        return self.api("query", query=expr)["result"]

    def value(self, expr):
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.log.close()


def loopback_config(mesh, prometheus_port):
    """monitoring/prometheus.yml with every job's targets replaced by the test's loopback ports
    (service discovery included), a 1 s scrape interval and the rule file by absolute path."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update({"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"})
    config["rule_files"] = [str(MONITORING / f) for f in config["rule_files"]]
    ports = {f"pagemesh-{service}": ports for service, ports in mesh.metrics_ports.items()}
    ports["prometheus"] = [prometheus_port]
    jobs = [job["job_name"] for job in config["scrape_configs"]]
    assert sorted(jobs) == sorted(ports), f"monitoring/prometheus.yml scrapes {jobs}; the mesh runs {sorted(ports)}"
    for job in config["scrape_configs"]:
        for key in [k for k in job if k.endswith("_sd_configs") or k == "static_configs"]:
            del job[key]
        job["static_configs"] = [{"targets": [f"127.0.0.1:{p}" for p in ports[job["job_name"]]]}]
    return config


@pytest.fixture(scope="module")
def split_mesh(nats):
    mesh = SplitMesh(nats)
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def prometheus(split_mesh, tmp_path_factory):
    prom = Prometheus(split_mesh, tmp_path_factory.mktemp("prometheus"))
    yield prom
    prom.stop()


LONG_PROMPT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park "
               "with her friends and her big red ball.")


@pytest.fixture(scope="module")
def traffic(split_mesh, prometheus):
    """Concurrent long requests (streamed and not) until Prometheus has seen KV usage; returns
    the tokens the client was told about."""
    client = OpenAI(base_url=split_mesh.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    totals = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    lock = threading.Lock()
    errors = []

    def one(i):
        prompt = LONG_PROMPT if i % 4 == 0 else f"Story {i}: {LONG_PROMPT}"
        try:
            if i % 2:
                stream = client.completions.create(model="stories260K", prompt=prompt, max_tokens=400, stream=True,
                                                   stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                usage = [c.usage for c in stream if c.usage][-1]
            else:
                usage = client.completions.create(model="stories260K", prompt=prompt, max_tokens=400,
                                                  extra_body={"ignore_eos": True}).usage
            with lock:
                totals["requests"] += 1
                totals["prompt_tokens"] += usage.prompt_tokens
                totals["completion_tokens"] += usage.completion_tokens
        except Exception as e:  # reported below, with the others
            errors.append(e)

    for round_ in range(5):
        threads = [threading.Thread(target=one, args=(round_ * 12 + i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert not errors, errors
        if (prometheus.value("max(max_over_time(pagemesh_kv_usage_ratio[5m]))") or 0) > 0:
            break
    # The same prompt twice in a row: the second finds the first's blocks in the prefix cache.
    one(0)
    one(0)
    assert not errors, errors
    # The tokenizer's other operations, for their latency series.
    assert http_json(split_mesh.base + "/tokenize", {"prompt": "Once upon a time"})[0] == 200
    assert http_json(split_mesh.base + "/detokenize", {"tokens": [1, 403, 407]})[0] == 200
    # Wait until Prometheus has scraped the end of the traffic from every service.
    for expr, expected in [
        ("sum(pagemesh_generation_tokens_total)", totals["completion_tokens"]),
        ("sum(pagemesh_executor_step_seconds_count) > 0", None),
        ('sum(pagemesh_requests_finished_total{finish_reason="length"})', totals["requests"]),
        ('sum(pagemesh_http_requests_total{endpoint="/detokenize"})', 1),
        ('sum(pagemesh_tokenizer_duration_seconds_count{operation="detokenize"})', 1),
    ]:
        wait_for(lambda: (v := prometheus.value(expr)) is not None and (expected is None or v == expected),
                 timeout=30, what=f"Prometheus to scrape {expr} = {expected}")
    return totals


def metric_names(text):
    """Names of the samples in Prometheus text output."""
    return {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M)}


def live_names(mesh):
    names = set()
    for urls in mesh.metrics_urls().values():
        for url in urls:
            names |= metric_names(get_text(url))
    return names


def dashboard_exprs():
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def alert_exprs():
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def referenced_metrics(exprs):
    return {m for e in exprs for m in re.findall(r"\bpagemesh_[a-z0-9_]+", e)}


def test_prometheus_scrapes_every_service_and_sees_the_traffic(split_mesh, prometheus, traffic):
    targets = prometheus.api("targets")["activeTargets"]
    jobs = sorted(t["labels"]["job"] for t in targets)
    assert jobs == sorted(["prometheus", "pagemesh-gateway", "pagemesh-tokenizer", "pagemesh-scheduler",
                           "pagemesh-executor", "pagemesh-executor", "pagemesh-detokenizer"]), jobs
    assert all(t["health"] == "up" for t in targets), [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets]

    # Counters agree with what the client was told.
    assert prometheus.value("sum(pagemesh_generation_tokens_total)") == traffic["completion_tokens"] > 0
    assert prometheus.value("sum(pagemesh_prompt_tokens_total)") == traffic["prompt_tokens"] > 0
    assert prometheus.value("sum(pagemesh_requests_received_total)") == traffic["requests"]
    assert prometheus.value('sum(pagemesh_requests_finished_total{finish_reason="length"})') == traffic["requests"]
    assert prometheus.value('sum(pagemesh_http_requests_total{endpoint="/v1/completions",status="200"})') == \
        traffic["requests"]
    # One first token per request; quantiles in a plausible range.
    assert prometheus.value("sum(pagemesh_time_to_first_token_seconds_count)") == traffic["requests"]
    p99 = prometheus.value("histogram_quantile(0.99, sum by (le) (pagemesh_time_to_first_token_seconds_bucket))")
    assert 0 < p99 < 120
    assert prometheus.value("sum(pagemesh_inter_token_latency_seconds_count)") > 0
    # KV usage per executor: both executors' series, and usage seen while requests ran.
    per_executor = prometheus.query("pagemesh_kv_usage_ratio")
    assert sorted(r["metric"]["executor"] for r in per_executor) == ["exec-0", "exec-1"]
    assert 0 < prometheus.value("max(max_over_time(pagemesh_kv_usage_ratio[5m]))") <= 1
    assert prometheus.value('max(pagemesh_kv_blocks_capacity{executor="exec-0"})') == 48
    # Small pools and long requests: requests were preempted and swapped.
    assert prometheus.value("sum(pagemesh_preemptions_total)") > 0
    assert prometheus.value("sum(pagemesh_blocks_swapped_out_total)") > 0
    # The repeated prompt hit the prefix cache.
    assert prometheus.value("sum(pagemesh_prefix_cache_hit_tokens_total)") > 0
    # Batches of more than one sequence ran.
    assert prometheus.value("max(histogram_quantile(0.99, sum by (le, executor) (pagemesh_step_batch_sequences_bucket)))") > 1
    # The executors' own step timing, and every process's build info.
    assert prometheus.value("sum(pagemesh_executor_step_seconds_count)") > 0
    services = {r["metric"]["service"] for r in prometheus.query("pagemesh_build_info")}
    assert services == set(SERVICES)
    # What Prometheus saw, for the log (`pytest -s`).
    p50 = prometheus.value("histogram_quantile(0.5, sum by (le) (pagemesh_time_to_first_token_seconds_bucket))")
    print(f"\nprometheus: {len(targets)}/{len(targets)} targets up; {traffic['requests']} requests, "
          f"{traffic['prompt_tokens']} prompt and {traffic['completion_tokens']} generated tokens; "
          f"TTFT p50 {p50:.3f} s, p99 {p99:.3f} s; "
          f"peak KV usage {prometheus.value('max(max_over_time(pagemesh_kv_usage_ratio[5m]))'):.2f}; "
          f"{prometheus.value('sum(pagemesh_preemptions_total)'):.0f} preemptions, "
          f"{prometheus.value('sum(pagemesh_blocks_swapped_out_total)'):.0f} blocks swapped out; "
          f"{prometheus.value('sum(pagemesh_prefix_cache_hit_tokens_total)'):.0f} prefix-cache hit tokens")


def test_every_metric_of_the_dashboard_and_alerts_is_exported(split_mesh, traffic):
    live = live_names(split_mesh)
    for suffix in ("_bucket", "_sum", "_count"):
        live |= {n[: -len(suffix)] for n in live if n.endswith(suffix)}
    referenced = referenced_metrics(dashboard_exprs() + alert_exprs())
    assert len(referenced) >= 30
    missing = sorted(referenced - live)
    assert not missing, f"named in monitoring/ but not exported: {missing}"


def test_every_defined_metric_is_exported_and_documented(split_mesh, traffic):
    """The names in pagemesh_shared::metrics: all in the live output, all in the docs."""
    defined = set(re.findall(r'pub const [A-Z0-9_]+: &str = "(pagemesh_[a-z0-9_]+)";',
                             (ROOT / "shared" / "src" / "metrics.rs").read_text()))
    assert len(defined) >= 40
    live = live_names(split_mesh)
    for suffix in ("_bucket", "_sum", "_count"):
        live |= {n[: -len(suffix)] for n in live if n.endswith(suffix)}
    assert not sorted(defined - live), f"defined but not exported: {sorted(defined - live)}"
    assert not sorted({n for n in live if n.startswith("pagemesh_")} - defined - {
        n + s for n in defined for s in ("_bucket", "_sum", "_count")}), "exported but not defined"
    docs = (ROOT / "docs" / "observability.md").read_text()
    assert not [n for n in defined if f"`{n}`" not in docs], "metrics missing from docs/observability.md"


def test_every_dashboard_query_returns_data(prometheus, traffic):
    empty = []
    for expr in dashboard_exprs():
        concrete = expr.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$executor", ".*")
        if not prometheus.query(concrete):
            empty.append(expr)
    assert not empty, f"dashboard queries with no data: {empty}"


# The queries of vLLM's Grafana dashboard (vllm-project/vllm,
# examples/online_serving/prometheus_grafana/grafana.json, read 2026-12-02), one per panel target,
# with its `$model_name` template variable and `$__rate_interval`.
VLLM_DASHBOARD = [
    *[f'histogram_quantile({q}, sum by(le) (rate(vllm:e2e_request_latency_seconds_bucket{{model_name="$model_name"}}[$__rate_interval])))'
      for q in ("0.99", "0.95", "0.9", "0.5")],
    'rate(vllm:e2e_request_latency_seconds_sum{model_name="$model_name"}[$__rate_interval])\n/\n'
    'rate(vllm:e2e_request_latency_seconds_count{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:prompt_tokens_total{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:generation_tokens_total{model_name="$model_name"}[$__rate_interval])',
    *[f'histogram_quantile({q}, sum by(le) (rate(vllm:time_per_output_token_seconds_bucket{{model_name="$model_name"}}[$__rate_interval])))'
      for q in ("0.99", "0.95", "0.9", "0.5")],
    'rate(vllm:time_per_output_token_seconds_sum{model_name="$model_name"}[$__rate_interval])\n/\n'
    'rate(vllm:time_per_output_token_seconds_count{model_name="$model_name"}[$__rate_interval])',
    'vllm:num_requests_running{model_name="$model_name"}',
    'vllm:num_requests_waiting{model_name="$model_name"}',
    *[f'histogram_quantile({q}, sum by(le) (rate(vllm:time_to_first_token_seconds_bucket{{model_name="$model_name"}}[$__rate_interval])))'
      for q in ("0.99", "0.95", "0.9", "0.5")],
    'rate(vllm:time_to_first_token_seconds_sum{model_name="$model_name"}[$__rate_interval])\n/\n'
    'rate(vllm:time_to_first_token_seconds_count{model_name="$model_name"}[$__rate_interval])',
    'vllm:gpu_cache_usage_perc{model_name="$model_name"}',
    'sum by(le) (increase(vllm:request_prompt_tokens_bucket{model_name="$model_name"}[$__rate_interval]))',
    'sum by(le) (increase(vllm:request_generation_tokens_bucket{model_name="$model_name"}[$__rate_interval]))',
    'sum by(finished_reason) (increase(vllm:request_success_total{model_name="$model_name"}[$__rate_interval]))',
    'rate(vllm:request_queue_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_prefill_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_decode_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_max_num_generation_tokens_sum{model_name="$model_name"}[$__rate_interval])',
]
# The dashboard's `model_name` variable: label_values({__name__=~"vllm:.*"}, model_name).
VLLM_MODEL_NAMES = 'count by (model_name) ({__name__=~"vllm:.*"})'


def test_every_query_of_vllms_dashboard_returns_data(prometheus, traffic):
    models = {r["metric"]["model_name"] for r in prometheus.query(VLLM_MODEL_NAMES)}
    assert models == {MODEL.name}, models
    # 1m is what Grafana makes of $__rate_interval at this scrape interval (4 scrapes and more).
    empty = [expr for expr in VLLM_DASHBOARD
             if not prometheus.query(expr.replace("$model_name", MODEL.name).replace("$__rate_interval", "1m"))]
    assert not empty, f"vLLM dashboard queries with no data: {empty}"
    # The vLLM view is the same samples as pagemesh's own.
    assert prometheus.value("sum(vllm:generation_tokens_total)") == traffic["completion_tokens"]
    assert prometheus.value(f'sum(vllm:request_success_total{{finished_reason="length",model_name="{MODEL.name}"}})') \
        == traffic["requests"]


def test_alert_rules_are_loaded_and_evaluated(prometheus, traffic):
    groups = prometheus.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {r["name"] for r in rules} >= {"PagemeshExecutorDown", "PagemeshKvCacheFull", "PagemeshWaitingQueueGrowing",
                                          "PagemeshTimeToFirstTokenHigh", "PagemeshPreemptionStorm",
                                          "PagemeshRequestsRejected"}
    wait_for(lambda: all(r["health"] == "ok" for g in prometheus.api("rules")["groups"] for r in g["rules"]),
             timeout=20, what="every rule to evaluate")
    # Nothing is down, so no availability alert fires.
    firing = [a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"]
    assert "PagemeshExecutorDown" not in firing and "PagemeshServiceDown" not in firing


def test_a_lost_executor_is_counted_and_its_requests_migrate(split_mesh, prometheus, traffic):
    """Kill an executor under load: the scheduler counts it lost and its requests moved."""
    client = OpenAI(base_url=split_mesh.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    results = []

    def one(i):
        r = client.completions.create(model="stories260K", prompt=f"Tale {i}: {LONG_PROMPT}", max_tokens=300,
                                      extra_body={"ignore_eos": True})
        results.append(r.usage.completion_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    victim = next(p for p in split_mesh.processes if p.name.startswith("executor1"))

    def busy():
        status, body = http_json(split_mesh.base + "/stats")
        return any(e["executor_id"] == "exec-1" and e["running"] > 0 for e in body["executors"])
    wait_for(busy, timeout=30, what="requests running on exec-1")
    victim.kill()
    for t in threads:
        t.join(timeout=180)
    assert results == [300] * 8
    wait_for(lambda: prometheus.value("sum(pagemesh_executors_lost_total)") == 1, timeout=30, what="the loss")
    assert prometheus.value('sum(pagemesh_migrations_total{executor="exec-1"})') > 0
    wait_for(lambda: prometheus.value('up{job="pagemesh-executor"} == 0') is not None, timeout=30,
             what="the dead executor's target down")


def test_promtool_accepts_the_monitoring_config_and_rules():
    promtool = tool("promtool")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                 ["test", "rules", "tests/alerts_test.yml"]):
        run = subprocess.run([promtool, *args], cwd=MONITORING, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr


def test_nats_reconnects_are_counted():
    """`pagemesh serve` answers /metrics on its API port; a NATS restart shows as a reconnect."""
    from conftest import Mesh, NatsServer

    def reconnects(mesh):
        text = get_text(mesh.base + "/metrics")
        # `serve` connects once per service role; the scheduler's connection stands for them.
        found = re.search(r'^pagemesh_nats_reconnects_total\{service="scheduler"\} (\d+)', text, re.M)
        assert found, text
        return int(found.group(1))

    own = NatsServer()
    mesh = Mesh(own, "metricsreconnect")
    try:
        mesh.wait_ready()
        assert reconnects(mesh) == 0
        own.proc.terminate()
        own.proc.wait(timeout=10)
        own.proc = subprocess.Popen(["nats-server", "-a", "127.0.0.1", "-p", str(own.port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mesh.wait_ready(timeout=60)
        wait_for(lambda: reconnects(mesh) >= 1, timeout=30, what="the reconnect to be counted")
    finally:
        mesh.stop()
        own.stop()


def sample(text, name, **labels):
    """The value of one sample in Prometheus text output (None when absent)."""
    for line in text.splitlines():
        found = re.match(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
        if not found or found.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', found.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(found.group(3))
    return None


def test_429s_and_aborts_are_counted(nats):
    """A full queue refuses with 429 and a client that goes away aborts its request: both show
    in the counters the alert and the dashboard use."""
    import asyncio

    import httpx
    from conftest import Mesh

    mesh = Mesh(nats, "metrics429", serve_args=["--max-waiting-requests", "1", "--max-num-seqs", "1"])
    try:
        mesh.wait_ready()
        body = {"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0,
                "ignore_eos": True}

        async def burst():
            async with httpx.AsyncClient(timeout=120) as h:
                return await asyncio.gather(*(h.post(mesh.base + "/v1/completions", json=body) for _ in range(6)))

        codes = [r.status_code for r in asyncio.run(burst())]
        refused = codes.count(429)
        assert refused > 0 and 200 in codes, codes
        text = get_text(mesh.base + "/metrics")
        assert sample(text, "pagemesh_requests_rejected_total", model="stories260K") == refused
        assert sample(text, "pagemesh_request_errors_total", model="stories260K", kind="overloaded") == refused
        assert sample(text, "pagemesh_http_requests_total", endpoint="/v1/completions", status="429") == refused
        assert sample(text, "pagemesh_requests_aborted_total", model="stories260K") == 0

        # A streaming client that leaves after its first chunk.
        with httpx.Client(timeout=60) as h:
            with h.stream("POST", mesh.base + "/v1/completions", json={**body, "max_tokens": 400, "stream": True}) as r:
                assert r.status_code == 200
                next(r.iter_lines())
        wait_for(lambda: sample(get_text(mesh.base + "/metrics"), "pagemesh_requests_aborted_total",
                                model="stories260K") == 1, timeout=30, what="the abort to be counted")
        text = get_text(mesh.base + "/metrics")
        assert sample(text, "pagemesh_requests_finished_total", model="stories260K", finish_reason="abort") == 1
        assert sample(text, "pagemesh_requests_finished_total", model="stories260K",
                      finish_reason="length") == codes.count(200)
    finally:
        mesh.stop()
