"""A metric's labelled children kept by their label values, for the metrics observed on every message."""

from typing import Generic, TypeVar

from prometheus_client import Counter, Histogram

M = TypeVar("M", Counter, Histogram)


class Labelled(Generic[M]):
    """`metric.labels(*values)`, looked up once per distinct values: `labels()` builds and checks its key and
    takes a lock on every call. Every label value the worker uses comes from a closed set (or a configured
    tenant id), and no series is ever removed, so the children kept here are few and stay the metric's own."""

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child
