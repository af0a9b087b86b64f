"""The paper's published numbers, for reports and comparisons.

Source: Li et al., "PromptKD: Unsupervised Prompt Distillation for Vision-Language Models", CVPR 2024
(arXiv 2403.02781), as transcribed in the project's reference notes (shared/reference/promptkd.md,
"Headline results", cross-dataset and domain-generalisation paragraphs). Base-to-novel rows are 3-seed
means with a ViT-B/16 student and a ViT-L/14 PromptSRC teacher; accuracies in percent.

The paper's "Average" rows take the mean of Base and the mean of Novel over the 11 datasets, and the
HM of those two means (e.g. PromptKD: HM(86.96, 80.73) = 83.73), not the mean of per-dataset HMs.

Two published cells do not equal the HM of their own Base/Novel: PromptKD StanfordCars (HM(82.80, 83.37)
= 83.08, printed 83.13) and PromptKD UCF101 (HM(89.71, 82.27) = 85.83, printed 86.10). They are kept as
printed (see ``PRINTED_HM_DIFFERS``); reports show the printed value.
"""

from __future__ import annotations

from dataclasses import dataclass

# Model kinds in the paper's tables; "zeroshot", "teacher", "student" are what our runs produce.
CLIP = "CLIP"
PROMPTSRC = "PromptSRC"
PROMPTKD = "PromptKD"
TEACHER = "Teacher (ViT-L/14 PromptSRC)"
METHODS = (CLIP, PROMPTSRC, PROMPTKD, TEACHER)

# which paper row is the reference for each of our model kinds
PAPER_ROW_FOR_MODEL = {"zeroshot": CLIP, "teacher": TEACHER, "student": PROMPTKD}

BASE_TO_NOVEL_DATASETS = (
    "ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "Flowers102", "Food101",
    "FGVCAircraft", "SUN397", "DTD", "EuroSAT", "UCF101",
)
CROSS_DATASET_TARGETS = BASE_TO_NOVEL_DATASETS[1:]
DG_TARGETS = ("ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")


@dataclass(frozen=True)
class B2N:
    """Base / novel accuracy and their harmonic mean, in percent."""

    base: float
    novel: float
    hm: float


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2*B*N/(B+N) (0 when both are 0)."""
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def _row(text: str) -> B2N:
    b, n, h = (float(x) for x in text.split("/"))
    return B2N(b, n, h)


# Table "Headline results": dataset -> (CLIP, PromptSRC, PromptKD, Teacher)
_B2N_TEXT = {
    "Average": ("69.34/74.22/71.70", "84.26/76.10/79.97", "86.96/80.73/83.73", "87.86/81.45/84.53"),
    "ImageNet": ("72.43/68.14/70.22", "77.60/70.73/74.01", "80.83/74.66/77.62", "83.24/76.83/79.91"),
    "Caltech101": ("96.84/94.00/95.40", "98.10/94.03/96.02", "98.91/96.65/97.77", "98.71/98.03/98.37"),
    "OxfordPets": ("91.17/97.26/94.12", "95.33/97.30/96.30", "96.30/98.01/97.15", "96.86/98.82/97.83"),
    "StanfordCars": ("63.37/74.89/68.65", "78.27/74.97/76.58", "82.80/83.37/83.13", "84.53/84.25/84.39"),
    "Flowers102": ("72.08/77.80/74.83", "98.07/76.50/85.95", "99.42/82.62/90.24", "99.05/82.60/90.08"),
    "Food101": ("90.10/91.22/90.66", "90.67/91.53/91.10", "92.43/93.68/93.05", "94.56/95.15/94.85"),
    "FGVCAircraft": ("27.19/36.29/31.09", "42.73/37.87/40.15", "49.12/41.81/45.17", "54.44/43.07/48.09"),
    "SUN397": ("69.36/75.35/72.23", "82.67/78.47/80.52", "83.69/81.54/82.60", "84.97/81.09/82.98"),
    "DTD": ("53.24/59.90/56.37", "83.37/62.97/71.75", "85.84/71.37/77.94", "85.76/70.65/77.48"),
    "EuroSAT": ("56.48/64.05/60.03", "92.90/73.90/82.32", "97.54/82.08/89.14", "94.79/83.15/88.59"),
    "UCF101": ("70.53/77.50/73.85", "87.10/78.80/82.74", "89.71/82.27/86.10", "89.50/82.26/85.73"),
}

# cells whose printed HM is not HM(base, novel) of the same row (paper typos or per-seed averaging)
PRINTED_HM_DIFFERS = {(PROMPTKD, "StanfordCars"), (PROMPTKD, "UCF101")}

BASE_TO_NOVEL: dict[str, dict[str, B2N]] = {
    method: {ds: _row(cells[i]) for ds, cells in _B2N_TEXT.items()} for i, method in enumerate(METHODS)
}
"""``BASE_TO_NOVEL[method][dataset]``; ``dataset`` may also be ``"Average"`` (of the 11)."""

# Cross-dataset (ImageNet teacher/source, 10 targets): only the averages are in the reference notes.
CROSS_DATASET_AVERAGE: dict[str, float] = {PROMPTSRC: 65.81, PROMPTKD: 71.33, TEACHER: 71.89}
CROSS_DATASET: dict[str, dict[str, float]] = {}  # per-target numbers: not transcribed

# Domain generalisation (ImageNet teacher; targets V2 / Sketch / A / R).
DOMAIN_GENERALIZATION: dict[str, dict[str, float]] = {
    PROMPTKD: {"ImageNetV2": 69.77, "ImageNetSketch": 58.72, "ImageNetA": 70.36, "ImageNetR": 87.01},
}
DOMAIN_GENERALIZATION_AVERAGE: dict[str, float] = {PROMPTKD: 71.47, PROMPTSRC: 60.65}


def base_to_novel(method: str, dataset: str) -> B2N | None:
    """The paper's Base/Novel/HM for ``method`` on ``dataset`` (None when the paper has no such cell)."""
    return BASE_TO_NOVEL.get(method, {}).get(dataset)


def base_to_novel_average(method: str, datasets: list[str] | tuple[str, ...]) -> B2N | None:
    """The paper's average over a SUBSET of datasets, computed as the paper does (HM of the means).

    For all 11 datasets this is the published Average row (up to rounding); for fewer it is what a
    run covering only those datasets should be compared with. None if a dataset has no paper number."""
    rows = [base_to_novel(method, d) for d in datasets]
    if not rows or any(r is None for r in rows):
        return None
    if sorted(datasets) == sorted(BASE_TO_NOVEL_DATASETS):
        return BASE_TO_NOVEL[method]["Average"]
    base = sum(r.base for r in rows) / len(rows)  # type: ignore[union-attr]
    novel = sum(r.novel for r in rows) / len(rows)  # type: ignore[union-attr]
    return B2N(base, novel, harmonic_mean(base, novel))


def accuracy(protocol: str, method: str, target: str) -> float | None:
    """The paper's accuracy for a cross-dataset or domain-generalisation target (None if not given)."""
    table = CROSS_DATASET if protocol == "cross_dataset" else DOMAIN_GENERALIZATION
    if protocol not in ("cross_dataset", "domain_generalization"):
        raise ValueError(f"no accuracy table for protocol {protocol!r}")
    return table.get(method, {}).get(target)


def accuracy_average(protocol: str, method: str) -> float | None:
    """The paper's average over all its targets for the protocol (None if not given)."""
    if protocol == "cross_dataset":
        return CROSS_DATASET_AVERAGE.get(method)
    if protocol == "domain_generalization":
        return DOMAIN_GENERALIZATION_AVERAGE.get(method)
    raise ValueError(f"no accuracy table for protocol {protocol!r}")
