"""Atomic writes: a failed write leaves the old file and no temporary; OS errors name the path; umask modes."""

from __future__ import annotations

import os

import pytest

from promptkd.fileio import OutputError, atomic_save_with, atomic_write, atomic_writer


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "run.json"
    atomic_write(target, "old")
    with pytest.raises(RuntimeError), atomic_writer(target, "w") as f:
        f.write("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["run.json"]

    def broken_save(name: str) -> None:
        with open(name, "wb") as f:
            f.write(b"partial")
        raise ValueError("writer failed")

    with pytest.raises(ValueError):
        atomic_save_with(target, broken_save)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["run.json"]


def test_both_writers_replace_the_file_with_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.txt", "x")
        atomic_save_with(tmp_path / "b.bin", lambda name: open(name, "wb").close())
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o640


def test_an_os_error_is_one_line_naming_the_path(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    target = tmp_path / "file" / "out.json"
    with pytest.raises(OutputError, match=f"^{target}: "):
        atomic_write(target, "x")


def test_promptkd_writes_files_only_through_the_atomic_writers():
    """A guard: every file the library writes goes through promptkd.fileio (test fixtures excepted), so an
    interrupted run never leaves a half-written results.json, report or checkpoint behind."""
    import re
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "promptkd"
    # appending ("a": logs, resumable prediction files) is by design; a line may say it is a scratch file
    raw = re.compile(r"\.write_text\(|\.write_bytes\(|\bopen\([^)]*['\"]wb?['\"]|\.savefig\(\s*path|torch\.save\(\s*[^,]*path")
    allowed = {"fileio.py", "data/fixtures.py"}
    offenders = []
    for py in sorted(src.rglob("*.py")):
        rel = py.relative_to(src).as_posix()
        if rel in allowed:
            continue
        offenders += [f"{rel}:{i}: {line.strip()}" for i, line in enumerate(py.read_text().splitlines(), 1)
                      if raw.search(line) and "atomic_save_with(" not in line and "# scratch file" not in line]
    assert not offenders, "\n".join(offenders)
