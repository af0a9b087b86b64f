"""The output folder of a training run: checked, locked and prepared before any model is loaded.

A stage opens its ``--out`` through :class:`RunFolder` (a context manager) and only then loads models:

* the folder must be creatable and writable (a read-only or non-directory path is one line, at once);
* an exclusive lock (``.promptkd.lock``, ``fcntl.flock``) is held for the whole run, so a second run
  into the same folder is refused with the holder's pid, host, command and start time; a lock left by a
  dead process is released by the kernel and reported when taken over;
* temporary files a killed or failed write left (``*.tmp<pid>`` of a dead pid) are removed;
* a folder that already holds a run (finished or not) is refused unless the run resumes it
  (``resume``) or starts over (``overwrite``, which deletes that run's files and nothing else).

Run settings on resume (:func:`resolve_settings`): the saved ``config.yaml`` plus ``--set`` values; settings
that do not change what was learnt so far may differ (the schedule, workers, device, precision); every
change is returned so the stage records it in ``log.jsonl``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from promptkd import config as cfgmod
from promptkd.engine import distributed as D
from promptkd.fileio import OutputError, describe_os_error, remove_stale_temporaries

LOCK_FILE = ".promptkd.lock"
# what a run writes into its folder; --overwrite deletes exactly these
RUN_FILES = ("config.yaml", "run.json", "log.jsonl", "summary.csv", "checkpoints", "adapter.safetensors",
             "adapter.json", "class_vectors.safetensors", "few_shot", "tensorboard", "held_out.json")
# settings that may change on --resume: they do not change what the run has learnt so far
RESUMABLE = ("train.num_workers", "train.device", "train.log_every", "train.max_steps",
             "train.checkpoint_every_steps", "train.precision", "train.deterministic", "log.tensorboard")
# the schedule from the resume point on (recorded in log.jsonl when changed); e.g. a lower lr after a NaN stop
SCHEDULE = ("train.lr", "train.warmup_lr", "train.momentum", "train.weight_decay", "train.scheduler")


class RunFolderError(ValueError):
    """The output folder cannot be used for this run (one line naming it)."""


class RunFolder:
    """``with RunFolder(out, resume=..., overwrite=..., command="distill") as folder: ...``"""

    def __init__(self, out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
                 command: str = "promptkd"):
        if resume and overwrite:
            raise RunFolderError("--resume and --overwrite contradict each other: choose one")
        self.path = Path(out)
        self.resume, self.overwrite, self.command = resume, overwrite, command
        self._lock_fd: int | None = None
        self.notes: list[str] = []

    # -- state of the folder ----------------------------------------------------------------------------
    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    def existing_run(self) -> str | None:
        """What earlier run the folder holds, in words, or None."""
        if (self.path / "adapter.json").is_file():
            return "a finished run (adapter.json)"
        if self.checkpoint.is_file():
            return "an interrupted run (checkpoints/last.pt)"
        for name in ("config.yaml", "log.jsonl", "run.json"):
            if (self.path / name).is_file():
                return f"an earlier run ({name})"
        return None

    # -- checks, in the order a user wants to hear about them -------------------------------------------
    def _check_writable(self) -> None:
        p = self.path
        if p.exists() and not p.is_dir():
            raise RunFolderError(f"{p}: --out exists and is not a folder")
        try:
            p.mkdir(parents=True, exist_ok=True)
            probe = p / f".write-test.tmp{os.getpid()}"
            with open(probe, "wb") as f:  # scratch file: the writability probe
                f.write(b"promptkd")
            probe.unlink()
        except OSError as exc:
            raise RunFolderError(describe_os_error(exc, p, "--out is not writable")) from None

    def _take_lock(self) -> None:
        import fcntl

        path = self.path / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid')} on {holder.get('host')}, `{holder.get('command')}`, started "
                   f"{holder.get('started')}") if holder else "another process"
            raise RunFolderError(f"{self.path}: another promptkd run is using this folder ({who}); wait for it to "
                                 "finish or choose another --out") from None
        previous = _read_holder(fd)
        if previous and previous.get("pid") not in (None, os.getpid()):
            self.notes.append(f"a lock left by pid {previous.get('pid')} (`{previous.get('command')}`, started "
                              f"{previous.get('started')}, no longer running) was taken over")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "started": _dt.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._lock_fd = fd

    def _check_previous_run(self) -> None:
        found = self.existing_run()
        if found is not None and self.resume and found.startswith("a finished run"):
            self.notes.append("this run had already finished: nothing is trained again; its artefact and results "
                              "are written again from the last checkpoint")
        if found is None or self.resume:
            return
        if not self.overwrite:
            hint = ("pass --resume to continue it, " if "interrupted" in found or "earlier" in found else "")
            raise RunFolderError(f"{self.path}: holds {found}; {hint}pass --overwrite to replace it, or choose "
                                 "another --out")
        for name in RUN_FILES:
            target = self.path / name
            try:
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
            except OSError as exc:
                raise RunFolderError(describe_os_error(exc, target, "cannot remove the previous run's file")) from None
        self.notes.append(f"--overwrite: removed {found} from {self.path}")

    def open(self) -> RunFolder:
        """Run the checks (rank 0 locks and deletes; every rank raises the same error)."""
        error = None
        if D.is_main():
            try:
                self._check_writable()
                self._take_lock()
                removed = remove_stale_temporaries(self.path)
                if removed:
                    self.notes.append(f"removed {len(removed)} partial file(s) a killed run left: "
                                      f"{', '.join(p.name for p in removed[:3])}")
                self._check_previous_run()
            except (RunFolderError, OutputError) as exc:
                self.close()
                error = str(exc)
        if D.is_distributed():
            error = D.broadcast_object(error)
        if error:
            raise RunFolderError(error)
        return self

    def close(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
                os.close(self._lock_fd)
            with contextlib.suppress(OSError):
                (self.path / LOCK_FILE).unlink()
            self._lock_fd = None

    def __enter__(self) -> RunFolder:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def say_notes(self, prefix: str) -> None:
        if D.is_main():
            for note in self.notes:
                print(f"{prefix}: note: {note}", file=sys.stderr)


def _read_holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------------------------------
# settings of a fresh or resumed run


def resolve_settings(schema: type, folder: RunFolder, preset: str | None, overrides: Iterable[str] | Mapping,
                     seed: int | None, *, exclude: Iterable[str] = (), where: str = "config"
                     ) -> tuple[dict, list[str]]:
    """``(settings, schedule_changes)``: fresh: defaults <- preset <- overrides <- ``seed`` (--seed, if given);
    resumed: the saved config.yaml <- overrides, refused if a setting outside RESUMABLE/SCHEDULE differs."""
    overrides = dict(overrides) if isinstance(overrides, Mapping) else list(overrides)
    saved_path = folder.path / "config.yaml"
    if folder.resume and saved_path.is_file():
        saved = cfgmod.load_saved(saved_path)
        base = cfgmod.overlay(cfgmod.defaults_of(schema, exclude), saved)
        base.setdefault("train", {})["max_steps"] = None  # a stop point applies to one invocation only
        merged = cfgmod.build(schema, None, overrides, base=base, exclude=exclude, where=where)
        if seed is not None:
            merged["train"]["seed"] = seed
        frozen_changes = cfgmod.differences(base, merged, RESUMABLE + SCHEDULE)
        if frozen_changes:
            raise RunFolderError(f"{saved_path}: cannot resume with settings that change what was learnt "
                                 f"({'; '.join(frozen_changes[:8])}); only {', '.join(SCHEDULE + RESUMABLE)} may "
                                 "change on --resume. Start a new run (another --out, or --overwrite)")
        changes = [c for c in cfgmod.differences(base, merged) if c.split(":")[0] in SCHEDULE]
        return merged, changes
    settings = cfgmod.build(schema, preset, overrides, exclude=exclude, where=where)
    if seed is not None:  # --seed; without it, the config's train.seed (default 1, or --set train.seed=N)
        said = (cfgmod.parse_overrides(overrides).get("train") or {}).get("seed")
        if said is not None and int(said) != int(seed):
            raise RunFolderError(f"--seed {seed} and --set train.seed={said} disagree: give the seed once")
        settings["train"]["seed"] = int(seed)
    return settings, []


def check_same_inputs(folder: RunFolder, run_info: Mapping, keys: Iterable[str]) -> None:
    """On resume: the inputs recorded in run.json (dataset, weights checksums, store fingerprint) are the same."""
    from promptkd.fileio import read_json

    path = folder.path / "run.json"
    if not folder.resume or not path.is_file():
        return
    previous = read_json(path, "run record")
    changed = [f"{k}: {previous.get(k)!r} -> {run_info.get(k)!r}" for k in keys
               if previous.get(k) is not None and previous.get(k) != run_info.get(k)]
    if changed:
        raise RunFolderError(f"{path}: cannot resume with other inputs ({'; '.join(changed)}); start a new run "
                             "(another --out, or --overwrite)")
