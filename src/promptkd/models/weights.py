"""Every CLIP checkpoint format we read -> OpenAI parameter names -> strict load into our CLIP.

Formats (detected from the file, not the extension):

* OpenAI's released ``.pt`` files: TorchScript archives. Loading one runs code stored in the file, so it
  needs ``trust_checkpoint=True`` (CLI ``--trust-checkpoint``); ``promptkd convert SRC DST.safetensors``
  turns one into a plain tensor file once.
* State dicts in OpenAI / open_clip names (``visual.conv1.weight``...) in ``.safetensors`` or a
  ``torch.save`` file (``.pt``, ``.bin``, ``.pth``), possibly wrapped in ``{"state_dict": ...}`` and with
  ``module.`` prefixes (DDP). ``torch.save`` files are read with ``torch.load(weights_only=True)``; a file
  that needs full unpickling is refused unless trusted.
* Hugging Face ``transformers`` CLIP folders: ``config.json`` + ``model.safetensors`` (or sharded, or
  ``pytorch_model.bin``, read with ``weights_only=True`` only), with separate q/k/v projections.
* open_clip models as published (``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin`` with
  ``open_clip_config.json`` beside it): pass the folder or the weights file inside it.

The shapes come from the tensors. What tensors cannot say (attention heads per tower, QuickGELU or GELU,
LayerNorm eps, image mean/std) comes, in this order, from ``arch=`` (CLI ``--arch``: a known name or an
open_clip config, ``promptkd.models.clip_archs``), the metadata of our own safetensors files
(``save_clip``, ``promptkd convert``), ``open_clip_config.json`` beside open_clip/OpenAI-named weights, or
``config.json`` beside Hugging Face weights; every one of them is checked against the tensors, and two
that disagree on the heads are refused. Without any of them: OpenAI's TorchScript files follow OpenAI's
rule (heads = width // 64, QuickGELU); a tower shaped exactly like a known architecture's gets that
architecture's heads (the activation is then assumed QuickGELU, with a warning); anything else is refused
with a message saying what to pass. Heads are never guessed.

Nothing is unpickled unless the caller trusts the file (``trust_checkpoint``), and a file is only called a
pickle (and trust suggested) when it really is one: :func:`is_torch_pickle` parses its opcodes, never
executing them (``promptkd.models.checkpoint_io`` reads the bytes; this module the architecture).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from promptkd.models.checkpoint_io import (  # noqa: F401  (re-exported: the loader's public names)
    HF_WEIGHT_FILES,
    UntrustedCheckpointError,
    hf_to_openai,
    is_hf_state_dict,
    is_torch_pickle,
    not_a_checkpoint_message,
    read_hf_dir,
    read_safetensors,
    read_torch,
    read_torchscript,
    sniff,
    strip_prefixes,
    unwrap,
)
from promptkd.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from promptkd.models.clip_archs import (
    KNOWN_ARCHS,
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_WEIGHTS,
    ArchInfo,
    ArchLike,
    arch_info,
    known_heads,
    read_open_clip_config,
    recorded_arch,
)

FORMAT_TAG = "promptkd-clip"
# entries of OpenAI's TorchScript state dict (and open_clip buffers) that are not weights
NON_WEIGHT_KEYS = {"input_resolution", "context_length", "vocab_size", "attn_mask", "text.attn_mask"}
TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


@dataclass
class ClipCheckpoint:
    """A checkpoint read into OpenAI names, with its inferred architecture."""

    state_dict: dict[str, Tensor]
    config: CLIPConfig
    source: str
    format: str  # "torchscript" | "safetensors" | "torch" | "hf"
    notes: list[str] = field(default_factory=list)
    arch_source: str = ""  # what settled the heads / activation (a config file, --arch, a known shape...)


@dataclass
class LoadedClip:
    model: CLIP
    sha256: str
    source: str
    format: str
    arch_source: str = ""


# --------------------------------------------------------------------------------------------------
# architecture inference


def _layer_count(state: dict[str, Tensor], prefix: str, source: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m[1]) for k in state if (m := pat.match(k))}
    if found and found != set(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - found)
        raise ValueError(f"{source}: {prefix}N: layers {missing} are missing")
    return len(found)


def _need(state: dict[str, Tensor], key: str, source: str) -> Tensor:
    if key not in state:
        raise ValueError(f"{source}: missing key {key!r}")
    return state[key]


def _tensor_shapes(state: dict[str, Tensor], source: str) -> CLIPConfig:
    """The architecture as far as the tensors fix it (heads set to 1: the tensors do not say)."""
    if any(k.startswith("visual.layer1.") for k in state) or "visual.attnpool.c_proj.weight" in state:
        raise ValueError(f"{source}: a ResNet CLIP; only ViT CLIP models are supported")
    if any(k.startswith(("prompt_learner.", "image_encoder.")) for k in state):
        raise ValueError(f"{source}: a Dassl (PromptSRC/PromptKD) training checkpoint, not CLIP weights; "
                         "use `promptkd convert-teacher` for it")
    conv = _need(state, "visual.conv1.weight", source)
    proj = _need(state, "visual.proj", source)
    width, patch = conv.shape[0], conv.shape[-1]
    positions = _need(state, "visual.positional_embedding", source).shape[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise ValueError(f"{source}: visual.positional_embedding has {positions} rows, not 1 + a square grid")
    vision = VisionConfig(width=width, layers=_layer_count(state, "visual.transformer.resblocks.", source), heads=1,
                          patch_size=patch, image_size=patch * grid,
                          mlp_width=_need(state, "visual.transformer.resblocks.0.mlp.c_fc.weight", source).shape[0])
    text = None
    if "token_embedding.weight" in state:
        text = TextConfig(width=_need(state, "ln_final.weight", source).shape[0],
                          layers=_layer_count(state, "transformer.resblocks.", source), heads=1,
                          context_length=_need(state, "positional_embedding", source).shape[0],
                          vocab_size=state["token_embedding.weight"].shape[0],
                          mlp_width=_need(state, "transformer.resblocks.0.mlp.c_fc.weight", source).shape[0])
    return CLIPConfig(embed_dim=proj.shape[1], vision=vision, text=text)


def _hf_arch(hf_cfg: dict, shapes: CLIPConfig, source: str) -> ArchInfo:
    """What a transformers ``config.json`` says (missing keys take transformers' CLIP defaults)."""
    kind = hf_cfg.get("model_type")
    if kind == "clip_vision_model":  # CLIPVisionModel(WithProjection): the tower's settings at the top level
        subs = {"vision": hf_cfg, "text": {}}
    elif kind == "clip_text_model":
        subs = {"vision": {}, "text": hf_cfg}
    else:
        subs = {"vision": hf_cfg.get("vision_config") or {}, "text": hf_cfg.get("text_config") or {}}
    subs = {k: v for k, v in subs.items() if k == "vision" or shapes.text is not None or v}
    acts = {s.get("hidden_act", "quick_gelu") for s in subs.values()}
    if len(acts) > 1:
        raise ValueError(f"{source}: text and vision towers use different activations {sorted(acts)}")
    act = acts.pop()
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"{source}: unsupported hidden_act {act!r} (quick_gelu or gelu)")
    epss = {float(s.get("layer_norm_eps", 1e-5)) for s in subs.values()}
    if len(epss) > 1:
        raise ValueError(f"{source}: text and vision towers use different layer_norm_eps {sorted(epss)}")
    # transformers' CLIPVisionConfig / CLIPTextConfig defaults: 12 and 8 heads
    vision = replace(shapes.vision, heads=int(subs["vision"].get("num_attention_heads", 12)))
    text = replace(shapes.text, heads=int(subs["text"].get("num_attention_heads", 8))) if shapes.text else None
    try:
        cfg = replace(shapes, vision=vision, text=text, act=act, ln_eps=epss.pop())
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    return ArchInfo(source, cfg, act=act)


_CHECKED = {"vision": ("width", "layers", "patch_size", "image_size", "mlp_width"),
            "text": ("width", "layers", "context_length", "vocab_size", "mlp_width")}


def _check_against_tensors(shapes: CLIPConfig, info: ArchInfo, source: str) -> None:
    """Refuse an architecture description that does not fit the tensors (naming the first difference)."""
    diffs = []
    if info.config.embed_dim != shapes.embed_dim:
        diffs.append(f"embed_dim {info.config.embed_dim} (tensors: {shapes.embed_dim})")
    for tower, fields in _CHECKED.items():
        ours, theirs = getattr(shapes, tower), getattr(info.config, tower)
        if ours is None or theirs is None:
            continue
        diffs += [f"{tower} {f} {getattr(theirs, f)} (tensors: {getattr(ours, f)})"
                  for f in fields if getattr(theirs, f) != getattr(ours, f)]
    if diffs:
        raise ValueError(f"{source}: {info.source} does not describe this checkpoint: {'; '.join(diffs[:4])}")


def _refusal(source: str, tower: str, t) -> ValueError:
    return ValueError(
        f"{source}: cannot tell how many attention heads the {tower} tower has (width {t.width}, {t.layers} layers, "
        f"MLP {t.mlp_width}: not a known architecture's, and the file records none). Say which architecture it "
        f"is: --arch NAME (arch= in Python; {', '.join(KNOWN_ARCHS)}, '-quickgelu' variants, OpenAI's ViT-B/16...), "
        f"or --arch FILE.json with its open_clip model config, or put its {OPEN_CLIP_CONFIG} beside the weights")


def resolve_config(shapes: CLIPConfig, sources: list[ArchInfo], source: str, *, act: str | None = None,
                   openai_rule: bool = False) -> tuple[CLIPConfig, str, list[str]]:
    """(config, what settled it, notes): the tensors' shapes plus heads/act/eps/normalisation.

    ``sources`` in priority order, each checked against the shapes; they must agree on the heads.
    Without sources: OpenAI's rule if ``openai_rule`` (TorchScript), else a known architecture's heads
    when a tower's shape is exactly one, else a ValueError saying what to pass."""
    notes: list[str] = []
    for info in sources:
        _check_against_tensors(shapes, info, source)
        notes += list(info.notes)
    has_text = shapes.text is not None
    if sources:
        v_said = {i.config.vision.heads for i in sources}
        t_said = {i.config.text.heads for i in sources if i.config.text is not None} if has_text else set()
        if len(v_said) > 1 or len(t_said) > 1:
            listed = "; ".join(f"{i.source}: {i.config.vision.heads} vision"
                               + (f" / {i.config.text.heads} text" if has_text and i.config.text else "") + " heads"
                               for i in sources)
            raise ValueError(f"{source}: the architecture descriptions disagree on the attention heads ({listed})")
        if has_text and not t_said:
            raise _refusal(source, "text", shapes.text)
        first = sources[0]
        v_heads, text_heads, settled = v_said.pop(), t_said.pop() if has_text else None, first.source
        base_act = next((i.act for i in sources if i.act), None) or "quick_gelu"
        eps = first.config.ln_eps
        mean = next((i.mean for i in sources if i.mean), shapes.mean)
        std = next((i.std for i in sources if i.std), shapes.std)
    elif openai_rule:
        v_heads, text_heads = max(1, shapes.vision.width // 64), max(1, shapes.text.width // 64) if has_text else None
        settled, base_act, eps, mean, std = "OpenAI's rule for its TorchScript files (heads = width // 64)", \
            "quick_gelu", 1e-5, shapes.mean, shapes.std
    else:
        v = shapes.vision
        v_heads = known_heads(v.width, v.layers, v.mlp_width, "vision")
        if v_heads is None:
            raise _refusal(source, "vision", v)
        text_heads = None
        if has_text:
            t = shapes.text
            text_heads = known_heads(t.width, t.layers, t.mlp_width, "text")
            if text_heads is None:
                raise _refusal(source, "text", t)
        settled, base_act, eps, mean, std = "the shape of a known architecture", "quick_gelu", 1e-5, shapes.mean, shapes.std
        if act is None:
            notes.append(f"{source}: the file does not record its activation; QuickGELU assumed (OpenAI's releases). "
                         "LAION/DataComp open_clip models use GELU: pass --arch with open_clip's name of the "
                         "architecture (e.g. ViT-B-16: GELU; ViT-B-16-quickgelu or OpenAI's ViT-B/16: QuickGELU) "
                         f"or put its {OPEN_CLIP_CONFIG} beside it")
    try:
        cfg = replace(shapes, vision=replace(shapes.vision, heads=v_heads),
                      text=replace(shapes.text, heads=text_heads) if has_text else None,
                      act=act or base_act, ln_eps=eps, mean=mean, std=std)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc} ({settled})") from None
    return cfg, settled, notes


def infer_config(state: dict[str, Tensor], source: str = "<state dict>", act: str | None = None,
                 hf_config: dict | None = None, arch: ArchLike | None = None,
                 openai_rule: bool = False) -> CLIPConfig:
    """The CLIP architecture of an OpenAI-named state dict (see :func:`resolve_config`)."""
    shapes = _tensor_shapes(state, source)
    sources = [arch_info(arch)] if arch is not None else []
    if hf_config is not None:
        sources.append(_hf_arch(hf_config, shapes, source))
    return resolve_config(shapes, sources, source, act=act, openai_rule=openai_rule)[0]


# --------------------------------------------------------------------------------------------------
# public entry points


def _open_clip_folder_weights(folder: Path) -> Path | None:
    """The weights file of an open_clip model folder (``open_clip_config.json`` + its weights), if any."""
    if not (folder / OPEN_CLIP_CONFIG).is_file():
        return None
    for name in OPEN_CLIP_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    if (folder / "config.json").is_file():
        return None  # a Hugging Face folder that also carries open_clip's config
    raise FileNotFoundError(f"{folder}: {OPEN_CLIP_CONFIG} but none of {', '.join(OPEN_CLIP_WEIGHTS)}; pass the "
                            "weights file itself (the config beside it is read)")


def read_clip_checkpoint(path: str | Path, trust_checkpoint: bool = False, act: str | None = None,
                         arch: ArchLike | None = None, image_only: bool = False) -> ClipCheckpoint:
    """Read any supported CLIP checkpoint into OpenAI names and infer its architecture.

    ``arch``: a known name, an open_clip config (file or dict) or a :class:`CLIPConfig` (see
    ``promptkd.models.clip_archs.arch_info``). ``image_only`` drops the text tower before anything is
    inferred (its heads then need not be known)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
    # absolute, but symbolic links are not followed: a file in a Hugging Face hub cache is a link into
    # blobs/, and its config (config.json / open_clip_config.json) is beside the link, not the blob
    path = Path(os.path.abspath(path))
    if path.is_dir() and (weights_file := _open_clip_folder_weights(path)) is not None:
        path = weights_file
    hf_cfg, meta, torchscript = None, {}, False
    if path.is_dir():
        raw, hf_cfg = read_hf_dir(path)
        fmt = "hf"
    else:
        fmt = sniff(path)
        if fmt == "safetensors":
            raw, meta = read_safetensors(path)
        elif fmt == "torchscript":
            raw, torchscript = read_torchscript(path, trust_checkpoint), True
        else:
            raw = unwrap(read_torch(path, trust_checkpoint), path)
    state = strip_prefixes(raw)
    hf_named = is_hf_state_dict(state)
    if hf_named:
        state = hf_to_openai(state, str(path))
        if hf_cfg is None and (path.parent / "config.json").is_file():
            from promptkd.fileio import read_json

            hf_cfg = read_json(path.parent / "config.json", "Hugging Face config")
    elif any(k.startswith("text.") for k in state):  # open_clip CustomTextCLIP with its own text tower
        state = {k[len("text."):] if k.startswith("text.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k not in NON_WEIGHT_KEYS}
    if image_only:
        state = {k: v for k, v in state.items() if not k.startswith(TEXT_PREFIXES)}
    shapes = _tensor_shapes(state, str(path))
    sources = [arch_info(arch)] if arch is not None else []
    if meta.get("format") == FORMAT_TAG and "config" in meta:  # our own file: the architecture is recorded
        sources.append(recorded_arch(CLIPConfig.from_dict(json.loads(meta["config"])), "the file's metadata"))
    base = path if path.is_dir() else path.parent
    if not hf_named and (base / OPEN_CLIP_CONFIG).is_file():
        sources.append(read_open_clip_config(base / OPEN_CLIP_CONFIG))
    if hf_cfg is not None:
        sources.append(_hf_arch(hf_cfg, shapes, str(base / "config.json")))
    config, settled, notes = resolve_config(shapes, sources, str(path), act=act, openai_rule=torchscript)
    return ClipCheckpoint(state, config, str(path), fmt, notes, settled)


def check_state_dict(model: CLIP, state: dict[str, Tensor], source: str) -> None:
    """Raise a ValueError naming the file and key for any missing, unknown or mis-shaped tensor."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unknown = sorted(set(state) - set(own))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}" + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
        if unknown:
            parts.append(f"unknown keys {unknown[:8]}" + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""))
        raise ValueError(f"{source}: does not fit the inferred CLIP architecture: {'; '.join(parts)}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"{source}: shape mismatch for {key}: file has {tuple(value.shape)}, "
                             f"model expects {tuple(own[key].shape)}")


def load_clip(path: str | Path, trust_checkpoint: bool = False, device: str | torch.device | None = None,
              dtype: torch.dtype | None = None, image_only: bool = False, act: str | None = None,
              with_info: bool = False, arch: ArchLike | None = None) -> CLIP | LoadedClip:
    """Build our CLIP from a checkpoint and load it strictly (float32 unless ``dtype``), in eval mode.

    ``image_only`` drops the text tower (students). ``arch`` says what the file cannot (see
    :func:`read_clip_checkpoint`). ``with_info`` returns a :class:`LoadedClip` with the
    format-independent checksum of the loaded tensors. Assumptions are reported as warnings."""
    from promptkd.models.clip_backbones import tensors_sha256

    ckpt = read_clip_checkpoint(path, trust_checkpoint=trust_checkpoint, act=act, arch=arch, image_only=image_only)
    for note in ckpt.notes:
        warnings.warn(note, stacklevel=2)
    cfg, state = ckpt.config, ckpt.state_dict
    if image_only:
        cfg = cfg.image_only()
        state = {k: v for k, v in state.items() if k.startswith("visual.") or k == "logit_scale"}
        if "logit_scale" not in state:  # image-only exports and HF vision towers have none; a student never uses it
            state["logit_scale"] = torch.tensor(math.log(100.0))
    elif "logit_scale" not in state and cfg.text is not None:
        raise ValueError(f"{ckpt.source}: no 'logit_scale' tensor, so the logits' temperature is unknown; a CLIP "
                         "checkpoint saved whole has one (an image tower alone can serve as a student only)")
    model = CLIP(cfg)
    check_state_dict(model, state, ckpt.source)
    model.load_state_dict(state, strict=True)
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    if not with_info:
        return model
    # checksum of the tensors as stored (before any dtype change), so it names the weights, not the run
    return LoadedClip(model, tensors_sha256(state), ckpt.source, ckpt.format, ckpt.arch_source)


def save_clip(model_or_state: CLIP | dict[str, Tensor], path: str | Path, config: CLIPConfig | None = None) -> Path:
    """Write OpenAI-named tensors to ``.safetensors`` with the architecture in the metadata, atomically
    (mode as the umask says), so the file loads alone."""
    from promptkd.fileio import atomic_save_with

    if isinstance(model_or_state, CLIP):
        state, config = model_or_state.state_dict(), model_or_state.cfg
    else:
        state = model_or_state
    if config is None:
        config = infer_config(state)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {"format": FORMAT_TAG, "config": json.dumps(config.to_dict())}
    return atomic_save_with(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def convert_checkpoint(src: str | Path, dst: str | Path, trust_checkpoint: bool = False,
                       dtype: torch.dtype | None = None, act: str | None = None,
                       arch: ArchLike | None = None) -> ClipCheckpoint:
    """Any readable CLIP checkpoint -> one safetensors file in OpenAI names (dtype kept unless given),
    with the resolved architecture (heads, activation, normalisation) in its metadata."""
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"{dst}: the output must be a .safetensors file")
    ckpt = read_clip_checkpoint(src, trust_checkpoint=trust_checkpoint, act=act, arch=arch)
    check_state_dict(CLIP(ckpt.config), ckpt.state_dict, ckpt.source)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in ckpt.state_dict.items()}
    save_clip(state, dst, ckpt.config)
    return ckpt
