"""Stage 1: the teacher's prompt learning. PromptSRC, with plain IVLP and CoOp as options.

One module, three methods (``method``):

* ``promptsrc`` (the paper's teacher): IVLP prompts in both towers (deep, a fresh set of tokens per
  layer up to the prompt depth) trained with cross-entropy plus PromptSRC's self-regularisation:

  - ``L_image = IMAGE_LOSS_WEIGHT * mean|norm(f_img_prompted) - norm(f_img_frozen)|``
  - ``L_text  = TEXT_LOSS_WEIGHT  * mean|norm(f_txt_prompted) - norm(mean_t f_txt_frozen(template_t))|``
    (the frozen class features are the average of the UNnormalised frozen text features over the
    template ensemble, normalised afterwards; computed once, at construction)
  - ``L_logits = T^2 * KL(p_frozen || p_prompted) / (B * N)`` with the KL summed over the batch and
    classes, ``p = softmax(logits / T)``, frozen logits = ``scale * norm(f_img_frozen) @ norm(ensemble)^T``

  and Gaussian prompt aggregation (GPA): after each epoch ``e`` (1-based) the prompts are added to a
  running sum with weight ``w_e = N(e; mean, std) / sum_k N(k; mean, std)`` over the configured epochs;
  the sum replaces the prompts when training ends.
* ``ivlp``: the same prompts, cross-entropy only, no aggregation.
* ``coop``: learnable text context only (shallow, depth 1), no vision prompts, cross-entropy only.

The prompts themselves live in the teacher (``ClipTeacher`` and its prompt config); this module only
chooses what to train and how. Facts (weights 10/25/1, normalisations, KL direction and its ``/numel``
scaling, GPA weights) follow the authors' PromptSRC trainer and configs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from promptkd.config import spec
from promptkd.progress import progress_bar

METHODS = ("promptsrc", "ivlp", "coop")


@dataclass
class PromptSRCConfig:
    """Method settings (the optimisation settings belong to the training loop's config)."""

    method: str = spec("promptsrc", choices=METHODS, help="promptsrc (the paper's teacher), ivlp or coop")
    image_loss_weight: float = spec(10.0, ge=0, help="weight of the L1 between prompted and frozen image features")
    text_loss_weight: float = spec(25.0, ge=0, help="weight of the L1 between prompted and frozen text features")
    logits_loss_weight: float = spec(1.0, ge=0, help="weight of the KL between frozen and prompted logits")
    kl_temperature: float = spec(1.0, gt=0, le=100, help="temperature of that KL")
    gpa_mean: float = spec(15.0, help="mean epoch (1-based) of the Gaussian prompt aggregation")
    gpa_std: float = spec(1.0, gt=0, help="its standard deviation in epochs")
    epochs: int = spec(20, ge=1, help="epochs the GPA weights are spread over (a stage sets train.epochs)")
    templates: str | list[str] = spec("promptsrc", help="template ensemble of the frozen text features: a named "
                                      "set (promptsrc, coop, single, imagenet_select) or templates with '{}'")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.gpa_std <= 0:
            raise ValueError(f"gpa_std must be positive, got {self.gpa_std}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.kl_temperature <= 0:
            raise ValueError(f"kl_temperature must be positive, got {self.kl_temperature}")

    @property
    def regularised(self) -> bool:
        return self.method == "promptsrc"

    @property
    def uses_gpa(self) -> bool:
        return self.method == "promptsrc"

    @classmethod
    def from_dict(cls, data: dict | None) -> PromptSRCConfig:
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PromptSRC option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


# --- the losses, as plain functions (tested against float64 references) ------------------------------


def feature_l1(prompted: Tensor, frozen: Tensor) -> Tensor:
    """Mean absolute difference of L2-normalised features (PromptSRC's L_SCL-image / L_SCL-text)."""
    return F.l1_loss(F.normalize(prompted, dim=-1), F.normalize(frozen, dim=-1).to(prompted.dtype))


def logits_kl(prompted_logits: Tensor, frozen_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """T^2 * sum KL(softmax(frozen/T) || softmax(prompted/T)) / (B * N): PromptSRC's L_SCL-logits."""
    t = temperature
    log_p = F.log_softmax(prompted_logits / t, dim=-1)
    log_q = F.log_softmax(frozen_logits.to(prompted_logits.dtype) / t, dim=-1)
    kl = F.kl_div(log_p, log_q, reduction="sum", log_target=True)
    return kl * (t * t) / prompted_logits.numel()


def gaussian_epoch_weights(epochs: int, mean: float, std: float) -> list[float]:
    """GPA weights for epochs 1..E: a Gaussian density at each epoch, normalised to sum to 1.

    Computed in log space, so a mean far outside 1..E (e.g. a 2-epoch smoke run with mean 15) still
    gives finite weights that favour the epoch nearest the mean instead of 0/0."""
    logs = [-0.5 * ((e - mean) / std) ** 2 for e in range(1, epochs + 1)]
    top = max(logs)
    unnorm = [math.exp(v - top) for v in logs]
    total = sum(unnorm)
    return [u / total for u in unnorm]


def frozen_ensemble_text_features(teacher, class_names: Sequence[str], templates: Sequence[str],
                                  chunk: int = 256, progress: bool | None = None) -> Tensor:
    """Frozen text features averaged over templates (unnormalised mean, then L2-normalised) -> [N, D].

    This is PromptSRC's order of operations (its ``fixed_embeddings``); CLIP's zero-shot classifier
    (:mod:`promptkd.methods.zeroshot`) instead normalises each template's features before averaging.

    Runs ``len(templates) * len(class_names)`` texts through the frozen text tower once, in chunks
    (a progress bar when there are many, e.g. 60 templates x 1000 ImageNet classes)."""
    from promptkd.methods.templates import check_templates, fill

    templates = check_templates(templates)
    names = list(class_names)
    total: Tensor | None = None
    n_texts = len(templates) * len(names)
    show = progress if progress is not None else n_texts >= 4096
    bar = progress_bar(total=n_texts, desc="frozen text features (template ensemble)", unit="text", enabled=show,
                       leave=False)
    with torch.no_grad():
        for template in templates:
            parts = []
            for start in range(0, len(names), chunk):
                texts = [fill(template, name) for name in names[start:start + chunk]]
                parts.append(teacher.encode_text(texts).float())
                bar.update(len(texts))
            feats = torch.cat(parts)
            total = feats if total is None else total + feats
    bar.close()
    return F.normalize(total / len(templates), dim=-1)


def resolve_templates(spec: str | Sequence[str], dataset: str | None = None) -> list[str]:
    """A template list: a named set of :mod:`promptkd.methods.templates` (``promptsrc``: PromptSRC's 60
    templates, the default; ``coop``: the dataset's CoOp template; ...) or explicit templates with one ``{}``."""
    from promptkd.methods import templates as tmpl

    if isinstance(spec, str) and "{}" not in spec:
        return tmpl.template_set(spec, dataset)
    return tmpl.check_templates(spec)


# --- the module the training loop optimises ------------------------------------------------------------


class PromptSRCModule(nn.Module):
    """``forward(batch) -> {"loss", ...}`` for the training loop; GPA through the loop's hooks.

    ``teacher`` is a prompted :class:`~promptkd.models.backbones.Teacher` whose prompt parameters are the
    only ones with ``requires_grad`` (its prompt config decides IVLP vs CoOp prompts).
    """

    def __init__(self, teacher, class_names: Sequence[str], cfg: PromptSRCConfig | dict | None = None, *,
                 dataset: str | None = None, templates: Sequence[str] | None = None):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, PromptSRCConfig) else PromptSRCConfig.from_dict(cfg)
        self.teacher = teacher
        self.class_names = list(class_names)
        if not self.class_names:
            raise ValueError("PromptSRCModule needs at least one class name")
        if not teacher.trainable_parameters():
            raise ValueError("the teacher has no trainable prompt parameters (prompt depth 0?)")
        self.gpa_weights = gaussian_epoch_weights(self.cfg.epochs, self.cfg.gpa_mean, self.cfg.gpa_std)
        frozen_text = torch.empty(0)
        if self.cfg.regularised:
            self.templates = resolve_templates(templates if templates is not None else self.cfg.templates, dataset)
            was_training = teacher.training
            teacher.eval()
            frozen_text = frozen_ensemble_text_features(teacher, self.class_names, self.templates)
            teacher.train(was_training)
        else:
            self.templates = []
        # not persistent: recomputable from the frozen model, never part of an artefact or checkpoint
        self.register_buffer("frozen_text_features", frozen_text, persistent=False)
        self._gpa_sum: dict[str, Tensor] | None = None
        self._gpa_epochs: list[int] = []

    # -- training step -----------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        images, labels = batch["image"], batch["label"]
        teacher = self.teacher
        image_features = teacher.encode_image(images, prompted=True)
        text_features = teacher.encode_class_names(self.class_names, prompted=True)
        scale = teacher.logit_scale()
        logits = scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t()
        ce = F.cross_entropy(logits, labels)
        out = {"ce": ce.detach(), "acc": (logits.argmax(-1) == labels).float().mean().detach() * 100}
        loss = ce
        if self.cfg.regularised:
            with torch.no_grad():
                frozen_image = teacher.encode_image(images, prompted=False)
                frozen_text = self.frozen_text_features.to(device=logits.device)
                frozen_logits = scale * F.normalize(frozen_image.float(), dim=-1) @ frozen_text.t()
            l_image = self.cfg.image_loss_weight * feature_l1(image_features, frozen_image)
            l_text = self.cfg.text_loss_weight * feature_l1(text_features, frozen_text)
            l_logits = self.cfg.logits_loss_weight * logits_kl(logits, frozen_logits, self.cfg.kl_temperature)
            loss = loss + l_image + l_text + l_logits
            out.update(l_image=l_image.detach(), l_text=l_text.detach(), l_logits=l_logits.detach())
        out["loss"] = loss
        return out

    # -- Gaussian prompt aggregation (the loop's hooks) ----------------------------------------------------
    def _prompt_tensors(self) -> dict[str, Tensor]:
        return {name: p for name, p in self.teacher.named_parameters() if p.requires_grad}

    def on_epoch_end(self, epoch: int) -> dict:
        """Add this epoch's prompts (``epoch`` is 0-based) to the GPA sum with weight w_{epoch+1}."""
        if not self.cfg.uses_gpa:
            return {}
        if epoch in self._gpa_epochs:
            return {}  # already counted (e.g. the hook ran again after a resume at an epoch boundary)
        if not 0 <= epoch < self.cfg.epochs:
            raise ValueError(f"GPA: epoch {epoch} is outside the {self.cfg.epochs} configured epochs")
        weight = self.gpa_weights[epoch]
        with torch.no_grad():
            current = {k: v.detach().double().cpu() for k, v in self._prompt_tensors().items()}
            if self._gpa_sum is None:
                self._gpa_sum = {k: weight * v for k, v in current.items()}
            else:
                for k, v in current.items():
                    self._gpa_sum[k] += weight * v
        self._gpa_epochs.append(epoch)
        return {"gpa_weight": weight}

    def aggregated_prompts(self) -> dict[str, Tensor] | None:
        """The GPA prompts accumulated so far, renormalised over the epochs seen (None before any)."""
        if self._gpa_sum is None:
            return None
        seen = sum(self.gpa_weights[e] for e in self._gpa_epochs)
        return {k: v / seen for k, v in self._gpa_sum.items()}

    def on_train_end(self) -> None:
        """Replace the prompts by their Gaussian-weighted aggregate."""
        prompts = self.aggregated_prompts()
        if not self.cfg.uses_gpa or prompts is None:
            return
        own = self._prompt_tensors()
        with torch.no_grad():
            for k, v in prompts.items():
                own[k].copy_(v.to(dtype=own[k].dtype, device=own[k].device))

    def state_dict_extra(self) -> dict:
        return {
            "gpa_epochs": list(self._gpa_epochs),
            "gpa_sum": None if self._gpa_sum is None else {k: v.clone() for k, v in self._gpa_sum.items()},
        }

    def load_state_dict_extra(self, state: dict) -> None:
        self._gpa_epochs = [int(e) for e in state.get("gpa_epochs", [])]
        gpa = state.get("gpa_sum")
        self._gpa_sum = None if gpa is None else {k: v.double().cpu().clone() for k, v in gpa.items()}
