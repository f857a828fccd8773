"""``memserve serve``'s bind check: anything but loopback gets the loud warning."""

from __future__ import annotations

import pytest

from memserve.cli.serve import is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("192.168.1.4", False), ("example.com", False)],
)
def test_only_loopback_binds_are_quiet(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
