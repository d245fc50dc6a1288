"""How the bridge reaches every core pod (headless Service, connection age) and who else may (the NetworkPolicy)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python

from tests.helm.conftest import FULL_VALUES, NAMESPACE, Rendered, container_port, render
from tests.helm.test_chart_matches_code import core_settings

_NAMESPACE_NAME = "kubernetes.io/metadata.name"


def _selector(release: Rendered, component: str) -> dict[str, str]:
    selector: dict[str, str] = release.one("Deployment", component)["spec"]["selector"]["matchLabels"]
    return selector


def _rule(policy: dict[str, Any], port: int) -> dict[str, Any]:
    rules: list[dict[str, Any]] = policy["spec"]["ingress"]
    (rule,) = [r for r in rules if r["ports"] == [{"port": port, "protocol": "TCP"}]]
    return rule


def _namespaces(peer: dict[str, Any]) -> list[str]:
    assert set(peer) == {"namespaceSelector"}  # every pod of those namespaces, nothing else
    (expression,) = peer["namespaceSelector"]["matchExpressions"]
    assert (expression["key"], expression["operator"]) == (_NAMESPACE_NAME, "In")
    return list(expression["values"])


def test_the_headless_service_selects_every_core_pod_on_the_grpc_port(release: Rendered) -> None:
    service = release.one("Service", "core-headless")
    assert service["metadata"]["name"] == "modelmax-core-headless"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == _selector(release, "core")
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["targetPort"], port["port"]) == ("grpc", "grpc", release.values["core"]["grpcPort"])
    assert container_port(release.one("Deployment", "core"), "grpc") == port["port"]
    # Not scraped twice: no ServiceMonitor selects it (and it has no metrics port to scrape).
    for monitor in release.all("ServiceMonitor"):
        assert not monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_a_second_service_with_a_name_that_fits_a_dns_label(chart: helm_python.Chart) -> None:
    """The core Service stays a ClusterIP: an installed release's Service cannot turn headless (clusterIP is
    immutable), which is why the headless one is a second Service."""
    release = render(chart, {"fullnameOverride": "x" * 53})
    name = release.one("Service", "core-headless")["metadata"]["name"]
    assert len(name) <= 63 and name.startswith("x" * 53 + "-core")
    core = release.one("Service", "core")
    assert name != core["metadata"]["name"] and "clusterIP" not in core["spec"]


def test_connections_age_as_the_values_say(release: Rendered, tmp_path: Path) -> None:
    assert (
        core_settings(release, tmp_path).max_connection_age_seconds == release.values["core"]["maxConnectionAgeSeconds"]
    )


def test_by_default_only_the_bridge_reaches_the_core_grpc_port(default_release: Rendered) -> None:
    policy = default_release.one("NetworkPolicy", "core")
    assert policy["metadata"]["namespace"] == NAMESPACE
    assert policy["spec"]["podSelector"] == {"matchLabels": _selector(default_release, "core")}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    grpc = _rule(policy, default_release.values["core"]["grpcPort"])
    assert grpc["from"] == [{"podSelector": {"matchLabels": _selector(default_release, "bridge")}}]
    bridge_pods = default_release.one("Deployment", "bridge")["spec"]["template"]["metadata"]["labels"]
    core_pods = default_release.one("Deployment", "core")["spec"]["template"]["metadata"]["labels"]
    assert _selector(default_release, "bridge").items() <= bridge_pods.items()
    assert not _selector(default_release, "bridge").items() <= core_pods.items()
    # /metrics from anywhere (no ServiceMonitor namespace, none listed); no other port is open.
    assert "from" not in _rule(policy, default_release.values["core"]["metricsPort"])
    assert len(policy["spec"]["ingress"]) == 2


def test_listed_namespaces_reach_the_grpc_port_and_scrapers_the_metrics_port(full_release: Rendered) -> None:
    policy = full_release.one("NetworkPolicy", "core")
    core = FULL_VALUES["core"]
    bridge, listed = _rule(policy, full_release.values["core"]["grpcPort"])["from"]
    assert bridge == {"podSelector": {"matchLabels": _selector(full_release, "bridge")}}
    assert _namespaces(listed) == ["batch-jobs", "agents"]
    (scrapers,) = _rule(policy, full_release.values["core"]["metricsPort"])["from"]
    assert _namespaces(scrapers) == ["obs", "monitoring"]  # the listed ones and the ServiceMonitor's
    # With TLS, the plaintext health-only port stays open to the kubelet's probes (they come from the node).
    assert "from" not in _rule(policy, core["healthPort"])
    assert len(policy["spec"]["ingress"]) == 3


def test_the_network_policy_can_be_turned_off(chart: helm_python.Chart) -> None:
    assert render(chart, {"core": {"networkPolicy": {"enabled": False}}}).all("NetworkPolicy") == []
