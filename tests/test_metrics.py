"""Prometheus text exposition: exact rendering, escaping, and a format check of the whole page."""

from __future__ import annotations

import math
import re

import pytest

from oncoseg_node.delivery.scheduler import DeliveryScheduler
from oncoseg_node.ledger import DeliveryState, Ledger
from oncoseg_node.ops.metrics import Counter, Histogram, NodeMetrics, Registry

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


def test_counter_renders_exactly():
    registry = Registry()
    counter = registry.register(Counter("demo_things_total", "Things seen.", ["kind"]))
    counter.inc(kind="a")
    counter.inc(2.5, kind='say "hi"\\\n')
    assert registry.render() == (
        "# HELP demo_things_total Things seen.\n"
        "# TYPE demo_things_total counter\n"
        'demo_things_total{kind="a"} 1\n'
        'demo_things_total{kind="say \\"hi\\"\\\\\\n"} 2.5\n'
    )
    assert counter.value(kind="a") == 1


def test_histogram_buckets_are_cumulative_with_sum_and_count():
    registry = Registry()
    hist = registry.register(Histogram("demo_seconds", "Durations.", [1, 5, 10]))
    for value in (0.5, 1.0, 3, 7, 100):
        hist.observe(value)
    assert registry.render().splitlines()[2:] == [
        'demo_seconds_bucket{le="1"} 2',
        'demo_seconds_bucket{le="5"} 3',
        'demo_seconds_bucket{le="10"} 4',
        'demo_seconds_bucket{le="+Inf"} 5',
        "demo_seconds_sum 111.5",
        "demo_seconds_count 5",
    ]
    assert hist.count() == 5


def test_gauge_is_read_at_scrape_time():
    registry = Registry()
    state = {"depth": 3}
    registry.gauge("demo_depth", "Queue depth\nnow.", lambda: [({}, state["depth"])])
    assert "demo_depth 3\n" in registry.render()
    state["depth"] = 0
    text = registry.render()
    assert "demo_depth 0\n" in text
    assert "# HELP demo_depth Queue depth\\nnow.\n" in text


@pytest.mark.parametrize("make", [
    lambda: Counter("no_suffix", "x"),
    lambda: Histogram("h", "x", [5, 1]),
    lambda: Histogram("h", "x", [1], ["le"]),
])
def test_invalid_metrics_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_wrong_labels_and_negative_increments_are_refused():
    counter = Counter("c_total", "x", ["destination"])
    with pytest.raises(ValueError):
        counter.inc(state="sent")
    with pytest.raises(ValueError):
        counter.inc(-1, destination="tps")
    registry = Registry()
    registry.register(Counter("c_total", "x"))
    with pytest.raises(ValueError):
        registry.register(Counter("c_total", "x"))


def test_node_metrics_page_is_valid_exposition_format():
    metrics = NodeMetrics()
    metrics.segmentation_seconds.observe(4.2)
    metrics.delivery_latency_seconds.observe(31.0, destination="tps")
    metrics.delivery_attempt_seconds.observe(0.3, destination="tps", outcome="delivered")
    metrics.jobs_finished.inc(state="delivering")
    metrics.gauge("oncoseg_jobs", "Jobs by state.",
                  lambda: [({"state": "queued"}, 2), ({"state": "sent"}, 7)])
    families = parse(metrics.render())
    assert families["oncoseg_segmentation_seconds"]["type"] == "histogram"
    latency = families["oncoseg_delivery_latency_seconds"]["samples"]
    assert ("oncoseg_delivery_latency_seconds_count", {"destination": "tps"}, 1.0) in latency
    assert ("oncoseg_jobs", {"state": "sent"}, 7.0) in families["oncoseg_jobs"]["samples"]


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
    scheduler = DeliveryScheduler(config, ledger, metrics=metrics)
    scheduler.observe_delivered(delivery.id)  # still pending: nothing to observe
    assert metrics.delivery_latency_seconds.count(destination="tps") == 0
    now[0] = 1052.5
    ledger.record_attempt(delivery.id, state=DeliveryState.DELIVERED, status=0, reason="committed")
    scheduler.observe_delivered(delivery.id)
    text = metrics.render()
    assert 'oncoseg_delivery_latency_seconds_sum{destination="tps"} 42.5\n' in text
    assert 'oncoseg_delivery_latency_seconds_bucket{destination="tps",le="30"} 0\n' in text
    assert 'oncoseg_delivery_latency_seconds_bucket{destination="tps",le="60"} 1\n' in text
    ledger.close()
