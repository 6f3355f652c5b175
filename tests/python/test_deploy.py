"""The deployment files, checked with the tools that run here: Debian's docker-compose
validates and resolves docker-compose.yml (and the GPU override), and the Grafana dashboard
and provisioning are checked against each other and against the compose mounts. (No Docker
engine and no Grafana run here; Prometheus runs for real in test_metrics.py.)
"""

import json
import shutil
import subprocess

import pytest
import yaml

from conftest import ROOT

MONITORING = ROOT / "monitoring"
GRAFANA = MONITORING / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "pagemesh.json"
PAGEMESH_SERVICES = ["scheduler", "tokenizer", "detokenizer", "executor", "gateway"]


def compose(*args, env_file=".env.example"):
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose is not on PATH (Debian: apt-get install --no-install-recommends docker-compose)"
    env = ["--env-file", env_file] if env_file else []
    return subprocess.run([tool, *env, *args], cwd=ROOT, capture_output=True, text=True)


def resolved(*files):
    args = [a for f in files for a in ("-f", f)]
    run = compose(*args, "config")
    assert run.returncode == 0, run.stderr
    return yaml.safe_load(run.stdout)


@pytest.fixture(scope="module")
def config():
    return resolved("docker-compose.yml")


@pytest.fixture(scope="module")
def gpu_config():
    return resolved("docker-compose.yml", "docker-compose.gpu.yml")


def test_compose_files_validate():
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]):
        args = [a for f in files for a in ("-f", f)]
        run = compose(*args, "config", "-q")
        assert run.returncode == 0, run.stderr


def test_the_bus_is_configured_by_pagemesh_nats_config(config, tmp_path):
    """NATS runs with the configuration `pagemesh nats-config` writes (accounts, per-role NKey
    users) before it starts; every service logs in with its role's seed from that folder."""
    services = config["services"]
    auth = services["nats-auth"]
    assert auth["image"] == "pagemesh:cpu" and auth["command"][0] == "nats-config"
    assert auth["command"][auth["command"].index("--out") + 1] == "/nats-auth"
    nats = services["nats"]
    assert nats["command"][:2] == ["-c", "/nats-auth/nats.conf"]
    assert nats["depends_on"]["nats-auth"]["condition"] == "service_completed_successfully"
    assert mounts(nats)["/nats-auth"] == mounts(auth)["/nats-auth"]
    for name in PAGEMESH_SERVICES:
        assert services[name]["environment"]["PAGEMESH_NATS_AUTH_DIR"] == "/nats-auth", name
        assert any(v.startswith(mounts(auth)["/nats-auth"] + ":/nats-auth:ro") for v in services[name]["volumes"])
        assert not any(k in services[name]["environment"] for k in ("PAGEMESH_NATS_USER", "PAGEMESH_NATS_PASSWORD"))
    # The configuration the image would write is one nats-server accepts.
    from conftest import BIN
    listen = auth["command"][auth["command"].index("--listen") + 1]
    subprocess.run([str(BIN), "nats-config", "--out", str(tmp_path), "--listen", listen], check=True,
                   capture_output=True)
    check = subprocess.run(["nats-server", "-c", str(tmp_path / "nats.conf"), "-t"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_dockerfile_has_the_stages_compose_builds():
    stages = {line.split()[-1] for line in (ROOT / "Dockerfile").read_text().splitlines()
              if line.upper().startswith("FROM ") and " AS " in line.upper()}
    assert {"build", "cpu", "cuda"} <= stages
    last = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.upper().startswith("FROM ")][-1]
    assert last.split()[-1] == "cpu", "a plain `docker build .` must give the CPU image"


def test_every_service_runs_from_the_image_with_metrics_and_a_healthcheck(config):
    services = config["services"]
    assert set(services) >= {"nats", "nats-auth", "model", *PAGEMESH_SERVICES, "prometheus", "grafana"}
    for name in PAGEMESH_SERVICES:
        s = services[name]
        assert s["image"] == "pagemesh:cpu" and s["build"]["dockerfile"] == "Dockerfile", name
        assert s["build"]["target"] == "cpu", name
        assert s["command"][0] == name
        assert s["environment"]["PAGEMESH_METRICS_PORT"] == "9100"
        assert s["environment"]["PAGEMESH_NATS_URL"] == "nats://nats:4222"
        assert s["healthcheck"]["test"][0] == "CMD"
        assert s["depends_on"]["nats"]["condition"] == "service_healthy"
    for name in ["scheduler", "tokenizer", "detokenizer", "executor"]:
        assert services[name]["depends_on"]["model"]["condition"] == "service_completed_successfully"
    for name in ["nats", "prometheus", "grafana"]:
        assert "healthcheck" in services[name], name
    assert services["gateway"]["depends_on"]["scheduler"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_executors_scale(config):
    """`--scale executor=N` needs no fixed container name and no host port."""
    executor = config["services"]["executor"]
    assert "container_name" not in executor
    assert "ports" not in executor
    assert "9100" in [str(p) for p in executor.get("expose", [])]
    # Prometheus finds every replica by DNS.
    prom = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "pagemesh-executor")
    assert job["dns_sd_configs"][0]["names"] == ["executor"] and job["dns_sd_configs"][0]["port"] == 9100


def test_gpu_override_reserves_a_gpu_per_executor(gpu_config, config):
    executor = gpu_config["services"]["executor"]
    assert executor["image"] == "pagemesh:cuda"
    assert executor["build"]["dockerfile"] == "Dockerfile" and executor["build"]["target"] == "cuda"
    assert "--device" in executor["command"] and executor["command"][executor["command"].index("--device") + 1] == "cuda"
    devices = executor["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # Only the executor changes.
    def normalized(service):
        return {**service, "volumes": sorted(service.get("volumes", []))}
    for name in ["gateway", "scheduler", "tokenizer", "detokenizer"]:
        assert normalized(gpu_config["services"][name]) == normalized(config["services"][name])


def mounts(service):
    return {v.split(":")[1]: v.split(":")[0] for v in service["volumes"] if isinstance(v, str)}


def test_prometheus_and_grafana_get_the_monitoring_files(config):
    prom = mounts(config["services"]["prometheus"])
    assert prom["/etc/prometheus/prometheus.yml"].endswith("monitoring/prometheus.yml")
    assert prom["/etc/prometheus/alerts.yml"].endswith("monitoring/alerts.yml")
    grafana = config["services"]["grafana"]
    gmounts = mounts(grafana)
    assert gmounts["/etc/grafana/provisioning"].endswith("monitoring/grafana/provisioning")
    dashboards_dir = "/var/lib/grafana/dashboards"
    assert gmounts[dashboards_dir].endswith("monitoring/grafana/dashboards")
    # The provider loads that directory, and the home dashboard is ours: visible with no clicks.
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "pagemesh.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == dashboards_dir
    env = grafana["environment"]
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{dashboards_dir}/{DASHBOARD.name}"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    # The datasource points at the compose Prometheus.
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_the_dashboard_is_a_valid_grafana_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert isinstance(dashboard["uid"], str) and 0 < len(dashboard["uid"]) <= 40
    assert dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 20
    for p in graphs:
        assert p["title"], p
        assert p["type"] in {"timeseries", "stat", "table", "gauge", "bargauge", "heatmap"}, p["type"]
        assert p["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
        assert p["targets"], p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == uid, p["title"]
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, p["title"]
    for var in dashboard["templating"]["list"]:
        assert var["datasource"]["uid"] == uid
    # What the issue asks the dashboard to show, by the metrics behind it.
    exprs = " ".join(t["expr"] for p in graphs for t in p["targets"])
    for metric in ["pagemesh_generation_tokens_total", "pagemesh_time_to_first_token_seconds_bucket",
                   "pagemesh_inter_token_latency_seconds_bucket", "pagemesh_e2e_request_latency_seconds_bucket",
                   "pagemesh_requests_waiting", "pagemesh_kv_usage_ratio", "pagemesh_preemptions_total",
                   "pagemesh_blocks_swapped_out_total", "pagemesh_migrations_total",
                   "pagemesh_prefix_cache_hit_tokens_total", "pagemesh_step_batch_sequences_bucket",
                   "pagemesh_step_batch_tokens_bucket", "pagemesh_request_errors_total",
                   "pagemesh_requests_rejected_total"]:
        assert metric in exprs, metric
