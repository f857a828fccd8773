"""The Grafana dashboard and its provisioning: valid JSON, every PromQL expression parses (``promtool check
rules`` on them, with Grafana's variables filled in), and every ``memserve_*`` series it reads is one that
docs/metrics.md says ``GET /metrics`` exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.grafana import (
    PROVISIONING,
    dashboard,
    documented_names,
    expressions,
    family,
    panels,
    substituted,
    variable_queries,
)
from tests.deploy.programs import DEPLOY, program


def test_the_dashboard_is_json_with_the_panels_the_issue_asks_for() -> None:
    board = dashboard()
    assert board["uid"] == "memserve" and board["title"] == "memserve"
    titles = {panel["title"] for panel in panels(board)}
    for wanted in (
        "Memory on $device, by model",
        "Time to first token",
        "Inter-token latency",
        "End-to-end latency",
        "Tokens per second",
        "Queue",
        "Errors by type",
        "Usage per key (the dashboard's time range)",
    ):
        assert wanted in titles
    annotations = {a["name"]: a for a in board["annotations"]["list"]}
    assert {"Loads", "Evictions", "Watchdog kills"} <= set(annotations)
    assert annotations["Evictions"]["titleFormat"] == "evicted {{model}}" and annotations["Evictions"]["enable"]
    memory = next(p for p in panels(board) if p["title"] == "Memory on $device, by model")
    assert memory["repeat"] == "device" and memory["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    unstacked = {o["matcher"]["options"] for o in memory["fieldConfig"]["overrides"]}
    assert unstacked == {"usable", "budget"}  # the lines the stack is read against are not stacked on it
    assert {t["legendFormat"] for t in memory["targets"]} == {"{{model}}", "usable", "budget"}


def test_every_panel_reads_the_provisioned_datasource() -> None:
    board = dashboard()
    provisioned = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    [source] = provisioned["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    expected = {"type": "prometheus", "uid": source["uid"]}
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == expected, panel["title"]
        assert all(target["datasource"] == expected for target in panel["targets"]), panel["title"]
    for item in [*board["annotations"]["list"], *board["templating"]["list"]]:
        if not item.get("builtIn"):
            assert item["datasource"] == expected, item["name"]
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "memserve.yaml").read_text())["providers"]
    assert [p["type"] for p in providers] == ["file"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/memserve.json:{providers[0]['options']['path']}/memserve.json:ro" in mounts


def test_every_expression_parses_with_promtool(tmp_path: Path) -> None:
    promtool = program("promtool", "prometheus")
    found = expressions(dashboard())
    assert len(found) > 40
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard_expression_{index}", "expr": substituted(expr)}
                    for index, (_, expr) in enumerate(found)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    where = {f"dashboard_expression_{i}": w for i, (w, _) in enumerate(found)}
    assert checked.returncode == 0, f"{checked.stdout}{checked.stderr}\n(rule names: {where})"
    assert f"SUCCESS: {len(found)} rules found" in checked.stdout


def test_promtool_would_catch_a_bad_expression(tmp_path: Path) -> None:
    """The check above can fail: a typo'd expression, written the same way, is refused."""
    promtool = program("promtool", "prometheus")
    path = tmp_path / "bad.yml"
    bad = "sum by (model) (rate(memserve_requests_total[$__rate_interval])"  # one parenthesis short
    rules = {"groups": [{"name": "bad", "rules": [{"record": "bad_expression", "expr": substituted(bad)}]}]}
    path.write_text(yaml.safe_dump(rules))
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode != 0 and "bad_expression" not in checked.stdout.split("SUCCESS")[-1]


def test_every_series_the_dashboard_reads_is_documented() -> None:
    documented = documented_names()
    assert {
        "memserve_model_held_bytes",
        "memserve_time_to_first_token_seconds",
        "memserve_requests_total",
    } <= documented
    board = dashboard()
    used = {
        (where, family(name, documented))
        for where, expr in [*expressions(board), *variable_queries(board)]
        for name in re.findall(r"\bmemserve_[a-z0-9_]+", expr)
    }
    unknown = sorted((where, name) for where, name in used if name not in documented)
    assert not unknown, f"series docs/metrics.md does not list: {unknown}"
    assert len({name for _, name in used}) >= 30


@pytest.mark.parametrize("name", ["datasources/prometheus.yaml", "dashboards/memserve.yaml"])
def test_the_provisioning_files_are_grafanas_version_1(name: str) -> None:
    assert yaml.safe_load((PROVISIONING / name).read_text())["apiVersion"] == 1
