"""CLIP (ViT image tower + causal text tower) with OpenAI's parameter names and prompt points.

Parameter names are exactly those of OpenAI's released checkpoints (``visual.conv1.weight``,
``visual.transformer.resblocks.N.attn.in_proj_weight``, ``token_embedding.weight``, ``ln_final``,
``text_projection``, ``logit_scale``...), so an OpenAI / open_clip state dict loads strictly and
``models/weights.py`` only has to rename foreign formats (Hugging Face) into these names.

Sequences are batch-first ``[B, L, D]`` (the names do not depend on the layout). Attention goes through
``torch.nn.functional.scaled_dot_product_attention``. LayerNorms compute in float32 and cast back, as
OpenAI's do, so fp16/bf16 weights and autocast both work.

Prompt points (used by ``promptkd.models.prompts``; with no prompts the outputs are plain CLIP's):

* ``encode_image(images, prompts=VisionPrompts)``: prompt tokens appended after CLS + patches, after the
  positional embedding and before ``ln_pre``; deep prompts replace the last ``n`` tokens at layers
  ``1..depth-1``. Pooling stays on CLS.
* ``encode_text(tokens, prompts=TextPrompts)``: the embeddings of the ``n`` tokens right after SOS are
  replaced by learnt context; deep prompts replace positions ``1..n`` at layers ``1..depth-1``. Pooling
  stays on the EOT token (the argmax of the token ids, EOT being the largest id).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = ("quick_gelu", "gelu")

# A hook called before transformer block i (i >= 1) with the block's input; returns the (possibly edited) input.
LayerHook = Callable[[int, Tensor], Tensor]


# --------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class VisionConfig:
    width: int = 768
    layers: int = 12
    heads: int = 12
    patch_size: int = 16
    image_size: int = 224
    mlp_width: int = 3072

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid**2 + 1


@dataclass(frozen=True)
class TextConfig:
    width: int = 512
    layers: int = 12
    heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408
    mlp_width: int = 2048


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPConfig:
    """Architecture of a CLIP ViT model. ``text=None`` builds the image tower only (a student).

    ``mean``/``std`` are the image normalisation the weights were trained with (OpenAI's by default);
    they travel with the architecture so that an artefact rebuilds the same preprocessing."""

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig | None = field(default_factory=TextConfig)
    act: str = "quick_gelu"  # OpenAI models use QuickGELU; "gelu" for e.g. LAION open_clip models
    ln_eps: float = 1e-5
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def __post_init__(self) -> None:
        if self.act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.act!r}; expected one of {ACTIVATIONS}")
        towers = [("vision", self.vision)] + ([("text", self.text)] if self.text is not None else [])
        for name, tower in towers:
            if tower.heads < 1 or tower.width % tower.heads:
                raise ValueError(f"{name} width {tower.width} is not divisible by its {tower.heads} heads")
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError(f"image size {self.vision.image_size} is not a multiple of patch size "
                             f"{self.vision.patch_size}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict:
        """JSON-able; the normalisation is left out when it is OpenAI's (so older records compare equal)."""
        out = asdict(self)
        for key, default in (("mean", OPENAI_MEAN), ("std", OPENAI_STD)):
            if tuple(out[key]) == default:
                del out[key]
            else:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> CLIPConfig:
        data = dict(data)
        vision = VisionConfig(**data.pop("vision"))
        text = data.pop("text", None)
        for key in ("mean", "std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(vision=vision, text=TextConfig(**text) if text is not None else None, **data)

    def image_only(self) -> CLIPConfig:
        return replace(self, text=None)


def preset(name: str) -> CLIPConfig:
    """A known architecture by name (``promptkd.models.clip_archs``): ``ViT-B/16`` (OpenAI's, QuickGELU),
    ``ViT-H-14`` (open_clip's name: GELU), ``ViT-L-14-quickgelu``..."""
    from promptkd.models.clip_archs import named_arch

    return named_arch(name).config


# --------------------------------------------------------------------------------------------------
# building blocks


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input / weight dtype, result in the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (packed q/k/v)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        b, n, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int, act: str, eps: float) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=eps)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_width, act)

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, act: str, eps: float) -> None:
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_width, act, eps) for _ in range(layers)
        )

    def forward(self, x: Tensor, causal: bool = False, layer_hook: LayerHook | None = None) -> Tensor:
        for i, block in enumerate(self.resblocks):
            if layer_hook is not None and i > 0:
                x = layer_hook(i, x)
            x = block(x, causal=causal)
        return x


# --------------------------------------------------------------------------------------------------
# towers


class VisionTransformer(nn.Module):
    """CLIP's ViT image tower (``visual.*``)."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, act: str, eps: float) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.num_positions, w))
        self.ln_pre = LayerNorm(w, eps=eps)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_width, act, eps)
        self.ln_post = LayerNorm(w, eps=eps)
        self.proj = nn.Parameter(torch.zeros(w, embed_dim))

    def embed(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, 1 + grid^2, width]: CLS + patch tokens plus positional embedding."""
        size = self.cfg.image_size
        if images.ndim != 4 or images.shape[-2:] != (size, size):
            raise ValueError(f"expected images [B, 3, {size}, {size}], got {tuple(images.shape)}")
        x = self.conv1(images.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)

    def forward(self, images: Tensor, prompts=None) -> Tensor:
        """[B, 3, H, W] -> [B, embed_dim]. ``prompts``: a :class:`~promptkd.models.prompts.VisionPrompts`."""
        x = self.embed(images)
        hook = None
        if prompts is not None:
            x = prompts.append(x)
            hook = prompts.layer_hook
        x = self.ln_pre(x)
        x = self.transformer(x, causal=False, layer_hook=hook)
        return self.ln_post(x[:, 0, :]) @ self.proj.to(x.dtype)


class CLIP(nn.Module):
    """CLIP with OpenAI's attribute names: ``visual`` plus the text tower's parts at the top level."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim, cfg.act, cfg.ln_eps)
        t = cfg.text
        if t is not None:
            self.token_embedding = nn.Embedding(t.vocab_size, t.width)
            self.positional_embedding = nn.Parameter(torch.zeros(t.context_length, t.width))
            self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_width, cfg.act, cfg.ln_eps)
            self.ln_final = LayerNorm(t.width, eps=cfg.ln_eps)
            self.text_projection = nn.Parameter(torch.zeros(t.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def has_text(self) -> bool:
        return self.cfg.text is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    # -- image -------------------------------------------------------------------------------------

    def encode_image(self, images: Tensor, prompts=None) -> Tensor:
        return self.visual(images, prompts=prompts)

    # -- text --------------------------------------------------------------------------------------

    def _require_text(self) -> TextConfig:
        if self.cfg.text is None:
            raise RuntimeError("this CLIP was built without its text tower (image-only student)")
        return self.cfg.text

    def token_embeddings(self, tokens: Tensor) -> Tensor:
        """[N, L] token ids -> [N, L, width] token embeddings (no positional embedding)."""
        return self.token_embedding(tokens)

    def encode_text(self, tokens: Tensor, prompts=None) -> Tensor:
        """[N, L] token ids (L <= context length) -> [N, embed_dim], pooled at the EOT token.

        ``prompts``: a :class:`~promptkd.models.prompts.TextPrompts`; its context replaces the embeddings
        of the tokens right after SOS (the ids there do not matter, only EOT must be the largest id).
        """
        t = self._require_text()
        if tokens.ndim != 2 or tokens.shape[1] > t.context_length:
            raise ValueError(f"expected token ids [N, L<={t.context_length}], got {tuple(tokens.shape)}")
        x = self.token_embeddings(tokens)
        hook = None
        if prompts is not None:
            x = prompts.insert(x)
            hook = prompts.layer_hook
        return self.encode_text_embeddings(x, tokens, layer_hook=hook)

    def encode_text_embeddings(self, x: Tensor, tokens: Tensor, layer_hook: LayerHook | None = None) -> Tensor:
        """Text tower from token embeddings [N, L, width]; ``tokens`` only locates EOT (argmax)."""
        self._require_text()
        n = x.shape[1]
        x = x.to(self.dtype) + self.positional_embedding[:n].to(self.dtype)
        x = self.transformer(x, causal=True, layer_hook=layer_hook)
        x = self.ln_final(x)
        eot = tokens.argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        return pooled @ self.text_projection.to(pooled.dtype)

    # -- both --------------------------------------------------------------------------------------

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(logits_per_image [B, N], logits_per_text [N, B]) as in CLIP's contrastive head."""
        img = F.normalize(self.encode_image(images).float(), dim=-1)
        txt = F.normalize(self.encode_text(tokens).float(), dim=-1)
        logits = self.logit_scale.float().exp() * img @ txt.t()
        return logits, logits.t()


# --------------------------------------------------------------------------------------------------
# random initialisation (OpenAI's scheme) and tiny models for tests


def init_clip_(model: CLIP, generator: torch.Generator | None = None, perturb_norms: bool = False) -> CLIP:
    """Initialise in place with OpenAI's scheme (normal draws; deterministic for a seeded generator).

    ``perturb_norms`` also randomises LayerNorm weights/biases and attention/MLP biases (test models:
    a swapped or missing tensor then changes the outputs)."""

    def normal_(t: Tensor, std: float) -> None:
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, generator=generator) * std)

    def init_transformer(tr: Transformer) -> None:
        w, n = tr.width, len(tr.resblocks)
        attn_std, proj_std, fc_std = w**-0.5, (w**-0.5) * (2 * n) ** -0.5, (2 * w) ** -0.5
        for block in tr.resblocks:
            normal_(block.attn.in_proj_weight, attn_std)
            normal_(block.attn.out_proj.weight, proj_std)
            normal_(block.mlp.c_fc.weight, fc_std)
            normal_(block.mlp.c_proj.weight, proj_std)
            for bias in (block.attn.in_proj_bias, block.attn.out_proj.bias, block.mlp.c_fc.bias, block.mlp.c_proj.bias):
                normal_(bias, 0.02 if perturb_norms else 0.0)

    def init_norms(tower: nn.Module) -> None:
        for module in tower.modules():
            if isinstance(module, nn.LayerNorm):
                with torch.no_grad():
                    module.weight.fill_(1.0)
                    module.bias.zero_()
                if perturb_norms:
                    normal_(module.bias, 0.1)
                    with torch.no_grad():
                        module.weight.add_(torch.randn(module.weight.shape, generator=generator) * 0.1)

    # tower by tower, so an image-only model gets exactly the image tower of the full one
    v = model.visual
    w = v.cfg.width
    normal_(v.conv1.weight, (3 * v.cfg.patch_size**2) ** -0.5)
    normal_(v.class_embedding, w**-0.5)
    normal_(v.positional_embedding, w**-0.5)
    normal_(v.proj, w**-0.5)
    init_transformer(v.transformer)
    init_norms(v)
    if model.has_text:
        normal_(model.token_embedding.weight, 0.02)
        normal_(model.positional_embedding, 0.01)
        normal_(model.text_projection, model.transformer.width**-0.5)
        init_transformer(model.transformer)
        init_norms(model.transformer)
        init_norms(model.ln_final)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.07))
    return model


def tiny_clip_config(width: int = 64, layers: int = 2, heads: int | None = None, patch_size: int = 8,
                     image_size: int = 32, embed_dim: int | None = None, text_width: int | None = None,
                     text_layers: int | None = None, context_length: int = 77, vocab_size: int = 49408,
                     act: str = "quick_gelu", text: bool = True) -> CLIPConfig:
    """A tiny CLIP architecture for tests. Heads default to OpenAI's rule ``width // 64`` (at least 1).

    A plain state dict of it does not say its heads (no known architecture has these widths): write it
    with ``save_clip`` (the architecture goes into the metadata) or load it with ``arch=``."""
    text_width = text_width or width
    return CLIPConfig(
        embed_dim=embed_dim or width,
        vision=VisionConfig(width=width, layers=layers, heads=heads or max(1, width // 64), patch_size=patch_size,
                            image_size=image_size, mlp_width=4 * width),
        text=TextConfig(width=text_width, layers=text_layers or layers, heads=heads or max(1, text_width // 64),
                        context_length=context_length, vocab_size=vocab_size, mlp_width=4 * text_width)
        if text else None,
        act=act,
    )


def random_clip(cfg: CLIPConfig, seed: int = 0, perturb_norms: bool = True) -> CLIP:
    """A randomly initialised CLIP, identical for identical (cfg, seed)."""
    gen = torch.Generator().manual_seed(seed)
    return init_clip_(CLIP(cfg), gen, perturb_norms=perturb_norms).eval()


def tiny_clip(seed: int = 0, **arch) -> CLIP:
    """A tiny random CLIP (see :func:`tiny_clip_config` for ``arch``), deterministic for a seed."""
    return random_clip(tiny_clip_config(**arch), seed)


def tiny_clip_state_dict(seed: int = 0, **arch) -> dict[str, Tensor]:
    """OpenAI-named state dict of :func:`tiny_clip` (fp32)."""
    return {k: v.detach().clone() for k, v in tiny_clip(seed, **arch).state_dict().items()}
