"""The node's Prometheus metrics: one registry per node, exposed by prometheus_client.

Two kinds of metric are served. Counters and histograms are updated where
things happen; each stage owns its own (the worker's
:class:`~oncoseg_node.ops.worker.WorkerMetrics`, the scheduler's
:class:`~oncoseg_node.delivery.scheduler.DeliveryMetrics`) and the service
registers them here, so no stage imports this later one. Gauges are read at
scrape time from the ledger, the spool and the listener (jobs by state,
queue depth, free disk) by :class:`ScrapeTimeCollector`, so a gauge can
never drift from the state it describes.

The registry is a :class:`prometheus_client.CollectorRegistry` of this node,
not the library's process-global one: a second node in one process (the
tests run many) counts its own work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# generate_latest writes text exposition format 0.0.4
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

Sample = tuple[dict[str, str], float]
Reader = Callable[[], Iterable[Sample]]


@dataclass(frozen=True)
class _Scraped:
    help_text: str
    read: Reader
    kind: str  # "gauge", or "counter" for a count kept by the part itself


class ScrapeTimeCollector(Collector):
    """Values read from the node's parts each time ``/metrics`` is scraped."""

    def __init__(self) -> None:
        self._readers: dict[str, _Scraped] = {}
        self._lock = threading.Lock()

    def add(self, name: str, help_text: str, read: Reader, kind: str = "gauge") -> None:
        if kind not in ("gauge", "counter"):
            raise ValueError(f"{name}: a scrape-time value is a gauge or a counter, not {kind}")
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        with self._lock:
            self._readers[name] = _Scraped(help_text, read, kind)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            readers = sorted(self._readers.items())
        for name, scraped in readers:
            samples = list(scraped.read())
            labelnames = sorted({key for labels, _ in samples for key in labels})
            family: GaugeMetricFamily | CounterMetricFamily
            if scraped.kind == "counter":
                family = CounterMetricFamily(name, scraped.help_text, labels=labelnames)
            else:
                family = GaugeMetricFamily(name, scraped.help_text, labels=labelnames)
            for labels, value in samples:
                family.add_metric([labels.get(key, "") for key in labelnames], float(value))
            yield family


class NodeMetrics:
    """Everything ``/metrics`` shows for one node."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._scraped = ScrapeTimeCollector()
        self.registry.register(self._scraped)

    def add(self, collectors: Iterable[Collector]) -> None:
        """Serve a stage's own counters and histograms."""
        for collector in collectors:
            self.registry.register(collector)

    def gauge(self, name: str, help_text: str, read: Reader, *, kind: str = "gauge") -> None:
        """Serve a value read at scrape time (replacing an earlier one of that name).

        ``read`` returns ``[(labels, value), ...]``; ``kind="counter"`` serves
        a count the part keeps itself (the listener's instances received).
        """
        self._scraped.add(name, help_text, read, kind)

    def value(self, name: str, **labels: str) -> float | None:
        """One sample as a scrape would show it (None when absent)."""
        return self.registry.get_sample_value(name, labels)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
