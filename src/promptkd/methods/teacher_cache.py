"""Teacher-output cache for stage 2: the frozen teacher's image features, computed ahead, once.

In stage 2 the prompted ViT-L/14 teacher's image forward costs more than the student's forward and
backward together, yet it depends only on the image and its augmentation, and promptkd's augmentation
is a function of ``(seed, epoch, image index)`` (``promptkd.data.loader.sample_seed``). So the
teacher's outputs for a whole run can be computed before it, exactly.

Views. View ``v`` of image ``i`` is the augmented image the distill run draws for ``i`` in epoch ``v``
(``dataset[(v, i)]`` of the SAME :class:`~promptkd.data.loader.UnlabelledImages` distill trains on).

* ``views="epochs"`` (exact): one view per epoch; epoch ``e`` uses view ``e``. A run from the cache
  trains on the same numbers as the online run.
* ``views=K`` (``K < epochs``, the FKD trade-off): the first K views only; epoch ``e`` uses view
  ``e mod K``, i.e. the augmentation of epoch ``e mod K``, for the teacher AND the student (the
  data order stays the one of epoch ``e``). Less augmentation diversity, ``K / epochs`` of the cost.

Layout of a cache folder (memory-mapped ``.npy`` shards; each file written atomically, so a killed
build resumes at the first missing shard)::

    manifest.json            identity, layout (images, views, dim, shard size, logit scale), complete
    v0000_s00000.npy ...     [rows, D] L2-normalised teacher image features of view v, images
                             [s * shard_size, (s + 1) * shard_size), in the cache dtype (fp16 default)
    heldout.npy              [H, D] float32 features of the held-out images (agreement selection),
                             test preprocessing, computed in fp32 like the online selector; row = index

Identity (:func:`cache_identity`): teacher checksum, class-vector fingerprint, dataset, image list hash
(paths relative to their common folder, so a moved data folder still matches), held-out list hash and
preprocessing, augmentation config, seed, views, epochs covered, dtype. :func:`open_teacher_cache`
refuses a cache whose identity differs from the run's, naming the field.

fp16 error bound (stated in tests/test_teacher_cache.py): a unit-norm feature f stored in fp16 moves by
e with |e_i| <= 2^-11 |f_i| + 2^-25 (round to nearest; 2^-25 covers subnormals), so ||e|| <= 2^-11 +
sqrt(D) 2^-25 and every logit ``s * f @ w`` (||w|| = 1) moves by at most ``s (2^-11 + sqrt(D) 2^-25)``:
0.049 at CLIP's s = 100 and D = 768.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from promptkd import fileio
from promptkd.data.loader import UnlabelledImages
from promptkd.progress import progress_bar

FORMAT = "promptkd.teacher_cache.v1"
MANIFEST = "manifest.json"
HELDOUT = "heldout.npy"
DTYPES = {"fp16": np.float16, "fp32": np.float32}
DEFAULT_SHARD_SIZE = 8192
# every field of a cache's identity; ``expected`` dicts may give any subset (None = "do not check")
IDENTITY_FIELDS = ("teacher", "class_vectors", "dataset", "images", "heldout_images", "heldout_preprocess",
                   "augmentation", "seed", "views", "epochs", "dtype")
OPEN_SHARDS = 256  # memory maps kept open per process (least recently used closed first)


# --- identity -----------------------------------------------------------------------------------------


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def path_list_sha256(paths: Sequence[str | os.PathLike]) -> str | None:
    """Hash of an ordered image list, paths taken relative to their common folder (None for no list).

    Moving or re-mounting the whole data folder keeps the hash; renaming, adding, removing or
    reordering images changes it."""
    if not paths:
        return None
    absolute = [os.path.abspath(os.fspath(p)) for p in paths]
    root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    return _sha256_json([len(absolute), [os.path.relpath(p, root) for p in absolute]])


def transform_config(transform: Any) -> dict:
    """The public settings of a transform (TrainAugment / Preprocess) as a JSON-able dict."""
    out: dict[str, Any] = {"kind": type(transform).__name__}
    for key, value in sorted(vars(transform).items()):
        if not key.startswith("_"):
            out[key] = list(value) if isinstance(value, tuple) else value
    return json.loads(json.dumps(out, default=str))


def teacher_checksum(backbone_identity: dict, prompt_tensors: dict[str, Tensor]) -> str:
    """Checksum of a teacher: its backbone identity (architecture, frozen weights' checksum, prompt
    config; the weights' PATH left out) and its learnt prompt tensors."""
    from promptkd.models.clip_backbones import tensors_sha256

    ident = {k: v for k, v in backbone_identity.items() if k != "weights"}
    return _sha256_json({"backbone": ident, "prompts": tensors_sha256(prompt_tensors)})


def teacher_checksum_of(teacher) -> str:
    """:func:`teacher_checksum` of a loaded teacher (its prompts: every tensor outside the frozen ``clip``)."""
    state = teacher.state_dict()
    prompts = {k: v for k, v in state.items() if not k.startswith("clip.")} if hasattr(teacher, "clip") else state
    return teacher_checksum(teacher.identity(), prompts)


def teacher_checksum_of_artefact(path: str | os.PathLike) -> str:
    """:func:`teacher_checksum` from a teacher artefact folder alone: adapter.json + adapter.safetensors,
    no CLIP weights read (a run from the cache never loads the teacher)."""
    from safetensors.torch import load_file

    from promptkd import artifacts

    folder, meta = artifacts.read_meta(path)
    if meta.get("role") != "teacher":
        raise ValueError(f"{folder}: this artefact is a {meta.get('role')}, not a teacher")
    tensors = folder / artifacts.TENSORS
    if not tensors.is_file():
        raise FileNotFoundError(f"{folder}: {artifacts.TENSORS} is missing")
    if meta.get("adapter_sha256") and artifacts.file_sha256(tensors) != meta["adapter_sha256"]:
        raise ValueError(f"{tensors}: checksum differs from {artifacts.META} (file changed or corrupt)")
    return teacher_checksum(meta["backbone"], load_file(str(tensors)))


def teacher_checksum_for(path: str | os.PathLike, weights: str | os.PathLike | None = None,
                         trust_checkpoint: bool = False) -> str:
    """The checksum of the teacher ``distill --teacher PATH`` names: from the artefact's files alone, or,
    for an authors' Dassl checkpoint (no artefact), by loading it with its CLIP ``weights``."""
    from promptkd import artifacts

    folder = Path(path)
    if (folder / artifacts.META).is_file() or folder.name in (artifacts.META, artifacts.TENSORS):
        return teacher_checksum_of_artefact(folder)
    from promptkd.methods.teacher_io import load_teacher

    teacher, _ = load_teacher(folder, weights=weights, trust_checkpoint=trust_checkpoint)
    return teacher_checksum_of(teacher)


def _views_value(views: str | int, epochs: int) -> str | int:
    if views == "epochs":
        return "epochs"
    try:
        k = int(views)
    except (TypeError, ValueError):
        raise ValueError(f"views must be 'epochs' or a number of views, got {views!r}") from None
    if not 1 <= k <= int(epochs):
        raise ValueError(f"views must be between 1 and epochs ({epochs}), got {k}")
    return k


def _dtype_name(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    name = {"float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}.get(str(dtype), str(dtype))
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    return name


def stream_name(cfg: dict) -> str:
    """The ``dataset`` identity field for a distill config: ``"<dataset> <unlabelled mode>"`` (e.g.
    ``"dtd transductive"``), or ``"folder"`` for ``data.unlabelled=folder`` (whose images the image-list
    hash identifies)."""
    data = cfg["data"]
    if data["unlabelled"] == "folder":
        return "folder"
    return f"{str(data['dataset']).lower()} {data['unlabelled']}"


def cache_identity(*, teacher: str, class_vectors: str, dataset: str, train_set: UnlabelledImages,
                   heldout_set: UnlabelledImages | None = None, epochs: int, views: str | int | None = "epochs",
                   dtype: str | None = "fp16") -> dict:
    """The identity of the cache for a run: what :func:`build_teacher_cache` records and what a distill
    run passes to :func:`open_teacher_cache` as ``expected``.

    ``teacher``: :func:`teacher_checksum_of` / :func:`teacher_checksum_of_artefact`; ``class_vectors``:
    ``ClassVectorStore.fingerprint()``; ``dataset``: a name for the stream (e.g. ``"DTD transductive"``);
    ``train_set``: the stream distill trains on (its paths, augmentation and seed); ``heldout_set``: the
    held-out images of ``selection=agreement`` (None otherwise). ``views``/``dtype`` None: any."""
    heldout_paths = heldout_set.paths if heldout_set is not None else []
    return {
        "teacher": str(teacher), "class_vectors": str(class_vectors), "dataset": str(dataset),
        "images": path_list_sha256(train_set.paths),
        "heldout_images": path_list_sha256(heldout_paths),
        "heldout_preprocess": transform_config(heldout_set.transform) if heldout_set is not None else None,
        "augmentation": transform_config(train_set.transform), "seed": int(train_set.seed),
        "views": None if views is None else _views_value(views, epochs), "epochs": int(epochs),
        "dtype": _dtype_name(dtype),
    }


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def identity_differences(found: dict, expected: dict) -> list[str]:
    """The fields where a cache's identity ``found`` does not serve a run expecting ``expected``.

    Fields missing from ``expected`` or set to None there are not checked. ``epochs``: an exact cache
    (``views="epochs"``) serves any run of at most as many epochs; a K-view cache any number."""
    unknown = sorted(set(expected) - set(IDENTITY_FIELDS))
    if unknown:
        raise ValueError(f"unknown teacher-cache identity field(s) {unknown}; known: {list(IDENTITY_FIELDS)}")
    differ = []
    for key in IDENTITY_FIELDS:
        if key not in expected or (expected[key] is None and key in ("views", "dtype")):
            continue
        want, have = expected[key], found.get(key)
        if key == "epochs":
            if found.get("views") == "epochs" and (have is None or int(have) < int(want)):
                differ.append(f"epochs (the cache holds views for {have} epoch(s), the run has {want})")
            continue
        if have != want:
            differ.append(f"{key} (cache {_short(have)}, run {_short(want)})")
    return differ


# --- reading --------------------------------------------------------------------------------------------


def shard_name(view: int, shard: int) -> str:
    return f"v{view:04d}_s{shard:05d}.npy"


class TeacherCache:
    """A built cache, read through memory maps: ``features(view, index)``, ``view_for_epoch(epoch)``.

    Picklable (DataLoader workers): open memory maps are dropped and reopened in each process."""

    def __init__(self, path: str | os.PathLike, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.identity: dict = manifest["identity"]
        layout = manifest["layout"]
        self.num_images, self.num_views = int(layout["num_images"]), int(layout["num_views"])
        self.dim, self.shard_size = int(layout["dim"]), int(layout["shard_size"])
        self.num_shards = int(layout["num_shards"])
        self.logit_scale = float(layout["logit_scale"])
        self.dtype = self.identity["dtype"]
        self.views = self.identity["views"]
        self._open: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state

    def view_for_epoch(self, epoch: int) -> int:
        """The view (= the augmentation of that epoch) used in 0-based ``epoch``: ``epoch`` for an exact
        cache, ``epoch mod K`` for a K-view cache."""
        if self.views == "epochs":
            if not 0 <= epoch < self.num_views:
                raise ValueError(f"{self.path}: this exact teacher cache holds views for {self.num_views} epoch(s); "
                                 f"epoch {epoch + 1} is not in it (rebuild it with more epochs)")
            return int(epoch)
        return int(epoch) % self.num_views

    def _shard(self, view: int, shard: int) -> np.ndarray:
        key = (view, shard)
        arr = self._open.get(key)
        if arr is None:
            path = self.path / shard_name(view, shard)
            try:
                arr = np.load(path, mmap_mode="r")
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: teacher-cache shard missing (resume the build)") from None
            self._open[key] = arr
            if len(self._open) > OPEN_SHARDS:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(key)
        return arr

    def features(self, view: int, index: int) -> np.ndarray:
        """[D] normalised teacher features of image ``index`` in view ``view``, in the cache dtype (a copy)."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"image index {index} out of range for a cache of {self.num_images} images")
        if not 0 <= view < self.num_views:
            raise IndexError(f"view {view} out of range for a cache of {self.num_views} views")
        shard, row = divmod(int(index), self.shard_size)
        return np.array(self._shard(int(view), shard)[row])

    def view_features(self, view: int) -> Tensor:
        """[N, D] every image's features in one view (for checks and tests)."""
        return torch.from_numpy(np.concatenate([np.asarray(self._shard(view, s)) for s in range(self.num_shards)]))

    def heldout_features(self) -> Tensor | None:
        """[H, D] float32 features of the held-out images (rows of indices never returned are NaN)."""
        path = self.path / HELDOUT
        return torch.from_numpy(np.load(path)) if path.is_file() else None


def read_manifest(path: str | os.PathLike) -> dict:
    folder = Path(path)
    manifest = fileio.read_json(folder / MANIFEST, "teacher-cache manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{folder / MANIFEST}: not a promptkd teacher cache (format {FORMAT} expected)")
    return manifest


def cache_image_spec(path: str | os.PathLike):
    """The image spec (size, mean, std, interpolation) of the teacher a cache was built for, read from its
    manifest: what a run that does not load the teacher gives the student builder in place of
    ``teacher.image_spec`` (the run's augmentation is then checked against the cache's identity)."""
    from promptkd.models.backbones import ImageSpec

    folder = Path(path)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"{folder}: teacher cache not found (no {MANIFEST})")
    aug = read_manifest(folder)["identity"]["augmentation"]
    try:
        return ImageSpec(size=int(aug["size"]), mean=tuple(aug["mean"]), std=tuple(aug["std"]),
                         interpolation=str(aug.get("interpolation", "bicubic")))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{folder / MANIFEST}: no usable augmentation record ({exc})") from None


def open_teacher_cache(path: str | os.PathLike, expected: dict | None = None) -> TeacherCache:
    """Open a complete cache; refuse it (ValueError naming the field) if its identity does not serve a
    run whose identity is ``expected`` (see :func:`cache_identity` and :func:`identity_differences`)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: teacher cache not found")
    manifest = read_manifest(folder)
    if not manifest.get("complete"):
        raise ValueError(f"{folder}: teacher cache is incomplete (its build was interrupted); finish it with "
                         "`promptkd teacher-cache ... --resume`")
    if expected is not None:
        differ = identity_differences(manifest["identity"], expected)
        if differ:
            raise ValueError(f"{folder}: this teacher cache was built for another run: {'; '.join(differ)}; "
                             "rebuild it with `promptkd teacher-cache`")
    cache = TeacherCache(folder, manifest)
    missing = [shard_name(v, s) for v in range(cache.num_views) for s in range(cache.num_shards)
               if not (folder / shard_name(v, s)).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} teacher-cache shard(s) missing (e.g. {missing[0]})")
    return cache


class CachedTeacherImages(UnlabelledImages):
    """The distill stream plus ``sample["teacher_features"]`` from a cache, for the training loop.

    Sample ``(epoch, index)`` is the stream's sample ``(view, index)`` with ``view =
    cache.view_for_epoch(epoch)`` (the same as ``(epoch, index)`` for an exact cache) plus the cached
    features of that view. It IS an ``UnlabelledImages`` (sharing the wrapped stream's paths, transform,
    seed and bad-image log), so ``engine.loop`` gives it the same sampler, epoch tagging, DDP sharding
    and mid-epoch resume as the stream itself."""

    def __init__(self, dataset: UnlabelledImages, cache: TeacherCache):
        if not isinstance(dataset, UnlabelledImages):
            raise TypeError(f"CachedTeacherImages wraps an UnlabelledImages stream, got {type(dataset).__name__}")
        if len(dataset) != cache.num_images:
            raise ValueError(f"{cache.path}: the teacher cache holds {cache.num_images} images but the stream has "
                             f"{len(dataset)}")
        if int(dataset.seed) != int(cache.identity["seed"]) or \
                transform_config(dataset.transform) != cache.identity["augmentation"]:
            raise ValueError(f"{cache.path}: the teacher cache was built with another seed or augmentation than "
                             "this stream")
        self.__dict__.update(dataset.__dict__)  # same paths, transform, seed, epoch, bad-image log
        self.stream, self.cache = dataset, cache

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        view = self.cache.view_for_epoch(int(epoch))
        sample = super().__getitem__((view, int(index)))
        # keyed by the REQUESTED index: with on_bad_image=skip the stream may return a neighbour, and
        # the build stored that neighbour's view under this key too
        sample["teacher_features"] = torch.from_numpy(self.cache.features(view, int(index)))
        return sample


# --- building -------------------------------------------------------------------------------------------


def _layout(n: int, views: int, dim: int, shard_size: int, logit_scale: float, heldout: int, precision: str) -> dict:
    return {"num_images": n, "num_views": views, "dim": dim, "shard_size": shard_size,
            "num_shards": math.ceil(n / shard_size), "logit_scale": logit_scale, "heldout_images": heldout,
            "build_precision": precision, "storage": "npy"}


def _write_npy(path: Path, array: np.ndarray) -> None:
    with fileio.atomic_writer(path, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def _valid_shard(path: Path, rows: int, dim: int, dtype: np.dtype) -> bool:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape == (rows, dim) and arr.dtype == dtype


@torch.no_grad()
def _features(teacher, images: Tensor, device: torch.device, precision: str) -> Tensor:
    """Normalised float32 teacher features, computed as DistillModule computes them inside the loop."""
    from promptkd.engine.loop import autocast

    with autocast(device, precision):
        raw = teacher.encode_image(images.to(device, non_blocking=True), prompted=True)
    return F.normalize(raw.float(), dim=-1)


class _ShardBatches:
    """Batches of ``(epoch, index)`` keys, shard by shard, made lazily (ImageNet x 20 views is 25 M keys);
    a batch never spans two shards, so a resumed build computes every shard from the same batches as an
    uninterrupted one. A short last batch is padded (its first key repeated) to ``batch_size``: the rows
    of a batched forward may round differently with the batch's size, and the run's batches all have
    ``batch_size`` images."""

    def __init__(self, pending: list[tuple[int, int]], n: int, shard_size: int, batch_size: int):
        self.pending, self.n, self.shard_size, self.batch_size = pending, n, shard_size, batch_size

    def _bounds(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min(self.n, (shard + 1) * self.shard_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for view, shard in self.pending:
            lo, hi = self._bounds(shard)
            for start in range(lo, hi, self.batch_size):
                keys = [(view, i) for i in range(start, min(hi, start + self.batch_size))]
                yield keys + [keys[0]] * (self.batch_size - len(keys))

    def __len__(self) -> int:
        return sum(math.ceil((hi - lo) / self.batch_size) for lo, hi in (self._bounds(s) for _, s in self.pending))


def _build_heldout(teacher, heldout: UnlabelledImages, out: Path, dim: int, device: torch.device,
                   batch_size: int, num_workers: int) -> None:
    """Held-out features in fp32 without autocast, in the online agreement selector's batches (in order,
    ``batch_size`` each; distill's is 64), stored under the index each sample reports."""
    from promptkd.data.loader import make_loader

    table = np.full((len(heldout), dim), np.nan, dtype=np.float32)
    for batch in make_loader(heldout, batch_size, num_workers=num_workers, pin_memory=False):
        feats = _features(teacher, batch["image"], device, "fp32")
        table[batch["index"].numpy()] = feats.cpu().numpy()
    _write_npy(out / HELDOUT, table)


def build_teacher_cache(teacher, dataset: UnlabelledImages, out_dir: str | os.PathLike, *, epochs: int,
                        views: str | int = "epochs", seed: int | None = None, dtype: str = "fp16",
                        identity: dict, heldout: UnlabelledImages | None = None, batch_size: int = 8,
                        heldout_batch_size: int = 64, device: str | torch.device = "cpu",
                        precision: str = "fp32", num_workers: int = 0,
                        shard_size: int = DEFAULT_SHARD_SIZE, progress: bool | None = None,
                        resume: bool = False) -> TeacherCache:
    """Run the prompted teacher's image tower over the stream's views; store normalised features.

    ``dataset``: the SAME ``UnlabelledImages`` (with its TrainAugment and seed) distill trains on.
    ``identity``: ``{"class_vectors": store.fingerprint(), "dataset": name}`` (+ optionally
    ``"teacher"``, checked against the teacher given); the rest is derived here (:func:`cache_identity`).
    Bit-equal teacher logits (an exact fp32 cache) need the run's arithmetic: ``precision`` = the run's
    ``train.precision`` (autocast of the teacher forward; fp16 on a CPU runs fp32, as in the loop) and ``batch_size`` = the run's per-process
    ``train.batch_size`` (a batched forward's rows may round differently with the batch size; a larger
    build batch is faster and moves logits by about one float32 ulp). ``heldout_batch_size``: the
    agreement selector's loader batch (64 in distill). ``resume``: continue an interrupted build in
    ``out_dir`` (same identity and layout required); otherwise ``out_dir`` must not hold a cache.
    Returns the opened cache."""
    from promptkd.engine.loop import PRECISIONS, effective_precision, resolve_device

    if not isinstance(dataset, UnlabelledImages):
        raise TypeError(f"build_teacher_cache takes the UnlabelledImages stream distill trains on, got "
                        f"{type(dataset).__name__}")
    if seed is not None and int(seed) != int(dataset.seed):
        raise ValueError(f"seed {seed} differs from the stream's augmentation seed {dataset.seed}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1 (got {batch_size}, {shard_size})")
    given = dict(identity)
    unknown = sorted(set(given) - {"teacher", "class_vectors", "dataset"})
    missing = sorted({"class_vectors", "dataset"} - set(given))
    if unknown or missing:
        raise ValueError(f"identity takes 'class_vectors', 'dataset' (and 'teacher'); missing {missing}, "
                         f"derived here or unknown {unknown}")
    checksum = teacher_checksum_of(teacher)
    if given.get("teacher") not in (None, checksum):
        raise ValueError("identity['teacher'] is not the checksum of the teacher given")
    full = cache_identity(teacher=checksum, class_vectors=given["class_vectors"], dataset=given["dataset"],
                          train_set=dataset, heldout_set=heldout, epochs=epochs, views=views, dtype=dtype)
    n_views = int(epochs) if full["views"] == "epochs" else int(full["views"])
    np_dtype = np.dtype(DTYPES[full["dtype"]])
    dev = resolve_device(str(device))
    precision = effective_precision(precision, dev)  # as the loop runs it (a CPU runs fp16 settings in fp32)
    was_training = teacher.training
    teacher.to(dev).eval()
    n = len(dataset)
    if n == 0:
        raise ValueError("the unlabelled stream is empty: nothing to cache")
    dim = int(getattr(teacher, "embed_dim", 0)) or \
        int(_features(teacher, dataset[(0, 0)]["image"][None], dev, "fp32").shape[-1])
    layout = _layout(n, n_views, dim, int(shard_size), float(teacher.logit_scale()),
                     len(heldout) if heldout is not None else 0, precision)

    out = Path(out_dir)
    manifest = {"format": FORMAT, "identity": full, "layout": layout, "complete": False}
    if (out / MANIFEST).is_file():
        if not resume:
            raise ValueError(f"{out}: holds a teacher cache already; pass --resume to finish (or reuse) it, "
                             "or choose another --out")
        old = read_manifest(out)
        differ = identity_differences(old["identity"], full) + [
            f"{k} (cache {old['layout'].get(k)!r}, now {v!r})" for k, v in layout.items() if old["layout"].get(k) != v]
        if old["identity"].get("epochs") != full["epochs"]:
            differ.append(f"epochs (cache {old['identity'].get('epochs')}, now {full['epochs']})")
        if differ:
            raise ValueError(f"{out}: cannot resume, the cache there was started for other settings: "
                             f"{'; '.join(differ)}; use another --out")
        fileio.remove_stale_temporaries(out, recursive=False)
        if old.get("complete"):
            teacher.train(was_training)
            return open_teacher_cache(out)
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not a teacher cache; choose an empty or new --out")
    fileio.atomic_write_json(out / MANIFEST, manifest)

    if heldout is not None and not (out / HELDOUT).is_file():
        _build_heldout(teacher, heldout, out, dim, dev, heldout_batch_size, num_workers)

    rows = [min(shard_size, n - s * shard_size) for s in range(layout["num_shards"])]
    pending = [(v, s) for v in range(n_views) for s in range(layout["num_shards"])
               if not _valid_shard(out / shard_name(v, s), rows[s], dim, np_dtype)]
    total = n * n_views
    bar = progress_bar(total=total, initial=total - sum(rows[s] for _, s in pending), desc="teacher-cache",
                       unit="view", enabled=progress is not False)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=_ShardBatches(pending, n, shard_size, batch_size), num_workers=num_workers,
        pin_memory=dev.type == "cuda", persistent_workers=False)
    batches = iter(loader)
    try:
        for view, shard in pending:
            parts, filled = [], 0
            while filled < rows[shard]:
                feats = _features(teacher, next(batches)["image"], dev, precision)[: rows[shard] - filled]
                parts.append(feats.cpu().numpy().astype(np_dtype))
                filled += feats.shape[0]
                bar.update(feats.shape[0])
            _write_npy(out / shard_name(view, shard), np.concatenate(parts))
    finally:
        bar.close()
        teacher.train(was_training)
    dataset.report_bad_images()
    fileio.atomic_write_json(out / MANIFEST, {**manifest, "complete": True})
    return open_teacher_cache(out)
