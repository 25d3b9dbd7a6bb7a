"""deploy/grafana/strip-inspector.json: valid dashboard JSON whose every query names only metrics the
service exports (read from the service's own metrics object), covering throughput, latency, lag, dead
letters and model reloads."""

from __future__ import annotations

import json
from typing import Any

from tests.helpers.deploy import DEPLOY, METRIC, exported_names

DASHBOARD = DEPLOY / "grafana" / "strip-inspector.json"


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    found = [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found.append((f"variable {variable['name']}", variable["query"]["query"]))
    return found


def test_every_query_names_metrics_the_service_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_names()
    assert "inspector_frames_consumed_total" in exported and "inspector_model_info" in exported
    found = queries(dashboard)
    assert len(found) >= 10
    for title, expr in found:
        names = set(METRIC.findall(expr))
        assert names, f"{title}: {expr!r} names no inspector metric"
        assert names <= exported, f"{title}: {sorted(names - exported)} are not exported by inspector.metrics"


def test_panels_cover_throughput_latency_lag_dead_letters_and_reloads() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = {name for _, expr in queries(dashboard) for name in METRIC.findall(expr)}
    for metric in ("inspector_frames_consumed_total", "inspector_events_produced_total",
                   "inspector_event_latency_seconds_bucket", "inspector_consumer_lag", "inspector_dead_lettered_total",
                   "inspector_model_reloads_total"):
        assert metric in used, f"no panel shows {metric}"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"  # the datasource is chosen on import
