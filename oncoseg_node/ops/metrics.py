"""Prometheus metrics in the text exposition format (version 0.0.4), no client library.

The node needs three kinds: counters and histograms updated where things
happen (worker, delivery), and gauges read at scrape time from the ledger,
the spool and the listener (jobs by state, queue depth, free disk), so a
gauge can never drift from the state it describes. That is a few dozen lines;
``prometheus_client`` would add a dependency and a process-global registry
that tests and a second ``Service`` in one process would share.

Format reference: https://prometheus.io/docs/instrumenting/exposition_formats/
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]
Sample = tuple[dict[str, str], float]
M = TypeVar("M", bound="_Metric")

# Contouring a CT takes seconds on the classical engine and up to minutes
# with SAM3 on many structures; buckets span both.
SEGMENTATION_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
# Series complete to accepted by the planning system: seconds when all is
# well, up to hours when a destination is down and backoff runs.
DELIVERY_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 900, 1800, 3600, 14400)
# One C-STORE of one structure set.
ATTEMPT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def format_sample(name: str, labels: dict[str, str] | Labels, value: float) -> str:
    items = labels.items() if isinstance(labels, dict) else labels
    if not items:
        return f"{name} {format_value(value)}"
    inner = ",".join(f'{key}="{escape_label_value(str(val))}"' for key, val in items)
    return f"{name}{{{inner}}} {format_value(value)}"


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> Labels:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {sorted(labels)}")
        return tuple((name, str(labels[name])) for name in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A value that only goes up (reset to 0 when the process restarts)."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        super().__init__(name, help_text, labelnames)
        self._values: dict[Labels, float] = {} if labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter cannot go down")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [*self.header(), *(format_sample(self.name, key, v) for key, v in items)]


class Histogram(_Metric):
    """Observations counted into cumulative ``le`` buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float],
                 labelnames: Sequence[str] = ()) -> None:
        if "le" in labelnames:
            raise ValueError("'le' is reserved for histogram buckets")
        if list(buckets) != sorted(set(buckets)) or not buckets:
            raise ValueError("buckets must be strictly increasing")
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(float(b) for b in buckets)
        # per label set: counts per finite bucket (non-cumulative), +Inf count, sum
        self._series: dict[Labels, tuple[list[int], list[float]]] = {}
        if not labelnames:
            self._series[()] = ([0] * (len(self.buckets) + 1), [0.0])

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        index = next((i for i, bound in enumerate(self.buckets) if value <= bound),
                     len(self.buckets))
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[index] += 1
            total[0] += value

    def count(self, **labels: str) -> int:
        with self._lock:
            series = self._series.get(self._key(labels))
            return sum(series[0]) if series else 0

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted((key, (list(c), t[0])) for key, (c, t) in self._series.items())
        for key, (counts, total) in items:
            running = 0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                running += count
                lines.append(format_sample(f"{self.name}_bucket",
                                           (*key, ("le", format_value(bound))), running))
            lines.append(format_sample(f"{self.name}_sum", key, total))
            lines.append(format_sample(f"{self.name}_count", key, running))
        return lines


class Gauge(_Metric):
    """A value read when scraped: ``read`` returns ``[(labels, value), ...]``."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], Iterable[Sample]],
                 *, kind: str = "gauge") -> None:
        super().__init__(name, help_text)
        self.read = read
        self.kind = kind  # a counter kept elsewhere (e.g. the listener's) is read the same way

    def render(self) -> list[str]:
        return [*self.header(), *(format_sample(self.name, labels, value)
                                  for labels, value in self.read())]


class Registry:
    """The metrics of one node, rendered together for ``/metrics``."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._lock = threading.Lock()

    def register(self, metric: M) -> M:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} is registered twice")
            self._metrics[metric.name] = metric
        return metric

    def gauge(self, name: str, help_text: str, read: Callable[[], Iterable[Sample]],
              *, kind: str = "gauge") -> None:
        """Register a value read at scrape time (replacing an earlier one of that name)."""
        with self._lock:
            self._metrics[name] = Gauge(name, help_text, read, kind=kind)

    def render(self) -> str:
        with self._lock:
            metrics = list(self._metrics.values())
        lines: list[str] = []
        for metric in metrics:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


class NodeMetrics(Registry):
    """The node's event metrics; the service adds the scrape-time gauges."""

    def __init__(self) -> None:
        super().__init__()
        self.segmentation_seconds: Histogram = self.register(Histogram(
            "oncoseg_segmentation_seconds",
            "Seconds to contour one series (all engines and sanity flags of one job).",
            SEGMENTATION_BUCKETS))
        self.delivery_latency_seconds: Histogram = self.register(Histogram(
            "oncoseg_delivery_latency_seconds",
            "Seconds from series complete (job created) to the destination accepting its "
            "RT Structure Set, retries and backoff included.",
            DELIVERY_BUCKETS, ["destination"]))
        self.delivery_attempt_seconds: Histogram = self.register(Histogram(
            "oncoseg_delivery_attempt_seconds",
            "Seconds one delivery attempt (association, C-STORE, release) took.",
            ATTEMPT_BUCKETS, ["destination", "outcome"]))
        self.jobs_finished: Counter = self.register(Counter(
            "oncoseg_jobs_processed_total",
            "Jobs the worker finished processing, by the state they left the worker in.",
            ["state"]))
