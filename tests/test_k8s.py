"""ops/k8s: the worker Deployment, its PodDisruptionBudget and Secret validate against Kubernetes' own
schemas (kubernetes-validate, offline), and the pieces agree with each other and with the worker."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from producer.cli import build_parser
from producer.keys import GROUP, Keys

K8S = Path(__file__).resolve().parent.parent / "ops" / "k8s"
KUBERNETES_VERSION = "1.30"


def _documents(name: str) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc}


def _worker_container() -> dict:
    (container,) = _documents("worker.yaml")["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def test_core_objects_validate_strictly_against_the_kubernetes_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = _documents("worker.yaml")
    assert set(docs) == {"Secret", "Deployment", "PodDisruptionBudget"}
    for doc in docs.values():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises on any unknown or wrong field


def test_the_validator_rejects_a_broken_deployment():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    broken = _documents("worker.yaml")["Deployment"]
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 45  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_worker_args_parse_and_the_grace_period_outlasts_the_drain():
    container = _worker_container()
    args = build_parser().parse_args(container["args"])
    pod = _documents("worker.yaml")["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > args.grace_s
    assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert (args.device, args.dtype) == ("cuda", "bfloat16")


def test_probes_run_the_worker_health_check_on_the_file_the_worker_writes():
    container = _worker_container()
    env = {e["name"]: e for e in container["env"]}
    health_file = env["REDBATCH_HEALTH_FILE"]["value"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(health_file).parent) in mounts  # a writable emptyDir
    assert "secretKeyRef" in env["REDBATCH_REDIS_URL"]["valueFrom"]
    for probe, flag in (("startupProbe", "--health"), ("livenessProbe", "--health"), ("readinessProbe", "--ready")):
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["redbatch", "worker"] and flag in command
        build_parser().parse_args(command[1:])  # the probe's flags exist
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 300


def test_disruption_budget_and_scaler_target_the_deployment_and_its_stream():
    docs = _documents("worker.yaml")
    deployment, budget = docs["Deployment"], docs["PodDisruptionBudget"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    scaled = yaml.safe_load((K8S / "keda-scaledobject.yaml").read_text())
    (trigger,) = scaled["spec"]["triggers"]
    assert scaled["kind"] == "ScaledObject" and trigger["type"] == "redis-streams"
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    model = build_parser().parse_args(_worker_container()["args"]).model_name
    assert trigger["metadata"]["stream"] == Keys().requests(model)
    assert trigger["metadata"]["consumerGroup"] == GROUP


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
