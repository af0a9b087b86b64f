"""An EfficientNet-Lite student for a CLIP teacher: a deployable CNN instead of ViT-B/16.

The frozen ImageNet EfficientNet-Lite runs in two parts. Its *trunk* (stem + every stage but the last)
gives a feature map to which a learnt map is added (a feature-map prompt, zero at initialisation so a
fresh student is the frozen network: the CNN's counterpart of VPT's tokens); the frozen *tail* (the last
stage, the head convolution, global average pooling) turns it into a 1280-d feature, and the paper's
projector maps that into the teacher's space. Trainable: the prompt and the projector.

The student sees the teacher's batch (the teacher's image size and normalisation, e.g. CLIP's at 224 px)
and converts it to EfficientNet's own input scaling with one fixed affine map per channel.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from promptkd.models.backbones import ImageSpec, Student, register_builder

KIND = "efficientnet"
PROMPT_STAGE = 5  # the trunk ends after this stage (0-based): the prompt sits before the last stage


class FeatureMapPrompt(nn.Module):
    """A learnable map added to a feature map (visual prompting on a late CNN feature map); zero init.

    The added map is ``gain * delta``: with one learning rate for all prompts (the training loop's), the
    gain sets this prompt's effective step size (x gain^2 for SGD) relative to other trained tensors."""

    def __init__(self, shape: tuple[int, int, int], gain: float = 1.0) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(shape))
        self.gain = float(gain)

    def forward(self, maps: Tensor) -> Tensor:
        return maps + self.gain * self.delta.to(maps.dtype)


class EfficientNetStudent(Student):
    """Frozen EfficientNet-Lite + feature-map prompt + projector into ``teacher_dim``."""

    def __init__(self, variant: str, teacher_dim: int, image_spec: ImageSpec, *, weights: str | Path | None = None,
                 projector: str = "mlp", logit_scale: float = 100.0, prompt: bool = True,
                 prompt_gain: float = 1.0) -> None:
        super().__init__()
        from promptkd.artifacts import file_sha256
        from promptkd.models.efficientnet_lite import INPUT_MEAN, INPUT_STD, load_efficientnet_lite, weights_path
        from promptkd.models.projector import build_projector

        self.variant = variant
        self.weights_file = Path(weights).expanduser().resolve() if weights else weights_path(variant)
        self.weights_sha256 = file_sha256(self.weights_file)
        self.cnn = load_efficientnet_lite(variant, self.weights_file)
        self.cnn.requires_grad_(False)
        self.image_spec = ImageSpec(size=image_spec.size, mean=tuple(image_spec.mean), std=tuple(image_spec.std),
                                    interpolation=image_spec.interpolation)
        # teacher-normalised images -> EfficientNet's input: x_eff = x * scale + shift, per channel
        t_mean, t_std = torch.tensor(self.image_spec.mean), torch.tensor(self.image_spec.std)
        e_mean, e_std = torch.tensor(INPUT_MEAN), torch.tensor(INPUT_STD)
        self.register_buffer("input_scale", (t_std / e_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", ((t_mean - e_mean) / e_std).view(1, 3, 1, 1), persistent=False)
        self.split = self.cnn.stage_end(PROMPT_STAGE)
        info = self.cnn.block_info[self.split - 1]
        side = -(-self.image_spec.size // info.stride)
        self.map_shape = (info.channels, side, side)
        self.visual_prompt = FeatureMapPrompt(self.map_shape, prompt_gain) if prompt else None
        self.projector = build_projector(projector, self.cnn.feature_dim, teacher_dim)
        self.projector_kind, self.prompt_gain = projector, float(prompt_gain)
        self.embed_dim = teacher_dim
        self.register_buffer("_logit_scale", torch.tensor(float(logit_scale)), persistent=False)

    def trunk(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.cnn.trunk(images * self.input_scale + self.input_shift, self.split)

    def forward(self, images: Tensor) -> Tensor:
        maps = self.trunk(images)
        if self.visual_prompt is not None:
            maps = self.visual_prompt(maps)
        return self.projector(self.cnn.tail(maps, self.split))

    def logit_scale(self) -> Tensor:
        return self._logit_scale

    def identity(self) -> dict:
        spec = self.image_spec
        return {"kind": KIND, "role": "student", "variant": self.variant, "weights": str(self.weights_file),
                "sha256": self.weights_sha256, "teacher_dim": self.embed_dim, "projector": self.projector_kind,
                "prompt": {"type": "feature_map", "stage": PROMPT_STAGE, "shape": list(self.map_shape),
                           "gain": self.prompt_gain} if self.visual_prompt is not None else None,
                "logit_scale": float(self._logit_scale),
                "image_spec": {"size": spec.size, "mean": list(spec.mean), "std": list(spec.std),
                               "interpolation": spec.interpolation}}


def rebuild(identity: dict, weights: str | None = None, **_: object) -> EfficientNetStudent:
    """The frozen student of an artefact (without its learnt tensors), its weights checked by checksum."""
    from promptkd.models.backbones import IdentityError

    spec = identity.get("image_spec") or {}
    prompt = identity.get("prompt")
    try:
        student = EfficientNetStudent(
            identity["variant"], int(identity["teacher_dim"]),
            ImageSpec(size=int(spec["size"]), mean=tuple(spec["mean"]), std=tuple(spec["std"]),
                      interpolation=spec.get("interpolation", "bicubic")),
            weights=weights or identity.get("weights"), projector=identity.get("projector", "mlp"),
            logit_scale=float(identity.get("logit_scale", 100.0)), prompt=prompt is not None,
            prompt_gain=float((prompt or {}).get("gain", 1.0)))
    except KeyError as exc:
        raise IdentityError(f"backbone.{exc.args[0]} is missing from the efficientnet student's identity") from None
    if identity.get("sha256") and identity["sha256"] != student.weights_sha256:
        raise IdentityError(f"the artefact was trained on {identity['variant']} weights {identity['sha256'][:12]}..., "
                            f"but {student.weights_file} is {student.weights_sha256[:12]}...")
    return student


register_builder(KIND, "student", rebuild)
