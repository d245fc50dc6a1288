"""`combined.enabled`: one Deployment whose pods run the core and the bridge in one process (startup/combined.py),
rendered with every other option on: valid objects, both components' settings parse from the one container's
environment, and the bridge's Service and the NetworkPolicy reach the HTTP side in the core's pods."""

from __future__ import annotations

from typing import Any

import helm_python
import pytest

from bridge.settings import Settings as BridgeSettings
from services.settings import Settings as CoreSettings
from tests.helm.conftest import CHART_DIR, FULL_VALUES, KUBE_VERSIONS, NAMESPACE, Rendered, container, merged, render
from tests.helm.test_chart import ACCEPTED_LINT_FINDINGS, assert_valid_objects
from tests.helm.test_chart_matches_code import environment

COMBINED: dict[str, Any] = merged(FULL_VALUES, {"combined": {"enabled": True}})


@pytest.fixture(scope="module")
def combined(chart: helm_python.Chart) -> Rendered:
    return render(chart, COMBINED)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_it_lints_clean_and_every_object_is_valid(combined: Rendered, kube_version: str) -> None:
    report = helm_python.lint(CHART_DIR, COMBINED, strict=True, namespace=NAMESPACE, kube_version=f"v{kube_version}")
    assert report["errors"] == [] and report["messages"] == ACCEPTED_LINT_FINDINGS
    assert_valid_objects(combined, kube_version)


def test_one_deployment_runs_the_combined_process(combined: Rendered) -> None:
    assert [d["metadata"]["labels"]["app.kubernetes.io/component"] for d in combined.all("Deployment")] == ["core"]
    assert {m["spec"]["scaleTargetRef"]["name"] for m in combined.all("HorizontalPodAutoscaler")} == {
        combined.one("Deployment", "core")["metadata"]["name"]
    }
    assert all(p["metadata"]["labels"]["app.kubernetes.io/component"] == "core"
               for p in combined.all("PodDisruptionBudget"))  # fmt: skip
    core = container(combined.one("Deployment", "core"))
    assert core["command"] == ["python", "-m", "startup.combined"]
    ports = {p["name"]: p["containerPort"] for p in core["ports"]}
    assert ports["http"] == combined.values["bridge"]["port"]
    assert ports["bridge-metrics"] == combined.values["bridge"]["metricsPort"]


def test_both_components_read_their_settings_from_the_one_container(combined: Rendered) -> None:
    env = environment(combined, "core")  # also: no variable is set twice
    # the keys file is mounted as in the split mode (test_chart_matches_code reads it there); not on this machine
    core = CoreSettings.from_env({k: v for k, v in env.items() if k != "MODELMAX_API_KEYS_FILE"})
    bridge = BridgeSettings.from_env(env)
    values = combined.values
    assert (core.port, bridge.port) == (values["core"]["grpcPort"], values["bridge"]["port"])
    assert bridge.metrics_port == values["bridge"]["metricsPort"] != core.metrics_port
    assert bridge.core_tls() is None  # in one process there is no channel to secure; the core's own TLS stays
    assert "MODELMAX_CORE_TLS_CERT_FILE" in env and env["MODELMAX_LOG_LEVEL"] == values["core"]["logLevel"]


def test_the_bridge_service_and_the_network_policy_reach_the_http_side(combined: Rendered) -> None:
    service = combined.one("Service", "bridge")
    deployment = combined.one("Deployment", "core")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"] for p in container(deployment)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    policy = combined.one("NetworkPolicy", "core")
    rules = {rule["ports"][0]["port"]: rule for rule in policy["spec"]["ingress"]}
    assert "from" not in rules[combined.values["bridge"]["port"]]  # the API, from anywhere, as the bridge's
    assert (
        rules[combined.values["bridge"]["metricsPort"]]["from"] == rules[combined.values["core"]["metricsPort"]]["from"]
    )


def test_the_split_mode_renders_as_before(release: Rendered) -> None:
    assert {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in release.all("Deployment")} == {
        "core", "bridge"
    }  # fmt: skip
    assert "command" not in container(release.one("Deployment", "core"))
