"""A tiny student whose answers are known by construction, for the deployment tests.

``ColourStudent`` averages each (normalised) colour channel over the image and projects it with a
learnt 3x3 map initialised to the identity; with the class vectors ``red``, ``green``, ``blue`` (one-hot
directions) a red image must come out as "red", whatever promptkd's code does in between. Registered as
backbone kind ``colour`` so student folders and bundles rebuild it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from promptkd.artifacts import save_adapter
from promptkd.models.backbones import ImageSpec, Student, register_builder
from promptkd.store import ClassVectorStore

SPEC = ImageSpec(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear")
COLOURS = {"red": (230, 110, 20), "green": (20, 200, 110), "blue": (110, 30, 220)}  # distinct runner-up classes
CLASSES = list(COLOURS)


class ColourStudent(Student):
    image_spec = SPEC

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.projector = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.projector.weight.copy_(torch.eye(3) * scale)
        self.embed_dim = 3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.pool(images).flatten(1))

    def logit_scale(self) -> torch.Tensor:
        return torch.tensor(10.0)

    def identity(self) -> dict:
        return {"kind": "colour"}


register_builder("colour", "student", lambda identity, **_: ColourStudent())


def colour_store() -> ClassVectorStore:
    return ClassVectorStore(torch.eye(3), CLASSES, 10.0, {"kind": "colour-teacher"})


def save_colour_student(folder: Path) -> Path:
    return save_adapter(ColourStudent().eval(), folder, "student", store=colour_store())


def colour_image(path: Path, colour: str, size: tuple[int, int] = (40, 40), noise: int = 20, seed: int = 0) -> Path:
    """A noisy image of one of COLOURS (PNG unless the suffix says otherwise)."""
    rng = np.random.default_rng(seed)
    base = np.array(COLOURS[colour], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-noise, noise + 1, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path
