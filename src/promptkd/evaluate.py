"""Evaluation protocols of the paper, one code path for zero-shot CLIP, the teacher and the student.

A model under evaluation is an :class:`ImageClassifier`: a function from images to (unnormalised)
image features plus a :class:`~promptkd.store.ClassVectorStore`. Zero-shot CLIP's store holds the
frozen text tower's vectors, the teacher's is ``build_store`` of its prompted text tower, and a
student carries the store it was distilled with. Logits are ``scale * norm(f(x)) @ W_subset^T``.

Protocols (accuracies in percent):

* ``base2novel``: classes sorted by label, the first ``ceil(N/2)`` are base. Base accuracy: base test
  images, logits over the base class vectors only; novel accuracy: novel test images, labels
  re-indexed, logits over the novel vectors only; ``HM = 2*B*N/(B+N)``.
* ``cross_dataset``: accuracy over all classes of the target's test split.
* ``domain_generalization``: ImageNet-V2/-Sketch over the 1000 ImageNet classes, ImageNet-A/-R over
  their 200-class subsets (logits over the subset's class vectors only).

Features are computed once per test image (batched, ``no_grad``, optional autocast); every group of
classes (base, novel, all) is derived from the same features.
"""

from __future__ import annotations

import csv
import datetime as _dt
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from promptkd.engine.loop import PRECISIONS  # the autocast dtypes of training, shared
from promptkd.paper import harmonic_mean  # one HM for results.json and the report tables
from promptkd.store import ClassVectorStore

PROTOCOLS = ("base2novel", "cross_dataset", "domain_generalization")
MODELS = ("zeroshot", "teacher", "student")
RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
PER_CLASS_FILE = "per_class.csv"


# --------------------------------------------------------------------------------------------------
# metrics


def accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent (0 for an empty set)."""
    if labels.numel() == 0:
        return 0.0
    return 100.0 * (predictions == labels).double().mean().item()


def restrict_labels(labels: Tensor, classes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(mask of the samples whose label is in ``classes``, their labels re-indexed to 0..len(classes)-1)."""
    classes_t = torch.as_tensor(list(classes), dtype=torch.long)
    if classes_t.numel() != len(set(classes_t.tolist())):
        raise ValueError("a class group lists the same class twice")
    size = int(max(int(labels.max()) if labels.numel() else -1, int(classes_t.max()) if classes_t.numel() else -1)) + 1
    lookup = torch.full((size,), -1, dtype=torch.long)
    lookup[classes_t] = torch.arange(classes_t.numel())
    local = lookup[labels.long()]
    mask = local >= 0
    return mask, local[mask]


@dataclass
class ClassRow:
    """One class of one group: its label in the target dataset, name, and counts."""

    group: str
    label: int
    class_name: str
    correct: int
    total: int

    @property
    def accuracy(self) -> float | None:
        return 100.0 * self.correct / self.total if self.total else None


@dataclass
class GroupResult:
    name: str  # "base", "novel" or "all"
    accuracy: float
    num_images: int
    num_classes: int
    per_class: list[ClassRow] = field(default_factory=list)


def predict_in_group(features: Tensor, vectors: Tensor, chunk: int = 8192) -> Tensor:
    """argmax over ``norm(features) @ vectors^T`` (the logit scale does not change the argmax)."""
    preds = []
    w = vectors.float()
    for start in range(0, features.shape[0], chunk):
        f = torch.nn.functional.normalize(features[start : start + chunk].float(), dim=-1)
        preds.append((f @ w.to(f.device).t()).argmax(dim=-1).cpu())
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def evaluate_group(
    name: str,
    features: Tensor,
    labels: Tensor,
    vectors: Tensor,
    classes: Sequence[int],
    class_names: Sequence[str],
) -> GroupResult:
    """Accuracy on the images whose (target) label is in ``classes``, logits over those classes only.

    ``vectors[i]`` is the class vector of target label ``classes[i]``; labels are re-indexed in the
    order of ``classes``."""
    classes = list(classes)
    if vectors.shape[0] != len(classes):
        raise ValueError(f"group {name}: {vectors.shape[0]} class vectors for {len(classes)} classes")
    mask, local = restrict_labels(labels, classes)
    preds = predict_in_group(features[mask], vectors)
    correct = preds == local
    hits = torch.bincount(local[correct], minlength=len(classes))
    totals = torch.bincount(local, minlength=len(classes))
    rows = [
        ClassRow(name, c, class_names[c], int(hits[i]), int(totals[i])) for i, c in enumerate(classes)
    ]
    return GroupResult(name, accuracy(preds, local), int(mask.sum()), len(classes), rows)


# --------------------------------------------------------------------------------------------------
# protocols on precomputed features


def class_groups(protocol: str, num_classes: int) -> dict[str, list[int]]:
    """The groups of target labels a protocol reports: base/novel halves, or all classes."""
    if protocol == "base2novel":
        if num_classes < 2:
            raise ValueError(f"base-to-novel needs at least 2 classes, the dataset has {num_classes}")
        half = (num_classes + 1) // 2  # ceil(N/2) base classes
        return {"base": list(range(half)), "novel": list(range(half, num_classes))}
    if protocol in ("cross_dataset", "domain_generalization"):
        return {"all": list(range(num_classes))}
    raise ValueError(f"unknown protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")


def metrics_from_groups(protocol: str, groups: dict[str, GroupResult]) -> dict[str, float]:
    if protocol == "base2novel":
        b, n = groups["base"].accuracy, groups["novel"].accuracy
        return {"base": b, "novel": n, "hm": harmonic_mean(b, n)}
    return {"accuracy": groups["all"].accuracy}


def map_classes_to_store(
    store: ClassVectorStore, class_names: Sequence[str], imagenet_indices: Sequence[int] = (), source: str = "dataset"
) -> list[int]:
    """Row of ``store`` for each target class.

    Same class list: the identity. An ImageNet subset (ImageNet-A/-R) against a 1000-class ImageNet
    store: the subset's ImageNet indices, checked by name. Otherwise by class name, which must be
    unique in the store and present for every target class."""
    names = list(class_names)
    if names == store.class_names:
        return list(range(len(names)))
    idx = [int(i) for i in imagenet_indices]
    if idx and len(idx) == len(names) and all(0 <= i < store.num_classes for i in idx):
        wrong = [(n, store.class_names[i]) for n, i in zip(names, idx) if store.class_names[i] != n]
        if not wrong:
            return idx
        raise ValueError(
            f"the {source}'s ImageNet indices point at store classes with other names "
            f"({len(wrong)} differ, e.g. {wrong[0][0]!r} vs store {wrong[0][1]!r}): "
            "the store and the dataset use different ImageNet class-name files"
        )
    rows: dict[str, list[int]] = {}
    for i, n in enumerate(store.class_names):
        rows.setdefault(n, []).append(i)
    missing = [n for n in names if n not in rows]
    ambiguous = [n for n in names if len(rows.get(n, ())) > 1]
    if missing or ambiguous:
        parts = []
        if missing:
            parts.append(f"{len(missing)} {source} class(es) not in the store, e.g. {missing[:5]}")
        if ambiguous:
            parts.append(f"{len(ambiguous)} class name(s) appear twice in the store, e.g. {ambiguous[:5]}")
        raise ValueError(
            f"cannot match the {source}'s {len(names)} classes to the {store.num_classes} class vectors: "
            + "; ".join(parts)
        )
    return [rows[n][0] for n in names]


@dataclass
class EvalResult:
    protocol: str
    dataset: str
    seed: int
    model: str
    selection: str
    metrics: dict[str, float]
    groups: dict[str, GroupResult]
    source: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The results.json record (ARCHITECTURE.md "Results") plus counts and provenance."""
        return {
            "protocol": self.protocol,
            "dataset": self.dataset,
            "seed": self.seed,
            "model": self.model,
            "selection": self.selection,
            "metrics": {k: round(v, 4) for k, v in self.metrics.items()},
            "num_images": {g: r.num_images for g, r in self.groups.items()},
            "num_classes": {g: r.num_classes for g, r in self.groups.items()},
            "source": self.source,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }


def evaluate_features(
    features: Tensor,
    labels: Tensor,
    store: ClassVectorStore,
    class_names: Sequence[str],
    protocol: str,
    *,
    dataset: str,
    seed: int,
    model: str,
    selection: str = "last",
    imagenet_indices: Sequence[int] = (),
    source: dict | None = None,
) -> EvalResult:
    """Run a protocol on features computed once for every test image of the target dataset."""
    if model not in MODELS:
        raise ValueError(f"unknown model kind {model!r} (known: {', '.join(MODELS)})")
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows for {labels.shape[0]} labels")
    if features.shape[1] != store.dim:
        raise ValueError(f"image features have dimension {features.shape[1]}, class vectors {store.dim}")
    rows = map_classes_to_store(store, class_names, imagenet_indices, source=dataset)
    groups = {}
    for name, classes in class_groups(protocol, len(class_names)).items():
        vectors = store.vectors[[rows[c] for c in classes]]
        groups[name] = evaluate_group(name, features, labels, vectors, classes, class_names)
    return EvalResult(protocol, dataset, int(seed), model, selection, metrics_from_groups(protocol, groups),
                      groups, source or {})


# --------------------------------------------------------------------------------------------------
# features


@dataclass
class ImageClassifier:
    """What evaluation needs of any model: an image-feature function, class vectors, image preparation."""

    encode_image: Callable[[Tensor], Tensor]
    store: ClassVectorStore
    image_spec: object  # promptkd.models.backbones.ImageSpec
    model: str
    selection: str = "last"
    source: dict = field(default_factory=dict)


@torch.no_grad()
def extract_features(
    encode_image: Callable[[Tensor], Tensor],
    loader,
    *,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    desc: str = "features",
) -> tuple[Tensor, Tensor]:
    """(features [N, D] float32 on CPU, labels [N]) in loader order, one forward pass per image."""
    from promptkd.progress import progress_bar

    device = torch.device(device)
    feats, labels = [], []
    for batch in progress_bar(loader, desc=desc, unit="batch", enabled=progress, leave=False):
        images = batch["image"].to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = encode_image(images)
        feats.append(out.float().cpu())
        labels.append(torch.as_tensor(batch["label"]).long().cpu())
    if not feats:
        raise ValueError("the test split is empty: nothing to evaluate")
    return torch.cat(feats), torch.cat(labels)


def write_results(result: EvalResult, out_dir: str | Path, name: str = "") -> dict[str, Path]:
    """results.json, a readable results.md and per_class.csv in ``out_dir``, each written atomically.

    ``name`` (optional) goes into results.json to tell apart two models of one kind in a report."""
    from promptkd.fileio import atomic_write, atomic_write_json, atomic_writer

    out = Path(out_dir)
    paths = {"json": out / RESULTS_FILE, "table": out / TABLE_FILE, "per_class": out / PER_CLASS_FILE}
    record = result.to_json()
    atomic_write_json(paths["json"], {**record, "name": name} if name else record, indent=2)
    atomic_write(paths["table"], format_result(result))
    with atomic_writer(paths["per_class"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "label", "class_name", "correct", "total", "accuracy"])
        for group in result.groups.values():
            for row in group.per_class:
                acc = "" if row.accuracy is None else f"{row.accuracy:.2f}"
                writer.writerow([row.group, row.label, row.class_name, row.correct, row.total, acc])
    return paths


def format_result(result: EvalResult) -> str:
    """A small markdown table of one evaluation."""
    head = (f"# {result.model} on {result.dataset} ({result.protocol}, seed {result.seed}, "
            f"selection: {result.selection})\n\n")
    lines = ["| group | classes | images | accuracy (%) |", "|---|---:|---:|---:|"]
    for g in result.groups.values():
        lines.append(f"| {g.name} | {g.num_classes} | {g.num_images} | {g.accuracy:.2f} |")
    if result.protocol == "base2novel":
        lines.append(f"| **HM** | | | **{result.metrics['hm']:.2f}** |")
    empty = [r for g in result.groups.values() for r in g.per_class if r.total == 0]
    tail = ""
    if empty:
        tail = (f"\n{len(empty)} class(es) have no test image (left out of the accuracy): "
                + ", ".join(r.class_name for r in empty[:10]) + "\n")
    return head + "\n".join(lines) + "\n" + tail


def summary_line(result: EvalResult) -> str:
    m = result.metrics
    if result.protocol == "base2novel":
        return (f"{result.model} {result.dataset} seed {result.seed}: base {m['base']:.2f}  "
                f"novel {m['novel']:.2f}  HM {m['hm']:.2f}")
    return f"{result.model} {result.dataset} seed {result.seed}: accuracy {m['accuracy']:.2f}"


def as_dict(result: EvalResult) -> dict:
    """Everything, including per-class rows (for programmatic use)."""
    d = result.to_json()
    d["groups"] = {k: asdict(v) for k, v in result.groups.items()}
    return d


# --------------------------------------------------------------------------------------------------
# datasets -> features -> results


def check_protocol_dataset(protocol: str, bench) -> None:
    """Refuse protocol/dataset pairs that make no sense (e.g. base-to-novel on ImageNet-A)."""
    from promptkd.data.benchmarks import IMAGENET_VARIANTS

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")
    if protocol == "base2novel" and bench.eval_only:
        raise ValueError(f"{bench.name} is an evaluation-only ImageNet variant: use --protocol domain_generalization")
    if protocol == "domain_generalization" and bench.name not in (*IMAGENET_VARIANTS, "ImageNet"):
        raise ValueError(f"domain generalisation targets are ImageNet and its variants "
                         f"({', '.join(IMAGENET_VARIANTS)}), not {bench.name}")


def evaluate_benchmark(
    classifier: ImageClassifier,
    bench,
    protocol: str,
    *,
    seed: int,
    batch_size: int = 64,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    progress: bool = True,
    max_image_pixels: int | None = None,
) -> EvalResult:
    """Features of every test image of ``bench`` (once), then the protocol's metrics."""
    from promptkd.data.loader import BadImageError, LabelledImages, make_loader
    from promptkd.serve import preprocess_for

    check_protocol_dataset(protocol, bench)
    if precision not in (*PRECISIONS, "auto"):
        raise ValueError(f"precision must be auto or one of {', '.join(PRECISIONS)}, not {precision!r}")
    # a test image that cannot be read must stop the evaluation, not be replaced by another one
    limit = {"max_image_pixels": max_image_pixels} if max_image_pixels else {}
    dataset = LabelledImages(bench.test, preprocess_for(classifier.image_spec), on_bad_image="error", **limit)
    if len(dataset) == 0:  # say which dataset (extract_features alone cannot)
        raise ValueError(f"{bench.name}: the test split is empty: nothing to evaluate")
    loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers)
    requested = precision
    if precision == "auto":
        precision = auto_precision(classifier, dataset, device).precision
    try:
        feats, labels = extract_features(classifier.encode_image, loader, device=device,
                                         amp_dtype=PRECISIONS[precision], progress=progress,
                                         desc=f"{classifier.model} {bench.name} test")
    except BadImageError as exc:  # names the file; the CLI prints it as an error, not a traceback
        raise ValueError(f"{bench.name} test split: {exc}") from exc
    return evaluate_features(feats, labels, classifier.store, bench.classnames, protocol, dataset=bench.name,
                             seed=seed, model=classifier.model, selection=classifier.selection,
                             imagenet_indices=bench.imagenet_indices,
                             source={**classifier.source, "precision": precision, "precision_requested": requested,
                                     "device": str(device)})


CHECK_IMAGES = 256  # test images the bf16-vs-fp32 check of precision=auto reads


def auto_precision(classifier: ImageClassifier, dataset, device: torch.device | str):
    """``precision=auto`` for an evaluation: bf16 only on a device with native bf16 and when the top-1 class
    agrees with fp32 on >= 99.5% of the first test images (:func:`promptkd.precision.resolve_precision`)."""
    import sys

    from promptkd.precision import native_bf16, resolve_precision

    device = torch.device(device)
    if not native_bf16(device)[0]:
        choice = resolve_precision("auto", device=device)
    else:
        images = torch.stack([dataset[i]["image"] for i in range(min(CHECK_IMAGES, len(dataset)))]).to(device)
        vectors = classifier.store.vectors.to(device)

        @torch.no_grad()
        def check(p: str) -> Tensor:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=p == "bf16"):
                return torch.nn.functional.normalize(classifier.encode_image(images).float(), dim=-1) @ vectors.t()

        choice = resolve_precision("auto", device=device, check=check)
    print(f"evaluate: {choice.reason}", file=sys.stderr)
    return choice


# --------------------------------------------------------------------------------------------------
# the three model kinds as ImageClassifiers


def selection_of(meta: dict) -> str:
    """The model-selection rule an artefact records (the final epoch when it records none)."""
    sel = meta.get("selection")
    if isinstance(sel, dict):
        sel = sel.get("selection")
    return str(sel or meta.get("config", {}).get("selection") or "last_epoch")


def student_classifier(path: str | Path, *, device: torch.device | str = "cpu", **builder_options) -> ImageClassifier:
    """A distilled student (folder or bundle): its image encoder + the class vectors it carries."""
    from promptkd.serve import load_student

    loaded = load_student(path, device=device, **builder_options)
    meta = loaded.meta
    source = {"student": str(path), "store_fingerprint": loaded.store.fingerprint(),
              "adapter_sha256": meta.get("adapter_sha256"), "selection_record": meta.get("selection"),
              "teacher": meta.get("teacher"),  # which teacher it was distilled from (artefact, sha, selection)
              "recorded": {"seed": meta.get("seed"), "protocol": meta.get("protocol"), "dataset": meta.get("dataset")}}
    return ImageClassifier(loaded.student, loaded.store, loaded.image_spec, "student", selection_of(loaded.meta), source)


def teacher_classifier(path: str | Path, class_names: Sequence[str], *, device: torch.device | str = "cpu",
                       weights: str | Path | None = None, trust_checkpoint: bool = False,
                       batch_size: int = 256) -> ImageClassifier:
    """A prompted teacher (artefact folder or authors' checkpoint): prompted image tower + class vectors
    from its prompted text tower over ``class_names`` (``build_store``, once)."""
    from promptkd.methods.teacher_io import load_teacher
    from promptkd.store import build_store

    teacher, meta = load_teacher(path, weights=weights, trust_checkpoint=trust_checkpoint)
    teacher.to(device)
    store = build_store(teacher, class_names, batch_size=batch_size)

    def encode(images: Tensor) -> Tensor:
        return teacher.encode_image(images, prompted=True)

    train = (meta.get("config") or {}).get("train") or {}
    source = {"teacher": str(path), "adapter_sha256": meta.get("adapter_sha256"),
              "store_fingerprint": store.fingerprint(), "teacher_selection": meta.get("selection"),
              "recorded": {"seed": train.get("seed")}}
    return ImageClassifier(encode, store, teacher.image_spec, "teacher", selection_of(meta), source)


def zeroshot_classifier(clip_weights: str | Path, bench, *, device: torch.device | str = "cpu",
                        templates: str = "coop", trust_checkpoint: bool = False, **load_options) -> ImageClassifier:
    """Frozen CLIP: un-prompted image tower + frozen text tower over a template set (CoOp's by default,
    as the paper's CLIP rows)."""
    from promptkd.methods.templates import template_set
    from promptkd.methods.zeroshot import zeroshot_store
    from promptkd.models.clip_backbones import load_clip_teacher
    from promptkd.models.prompts import PromptConfig

    no_prompts = PromptConfig(n_ctx_text=0, text_depth=0, ctx_init=None, n_ctx_vision=0, vision_depth=0)
    clip = load_clip_teacher(clip_weights, no_prompts, trust_checkpoint=trust_checkpoint, device=device,
                             **load_options).eval()
    store = zeroshot_store(clip, bench.classnames, template_set(templates, bench.name))

    def encode(images: Tensor) -> Tensor:
        return clip.encode_image(images, prompted=False)

    source = {"clip_weights": str(clip_weights), "clip_sha256": clip.identity().get("sha256"), "templates": templates,
              "store_fingerprint": store.fingerprint()}
    return ImageClassifier(encode, store, clip.image_spec, "zeroshot", "none", source)
