"""The Grafana dashboard (deploy/grafana/stream-detector.json) against the service's own metrics, with no
Grafana or Prometheus needed: every metric name its queries use is one a real `Metrics()` exposes (a
renamed metric fails here), the panels operators look for exist, every panel reads a Prometheus
datasource through the DS_PROMETHEUS variable, and rate()/histogram_quantile() are applied only to
series they are meaningful for. tests/test_prometheus_real.py runs the same queries on a live
Prometheus."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stream_detector.service.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "stream-detector.json"

REQUIRED_PANELS = (
    "Events consumed /s",
    "Consumer lag",
    "Batch fill ratio",
    "Inference latency p99",
    "Alerts by state /s",
    "Open alerts",
    "Threshold quantiles",
    "Model",
    "Dead letters /s",
    "Ready",
)
# The sample names a family of each type puts in a scrape (prometheus-client, text format).
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum"), "info": ("_info",)}
METRIC = re.compile(r"\bstream_detector_[a-z0-9_]+")
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included; rows themselves are not panels with queries."""
    stack = list((board or dashboard())["panels"])
    while stack:
        p = stack.pop(0)
        stack[:0] = p.get("panels", [])
        if p.get("type") != "row":
            yield p


def exprs(board: dict[str, Any] | None = None) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query target."""
    return [(p["title"], t.get("refId", "?"), t["expr"]) for p in panels(board) for t in p.get("targets", [])]


def exported_names(metrics: Metrics | None = None) -> set[str]:
    """The series names a scrape of the service can contain: each sample name, and for every family
    (also a labelled one that has no child yet) the names its type gives it."""
    if metrics is None:
        metrics = Metrics()
        metrics.set_model("v1", "CPUExecutionProvider", window=8, n_features=4)
    names: set[str] = set()
    for family in metrics.registry.collect():
        names |= {s.name for s in family.samples}
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ())}
    return names


def base_name(name: str) -> str:
    return re.sub(r"_(bucket|count|sum|total|info)$", "", name)


def test_dashboard_is_a_grafana_model_with_a_prometheus_datasource_variable():
    board = dashboard()
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(board):
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, p["title"]


def test_required_panels_exist():
    titles = [p["title"] for p in panels()]
    missing = [t for t in REQUIRED_PANELS if t not in titles]
    assert not missing, f"panels missing from the dashboard: {missing}"


def test_every_panel_and_query_reads_prometheus_through_the_variable():
    want = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for p in panels():
        assert p.get("datasource") == want, f"panel {p['title']!r}: datasource {p.get('datasource')}"
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t.get("datasource", want) == want, f"panel {p['title']!r} query {t.get('refId')}"
            assert t.get("expr", "").strip(), f"panel {p['title']!r} query {t.get('refId')} has no expr"


def test_every_metric_the_dashboard_queries_is_exported_by_the_service():
    exported = exported_names()
    used: dict[str, list[str]] = {}
    for title, ref, expr in exprs():
        for name in METRIC.findall(expr):
            used.setdefault(name, []).append(f"{title}/{ref}")
    assert used, "the dashboard queries no stream_detector_ metric"
    families = {base_name(n) for n in exported}
    wrong = {
        name: (where, "the family exists, not this series" if base_name(name) in families else "no such family")
        for name, where in used.items()
        if name not in exported
    }
    assert not wrong, f"the dashboard queries series the service does not export: {wrong}"


def test_rate_and_quantiles_apply_to_counters_and_histogram_buckets_only():
    for title, ref, expr in exprs():
        for fn, name in re.findall(r"\b(rate|increase|irate)\(\s*(stream_detector_[a-z0-9_]+)", expr):
            assert re.search(r"_(total|bucket|count|sum)$", name), f"{title}/{ref}: {fn}() over the gauge {name}"
        for name in re.findall(r"histogram_quantile\([^,]+,.*?(stream_detector_[a-z0-9_]+)", expr):
            assert name.endswith("_bucket"), f"{title}/{ref}: histogram_quantile over {name}"


def test_queries_use_only_defined_variables():
    board = dashboard()
    defined = {v["name"] for v in board["templating"]["list"]} | GRAFANA_BUILTINS
    for title, ref, expr in exprs(board):
        for var in re.findall(r"\$\{?(\w+)", expr):
            assert var in defined, f"{title}/{ref}: ${var} is not a dashboard variable"


@pytest.mark.parametrize("name", ["stream_detector_events_consumed_total", "stream_detector_model_info"])
def test_exported_names_follow_the_scrape(name):
    """The name set the checks above use is the one a scrape has (counter _total, info _info)."""
    exported = exported_names()
    assert name in exported and base_name(name) not in exported
