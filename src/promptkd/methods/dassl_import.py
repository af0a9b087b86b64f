"""The authors' released PromptSRC / PromptKD teacher checkpoints (Dassl format) -> our teacher.

A Dassl checkpoint (``model-best.pth.tar``, ``model.pth.tar-20``; folder layout
``teacher_model/<Dataset>/VLPromptLearner/``) is a ``torch.save`` pickle of a dict with ``state_dict``,
``epoch``, ``optimizer``, ``scheduler`` and ``val_result``. Its state dict is the whole prompted CLIP of
the authors' ``CustomCLIP`` (IVLP design); the learnt prompts in it are

* ``prompt_learner.ctx`` [n_ctx, text width]: the text context of layer 0 (right after SOS),
* ``text_encoder.transformer.resblocks.<i>.VPT_shallow`` [n_ctx, text width], i = 1..depth-1: the text
  tokens that replace the previous layer's context tokens at layer i,
* ``image_encoder.VPT`` [n_ctx, vision width]: the vision tokens appended after the positional embedding,
* ``image_encoder.transformer.resblocks.<i>.VPT_shallow`` [n_ctx, vision width], i = 1..depth-1,

next to frozen CLIP weights (``image_encoder.*`` = OpenAI ``visual.*``; ``text_encoder.transformer.*``,
``text_encoder.positional_embedding``/``ln_final``/``text_projection``; ``logit_scale``), cached token
embeddings (``prompt_learner.token_prefix``/``token_suffix`` and PromptKD's ``...2`` variants, dropped as
the authors' loaders do) and, for PromptSRC, a frozen copy of the image tower
(``prompt_learner.ZS_image_encoder.*``). The token embedding is not in the file, so a teacher is always
rebuilt from the CLIP weights plus these prompts.

These files are pickles. We read them with ``torch.load(weights_only=True)``; only when that fails (Dassl
also pickles the LR scheduler object) and the user explicitly trusts the file is it fully unpickled.
"""

from __future__ import annotations

import pickle
import re
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

TEXT_CTX = "prompt_learner.ctx"
VISION_CTX = "image_encoder.VPT"
_DEEP = re.compile(r"^(text_encoder|image_encoder)\.transformer\.resblocks\.(\d+)\.VPT_shallow$")
DROPPED_PREFIXES = ("prompt_learner.token_prefix", "prompt_learner.token_suffix", "prompt_learner.ZS_image_encoder.")


class UntrustedCheckpointError(ValueError):
    """The checkpoint needs full unpickling and the user has not said they trust it."""


# --- reading the file ----------------------------------------------------------------------------------


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a Dassl run folder: ``model-best.pth.tar`` else the last ``model.pth.tar-N``."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"teacher checkpoint not found: {p}")
    candidates = sorted(p.rglob("model-best.pth.tar"))
    if not candidates:
        numbered = [(int(m.group(1)), f) for f in p.rglob("model.pth.tar-*") if (m := re.search(r"-(\d+)$", f.name))]
        candidates = [f for _, f in sorted(numbered)][-1:]
    if not candidates:
        raise FileNotFoundError(f"{p}: no model-best.pth.tar or model.pth.tar-N below this folder")
    if len(candidates) > 1:
        listed = ", ".join(str(c) for c in candidates[:5])
        raise ValueError(f"{p}: several checkpoints below this folder ({listed}); pass one file")
    return candidates[0]


class _Stub:
    """Stands in for a class whose module is not installed (e.g. Dassl's scheduler); holds its state."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _tolerant_pickle_module() -> types.ModuleType:
    """A pickle module whose Unpickler replaces classes of missing modules by :class:`_Stub`.

    Used only for files the user trusts: everything importable is still unpickled as usual."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                return type(name, (_Stub,), {"__module__": f"<missing {module}>"})

    mod = types.ModuleType("promptkd_tolerant_pickle")
    mod.Unpickler = Unpickler  # type: ignore[attr-defined]
    mod.load = pickle.load  # type: ignore[attr-defined]
    mod.__version__ = "0"  # type: ignore[attr-defined]
    return mod


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # old (non-zip) format or unreadable: no list to show
        return []


def load_checkpoint_file(path: str | Path, trust_checkpoint: bool = False) -> object:
    """``torch.load`` a checkpoint on CPU; full unpickling only with ``trust_checkpoint``.

    A file is only treated as a pickle (and trust suggested) when it is one: its opcodes are parsed
    first (``is_torch_pickle``), without executing anything."""
    from promptkd.models.checkpoint_io import is_torch_pickle, not_a_checkpoint_message

    path = find_checkpoint(path)
    if not is_torch_pickle(path):
        raise ValueError(not_a_checkpoint_message(path))
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_checkpoint:
            found = _unsafe_globals(path)
            detail = [ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
            what = f" (it pickles {', '.join(found[:4])})" if found else (f" ({detail[0]})" if detail else "")
            raise UntrustedCheckpointError(
                f"{path}: this checkpoint holds Python objects beyond tensors{what}; unpickling it can run "
                "code from the file. If you trust where it comes from, pass --trust-checkpoint "
                "(trust_checkpoint=True)."
            ) from None
    except Exception as exc:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_tolerant_pickle_module())
    except Exception as exc:
        raise ValueError(f"{path}: could not unpickle this checkpoint ({type(exc).__name__}: {exc})") from exc


def extract_state_dict(obj: object, source: str = "<checkpoint>") -> tuple[dict[str, Tensor], dict]:
    """(state dict without ``module.`` prefixes, info {epoch, val_result}) from a loaded checkpoint."""
    info: dict = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
        for key in ("epoch", "val_result"):
            value = obj.get(key)
            if isinstance(value, (int, float)) or (isinstance(value, Tensor) and value.numel() == 1):
                info[key] = float(value) if not isinstance(value, int) else value
    elif isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        state = obj
    else:
        raise ValueError(f"{source}: not a Dassl checkpoint (expected a dict with a 'state_dict' entry)")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            continue
        name = key[len("module."):] if key.startswith("module.") else key
        out[name] = value
    return out, info


# --- the prompts inside a state dict -------------------------------------------------------------------


@dataclass
class DasslPrompts:
    """The learnt IVLP prompts of an authors' checkpoint, by layer (layer 0 = the input prompts)."""

    text: dict[int, Tensor] = field(default_factory=dict)  # layer -> [n_ctx, text width]
    vision: dict[int, Tensor] = field(default_factory=dict)  # layer -> [n_ctx, vision width]
    logit_scale: float | None = None  # exp'd, when the file has it
    frozen: dict[str, Tensor] = field(default_factory=dict)  # frozen CLIP tensors, OpenAI names
    info: dict = field(default_factory=dict)

    @property
    def text_depth(self) -> int:
        return len(self.text)

    @property
    def vision_depth(self) -> int:
        return len(self.vision)

    @property
    def n_ctx_text(self) -> int:
        return self.text[0].shape[0] if self.text else 0

    @property
    def n_ctx_vision(self) -> int:
        return self.vision[0].shape[0] if self.vision else 0


def _openai_name(key: str) -> str | None:
    """The OpenAI CLIP name of a frozen tensor of the authors' CustomCLIP, or None if not CLIP's."""
    if key.startswith("image_encoder."):
        return "visual." + key[len("image_encoder."):]
    if key.startswith("text_encoder."):
        return key[len("text_encoder."):]
    if key == "logit_scale":
        return key
    return None


def parse_prompts(state: dict[str, Tensor], source: str = "<checkpoint>") -> DasslPrompts:
    """Split an authors' state dict into prompts by layer, the logit scale and the frozen CLIP tensors."""
    prompts = DasslPrompts()
    for key, value in state.items():
        if key == TEXT_CTX:
            prompts.text[0] = value
        elif key == VISION_CTX:
            prompts.vision[0] = value
        elif m := _DEEP.match(key):
            (prompts.text if m.group(1) == "text_encoder" else prompts.vision)[int(m.group(2))] = value
        elif key.startswith(DROPPED_PREFIXES):
            continue
        elif (name := _openai_name(key)) is not None:
            prompts.frozen[name] = value
    if 0 not in prompts.text:
        found = sorted(k for k in state if "prompt" in k or "VPT" in k)[:6]
        raise ValueError(f"{source}: no {TEXT_CTX!r} in the state dict; this is not an IVLP/PromptSRC teacher "
                         f"checkpoint (prompt-like keys found: {found or 'none'})")
    for tower, layers in (("text", prompts.text), ("vision", prompts.vision)):
        if layers and sorted(layers) != list(range(len(layers))):
            raise ValueError(f"{source}: {tower} prompts at layers {sorted(layers)} are not contiguous from 0 "
                             f"(the input prompt {'prompt_learner.ctx' if tower == 'text' else VISION_CTX} and "
                             "VPT_shallow of blocks 1..depth-1 are expected)")
        shapes = {tuple(t.shape) for t in layers.values()}
        if len(shapes) > 1:
            raise ValueError(f"{source}: {tower} prompt tensors differ in shape across layers: {sorted(shapes)}")
        if any(t.ndim != 2 for t in layers.values()):
            raise ValueError(f"{source}: {tower} prompts must be [n_ctx, width], got {sorted(shapes)}")
    _check_depth_against_frozen(state, source)
    if "logit_scale" in state:
        prompts.logit_scale = float(state["logit_scale"].float().exp())
    return prompts


_FROZEN_BLOCK = re.compile(r"^(text_encoder|image_encoder)\.transformer\.resblocks\.(\d+)\.(?!VPT_shallow$)")


def _check_depth_against_frozen(state: dict[str, Tensor], source: str) -> None:
    """Refuse a deep prompt at a block the checkpoint's own CLIP does not have, naming its key.

    The frozen transformer blocks stored beside the prompts give each tower's depth; a checkpoint
    without them is checked later, against the CLIP weights it is combined with."""
    layers: dict[str, set[int]] = {"text_encoder": set(), "image_encoder": set()}
    for key in state:
        if m := _FROZEN_BLOCK.match(key):
            layers[m.group(1)].add(int(m.group(2)))
    for key in sorted(state):
        m = _DEEP.match(key)
        if m and layers[m.group(1)] and int(m.group(2)) > max(layers[m.group(1)]):
            tower = "text" if m.group(1) == "text_encoder" else "vision"
            n = max(layers[m.group(1)]) + 1
            raise ValueError(f"{source}: {key}: a prompt for layer {m.group(2)}, but the checkpoint's {tower} "
                             f"transformer has {n} layers (0..{n - 1}); the prompt depth exceeds the model's depth")


def read_dassl_teacher(path: str | Path, trust_checkpoint: bool = False) -> DasslPrompts:
    """Load an authors' teacher checkpoint (file or run folder) and return its prompts."""
    file = find_checkpoint(path)
    state, info = extract_state_dict(load_checkpoint_file(file, trust_checkpoint), str(file))
    prompts = parse_prompts(state, str(file))
    prompts.info = {**info, "source": str(file)}
    return prompts
