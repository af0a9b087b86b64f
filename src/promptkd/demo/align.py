"""Pairing an ImageNet classifier with a sentence encoder (DeViSE-style, Frome et al. 2013).

An ImageNet classifier's row ``w_c`` is the direction of class ``c`` in the image-feature space. A ridge
map ``A`` from text embeddings of the 1000 class names to those rows (unit-normalised) turns any text
into a vector of the image space: ``text_feature = A^T e(text)``. A frozen (text encoder, A, image
encoder) triple then behaves like a small CLIP: cosine between image features and mapped texts.
The map is fitted in float64 by the closed form ``A = (E^T E + lam I)^-1 E^T W``.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from promptkd.data.benchmarks import read_classnames_file

# templates averaged when embedding the ImageNet names (a few, CLIP-style)
ALIGN_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a picture of a {}.", "an image of a {}.", "{}")
CLASSNAMES_SHA256 = "89e0b642c6697a3a43a06a2bb65f9fefb3ca295ccc5f4ba9ce385f1a3a58c629"
DEFAULT_RIDGE = 0.1


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet class names in label order (packaged copy, checksum verified)."""
    asset = resources.files("promptkd.data") / "assets" / "imagenet_classnames.txt"  # shared with the data layer
    data = asset.read_bytes()
    if hashlib.sha256(data).hexdigest() != CLASSNAMES_SHA256:
        raise ValueError(f"{asset}: checksum differs from the packaged ImageNet class list (file changed)")
    names = list(read_classnames_file(Path(str(asset))).values())  # the data layer's parser
    if len(names) != 1000:
        raise ValueError(f"{asset}: {len(names)} classes, expected 1000")
    return names


def template_embeddings(embed, names: list[str], templates=ALIGN_TEMPLATES) -> Tensor:
    """Mean over templates of unit sentence embeddings, renormalised: [N, D]."""
    per_template = torch.stack([embed([t.format(n) for n in names]) for t in templates])
    return F.normalize(per_template.mean(0), dim=-1)


def fit_ridge(inputs: Tensor, targets: Tensor, lam: float) -> Tensor:
    """argmin_A ||inputs A - targets||^2 + lam ||A||^2, in float64: [D_in, D_out] (float32)."""
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"ridge: {inputs.shape[0]} inputs but {targets.shape[0]} targets")
    if lam <= 0:
        raise ValueError(f"ridge strength must be > 0, got {lam}")
    x, y = inputs.double(), targets.double()
    gram = x.T @ x + lam * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, x.T @ y).float()


def text_to_image_map(name_embeddings: Tensor, classifier_weight: Tensor, lam: float = DEFAULT_RIDGE) -> Tensor:
    """Ridge map [D_text, D_image] from name embeddings [1000, D_text] to unit classifier rows [1000, D_image]."""
    return fit_ridge(name_embeddings, F.normalize(classifier_weight.detach().float(), dim=-1), lam)


def cached_name_embeddings(text_encoder, cache_dir: Path | None, text_sha256: str) -> Tensor:
    """Template-averaged MiniLM embeddings of the 1000 ImageNet names, cached by encoder + list + templates."""
    key = hashlib.sha256(f"{text_sha256}|{CLASSNAMES_SHA256}|{ALIGN_TEMPLATES}".encode()).hexdigest()[:16]
    path = cache_dir / f"imagenet_name_embeddings-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            return load_file(str(path))["embeddings"]
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, never trusted
            path.unlink(missing_ok=True)
    with torch.no_grad():
        emb = template_embeddings(text_encoder.embed, imagenet_classnames())
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": emb.contiguous()}, str(path), metadata={"key": key})
    return emb
