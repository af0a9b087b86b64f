"""Stage 2 of PromptKD: distil a frozen prompted teacher into a student's prompts, without labels.

For a batch of (augmented) images x, the SAME tensor goes to both models:

* teacher logits ``t = s_T * norm(teacher.encode_image(x)) @ W^T`` (no gradient, eval mode);
* student logits ``s = s_S * norm(student(x)) @ W^T``;

where ``W`` are the class vectors stored once by the teacher's prompted text tower
(:class:`~promptkd.store.ClassVectorStore`, a fixed buffer here, never recomputed) and ``s_T``, ``s_S``
are each backbone's frozen logit scale. The loss is

    T^2 * KL(softmax(t / T) || softmax(s / T))

with the authors' weighting (``weighting="authors"``, their code): the KL summed over batch and classes,
divided by ``B * N`` (B images, N classes), times ``kd_weight`` (1000; 200 for FGVCAircraft, Flowers102
and DTD). The effective weight of the per-image KL is therefore ``kd_weight / N``, so the loss scale
depends on the number of classes. ``weighting="batchmean"`` is the textbook form: the sum divided by B
(times ``kd_weight``; use ``kd_weight=1`` for the plain KL).

Only ``batch["image"]`` is ever read (and ``batch["teacher_features"]`` when a teacher cache supplies
it): the unlabelled stream has no label key, and a label present in a batch cannot change anything
(tests permute labels to prove it).

Teacher cache (``promptkd.methods.teacher_cache``): when a batch carries ``"teacher_features"`` (the
teacher's L2-normalised image features of exactly these augmented images, stored ahead of the run),
the teacher logits are ``s_T * features @ W^T`` and the teacher does not run. The module can then be
built without a teacher (``teacher=None``, ``teacher_logit_scale=cache.logit_scale``), and
:func:`agreement_selector` takes the cached held-out features instead of running it.

Model selection (which epoch's student is kept):

* ``last``: the final epoch (honest default);
* ``agreement``: highest teacher-student top-1 agreement on a held-out share of the UNLABELLED images
  (no label is touched; those images are not trained on);
* ``val``: highest accuracy on labelled validation images (no test image);
* ``paper``: highest accuracy on the TEST set, which is what the authors' code does (Dassl's "best_val"
  with val = test): base classes in base-to-novel, the target's classes in cross-dataset and domain
  generalisation. It uses test labels; outputs say so: ``"best_base_test (paper; uses test labels)"``
  / ``"best_target_test (paper; uses test labels)"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from promptkd.engine import distributed as D

WEIGHTINGS = ("authors", "batchmean")
SELECTIONS = {
    "last": "last_epoch",
    "agreement": "best_teacher_agreement (held-out unlabelled images; no labels)",
    "val": "best_val (labelled validation images)",
    "paper": "best_base_test (paper; uses test labels)",
}


def distillation_loss(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0,
                      weighting: str = "authors", kd_weight: float = 1000.0) -> Tensor:
    """``kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T))``, reduced as the ``weighting`` says.

    ``authors``: sum over batch and classes / (B * N). ``batchmean``: sum / B. Computed in float32.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if teacher_logits.shape != student_logits.shape or teacher_logits.ndim != 2:
        raise ValueError(f"teacher and student logits must both be [B, N]; got {tuple(teacher_logits.shape)} "
                         f"and {tuple(student_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = teacher_logits.float() / temperature
    s = student_logits.float() / temperature
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="sum", log_target=True)
    denominator = t.numel() if weighting == "authors" else t.shape[0]
    return kd_weight * temperature**2 * kl / denominator


class DistillModule(nn.Module):
    """``forward(batch) -> {"loss", "kd", "agreement"}`` for the training loop (teacher frozen).

    ``selection``/``select_fn``: with ``agreement`` or ``paper``, ``select_fn(self) -> {"score": float, ...}``
    is called at every epoch end (see :func:`agreement_selector`, :func:`base_accuracy_selector`); the
    best epoch's student tensors are kept (and checkpointed) and loaded back when training ends.
    """

    def __init__(self, teacher, student, store, temperature: float = 1.0, kd_weight: float = 1000.0,
                 weighting: str = "authors", *, selection: str = "last",
                 select_fn: Callable[[DistillModule], dict] | None = None, selection_label: str | None = None,
                 teacher_logit_scale: float | None = None):
        super().__init__()
        if teacher is None and teacher_logit_scale is None:
            raise ValueError("without a teacher (a run from a teacher cache) the teacher's logit scale is needed: "
                             "pass teacher_logit_scale=cache.logit_scale")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {tuple(SELECTIONS)}, got {selection!r}")
        if selection != "last" and select_fn is None:
            raise ValueError(f"selection {selection!r} needs a select_fn (held-out images or the base test set)")
        student_dim = getattr(student, "embed_dim", store.dim)
        if student_dim != store.dim:
            raise ValueError(f"the student projects to {student_dim} dimensions but the class vectors have "
                             f"{store.dim}: the projector must map into the teacher's space")
        if not student.trainable_parameters():
            raise ValueError("the student has no trainable parameters (prompt depth 0 and no projector?)")
        self.teacher = teacher.requires_grad_(False).eval() if teacher is not None else None
        self.student = student
        if teacher is not None and teacher_logit_scale is not None and \
                float(teacher.logit_scale()) != float(teacher_logit_scale):
            raise ValueError(f"teacher_logit_scale {teacher_logit_scale} is not the teacher's logit scale "
                             f"{float(teacher.logit_scale())}: the cache comes from another teacher")
        scale = float(teacher.logit_scale()) if teacher_logit_scale is None else float(teacher_logit_scale)
        # s_T for cached features, as the float32 value the teacher's own logit_scale() returns
        self.register_buffer("teacher_scale", torch.tensor(scale, dtype=torch.float32), persistent=False)
        self.class_names = list(store.class_names)
        self.store_fingerprint = store.fingerprint()
        # a fixed tensor: moves with the module, never recomputed, not part of the learnt state
        self.register_buffer("class_vectors", store.vectors.detach().float().clone(), persistent=False)
        self.temperature, self.kd_weight, self.weighting = float(temperature), float(kd_weight), weighting
        self.selection, self.select_fn = selection, select_fn
        self._selection_label = selection_label or SELECTIONS[selection]
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, Tensor] | None = None

    @property
    def selection_label(self) -> str:
        return self._selection_label

    def train(self, mode: bool = True):  # type: ignore[override]
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: dropout off, statistics fixed, whatever the loop asks
        return self

    # -- logits ---------------------------------------------------------------------------------------
    def _head(self, features: Tensor, scale: Tensor | float, vectors: Tensor | None = None) -> Tensor:
        w = self.class_vectors if vectors is None else vectors
        with torch.autocast(device_type=features.device.type, enabled=False):
            return torch.as_tensor(scale, device=features.device).float() * F.normalize(features.float(), dim=-1) @ w.t()

    @torch.no_grad()
    def teacher_logits(self, images: Tensor, vectors: Tensor | None = None) -> Tensor:
        if self.teacher is None:
            raise ValueError("this DistillModule has no teacher (a teacher-cache run): batches must carry "
                             "'teacher_features' (promptkd.methods.teacher_cache.CachedTeacherImages)")
        return self._head(self.teacher.encode_image(images, prompted=True), self.teacher.logit_scale(), vectors)

    @torch.no_grad()
    def cached_teacher_logits(self, features: Tensor, vectors: Tensor | None = None) -> Tensor:
        """Teacher logits from cached, already normalised features: ``s_T * f @ W^T`` in float32 (the same
        operations as :meth:`teacher_logits` after its normalisation, so an fp32 cache gives equal logits)."""
        w = self.class_vectors if vectors is None else vectors
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.teacher_scale.to(features.device) * features.float() @ w.t()

    def student_logits(self, images: Tensor, vectors: Tensor | None = None) -> Tensor:
        return self._head(self.student(images), self.student.logit_scale(), vectors)

    def forward(self, batch: dict) -> dict:
        images = batch["image"]  # with "teacher_features", the only keys read: labels cannot reach the loss
        if "teacher_features" in batch:
            t = self.cached_teacher_logits(batch["teacher_features"].to(images.device))
        else:
            t = self.teacher_logits(images)
        s = self.student_logits(images)
        with torch.autocast(device_type=images.device.type, enabled=False):
            loss = distillation_loss(t, s, self.temperature, self.weighting, self.kd_weight)
        agreement = (t.argmax(-1) == s.argmax(-1)).float().mean() * 100
        return {"loss": loss, "kd": loss.detach(), "agreement": agreement.detach()}

    # -- model selection through the loop's hooks -----------------------------------------------------
    def on_epoch_end(self, epoch: int) -> dict:
        if self.selection == "last" or self.select_fn is None:
            return {}
        result = dict(self.select_fn(self))
        score = float(result.pop("score"))
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_epoch = score, epoch
            self.best_state = self.student.adapter_state_dict()
        return {"select_score": score, **{f"select_{k}": v for k, v in result.items()},
                "best_epoch": self.best_epoch + 1}

    def on_train_end(self) -> None:
        if self.selection != "last" and self.best_state is not None:
            self.student.load_adapter_state_dict(self.best_state, source=f"best epoch {self.best_epoch + 1}")

    def state_dict_extra(self) -> dict:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "best_state": self.best_state}

    def load_state_dict_extra(self, state: dict) -> None:
        self.best_score, self.best_epoch = state.get("best_score"), state.get("best_epoch")
        self.best_state = state.get("best_state")

    def selection_record(self) -> dict:
        """What went into the artefact: the rule, and the epoch (1-based) it picked."""
        return {"selection": self.selection_label, "selected_epoch": None if self.best_epoch is None
                else self.best_epoch + 1, "selection_score": self.best_score}


# -- selection functions -------------------------------------------------------------------------------


def _sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    return D.all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def agreement_selector(loader: Iterable[dict], teacher_features: Tensor | None = None
                       ) -> Callable[[DistillModule], dict]:
    """Teacher-student top-1 agreement (%) over a loader of held-out unlabelled images (uses ``image`` only).

    The loader must be deterministic (test preprocessing): the frozen teacher's predictions are computed
    in the first call and reused, keyed by ``batch["index"]`` when present, so later epochs only run the
    student. ``teacher_features`` ([H, D], normalised, row = ``batch["index"]``; a teacher cache's
    ``heldout_features()``) replaces the teacher entirely. In distributed runs give each rank its shard
    (counts are summed over ranks)."""
    teacher_top1: dict[int, int] = {}
    if teacher_features is not None:
        teacher_features = teacher_features.detach().float()

    @torch.no_grad()
    def select(module: DistillModule) -> dict:
        was_training = module.training
        module.eval()
        device = module.class_vectors.device
        same = total = 0.0
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            keys = batch["index"].tolist() if "index" in batch else None
            if keys is not None and all(k in teacher_top1 for k in keys):
                teacher = torch.tensor([teacher_top1[k] for k in keys], device=device)
            elif teacher_features is not None:
                if keys is None:
                    raise ValueError("cached held-out teacher features need batches with an 'index' key")
                rows = teacher_features[keys]
                if not torch.isfinite(rows).all():
                    raise ValueError("the teacher cache holds no held-out features for some of these images "
                                     "(another held-out set?)")
                teacher = module.cached_teacher_logits(rows.to(device)).argmax(-1)
                teacher_top1.update(zip(keys, teacher.tolist()))
            else:
                teacher = module.teacher_logits(images).argmax(-1)
                if keys is not None:
                    teacher_top1.update(zip(keys, teacher.tolist()))
            same += float((teacher == module.student_logits(images).argmax(-1)).sum())
            total += images.shape[0]
        module.train(was_training)
        same, total = _sum_over_ranks([same, total], device)
        return {"score": 100.0 * same / max(total, 1.0), "images": total}

    return select


def labelled_accuracy_selector(loader: Iterable[dict], rows: Sequence[int] | None = None
                               ) -> Callable[[DistillModule], dict]:
    """Student accuracy (%) on labelled images, logits over the class vectors ``rows`` (all when None);
    label ``k`` means store row ``rows[k]``. The ``val`` rule (validation images) and the authors' ``paper``
    rule (test images: the base classes in base-to-novel, the target's classes otherwise) use it."""

    @torch.no_grad()
    def select(module: DistillModule) -> dict:
        was_training = module.training
        module.eval()
        device = module.class_vectors.device
        vectors = module.class_vectors if rows is None else module.class_vectors[list(rows)]
        correct = total = 0.0
        for batch in loader:
            images, labels = batch["image"].to(device), batch["label"].to(device)
            correct += float((module.student_logits(images, vectors).argmax(-1) == labels).sum())
            total += images.shape[0]
        module.train(was_training)
        correct, total = _sum_over_ranks([correct, total], device)
        return {"score": 100.0 * correct / max(total, 1.0), "images": total}

    return select


def base_accuracy_selector(loader: Iterable[dict], num_classes: int | None = None) -> Callable[[DistillModule], dict]:
    """The authors' base-to-novel rule: accuracy on base-class test images (labels 0..B-1) over the base
    class vectors, the first ``ceil(N/2)`` rows of the store (``num_classes`` overrides B)."""

    def select(module: DistillModule) -> dict:
        n_base = num_classes or math.ceil(module.class_vectors.shape[0] / 2)
        return labelled_accuracy_selector(loader, range(n_base))(module)

    return select
