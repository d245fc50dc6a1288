"""Labelled metric children resolved once, for the core's and the bridge's hot paths."""

from __future__ import annotations

from typing import Generic, TypeVar

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
