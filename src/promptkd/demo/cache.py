"""A content-addressed cache for the outputs of a frozen, deterministic network part.

The demo's image encoders are cut in two: a frozen trunk (in eval mode, so a pure function of its input)
and a tail through which prompts are trained. Each input image is hashed (BLAKE2b of its float32 bytes);
the trunk runs only on images it has not seen, and results are stored, per trunk identity (weights
checksum, variant, resolution, cut point, preprocessing), in one safetensors file. The outputs are
bit-identical to running the trunk (float32 is kept); with augmented inputs every image is simply a miss.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from promptkd.fileio import atomic_save_with

CACHE_ENV = "PROMPTKD_CACHE"


def default_cache_dir() -> Path:
    """``$PROMPTKD_CACHE`` or ``~/.cache/promptkd``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "promptkd")
    return Path(root)


def sample_digests(images: Tensor) -> list[bytes]:
    """One 16-byte BLAKE2b digest per sample of a batch (of its float32 values)."""
    flat = images.detach().to("cpu", torch.float32).contiguous().reshape(images.shape[0], -1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


class TrunkCache:
    """Maps input digests to trunk outputs; ``save()`` writes new entries to ``path``."""

    def __init__(self, identity: str, path: str | Path | None = None) -> None:
        self.identity = identity
        self.path = Path(path) if path is not None else None
        self.rows: dict[bytes, Tensor] = {}
        self.hits = 0  # lookups answered without computing (from the file, or computed earlier in this run)
        self.file_hits = 0  # of those, answered by an entry read from the file
        self.misses = 0
        self.loaded = 0
        self._fresh: set[bytes] = set()  # digests computed in this process
        self._dirty = False
        if self.path is not None and self.path.is_file():
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        try:
            with safe_open(str(self.path), framework="pt") as f:
                if (f.metadata() or {}).get("identity") != self.identity:
                    return  # another trunk's file under this name: ignore it, it will be overwritten
                digests = f.get_tensor("digests").numpy()
                maps = f.get_tensor("maps")
        except Exception:  # noqa: BLE001 - a damaged cache is ignored and rebuilt, never trusted
            return
        for digest, value in zip(digests, maps):
            self.rows[digest.tobytes()] = value
        self.loaded = len(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, images: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        """Trunk outputs for ``images``: cached rows where known, ``compute`` on the rest (one batch)."""
        digests = sample_digests(images)
        missing = [i for i, d in enumerate(digests) if d not in self.rows]
        self.hits += len(digests) - len(missing)
        self.file_hits += sum(1 for d in digests if d in self.rows and d not in self._fresh)
        self.misses += len(missing)
        if missing:
            with torch.no_grad():
                fresh = compute(images[missing]).detach().to("cpu", torch.float32)
            for i, value in zip(missing, fresh):
                self.rows[digests[i]] = value.clone()
                self._fresh.add(digests[i])
            self._dirty = True
        return torch.stack([self.rows[d] for d in digests]).to(images.device)

    def save(self) -> Path | None:
        """Write all entries (only if new ones were added); returns the file path."""
        if self.path is None or not self._dirty or not self.rows:
            return self.path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        digests = torch.from_numpy(np.frombuffer(b"".join(self.rows), dtype=np.uint8).reshape(-1, 16).copy())
        tensors = {"digests": digests, "maps": torch.stack(list(self.rows.values())).contiguous()}
        atomic_save_with(self.path, lambda tmp: save_file(tensors, tmp, metadata={"identity": self.identity}))
        self._dirty = False
        return self.path
