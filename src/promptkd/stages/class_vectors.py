"""The class vectors as one call: the prompted teacher's text tower, ONCE, over every class name.

    vectors = promptkd.build_class_vectors(teacher="runs/x/teacher", dataset="folder:my_data",
                                           out="runs/x/class_vectors.safetensors")
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from promptkd.fileio import describe_os_error
from promptkd.stages.common import Messages, minimum_classes


@dataclass
class ClassVectorsConfig:
    """The teacher, the classes (a dataset's, or names / a file of names) and the output file."""

    teacher: str | Path  # teacher artefact folder, or an authors' Dassl checkpoint (then clip_weights)
    out: str | Path
    dataset: str | None = None
    class_names: str | Path | list[str] | None = None  # a file (one name per line) or the names
    data_root: str | Path | None = None
    clip_weights: str | Path | None = None
    trust_checkpoint: bool = False
    device: str = "auto"
    batch_size: int = 256
    overwrite: bool = False
    quiet: bool = False


@dataclass
class ClassVectorsRun:
    path: Path
    num_classes: int
    dim: int
    fingerprint: str
    logit_scale: float
    teacher_classes_seen: int | None = None  # how many of the names the teacher was trained on
    store: Any = field(default=None, repr=False)


def class_names_for(cfg: ClassVectorsConfig) -> list[str]:
    """Every class in label order: the dataset's (base then novel), or the given names / file."""
    from promptkd.data.benchmarks import load_benchmark
    from promptkd.methods.teacher_io import read_class_names

    if (cfg.dataset is None) == (cfg.class_names is None):
        raise ValueError("give the classes either as a dataset or as class names (one of the two)")
    if cfg.dataset is not None:
        return list(load_benchmark(cfg.data_root, cfg.dataset, check_files=False).classnames)
    if isinstance(cfg.class_names, (list, tuple)):
        return [str(n) for n in cfg.class_names]
    return read_class_names(cfg.class_names)


def check_output_file(path: Path, overwrite: bool) -> None:
    """Before any model is loaded: refuse to replace an existing file unless asked, and a folder we cannot write."""
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give a file name such as {path / 'class_vectors.safetensors'}")
    if path.exists() and not overwrite:
        raise ValueError(f"{path}: exists (class vectors of {_describe_store(path)}); pass --overwrite to replace it")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(describe_os_error(exc, parent, "cannot create the output folder")) from None
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{parent}: the output folder is not writable")


def _describe_store(path: Path) -> str:
    from promptkd.store import ClassVectorStore

    try:
        store = ClassVectorStore.load(path)
    except (ValueError, OSError):
        return "an unreadable or foreign file"
    teacher = store.teacher.get("weights") or store.teacher.get("kind") or "an unknown teacher"
    return f"{store.num_classes} classes from {Path(str(teacher)).name}"


def build_class_vectors(cfg: ClassVectorsConfig | None = None, **fields: Any) -> ClassVectorsRun:
    """Encode every class name with the prompted teacher text tower, once, and save the store."""
    from promptkd.engine.loop import resolve_device
    from promptkd.methods.teacher_io import compute_class_vectors, load_teacher

    cfg = cfg or ClassVectorsConfig(**fields)
    say = Messages("class-vectors", cfg.quiet)
    out = Path(cfg.out)
    check_output_file(out, cfg.overwrite)
    names = class_names_for(cfg)
    minimum_classes(names, str(cfg.class_names or cfg.dataset), "class-vectors")
    teacher, meta = load_teacher(cfg.teacher, weights=cfg.clip_weights, trust_checkpoint=cfg.trust_checkpoint)
    teacher = teacher.to(resolve_device(cfg.device))
    store = compute_class_vectors(teacher, names, batch_size=cfg.batch_size)
    store.save(out)
    trained_on = meta.get("class_names") or []
    seen = len(set(trained_on) & set(names)) if trained_on else None
    run = ClassVectorsRun(out, store.num_classes, store.dim, store.fingerprint(), float(store.logit_scale), seen, store)
    extra = f"; {seen} of them among the teacher's {len(trained_on)} training classes" if trained_on else ""
    say(f"{run.num_classes} classes x {run.dim} dims, logit scale {run.logit_scale:.4g}{extra} -> {out} "
        f"(fingerprint {run.fingerprint})")
    return run
