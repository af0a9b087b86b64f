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

The architecture is inferred from tensor shapes. What shapes cannot say comes from ``config.json`` (HF),
from the metadata of our own safetensors files (``save_clip``), or from OpenAI's conventions otherwise:
heads = width // 64, QuickGELU (pass ``act="gelu"`` for e.g. LAION-trained open_clip models), eps 1e-5.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from promptkd.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig

FORMAT_TAG = "promptkd-clip"
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# entries of OpenAI's TorchScript state dict (and open_clip buffers) that are not weights
NON_WEIGHT_KEYS = {"input_resolution", "context_length", "vocab_size", "attn_mask", "text.attn_mask"}


class UntrustedCheckpointError(ValueError):
    """Loading this file would run code from it, and the user has not said they trust it."""


@dataclass
class ClipCheckpoint:
    """A checkpoint read into OpenAI names, with its inferred architecture."""

    state_dict: dict[str, Tensor]
    config: CLIPConfig
    source: str
    format: str  # "torchscript" | "safetensors" | "torch" | "hf"
    notes: list[str] = field(default_factory=list)


@dataclass
class LoadedClip:
    model: CLIP
    sha256: str
    source: str
    format: str


# --------------------------------------------------------------------------------------------------
# reading raw tensors


def _untrusted_message(path: Path, what: str) -> str:
    return (f"{path}: {what}; loading it can run code from the file. If you trust where it comes from, pass "
            f"trust_checkpoint=True (CLI: --trust-checkpoint), or convert it once to a plain tensor file: "
            f"promptkd convert {path} OUT.safetensors --trust-checkpoint")


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile as exc:
            raise ValueError(f"{path}: damaged zip archive ({exc})") from exc
        if any("/code/" in n or n.endswith("constants.pkl") for n in names):
            return "torchscript"
        return "torch"
    if head[:1] == b"\x80":
        return "torch"  # legacy (non-zip) torch.save pickle stream
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise ValueError(f"{path}: not a CLIP checkpoint this tool reads (neither safetensors, a torch.save "
                     "file, nor a TorchScript archive)")


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:
        raise ValueError(f"{path}: unreadable safetensors file ({exc})") from exc


def _read_torch(path: Path, trust_checkpoint: bool, allow_trust: bool = True) -> object:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not (trust_checkpoint and allow_trust):
            if not allow_trust:
                raise ValueError(f"{path}: holds Python objects beyond tensors and is refused "
                                 f"(only weights_only loading is allowed for this file): {exc}") from None
            raise UntrustedCheckpointError(_untrusted_message(path, "this torch.save file holds Python "
                                                                    "objects beyond tensors")) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    return torch.load(str(path), map_location="cpu", weights_only=False)


def _read_torchscript(path: Path, trust_checkpoint: bool) -> dict[str, Tensor]:
    if not trust_checkpoint:
        raise UntrustedCheckpointError(_untrusted_message(path, "this is a TorchScript archive (as OpenAI's "
                                                                "released CLIP .pt files are)"))
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ValueError(f"{path}: could not load this TorchScript archive ({exc})") from exc
    return {k: v.detach() for k, v in module.state_dict().items()}


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"{path}: the file holds no tensors")
    return tensors


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in ("module.", "_orig_mod.", "model."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------------------------------
# Hugging Face transformers names -> OpenAI names

_HF_LAYER = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$")
_HF_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
_HF_SINGLE = {
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
_HF_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}


def is_hf_state_dict(state: dict[str, Tensor]) -> bool:
    return any(k.startswith(("vision_model.", "text_model.")) for k in state)


def hf_to_openai(state: dict[str, Tensor], source: str = "<state dict>") -> dict[str, Tensor]:
    """Rename a transformers ``CLIPModel`` state dict to OpenAI names (q/k/v packed into in_proj)."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    unknown = []
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key in _HF_SINGLE:
            out[_HF_SINGLE[key]] = value
        elif key in _HF_TRANSPOSED:
            out[_HF_TRANSPOSED[key]] = value.t().contiguous()
        elif m := _HF_LAYER.match(key):
            tower = "visual.transformer" if m[1] == "vision_model" else "transformer"
            base, rest = f"{tower}.resblocks.{m[2]}", m[3]
            if am := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                qkv.setdefault((base, am[2]), {})[am[1]] = value
                continue
            module, _, param = rest.rpartition(".")
            if module not in _HF_BLOCK:
                unknown.append(key)
                continue
            out[f"{base}.{_HF_BLOCK[module]}.{param}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: unknown Hugging Face CLIP keys {sorted(unknown)[:8]} (only ViT CLIPModel "
                         "checkpoints are supported)")
    for (base, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{source}: {base.replace('resblocks', 'layers')} lacks "
                             f"{sorted({'q', 'k', 'v'} - set(parts))}_proj.{kind}")
        name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[f"{base}.attn.{name}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _read_hf_dir(path: Path) -> tuple[dict[str, Tensor], dict]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: a Hugging Face CLIP folder needs config.json")
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_file}: invalid JSON ({exc})") from exc
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        state, _ = _read_safetensors(path / "model.safetensors")
    elif index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"{index}: no weight_map")
        state = {}
        for shard in shards:
            state.update(_read_safetensors(path / shard)[0])
    elif (path / "pytorch_model.bin").is_file():
        state = _unwrap(_read_torch(path / "pytorch_model.bin", False, allow_trust=False), path / "pytorch_model.bin")
    else:
        raise FileNotFoundError(f"{path}: no weights found (looked for {', '.join(HF_WEIGHT_FILES)})")
    return state, hf_cfg


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


def _heads_from_hf(hf_cfg: dict | None, tower: str, width: int) -> int:
    sub = (hf_cfg or {}).get(f"{tower}_config") or {}
    return int(sub.get("num_attention_heads") or max(1, width // 64))


def infer_config(state: dict[str, Tensor], source: str = "<state dict>", act: str | None = None,
                 hf_config: dict | None = None) -> CLIPConfig:
    """The CLIP architecture of an OpenAI-named state dict (heads/act/eps from ``hf_config`` if given)."""
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
    v_layers = _layer_count(state, "visual.transformer.resblocks.", source)
    vision = VisionConfig(width=width, layers=v_layers, heads=_heads_from_hf(hf_config, "vision", width),
                          patch_size=patch, image_size=patch * grid,
                          mlp_width=_need(state, "visual.transformer.resblocks.0.mlp.c_fc.weight", source).shape[0])
    text = None
    if "token_embedding.weight" in state:
        t_width = _need(state, "ln_final.weight", source).shape[0]
        text = TextConfig(width=t_width, layers=_layer_count(state, "transformer.resblocks.", source),
                          heads=_heads_from_hf(hf_config, "text", t_width),
                          context_length=_need(state, "positional_embedding", source).shape[0],
                          vocab_size=state["token_embedding.weight"].shape[0],
                          mlp_width=_need(state, "transformer.resblocks.0.mlp.c_fc.weight", source).shape[0])
    eps = 1e-5
    if hf_config is not None:
        subs = [hf_config.get("vision_config") or {}, hf_config.get("text_config") or {}]
        acts = {s.get("hidden_act", "quick_gelu") for s in subs}
        if len(acts) > 1:
            raise ValueError(f"{source}: text and vision towers use different activations {sorted(acts)}")
        hf_act = acts.pop()
        if hf_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"{source}: unsupported hidden_act {hf_act!r} (quick_gelu or gelu)")
        act = act or hf_act
        epss = {float(s.get("layer_norm_eps", 1e-5)) for s in subs}
        if len(epss) > 1:
            raise ValueError(f"{source}: text and vision towers use different layer_norm_eps {sorted(epss)}")
        eps = epss.pop()
    return CLIPConfig(embed_dim=proj.shape[1], vision=vision, text=text, act=act or "quick_gelu", ln_eps=eps)


# --------------------------------------------------------------------------------------------------
# public entry points


def read_clip_checkpoint(path: str | Path, trust_checkpoint: bool = False, act: str | None = None) -> ClipCheckpoint:
    """Read any supported CLIP checkpoint into OpenAI names and infer its architecture."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
    path = path.resolve()
    hf_cfg, meta, notes = None, {}, []
    if path.is_dir():
        raw, hf_cfg = _read_hf_dir(path)
        fmt = "hf"
    else:
        fmt = _sniff(path)
        if fmt == "safetensors":
            raw, meta = _read_safetensors(path)
        elif fmt == "torchscript":
            raw = _read_torchscript(path, trust_checkpoint)
        else:
            raw = _unwrap(_read_torch(path, trust_checkpoint), path)
        if (path.parent / "config.json").is_file() and is_hf_state_dict(_strip_prefixes(raw)):
            hf_cfg = json.loads((path.parent / "config.json").read_text())
    state = _strip_prefixes(raw)
    if is_hf_state_dict(state):
        state = hf_to_openai(state, str(path))
        if hf_cfg is None:
            notes.append("no config.json beside the file: heads = width // 64 and QuickGELU assumed")
    elif any(k.startswith("text.") for k in state):  # open_clip CustomTextCLIP with its own text tower
        state = {k[len("text."):] if k.startswith("text.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k not in NON_WEIGHT_KEYS}
    config = infer_config(state, str(path), act=act, hf_config=hf_cfg)
    if meta.get("format") == FORMAT_TAG and "config" in meta:  # our own file: heads/act/eps recorded
        recorded = CLIPConfig.from_dict(json.loads(meta["config"]))
        same_shapes = replace(
            config, act=recorded.act, ln_eps=recorded.ln_eps, vision=replace(config.vision, heads=recorded.vision.heads),
            text=replace(config.text, heads=recorded.text.heads) if config.text and recorded.text else config.text)
        if same_shapes != recorded:
            raise ValueError(f"{path}: the architecture in the file's metadata ({recorded}) does not match its "
                             f"tensors ({config})")
        config = recorded if act is None else replace(recorded, act=act)
    return ClipCheckpoint(state, config, str(path), fmt, notes)


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
              with_info: bool = False) -> CLIP | LoadedClip:
    """Build our CLIP from a checkpoint and load it strictly (float32 unless ``dtype``), in eval mode.

    ``image_only`` drops the text tower (students). ``with_info`` returns a :class:`LoadedClip` with the
    format-independent checksum of the loaded tensors."""
    from promptkd.models.clip_backbones import tensors_sha256

    ckpt = read_clip_checkpoint(path, trust_checkpoint=trust_checkpoint, act=act)
    cfg, state = ckpt.config, ckpt.state_dict
    if image_only:
        cfg = cfg.image_only()
        state = {k: v for k, v in state.items() if k.startswith("visual.") or k == "logit_scale"}
    model = CLIP(cfg)
    check_state_dict(model, state, ckpt.source)
    model.load_state_dict(state, strict=True)
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    if not with_info:
        return model
    # checksum of the tensors as stored (before any dtype change), so it names the weights, not the run
    return LoadedClip(model, tensors_sha256(state), ckpt.source, ckpt.format)


def save_clip(model_or_state: CLIP | dict[str, Tensor], path: str | Path, config: CLIPConfig | None = None) -> Path:
    """Write OpenAI-named tensors to ``.safetensors`` with the architecture in the metadata."""
    if isinstance(model_or_state, CLIP):
        state, config = model_or_state.state_dict(), model_or_state.cfg
    else:
        state = model_or_state
    if config is None:
        config = infer_config(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"format": FORMAT_TAG, "config": json.dumps(config.to_dict())})
    return path


def convert_checkpoint(src: str | Path, dst: str | Path, trust_checkpoint: bool = False,
                       dtype: torch.dtype | None = None, act: str | None = None) -> ClipCheckpoint:
    """Any readable CLIP checkpoint -> one safetensors file in OpenAI names (dtype kept unless given)."""
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"{dst}: the output must be a .safetensors file")
    ckpt = read_clip_checkpoint(src, trust_checkpoint=trust_checkpoint, act=act)
    check_state_dict(CLIP(ckpt.config), ckpt.state_dict, ckpt.source)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in ckpt.state_dict.items()}
    save_clip(state, dst, ckpt.config)
    return ckpt
