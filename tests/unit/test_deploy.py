"""The Kubernetes manifests under deploy/: rendered, schema-checked and audited.

Rendering: a real Kustomize build, `kubectl kustomize DIR` (kubectl ships
Kustomize; it is part of this machine image) or a standalone `kustomize
build DIR`, whichever is on PATH. Without either, the base is read from its
own files: the `resources` it lists and its `configMapGenerator` env file,
without hash suffixes or image rewrites. The overlay tests need Kustomize's
patches, so they are skipped then, with the reason; .ci/run does not
install Kustomize, because no registry this project uses ships it.

Validation: every built-in object is checked with `kubernetes-validate` in
strict mode (unknown fields rejected) against the newest Kubernetes version
the installed package ships schemas for. The ServiceMonitor and the KEDA
ScaledObjects are custom resources without bundled schemas, so their
structure is checked by assertion. Assertions then cover the GPU pinning,
RBAC verbs, probes, security contexts, disruption budgets, and the wiring of
settings, ports and selectors between the objects.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import timedelta
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from remediator.settings import GROUPS, TemporalSettings
from workers.orchestrator import GRACEFUL_SHUTDOWN

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "base"
OVERLAYS = {
    "cpu-only": DEPLOY / "overlays" / "cpu-only",
    "production": DEPLOY / "overlays" / "production",
}
CUSTOM_KINDS = {"ServiceMonitor", "ScaledObject"}
WORKERS = ("remediator-orchestrator", "remediator-detector")
GPU = "nvidia.com/gpu"


def _kustomize_command() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def _base_from_files() -> list[dict]:
    """Read the base's own files: what Kustomize would emit, less its rewrites."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    objects: list[dict] = []
    for name in kustomization["resources"]:
        objects.extend(
            doc for doc in yaml.safe_load_all((BASE / name).read_text()) if doc
        )
    for generator in kustomization.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for env_file in generator.get("envs", []):
            for line in (BASE / env_file).read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    key, _, value = line.partition("=")
                    data[key] = value
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": generator["name"],
                    "namespace": generator["namespace"],
                },
                "data": data,
            }
        )
    return objects


@cache
def _render(directory: Path) -> tuple[dict, ...]:
    command = _kustomize_command()
    if command is None:
        if directory != BASE:
            pytest.skip("kubectl or kustomize is needed to render the overlays")
        return tuple(_base_from_files())
    result = subprocess.run(
        [*command, str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


TARGETS = {"base": BASE, **OVERLAYS}


@pytest.fixture(params=sorted(TARGETS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, tuple[dict, ...]]:
    return request.param, _render(TARGETS[request.param])


def _of_kind(objects, kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def _named(objects, kind: str, name: str) -> dict:
    found = [obj for obj in _of_kind(objects, kind) if obj["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def _settings(objects) -> dict[str, str]:
    (config_map,) = [
        obj
        for obj in _of_kind(objects, "ConfigMap")
        if obj["metadata"]["name"].startswith("remediator-settings")
    ]
    return config_map["data"]


def _pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def _container(deployment: dict) -> dict:
    (container,) = _pod(deployment)["containers"]
    return container


def _longest_heartbeat() -> timedelta:
    pattern = re.compile(r"heartbeat_timeout=timedelta\(seconds=(\d+(?:\.\d+)?)\)")
    seconds = [
        float(match)
        for path in (ROOT / "workflows").glob("*.py")
        for match in pattern.findall(path.read_text())
    ]
    assert seconds, "no heartbeat_timeout found in workflows/"
    return timedelta(seconds=max(seconds))


# --- every object -------------------------------------------------------------


def test_every_object_validates_against_the_newest_kubernetes(rendered):
    version = latest_version()
    _, objects = rendered
    assert objects
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(
                f"{obj['kind']}/{obj['metadata']['name']} is invalid for "
                f"Kubernetes {version}: {err.message} at {list(err.path)}"
            )


def test_rendered_kinds(rendered):
    name, objects = rendered
    kinds = sorted({obj["kind"] for obj in objects})
    expected = {
        "ConfigMap",
        "Deployment",
        "Namespace",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    }
    if name == "production":
        expected.add("ScaledObject")
    assert set(kinds) == expected
    assert not _of_kind(objects, "Secret"), "tokens must not be kept in Git"
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace"), obj["metadata"]["name"]


# --- settings and secrets -----------------------------------------------------


def _known_variables() -> set[str]:
    return {
        f"REMEDIATOR_{prefix}_{field.upper()}"
        for prefix, group in GROUPS.items()
        for field in group.model_fields
    }


def test_settings_are_known_and_hold_no_token(rendered):
    _, objects = rendered
    settings = _settings(objects)
    unknown = set(settings) - _known_variables()
    assert not unknown, f"not settings of Remediator: {sorted(unknown)}"
    for key in settings:
        assert not key.endswith(("TOKEN", "API_KEY")), f"{key} belongs in a Secret"


def test_tokens_come_from_optional_secret_references(rendered):
    _, objects = rendered
    known = _known_variables()
    for deployment in _of_kind(objects, "Deployment"):
        container = _container(deployment)
        assert container["envFrom"][0]["configMapRef"]["name"].startswith(
            "remediator-settings"
        )
        for variable in container.get("env", []):
            assert variable["name"] in known
            reference = variable["valueFrom"]["secretKeyRef"]
            assert reference["name"] == "remediator-tokens"
            assert reference["optional"] is True


# --- GPU pinning --------------------------------------------------------------


def _gpu_affinity(deployment: dict) -> list[dict]:
    affinity = _pod(deployment).get("affinity", {})
    required = affinity.get("nodeAffinity", {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution", {}
    )
    return [
        expression
        for term in required.get("nodeSelectorTerms", [])
        for expression in term.get("matchExpressions", [])
        if expression["key"] == "nvidia.com/gpu.present"
    ]


@pytest.mark.parametrize("target", ["base", "production"])
def test_detector_is_pinned_to_gpu_nodes(target):
    objects = _render(TARGETS[target])
    detector = _named(objects, "Deployment", "remediator-detector")
    assert _gpu_affinity(detector) == [
        {"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}
    ]
    tolerations = _pod(detector)["tolerations"]
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert str(_container(detector)["resources"]["limits"][GPU]) == "1"
    for name in ("remediator-orchestrator", "remediator-intake"):
        other = _named(objects, "Deployment", name)
        assert not _gpu_affinity(other)
        assert GPU not in _container(other)["resources"].get("limits", {})
        assert not _pod(other).get("tolerations")


def test_cpu_only_detector_asks_for_no_gpu():
    objects = _render(OVERLAYS["cpu-only"])
    detector = _named(objects, "Deployment", "remediator-detector")
    pod = _pod(detector)
    assert "affinity" not in pod
    assert "tolerations" not in pod
    limits = _container(detector)["resources"]["limits"]
    assert GPU not in limits
    assert "cpu" in limits
    assert _container(detector)["args"] == ["worker", "detection"]


# --- RBAC ---------------------------------------------------------------------


def test_rbac_grants_only_what_the_argocd_backend_needs(rendered):
    _, objects = rendered
    assert not _of_kind(objects, "ClusterRole")
    assert not _of_kind(objects, "ClusterRoleBinding")
    (role,) = _of_kind(objects, "Role")
    assert role["rules"] == [
        {
            "apiGroups": ["argoproj.io"],
            "resources": ["applications"],
            "verbs": ["get", "list", "watch", "patch"],
        }
    ]
    settings = _settings(objects)
    assert settings["REMEDIATOR_ARGOCD_BACKEND"] == "kubernetes"
    assert role["metadata"]["namespace"] == settings["REMEDIATOR_ARGOCD_NAMESPACE"]

    (binding,) = _of_kind(objects, "RoleBinding")
    assert binding["metadata"]["namespace"] == role["metadata"]["namespace"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    (account,) = _of_kind(objects, "ServiceAccount")
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": account["metadata"]["name"],
            "namespace": account["metadata"]["namespace"],
        }
    ]
    assert account["automountServiceAccountToken"] is False
    for deployment in _of_kind(objects, "Deployment"):
        pod = _pod(deployment)
        assert pod["serviceAccountName"] == account["metadata"]["name"]
        # Only the orchestrator calls the Kubernetes API.
        wants_token = deployment["metadata"]["name"] == "remediator-orchestrator"
        assert pod["automountServiceAccountToken"] is wants_token


# --- probes, shutdown and security ---------------------------------------------


def _port(container: dict, name: str) -> int:
    (port,) = [p for p in container["ports"] if p["name"] == name]
    return port["containerPort"]


def test_probes(rendered):
    _, objects = rendered
    settings = _settings(objects)
    intake = _container(_named(objects, "Deployment", "remediator-intake"))
    assert intake["args"] == ["serve"]
    assert _port(intake, "http") == int(settings["REMEDIATOR_INTAKE_PORT"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert intake[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert settings["REMEDIATOR_INTAKE_HOST"] == "0.0.0.0"

    assert settings["REMEDIATOR_WORKER_HEALTH_HOST"] == "0.0.0.0"
    for name in WORKERS:
        worker = _container(_named(objects, "Deployment", name))
        assert worker["args"][0] == "worker"
        assert _port(worker, "health") == int(settings["REMEDIATOR_WORKER_HEALTH_PORT"])
        assert _port(worker, "metrics") == int(
            settings["REMEDIATOR_TEMPORAL_METRICS_PORT"]
        )
        assert worker["readinessProbe"]["httpGet"] == {
            "path": "/readyz",
            "port": "health",
        }
        assert worker["livenessProbe"]["httpGet"] == {
            "path": "/healthz",
            "port": "health",
        }
        # /readyz calls Temporal with a 5 s deadline, so the probe waits longer.
        assert worker["readinessProbe"]["timeoutSeconds"] > 5


def test_workers_drain_before_they_are_killed(rendered):
    _, objects = rendered
    needed = GRACEFUL_SHUTDOWN + _longest_heartbeat()
    for name in WORKERS:
        grace = _pod(_named(objects, "Deployment", name))[
            "terminationGracePeriodSeconds"
        ]
        assert timedelta(seconds=grace) > needed, name
        strategy = _named(objects, "Deployment", name)["spec"]["strategy"]
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_security_contexts(rendered):
    _, objects = rendered
    settings = _settings(objects)
    for deployment in _of_kind(objects, "Deployment"):
        name = deployment["metadata"]["name"]
        pod = _pod(deployment)
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        empty_dirs = {
            volume["name"] for volume in pod["volumes"] if "emptyDir" in volume
        }
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts.get("/tmp") in empty_dirs, name
            if name == "remediator-orchestrator":
                work_dir = settings["REMEDIATOR_GIT_WORK_DIR"]
                assert mounts.get(work_dir) in empty_dirs, name
    (namespace,) = _of_kind(objects, "Namespace")
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


# --- selectors between objects -----------------------------------------------


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_every_deployment_has_a_disruption_budget(rendered):
    _, objects = rendered
    budgets = _of_kind(objects, "PodDisruptionBudget")
    for deployment in _of_kind(objects, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert _selects(deployment["spec"]["selector"]["matchLabels"], labels)
        matching = [
            budget
            for budget in budgets
            if _selects(budget["spec"]["selector"]["matchLabels"], labels)
        ]
        assert len(matching) == 1, deployment["metadata"]["name"]
        spec = matching[0]["spec"]
        assert ("minAvailable" in spec) != ("maxUnavailable" in spec)
        if "minAvailable" in spec:
            # A budget that no drain could satisfy would block node upgrades.
            assert spec["minAvailable"] < deployment["spec"]["replicas"]


def test_services_select_their_pods(rendered):
    _, objects = rendered
    pods = [
        (d["metadata"]["name"], d["spec"]["template"]["metadata"]["labels"], d)
        for d in _of_kind(objects, "Deployment")
    ]
    for service in _of_kind(objects, "Service"):
        selected = [
            (name, deployment)
            for name, labels, deployment in pods
            if _selects(service["spec"]["selector"], labels)
        ]
        assert selected, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            for name, deployment in selected:
                names = {p["name"] for p in _container(deployment)["ports"]}
                assert port["targetPort"] in names, (service, name)
    intake = _named(objects, "Service", "remediator-intake")
    url = _settings(objects)["REMEDIATOR_INTAKE_URL"]
    assert url.startswith(
        f"http://{intake['metadata']['name']}.{intake['metadata']['namespace']}."
    )
    assert url.endswith(f":{intake['spec']['ports'][0]['port']}")


def test_service_monitor_scrapes_intake_and_workers(rendered):
    _, objects = rendered
    (monitor,) = _of_kind(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert spec["namespaceSelector"]["matchNames"] == [monitor["metadata"]["namespace"]]
    services = [
        service
        for service in _of_kind(objects, "Service")
        if _selects(spec["selector"]["matchLabels"], service["metadata"]["labels"])
    ]
    assert {s["metadata"]["name"] for s in services} == {
        "remediator-intake",
        "remediator-workers",
    }
    port_names = {port["name"] for s in services for port in s["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
    assert {e["port"] for e in spec["endpoints"]} == port_names


# --- production -----------------------------------------------------------------


def test_production_pins_the_image_and_scales_on_backlog():
    objects = _render(OVERLAYS["production"])
    for deployment in _of_kind(objects, "Deployment"):
        image = _container(deployment)["image"]
        repository, _, tag = image.rpartition(":")
        assert "/" in repository, image
        assert tag, image
        assert tag != "latest", image

    settings = _settings(objects)
    assert settings["REMEDIATOR_SIGNALS_BACKEND"] == "prometheus"
    temporal = TemporalSettings()
    queues = {
        "remediator-orchestrator": temporal.task_queue,
        "remediator-detector": temporal.detection_task_queue,
    }
    scaled = _of_kind(objects, "ScaledObject")
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled} == set(queues)
    for scaled_object in scaled:
        assert scaled_object["apiVersion"] == "keda.sh/v1alpha1"
        spec = scaled_object["spec"]
        target = spec["scaleTargetRef"]
        assert target["kind"] == "Deployment"
        assert target["apiVersion"] == "apps/v1"
        deployment = _named(objects, "Deployment", target["name"])
        assert (
            deployment["metadata"]["namespace"]
            == (scaled_object["metadata"]["namespace"])
        )
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["minReplicaCount"] == deployment["spec"]["replicas"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "temporal"
        metadata = trigger["metadata"]
        assert all(isinstance(value, str) for value in metadata.values())
        assert metadata["taskQueue"] == queues[target["name"]]
        assert metadata["namespace"] == settings["REMEDIATOR_TEMPORAL_NAMESPACE"]
        assert metadata["endpointFromEnv"] in settings
        assert int(metadata["targetQueueSize"]) >= 1
        assert set(metadata["queueTypes"].split(",")) <= {"workflow", "activity"}
    detector = next(
        s for s in scaled if s["spec"]["scaleTargetRef"]["name"].endswith("detector")
    )
    assert detector["spec"]["triggers"][0]["metadata"]["queueTypes"] == "activity"

    intake = _named(objects, "PodDisruptionBudget", "remediator-intake")
    assert intake["spec"] == {
        "minAvailable": 1,
        "selector": intake["spec"]["selector"],
    }
    assert _named(objects, "Deployment", "remediator-intake")["spec"]["replicas"] == 2
