"""What every stage shares: the distributed session, messages, the ``log`` section and run records."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from promptkd.config import spec
from promptkd.engine import distributed as D
from promptkd.fileio import atomic_write_json


@dataclass
class LogSettings:
    """The ``log`` section: where training curves go besides log.jsonl and summary.csv."""

    tensorboard: bool = spec(False, help="also write TensorBoard event files to OUT/tensorboard "
                                         "(needs the `tensorboard` package: pip install 'promptkd[tensorboard]')")


@contextlib.contextmanager
def distributed_session() -> Iterator[None]:
    """Join the torchrun process group when launched by torchrun (and leave it if we joined it here)."""
    joined = not D.is_distributed()
    D.init_from_env()
    try:
        yield
    finally:
        if joined and D.is_distributed():
            D.barrier()
            D.cleanup()


class Messages:
    """One-line progress messages of a stage on stderr, from the main process only."""

    def __init__(self, stage: str, quiet: bool = False):
        self.stage, self.quiet = stage, quiet

    def __call__(self, text: str) -> None:
        if not self.quiet and D.is_main():
            print(f"{self.stage}: {text}", file=sys.stderr, flush=True)


def minimum_classes(names: list[str], where: str, stage: str) -> None:
    """Both stages learn to tell classes apart: one class gives a zero loss and a meaningless 'done'."""
    if len(names) < 2:
        raise ValueError(f"{where}: {stage} needs at least 2 classes, found {len(names)} ({names})")


def write_run_record(out: Path, record: Mapping) -> None:
    if D.is_main():
        atomic_write_json(out / "run.json", dict(record), default=str)


def log_event(out: Path, record: Mapping) -> None:
    """Append a record (e.g. the schedule changes of a resumed run) to log.jsonl."""
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps({**record, "time": time.time()}, default=str) + "\n")
