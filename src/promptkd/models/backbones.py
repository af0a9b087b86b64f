"""The teacher/student interface that every method, the store, evaluation and export speak.

A *teacher* gives image features and, through its (prompted) text tower, class features for class
names. A *student* gives image features already projected into the teacher's embedding space. CLIP
implements both (``promptkd.models.clip_backbones``) and so does the offline demo's dual encoder
(``promptkd.demo``). Methods never look at which one they hold.

Features returned here are NOT normalised; callers L2-normalise where the method says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ImageSpec:
    """How images must be prepared for a backbone (CLIP: 224, bicubic, CLIP mean/std)."""

    size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"
    channels: int = 3
    extra: dict = field(default_factory=dict, compare=False)


class AdapterMixin(nn.Module):
    """Shared behaviour of prompted backbones: what is trainable, what is saved, train/eval modes.

    The *adapter* is everything a method learns: parameters with ``requires_grad`` plus the buffers of
    modules that own trainable parameters (e.g. a projector's BatchNorm running statistics). Frozen
    parts stay in eval mode even when the model is put in train mode.
    """

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def _trainable_owner_prefixes(self) -> list[str]:
        owners = []
        for name, module in self.named_modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                owners.append(name)
        return owners

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Trainable tensors and the buffers of their owning modules, detached, on CPU."""
        out: dict[str, Tensor] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                out[name] = p.detach().cpu().clone()
        owners = set(self._trainable_owner_prefixes())
        for mod_name, module in self.named_modules():
            if mod_name in owners or any(o and mod_name.startswith(o + ".") for o in owners):
                for b_name, buf in module.named_buffers(recurse=False):
                    if buf is not None:
                        key = f"{mod_name}.{b_name}" if mod_name else b_name
                        out[key] = buf.detach().cpu().clone()
        return out

    def load_adapter_state_dict(self, state: dict[str, Tensor], source: str = "<memory>") -> None:
        """Strictly load an adapter: every expected key present, no unknown keys, shapes equal."""
        expected = self.adapter_state_dict()
        missing = sorted(set(expected) - set(state))
        unknown = sorted(set(state) - set(expected))
        if missing or unknown:
            raise ValueError(
                f"{source}: adapter does not fit this model; missing keys {missing[:8]}, unknown keys {unknown[:8]}"
            )
        own = dict(self.named_parameters())
        own.update(dict(self.named_buffers()))
        for key, value in state.items():
            target = own[key]
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(
                    f"{source}: shape mismatch for {key}: file has {tuple(value.shape)}, "
                    f"model expects {tuple(target.shape)}"
                )
            with torch.no_grad():
                target.copy_(value.to(dtype=target.dtype, device=target.device))

    def train(self, mode: bool = True):  # type: ignore[override]
        super().train(mode)
        if mode:
            for module in self.modules():
                if module is self:
                    continue
                if not any(p.requires_grad for p in module.parameters()):
                    module.eval()
        return self


class Teacher(AdapterMixin):
    """A vision-language teacher with prompt points in both towers.

    Subclasses implement the four ``encode_*``/``logit_scale`` methods and ``identity``.
    ``prompted=False`` must give the frozen, un-prompted model's outputs (zero-shot CLIP), which
    PromptSRC's self-regularisation and the zero-shot baseline rows use.
    """

    image_spec: ImageSpec = ImageSpec()
    embed_dim: int

    def encode_image(self, images: Tensor, prompted: bool = True) -> Tensor:
        """[B, C, H, W] -> [B, D] image features (not normalised)."""
        raise NotImplementedError

    def encode_class_names(self, class_names: Sequence[str], prompted: bool = True) -> Tensor:
        """Class features [N, D] (not normalised) for class names.

        prompted=True: learnable context tokens + class name (CoOp/IVLP style) through the prompted
        text tower. prompted=False: the frozen tower on the single template "a photo of a {}.".
        """
        raise NotImplementedError

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Frozen, un-prompted text tower on free texts (for template ensembles) -> [N, D]."""
        raise NotImplementedError

    def logit_scale(self) -> Tensor:
        """The (frozen) multiplicative logit scale, already exponentiated (CLIP: 100)."""
        raise NotImplementedError

    def identity(self) -> dict:
        """JSON-able identity: backbone kind, architecture, weights checksum, prompt config."""
        raise NotImplementedError


class Student(AdapterMixin):
    """An image-only student: prompted image encoder + projector into the teacher's space."""

    image_spec: ImageSpec = ImageSpec()
    embed_dim: int  # output dimension == the teacher's embed_dim

    def forward(self, images: Tensor) -> Tensor:  # noqa: D401
        """[B, C, H, W] -> [B, D_teacher] projected image features (not normalised)."""
        raise NotImplementedError

    def encode_image(self, images: Tensor) -> Tensor:
        return self(images)

    def logit_scale(self) -> Tensor:
        raise NotImplementedError

    def identity(self) -> dict:
        raise NotImplementedError


# --- rebuilding a backbone from its identity -------------------------------------------------------
# An artefact's JSON records the backbone identity (``identity()``); to load the artefact we rebuild
# the frozen backbone from it, then load the adapter tensors. Each backbone family registers a builder:
# ``register_builder("clip", "teacher", fn)`` where ``fn(identity: dict, **options) -> Teacher``.
# Options carry what the identity cannot (e.g. ``weights=`` override path, ``trust_checkpoint=``).

class IdentityError(ValueError):
    """An identity (``adapter.json``'s ``backbone``) that cannot describe a real model; the message names
    the key (``backbone.<...>``), and ``artifacts.load_adapter`` prefixes the file."""


_BUILDERS: dict[tuple[str, str], object] = {}
_BUILDER_MODULES = {"clip": "promptkd.models.clip_backbones", "demo": "promptkd.demo.backbones",
                    "efficientnet": "promptkd.models.efficientnet_student"}


def register_builder(kind: str, role: str, fn) -> None:
    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', not {role!r}")
    _BUILDERS[(kind, role)] = fn


def build_from_identity(identity: dict, role: str, **options) -> AdapterMixin:
    """Rebuild a frozen backbone (without learnt tensors) from an identity dict."""
    kind = identity.get("kind")
    if (kind, role) not in _BUILDERS and kind in _BUILDER_MODULES:
        import importlib

        importlib.import_module(_BUILDER_MODULES[kind])  # registers its builders on import
    if (kind, role) not in _BUILDERS:
        known = sorted({k for k, _ in _BUILDERS} | set(_BUILDER_MODULES))
        raise ValueError(f"no {role} builder for backbone kind {kind!r} (known kinds: {known})")
    return _BUILDERS[(kind, role)](identity, **options)  # type: ignore[operator]
