"""The CoOp split files shipped inside the package, and writing them into a user's data root.

CoOp's ``split_zhou_<Name>.json`` files decide every label and every train/val/test image of seven
of the paper's benchmarks, and their download links are often broken. The package carries
byte-for-byte copies (gzipped, ``promptkd/data/assets/splits/``, provenance in its README.md):

* :func:`packaged_split_datasets`: the benchmarks with a packaged split file;
* :func:`packaged_bytes` / :func:`packaged_split`: a file's exact bytes / its parsed JSON (tests and
  ``data check`` read them from here, never from outside the package);
* :func:`write_split_files`: ``promptkd data splits --write ROOT``: writes them to
  ``ROOT/<dataset folder>/``; an existing identical file is left alone and a DIFFERENT one is never
  replaced unless ``overwrite=True``;
* :func:`compare_with_packaged`: whether a root's split file is the packaged one.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from promptkd.data.benchmarks import REGISTRY, get_spec
from promptkd.fileio import atomic_write

# SHA-256 of each decompressed file (also in assets/splits/README.md); checked before anything is written
SHA256 = {
    "split_zhou_Caltech101.json": "52ce83205ff8ff8a1a18119aad6376120ae35c36e783a984bc560cbf10e73fa5",
    "split_zhou_DescribableTextures.json": "f26ebeccd2b58e68d70f07a0dc39fe49bf7b69024bac34396b954dfd87969c38",
    "split_zhou_EuroSAT.json": "541503a77d0b26b735d85ec7a3e672804fe0aa466c2e5f07da772cc6c0af8ad2",
    "split_zhou_OxfordFlowers.json": "2f50c42fc1a17ca13c271cb4269b1347bdb43d2be672e34f74a4e4cbfbcca794",
    "split_zhou_OxfordPets.json": "d7f3ffe65b3919f95132e51422894ae18686b83c331fd8c0adcdc3dc2de6301e",
    "split_zhou_StanfordCars.json": "40acee7aa65c8e4727a32d90e884b7c3f8960b523422317e163f7af65432959d",
    "split_zhou_UCF101.json": "d78cb834f7c5792ceaff2c5ee2d7c76a9e4086e48a3a6b01232989d29cbefdd8",
    "oxford_flowers_cat_to_name.json": "0469f1ad7fe0072d98155c49aa58649d998edbbe3326229003aa5f7228525236",
}
# files written beside a dataset's split file: {dataset: {name in the data root: packaged asset}}
EXTRA_FILES = {"Flowers102": {"cat_to_name.json": "oxford_flowers_cat_to_name.json"}}


def _asset(name: str):
    return resources.files("promptkd.data") / "assets" / "splits" / f"{name}.gz"


def packaged_split_datasets() -> list[str]:
    """Benchmark names (registry order) whose split file ships with the package."""
    return [n for n, s in REGISTRY.items() if s.split_file and _asset(s.split_file).is_file()]


def has_packaged_split(name: str) -> bool:
    spec = get_spec(name)
    return bool(spec.split_file) and _asset(spec.split_file).is_file()


def _require(name: str):
    spec = get_spec(name)
    if not has_packaged_split(spec.name):
        raise ValueError(f"no packaged split file for {spec.name}; packaged: {', '.join(packaged_split_datasets())}")
    return spec


def packaged_bytes(asset: str) -> bytes:
    """The exact bytes of a packaged file (``split_zhou_EuroSAT.json``...), checked against its SHA-256."""
    if asset not in SHA256:
        raise ValueError(f"{asset} is not a packaged split asset; known: {', '.join(SHA256)}")
    data = gzip.decompress(_asset(asset).read_bytes())
    if hashlib.sha256(data).hexdigest() != SHA256[asset]:
        raise ValueError(f"{_asset(asset)}: packaged file is damaged (SHA-256 differs); reinstall promptkd")
    return data


def packaged_split(name: str) -> dict:
    """A benchmark's packaged split, parsed: ``{"train"|"val"|"test": [[path, label, class name], ...]}``."""
    return json.loads(packaged_bytes(_require(name).split_file))


def files_for(name: str) -> dict[str, str]:
    """``{file name in the dataset folder: packaged asset}`` for one benchmark (its split file first)."""
    spec = _require(name)
    return {spec.split_file: spec.split_file, **EXTRA_FILES.get(spec.name, {})}


@dataclass
class Written:
    dataset: str
    path: Path
    status: str  # "written" | "unchanged" (identical file already there) | "replaced" (with overwrite)


def write_split_files(root: str | os.PathLike, names: list[str] | None = None, *,
                      overwrite: bool = False) -> list[Written]:
    """Write the packaged split files into ``root`` (CoOp layout). Without ``names``: every benchmark with
    a packaged file whose folder exists under ``root``. A different existing file is an error naming it
    (all files are checked before any is written) unless ``overwrite``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist")
    if names:
        wanted = [_require(n).name for n in names]
    else:
        wanted = [n for n in packaged_split_datasets() if (root / get_spec(n).folder).is_dir()]
        if not wanted:
            folders = ", ".join(get_spec(n).folder for n in packaged_split_datasets())
            raise FileNotFoundError(f"{root}: no dataset folder with a packaged split file ({folders}); "
                                    "name the datasets with --dataset NAME")
    plan: list[tuple[str, Path, bytes, str]] = []
    conflicts = []
    for name in wanted:
        folder = root / get_spec(name).folder
        for file_name, asset in files_for(name).items():
            target, data = folder / file_name, packaged_bytes(asset)
            if target.is_file() or target.is_symlink():
                status = "unchanged" if target.is_file() and target.read_bytes() == data else "replaced"
                if status == "replaced" and not overwrite:
                    conflicts.append(str(target))
            else:
                status = "written"
            plan.append((name, target, data, status))
    if conflicts:
        raise ValueError(f"{len(conflicts)} existing file(s) differ from the packaged copies and were left alone: "
                         f"{', '.join(conflicts)} (pass --overwrite to replace them)")
    out = []
    for name, target, data, status in plan:
        if status != "unchanged":
            atomic_write(target, data)
        out.append(Written(name, target, status))
    return out


def compare_with_packaged(name: str, path: str | os.PathLike) -> str | None:
    """None when the split file at ``path`` has the packaged content (any JSON formatting); else a note."""
    spec = get_spec(name)
    if not has_packaged_split(spec.name):
        return None
    try:
        own = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return None  # unreadable: reported by the loader
    if own == packaged_split(spec.name):
        return None
    root = Path(path).absolute().parent.parent  # <root>/<dataset folder>/<split file>
    return (f"{path} differs from CoOp's split file packaged with promptkd (other labels, images or class names); "
            f"`{write_command(root, spec.name)} --overwrite` restores CoOp's")


def write_command(root: str | os.PathLike, name: str) -> str:
    """The command that writes ``name``'s packaged split file into ``root``."""
    return f"promptkd data splits --write {root} --dataset {get_spec(name).name}"
