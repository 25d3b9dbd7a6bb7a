"""deploy/README.md's metric table: one row for every metric family the service exports, of its type, and
no row for one it does not."""

from __future__ import annotations

import re

from tests.helpers.deploy import DEPLOY, METRIC, exported_families

ROW = re.compile(r"^\| (?P<names>`inspector_[^|]+) \| (?P<type>[^|]+) \|", re.MULTILINE)


def test_the_metric_table_lists_every_exported_metric_with_its_type() -> None:
    rows = {name: row["type"] for row in ROW.finditer((DEPLOY / "README.md").read_text())
            for name in METRIC.findall(row["names"])}
    exported = exported_families()
    assert "inspector_inference_cpu_seconds_total" in exported
    assert sorted(set(exported) - set(rows)) == [], "exported but not in deploy/README.md's table"
    assert sorted(set(rows) - set(exported)) == [], "in deploy/README.md's table but not exported"
    for name, kind in exported.items():
        assert rows[name].startswith(kind), f"{name} is a {kind}, the table says {rows[name]!r}"
