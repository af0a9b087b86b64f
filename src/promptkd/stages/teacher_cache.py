"""The teacher's outputs for a distill run, computed ahead of it, as one call.

    cache = promptkd.build_teacher_cache(teacher="runs/x/teacher", class_vectors="runs/x/cv.safetensors",
                                         preset="distill/custom", dataset="folder:my_data", out="runs/x/cache")
    promptkd.distill(..., teacher_cache=cache.path)     # the teacher is not loaded

The stream is the one :func:`promptkd.distill` would train on with the same settings and seed (same
plan, same augmentation per (seed, epoch, image)); :mod:`promptkd.methods.teacher_cache` stores it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promptkd.stages.common import Messages


@dataclass
class TeacherCacheConfig:
    teacher: str | Path  # teacher artefact folder, or an authors' Dassl checkpoint (then teacher_weights)
    class_vectors: str | Path
    out: str | Path
    preset: str | Path | None = None  # the distill config
    dataset: str | None = None
    data_root: str | Path | None = None
    teacher_weights: str | Path | None = None
    overrides: Sequence[str] | Mapping[str, Any] = ()
    seed: int = 1  # the distill run's seed
    views: str | int = "epochs"  # "epochs" (exact) or K fixed views replayed across epochs
    dtype: str = "fp16"
    batch_size: int | None = None  # default: train.batch_size (bit-equal to the online run)
    precision: str | None = None  # default: train.precision
    device: str | None = None
    workers: int | None = None
    shard_size: int = 8192
    resume: bool = False
    trust_checkpoint: bool = False
    quiet: bool = False


@dataclass
class TeacherCacheRun:
    path: Path
    num_images: int
    num_views: int
    heldout_images: int
    bytes: int
    seconds: float


def parse_views(value: str | int) -> str | int:
    if value == "epochs":
        return value
    try:
        views = int(value)
    except (TypeError, ValueError):
        views = 0
    if views < 1:
        raise ValueError(f"views must be 'epochs' or a positive number of views, got {value!r}")
    return views


def build_teacher_cache(cfg: TeacherCacheConfig | None = None, **fields: Any) -> TeacherCacheRun:
    """Run the frozen teacher over the stream's augmented views (and held-out images) and store the features."""
    from promptkd.methods import teacher_cache as tc
    from promptkd.methods.teacher_io import load_teacher
    from promptkd.stages.distillation import (
        check_store_matches_teacher,
        distill_settings,
        heldout_images,
        plan_data,
        training_stream,
    )
    from promptkd.store import ClassVectorStore

    cfg = cfg or TeacherCacheConfig(**fields)
    say = Messages("teacher-cache", cfg.quiet)
    overrides: Any = cfg.overrides
    extra = {"train.seed": cfg.seed, **({"data.dataset": cfg.dataset} if cfg.dataset else {})}
    overrides = ({**overrides, **extra} if isinstance(overrides, Mapping)
                 else [*overrides, *(f"{k}={v}" for k, v in extra.items())])
    settings = distill_settings(cfg.preset, overrides)
    views = parse_views(cfg.views)
    if cfg.dtype not in ("fp16", "fp32"):
        raise ValueError(f"dtype must be fp16 or fp32, not {cfg.dtype!r}")
    store = ClassVectorStore.load(cfg.class_vectors)
    plan = plan_data(settings, cfg.data_root, store)  # file lists, checked, before the teacher loads
    for note in plan.notes:
        say(f"note: {note}")
    teacher, _ = load_teacher(cfg.teacher, cfg.teacher_weights, cfg.trust_checkpoint)
    check_store_matches_teacher(store, teacher, str(cfg.class_vectors))
    train_set, heldout = training_stream(settings, plan, teacher.image_spec), heldout_images(settings, plan,
                                                                                            teacher.image_spec)
    train = settings["train"]
    n_views = int(train["epochs"]) if views == "epochs" else views
    say(f"{plan.source}: {len(train_set)} images x {n_views} view(s)"
        f"{f' + {len(heldout)} held out' if heldout is not None else ''}, {cfg.dtype} -> {cfg.out}")
    start = time.time()
    cache = tc.build_teacher_cache(
        teacher, train_set, cfg.out, epochs=int(train["epochs"]), views=views, dtype=cfg.dtype,
        identity={"class_vectors": store.fingerprint(), "dataset": tc.stream_name(settings)}, heldout=heldout,
        batch_size=cfg.batch_size or int(train["batch_size"]), device=cfg.device or train["device"],
        precision=cfg.precision or train["precision"],
        num_workers=train["num_workers"] if cfg.workers is None else cfg.workers, shard_size=cfg.shard_size,
        resume=cfg.resume)
    size = sum(p.stat().st_size for p in Path(cfg.out).iterdir() if p.is_file())
    run = TeacherCacheRun(Path(cfg.out), cache.num_images, cache.num_views, len(heldout) if heldout else 0, size,
                          time.time() - start)
    say(f"done in {run.seconds:.1f} s: {run.num_images} images x {run.num_views} view(s), {size / 2**20:.1f} MiB "
        f"in {cfg.out}")
    return run
