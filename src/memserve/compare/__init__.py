"""``memserve compare``: one question set through several models, scored, and a report (docs/compare.md)."""
