"""The chart lints clean, renders valid Kubernetes objects with and without its options, and keeps its promises:
restricted pods, probes, pinned images, a grace period longer than the drain, and values that are all documented."""

from __future__ import annotations

import base64
import json
import re
import tomllib
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.helm.conftest import (
    CHART_DIR,
    FULL_VALUES,
    IRSA_ROLE,
    KUBE_VERSIONS,
    NAMESPACE,
    Rendered,
    container,
    container_port,
    merged,
    render,
)

# Helm lint's only finding: Chart.yaml has no icon (info level). ModelMax has no logo to point at.
ACCEPTED_LINT_FINDINGS = [{"severity": 1, "path": "Chart.yaml", "error": "icon is recommended"}]

# kubernetes-validate ships schemas for Kubernetes' own kinds only. The Prometheus Operator's ServiceMonitor is
# checked against this hand-written subset of its CRD instead (unknown fields refused, as in strict mode).
_DURATION = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "namespace", "labels"],
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _STRING_MAP},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints", "namespaceSelector"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["matchLabels"],
                    "properties": {"matchLabels": _STRING_MAP},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port", "path"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                        },
                    },
                },
            },
        },
    },
}


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([0-9]+)(ms|s|m|h)", duration))


# ---- lint and schema validity ----


@pytest.mark.parametrize("values", [{}, FULL_VALUES], ids=["default", "full"])
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_strict_lint_is_clean(values: dict[str, Any], kube_version: str) -> None:
    report = helm_python.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE, kube_version=f"v{kube_version}")
    assert report["errors"] == []
    assert report["messages"] == ACCEPTED_LINT_FINDINGS


def assert_valid_objects(release: Rendered, kube_version: str) -> None:
    """Every manifest a valid Kubernetes object of `kube_version` (strict); ServiceMonitors by their CRD schema."""
    for manifest in release.manifests:
        if manifest["kind"] == "ServiceMonitor":
            jsonschema.validate(manifest, SERVICE_MONITOR_SCHEMA)
        else:
            kubernetes_validate.validate(manifest, kube_version, strict=True)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_manifest_is_a_valid_kubernetes_object(release: Rendered, kube_version: str) -> None:
    assert_valid_objects(release, kube_version)


def test_default_release_has_the_expected_objects(default_release: Rendered) -> None:
    kinds = sorted((m["kind"], m["metadata"]["name"]) for m in default_release.manifests)
    assert kinds == [
        ("ConfigMap", "modelmax-catalog"),
        ("Deployment", "modelmax-bridge"),
        ("Deployment", "modelmax-core"),
        ("NetworkPolicy", "modelmax-core"),
        ("PodDisruptionBudget", "modelmax-bridge"),
        ("PodDisruptionBudget", "modelmax-core"),
        ("Secret", "modelmax-api-keys"),
        ("Service", "modelmax-bridge"),
        ("Service", "modelmax-core"),
        ("Service", "modelmax-core-headless"),
        ("ServiceAccount", "modelmax-bridge"),
        ("ServiceAccount", "modelmax-core"),
    ]
    assert all(m["metadata"]["namespace"] == NAMESPACE for m in default_release.manifests)


def test_full_release_has_every_optional_object(full_release: Rendered) -> None:
    kinds = sorted((m["kind"], m["metadata"]["name"], m["metadata"]["namespace"]) for m in full_release.manifests)
    assert kinds == [
        ("ConfigMap", "modelmax-catalog", NAMESPACE),
        ("ConfigMap", "modelmax-dashboard", "monitoring"),
        ("Deployment", "modelmax-bridge", NAMESPACE),
        ("Deployment", "modelmax-core", NAMESPACE),
        ("HorizontalPodAutoscaler", "modelmax-bridge", NAMESPACE),
        ("HorizontalPodAutoscaler", "modelmax-core", NAMESPACE),
        ("NetworkPolicy", "modelmax-core", NAMESPACE),
        ("PodDisruptionBudget", "modelmax-bridge", NAMESPACE),
        ("PodDisruptionBudget", "modelmax-core", NAMESPACE),
        ("Service", "modelmax-bridge", NAMESPACE),
        ("Service", "modelmax-core", NAMESPACE),
        ("Service", "modelmax-core-headless", NAMESPACE),
        ("ServiceAccount", "modelmax-core", NAMESPACE),  # the bridge uses an existing one
        ("ServiceMonitor", "modelmax-bridge", "monitoring"),
        ("ServiceMonitor", "modelmax-core", "monitoring"),
    ]


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        ({"core": {"grpcPort": "50051"}}, "/core/grpcPort"),
        ({"bridge": {"metricsPort": 80}}, "/bridge/metricsPort"),
        ({"replicas": 3}, "replicas"),
        ({"core": {"replicas": 3}}, "replicas"),
        ({"core": {"image": {"tag": "latest"}}}, "/core/image/tag"),
        ({"bridge": {"image": {"digest": "latest"}}}, "/bridge/image/digest"),
        ({"core": {"drainSeconds": 0}}, "/core/drainSeconds"),
        ({"bridge": {"service": {"type": "ExternalName"}}}, "/bridge/service/type"),
        ({"bridge": {"podDisruptionBudget": {"maxUnavailable": "one"}}}, "/bridge/podDisruptionBudget"),
        ({"core": {"autoscaling": {"enabled": "yes"}}}, "/core/autoscaling/enabled"),
        ({"core": {"extraEnv": {"MODELMAX_CORE_PORT": "1"}}}, "invalid propertyName 'MODELMAX_CORE_PORT'"),
        ({"core": {"secretEnv": {"GEMINI_API_KEY": {"secretName": "gemini"}}}}, "/core/secretEnv/GEMINI_API_KEY"),
        ({"core": {"catalog": {"models": []}}}, "/core/catalog/models"),
        (
            {"core": {"catalog": {"models": [{"name": "g", "provider": "gemini", "options": {"api_key": "AIza"}}]}}},
            "invalid propertyName 'api_key'",
        ),
        ({"core": {"catalog": {"models": [{"name": "x", "provider": "local", "colour": 1}]}}}, "colour"),
        ({"core": {"podLabels": {"app.kubernetes.io/name": "x"}}}, "invalid propertyName 'app.kubernetes.io/name'"),
        ({"securityContext": {"allowPrivilegeEscalation": True}}, "/securityContext/allowPrivilegeEscalation"),
        ({"securityContext": {"capabilities": {"drop": ["NET_RAW"]}}}, "/securityContext/capabilities/drop"),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
        ({"metrics": {"serviceMonitor": {"interval": "30"}}}, "/metrics/serviceMonitor/interval"),
        ({"metrics": {"keyLabels": "false"}}, "/metrics/keyLabels"),
        ({"logFormat": "xml"}, "/logFormat"),
        # API keys moved to the core: a values file from before the move is refused, naming the old place.
        ({"bridge": {"apiKeys": {"existingSecret": "keys"}}}, "at '/bridge': additional properties 'apiKeys'"),
        ({"core": {"apiKeys": {"secretKey": ""}}}, "/core/apiKeys/secretKey"),
        ({"core": {"apiKeys": {"existingSecret": "Keys_1"}}}, "/core/apiKeys/existingSecret"),
        # The DSN carries a password: it can only be named by Secret, never given as a value.
        ({"core": {"database": {"url": "postgresql://u:p@db/modelmax"}}}, "additional properties 'url'"),
        ({"core": {"extraEnv": {"MODELMAX_DATABASE_URL": "postgresql://u:p@db/m"}}}, "'MODELMAX_DATABASE_URL'"),
        ({"core": {"database": {"existingSecret": "postgresql://db"}}}, "/core/database/existingSecret"),
        ({"core": {"database": {"secretKey": ""}}}, "/core/database/secretKey"),
        ({"core": {"policy": {"failClosed": "true"}}}, "/core/policy/failClosed"),
        ({"core": {"policy": {"keyCacheTtlSeconds": 0}}}, "/core/policy/keyCacheTtlSeconds"),
        ({"core": {"policy": {"keyCacheTtlSeconds": "5s"}}}, "/core/policy/keyCacheTtlSeconds"),
        # The core's door: certificates only ever by Secret; mutual TLS needs both sides' Secrets.
        ({"core": {"tls": {"certFile": "/etc/tls.crt"}}}, "at '/core/tls': additional properties 'certFile'"),
        ({"core": {"tls": {"existingSecret": "Core_TLS"}}}, "/core/tls/existingSecret"),
        ({"core": {"tls": {"clientAuth": True}}}, "at '/core/tls/existingSecret': minLength"),
        ({"core": {"tls": {"existingSecret": "core-tls", "clientAuth": True}}},
         "at '/bridge/coreTls/existingSecret': minLength"),
        ({"core": {"tls": {"existingSecret": "core-tls"}}, "bridge": {"coreTls": {"existingSecret": "bridge-tls"}}},
         "at '/core/tls/clientAuth': value must be true"),
        ({"bridge": {"coreTls": {"serverName": "core.internal"}}}, "at '/core/tls/existingSecret': minLength"),
        ({"bridge": {"coreTls": {"serverName": "https://core"}}}, "/bridge/coreTls/serverName"),
        ({"core": {"tls": {"clientAuth": "true"}}}, "/core/tls/clientAuth"),
        ({"core": {"reflection": "on"}}, "/core/reflection"),
        ({"core": {"healthPort": 80}}, "/core/healthPort"),
    ],
)  # fmt: skip
def test_schema_refuses_bad_values(chart: helm_python.Chart, overrides: dict[str, Any], where: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(where)):
        chart.validate_schema(chart.merge_values(overrides))
    with pytest.raises(helm_python.HelmValuesError):
        chart.render(overrides, name="modelmax", namespace=NAMESPACE)


@pytest.mark.parametrize("taken", [50051, 9090], ids=["grpcPort", "metricsPort"])
def test_the_health_port_must_be_a_port_of_its_own(chart: helm_python.Chart, taken: int) -> None:
    with pytest.raises(helm_python.HelmRenderError, match="core.healthPort must differ from core.grpcPort"):
        render(chart, {"core": {"tls": {"existingSecret": "core-tls"}, "healthPort": taken}})
    render(chart, {"core": {"healthPort": taken}})  # without TLS there is no health-only port to collide


def test_tls_mounts_are_read_only_and_carry_no_more_than_each_pod_needs(full_release: Rendered) -> None:
    """The core gets its certificate, key and client CA; the bridge the core's CA and its own certificate: neither
    pod sees the other's private key."""
    keys = {}
    for component in ("core", "bridge"):
        deployment = full_release.one("Deployment", component)
        pod = deployment["spec"]["template"]["spec"]
        read_only = {m["name"] for m in container(deployment)["volumeMounts"] if m.get("readOnly")}
        keys[component] = {
            (source["secret"]["name"], item["key"])
            for volume in pod["volumes"]
            if "projected" in volume and volume["name"] in read_only
            for source in volume["projected"]["sources"]
            if "secret" in source and source["secret"]["name"].endswith("-tls")
            for item in source["secret"]["items"]
        }
    assert keys == {
        "core": {("modelmax-core-tls", "tls.crt"), ("modelmax-core-tls", "tls.key"), ("modelmax-core-tls", "ca.crt")},
        "bridge": {
            ("modelmax-core-tls", "ca.crt"),
            ("modelmax-bridge-tls", "tls.crt"),
            ("modelmax-bridge-tls", "tls.key"),
        },
    }


def test_schema_accepts_the_defaults_and_every_option(chart: helm_python.Chart) -> None:
    chart.validate_schema(chart.merge_values({}))
    chart.validate_schema(chart.merge_values(FULL_VALUES))


def _documented_keys(text: str) -> tuple[set[str], list[str]]:
    """Every key path in values.yaml, and those whose comment block does not start with "# <path>"."""
    keys: set[str] = set()
    undocumented: list[str] = []
    stack: list[tuple[int, str]] = []
    lines = text.splitlines()
    skip_deeper_than: int | None = None
    for index, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None:
            if not line.strip() or indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        match = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9_]*):(.*)$", line)
        if not match:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [match[2]])
        keys.add(path)
        start = index  # the comment block right above the key must start with "# <path> --"
        while start > 0 and lines[start - 1].strip().startswith("#"):
            start -= 1
        if start == index or not lines[start].strip().startswith(f"# {path} --"):
            undocumented.append(path)
        following = next((n for n in lines[index + 1 :] if n.strip() and not n.strip().startswith("#")), "")
        if match[3].strip() == "" and following.strip().startswith("- "):
            skip_deeper_than = indent  # a list: its items are data, documented by the list's own comment
        stack.append((indent, match[2]))
    return keys, undocumented


def _paths(values: dict[str, Any], prefix: str = "") -> set[str]:
    out = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        out.add(path)
        if isinstance(value, dict):
            out |= _paths(value, f"{path}.")
    return out


def _in_schema(schema: dict[str, Any], path: str) -> bool:
    """Whether values.schema.json declares `path`, or a free-form map (such as resources.requests) holds it."""
    node = schema
    for key in path.split("."):
        while "$ref" in node:
            node = schema["$defs"][node["$ref"].removeprefix("#/$defs/")]
        if key in node.get("properties", {}):
            node = node["properties"][key]
        elif (
            isinstance(node.get("additionalProperties"), dict)
            or node.get("type") == "object"
            and ("additionalProperties" not in node and "properties" not in node)
        ):
            return True
        else:
            return False
    return True


def test_every_value_is_documented_camel_case_and_in_the_schema() -> None:
    text = (CHART_DIR / "values.yaml").read_text(encoding="utf-8")
    keys, undocumented = _documented_keys(text)
    assert keys == _paths(yaml.safe_load(text))  # the line scanner saw every key
    assert undocumented == []
    assert [k for k in keys if not re.fullmatch(r"[a-z][A-Za-z0-9]*", k.split(".")[-1])] == []
    schema = json.loads((CHART_DIR / "values.schema.json").read_text(encoding="utf-8"))
    assert [k for k in sorted(keys) if not _in_schema(schema, k)] == []


# ---- wiring between the objects ----


def test_selectors_wire_services_pdbs_and_hpas_to_their_deployments(release: Rendered) -> None:
    for deployment in release.all("Deployment"):
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels.items()
        assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}
        service = release.one("Service", component)
        assert service["spec"]["selector"] == selector
        for other in release.all("Deployment"):
            if other is not deployment:
                assert not selector.items() <= other["spec"]["template"]["metadata"]["labels"].items()
        if release.values[component]["podDisruptionBudget"]["enabled"]:
            pdb = release.one("PodDisruptionBudget", component)
            assert pdb["spec"]["selector"]["matchLabels"] == selector
        if release.values[component]["autoscaling"]["enabled"]:
            hpa = release.one("HorizontalPodAutoscaler", component)
            assert hpa["spec"]["scaleTargetRef"] == {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": deployment["metadata"]["name"],
            }
            assert "replicas" not in deployment["spec"]  # the HPA owns the count
        else:
            assert deployment["spec"]["replicas"] == release.values[component]["replicaCount"]


def test_service_ports_target_named_container_ports(release: Rendered) -> None:
    expected = {"core": {"grpc", "metrics"}, "bridge": {"http", "metrics"}}
    for component, names in expected.items():
        service = release.one("Service", component)
        deployment = release.one("Deployment", component)
        assert {p["name"] for p in service["spec"]["ports"]} == names
        for port in service["spec"]["ports"]:
            assert port["targetPort"] == port["name"]
            container_port(deployment, port["targetPort"])  # the name exists on the container


def test_service_monitors_scrape_the_metrics_port_of_each_service(full_release: Rendered) -> None:
    monitor_values = FULL_VALUES["metrics"]["serviceMonitor"]
    for component in ("core", "bridge"):
        monitor = full_release.one("ServiceMonitor", component)
        service = full_release.one("Service", component)
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        other = full_release.one("Service", "bridge" if component == "core" else "core")
        assert not monitor["spec"]["selector"]["matchLabels"].items() <= other["metadata"]["labels"].items()
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint == {
            "port": "metrics",
            "path": "/metrics",
            "interval": monitor_values["interval"],
            "scrapeTimeout": monitor_values["scrapeTimeout"],
        }
        assert seconds(endpoint["scrapeTimeout"]) < seconds(endpoint["interval"])


def test_service_account_annotations_carry_the_irsa_role_to_the_core_only(full_release: Rendered) -> None:
    account = full_release.one("ServiceAccount", "core")
    assert account["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": IRSA_ROLE}
    core = full_release.one("Deployment", "core")["spec"]["template"]["spec"]
    bridge = full_release.one("Deployment", "bridge")["spec"]["template"]["spec"]
    assert core["serviceAccountName"] == account["metadata"]["name"]
    assert bridge["serviceAccountName"] == "shared-bridge"


def test_the_catalog_checksum_rolls_the_core_when_the_catalog_changes(chart: helm_python.Chart) -> None:
    def checksum(values: dict[str, Any]) -> str | None:
        pod = render(chart, values).one("Deployment", "core")["spec"]["template"]["metadata"]
        return pod.get("annotations", {}).get("checksum/catalog")

    other_catalog = {"core": {"catalog": {"models": [{"name": "other", "provider": "local", "model": "/m.gguf"}]}}}
    assert checksum({}) is not None
    assert checksum({}) == checksum({"bridge": {"replicaCount": 5}})
    assert checksum({}) != checksum(other_catalog)
    assert checksum({"core": {"existingCatalogConfigMap": "my-catalog"}}) is None


def test_an_existing_catalog_config_map_replaces_the_charts(chart: helm_python.Chart) -> None:
    release = render(chart, {"core": {"existingCatalogConfigMap": "my-catalog"}})
    assert release.all("ConfigMap") == []
    volumes = release.one("Deployment", "core")["spec"]["template"]["spec"]["volumes"]
    (config,) = [v for v in volumes if "projected" in v]
    items = [{"key": "catalog.yaml", "path": "catalog.yaml"}]
    assert {"configMap": {"name": "my-catalog", "items": items}} in config["projected"]["sources"]


def test_the_chart_makes_an_api_key_only_without_an_existing_secret(
    default_release: Rendered, full_release: Rendered
) -> None:
    assert full_release.all("Secret") == []
    secret = default_release.one("Secret", "core")  # the core checks the keys; the bridge holds none
    (keys_file,) = secret["data"].values()
    keys = base64.b64decode(keys_file).decode().split()
    assert len(keys) == 1 and keys[0].startswith("mm-") and len(keys[0]) >= 16


def test_notes_point_at_the_keys_the_core_reads(default_release: Rendered, full_release: Rendered) -> None:
    notes = default_release.files["modelmax/templates/NOTES.txt"]
    assert "get secret modelmax-api-keys -o jsonpath='{.data.api-keys}' | base64 -d" in notes
    assert "bridge.apiKeys" not in notes and "modelmax keys" not in notes  # no database: static keys only
    notes = full_release.files["modelmax/templates/NOTES.txt"]
    assert "<a key from Secret modelmax-api-keys, key keys.txt>" in notes
    assert f"--namespace {NAMESPACE} exec deployment/modelmax-core -- modelmax keys create --name" in notes


def test_resource_names_stay_within_63_characters(chart: helm_python.Chart) -> None:
    release = render(chart, {}, release="a-very-long-release-name-for-a-gateway-of-many-llms-x")
    for manifest in release.manifests:
        assert len(manifest["metadata"]["name"]) <= 63, manifest["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])


# ---- pods: security, probes, images, shutdown ----


def test_pods_run_restricted(release: Rendered) -> None:
    for deployment in release.all("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        # Service links would inject MODELMAX_CORE_PORT=tcp://... (from a Service named modelmax-core).
        assert pod["enableServiceLinks"] is False
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod)
        assert all("hostPath" not in volume for volume in pod["volumes"])
        security = container(deployment)["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        mounts = {m["mountPath"]: m["name"] for m in container(deployment)["volumeMounts"]}
        assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == mounts["/tmp"])


def test_pods_request_resources_and_cap_memory(release: Rendered) -> None:
    for deployment in release.all("Deployment"):
        resources = container(deployment)["resources"]
        assert set(resources["requests"]) == {"cpu", "memory"}
        assert set(resources["limits"]) == {"memory"}


_MI = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
# README "What one request may cost the bridge": the process, plus one body being parsed (up to 30 times its size,
# measured for JSON of many tiny values; parsing runs one request at a time), plus the bodies held meanwhile.
_BRIDGE_BASE_BYTES = 128 * 2**20
_PARSE_FACTOR = 30


def test_the_bridge_s_memory_limit_covers_its_body_limits(release: Rendered) -> None:
    """An 8 MiB JSON body can cost 240 MiB to parse: the limit must hold the worst the body settings allow."""
    bridge = container(release.one("Deployment", "bridge"))
    env = {e["name"]: e.get("value") for e in bridge["env"]}
    limit = bridge["resources"]["limits"]["memory"]
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", limit).groups()  # type: ignore[union-attr]
    body, buffered = int(env["MODELMAX_MAX_BODY_BYTES"]), int(env["MODELMAX_BRIDGE_MAX_BUFFERED_BYTES"])
    assert buffered >= body
    assert int(number) * _MI[unit] >= _BRIDGE_BASE_BYTES + _PARSE_FACTOR * body + buffered, limit


def test_the_limits_redis_url_comes_from_its_secret_only(default_release: Rendered, full_release: Rendered) -> None:
    core = {e["name"]: e for e in container(full_release.one("Deployment", "core"))["env"]}
    assert core["MODELMAX_LIMITS_REDIS_URL"]["valueFrom"] == {
        "secretKeyRef": {"name": "modelmax-limits-redis", "key": "url"}
    }
    assert (core["MODELMAX_LIMITS_FAIL_CLOSED"]["value"], core["MODELMAX_LIMITS_TIMEOUT_SECONDS"]["value"]) == (
        "true",
        "0.5",
    )
    default = {e["name"] for e in container(default_release.one("Deployment", "core"))["env"]}
    assert "MODELMAX_LIMITS_REDIS_URL" not in default  # counted in each process without one


def test_buffered_bytes_below_the_body_limit_are_refused(chart: helm_python.Chart) -> None:
    with pytest.raises(helm_python.HelmRenderError, match="bridge.maxBufferedBytes must be at least"):
        render(chart, {"bridge": {"maxBodyBytes": 1024, "maxBufferedBytes": 1000}})


def test_core_probes_are_native_grpc_on_the_grpc_port(release: Rendered) -> None:
    """On the gRPC port; with core.tls on the plaintext health-only port, as the kubelet's probes cannot speak TLS."""
    core = release.one("Deployment", "core")
    grpc_port = container_port(core, "health" if release.values["core"]["tls"]["existingSecret"] else "grpc")
    probes = {name: container(core)[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    for probe in probes.values():
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}
        assert probe["grpc"]["port"] == grpc_port
    # Readiness asks for the CompletionService itself (the core serves it and the overall "" status).
    assert probes["readinessProbe"]["grpc"]["service"] == "modelmax.v1.CompletionService"


def test_bridge_probes_are_http_on_the_api_port(release: Rendered) -> None:
    bridge = release.one("Deployment", "bridge")
    liveness, readiness = container(bridge)["livenessProbe"], container(bridge)["readinessProbe"]
    assert liveness["httpGet"] == {"path": "/healthz", "port": "http"}
    assert readiness["httpGet"] == {"path": "/readyz", "port": "http"}
    container_port(bridge, "http")


def test_images_are_pinned(default_release: Rendered, full_release: Rendered) -> None:
    app_version = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["appVersion"]
    pyproject = tomllib.loads((CHART_DIR.parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    assert app_version == pyproject["project"]["version"], "the chart deploys the release it ships with"
    assert (
        container(default_release.one("Deployment", "core"))["image"] == f"ghcr.io/modelmax/modelmax-core:{app_version}"
    )
    assert container(default_release.one("Deployment", "bridge"))["image"].endswith(f"/modelmax-bridge:{app_version}")
    assert container(full_release.one("Deployment", "core"))["image"].endswith("/modelmax-core@sha256:" + "a" * 64)
    assert container(full_release.one("Deployment", "bridge"))["image"].endswith("/modelmax-bridge:0.1.0-rc.1")
    for release in (default_release, full_release):
        for deployment in release.all("Deployment"):
            image = container(deployment)["image"]
            assert not image.endswith(":latest") and re.search(r"(:[\w][\w.-]*|@sha256:[0-9a-f]{64})$", image)


def test_grace_period_outlasts_the_prestop_sleep_and_the_drain(release: Rendered) -> None:
    sleep = release.values["preStopSleepSeconds"]
    for deployment in release.all("Deployment"):
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        drain = release.values[component]["drainSeconds"]
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace == sleep + drain + release.values["terminationGraceMarginSeconds"]
        assert grace > sleep + drain
        assert container(deployment)["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(sleep)]


def test_no_prestop_hook_when_the_sleep_is_zero(chart: helm_python.Chart) -> None:
    release = render(chart, merged(FULL_VALUES, {"preStopSleepSeconds": 0}))
    for deployment in release.all("Deployment"):
        assert "lifecycle" not in container(deployment)
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 0
