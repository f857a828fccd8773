"""Reading the shipped Grafana dashboard: its panels, its PromQL, and the series names docs/metrics.md lists."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from tests.deploy.programs import DEPLOY, REPO

DASHBOARD = DEPLOY / "grafana" / "memserve.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
# what Grafana puts in place of its variables; any valid value will do for parsing
VARIABLES = {"$__rate_interval": "1m", "$__range": "3h", "$__interval": "15s", "$model": ".*", "$device": ".*"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def expressions(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and annotation query."""
    found = [
        (f"panel {panel['title']!r} target {target['refId']}", target["expr"])
        for panel in panels(board)
        for target in panel.get("targets", [])
    ]
    found += [(f"annotation {a['name']!r}", a["expr"]) for a in board["annotations"]["list"] if "expr" in a]
    return found


def variable_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    return [(v["name"], v["definition"]) for v in board["templating"]["list"] if v["type"] == "query"]


def substituted(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):  # $__rate_interval before $__range...
        expr = expr.replace(name, VARIABLES[name])
    assert "$" not in expr, f"a Grafana variable the test does not know is left in {expr!r}"
    return expr


def documented_names() -> set[str]:
    """Every series name in the tables of docs/metrics.md §1 (histograms by their family name)."""
    text = (REPO / "docs" / "metrics.md").read_text()
    section = text[text.index("## 1. Every series") : text.index("## 2.")]
    return {
        name
        for line in section.splitlines()
        if line.startswith("| `memserve_")
        for name in re.findall(r"^\| `(memserve_[a-z0-9_]+)`", line)
    }


def family(name: str, documented: set[str]) -> str:
    """A histogram's ``_bucket``/``_sum``/``_count`` series belongs to its family."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in documented:
            return name.removesuffix(suffix)
    return name
