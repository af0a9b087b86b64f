"""Pairing an ImageNet classifier with a sentence encoder (DeViSE-style, Frome et al. 2013).

An ImageNet classifier's row ``w_c`` is the direction of class ``c`` in the image-feature space. A ridge
map ``A`` from text embeddings of the 1000 class names to those rows (unit-normalised) turns any text
into a vector of the image space: ``text_feature = A^T e(text)``. A frozen (text encoder, A, image
encoder) triple then behaves like a small CLIP: cosine between image features and mapped texts.
The map is fitted in float64 by the closed form ``A = (E^T E + lam I)^-1 E^T W``.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from promptkd.data.benchmarks import read_classnames_file
from promptkd.fileio import atomic_save_with

# templates averaged when embedding the ImageNet names (a few, CLIP-style)
ALIGN_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a picture of a {}.", "an image of a {}.", "{}")
CLASSNAMES_SHA256 = "89e0b642c6697a3a43a06a2bb65f9fefb3ca295ccc5f4ba9ce385f1a3a58c629"
DEFAULT_RIDGE = 0.1
# MiniLM embeddings of the 1000 names (float32), made by write_packaged_name_embeddings; used when its key
# (MiniLM weights + names + templates) matches the installed encoder's
PACKAGED_EMBEDDINGS = "imagenet_name_embeddings-minilm-l6-v2.safetensors"


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


def name_embeddings_key(text_sha256: str) -> str:
    """What the ImageNet-name embeddings depend on: the text encoder's weights, the names, the templates."""
    return hashlib.sha256(f"{text_sha256}|{CLASSNAMES_SHA256}|{ALIGN_TEMPLATES}".encode()).hexdigest()[:16]


def packaged_name_embeddings_path() -> Path:
    return Path(str(resources.files("promptkd.demo") / "assets" / PACKAGED_EMBEDDINGS))


def compute_name_embeddings(text_encoder) -> Tensor:
    """MiniLM embeddings [1000, 384] of the 1000 ImageNet names (template average), float32."""
    with torch.no_grad():
        return template_embeddings(text_encoder.embed, imagenet_classnames()).float()


def _read_embeddings(path: Path, key: str) -> Tensor | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            emb = f.get_tensor("embeddings").float()
    except Exception:  # noqa: BLE001 - a damaged file is recomputed, never trusted
        return None
    return emb if emb.shape[0] == 1000 else None


def write_name_embeddings(path: Path, embeddings: Tensor, text_sha256: str) -> Path:
    """The embeddings with what they were made from (the key and its parts) as metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"embeddings": embeddings.float().contiguous()}
    metadata = {"key": name_embeddings_key(text_sha256), "text_weights_sha256": text_sha256,
                "classnames_sha256": CLASSNAMES_SHA256, "templates": json.dumps(ALIGN_TEMPLATES)}
    return atomic_save_with(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def cached_name_embeddings(text_encoder, cache_dir: Path | None, text_sha256: str) -> Tensor:
    """Template-averaged MiniLM embeddings [1000, 384] of the 1000 ImageNet names.

    Read from the copy packaged with promptkd when it was made from the same MiniLM weights, names and
    templates: it saves ~25 s of CPU on a first run, and every machine gets the same bits (MiniLM's float32
    kernels differ in their last bits between CPUs). Else from ``cache_dir``; else computed (and cached)."""
    key = name_embeddings_key(text_sha256)
    packaged = _read_embeddings(packaged_name_embeddings_path(), key)
    if packaged is not None:
        return packaged
    path = cache_dir / f"imagenet_name_embeddings-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        cached = _read_embeddings(path, key)
        if cached is not None:
            return cached
    emb = compute_name_embeddings(text_encoder)
    if path is not None:
        write_name_embeddings(path, emb, text_sha256)
    return emb


def write_packaged_name_embeddings() -> Path:
    """Regenerate the packaged embeddings with the installed MiniLM (``python -m promptkd.demo.align``)."""
    from promptkd.artifacts import file_sha256
    from promptkd.demo.text import MiniLMText

    text = MiniLMText()
    sha = file_sha256(text.weights_file)
    return write_name_embeddings(packaged_name_embeddings_path(), compute_name_embeddings(text), sha)


if __name__ == "__main__":
    print(write_packaged_name_embeddings())
