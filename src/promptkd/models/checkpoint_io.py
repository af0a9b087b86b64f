"""Reading the bytes of a CLIP checkpoint: format detection, safe (un)pickling, Hugging Face names.

``promptkd.models.weights`` builds on this: it infers the architecture and loads our CLIP. Nothing here
unpickles a file unless the caller trusts it, and :func:`is_torch_pickle` decides whether a file is a
pickle at all by parsing its opcodes, never by running them.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a pre-zip torch.save file


class UntrustedCheckpointError(ValueError):
    """Loading this file would run code from it, and the user has not said they trust it."""


def _untrusted_message(path: Path, what: str) -> str:
    return (f"{path}: {what}; loading it can run code from the file. If you trust where it comes from, pass "
            f"trust_checkpoint=True (CLI: --trust-checkpoint), or convert it once to a plain tensor file: "
            f"promptkd convert {path} OUT.safetensors --trust-checkpoint")


def sniff(path: Path) -> str:
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


def _complete_pickle(stream) -> list:
    """The opcodes of one pickle read from ``stream`` (parsed, never executed); raises if malformed."""
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(stream)]
    if not ops or ops[0][0] != "PROTO" or ops[-1][0] != "STOP":
        raise ValueError("not a complete pickle")
    return ops


def is_torch_pickle(path: str | Path) -> bool:
    """True when ``path`` really is a ``torch.save`` file: a zip archive holding a well-formed
    ``<name>/data.pkl``, or a legacy pickle stream that starts with torch's magic number. Only opcodes
    are parsed (``pickletools.genops``); nothing is unpickled. Random bytes that happen to start like a
    pickle (0x80) are not one."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                pkl = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                if len(pkl) != 1:
                    return False
                with z.open(pkl[0]) as f:
                    _complete_pickle(f)
            return True
        with open(path, "rb") as f:
            ops = _complete_pickle(f)
        return any(arg == TORCH_LEGACY_MAGIC for _, arg in ops)
    except Exception:  # any parse error: not a pickle we would ever suggest trusting
        return False


def not_a_checkpoint_message(path: str | Path) -> str:
    return (f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle stream; the file "
            "is corrupt, truncated or in another format); nothing was unpickled")


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:
        raise ValueError(f"{path}: unreadable safetensors file ({exc})") from exc


def read_torch(path: Path, trust_checkpoint: bool, allow_trust: bool = True) -> object:
    if not is_torch_pickle(path):
        raise ValueError(not_a_checkpoint_message(path))
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not (trust_checkpoint and allow_trust):
            if not allow_trust:
                raise ValueError(f"{path}: holds Python objects beyond tensors and is refused "
                                 f"(only weights_only loading is allowed for this file): {exc}") from None
            raise UntrustedCheckpointError(_untrusted_message(path, "this torch.save file holds Python "
                                                                    "objects beyond tensors")) from None
    except Exception as exc:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"{path}: could not unpickle this checkpoint ({type(exc).__name__}: {exc})") from exc


def read_torchscript(path: Path, trust_checkpoint: bool) -> dict[str, Tensor]:
    if not trust_checkpoint:
        raise UntrustedCheckpointError(_untrusted_message(path, "this is a TorchScript archive (as OpenAI's "
                                                                "released CLIP .pt files are)"))
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ValueError(f"{path}: could not load this TorchScript archive ({exc})") from exc
    return {k: v.detach() for k, v in module.state_dict().items()}


def unwrap(obj: object, path: Path) -> dict[str, Tensor]:
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


def strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
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


def read_hf_dir(path: Path) -> tuple[dict[str, Tensor], dict]:
    from promptkd.fileio import read_json

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: a CLIP folder needs config.json (Hugging Face) or open_clip_config.json "
                                "beside open_clip's weights")
    hf_cfg = read_json(cfg_file, "Hugging Face config")
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        state, _ = read_safetensors(path / "model.safetensors")
    elif index.is_file():
        shards = sorted(set((read_json(index, "weights index").get("weight_map") or {}).values()))
        if not shards:
            raise ValueError(f"{index}: no weight_map")
        state = {}
        for shard in shards:
            state.update(read_safetensors(path / shard)[0])
    elif (path / "pytorch_model.bin").is_file():
        state = unwrap(read_torch(path / "pytorch_model.bin", False, allow_trust=False), path / "pytorch_model.bin")
    elif (bin_index := path / "pytorch_model.bin.index.json").is_file():  # older transformers' sharded files
        shards = sorted(set((read_json(bin_index, "weights index").get("weight_map") or {}).values()))
        if not shards:
            raise ValueError(f"{bin_index}: no weight_map")
        state = {}
        for shard in shards:
            state.update(unwrap(read_torch(path / shard, False, allow_trust=False), path / shard))
    else:
        raise FileNotFoundError(f"{path}: no weights found (looked for {', '.join(HF_WEIGHT_FILES)})")
    return state, hf_cfg
