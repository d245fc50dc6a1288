"""What the core's and the bridge's metrics share: labelled children resolved once for the hot paths, and the
process-wide series of each component's registry (process, platform, build info)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Gauge, PlatformCollector, ProcessCollector, disable_created_metrics
from prometheus_client.metrics import MetricWrapperBase

# The metric's own type (Counter, Gauge, Histogram...): `labels()` returns a child of the same type, so the child's
# `inc()`/`observe()`/`dec()` type-check.
_M = TypeVar("_M", bound=MetricWrapperBase)


class Children(Generic[_M]):
    """A metric's labelled children, resolved once per label values: `labels()` costs a lock and a few lookups on
    every call, and the hot path records several metrics per request (the label sets are bounded, so is this)."""

    __slots__ = ("_metric", "_children")

    def __init__(self, metric: _M) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], _M] = {}

    def __call__(self, *values: str) -> _M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


def process_metrics(registry: CollectorRegistry, component: str) -> None:
    """Process metrics (CPU, memory, open files: `process_*`), `python_info` and `modelmax_build_info{component,
    version, python_version}` = 1 in `registry`; and no `_created` series from here on, in the whole process.

    Call it before creating any other metric: prometheus_client's switch is process-wide, and a `_created` series is
    one more series per labelled child that no dashboard reads (Prometheus 2.x stores it as a plain gauge).
    """
    disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    Gauge(
        "modelmax_build_info", "1, labelled with the component, the ModelMax version and the Python version.",
        ["component", "version", "python_version"], registry=registry,
    ).labels(component, _version(), platform.python_version()).set(1)  # fmt: skip


def _version() -> str:
    try:
        return version("modelmax")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"
