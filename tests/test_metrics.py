"""The node's /metrics: per-node registry, scrape-time values, and a strict check of the page."""

from __future__ import annotations

import math
import re

import pytest
from prometheus_client import REGISTRY

from oncoseg_node.delivery.scheduler import DeliveryMetrics, DeliveryScheduler
from oncoseg_node.ledger import DeliveryState, Ledger
from oncoseg_node.ops.metrics import NodeMetrics
from oncoseg_node.ops.worker import WorkerMetrics

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
SAMPLE = re.compile(rf"^({NAME})(?:\{{({LABEL}(?:,{LABEL})*)\}})? (\S+)$")


def parse(text: str) -> dict[str, dict]:
    """A strict reader of exposition format 0.0.4: families with HELP, TYPE and samples.

    Raises AssertionError on anything a Prometheus server would reject.
    """
    assert text.endswith("\n")
    families: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in families, f"{name} twice"
            current = families[name] = {"help": line.split(" ", 3)[3], "samples": []}
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert current is families.get(name), f"TYPE {name} without its HELP"
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            current["type"] = kind
        else:
            match = SAMPLE.match(line)
            assert match, f"bad sample line {line!r}"
            name, labels, value = match.groups()
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            family = families.get(name) or families.get(base)
            assert family is current, f"{name} outside its family"
            float(value.replace("+Inf", "inf"))
            pairs = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"',
                                    labels or ""))
            family["samples"].append((name, pairs, float(value.replace("+Inf", "inf"))))
    for name, family in families.items():
        if family.get("type") == "histogram":
            check_histogram(name, family["samples"])
    return families


def check_histogram(name: str, samples: list) -> None:
    series: dict[tuple, dict] = {}
    for sample, labels, value in samples:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        entry = series.setdefault(key, {"buckets": []})
        if sample.endswith("_bucket"):
            entry["buckets"].append((float(labels["le"].replace("+Inf", "inf")), value))
        else:
            entry[sample.rsplit("_", 1)[1]] = value
    for entry in series.values():
        bounds = [b for b, _ in entry["buckets"]]
        counts = [c for _, c in entry["buckets"]]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf, name
        assert counts == sorted(counts), f"{name}: buckets not cumulative"
        assert counts[-1] == entry["count"], f"{name}: +Inf bucket differs from count"
        assert "sum" in entry


def test_node_metrics_page_is_valid_exposition_format():
    metrics = NodeMetrics()
    worker, delivery = WorkerMetrics(), DeliveryMetrics()
    metrics.add(worker.collectors())
    metrics.add(delivery.collectors())
    worker.segmentation_seconds.observe(4.2)
    worker.jobs_finished.labels(state="delivering").inc()
    delivery.delivery_latency_seconds.labels(destination="tps").observe(31.0)
    delivery.delivery_attempt_seconds.labels(destination="tps", outcome="delivered").observe(0.3)
    delivery.deliveries_failed.labels(destination="tps").inc()
    metrics.gauge("oncoseg_jobs", "Jobs by state.",
                  lambda: [({"state": "queued"}, 2), ({"state": "sent"}, 7)])
    metrics.gauge("oncoseg_instances_refused_total", "Refused.",
                  lambda: [({"status": "0xA900"}, 3)], kind="counter")
    text = metrics.render()
    families = parse(text)
    assert families["oncoseg_segmentation_seconds"]["type"] == "histogram"
    latency = families["oncoseg_delivery_latency_seconds"]["samples"]
    assert ("oncoseg_delivery_latency_seconds_count", {"destination": "tps"}, 1.0) in latency
    assert ("oncoseg_jobs", {"state": "sent"}, 7.0) in families["oncoseg_jobs"]["samples"]
    assert families["oncoseg_instances_refused_total"]["type"] == "counter"
    assert ("oncoseg_instances_refused_total", {"status": "0xA900"}, 3.0) in \
        families["oncoseg_instances_refused_total"]["samples"]
    assert metrics.value("oncoseg_deliveries_failed_total", destination="tps") == 1
    assert metrics.value("oncoseg_jobs_processed_total", state="delivering") == 1


def test_gauge_is_read_at_scrape_time():
    metrics = NodeMetrics()
    state = {"depth": 3}
    metrics.gauge("demo_depth", "Queue depth\nnow.", lambda: [({}, state["depth"])])
    assert "demo_depth 3.0\n" in metrics.render()
    state["depth"] = 0
    text = metrics.render()
    assert "demo_depth 0.0\n" in text
    assert "# HELP demo_depth Queue depth\\nnow.\n" in text
    # registered again under the same name: the new reader replaces the old one
    metrics.gauge("demo_depth", "Queue depth.", lambda: [({}, 9)])
    assert metrics.value("demo_depth") == 9 and metrics.render().count("# TYPE demo_depth") == 1


@pytest.mark.parametrize("kind, name", [("counter", "no_suffix"), ("summary", "x")])
def test_scrape_time_values_must_be_gauges_or_counters_named_total(kind, name):
    with pytest.raises(ValueError):
        NodeMetrics().gauge(name, "x", lambda: [], kind=kind)


def test_two_nodes_in_one_process_count_their_own_work():
    first, second = NodeMetrics(), NodeMetrics()
    first_worker, second_worker = WorkerMetrics(), WorkerMetrics()
    first.add(first_worker.collectors())
    second.add(second_worker.collectors())
    first_worker.jobs_finished.labels(state="sent").inc()
    assert first.value("oncoseg_jobs_processed_total", state="sent") == 1
    assert second.value("oncoseg_jobs_processed_total", state="sent") is None
    # nothing lands in prometheus_client's process-global registry
    assert REGISTRY.get_sample_value("oncoseg_jobs_processed_total", {"state": "sent"}) is None
    with pytest.raises(ValueError):  # one collector cannot be served twice by one node
        first.add(first_worker.collectors())


def test_delivery_latency_runs_from_series_complete_to_accepted(make_config):
    """Observed from the ledger's own times, whichever way the delivery was confirmed."""
    config = make_config()
    now = [1000.0]
    ledger = Ledger(config.ledger_path, clock=lambda: now[0])
    ledger.record_instance(sop_instance_uid="1.1", series_uid="1", study_uid="2",
                           sop_class_uid="1.2.840.10008.5.1.4.1.1.2", relpath="objects/a.dcm",
                           sha256="0" * 64, size=1, calling_ae="CTSIM")
    now[0] = 1010.0
    job_id = ledger.close_series("1")  # series complete at t = 1010
    ledger.claim(3)
    ledger.start_deliveries(job_id, [("tps", "9.9", "outbox/x.dcm")])
    (delivery,) = ledger.deliveries(job_id=job_id)
    metrics = NodeMetrics()
    scheduler = DeliveryScheduler(config, ledger)
    metrics.add(scheduler.metrics.collectors())
    scheduler.observe_delivered(delivery.id)  # still pending: nothing to observe
    assert not metrics.value("oncoseg_delivery_latency_seconds_count", destination="tps")
    now[0] = 1052.5
    ledger.record_attempt(delivery.id, state=DeliveryState.DELIVERED, status=0, reason="committed")
    scheduler.observe_delivered(delivery.id)
    text = metrics.render()
    assert 'oncoseg_delivery_latency_seconds_sum{destination="tps"} 42.5\n' in text
    assert 'oncoseg_delivery_latency_seconds_bucket{destination="tps",le="30.0"} 0.0\n' in text
    assert 'oncoseg_delivery_latency_seconds_bucket{destination="tps",le="60.0"} 1.0\n' in text
    ledger.close()
