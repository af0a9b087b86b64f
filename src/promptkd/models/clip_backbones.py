"""CLIP as PromptKD's teacher and student (the interface of ``promptkd.models.backbones``).

* :class:`ClipTeacher`: frozen CLIP + IVLP prompts (text context initialised from "a photo of a" and
  vision tokens, deep up to depth 9 by default). Only the prompts are trainable.
* :class:`ClipStudent`: frozen CLIP image tower (the text tower is never built) + VPT-deep vision prompts
  + a projector into the teacher's embedding space. Trainable: prompts and projector.

Both register builders under kind ``"clip"`` so an artefact can rebuild them from ``identity()``.
Builder options: ``weights=`` (override the recorded path), ``trust_checkpoint=``, ``state_dict=`` (a full
state dict of the backbone, e.g. from an exported bundle: then no weights file is read), ``dtype=``.

The identity records the resolved architecture (heads, activation, normalisation), so a rebuild never
needs ``--arch`` again. ``trust_checkpoint`` covers only a ``weights=`` file the caller names: the path
written inside an artefact is never unpickled, whoever wrote the artefact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from promptkd.models import backbones
from promptkd.models.backbones import IdentityError, ImageSpec, Student, Teacher
from promptkd.models.clip import CLIP, CLIPConfig, random_clip, tiny_clip, tiny_clip_config, tiny_clip_state_dict
from promptkd.models.clip_archs import ArchLike
from promptkd.models.projector import PROJECTORS, build_projector
from promptkd.models.prompts import PromptConfig, TextPrompts, VisionPrompts, check_depth

FROZEN_TEMPLATE = "a photo of a {}."
STUDENT_PROMPTS = PromptConfig(n_ctx_text=0, text_depth=0, ctx_init=None, n_ctx_vision=4, vision_depth=9)


def tensors_sha256(state: dict[str, Tensor]) -> str:
    """Format-independent checksum of a state dict: names, shapes and float32 values, sorted by name.

    The same weights give the same checksum whether they come from OpenAI's .pt, a safetensors copy or
    a Hugging Face folder (all are renamed to OpenAI names before this is computed)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}:{tuple(t.shape)};".encode())
        h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


def _image_spec(cfg: CLIPConfig) -> ImageSpec:
    return ImageSpec(size=cfg.vision.image_size, mean=cfg.mean, std=cfg.std)


class _ClipBackbone:
    """Bookkeeping shared by teacher and student: where the frozen weights came from."""

    clip: CLIP
    weights: str | None
    weights_sha256: str
    random_init_seed: int | None

    def _weights_identity(self) -> dict:
        out = {"kind": "clip", "arch": self.clip.cfg.to_dict(), "weights": self.weights,
               "sha256": self.weights_sha256}
        if self.random_init_seed is not None:
            out["random_init_seed"] = self.random_init_seed
        return out


class ClipTeacher(_ClipBackbone, Teacher):
    """Frozen CLIP with IVLP text + vision prompts (the PromptSRC / PromptKD teacher)."""

    def __init__(self, clip: CLIP, prompts: PromptConfig | dict | None = None, tokenizer=None,
                 weights: str | None = None, weights_sha256: str | None = None,
                 random_init_seed: int | None = None, prompt_seed: int | None = None) -> None:
        super().__init__()
        if not clip.has_text:
            raise ValueError("a CLIP teacher needs the text tower; this CLIP was built image-only")
        self.clip = clip.requires_grad_(False).eval()
        self.prompt_cfg = PromptConfig.from_dict(prompts)
        self.weights = str(weights) if weights is not None else None
        self.weights_sha256 = weights_sha256 or tensors_sha256(clip.state_dict())
        self.random_init_seed = random_init_seed
        self._tokenizer = tokenizer
        self._name_tokens: tuple[tuple[str, ...], Tensor] | None = None  # last class list -> token ids
        cfg = clip.cfg
        self.embed_dim = cfg.embed_dim
        self.image_spec = _image_spec(cfg)
        gen = torch.Generator().manual_seed(prompt_seed) if prompt_seed is not None else None
        p = self.prompt_cfg
        self.text_prompts: TextPrompts | None = None
        self.vision_prompts: VisionPrompts | None = None
        if p.text_enabled:
            check_depth(p.text_depth, cfg.text.layers, "text", "teacher.text_depth")
            self.text_prompts = TextPrompts(p.n_ctx_text, p.text_depth, cfg.text.width, generator=gen)
            if p.ctx_init:
                self.text_prompts.init_from(self._word_embeddings(p.ctx_init))
        if p.vision_enabled:
            check_depth(p.vision_depth, cfg.vision.layers, "vision", "teacher.vision_depth")
            self.vision_prompts = VisionPrompts(p.n_ctx_vision, p.vision_depth, cfg.vision.width, generator=gen)
        dev = clip.logit_scale.device
        self.to(dev)

    # -- tokens ------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from promptkd.models.tokenizer import default_tokenizer

            self._tokenizer = default_tokenizer()
        tok = self._tokenizer
        if tok.vocab_size > self.clip.cfg.text.vocab_size:
            raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the CLIP text tower only "
                             f"{self.clip.cfg.text.vocab_size} embeddings")
        return tok

    @property
    def context_length(self) -> int:
        return self.clip.cfg.text.context_length

    def _word_embeddings(self, phrase: str) -> Tensor:
        ids = torch.tensor(self.tokenizer.encode(phrase), device=self.clip.logit_scale.device)
        with torch.no_grad():
            return self.clip.token_embedding(ids).float().cpu()

    def class_name_tokens(self, class_names: Sequence[str]) -> Tensor:
        """[N, L] ids of "SOS X..X {name}. EOT" (n_ctx placeholders, whose embeddings get replaced).

        A name too long for the context is cut, EOT kept last. The ids of the last class list are kept,
        since training steps encode the same names again and again."""
        key = tuple(class_names)
        if self._name_tokens is not None and self._name_tokens[0] == key:
            return self._name_tokens[1]
        tok, n, length = self.tokenizer, self.prompt_cfg.n_ctx_text, self.context_length
        placeholder = tok.encode("X")[0]
        out = torch.zeros(len(class_names), length, dtype=torch.long)
        for row, name in enumerate(class_names):
            body = tok.encode(f"{name}.")[: max(0, length - 2 - n)]
            ids = [tok.sot_id, *([placeholder] * n), *body, tok.eot_id]
            out[row, : len(ids)] = torch.tensor(ids)
        self._name_tokens = (key, out)
        return out

    # -- the Teacher interface ---------------------------------------------------------------------

    def encode_image(self, images: Tensor, prompted: bool = True) -> Tensor:
        images = images.to(self.clip.logit_scale.device)
        return self.clip.encode_image(images, prompts=self.vision_prompts if prompted else None)

    def encode_class_names(self, class_names: Sequence[str], prompted: bool = True) -> Tensor:
        if not class_names:
            raise ValueError("encode_class_names needs at least one class name")
        if not prompted or self.text_prompts is None:
            return self.encode_text([FROZEN_TEMPLATE.format(name) for name in class_names])
        tokens = _trim_after_eot(self.class_name_tokens(class_names)).to(self.clip.logit_scale.device)
        return self.clip.encode_text(tokens, prompts=self.text_prompts)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        tokens = _trim_after_eot(self.tokenizer(list(texts), context_length=self.context_length))
        return self.clip.encode_text(tokens.to(self.clip.logit_scale.device))

    def logit_scale(self) -> Tensor:
        return self.clip.logit_scale.detach().float().exp()

    def identity(self) -> dict:
        return {**self._weights_identity(), "role": "teacher", "prompts": self.prompt_cfg.to_dict()}


class ClipStudent(_ClipBackbone, Student):
    """Frozen CLIP image tower + VPT-deep prompts + projector to the teacher's embedding dimension."""

    def __init__(self, clip: CLIP, teacher_dim: int, prompts: PromptConfig | dict | None = None,
                 projector: str = "mlp", weights: str | None = None, weights_sha256: str | None = None,
                 random_init_seed: int | None = None, prompt_seed: int | None = None) -> None:
        super().__init__()
        if projector not in PROJECTORS:
            raise ValueError(f"unknown projector {projector!r}; expected one of {PROJECTORS}")
        if clip.has_text:
            clip = image_only(clip)
        self.clip = clip.requires_grad_(False).eval()
        p = PromptConfig.from_dict(prompts if prompts is not None else STUDENT_PROMPTS)
        self.prompt_cfg = replace(p, n_ctx_text=0, text_depth=0, ctx_init=None)  # image tower only
        self.projector_kind = projector
        self.weights = str(weights) if weights is not None else None
        self.weights_sha256 = weights_sha256 or tensors_sha256(clip.state_dict())
        self.random_init_seed = random_init_seed
        cfg = clip.cfg
        self.embed_dim = teacher_dim
        self.image_spec = _image_spec(cfg)
        gen = torch.Generator().manual_seed(prompt_seed) if prompt_seed is not None else None
        self.vision_prompts: VisionPrompts | None = None
        if self.prompt_cfg.vision_enabled:
            check_depth(self.prompt_cfg.vision_depth, cfg.vision.layers, "vision", "student.depth")
            self.vision_prompts = VisionPrompts(self.prompt_cfg.n_ctx_vision, self.prompt_cfg.vision_depth,
                                                cfg.vision.width, generator=gen)
        self.projector = build_projector(projector, cfg.embed_dim, teacher_dim)
        self.to(clip.logit_scale.device)

    def image_features(self, images: Tensor) -> Tensor:
        """The student's own (unprojected) CLIP image features [B, student embed dim]."""
        return self.clip.encode_image(images.to(self.clip.logit_scale.device), prompts=self.vision_prompts)

    def forward(self, images: Tensor) -> Tensor:
        return self.projector(self.image_features(images).float())

    def logit_scale(self) -> Tensor:
        return self.clip.logit_scale.detach().float().exp()

    def identity(self) -> dict:
        return {**self._weights_identity(), "role": "student", "prompts": self.prompt_cfg.to_dict(),
                "projector": self.projector_kind, "teacher_dim": self.embed_dim}


def _trim_after_eot(tokens: Tensor) -> Tensor:
    """Drop the padding columns after the batch's last EOT.

    The text tower is causal, so the EOT output never sees later positions: cutting them changes
    nothing but rounding, and makes every text pass (each PromptSRC step runs all class names with
    gradients) several times cheaper than padding to 77 tokens."""
    last = int(tokens.argmax(dim=-1).max()) + 1
    return tokens[:, :last]


def image_only(clip: CLIP) -> CLIP:
    """A new CLIP holding only ``clip``'s image tower and logit scale (the text tower is dropped)."""
    out = CLIP(clip.cfg.image_only()).to(device=clip.logit_scale.device, dtype=clip.dtype)
    keep = {k: v for k, v in clip.state_dict().items() if k.startswith("visual.") or k == "logit_scale"}
    out.load_state_dict(keep, strict=True)
    return out.eval()


# --------------------------------------------------------------------------------------------------
# convenience constructors


def load_clip_teacher(path: str | Path, prompts: PromptConfig | dict | None = None, trust_checkpoint: bool = False,
                      device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                      tokenizer=None, prompt_seed: int | None = None, arch: ArchLike | None = None) -> ClipTeacher:
    """A teacher from a CLIP checkpoint (any format :func:`promptkd.models.weights.load_clip` reads).

    ``arch``: what the file cannot say (a known name such as ``ViT-H-14``, an open_clip config); the
    resolved architecture is recorded in the teacher's identity."""
    from promptkd.models.weights import load_clip

    loaded = load_clip(path, trust_checkpoint=trust_checkpoint, device=device, dtype=dtype, with_info=True, arch=arch)
    return ClipTeacher(loaded.model, prompts, tokenizer=tokenizer, weights=loaded.source, weights_sha256=loaded.sha256,
                       prompt_seed=prompt_seed)


def load_clip_student(path: str | Path, teacher_dim: int, prompts: PromptConfig | dict | None = None,
                      projector: str = "mlp", trust_checkpoint: bool = False,
                      device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                      prompt_seed: int | None = None, arch: ArchLike | None = None) -> ClipStudent:
    """A student from a CLIP checkpoint; only the image tower is kept (``arch`` as for the teacher)."""
    from promptkd.models.weights import load_clip

    loaded = load_clip(path, trust_checkpoint=trust_checkpoint, device=device, dtype=dtype, image_only=True,
                       with_info=True, arch=arch)
    return ClipStudent(loaded.model, teacher_dim, prompts, projector=projector, weights=loaded.source,
                       weights_sha256=loaded.sha256, prompt_seed=prompt_seed)


def tiny_clip_teacher(seed: int = 0, prompts: PromptConfig | dict | None = None, prompt_seed: int = 0,
                      tokenizer=None, **arch) -> ClipTeacher:
    """A random tiny CLIP teacher for tests (real 49408-token vocabulary, so the real tokenizer works).

    Deterministic for (seed, prompt_seed, arch); rebuildable from its identity without any file."""
    prompts = prompts if prompts is not None else PromptConfig(text_depth=min(2, arch.get("layers", 2)),
                                                               vision_depth=min(2, arch.get("layers", 2)))
    clip = random_clip(tiny_clip_config(**arch), seed)
    return ClipTeacher(clip, prompts, tokenizer=tokenizer, random_init_seed=seed, prompt_seed=prompt_seed)


def tiny_clip_student(seed: int = 0, teacher_dim: int = 64, prompts: PromptConfig | dict | None = None,
                      projector: str = "mlp", prompt_seed: int = 0, **arch) -> ClipStudent:
    """A random tiny CLIP student for tests (image tower only), rebuildable from its identity."""
    prompts = prompts if prompts is not None else replace(STUDENT_PROMPTS, vision_depth=min(2, arch.get("layers", 2)))
    clip = random_clip(tiny_clip_config(text=False, **arch), seed)
    return ClipStudent(clip, teacher_dim, prompts, projector=projector, random_init_seed=seed, prompt_seed=prompt_seed)


# --------------------------------------------------------------------------------------------------
# rebuilding from an identity (artefacts)


def check_identity_prompts(identity: dict) -> None:
    """Refuse prompt depths beyond the recorded architecture's layers, naming the identity key."""
    arch, prompts = identity.get("arch") or {}, identity.get("prompts") or {}
    for tower, depth_key in (("text", "text_depth"), ("vision", "vision_depth")):
        depth, layers = prompts.get(depth_key), (arch.get(tower) or {}).get("layers")
        if isinstance(depth, int) and isinstance(layers, int) and depth > layers:
            raise IdentityError(f"backbone.prompts.{depth_key} = {depth}: prompts for layers 0..{depth - 1}, but the "
                                f"CLIP {tower} tower (backbone.arch.{tower}.layers) has only {layers} layers")


def _recorded_weights_error(path: str) -> Exception:
    from promptkd.models.weights import UntrustedCheckpointError

    return UntrustedCheckpointError(
        f"{path}: the CLIP weights recorded in the artefact can only be read by unpickling them (a TorchScript "
        "archive or a pickle holding Python objects), and --trust-checkpoint covers only files named on the "
        "command line, never a path written inside an artefact. Convert the file once (promptkd convert "
        f"{path} OUT.safetensors --trust-checkpoint) and pass OUT.safetensors as the CLIP weights "
        "(--clip-weights; distill: --teacher-weights)")


def _frozen_clip(identity: dict, image_only_tower: bool, weights: str | None, trust_checkpoint: bool,
                 state_dict: dict | None, dtype: torch.dtype | None) -> tuple[CLIP, str | None, str, int | None]:
    check_identity_prompts(identity)
    cfg = CLIPConfig.from_dict(identity["arch"])
    if image_only_tower:
        cfg = cfg.image_only()
    recorded = identity.get("sha256")
    seed = identity.get("random_init_seed")
    if state_dict is not None:  # the caller loads every tensor itself (exported bundle)
        clip = CLIP(cfg)
        return (clip.to(dtype) if dtype else clip), identity.get("weights"), recorded or "", seed
    path = weights or identity.get("weights")
    if path:
        from promptkd.models.clip_archs import recorded_arch
        from promptkd.models.weights import UntrustedCheckpointError, load_clip

        # trust covers the file the caller named (weights=), never the path written in the artefact
        trusted = bool(trust_checkpoint and weights)
        try:
            loaded = load_clip(path, trust_checkpoint=trusted, dtype=dtype, image_only=image_only_tower,
                               with_info=True, arch=recorded_arch(cfg))
        except UntrustedCheckpointError:
            if weights:
                raise
            raise _recorded_weights_error(str(path)) from None
        if loaded.model.cfg != cfg:
            raise ValueError(f"{path}: the CLIP architecture in this file ({loaded.model.cfg}) differs from the "
                             f"one the artefact was trained with ({cfg})")
        if recorded and loaded.sha256 != recorded:
            raise ValueError(f"{path}: these CLIP weights (sha256 {loaded.sha256[:12]}...) are not the ones the "
                             f"artefact was trained with (sha256 {recorded[:12]}...)")
        return loaded.model, loaded.source, loaded.sha256, None
    if seed is not None:
        full = CLIPConfig.from_dict(identity["arch"])
        clip = random_clip(full, int(seed))
        if image_only_tower and clip.has_text:
            clip = image_only(clip)
        got = tensors_sha256(clip.state_dict())
        if recorded and got != recorded:
            raise ValueError(f"random CLIP (seed {seed}) does not reproduce the recorded weights checksum")
        return (clip.to(dtype) if dtype else clip), None, got, int(seed)
    raise ValueError("the artefact records no CLIP weights path; pass the CLIP checkpoint (weights=... / "
                     "--clip-weights)")


def build_teacher(identity: dict, weights: str | None = None, trust_checkpoint: bool = False,
                  state_dict: dict | None = None, dtype: torch.dtype | None = None, tokenizer=None,
                  **_: object) -> ClipTeacher:
    clip, path, sha, seed = _frozen_clip(identity, False, weights, trust_checkpoint, state_dict, dtype)
    return ClipTeacher(clip, identity.get("prompts"), tokenizer=tokenizer, weights=path, weights_sha256=sha or None,
                       random_init_seed=seed)


def build_student(identity: dict, weights: str | None = None, trust_checkpoint: bool = False,
                  state_dict: dict | None = None, dtype: torch.dtype | None = None, **_: object) -> ClipStudent:
    clip, path, sha, seed = _frozen_clip(identity, True, weights, trust_checkpoint, state_dict, dtype)
    return ClipStudent(clip, int(identity["teacher_dim"]), identity.get("prompts"),
                       projector=identity.get("projector", "mlp"), weights=path, weights_sha256=sha or None,
                       random_init_seed=seed)


backbones.register_builder("clip", "teacher", build_teacher)
backbones.register_builder("clip", "student", build_student)

__all__ = ["ClipTeacher", "ClipStudent", "load_clip_teacher", "load_clip_student", "tiny_clip_teacher",
           "tiny_clip_student", "tiny_clip", "tiny_clip_state_dict", "tiny_clip_config", "tensors_sha256",
           "image_only", "STUDENT_PROMPTS"]
