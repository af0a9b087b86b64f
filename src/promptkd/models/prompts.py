"""Learnable prompts for CLIP's two towers, as IVLP / PromptSRC (text + vision) and VPT-deep (vision) use them.

* Text (:class:`TextPrompts`): ``n_ctx`` context vectors replace the embeddings of the ``n_ctx`` tokens
  right after SOS. Deep prompting up to ``depth``: before transformer layer ``i`` (``1 <= i < depth``) the
  tokens at those positions are replaced by a fresh set ``ctx[i]``. ``depth == 1`` is shallow (CoOp-like).
* Vision (:class:`VisionPrompts`): ``n_ctx`` tokens appended after CLS + patches (after the positional
  embedding, before ``ln_pre``); before layer ``i < depth`` the last ``n_ctx`` tokens are replaced by ``ctx[i]``.

Each module holds ONE parameter ``ctx`` of shape ``[depth, n_ctx, width]``: ``ctx[0]`` is the input prompt
and ``ctx[i]`` the one for layer ``i``. (In the authors' Dassl checkpoints these are ``prompt_learner.ctx`` /
``image_encoder.VPT`` for layer 0 and ``...resblocks.<i>.VPT_shallow`` for layer ``i``.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

PROMPT_INIT_STD = 0.02  # normal init of every prompt not initialised from words (as IVLP / VPT)


@dataclass(frozen=True)
class PromptConfig:
    """Prompt sizes of a CLIP backbone. A depth or n_ctx of 0 turns a tower's prompts off."""

    n_ctx_text: int = 4
    text_depth: int = 9
    ctx_init: str | None = "a photo of a"  # words whose embeddings initialise ctx[0] of the text prompts
    n_ctx_vision: int = 4
    vision_depth: int = 9

    def __post_init__(self) -> None:
        for name in ("n_ctx_text", "text_depth", "n_ctx_vision", "vision_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"prompt setting {name} must be a non-negative integer, got {value!r}")

    @property
    def text_enabled(self) -> bool:
        return self.n_ctx_text > 0 and self.text_depth > 0

    @property
    def vision_enabled(self) -> bool:
        return self.n_ctx_vision > 0 and self.vision_depth > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | PromptConfig | None) -> PromptConfig:
        if data is None:
            return cls()
        if isinstance(data, PromptConfig):
            return data
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown prompt settings {unknown}; known: {sorted(known)}")
        return cls(**data)


def check_depth(depth: int, layers: int, tower: str, setting: str | None = None) -> None:
    """Refuse more prompted layers than the tower has; ``setting`` is the config key that sets the depth."""
    if depth > layers:
        fix = f"; set {setting} to at most {layers}" if setting else ""
        raise ValueError(f"{tower} prompt depth {depth} exceeds the {layers} layers of the {tower} transformer{fix}")


class _DeepPrompts(nn.Module):
    def __init__(self, n_ctx: int, depth: int, width: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if n_ctx <= 0 or depth <= 0:
            raise ValueError(f"prompts need n_ctx >= 1 and depth >= 1 (got n_ctx={n_ctx}, depth={depth})")
        self.n_ctx, self.depth, self.width = n_ctx, depth, width
        self.ctx = nn.Parameter(torch.randn(depth, n_ctx, width, generator=generator) * PROMPT_INIT_STD)

    def _layer(self, i: int, like: Tensor) -> Tensor:
        return self.ctx[i].to(like.dtype).unsqueeze(0).expand(like.shape[0], -1, -1)

    def extra_repr(self) -> str:
        return f"n_ctx={self.n_ctx}, depth={self.depth}, width={self.width}"


class TextPrompts(_DeepPrompts):
    """Text context: replaces the embeddings at positions ``1..n_ctx`` (right after SOS)."""

    def __init__(self, n_ctx: int, depth: int, width: int, init: Tensor | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(n_ctx, depth, width, generator)
        if init is not None:
            self.init_from(init)

    @torch.no_grad()
    def init_from(self, embeddings: Tensor) -> None:
        """Set ``ctx[0]`` from word embeddings [k, width] (the first ``min(k, n_ctx)`` rows)."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.width:
            raise ValueError(f"init embeddings must be [k, {self.width}], got {tuple(embeddings.shape)}")
        k = min(embeddings.shape[0], self.n_ctx)
        self.ctx[0, :k] = embeddings[:k].to(self.ctx.dtype)

    def _replace(self, x: Tensor, i: int) -> Tensor:
        n = self.n_ctx
        if x.shape[1] < 1 + n + 1:
            raise ValueError(f"sequence of {x.shape[1]} tokens is too short for SOS + {n} context tokens + EOT")
        return torch.cat([x[:, :1], self._layer(i, x), x[:, 1 + n:]], dim=1)

    def insert(self, x: Tensor) -> Tensor:
        """Token embeddings [N, L, W] -> the same with positions 1..n_ctx replaced by ``ctx[0]``."""
        return self._replace(x, 0)

    def layer_hook(self, i: int, x: Tensor) -> Tensor:
        return self._replace(x, i) if i < self.depth else x


class VisionPrompts(_DeepPrompts):
    """Vision tokens appended after CLS + patches; the last ``n_ctx`` tokens are replaced per layer."""

    def append(self, x: Tensor) -> Tensor:
        return torch.cat([x, self._layer(0, x)], dim=1)

    def layer_hook(self, i: int, x: Tensor) -> Tensor:
        if i >= self.depth:
            return x
        return torch.cat([x[:, : x.shape[1] - self.n_ctx], self._layer(i, x)], dim=1)
