"""docker-compose.yml, its config files under deploy/compose/, and the Dockerfile.

No Docker engine runs here, so nothing is built or started: the compose file
is parsed with PyYAML (anchors and merge keys resolved as Compose resolves
them) and each service's image, ports, dependencies and REMEDIATOR_*
wiring is checked by assertion. The Prometheus rules and the Alertmanager
configuration are checked with `promtool` and `amtool` from the Debian
packages that .ci/run installs. Outside CI, a missing tool skips its check.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from remediator.settings import GROUPS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
OURS = ("intake", "orchestrator", "detector", "temporal-setup")
EXPECTED_IMAGES = {
    "postgresql": "postgres",
    "temporal": "temporalio/auto-setup",
    "temporal-ui": "temporalio/ui",
    "prometheus": "prom/prometheus",
    "alertmanager": "prom/alertmanager",
    "opa": "openpolicyagent/opa",
}
# Container port each service listens on, as the others reach it.
SERVICE_PORTS = {
    "postgresql": 5432,
    "temporal": 7233,
    "temporal-ui": 8080,
    "prometheus": 9090,
    "alertmanager": 9093,
    "opa": 8181,
    "intake": 8080,
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _known_variables() -> set[str]:
    return {
        f"REMEDIATOR_{prefix}_{field.upper()}"
        for prefix, group in GROUPS.items()
        for field in group.model_fields
    }


def _default(value: str) -> str:
    """Resolve `${NAME:-default}` to its default, as Compose does when unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def _host_port(url_or_address: str) -> tuple[str, int]:
    if "://" not in url_or_address:
        url_or_address = f"grpc://{url_or_address}"
    parts = urlsplit(url_or_address)
    return parts.hostname, parts.port


def _published(service: dict) -> list[tuple[str, int, int]]:
    published = []
    for entry in service.get("ports", []):
        host, host_port, container_port = str(entry).split(":")
        published.append((host, int(host_port), int(container_port)))
    return published


def test_services_and_images(services):
    assert set(services) == set(EXPECTED_IMAGES) | set(OURS)
    for name, prefix in EXPECTED_IMAGES.items():
        image = services[name]["image"]
        repository, _, tag = image.partition(":")
        assert repository == prefix, name
        assert tag and tag != "latest", f"{name} must pin a tag"
        assert "build" not in services[name]
    for name in OURS:
        assert services[name]["build"] == "."
        assert services[name]["image"] == services["intake"]["image"]
        assert services[name]["user"] == "10001:10001"
        assert services[name]["read_only"] is True
        assert services[name]["cap_drop"] == ["ALL"]
        assert "/tmp" in services[name]["tmpfs"]


def test_ports_are_published_on_loopback_only(services):
    expected = {
        "temporal": [("127.0.0.1", 7233, 7233)],
        "temporal-ui": [("127.0.0.1", 8233, 8080)],
        "prometheus": [("127.0.0.1", 9090, 9090)],
        "alertmanager": [("127.0.0.1", 9093, 9093)],
        "opa": [("127.0.0.1", 8181, 8181)],
        "intake": [("127.0.0.1", 8080, 8080)],
    }
    for name, service in services.items():
        assert _published(service) == expected.get(name, []), name


def test_dependencies(services):
    expected = {
        "postgresql": {},
        "temporal": {"postgresql": "service_healthy"},
        "temporal-setup": {"temporal": "service_started"},
        "temporal-ui": {"temporal": "service_started"},
        "prometheus": {"alertmanager": "service_started"},
        "alertmanager": {"intake": "service_started"},
        "opa": {},
        "intake": {"temporal-setup": "service_completed_successfully"},
        "orchestrator": {
            "temporal-setup": "service_completed_successfully",
            "intake": "service_started",
            "opa": "service_started",
        },
        "detector": {"temporal-setup": "service_completed_successfully"},
    }
    for name, service in services.items():
        depends = {
            dependency: condition["condition"]
            for dependency, condition in service.get("depends_on", {}).items()
        }
        assert depends == expected[name], name
        for dependency, condition in depends.items():
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], dependency
            if condition == "service_completed_successfully":
                assert services[dependency]["restart"] == "no"


def test_remediator_environment_is_wired_between_services(services):
    known = _known_variables()
    for name in ("intake", "orchestrator", "detector"):
        environment = {k: _default(v) for k, v in services[name]["environment"].items()}
        assert set(environment) <= known, set(environment) - known

        host, port = _host_port(environment["REMEDIATOR_TEMPORAL_ADDRESS"])
        assert (host, port) == ("temporal", SERVICE_PORTS["temporal"])
        host, port = _host_port(environment["REMEDIATOR_INTAKE_URL"])
        assert (host, port) == ("intake", SERVICE_PORTS["intake"])
        host, port = _host_port(environment["REMEDIATOR_POLICY_OPA_URL"])
        assert (host, port) == ("opa", SERVICE_PORTS["opa"])
        assert environment["REMEDIATOR_POLICY_ENGINE"] == "opa"
        host, port = _host_port(environment["REMEDIATOR_PROMETHEUS_URL"])
        assert (host, port) == ("prometheus", SERVICE_PORTS["prometheus"])
        _, ui_port = _host_port(environment["REMEDIATOR_TEMPORAL_UI_URL"])
        assert ("127.0.0.1", ui_port, 8080) in _published(services["temporal-ui"])
        for key in environment:
            if key.endswith(("TOKEN", "API_KEY")):
                assert str(services[name]["environment"][key]).startswith("${"), key

    intake = services["intake"]["environment"]
    assert intake["REMEDIATOR_INTAKE_HOST"] == "0.0.0.0"
    assert int(intake["REMEDIATOR_INTAKE_PORT"]) == SERVICE_PORTS["intake"]
    for name in ("orchestrator", "detector"):
        environment = services[name]["environment"]
        assert environment["REMEDIATOR_WORKER_HEALTH_HOST"] == "0.0.0.0"
        health_port = environment["REMEDIATOR_WORKER_HEALTH_PORT"]
        assert f":{health_port}/readyz" in " ".join(
            services[name]["healthcheck"]["test"]
        )
        # 20 s graceful shutdown plus the 25 s heartbeat.
        assert services[name]["stop_grace_period"] == "60s"
    assert services["orchestrator"]["command"] == ["worker", "orchestrator"]
    assert services["detector"]["command"] == ["worker", "detection"]
    assert services["intake"]["command"] == ["serve"]
    work_dir = services["orchestrator"]["environment"]["REMEDIATOR_GIT_WORK_DIR"]
    assert any(
        volume.split(":")[1] == work_dir
        for volume in services["orchestrator"]["volumes"]
    )


def test_temporal_and_its_ui(services):
    temporal = services["temporal"]["environment"]
    assert temporal["DB"] == "postgres12"
    assert temporal["POSTGRES_SEEDS"] == "postgresql"
    postgres = services["postgresql"]["environment"]
    assert temporal["POSTGRES_USER"] == postgres["POSTGRES_USER"]
    assert temporal["POSTGRES_PWD"] == postgres["POSTGRES_PASSWORD"]
    ui = services["temporal-ui"]["environment"]
    assert _host_port(ui["TEMPORAL_ADDRESS"]) == ("temporal", 7233)
    setup = services["temporal-setup"]
    assert _host_port(setup["environment"]["TEMPORAL_ADDRESS"]) == ("temporal", 7233)
    script = setup["entrypoint"][-1]
    (mount,) = [v for v in setup["volumes"] if v.split(":")[1] == script]
    source = ROOT / mount.split(":")[0]
    assert source.is_file()
    names = set(re.findall(r"Remediation[A-Z][a-z]+", source.read_text()))
    from remediator.devserver import SEARCH_ATTRIBUTES

    assert names == set(SEARCH_ATTRIBUTES)


def test_opa_serves_the_policies(services):
    opa = services["opa"]
    assert opa["command"] == ["run", "--server", "--addr", "0.0.0.0:8181", "/policies"]
    assert "./policies:/policies:ro" in opa["volumes"]
    assert any((ROOT / "policies").glob("*.rego"))


def test_mounted_config_files_exist(services):
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source}"


def test_alertmanager_routes_to_the_intake():
    config = yaml.safe_load((ROOT / "deploy/compose/alertmanager.yml").read_text())
    receiver = config["route"]["receiver"]
    (receiving,) = [r for r in config["receivers"] if r["name"] == receiver]
    (webhook,) = receiving["webhook_configs"]
    parts = urlsplit(webhook["url"])
    assert (parts.hostname, parts.port, parts.path) == (
        "intake",
        SERVICE_PORTS["intake"],
        "/v1/alerts",
    )
    assert webhook["send_resolved"] is True
    assert set(config["route"]["group_by"]) == {"namespace", "app"}


def test_prometheus_scrapes_remediator_and_alerts_alertmanager(services):
    config = yaml.safe_load((ROOT / "deploy/compose/prometheus.yml").read_text())
    (alerting,) = config["alerting"]["alertmanagers"]
    assert alerting["static_configs"][0]["targets"] == ["alertmanager:9093"]
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    metrics_port = services["orchestrator"]["environment"][
        "REMEDIATOR_TEMPORAL_METRICS_PORT"
    ]
    assert targets == {
        "intake:8080",
        f"orchestrator:{metrics_port}",
        f"detector:{metrics_port}",
    }
    mounts = {v.split(":")[1] for v in services["prometheus"]["volumes"]}
    for rule_file in config["rule_files"]:
        assert rule_file in mounts


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing; .ci/run installs it from Debian")
        pytest.skip(f"{name} is not installed")
    return path


def test_promtool_accepts_the_alert_rules():
    result = subprocess.run(
        [_tool("promtool"), "check", "rules", "deploy/compose/alerts.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_amtool_accepts_the_alertmanager_config():
    result = subprocess.run(
        [_tool("amtool"), "check-config", "deploy/compose/alertmanager.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_and_non_root():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?", text, flags=re.MULTILINE)
    assert [image for image, _ in stages] == ["python:3.11-slim"] * 2
    assert "COPY --from=build /opt/venv /opt/venv" in text
    runtime = text.split("FROM python:3.11-slim AS runtime", 1)[1]
    assert re.search(r"apt-get install [^\n]*\bgit\b", runtime)
    (user,) = re.findall(r"^USER (\S+)", runtime, flags=re.MULTILINE)
    assert user.split(":")[0] not in ("0", "root")
    assert 'ENTRYPOINT ["remediator"]' in runtime
    assert "REMEDIATOR_POLICY_DIRECTORY=/app/policies" in runtime
    assert "COPY policies /app/policies" in runtime
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored
    assert ".git" in ignored
