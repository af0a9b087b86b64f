"""What a CLIP checkpoint's tensors cannot say: attention heads, activation, image normalisation.

A ViT CLIP state dict fixes every width, depth and size, but not how many heads each attention layer
splits its width into, whether the MLPs use QuickGELU (OpenAI's releases) or GELU (LAION / DataComp
open_clip models), nor the mean/std the images were normalised with. Those come from:

* open_clip's model config: ``open_clip_config.json`` published next to every open_clip model
  (``{"model_cfg": {...}, "preprocess_cfg": {"mean", "std"}}``), or a ``model_configs/*.json`` of open_clip
  (``{"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}``). Missing fields take open_clip's defaults
  (``CLIPVisionCfg`` / ``CLIPTextCfg``: head_width 64, mlp_ratio 4.0, text heads 8, GELU, 224 px...).
* a known architecture by name (:data:`KNOWN_ARCHS`, facts from open_clip's ``model_configs``): open_clip's
  names (``ViT-B-16``: GELU; ``ViT-B-16-quickgelu``: QuickGELU) and OpenAI's (``ViT-B/16``, ``ViT-L/14@336px``:
  QuickGELU, as OpenAI trained them).

Everything here returns an :class:`ArchInfo`; ``promptkd.models.weights`` checks it against the tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from promptkd.models.clip import OPENAI_MEAN, OPENAI_STD, CLIPConfig, TextConfig, VisionConfig

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class ArchInfo:
    """What one source (a config file, an arch name, an artefact's record) says about a checkpoint.

    ``config`` is the complete architecture it describes; every shape in it is checked against the
    tensors. ``act``/``mean``/``std`` are None when the source does not say."""

    source: str
    config: CLIPConfig
    act: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class KnownArch:
    """One ViT architecture as open_clip's ``model_configs/<name>.json`` gives it."""

    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_head_width: int
    vision_mlp_ratio: float
    text_width: int
    text_layers: int
    text_heads: int

    def config(self, act: str) -> CLIPConfig:
        return CLIPConfig(
            embed_dim=self.embed_dim,
            vision=VisionConfig(width=self.vision_width, layers=self.vision_layers,
                                heads=self.vision_width // self.vision_head_width, patch_size=self.patch_size,
                                image_size=self.image_size,
                                mlp_width=int(self.vision_width * self.vision_mlp_ratio)),
            text=TextConfig(width=self.text_width, layers=self.text_layers, heads=self.text_heads,
                            context_length=77, vocab_size=49408, mlp_width=4 * self.text_width),
            act=act)


# open_clip src/open_clip/model_configs/*.json (text: context 77, vocab 49408, mlp_ratio 4 in all of them)
KNOWN_ARCHS: dict[str, KnownArch] = {
    "ViT-B-32": KnownArch(512, 224, 32, 768, 12, 64, 4.0, 512, 12, 8),
    "ViT-B-16": KnownArch(512, 224, 16, 768, 12, 64, 4.0, 512, 12, 8),
    "ViT-L-14": KnownArch(768, 224, 14, 1024, 24, 64, 4.0, 768, 12, 12),
    "ViT-L-14-336": KnownArch(768, 336, 14, 1024, 24, 64, 4.0, 768, 12, 12),
    "ViT-H-14": KnownArch(1024, 224, 14, 1280, 32, 80, 4.0, 1024, 24, 16),
    "ViT-g-14": KnownArch(1024, 224, 14, 1408, 40, 88, 4.3637, 1024, 24, 16),
    "ViT-bigG-14": KnownArch(1280, 224, 14, 1664, 48, 104, 4.9231, 1280, 32, 20),
}
# OpenAI's own names (clip.available_models()); their releases use QuickGELU
OPENAI_NAMES = {"ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14", "ViT-L/14@336px": "ViT-L-14-336"}
QUICKGELU_SUFFIX = "-quickgelu"


def arch_names() -> list[str]:
    """Every name :func:`named_arch` accepts (each open_clip name also with ``-quickgelu``)."""
    return [*KNOWN_ARCHS, *(n + QUICKGELU_SUFFIX for n in KNOWN_ARCHS), *OPENAI_NAMES]


def named_arch(name: str) -> ArchInfo:
    """A known architecture: open_clip's name (GELU, or QuickGELU with ``-quickgelu``) or OpenAI's (QuickGELU)."""
    text = name.strip()
    if text in OPENAI_NAMES:
        key, act = OPENAI_NAMES[text], "quick_gelu"
    elif text.endswith(QUICKGELU_SUFFIX) and text[: -len(QUICKGELU_SUFFIX)] in KNOWN_ARCHS:
        key, act = text[: -len(QUICKGELU_SUFFIX)], "quick_gelu"
    elif text in KNOWN_ARCHS:
        key, act = text, "gelu"
    else:
        hint = [n for n in arch_names() if n.lower() == text.lower()]
        raise ValueError(f"unknown CLIP architecture {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f"; known: {', '.join(arch_names())}; or give an open_clip config file (.json)")
    # the name says nothing about the normalisation of particular weights: that stays with the file's
    # config, else OpenAI's (open_clip's default too)
    return ArchInfo(f"arch {text}", KNOWN_ARCHS[key].config(act), act=act)


def known_heads(width: int, layers: int, mlp_width: int, tower: str) -> int | None:
    """Heads of a tower whose (width, layers, MLP width) is exactly a known architecture's, else None."""
    found = set()
    for arch in KNOWN_ARCHS.values():
        cfg = arch.config("gelu")
        t = cfg.vision if tower == "vision" else cfg.text
        if (t.width, t.layers, t.mlp_width) == (width, layers, mlp_width):
            found.add(t.heads)
    return found.pop() if len(found) == 1 else None


# --- open_clip model configs ----------------------------------------------------------------------

# settings of open_clip's CLIPVisionCfg / CLIPTextCfg that change the forward pass without changing the
# tensors; any other value than open_clip's default is a model this CLIP does not implement
_VISION_DEFAULTS = {"attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
                    "final_ln_after_pool": False, "pool_type": "tok", "act_kwargs": None, "ls_init_value": None,
                    "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
                    "scale_attn_inner": False, "scale_attn": False, "scale_fc": False, "timm_model_name": None}
_TEXT_DEFAULTS = {"text_arch": "clip", "hf_model_name": None, "embed_cls": False, "no_causal_mask": False,
                  "pool_type": "argmax", "proj_type": "linear", "proj_bias": False, "final_ln_after_pool": False,
                  "act_kwargs": None, "ls_init_value": None, "block_type": None, "qk_norm": False,
                  "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
                  "scale_fc": False}


def _unsupported(cfg: dict, defaults: dict, where: str, source: str) -> None:
    for key, default in defaults.items():
        value = cfg.get(key, default)
        if value != default and not (default is None and value in ({}, "")) and not (key == "block_type" and value == "default"):
            raise ValueError(f"{source}: {where}.{key} = {value!r} is a model this CLIP does not implement "
                             f"(only open_clip's default {default!r})")


def _eps(cfg: dict, where: str, source: str) -> float:
    kwargs = cfg.get("norm_kwargs") or {}
    extra = sorted(set(kwargs) - {"eps"})
    if extra:
        raise ValueError(f"{source}: {where}.norm_kwargs {extra} are not supported (only eps)")
    return float(kwargs.get("eps", 1e-5))


def _int(cfg: dict, key: str, default, where: str, source: str) -> int:
    value = cfg.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{source}: {where}.{key} = {value!r}: only square images / single values are supported")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value <= 0:
        raise ValueError(f"{source}: {where}.{key} must be a positive integer, got {value!r}")
    return int(value)


def _triple(values, key: str, source: str) -> tuple[float, float, float]:
    if (not isinstance(values, (list, tuple)) or len(values) != 3
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
        raise ValueError(f"{source}: preprocess_cfg.{key} must be 3 numbers, got {values!r}")
    if key == "std" and any(v <= 0 for v in values):
        raise ValueError(f"{source}: preprocess_cfg.std must be positive, got {values!r}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def open_clip_arch(data: dict, source: str) -> ArchInfo:
    """An :class:`ArchInfo` from an open_clip config: ``open_clip_config.json`` or a ``model_configs`` JSON."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: an open_clip config must be a JSON object, got {type(data).__name__}")
    model = data.get("model_cfg", data)
    pre = (data.get("preprocess_cfg") or {}) if "model_cfg" in data else {}
    if not isinstance(model, dict) or not isinstance(model.get("vision_cfg"), dict):
        raise ValueError(f"{source}: not an open_clip model config (no model_cfg.vision_cfg / vision_cfg)")
    vision, text = model["vision_cfg"], model.get("text_cfg") or {}
    if not isinstance(text, dict):
        raise ValueError(f"{source}: text_cfg must be an object")
    if isinstance(vision.get("layers"), (list, tuple)):
        raise ValueError(f"{source}: a ResNet CLIP (vision_cfg.layers is a list); only ViT CLIP models are supported")
    _unsupported(vision, _VISION_DEFAULTS, "vision_cfg", source)
    _unsupported(text, _TEXT_DEFAULTS, "text_cfg", source)
    if model.get("init_logit_bias") is not None:
        raise ValueError(f"{source}: init_logit_bias (a SigLIP model) is not supported")
    v_width = _int(vision, "width", 768, "vision_cfg", source)
    head_width = _int(vision, "head_width", 64, "vision_cfg", source)
    if v_width % head_width:
        raise ValueError(f"{source}: vision_cfg.width {v_width} is not a multiple of head_width {head_width}")
    t_width = _int(text, "width", 512, "text_cfg", source)
    t_heads = _int(text, "heads", 8, "text_cfg", source)
    if t_width % t_heads:
        raise ValueError(f"{source}: text_cfg.width {t_width} is not divisible by text_cfg.heads {t_heads}")
    eps = {_eps(vision, "vision_cfg", source), _eps(text, "text_cfg", source)}
    if len(eps) > 1:
        raise ValueError(f"{source}: the towers use different LayerNorm eps {sorted(eps)}")
    act = "quick_gelu" if model.get("quick_gelu", False) else "gelu"
    cfg = CLIPConfig(
        embed_dim=_int(model, "embed_dim", None, "model_cfg", source),
        vision=VisionConfig(width=v_width, layers=_int(vision, "layers", 12, "vision_cfg", source),
                            heads=v_width // head_width, patch_size=_int(vision, "patch_size", 16, "vision_cfg", source),
                            image_size=_int(vision, "image_size", 224, "vision_cfg", source),
                            mlp_width=int(v_width * float(vision.get("mlp_ratio", 4.0)))),
        text=TextConfig(width=t_width, layers=_int(text, "layers", 12, "text_cfg", source), heads=t_heads,
                        context_length=_int(text, "context_length", 77, "text_cfg", source),
                        vocab_size=_int(text, "vocab_size", 49408, "text_cfg", source),
                        mlp_width=int(t_width * float(text.get("mlp_ratio", 4.0)))),
        act=act, ln_eps=eps.pop())
    notes = []
    if pre.get("interpolation") not in (None, "bicubic"):
        notes.append(f"{source}: preprocess_cfg.interpolation {pre['interpolation']!r}; promptkd resizes bicubic")
    if pre.get("resize_mode") not in (None, "shortest"):
        notes.append(f"{source}: preprocess_cfg.resize_mode {pre['resize_mode']!r}; promptkd resizes the shortest "
                     "side and crops the centre")
    mean = _triple(pre["mean"], "mean", source) if "mean" in pre else OPENAI_MEAN
    std = _triple(pre["std"], "std", source) if "std" in pre else OPENAI_STD
    return ArchInfo(source, cfg, act=act, mean=mean, std=std, notes=tuple(notes))


def read_open_clip_config(path: str | Path) -> ArchInfo:
    from promptkd.fileio import read_json

    p = Path(path)
    return open_clip_arch(read_json(p, "open_clip config"), str(p))


def recorded_arch(cfg: CLIPConfig, source: str = "the architecture recorded in the artefact") -> ArchInfo:
    """An architecture we recorded ourselves (artefact identity, our safetensors metadata): complete."""
    return ArchInfo(source, cfg, act=cfg.act, mean=cfg.mean, std=cfg.std)


ArchLike = str | Path | dict | CLIPConfig | ArchInfo  # what ``arch=`` / ``--arch`` accept


def arch_info(arch: ArchLike) -> ArchInfo:
    """``arch=`` of the API and ``--arch`` of the CLI: a known name, an open_clip config (file or dict),
    or a :class:`CLIPConfig` (e.g. the one an artefact recorded)."""
    if isinstance(arch, ArchInfo):
        return arch
    if isinstance(arch, CLIPConfig):
        return recorded_arch(arch)
    if isinstance(arch, dict):
        return open_clip_arch(arch, "the given open_clip config")
    text = str(arch)
    if isinstance(arch, Path) or text.endswith(".json") or Path(text).is_file():
        if not Path(text).is_file():
            raise FileNotFoundError(f"{text}: open_clip config file not found")
        return read_open_clip_config(text)
    return named_arch(text)


def describe(cfg: CLIPConfig) -> str:
    """One line: widths, layers, heads (head width), activation."""
    v = cfg.vision
    parts = [f"vision {v.width} x {v.layers} layers, {v.heads} heads of {v.width // v.heads}, patch {v.patch_size}, "
             f"{v.image_size} px"]
    if cfg.text is not None:
        t = cfg.text
        parts.append(f"text {t.width} x {t.layers} layers, {t.heads} heads of {t.width // t.heads}")
    parts.append(f"embed {cfg.embed_dim}; {cfg.act}")
    return "; ".join(parts)


__all__ = ["ArchInfo", "ArchLike", "KNOWN_ARCHS", "OPENAI_NAMES", "arch_names", "named_arch", "known_heads", "open_clip_arch",
           "read_open_clip_config", "recorded_arch", "arch_info", "describe"]
