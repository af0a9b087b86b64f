"""Datasets that yield dict samples, robust image decoding, and the DataLoader factory.

Samples (ARCHITECTURE.md "Contracts"):

* :class:`LabelledImages` -> ``{"image": FloatTensor[3,H,W], "label": int, "index": int}``
* :class:`UnlabelledImages` -> ``{"image": ..., "index": int}``; it is built from paths only and has
  no label anywhere, so a stage-2 method cannot see one.

Augmentation randomness comes from a ``torch.Generator`` seeded from ``(seed, epoch, index)`` and
passed to the transform (``transform(pil_image, generator=g)``), so an image's augmentation does not
depend on the number of workers, and a resumed run reproduces it. The epoch travels with every index
(the sampler yields ``(epoch, index)`` pairs), so persistent workers see ``set_epoch`` at once.

Images are decoded by :func:`promptkd.data.decode.read_image` (16-bit data scaled to 8 bits, a pixel
limit ``max_image_pixels``, the config's ``data.max_image_pixels``, with JPEGs over it reduced while
decoding). Unreadable images never crash a long run silently: with ``on_bad_image="error"`` the first
one raises :class:`BadImageError` naming the file (a ValueError; raised in a DataLoader worker it
reaches the main process with the same one-line message, not the worker's traceback); with
``"skip"`` (default) the next readable sample is used instead, the file is logged (workers append to
a small log file), and ``set_epoch`` / :meth:`bad_images` report every bad path at the end of the epoch.
"""

from __future__ import annotations

import os
import tempfile
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from promptkd.data.decode import DEFAULT_MAX_IMAGE_PIXELS, BadImageError, read_image

Transform = Callable[..., torch.Tensor]
MAX_CONSECUTIVE_BAD = 16


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation, the same on every machine and worker count."""
    entropy = [int(seed) % 2**64, int(epoch) % 2**64, int(index) % 2**64]
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


class PathTable:
    """Paths packed in two numpy arrays (UTF-8 bytes + offsets) instead of a list of str objects.

    Forked DataLoader workers touching millions of Python objects copy their pages (refcounts);
    numpy buffers stay shared, so ImageNet-size lists cost their size once, not once per worker."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        encoded = [os.fsencode(p) for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return os.fsdecode(self._data[self._offsets[i]:self._offsets[i + 1]].tobytes())

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


def _remove_if_owner(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid and os.path.exists(path):
        os.remove(path)


class _ImageDataset(Dataset):
    """Shared machinery: decoding, per-sample generators, epochs, bad-image log."""

    def __init__(self, paths: Sequence[str], transform: Transform, *, seed: int = 0, on_bad_image: str = "skip",
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        if max_image_pixels is not None and (isinstance(max_image_pixels, bool) or int(max_image_pixels) < 1):
            raise ValueError(f"data.max_image_pixels must be a positive number of pixels, got {max_image_pixels!r}")
        self.max_image_pixels = None if max_image_pixels is None else int(max_image_pixels)
        if transform is None:
            raise ValueError("a transform is required (e.g. promptkd.data.transforms.Preprocess)")
        self._paths = PathTable(paths)
        self.transform = transform
        self.seed = int(seed)
        self.on_bad_image = on_bad_image
        self.epoch = 0
        self.bad_seen: dict[str, str] = {}  # every bad path reported so far (main process)
        self._bad_here = 0  # bad images met in this process (each worker has its own copy)
        self._bad_log = os.path.join(tempfile.gettempdir(), f"promptkd-bad-images-{uuid.uuid4().hex}.tsv")
        weakref.finalize(self, _remove_if_owner, self._bad_log, os.getpid())

    def __len__(self) -> int:
        return len(self._paths)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (0-based): report the bad images met since the last call (as the 1-based epoch
        the training loop prints), then reseed augmentations."""
        self.report_bad_images()
        self.epoch = int(epoch)

    def bad_images(self) -> dict[str, str]:
        """{path: reason} for images found unreadable (in any worker) since the last report."""
        out: dict[str, str] = {}
        if os.path.exists(self._bad_log):
            with open(self._bad_log) as f:
                for line in f:
                    path, _, reason = line.rstrip("\n").partition("\t")
                    out[path] = reason
        return out

    def report_bad_images(self) -> dict[str, str]:
        """Warn once about the images replaced since the last report; return them and clear the log."""
        bad = self.bad_images()
        if bad:
            listed = "\n  ".join(f"{reason}" for reason in list(bad.values())[:20])
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            warnings.warn(f"epoch {self.epoch + 1}: {len(bad)} unreadable image(s) were replaced by the next "
                          f"readable sample:\n  {listed}{more}", stacklevel=2)
            self.bad_seen.update(bad)
            os.remove(self._bad_log)
        return bad

    def _record_bad(self, path: str, reason: str) -> None:
        with open(self._bad_log, "a") as f:
            f.write(f"{path}\t{reason}\n")

    def _image(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        if not 0 <= index < len(self._paths):
            raise IndexError(f"index {index} out of range for {len(self._paths)} images")
        tried = []
        for attempt in range(MAX_CONSECUTIVE_BAD):
            i = (index + attempt) % len(self._paths)
            try:
                img = read_image(self._paths[i], max_pixels=self.max_image_pixels)
            except BadImageError as exc:
                if self.on_bad_image == "error":
                    raise
                self._record_bad(self._paths[i], str(exc))
                self._bad_here += 1
                if self._bad_here <= 10:  # say it now too (long epochs); the full list comes at epoch end
                    warnings.warn(f"skipping unreadable image: {exc}", stacklevel=2)
                tried.append(str(exc))
                continue
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
            try:
                return self.transform(img, generator=g), i
            except Exception as exc:  # a transform bug or an odd image: say which file, never skip silently
                raise RuntimeError(f"{self._paths[i]}: transform failed ({type(exc).__name__}: {exc})") from exc
        raise BadImageError(f"{MAX_CONSECUTIVE_BAD} consecutive unreadable images from index {index}:\n  "
                            + "\n  ".join(tried))


class LabelledImages(_ImageDataset):
    """``{"image", "label", "index"}`` for each sample (anything with ``.path`` and ``.label``)."""

    def __init__(self, samples: Sequence[Any], transform: Transform, *, seed: int = 0, on_bad_image: str = "skip",
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        super().__init__([s.path for s in samples], transform, seed=seed, on_bad_image=on_bad_image,
                         max_image_pixels=max_image_pixels)
        self.labels = np.fromiter((int(s.label) for s in samples), dtype=np.int64, count=len(samples))

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        image, i = self._image(key)
        return {"image": image, "label": int(self.labels[i]), "index": i}


class UnlabelledImages(_ImageDataset):
    """``{"image", "index"}`` for each image path. Takes PATHS only: there is no label to leak."""

    def __init__(self, paths: Sequence[str | os.PathLike], transform: Transform, *, seed: int = 0,
                 on_bad_image: str = "skip", max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        for p in paths:
            if not isinstance(p, (str, os.PathLike)):
                raise TypeError(f"UnlabelledImages takes image paths only, got {type(p).__name__} "
                                "(use promptkd.data.splits.unlabelled_paths to drop labels)")
        super().__init__(paths, transform, seed=seed, on_bad_image=on_bad_image, max_image_pixels=max_image_pixels)

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        image, i = self._image(key)
        return {"image": image, "index": i}


# ---------------------------------------------------------------------------------------------------
# samplers and the loader


class SeededShuffle(Sampler[int]):
    """A permutation per epoch from ``(seed, epoch)``: independent of the global RNG, resumable.

    With ``world`` processes, rank ``r`` takes positions r, r+w, ... of that same permutation (padded with
    its first items to a multiple of ``w``, or cut to one with ``drop_last``, as ``DistributedSampler``), so
    the images of one step over all ranks are those of one single-process step with the batch x ``w``."""

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world: int = 1, drop_last: bool = False):
        self.n, self.seed, self.epoch, self.rank, self.world = n, seed, 0, rank, world
        self.total = (n - n % world if drop_last else -(-n // world) * world) if world > 1 else n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        order = torch.randperm(self.n, generator=g).tolist()
        if self.world == 1:
            return iter(order)
        order = (order * (-(-self.total // max(1, self.n))))[: self.total]
        return iter(order[self.rank : self.total : self.world])

    def __len__(self) -> int:
        return self.total // self.world


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``w`` takes indices r, r+w, ... in order: evaluation without padding or repeats."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochTagged(Sampler):
    """Wraps a sampler to yield ``(epoch, index)`` for our datasets (plain indices for any other
    dataset); ``set_epoch`` reaches the wrapped sampler and the dataset; ``start`` skips items (resume)."""

    def __init__(self, base: Sampler[int], dataset: Dataset):
        self.base, self.dataset, self.start, self.epoch = base, dataset, 0, 0
        self.tagged = isinstance(dataset, _ImageDataset)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        for target in (self.base, self.dataset):
            if hasattr(target, "set_epoch"):
                target.set_epoch(epoch)
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self) -> Iterator:
        epoch = self.epoch
        for n, i in enumerate(self.base):
            if n >= self.start:
                yield (epoch, i) if self.tagged else i

    def __len__(self) -> int:
        return max(0, len(self.base) - self.start)


class EpochLoader(DataLoader):
    """A DataLoader with ``set_epoch(epoch, start_batch=0)`` (dataset seeds, sampler order, resume).

    Iterating again without calling ``set_epoch`` moves to the next epoch by itself, so a loop that
    forgets it still gets fresh orders and augmentations (but only ``set_epoch`` makes resume exact)."""

    _epoch_pending = True  # set_epoch (or the first iteration) has chosen the epoch of the next pass

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start=start_batch * (self.batch_size or 1))
        self._epoch_pending = True

    def __iter__(self):
        if not self._epoch_pending:
            self.set_epoch(self.sampler.epoch + 1)
        self._epoch_pending = False
        return super().__iter__()


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decode + augmentation is per-sample work; avoid oversubscribing cores


def _rank_world(distributed: Any) -> tuple[int, int]:
    if distributed is None:
        return 0, 1
    if isinstance(distributed, (tuple, list)):
        rank, world = distributed
    elif isinstance(distributed, dict):
        rank, world = distributed["rank"], distributed["world_size"]
    else:
        rank, world = distributed.rank, distributed.world_size
    if not 0 <= int(rank) < int(world):
        raise ValueError(f"rank {rank} is not in 0..{int(world) - 1}")
    return int(rank), int(world)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0,
                seed: int = 0, drop_last: bool = False, distributed: Any = None, *,
                pin_memory: bool | None = None, prefetch_factor: int = 2) -> EpochLoader:
    """A DataLoader of dict batches over :class:`LabelledImages` / :class:`UnlabelledImages` (any
    map-style dataset works too; it gets ``set_epoch`` calls if it has that method).

    ``distributed`` is None, ``(rank, world_size)``, a dict or an object with ``rank``/``world_size``.
    Training (``shuffle=True``) uses :class:`SeededShuffle` (one permutation per epoch, split over the
    ranks: the same images per step whatever the number of processes); evaluation (``shuffle=False``) gives rank r the samples r, r+w, ...
    with no padding, so gathering every rank's predictions counts each sample once. Call
    ``loader.set_epoch(epoch)`` before each epoch (``start_batch`` to resume mid-epoch)."""
    rank, world = _rank_world(distributed)
    n = len(dataset)
    if shuffle:
        base: Sampler[int] = SeededShuffle(n, seed, rank, world, drop_last)
    elif world > 1:
        base = ShardSampler(n, rank, world)
    else:
        base = range(n)  # type: ignore[assignment]
    sampler = EpochTagged(base, dataset)
    workers = max(0, int(num_workers))
    return EpochLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        worker_init_fn=_worker_init if workers > 0 else None,
    )
