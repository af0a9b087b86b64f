"""Writing and reading the files a run leaves behind, safely.

Every file promptkd writes goes through :func:`atomic_write` (or one of its wrappers): the bytes go to
a temporary file in the same folder, are flushed to disk, and replace the target with one rename, so
a killed process or a full disk never leaves a half-written ``config.yaml``, ``run.json``, adapter or
store behind. Files get the mode a plain ``open()`` would give them (``0o666`` minus the umask);
temporary files are named ``<name>.tmp<pid>`` so that :func:`remove_stale_temporaries` can delete the
ones a dead process left.

Reading helpers turn decoding errors into ``ValueError`` messages that name the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TMP_PATTERN = re.compile(r"^(?P<name>.+)\.tmp(?P<pid>\d+)$")


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temporary_path(path: str | os.PathLike) -> Path:
    """``<path>.tmp<pid>``: where :func:`atomic_write` stages ``path``."""
    p = Path(path)
    return p.with_name(f"{p.name}.tmp{os.getpid()}")


class OutputError(OSError):
    """An OS error while writing, with the path in a one-line message."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def describe_os_error(exc: OSError, path: str | os.PathLike, action: str = "cannot write") -> str:
    reason = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
              errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
              errno.EFBIG: "file too large (ulimit -f?)", errno.ENOTDIR: "a path component is not a folder",
              errno.EDQUOT: "disk quota exceeded"}.get(exc.errno or -1, exc.strerror or str(exc))
    return f"{path}: {action} ({reason})"


@contextlib.contextmanager
def _replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path``; on success it becomes ``path`` (fsynced, umask mode) atomically.

    On failure the temporary file is removed and an ``OSError`` becomes an ``OutputError`` naming ``path``."""
    target = Path(path)
    tmp = temporary_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(exc.errno, describe_os_error(exc, target)) from exc
        raise


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb", **open_options: Any) -> Iterator[Any]:
    """Context manager giving a file object (``open(..., mode, **open_options)``); on success the file
    replaces ``path`` atomically."""
    with _replacing(path) as tmp, open(tmp, mode, **open_options) as f:
        yield f


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_writer(path, "wb") as f:
        f.write(payload)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_options: Any) -> Path:
    dump_options.setdefault("indent", 2)
    return atomic_write(path, json.dumps(obj, **dump_options) + "\n")


def atomic_save_with(path: str | os.PathLike, save: Callable[[str], Any]) -> Path:
    """Atomic wrapper for writers that take a file name (``safetensors.torch.save_file``, ``torch.onnx``)."""
    with _replacing(path) as tmp:
        save(str(tmp))
    return Path(path)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parsed JSON; a missing, empty or malformed file is an error naming ``path``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: {what} not found") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{p}: {what} is not UTF-8 text ({exc.reason})") from None
    if not text.strip():
        raise ValueError(f"{p}: {what} is empty (an interrupted write?)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: {what} is not valid JSON (line {exc.lineno}: {exc.msg})") from None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Delete ``*.tmp<pid>`` files whose process is gone (left by a killed or failed write)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    removed = []
    candidates = root.rglob("*.tmp*") if recursive else root.glob("*.tmp*")
    for p in candidates:
        m = TMP_PATTERN.match(p.name)
        if m and p.is_file() and not p.is_symlink() and not _pid_alive(int(m.group("pid"))):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed
