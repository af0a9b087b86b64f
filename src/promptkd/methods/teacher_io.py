"""Building, loading and converting teachers; their class vectors.

A teacher is CLIP weights + a prompt file. Everything that makes or reads one goes through here:

* :func:`build_teacher` - frozen CLIP with fresh IVLP/CoOp prompts (for training or zero-shot use);
* :func:`load_teacher` - a teacher artefact folder (``adapter.json`` + ``adapter.safetensors``), or an
  authors' Dassl checkpoint converted on the fly (needs the CLIP weights, and the opt-in to unpickle);
* :func:`convert_dassl_teacher` - an authors' checkpoint -> our artefact, checked against the CLIP weights;
* :func:`compute_class_vectors` / :func:`load_class_vectors` - the class-vector store and its class check.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from promptkd.config import spec
from promptkd.methods import dassl_import
from promptkd.store import ClassVectorStore, build_store, duplicate_names


@dataclass
class TeacherPrompts:
    """The ``teacher`` section: IVLP as in the paper's teacher, 4 text + 4 vision tokens, deep up to layer 9
    (the keys of :class:`promptkd.models.prompts.PromptConfig`)."""

    n_ctx_text: int = spec(4, ge=0, help="learnable text context tokens")
    text_depth: int = spec(9, ge=0, help="text layers with their own prompt tokens (1: shallow)")
    ctx_init: str | None = spec("a photo of a", help="words whose embeddings initialise the text context")
    n_ctx_vision: int = spec(4, ge=0, help="learnable vision prompt tokens")
    vision_depth: int = spec(9, ge=0, help="vision layers with their own prompt tokens (0: none)")


PROMPT_DEFAULTS = asdict(TeacherPrompts())


def prompt_settings_for_method(method: str, teacher_cfg: dict) -> dict:
    """The prompt settings a method implies: CoOp = text context only, shallow (depth 1, no vision)."""
    unknown = sorted(set(teacher_cfg) - set(PROMPT_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown teacher prompt setting(s) {unknown}; known: {sorted(PROMPT_DEFAULTS)}")
    cfg = {**PROMPT_DEFAULTS, **teacher_cfg}
    for key in ("n_ctx_text", "text_depth", "n_ctx_vision", "vision_depth"):
        if not isinstance(cfg[key], int) or cfg[key] < 0:
            raise ValueError(f"teacher.{key} must be a non-negative integer, got {cfg[key]!r}")
    if method == "coop":
        cfg.update(text_depth=1, vision_depth=0)
    if cfg["text_depth"] < 1 or cfg["n_ctx_text"] < 1:
        raise ValueError(f"{method}: the text context needs text_depth >= 1 and n_ctx_text >= 1 "
                         f"(got {cfg['text_depth']}, {cfg['n_ctx_text']})")
    if cfg["vision_depth"] > 0 and cfg["n_ctx_vision"] < 1:
        raise ValueError("teacher.n_ctx_vision must be >= 1 when vision_depth > 0")
    return cfg


def build_teacher(weights: str | Path, prompt_cfg: dict | None = None, *, trust_checkpoint: bool = False,
                  device: str | torch.device | None = None, prompt_seed: int | None = None, **load_options):
    """Frozen CLIP from ``weights`` with fresh prompts (text context initialised from ``ctx_init``, the
    other prompts drawn from ``prompt_seed``)."""
    from promptkd.models.clip_backbones import load_clip_teacher
    from promptkd.models.prompts import PromptConfig

    prompts = PromptConfig.from_dict({**PROMPT_DEFAULTS, **(prompt_cfg or {})})
    # the absolute path is recorded in the identity, so the artefact loads from any working directory
    # (absolute without following links: a hub-cache file's config is beside the link, not its blob)
    return load_clip_teacher(os.path.abspath(Path(weights).expanduser()), prompts, trust_checkpoint=trust_checkpoint,
                             device=device, prompt_seed=prompt_seed, **load_options)


def _is_artefact(path: Path) -> bool:
    from promptkd import artifacts

    if path.is_dir():
        return (path / artifacts.META).is_file()
    return path.name in (artifacts.META, artifacts.TENSORS)


def load_teacher(path: str | Path, weights: str | Path | None = None, trust_checkpoint: bool = False):
    """``(teacher, meta)`` from a teacher artefact folder, or from an authors' Dassl checkpoint.

    ``weights`` replaces the CLIP weights path recorded in the artefact (its checksum is still checked
    by the backbone builder); a Dassl checkpoint needs it. The teacher comes back frozen, in eval mode."""
    from promptkd import artifacts

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"teacher not found: {p}")
    if _is_artefact(p):
        options: dict = {"trust_checkpoint": trust_checkpoint}
        if weights:
            options["weights"] = str(weights)
        teacher, meta = artifacts.load_adapter(p, role="teacher", **options)
    else:
        if not weights:
            raise ValueError(f"{p}: not a promptkd teacher artefact; to read it as an authors' Dassl checkpoint "
                             "give the CLIP weights it was trained from (--clip-weights; for distill, --teacher-weights)")
        teacher, meta = teacher_from_dassl(p, weights, trust_checkpoint=trust_checkpoint)
    teacher.requires_grad_(False)
    return teacher.eval(), meta


# --- the authors' checkpoints --------------------------------------------------------------------------


def dassl_prompt_config(prompts: dassl_import.DasslPrompts) -> dict:
    """Our prompt settings for the prompts found in an authors' checkpoint."""
    return {"n_ctx_text": prompts.n_ctx_text, "text_depth": prompts.text_depth,
            "ctx_init": PROMPT_DEFAULTS["ctx_init"],  # overwritten by the loaded prompts; kept for the record
            "n_ctx_vision": prompts.n_ctx_vision, "vision_depth": prompts.vision_depth}


def teacher_from_dassl(src: str | Path, weights: str | Path, *, trust_checkpoint: bool = False,
                       trust_weights: bool | None = None):
    """An authors' Dassl teacher checkpoint + the CLIP weights -> (our teacher with its prompts, meta)."""
    prompts = dassl_import.read_dassl_teacher(src, trust_checkpoint=trust_checkpoint)
    cfg = dassl_prompt_config(prompts)
    teacher = build_teacher(weights, cfg, trust_checkpoint=trust_checkpoint if trust_weights is None else trust_weights)
    apply_dassl_prompts(teacher, prompts, str(prompts.info.get("source", src)))
    meta = {"source": "dassl", "dassl": prompts.info, "prompt_config": cfg}
    return teacher, meta


def apply_dassl_prompts(teacher, prompts: dassl_import.DasslPrompts, source: str = "<checkpoint>") -> None:
    """Check the checkpoint's frozen CLIP against the teacher's, then copy its prompts in."""
    check_frozen_weights(teacher.clip.state_dict(), prompts.frozen, source)
    set_layer_prompts(teacher, prompts.text, prompts.vision, source)


def check_frozen_weights(ours: dict[str, Tensor], theirs: dict[str, Tensor], source: str,
                         rtol: float = 2e-3, atol: float = 1e-5) -> None:
    """Refuse CLIP weights that differ from the frozen CLIP tensors stored in the authors' checkpoint.

    The authors keep CLIP in fp16 (their ``convert_weights``), so equality is up to fp16 rounding
    (relative 2^-11). A shape difference means another architecture (e.g. ViT-B/16 for a ViT-L/14 teacher)."""
    common = sorted(set(ours) & set(theirs))
    if theirs and not common:
        raise ValueError(f"{source}: none of the checkpoint's frozen CLIP tensors match the CLIP weights' names")
    for key in common:
        a, b = ours[key].detach().float().cpu(), theirs[key].detach().float().cpu()
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"{source}: {key} has shape {tuple(b.shape)} in the checkpoint but {tuple(a.shape)} "
                             "in the CLIP weights: the teacher was trained from another CLIP architecture")
        if not torch.allclose(a, b, rtol=rtol, atol=atol):
            diff = (a - b).abs().max().item()
            raise ValueError(f"{source}: {key} differs from the CLIP weights (max |diff| {diff:.3g}): "
                             "the teacher was trained from other CLIP weights")


def layer_prompt_parameters(teacher) -> dict[str, dict[int, Tensor]]:
    """``{"text": {layer: view}, "vision": {layer: view}}`` into the teacher's prompt parameters."""
    out: dict[str, dict[int, Tensor]] = {"text": {}, "vision": {}}
    for tower, module in (("text", teacher.text_prompts), ("vision", teacher.vision_prompts)):
        if module is not None:
            out[tower] = {i: module.ctx[i] for i in range(module.ctx.shape[0])}
    return out


def set_layer_prompts(teacher, text: dict[int, Tensor], vision: dict[int, Tensor], source: str = "<prompts>") -> None:
    """Copy per-layer prompts (layer 0 = input prompts) into the teacher, checking depths and shapes."""
    params = layer_prompt_parameters(teacher)
    for tower, given in (("text", text), ("vision", vision)):
        own = params[tower]
        if sorted(own) != sorted(given):
            raise ValueError(f"{source}: {tower} prompts for layers {sorted(given)} but the teacher has "
                             f"{sorted(own)}")
        for layer, value in given.items():
            target = own[layer]
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(f"{source}: {tower} prompt of layer {layer} has shape {tuple(value.shape)}, "
                                 f"the teacher expects {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(value.to(dtype=target.dtype, device=target.device))


def convert_dassl_teacher(src: str | Path, weights: str | Path, out_dir: str | Path, *,
                          trust_checkpoint: bool = False, class_names: Sequence[str] | None = None) -> Path:
    """Write an authors' checkpoint as our teacher artefact (prompts only + JSON)."""
    from promptkd import artifacts

    teacher, meta = teacher_from_dassl(src, weights, trust_checkpoint=trust_checkpoint)
    source = meta["dassl"].get("source", str(src))
    converted_from = {**meta["dassl"], "sha256": artifacts.file_sha256(source)}
    config = {"stage": "teacher", "converted_from": converted_from, "teacher": meta["prompt_config"],
              "method": {"method": "promptsrc"}}
    # the authors' model-best.pth.tar is the epoch best on their "val" split (= the base test set in their
    # base-to-novel scripts); model.pth.tar-N is epoch N (20: the last, GPA-aggregated)
    name = Path(source).name
    selection = "authors_best_on_test" if name.startswith("model-best") else f"authors_{name}"
    return artifacts.save_adapter(teacher, out_dir, "teacher", class_names=list(class_names) if class_names else None,
                                  config=config, extra={"selection": selection})


AUTHORS_SELECTIONS = {"authors_best_on_test": "the authors' epoch best on the base test set, model-best.pth.tar"}


def conversion_summary(out: str | Path) -> str:
    """One line on a converted teacher: where it is, which file it came from and how that epoch was chosen."""
    from promptkd import artifacts
    from promptkd.fileio import read_json

    meta = read_json(Path(out) / artifacts.META, "teacher artefact")
    source = (meta.get("config") or {}).get("converted_from") or {}
    rule = meta.get("selection")
    return (f"wrote {out} from {source.get('source', '?')} (selection {rule}: "
            f"{AUTHORS_SELECTIONS.get(rule, 'the epoch that file holds')})")


# --- class vectors -------------------------------------------------------------------------------------


def compute_class_vectors(teacher, class_names: Sequence[str], batch_size: int = 256) -> ClassVectorStore:
    """The prompted teacher text tower, once, over every class name -> normalised store.

    A name may appear twice (ImageNet's CLIP-style list: "missile", "sunglasses"): labels are positions, so
    both classes keep their own row, which is the same vector, as in the authors' code; the store warns."""
    names = list(class_names)
    if not names:
        raise ValueError("no class names to encode")
    repeated = duplicate_names(names)
    if repeated:
        shown = "; ".join(f"{name!r} at labels {labels}" for name, labels in list(repeated.items())[:5])
        warnings.warn(f"{len(repeated)} class name(s) appear more than once ({shown}): each keeps its own row, "
                      "the same vector, so the model cannot tell those classes apart (as in the authors' code)",
                      stacklevel=2)
    return build_store(teacher, names, batch_size=batch_size)


def load_class_vectors(path: str | Path, class_names: Sequence[str]) -> ClassVectorStore:
    """A store, refused (naming the file and the first differences) unless it holds exactly these classes."""
    return ClassVectorStore.load(path, expect_classes=list(class_names))


def read_class_names(path: str | Path) -> list[str]:
    """One class name per line (blank lines and lines starting with '#' ignored), cleaned up exactly as the
    dataset route cleans folder / split-file names (:func:`promptkd.data.benchmarks.prompt_name`)."""
    from promptkd.data.benchmarks import prompt_name

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"class-name file not found: {p}")
    names = [prompt_name(ln) for ln in p.read_text(encoding="utf-8-sig").splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    if not names:
        raise ValueError(f"{p}: no class names (expected one per line)")
    return names
