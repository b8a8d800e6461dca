"""The Kubernetes manifests (deploy/kubernetes), offline: every overlay renders with `kubectl kustomize`,
every document validates against the Kubernetes schemas (`kubernetes-validate`, strict), and the
invariants the deployment relies on hold."""
from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from service.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (ROOT / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
PRODUCTION = {"production"}
#: A Kubernetes version kubernetes-validate bundles schemas for (the oldest cluster we support).
K8S_VERSION = "1.31.0"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None,
                                reason="kubectl not installed (it renders the kustomize overlays offline)")


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "overlays" / overlay)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def of_kind(docs: tuple[dict, ...], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: tuple[dict, ...], kind: str, name: str) -> dict:
    (found,) = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    return found


def pod_specs(docs: tuple[dict, ...]) -> Iterator[tuple[str, dict]]:
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet", "DaemonSet"}:
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def test_there_are_overlays() -> None:
    assert {"dev", "production"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_document_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (dev extra)")
    docs = render(overlay)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {err.message} at {list(err.path)}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_probes_limits_and_a_locked_down_security_context(overlay: str) -> None:
    docs = render(overlay)
    for name, spec in pod_specs(docs):
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{overlay}: {name}/{container['name']}"
            if container in spec["containers"]:
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert probe in container, f"{where} has no {probe}"
            resources = container["resources"]
            for kind in ("cpu", "memory"):
                assert kind in resources["requests"] and kind in resources["limits"], f"{where}: {kind}"
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc.get("privileged"), where
            assert not sc["capabilities"].get("add"), where
            # A read-only root filesystem needs somewhere writable for temporary files.
            assert any(m["mountPath"] in {"/tmp", "/data"} for m in container["volumeMounts"]), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_scales_on_cpu_and_survives_disruptions(overlay: str) -> None:
    docs = render(overlay)
    hpa = named(docs, "HorizontalPodAutoscaler", "fsar-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "fsar-gateway"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and 0 < metric["resource"]["target"]["averageUtilization"] <= 90
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdb = named(docs, "PodDisruptionBudget", "fsar-gateway")
    gateway = named(docs, "Deployment", "fsar-gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= gateway["spec"]["template"]["metadata"]["labels"].items()
    if overlay in PRODUCTION:
        assert hpa["spec"]["minReplicas"] >= 2 and pdb["spec"]["minAvailable"] >= 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_gets_a_gpu_a_long_startup_and_a_headless_service(overlay: str) -> None:
    docs = render(overlay)
    triton = named(docs, "Deployment", "fsar-triton")
    (container,) = triton["spec"]["template"]["spec"]["containers"]
    assert str(container["resources"]["requests"]["nvidia.com/gpu"]) == "1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/v2/health/ready"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "weight downloads need minutes"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and "/dev/shm" in mounts
    service = named(docs, "Service", "triton-headless")
    assert service["spec"]["clusterIP"] == "None"
    assert {p["port"] for p in service["spec"]["ports"]} >= {8001}
    namespace = triton["metadata"]["namespace"]
    config = named(docs, "ConfigMap", "fsar-gateway")["data"]
    assert config["FSAR_TRITON_URL"] == f"dns:///triton-headless.{namespace}.svc.cluster.local:8001"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_env_names_only_settings_the_gateway_has(overlay: str) -> None:
    docs = render(overlay)
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    gateway = named(docs, "Deployment", "fsar-gateway")["spec"]["template"]["spec"]["containers"][0]
    names = {env["name"] for env in gateway.get("env", [])}
    for source in gateway.get("envFrom", []):
        names |= set(named(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    fsar = {name for name in names if name.startswith(ENV_PREFIX)}
    assert fsar - known == set(), f"unknown gateway settings in {overlay}"
    assert {"FSAR_REDIS_URL", "FSAR_BACKEND", "FSAR_TRITON_URL", "FSAR_UPLOAD_DIR"} <= fsar
    config = named(docs, "ConfigMap", "fsar-gateway")["data"]
    settings = Settings(**{k[len(ENV_PREFIX):].lower(): v for k, v in config.items()},
                        redis_url="redis://redis:6379/0")  # the values parse as the gateway would parse them
    mounts = {m["mountPath"] for m in gateway["volumeMounts"]}
    assert settings.upload_dir in mounts and str(Path(settings.api_keys_file).parent) in mounts
    assert settings.port == gateway["ports"][0]["containerPort"]


@pytest.mark.parametrize("overlay", sorted(PRODUCTION & set(OVERLAYS)))
def test_production_pins_images_and_ships_no_example_secret(overlay: str) -> None:
    docs = render(overlay)
    for name, spec in pod_specs(docs):
        for container in spec.get("initContainers", []) + spec["containers"]:
            image = container["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert "@sha256:" in image or (tag and tag != "latest"), f"{name}: unpinned image {image}"
    assert of_kind(docs, "Secret") == [], "production Secrets are created out of band"
    assert not [d for d in docs if d["kind"] in {"Deployment", "StatefulSet"} and "redis" in d["metadata"]["name"]]


def test_dev_runs_redis_in_the_cluster() -> None:
    docs = render("dev")
    assert named(docs, "Deployment", "redis") and named(docs, "Service", "redis")
    secret = named(docs, "Secret", "fsar-redis")
    assert secret["stringData"]["url"] == "redis://redis:6379/0"
    assert "REPLACE-ME" in named(docs, "Secret", "fsar-api-keys")["stringData"]["keys"]
