"""The user's own datasets as first-class dataset references: ``folder:PATH`` and ``list:FILE``.

Every command that takes ``--dataset`` (train-teacher, class-vectors, distill's ``data.dataset``,
evaluate) reads it through :func:`promptkd.data.benchmarks.load_benchmark`, which hands these
references to :func:`load_custom`; ``--data-root`` is then optional (relative paths are resolved
against it when given, else against the current folder).

* ``folder:PATH``: ``PATH/train/<class>/*`` and ``PATH/test/<class>/*`` (``PATH/val/<class>/*``
  optional), or ``PATH/<class>/*`` alone, whose test split is a per-class hold-out of
  :data:`FOLDER_HOLDOUT` drawn with the FIXED seed :data:`FOLDER_SPLIT_SEED` (not the run's seed, so
  every command and every seed sees the same test images, which never enter training). Labels follow
  the sorted class-folder names; underscores become spaces in class names (CoOp's clean-up).
* ``list:FILE.csv|.json``: rows ``path``, ``label`` (an integer, or a class name) and/or
  ``classname``, optional ``split`` (train/val/test, default train); see
  :func:`promptkd.data.benchmarks.load_list`. Every val/test class must have train rows.

Base classes are the first ceil(N/2) labels, as for the benchmarks. The dataset's name (in
results.json and reports) is the folder's name or the list file's stem; a name that would be taken for
a benchmark (its CoOp template, the paper's numbers) gets ``-custom`` appended.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from promptkd.data.benchmarks import (
    Benchmark,
    DataError,
    _images_in,
    _subdirs,
    get_spec,
    load_image_folder,
    load_list,
)
from promptkd.data.scan import DataScanWarning

CUSTOM_SCHEMES = ("folder", "list")
CUSTOM_DATASET_SYNTAX = "folder:PATH or list:FILE.csv|.json"
FOLDER_HOLDOUT = 0.2  # share of each class held out for test when a folder has no test/ split
FOLDER_SPLIT_SEED = 0  # fixed (not the run's seed): every command and every run sees the same test images

DATASET_HELP = ("a benchmark name (`promptkd data list`), or your own data: folder:PATH (PATH/<class>/* images, "
                f"{FOLDER_HOLDOUT:.0%}% of each class held out for test with a fixed seed; or PATH/train/<class>/*, "
                "PATH/test/<class>/*, optional PATH/val/<class>/*) or list:FILE.csv|.json (path, label or "
                "classname, optional split columns). Relative paths: against --data-root when given, else the "
                "current folder")
# (DATASET_HELP is an argparse help string: its "%" is written "%%")
DATA_ROOT_HELP = "data root in CoOp's layout (benchmarks); optional with --dataset folder:PATH or list:FILE"


def custom_reference(name: str) -> tuple[str, str] | None:
    """``("folder"|"list", path)`` for a custom dataset reference, None for a benchmark name."""
    scheme, sep, path = str(name).partition(":")
    if not sep or scheme.lower() not in CUSTOM_SCHEMES:
        return None
    if not path.strip():
        raise ValueError(f"dataset reference {name!r} has no path: use {CUSTOM_DATASET_SYNTAX}")
    return scheme.lower(), path.strip()


def is_custom_dataset(name: str | None) -> bool:
    """Whether ``name`` refers to the user's own data (``folder:PATH`` / ``list:FILE``)."""
    return bool(name) and custom_reference(str(name)) is not None


def custom_dataset_path(name: str, data_root: str | os.PathLike | None = None) -> Path:
    """The absolute path a custom reference points to (relative paths against ``data_root`` when given)."""
    ref = custom_reference(name)
    if ref is None:
        raise ValueError(f"{name!r} is not a custom dataset reference ({CUSTOM_DATASET_SYNTAX})")
    path = Path(ref[1]).expanduser()
    if not path.is_absolute() and data_root not in (None, ""):
        path = Path(data_root).expanduser() / path
    return path.absolute()


def custom_dataset_name(path: Path) -> str:
    """A custom dataset's name (results, reports): the folder's name or the list file's stem, with
    ``-custom`` appended when it would be taken for a benchmark (its templates, the paper's numbers)."""
    name = (path.resolve().name if path.is_dir() else path.stem) or "custom"
    try:
        get_spec(name)
    except ValueError:
        return name
    return f"{name}-custom"


def _load_custom_folder(path: Path, name: str) -> Benchmark:
    if not path.is_dir():
        raise DataError(str(path), [f"{path}: folder missing (folder:PATH needs one sub-folder of images per class)"])
    with warnings.catch_warnings():  # these first looks only decide the layout; the full scan below warns
        warnings.simplefilter("ignore", DataScanWarning)
        split_root = path / "train" if (path / "train").is_dir() else path
        top, below = _subdirs(path), _subdirs(split_root)
        if not top and _images_in(path):
            raise DataError(str(path), [f"{path}: holds images but no class sub-folders (expected PATH/<class>/*; "
                                        "for unlabelled images use distill's data.unlabelled=folder data.folder=PATH)"])
    if not below:
        raise DataError(str(path), [f"{split_root}: no class sub-folders (expected {split_root}/<class>/<images>)"])
    has_test = (path / "train").is_dir() and (path / "test").is_dir()
    bench = load_image_folder(path, name=name, holdout=0.0 if has_test else FOLDER_HOLDOUT, seed=FOLDER_SPLIT_SEED)
    tested = {s.label for s in bench.test}
    untested = [c for i, c in enumerate(bench.classnames) if i not in tested]
    if untested:
        warnings.warn(f"{path}: {len(untested)} class(es) have no test image ({', '.join(untested[:5])}"
                      f"{' ...' if len(untested) > 5 else ''}); evaluation will not cover them", stacklevel=3)
    return bench


def _check_list_classes(bench: Benchmark, list_file: Path) -> None:
    """Every class must have train rows (as every test/val class folder must exist in train/)."""
    in_train = {s.label for s in bench.train}
    problems = [f"{list_file}: {split} image {s.path} has class {s.classname!r}, which has no train entries"
                for split in ("val", "test") for s in getattr(bench, split) if s.label not in in_train]
    if problems:
        raise DataError(f"{list_file}: unknown class(es) outside train", problems)


def load_custom(name: str, data_root: str | os.PathLike | None = None, *, check_files: bool = True) -> Benchmark:
    """The user's own data from a reference: ``folder:PATH`` or ``list:FILE.csv|.json``.

    ``folder:PATH``: either ``PATH/train/<class>/*`` and ``PATH/test/<class>/*`` (``PATH/val`` optional),
    or ``PATH/<class>/*`` alone, of which :data:`FOLDER_HOLDOUT` of each class (at least one image kept
    for train) goes to test, chosen with seed :data:`FOLDER_SPLIT_SEED` whatever the run's seed.
    Labels follow the sorted class folder names. ``list:FILE``: see :func:`load_list`; labels follow
    the list's integer labels, or sorted class names; every val/test class must have train entries.
    Base classes are the first ceil(N/2) labels, as for the benchmarks."""
    scheme, _ = custom_reference(name) or ("", "")
    path = custom_dataset_path(name, data_root)
    dataset_name = custom_dataset_name(path)
    if scheme == "folder":
        return _load_custom_folder(path, dataset_name)
    bench = load_list(path, name=dataset_name, check_files=check_files)
    _check_list_classes(bench, path)
    return bench


def held_out_images_in(paths: list[str], bench: Benchmark) -> list[str]:
    """The test images of ``bench`` that also appear in ``paths`` (an unlabelled stream), by real path."""
    test = {os.path.realpath(s.path) for s in bench.test}
    return [p for p in paths if os.path.realpath(p) in test]
