"""The demo's dual encoders: EfficientNet-Lite image towers + the MiniLM text tower, as Teacher/Student.

Images. A backbone takes Fashion-MNIST-like images ``[B, 1 or 3, H, W]`` in [0, 1]. Its frozen image
encoder inverts them (the dataset shows light products on black; ImageNet product shots are dark on
light), resizes to ``resolution`` and applies the EfficientNet-Lite normalisation, then runs the
*trunk* (stem + stages up to ``split_stage``). The visual prompt is a learnable feature map, added to
the trunk's output (zero at initialisation, so a fresh prompt is the frozen model); the *tail*
(remaining blocks, head, average pool) turns it into a 1280-d feature. The trunk is frozen and
deterministic, so its outputs can be cached per image (``attach_cache``); results are identical.

Text (teacher only). MiniLM with CoOp/IVLP context tokens (``demo.text``), then a frozen ridge map to
the image space (``demo.align``), fitted once on the 1000 ImageNet names against this image model's
ImageNet classifier. ``prompted=False`` is the frozen template "a photo of a {}.".
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from promptkd.artifacts import file_sha256
from promptkd.demo import align
from promptkd.demo.cache import TrunkCache
from promptkd.demo.text import MODEL_NAME, MiniLMText
from promptkd.models.backbones import ImageSpec, Student, Teacher, register_builder
from promptkd.models.efficientnet_lite import INPUT_MEAN, INPUT_STD, FoldedTrunk, load_efficientnet_lite, weights_path
from promptkd.models.efficientnet_student import FeatureMapPrompt

# cosine logits are scaled by this (CLIP's learnt scale is 100). Measured on the demo (teacher HM after
# stage 1, 2000 test images): 15 -> 61.3, 25 -> 63.5, 50 -> 59.1, 100 -> 60.9; zero-shot rows don't depend on it
DEMO_LOGIT_SCALE = 25.0
PREPROCESS_VERSION = "invert-bilinear-tfnorm-foldedbn-v2"
DEMO_IMAGE_SPEC = ImageSpec(
    size=28, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear", channels=1,
    extra={"range": "[0, 1]", "note": "the backbone inverts, resizes to its resolution and normalises itself"},
)


@lru_cache(maxsize=8)
def _sha256(path: str) -> str:
    return file_sha256(path)


@dataclass(frozen=True)
class ImageTowerConfig:
    variant: str = "efficientnet-lite2"
    resolution: int = 128
    split_stage: int = 5  # the trunk ends after this stage (0-based); 5 = stride 32, before the last stage
    invert: bool = True


class DemoImageTower(nn.Module):
    """Frozen EfficientNet-Lite cut into a cached trunk and a tail; prompts go between them."""

    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__()
        if cfg.resolution < 32:
            raise ValueError(f"resolution must be >= 32 pixels, got {cfg.resolution}")
        self.cfg = cfg
        self.weights_file = weights_path(cfg.variant)
        self.weights_sha256 = _sha256(str(self.weights_file))
        self.cnn = load_efficientnet_lite(cfg.variant, self.weights_file)
        for p in self.cnn.parameters():
            p.requires_grad_(False)
        if not 0 <= cfg.split_stage < 6:
            raise ValueError(f"split_stage must be in 0..5 (the last stage stays in the tail), got {cfg.split_stage}")
        self.split = self.cnn.stage_end(cfg.split_stage)
        self.frozen_trunk = FoldedTrunk(self.cnn, self.split)  # the trunk as it is run (BN folded)
        self.register_buffer("mean", torch.tensor(INPUT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(INPUT_STD).view(1, 3, 1, 1), persistent=False)
        stride = self.cnn.block_info[self.split - 1].stride
        side = -(-cfg.resolution // stride)
        self.map_shape = (self.cnn.block_info[self.split - 1].channels, side, side)
        self.feature_dim = self.cnn.feature_dim
        self.cache: TrunkCache | None = None

    def trunk_identity(self) -> str:
        c = self.cfg
        return f"{c.variant}|{self.weights_sha256}|{c.resolution}|{self.split}|{c.invert}|{PREPROCESS_VERSION}"

    def attach_cache(self, cache_dir: str | Path | None) -> TrunkCache:
        """Cache trunk outputs in memory, and in ``cache_dir`` (one file per trunk) when given."""
        key = hashlib.sha256(self.trunk_identity().encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"trunk-{self.cfg.variant}-{self.cfg.resolution}px-{key}.safetensors" if cache_dir else None
        self.cache = TrunkCache(self.trunk_identity(), path)
        return self.cache

    def preprocess(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [B, 1 or 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        x = images.to(self.mean.dtype)
        if self.cfg.invert:
            x = 1.0 - x
        size = self.cfg.resolution
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def _trunk(self, images: Tensor) -> Tensor:
        return self.frozen_trunk(self.preprocess(images))

    def trunk(self, images: Tensor) -> Tensor:
        if self.cache is not None:
            return self.cache(images, self._trunk)
        with torch.no_grad():
            return self._trunk(images)

    def tail(self, maps: Tensor) -> Tensor:
        return self.cnn.tail(maps, self.split)


class TextPrompt(nn.Module):
    """Context tokens for the text tower (shallow) plus deep tokens for layers 1..depth-1."""

    def __init__(self, ctx: Tensor, deep: Sequence[Tensor]) -> None:
        super().__init__()
        self.ctx = nn.Parameter(ctx.clone())
        self.deep = nn.ParameterList([nn.Parameter(t.clone()) for t in deep])


class TextToImage(nn.Module):
    """The frozen ridge map from text embeddings to the image space."""

    def __init__(self, matrix: Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix)

    def forward(self, text_embeddings: Tensor) -> Tensor:
        return text_embeddings.to(self.matrix.dtype) @ self.matrix


@dataclass(frozen=True)
class DemoTeacherConfig:
    image: ImageTowerConfig = ImageTowerConfig()
    n_ctx: int = 4
    ctx_init: str = "a photo of a"
    text_depth: int = 1  # 1 = shallow (CoOp-style); >1 adds deep tokens (IVLP)
    visual_prompt: bool = True
    visual_gain: float = 1.0
    ridge: float = align.DEFAULT_RIDGE
    logit_scale: float = DEMO_LOGIT_SCALE


class DemoTeacher(Teacher):
    """EfficientNet-Lite + MiniLM, paired by a ridge map; prompts in both towers."""

    image_spec = DEMO_IMAGE_SPEC

    def __init__(self, cfg: DemoTeacherConfig = DemoTeacherConfig(), cache_dir: str | Path | None = None,
                 text: MiniLMText | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.image = DemoImageTower(cfg.image)
        self.text = text if text is not None else MiniLMText()
        self.text_sha256 = _sha256(str(self.text.weights_file))
        names = align.cached_name_embeddings(self.text, Path(cache_dir) if cache_dir else None, self.text_sha256)
        self.align = TextToImage(align.text_to_image_map(names, self.image.cnn._fc.weight, cfg.ridge))
        self.embed_dim = self.image.feature_dim
        if cfg.text_depth < 1 or cfg.text_depth > self.text.num_layers:
            raise ValueError(f"text_depth must be in 1..{self.text.num_layers}, got {cfg.text_depth}")
        self.text_prompt = TextPrompt(
            self.text.context_init(cfg.ctx_init, cfg.n_ctx),
            self.text.context_hidden_states(cfg.ctx_init, cfg.n_ctx, cfg.text_depth),
        )
        self.visual_prompt = FeatureMapPrompt(self.image.map_shape, cfg.visual_gain) if cfg.visual_prompt else None
        if cache_dir is not None:
            self.image.attach_cache(cache_dir)

    def encode_image(self, images: Tensor, prompted: bool = True) -> Tensor:
        maps = self.image.trunk(images)
        if prompted and self.visual_prompt is not None:
            maps = self.visual_prompt(maps)
        return self.image.tail(maps)

    def encode_class_names(self, class_names: Sequence[str], prompted: bool = True) -> Tensor:
        if not prompted:
            return self.encode_text([f"{self.cfg.ctx_init} {name}." for name in class_names])
        p = self.text_prompt
        return self.align(self.text.prompted(list(class_names), p.ctx, list(p.deep)))

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        with torch.no_grad():
            return self.align(self.text.embed(list(texts)))

    def logit_scale(self) -> Tensor:
        return torch.tensor(self.cfg.logit_scale)

    def identity(self) -> dict:
        return {
            "kind": "demo",
            "role": "teacher",
            "image_weights_sha256": self.image.weights_sha256,
            "text_model": MODEL_NAME,
            "text_weights_sha256": self.text_sha256,
            "align_templates": list(align.ALIGN_TEMPLATES),
            "config": asdict(self.cfg),
        }


@dataclass(frozen=True)
class DemoStudentConfig:
    image: ImageTowerConfig = ImageTowerConfig(variant="efficientnet-lite0")
    teacher_dim: int = 1280
    projector: str = "mlp"  # the paper's conv1x1-BN-ReLU-conv1x1, or "linear"
    visual_prompt: bool = True
    visual_gain: float = 1.0
    logit_scale: float = DEMO_LOGIT_SCALE


class DemoStudent(Student):
    """EfficientNet-Lite image tower with a feature-map prompt and the PromptKD projector."""

    image_spec = DEMO_IMAGE_SPEC

    def __init__(self, cfg: DemoStudentConfig = DemoStudentConfig(), cache_dir: str | Path | None = None) -> None:
        super().__init__()
        from promptkd.models.projector import build_projector

        self.cfg = cfg
        self.image = DemoImageTower(cfg.image)
        self.visual_prompt = FeatureMapPrompt(self.image.map_shape, cfg.visual_gain) if cfg.visual_prompt else None
        self.projector = build_projector(cfg.projector, self.image.feature_dim, cfg.teacher_dim)
        self.embed_dim = cfg.teacher_dim
        if cache_dir is not None:
            self.image.attach_cache(cache_dir)

    def forward(self, images: Tensor) -> Tensor:
        maps = self.image.trunk(images)
        if self.visual_prompt is not None:
            maps = self.visual_prompt(maps)
        return self.projector(self.image.tail(maps))

    def logit_scale(self) -> Tensor:
        return torch.tensor(self.cfg.logit_scale)

    def identity(self) -> dict:
        return {
            "kind": "demo",
            "role": "student",
            "image_weights_sha256": self.image.weights_sha256,
            "config": asdict(self.cfg),
        }


def _image_cfg(data: dict) -> ImageTowerConfig:
    return ImageTowerConfig(**data)


def _check_weights(identity: dict, model: DemoTeacher | DemoStudent) -> None:
    want = identity.get("image_weights_sha256")
    if want and want != model.image.weights_sha256:
        raise ValueError(
            f"the artefact was trained on {model.image.cfg.variant} weights {want[:12]}..., "
            f"but the installed file {model.image.weights_file} is {model.image.weights_sha256[:12]}..."
        )


def build_teacher(identity: dict, cache_dir: str | Path | None = None, **_: object) -> DemoTeacher:
    cfg = dict(identity["config"])
    cfg["image"] = _image_cfg(cfg["image"])
    teacher = DemoTeacher(DemoTeacherConfig(**cfg), cache_dir=cache_dir)
    _check_weights(identity, teacher)
    want_text = identity.get("text_weights_sha256")
    if want_text and want_text != teacher.text_sha256:
        raise ValueError(f"the artefact was trained with other MiniLM weights than {teacher.text.weights_file}")
    return teacher


def build_student(identity: dict, cache_dir: str | Path | None = None, **_: object) -> DemoStudent:
    cfg = dict(identity["config"])
    cfg["image"] = _image_cfg(cfg["image"])
    student = DemoStudent(DemoStudentConfig(**cfg), cache_dir=cache_dir)
    _check_weights(identity, student)
    return student


register_builder("demo", "teacher", build_teacher)
register_builder("demo", "student", build_student)
