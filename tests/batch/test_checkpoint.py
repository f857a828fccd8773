"""The output file as the checkpoint: repair of a cut last line, the finished ids, the lock, a full disk."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from memserve.batch import checkpoint as checkpoint_module
from memserve.batch.checkpoint import (
    BatchLocked,
    Checkpoint,
    OutputCorrupt,
    OutputFull,
    errors_path_for,
    lock_holder,
    repair_tail,
)
from memserve.batch.format import dumps_line


def line(custom_id: str) -> dict[str, object]:
    return {"id": "b", "custom_id": custom_id, "response": {"status_code": 200, "request_id": "", "body": {}}}


def write_lines(path: Path, *ids: str, tail: bytes = b"") -> None:
    path.write_bytes(b"".join(json.dumps(line(i)).encode() + b"\n" for i in ids) + tail)


@pytest.mark.parametrize(
    ("content", "kept"),
    [
        (b"", b""),
        (b"a\n", b"a\n"),
        (b"a\nb\n", b"a\nb\n"),
        (b'a\n{"custom_id": "q', b"a\n"),
        (b'{"custom_id": "q', b""),
        (b"a\n" + b"x" * 200_000, b"a\n"),  # the cut line is longer than one read chunk
    ],
)
def test_repair_tail_cuts_back_to_the_last_newline(tmp_path: Path, content: bytes, kept: bytes) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(content)
    assert repair_tail(path) == len(content) - len(kept)
    assert path.read_bytes() == kept


def test_open_repairs_both_files_and_reads_what_is_done(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    write_lines(out, "a", "b", tail=b'{"id": "x", "custom_')
    write_lines(errors_path_for(out), "c", tail=b"\x00\x00\x00\n")  # zeros a reboot left, with a newline
    with Checkpoint(out) as checkpoint:
        assert checkpoint.finished == {"a", "b", "c"}
        assert (checkpoint.succeeded, checkpoint.failed) == (2, 1)
        checkpoint.record("d", line("d"), failed=False)
    assert [json.loads(raw)["custom_id"] for raw in out.read_bytes().splitlines()] == ["a", "b", "d"]
    assert errors_path_for(out).read_bytes().count(b"\n") == 1


def test_a_bad_line_before_the_last_is_refused_not_truncated(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"not a result\n" + json.dumps(line("a")).encode() + b"\n")
    with pytest.raises(OutputCorrupt, match="byte 0"), Checkpoint(out):
        pass
    assert out.read_bytes().startswith(b"not a result\n")


def test_a_second_run_on_the_same_output_refuses_naming_the_first(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with Checkpoint(out):
        assert lock_holder(out) == os.getpid()
        with pytest.raises(BatchLocked, match=f"pid {os.getpid()}"), Checkpoint(out):
            pass
    assert lock_holder(out) is None
    with Checkpoint(out) as again:  # released: the next run takes it
        assert again.finished == set()


def test_recording_an_id_twice_is_a_bug_not_a_second_line(tmp_path: Path) -> None:
    with Checkpoint(tmp_path / "out.jsonl") as checkpoint:
        checkpoint.record("a", line("a"), failed=False)
        with pytest.raises(AssertionError, match="twice"):
            checkpoint.record("a", line("a"), failed=True)


def test_a_full_disk_stops_with_a_clear_error_and_leaves_whole_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out.jsonl"
    real_write = os.write

    def write_half_then_fail(fd: int, data: bytes | memoryview) -> int:
        if len(data) > 10:  # the first call writes part of the line, the next finds the disk full
            return real_write(fd, bytes(data[:10]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with Checkpoint(out) as checkpoint:
        checkpoint.record("a", line("a"), failed=False)
        monkeypatch.setattr(checkpoint_module.os, "write", write_half_then_fail)
        with pytest.raises(OutputFull, match=r"disk is full.*run the same command again"):
            checkpoint.record("b", line("b"), failed=False)
        monkeypatch.undo()
        assert "b" not in checkpoint.finished
    assert out.read_bytes() == dumps_line(line("a"))
    with Checkpoint(out) as resumed:  # space freed: the same run goes on
        assert resumed.finished == {"a"}
        resumed.record("b", line("b"), failed=False)
    assert out.read_bytes().count(b"\n") == 2


def test_asking_who_holds_the_lock_never_takes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``batch status`` reads the kernel's table: a run starting while it asks is never refused."""
    out = tmp_path / "out.jsonl"
    with Checkpoint(out):
        calls: list[int] = []
        monkeypatch.setattr(checkpoint_module.fcntl, "flock", lambda fd, op: calls.append(op))
        assert lock_holder(out) == os.getpid()
        monkeypatch.undo()
    assert calls == []
    assert lock_holder(out) is None


def failure(custom_id: str, status: int | None) -> dict[str, object]:
    """An errors-file line: an HTTP answer with ``status``, or (None) no answer at all."""
    if status is None:
        return {"id": "b", "custom_id": custom_id, "response": None, "error": {"code": "upstream_unavailable"}}
    return {"id": "b", "custom_id": custom_id, "response": {"status_code": status, "body": {}}, "error": None}


@pytest.mark.parametrize(
    ("status", "retried"),
    [
        *[(status, True) for status in (None, 408, 429, 500, 502, 503)],
        *[(status, False) for status in (400, 401, 404, 422, 501)],
    ],
)
def test_a_transient_failure_is_taken_out_of_the_errors_file_to_run_again(
    tmp_path: Path, status: int | None, retried: bool
) -> None:
    out = tmp_path / "out.jsonl"
    errors = errors_path_for(out)
    write_lines(out, "a")
    errors.write_bytes(dumps_line(failure("b", 400)) + dumps_line(failure("c", status)) + dumps_line(failure("d", 404)))
    with Checkpoint(out) as checkpoint:
        assert checkpoint.retrying == int(retried)
        assert checkpoint.finished == ({"a", "b", "d"} if retried else {"a", "b", "c", "d"})
        assert checkpoint.failed == (2 if retried else 3)
        if retried:
            checkpoint.record("c", failure("c", status), failed=True)  # failed again: its one line
    ids = [json.loads(raw)["custom_id"] for raw in errors.read_bytes().splitlines()]
    assert ids == (["b", "d", "c"] if retried else ["b", "c", "d"])
    assert not errors.with_name(errors.name + ".retry").exists()
