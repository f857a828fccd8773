"""docs/metrics.md's tables name exactly the families ``/metrics`` can show (the dashboard is built from them)."""

from __future__ import annotations

import re
from pathlib import Path

from memserve.gateway.metrics import all_families

DOC = Path(__file__).parents[2] / "docs" / "metrics.md"


def test_the_tables_of_section_1_list_every_family_and_no_other() -> None:
    text = DOC.read_text()
    section = text[text.index("## 1. Every series") : text.index("### vLLM series not mirrored")]
    documented = set(re.findall(r"^\| `(memserve_[a-z0-9_]+)` \|", section, flags=re.MULTILINE))
    exported = {f.name + ("_total" if f.kind == "counter" else "") for f in all_families()}
    assert documented == exported, (sorted(documented - exported), sorted(exported - documented))


def test_every_family_has_a_unit_or_total_suffix_and_help() -> None:
    for family in all_families():
        assert family.help and not family.name.endswith("_total"), family
        assert ":" not in family.name and family.name.startswith("memserve_"), family
