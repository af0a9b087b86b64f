"""The paper's protocols on top of a :class:`~promptkd.data.benchmarks.Benchmark`.

* Base-to-novel: classes sorted by label; the first ``ceil(N/2)`` are base, the rest novel; novel labels
  are re-indexed from 0 (as CoOp's ``subsample_classes``).
* Few-shot: K images per class, chosen with ``random.Random(seed)``; it follows Dassl's
  ``generate_fewshot_dataset``: classes in order of first appearance, ``rng.sample(items, K)`` each,
  train first, then val (min(K, 4) shots) from the same stream. Apply it to the full train split and
  THEN take the base half, as CoOp does (few-shot before ``subsample_classes``).
  The input order is the benchmark's canonical order (split file order, or sorted folder scans), so
  the same seed picks the same images on every machine. A class with fewer than K images keeps all of
  them and a warning names it. Selections are cached as JSON keyed by (dataset, K, seed) and checked
  against a fingerprint of the input list.
* Unlabelled streams for stage 2, built from PATHS only so labels cannot reach the method:
  transductive (all train images of all classes, the paper's setting), inductive (base-class train
  images only), or any folder of images.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from promptkd.data.benchmarks import Benchmark, Sample, list_images
from promptkd.fileio import atomic_write_json


def class_halves(num_classes: int) -> tuple[list[int], list[int]]:
    """(base labels, novel labels): the first ceil(N/2) labels are base."""
    m = math.ceil(num_classes / 2)
    return list(range(m)), list(range(m, num_classes))


def subsample_classes(samples: Sequence[Sample], labels: Sequence[int], classnames: Sequence[str]
                      ) -> list[Sample]:
    """Keep samples whose label is in ``labels``, re-indexed 0..len(labels)-1 in that order."""
    relabel = {old: new for new, old in enumerate(labels)}
    return [Sample(s.path, relabel[s.label], classnames[s.label]) for s in samples if s.label in relabel]


@dataclass
class BaseNovel:
    base: Benchmark
    novel: Benchmark
    base_labels: list[int]
    novel_labels: list[int]


def _restrict(bench: Benchmark, labels: list[int], suffix: str) -> Benchmark:
    names = bench.classnames
    return replace(
        bench,
        name=f"{bench.name}/{suffix}",
        classnames=[names[i] for i in labels],
        train=subsample_classes(bench.train, labels, names),
        val=subsample_classes(bench.val, labels, names),
        test=subsample_classes(bench.test, labels, names),
        class_ids=[bench.class_ids[i] for i in labels] if bench.class_ids else [],
        imagenet_indices=[bench.imagenet_indices[i] for i in labels] if bench.imagenet_indices else [],
    )


def base_novel_split(bench: Benchmark) -> BaseNovel:
    """Split a benchmark into its base and novel halves (each with labels re-indexed from 0)."""
    base, novel = class_halves(bench.num_classes)
    return BaseNovel(_restrict(bench, base, "base"), _restrict(bench, novel, "novel"), base, novel)


# ---------------------------------------------------------------------------------------------------
# few-shot


def _fingerprint(samples: Sequence[Sample]) -> str:
    """Hash of (label, path relative to the common folder): stable when the data root moves."""
    paths = [s.path for s in samples]
    common = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0]) if paths else ""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.label}\t{os.path.relpath(s.path, common) if common else s.path}\n".encode())
    return h.hexdigest()[:20]


def _select(samples: Sequence[Sample], k: int, rng: random.Random, name: str) -> list[int]:
    by_label: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_label.setdefault(s.label, []).append(i)
    chosen: list[int] = []
    short: list[str] = []
    for label, idx in by_label.items():
        if len(idx) >= k:
            chosen.extend(rng.sample(idx, k))
        else:
            chosen.extend(idx)
            short.append(f"{label} ({samples[idx[0]].classname!r}: {len(idx)})")
    if short:
        warnings.warn(f"{name}: {len(short)} class(es) have fewer than {k} images and keep all they have: "
                      f"{', '.join(short[:10])}{' ...' if len(short) > 10 else ''}", stacklevel=3)
    return chosen


def few_shot(samples: Sequence[Sample], k: int, seed: int, cache_dir: str | os.PathLike | None = None,
             *, name: str = "dataset", after: tuple[Sequence[Sample], int] | None = None) -> list[Sample]:
    """K samples per class, deterministic for ``seed``; cached as ``<cache_dir>/<name>_shot<K>_seed<seed>.json``.

    The cache records the selected positions in ``samples`` and a fingerprint of ``samples``; a cache
    made from a different list is ignored (with a warning) and rewritten. ``after=(other, k_other)``
    first draws ``k_other`` shots from ``other`` with the same generator (CoOp draws val after train
    from one seeded stream)."""
    if k < 1:
        raise ValueError(f"few-shot K must be >= 1, got {k}")
    samples = list(samples)
    if not samples:
        raise ValueError(f"{name}: no samples to draw {k} shots from")
    fingerprint = _fingerprint(samples) + (f"-after-{_fingerprint(after[0])}-{after[1]}" if after else "")
    cache = Path(cache_dir) / f"{name.replace('/', '_')}_shot{k}_seed{seed}.json" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            data = json.loads(cache.read_text())
            if data.get("fingerprint") == fingerprint:
                return [samples[i] for i in data["indices"]]
            warnings.warn(f"{cache}: made from a different sample list; drawing again", stacklevel=2)
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            warnings.warn(f"{cache}: unreadable few-shot cache ({exc}); drawing again", stacklevel=2)
    rng = random.Random(seed)
    if after is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # already reported when that list was drawn
            _select(list(after[0]), after[1], rng, name)
    indices = _select(samples, k, rng, name)
    if cache is not None:
        record = {"dataset": name, "k": k, "seed": seed, "fingerprint": fingerprint, "indices": indices,
                  "paths": [samples[i].path for i in indices]}
        atomic_write_json(cache, record, indent=1)  # a per-process temporary: torchrun's ranks may write at once
    return [samples[i] for i in indices]


def few_shot_benchmark(bench: Benchmark, k: int, seed: int, cache_dir: str | os.PathLike | None = None
                       ) -> Benchmark:
    """CoOp's few-shot data: K shots of train and min(K, 4) of val (ImageNet's val is its test, untouched)."""
    train = few_shot(bench.train, k, seed, cache_dir, name=f"{bench.name}_train")
    val = bench.val
    if val and val is not bench.test:
        val = few_shot(bench.val, min(k, 4), seed, cache_dir, name=f"{bench.name}_val", after=(bench.train, k))
    return replace(bench, train=train, val=val)


# ---------------------------------------------------------------------------------------------------
# unlabelled streams (stage 2): paths only


def unlabelled_paths(bench: Benchmark, mode: str = "transductive") -> list[str]:
    """Image paths for distillation, with no labels attached.

    ``transductive``: every train image of every class (the paper; for the evaluation-only ImageNet
    variants, the target test images). ``inductive``: train images of the base classes only."""
    if mode == "transductive":
        source = bench.test if bench.eval_only else bench.train
        return [s.path for s in source]
    if mode == "inductive":
        if bench.eval_only:
            raise ValueError(f"{bench.name} is evaluation-only: an inductive stream has no train images")
        base, _ = class_halves(bench.num_classes)
        keep = set(base)
        return [s.path for s in bench.train if s.label in keep]
    raise ValueError(f"unknown unlabelled mode {mode!r}: use 'transductive', 'inductive' or a folder")


def unlabelled_from(source: Benchmark | str | os.PathLike, mode: str = "transductive") -> list[str]:
    """Paths of an unlabelled stream from a benchmark (``mode``) or a folder of images (recursive)."""
    if isinstance(source, Benchmark):
        return unlabelled_paths(source, mode)
    return list_images(source)
