"""The class-vector store: the teacher's normalised text features for every class, computed once.

File format (one ``.safetensors`` file): tensor ``class_vectors`` [N, D] float32 (L2-normalised rows)
and metadata strings ``class_names`` (JSON list, in label order), ``logit_scale`` (float, already
exponentiated), ``teacher`` (JSON identity of the teacher that produced it) and ``format``.

A store is validated whole whenever one is made or loaded (finite unit-norm rows, one non-empty name
per row, a finite positive logit scale, a JSON-object teacher identity): a NaN row would otherwise
reach the loss or print ``nan%`` predictions. Errors are one line naming the file and the field.
Duplicate class names are allowed with a warning (ImageNet's CLIP-style list has two: "missile",
"sunglasses"); the model cannot tell such classes apart.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

FORMAT = "promptkd.class_vectors.v1"
UNIT_NORM_TOLERANCE = 1e-3  # |norm - 1| allowed for a stored row (float32 normalisation is ~1e-7)


class ClassListMismatch(ValueError):
    """The store's class list is not the one the caller's dataset uses."""


@dataclass
class ClassVectorStore:
    vectors: Tensor  # [N, D], float32, rows L2-normalised
    class_names: list[str]
    logit_scale: float
    teacher: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_store_fields(self.vectors, self.class_names, self.logit_scale, self.teacher)

    @property
    def num_classes(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def fingerprint(self) -> str:
        """Short hash of the class names and vectors, recorded by everything trained on this store."""
        h = hashlib.sha256(json.dumps(self.class_names).encode())
        h.update(self.vectors.detach().cpu().float().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def subset(self, indices: Sequence[int]) -> ClassVectorStore:
        idx = list(indices)
        return ClassVectorStore(
            self.vectors[idx], [self.class_names[i] for i in idx], self.logit_scale, dict(self.teacher)
        )

    def check_classes(self, class_names: Sequence[str], source: str = "dataset") -> None:
        """Refuse a dataset whose class list differs from the store's (order matters: it is the label)."""
        names = list(class_names)
        if names == self.class_names:
            return
        if len(names) != len(self.class_names):
            raise ClassListMismatch(
                f"class vectors hold {len(self.class_names)} classes but the {source} has {len(names)}"
            )
        diffs = [(i, a, b) for i, (a, b) in enumerate(zip(self.class_names, names)) if a != b]
        shown = ", ".join(f"label {i}: store {a!r} vs {source} {b!r}" for i, a, b in diffs[:5])
        raise ClassListMismatch(f"class vectors do not match the {source}'s classes ({len(diffs)} differ): {shown}")

    def logits(self, features: Tensor, logit_scale: float | Tensor | None = None) -> Tensor:
        """scale * norm(features) @ vectors^T, computed in float32."""
        scale = self.logit_scale if logit_scale is None else logit_scale
        f = torch.nn.functional.normalize(features.float(), dim=-1)
        return scale * f @ self.vectors.to(f.device).t()

    def save(self, path: str | Path) -> Path:
        """Write the store atomically (a killed write never leaves half a store; mode follows the umask)."""
        from promptkd.fileio import atomic_save_with

        check_store_fields(self.vectors, self.class_names, self.logit_scale, self.teacher)
        path = Path(path)
        meta = {
            "format": FORMAT,
            "class_names": json.dumps(self.class_names),
            "logit_scale": repr(float(self.logit_scale)),
            "teacher": json.dumps(self.teacher, sort_keys=True),
        }
        tensors = {"class_vectors": self.vectors.detach().cpu().float().contiguous()}
        return atomic_save_with(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def from_parts(cls, vectors: Tensor, meta: Mapping[str, str], source: str | Path) -> ClassVectorStore:
        """A validated store from a ``class_vectors`` tensor and the metadata strings written beside it
        (a store file's, or a bundle's that embeds one); errors name ``source`` and the field."""
        names = _json_field(meta, "class_names", source)
        if not isinstance(names, list):
            raise ValueError(f"{source}: field 'class_names' must be a JSON list of class names, "
                             f"got a JSON {type(names).__name__}")
        scale_text = meta.get("logit_scale")
        if scale_text is None:
            raise ValueError(f"{source}: metadata has no field 'logit_scale' (the teacher's exponentiated scale)")
        try:
            scale = float(scale_text)
        except ValueError:
            raise ValueError(f"{source}: field 'logit_scale' is not a number: {scale_text!r}") from None
        teacher = _json_field(meta, "teacher", source, default={})
        try:
            store = cls(vectors=vectors.float() if vectors.is_floating_point() else vectors, class_names=names,
                        logit_scale=scale, teacher=teacher)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
        duplicates = duplicate_names(store.class_names)
        if duplicates:
            shown = "; ".join(f"{name!r} at labels {labels}" for name, labels in list(duplicates.items())[:5])
            warnings.warn(f"{source}: {len(duplicates)} class name(s) appear more than once ({shown}): "
                          "the model cannot tell those classes apart", stacklevel=3)
        return store

    @classmethod
    def load(cls, path: str | Path, expect_classes: Sequence[str] | None = None) -> ClassVectorStore:
        """Read and validate a store file (every field; see :func:`check_store_fields`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"class-vector store not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if "class_vectors" not in f.keys():
                    raise ValueError(f"{path}: no 'class_vectors' tensor (is this a class-vector store?)")
                vectors = f.get_tensor("class_vectors")
        except ValueError:
            raise
        except Exception as exc:  # safetensors raises its own error types on corrupt files
            raise ValueError(f"{path}: not a readable safetensors class-vector store ({exc})") from exc
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: field 'format' is {meta.get('format')!r}, expected {FORMAT} "
                             "(not a class-vector store?)")
        store = cls.from_parts(vectors, meta, path)
        if expect_classes is not None:
            try:
                store.check_classes(expect_classes)
            except ClassListMismatch as exc:
                raise ClassListMismatch(f"{path}: {exc}") from None
        return store


def _json_field(meta: Mapping[str, str], name: str, source: str | Path, default=None):
    if name not in meta:
        if default is not None:
            return default
        raise ValueError(f"{source}: metadata has no field {name!r} (not written by promptkd class-vectors? "
                         "rebuild the store with `promptkd class-vectors`)")
    try:
        return json.loads(meta[name])
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"{source}: field {name!r} is not valid JSON ({exc})") from None


def duplicate_names(names: Sequence[str]) -> dict[str, list[int]]:
    """{name: its labels} for every name that more than one label has."""
    labels: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        labels.setdefault(n, []).append(i)
    return {n: ls for n, ls in labels.items() if len(ls) > 1}


def check_store_fields(vectors: Tensor, class_names: Sequence[str], logit_scale: float, teacher) -> None:
    """Raise ValueError naming the field when any part of a store is unusable."""
    if not isinstance(vectors, Tensor) or vectors.ndim != 2 or 0 in vectors.shape:
        shape = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
        raise ValueError(f"tensor 'class_vectors' must be a non-empty [classes, dim] matrix, got {shape}")
    if not vectors.is_floating_point():
        raise ValueError(f"tensor 'class_vectors' must hold floating-point numbers, got {vectors.dtype}")
    if not isinstance(class_names, (list, tuple)):
        raise ValueError(f"field 'class_names' must be a list of strings, got {type(class_names).__name__}")
    bad = [(i, n) for i, n in enumerate(class_names) if not isinstance(n, str) or not n.strip()]
    if bad:
        shown = ", ".join(f"entry {i}: {n!r}" for i, n in bad[:5])
        raise ValueError(f"field 'class_names' must hold non-empty strings ({len(bad)} do not: {shown})")
    if vectors.shape[0] != len(class_names):
        raise ValueError(f"tensor 'class_vectors' has {vectors.shape[0]} rows but field 'class_names' "
                         f"has {len(class_names)} names")
    rows = vectors.detach().double()
    finite = torch.isfinite(rows).all(dim=1)
    if not bool(finite.all()):
        idx = (~finite).nonzero().flatten().tolist()
        raise ValueError(f"tensor 'class_vectors' has {len(idx)} row(s) with NaN or infinite values (first: row "
                         f"{idx[0]}, {class_names[idx[0]]!r}); the teacher that produced them diverged: rebuild")
    norms = rows.norm(dim=1)
    off = ((norms - 1).abs() > UNIT_NORM_TOLERANCE).nonzero().flatten().tolist()
    if off:
        i = off[0]
        raise ValueError(f"tensor 'class_vectors' rows must be L2-normalised; {len(off)} are not (row {i}, "
                         f"{class_names[i]!r}, has norm {float(norms[i]):.6g})")
    try:
        scale = float(logit_scale) if not isinstance(logit_scale, (bool, str)) else math.nan
    except (TypeError, ValueError):
        scale = math.nan
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"field 'logit_scale' must be a finite number > 0 (the exponentiated CLIP scale), "
                         f"got {logit_scale!r}")
    if not isinstance(teacher, dict):
        raise ValueError(f"field 'teacher' must be a JSON object (the teacher's identity), "
                         f"got {type(teacher).__name__}")


@torch.no_grad()
def build_store(teacher, class_names: Sequence[str], batch_size: int = 256) -> ClassVectorStore:
    """Run the prompted teacher text tower ONCE over every class name and keep normalised vectors."""
    was_training = teacher.training
    teacher.eval()
    chunks = []
    names = list(class_names)
    for start in range(0, len(names), batch_size):
        feats = teacher.encode_class_names(names[start : start + batch_size], prompted=True)
        chunks.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
    teacher.train(was_training)
    return ClassVectorStore(
        vectors=torch.cat(chunks),
        class_names=names,
        logit_scale=float(teacher.logit_scale()),
        teacher=teacher.identity(),
    )
