"""Fashion-MNIST (Xiao et al. 2017) from its original IDX files, as shipped by the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*-ubyte.gz``) or any folder holding them.

10 classes of 28x28 grey product photos (Zalando), 60,000 train and 10,000 test images.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ROOT_ENV = "PROMPTKD_FASHION_MNIST"
# label order of the dataset; names written as a product catalogue would (the text encoder reads them)
CLASS_NAMES = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
INSTALL_HINT = (
    "install it with `sudo apt-get install dataset-fashion-mnist`, or point "
    f"{ROOT_ENV}=DIR (or --data DIR) at a folder with the four *-ubyte(.gz) files"
)


def default_root() -> Path:
    return Path(os.environ.get(ROOT_ENV, DEFAULT_ROOT))


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"Fashion-MNIST: {root / (stem + '.gz')} not found; {INSTALL_HINT}")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0x0000 | dtype 0x08 (uint8) | ndim, then big-endian dims."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: IDX element type 0x{data[2]:02x} is not unsigned byte (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims)) if dims else 0
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX header says {dims} ({expected} bytes) but {len(data) - header} bytes follow")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_split(split: str, root: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """Images [N, 28, 28] uint8 and labels [N] int64 of ``split`` ("train" or "test")."""
    if split not in FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', not {split!r}")
    root = Path(root) if root is not None else default_root()
    image_stem, label_stem, count = FILES[split]
    image_path, label_path = _find(root, image_stem), _find(root, label_stem)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{image_path}: expected [N, 28, 28] images, found {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{label_path}: {labels.shape[0]} labels for {images.shape[0]} images in {image_path}")
    if labels.max(initial=0) >= len(CLASS_NAMES):
        raise ValueError(f"{label_path}: label {int(labels.max())} out of range 0..{len(CLASS_NAMES) - 1}")
    if images.shape[0] != count:
        raise ValueError(f"{image_path}: {images.shape[0]} images, Fashion-MNIST {split} has {count}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def check_available(root: str | Path | None = None) -> Path:
    """Return the data folder if all four files are present, else raise with install instructions."""
    root = Path(root) if root is not None else default_root()
    for image_stem, label_stem, _ in FILES.values():
        _find(root, image_stem)
        _find(root, label_stem)
    return root
