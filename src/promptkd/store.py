"""The class-vector store: the teacher's normalised text features for every class, computed once.

File format (one ``.safetensors`` file): tensor ``class_vectors`` [N, D] float32 (L2-normalised rows)
and metadata strings ``class_names`` (JSON list, in label order), ``logit_scale`` (float, already
exponentiated), ``teacher`` (JSON identity of the teacher that produced it) and ``format``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

FORMAT = "promptkd.class_vectors.v1"


class ClassListMismatch(ValueError):
    """The store's class list is not the one the caller's dataset uses."""


@dataclass
class ClassVectorStore:
    vectors: Tensor  # [N, D], float32, rows L2-normalised
    class_names: list[str]
    logit_scale: float
    teacher: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2:
            raise ValueError(f"class vectors must be [N, D], got shape {tuple(self.vectors.shape)}")
        if self.vectors.shape[0] != len(self.class_names):
            raise ValueError(
                f"{self.vectors.shape[0]} class vectors but {len(self.class_names)} class names"
            )

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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "class_names": json.dumps(self.class_names),
            "logit_scale": repr(float(self.logit_scale)),
            "teacher": json.dumps(self.teacher, sort_keys=True),
        }
        save_file({"class_vectors": self.vectors.detach().cpu().float().contiguous()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, expect_classes: Sequence[str] | None = None) -> ClassVectorStore:
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
            raise ValueError(f"{path}: unknown class-vector format {meta.get('format')!r}, expected {FORMAT}")
        store = cls(
            vectors=vectors.float(),
            class_names=json.loads(meta["class_names"]),
            logit_scale=float(meta["logit_scale"]),
            teacher=json.loads(meta.get("teacher", "{}")),
        )
        if expect_classes is not None:
            try:
                store.check_classes(expect_classes)
            except ClassListMismatch as exc:
                raise ClassListMismatch(f"{path}: {exc}") from None
        return store


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
