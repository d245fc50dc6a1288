"""The Grafana dashboard queries only metrics the code exports, uses each the way its type allows, and ships in the
chart's ConfigMap unchanged."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm.conftest import CHART_DIR, Rendered

DASHBOARD = CHART_DIR / "dashboards" / "modelmax.json"

# The metrics the core and the bridge export (issues 6 and 18), by type. Counters are exposed with a _total suffix.
COUNTERS = {
    "modelmax_core_requests_total",
    "modelmax_core_upstream_errors_total",
    "modelmax_core_retries_total",
    "modelmax_core_fallbacks_total",
    "modelmax_core_key_requests_total",
    "modelmax_core_key_tokens_total",
    "modelmax_bridge_requests_total",
}
GAUGES = {"modelmax_core_inflight_streams", "modelmax_bridge_inflight_streams", "modelmax_core_deployment_state"}
HISTOGRAMS = {
    "gen_ai_server_request_duration_seconds",
    "gen_ai_server_time_to_first_token_seconds",
    "gen_ai_server_time_per_output_token_seconds",
    "gen_ai_client_token_usage",
    "gen_ai_client_operation_duration_seconds",
    "modelmax_core_overhead_seconds",
    "modelmax_bridge_request_duration_seconds",
    "modelmax_bridge_time_to_first_chunk_seconds",
    "modelmax_bridge_overhead_seconds",
}
# The GenAI conventions' attributes (services/genai.py), as Prometheus labels.
GENAI = {"gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_response_model"}
LABELS = {
    "modelmax_core_requests_total": {"model", "provider", "status"},
    "modelmax_core_upstream_errors_total": {"model", "provider", "reason"},
    "modelmax_core_retries_total": {"model", "provider"},
    "modelmax_core_fallbacks_total": {"model"},
    "modelmax_core_key_requests_total": {"key_id", "gen_ai_request_model", "error_type"},
    "modelmax_core_key_tokens_total": {"key_id", "gen_ai_request_model", "gen_ai_token_type"},
    "modelmax_core_inflight_streams": {"model", "provider"},
    "modelmax_core_deployment_state": {"gen_ai_request_model", "deployment", "gen_ai_provider_name", "state"},
    "modelmax_bridge_requests_total": {"model", "status"},
    "modelmax_bridge_inflight_streams": {"model"},
    "gen_ai_server_request_duration_seconds": GENAI | {"error_type"},
    "gen_ai_server_time_to_first_token_seconds": GENAI | {"error_type"},
    "gen_ai_server_time_per_output_token_seconds": GENAI | {"error_type"},
    "gen_ai_client_token_usage": GENAI | {"gen_ai_token_type"},
    "gen_ai_client_operation_duration_seconds": GENAI | {"server_address", "error_type"},
    "modelmax_core_overhead_seconds": {"model", "provider"},
    "modelmax_bridge_request_duration_seconds": {"model", "stream"},
    "modelmax_bridge_time_to_first_chunk_seconds": {"model"},
    "modelmax_bridge_overhead_seconds": {"model"},
}
# Which label names the model and the provider in each family: the conventions' on gen_ai_* (and the series
# labelled like them), the catalog's `model` and `provider` (its kind) on the other modelmax_* metrics.
MODEL_LABELS = {"model", "gen_ai_request_model"}
PROVIDER_LABELS = {"provider", "gen_ai_provider_name"}
# Labels Prometheus adds to every scraped series (the ServiceMonitor's target labels), plus `le` of histograms.
TARGET_LABELS = {"namespace", "job", "instance", "pod", "service", "container", "endpoint"}
# Identifiers that look like metric names: our prefixes, or the suffixes of counters and histogram series.
METRIC = re.compile(r"\b(?:(?:gen_ai|modelmax)_[a-z0-9_]+|[a-z_][a-z0-9_]*_(?:total|seconds|bucket|count|sum))\b")
SERIES_SUFFIX = re.compile(r"_(bucket|count|sum)$")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def expressions() -> list[str]:
    queries = [t["expr"] for p in panels() for t in p["targets"]]
    queries += [v["query"]["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    return queries


def referenced(expr: str) -> set[str]:
    """Metric families an expression names (a histogram's _bucket/_count/_sum series count as the histogram)."""
    out = set()
    expr = re.sub(r'"[^"]*"', '""', expr)  # ignore label values such as "5.."
    # and label names (gen_ai_request_model looks like a metric): groupings, selectors, label_values' second argument
    expr = re.sub(r"\bby \([^)]*\)|\{[^}]*\}|,\s*\w+\)$", "", expr)
    for name in METRIC.findall(expr):
        family = SERIES_SUFFIX.sub("", name)
        out.add(family if family in HISTOGRAMS else name)
    return out


def test_queries_reference_only_exported_metrics() -> None:
    used = set().union(*(referenced(e) for e in expressions()))
    assert used <= COUNTERS | GAUGES | HISTOGRAMS, used - (COUNTERS | GAUGES | HISTOGRAMS)
    assert used == COUNTERS | GAUGES | HISTOGRAMS, "every exported metric has a panel"


def test_metrics_are_used_as_their_type_allows() -> None:
    for expr in expressions():
        for name in METRIC.findall(expr):
            if name in GAUGES:
                assert not re.search(rf"(rate|increase)\({name}\b", expr), f"rate() of gauge {name}: {expr}"
            if name in COUNTERS and not expr.startswith("label_values("):
                assert re.search(rf"(rate|increase)\({name}\b", expr), f"counter {name} without rate(): {expr}"
            if SERIES_SUFFIX.sub("", name) in HISTOGRAMS:
                assert name.endswith(("_bucket", "_count", "_sum")), f"histogram {name} needs a series suffix"
        for match in re.finditer(r"histogram_quantile\(([0-9.]+), sum by \(([^)]*)\) \(rate\(([a-z_]+)\{", expr):
            quantile, grouping, series = float(match[1]), {g.strip() for g in match[2].split(",")}, match[3]
            assert 0 < quantile < 1 and series.endswith("_bucket") and "le" in grouping, expr


def test_queries_group_and_filter_by_labels_the_metrics_have() -> None:
    for expr in expressions():
        families = referenced(expr)
        allowed = set().union(*(LABELS[f] for f in families)) | TARGET_LABELS | {"le"}
        for grouping in re.findall(r"by \(([^)]*)\)", expr):
            assert {g.strip() for g in grouping.split(",")} <= allowed, expr
        for selector in re.findall(r"\{([^}]*)\}", expr):
            assert {m for m in re.findall(r"(\w+)\s*[=!]~?", selector)} <= allowed, expr


def test_panels_show_what_issues_6_and_18_ask_for() -> None:
    titles = " | ".join(p["title"].lower() for p in panels())
    for wanted in (
        "requests/s",
        "error",
        "request duration",
        "time to first token",
        "tokens/s",
        "overhead",
        "in-flight",
        "retries",
        "fallbacks",
        "deployment state",
        "by key",
        "upstream call duration by model, provider and server address",
    ):
        assert wanted in titles, wanted
    for expr in expressions():  # every breakdown is by model, and by provider where the metric has one
        labels = set().union(*(LABELS[f] for f in referenced(expr)))
        dimensions = [names for names in (MODEL_LABELS, PROVIDER_LABELS) if names & labels]
        for grouping in re.findall(r"by \(([^)]*)\)", expr):
            names = {g.strip() for g in grouping.split(",")} - {"le"}
            assert not names or all(names & wanted for wanted in dimensions), expr  # `sum by (le)`: overall
    latency = [p for p in panels() if p["fieldConfig"]["defaults"]["unit"] == "s" and p["type"] == "timeseries"]
    assert all({t["legendFormat"].split()[0] for t in p["targets"]} == {"p50", "p95", "p99"} for p in latency)


def test_gen_ai_panels_use_the_conventions_labels_and_filter_by_them() -> None:
    """The gen_ai_* metrics have no `model`, `provider`, `token_type` or `status` label any more (issue 18)."""
    for expr in expressions():
        families = referenced(expr)
        if not any(f.startswith("gen_ai_") for f in families):
            continue
        assert not re.search(r"\b(model|provider|token_type|status)\s*[=!]~?", expr), expr
        if not expr.startswith("label_values("):
            assert 'gen_ai_request_model=~"$model"' in expr and 'gen_ai_provider_name=~"$provider"' in expr, expr
    board = dashboard()["templating"]["list"]
    variables = {v["name"]: v["query"]["query"] for v in board if v["type"] == "query"}
    assert variables["model"].endswith(", gen_ai_request_model)") and "gen_ai_" in variables["model"]
    assert variables["provider"].endswith(", gen_ai_provider_name)") and "gen_ai_" in variables["provider"]


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] == "ModelMax" and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "namespace", "model", "provider"}
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(t["datasource"] == panel["datasource"] for t in panel["targets"])
        for target in panel["targets"]:
            assert set(re.findall(r"\$(\w+)", target["expr"])) <= variables | {"__rate_interval"}


def test_expressions_parse_as_promql(tmp_path: Path) -> None:
    """promtool (installed by `make tools`) parses each query as a recording rule; Grafana's variables filled in."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make tools installs it)")
    rules = [
        {"record": f"modelmax:check:{index}", "expr": expr.replace("$__rate_interval", "5m")}
        for index, expr in enumerate(expressions())
        if not expr.startswith("label_values(")
    ]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_chart_ships_the_dashboard_unchanged(full_release: Rendered) -> None:
    config_map = full_release.named("ConfigMap", "modelmax-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    (document,) = config_map["data"].values()
    assert json.loads(document) == dashboard()
    assert len(document.encode()) < 256 * 1024
