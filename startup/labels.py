"""Labelled metric children resolved once, for the core's and the bridge's hot paths."""

from __future__ import annotations

from prometheus_client.metrics import MetricWrapperBase


class Children:
    """A metric's labelled children, resolved once per label values: `labels()` costs a lock and a few lookups on
    every call, and the hot path records several metrics per request (the label sets are bounded, so is this)."""

    __slots__ = ("_metric", "_children")

    def __init__(self, metric: MetricWrapperBase) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], MetricWrapperBase] = {}

    def __call__(self, *values: str) -> MetricWrapperBase:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child
