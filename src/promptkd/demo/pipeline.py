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
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from promptkd.demo import fashion_mnist as fm

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


@dataclass
class DemoConfig:
    """What the demo runs; the defaults are the README's `promptkd demo`."""

    out_dir: str = "runs/demo"
    data_root: str | None = None
    cache_dir: str | None = None  # None: $PROMPTKD_CACHE or ~/.cache/promptkd; "" disables the cache
    seed: int = 1
    resolution: int = 128
    shots: int = 16
    unlabelled: int = 2000
    test_per_class: int = 200  # 0: the whole test split
    teacher_variant: str = "efficientnet-lite2"
    student_variant: str = "efficientnet-lite0"
    text_depth: int = 1
    teacher_method: str = "promptsrc"
    teacher_epochs: int = 20
    teacher_batch: int = 8
    teacher_lr: float = 0.05
    student_epochs: int = 10
    student_batch: int = 32
    student_lr: float = 0.05
    kd_weight: float = 1000.0
    temperature: float = 1.0
    threads: int = 0  # 0: automatic (see choose_threads)
    progress: bool = True


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


def choose_threads(requested: int) -> int:
    """``requested`` if > 0; else every core, or 1 when the machine is already busy (load average >= cores - 0.5):
    on an oversubscribed CPU, torch's multi-threaded kernels measured 5-10x slower than one thread."""
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] >= cores - 0.5
    except OSError:
        busy = False
    return 1 if busy else cores


class Timer:
    """Wall time per named phase."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.start = time.perf_counter()

    def run(self, name: str, fn: Callable, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0
        return out

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


def warm_trunk(tower, datasets: list[FashionImages], desc: str, progress: bool, batch: int = 200) -> dict:
    """Run a frozen trunk once over every image (cache misses only) and save its cache."""
    from tqdm.auto import tqdm

    cache = tower.cache
    before = (cache.hits, cache.misses) if cache is not None else (0, 0)
    loaded = cache.loaded if cache is not None else 0
    total = sum(len(d) for d in datasets)
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for d in datasets:
            for start in range(0, len(d), batch):
                images = d.images[start : start + batch].unsqueeze(1).float().div(255.0)
                tower.trunk(images)
                bar.update(images.shape[0])
    if cache is None:
        return {"cached": False, "images": total}
    cache.save()
    return {"cached": True, "hits": cache.hits - before[0], "computed": cache.misses - before[1],
            "loaded_from_file": loaded, "file": str(cache.path) if cache.path else None}


def evaluate_model(encode: Callable[[Tensor], Tensor], store, data: DemoData, model: str, cfg: DemoConfig,
                   out_dir: Path, selection: str = "last", source: dict | None = None):
    """Base-to-novel evaluation of one model (the core's evaluation code), written to ``out_dir``."""
    from promptkd import evaluate as ev

    loader = DataLoader(data.test, batch_size=250, shuffle=False, num_workers=0)
    feats, labels = ev.extract_features(encode, loader, progress=False)
    result = ev.evaluate_features(feats, labels, store, fm.CLASS_NAMES, "base2novel", dataset=DATASET,
                                  seed=cfg.seed, model=model, selection=selection, source=source or {})
    ev.write_results(result, out_dir)
    return result


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict:
    """Run the whole demo; returns the summary written to ``out_dir/results.json``."""
    from promptkd.artifacts import save_adapter
    from promptkd.demo.backbones import (
        DemoStudent,
        DemoStudentConfig,
        DemoTeacher,
        DemoTeacherConfig,
        ImageTowerConfig,
    )
    from promptkd.demo.cache import default_cache_dir
    from promptkd.demo.report import write_outputs
    from promptkd.engine.loop import LoopConfig, fit
    from promptkd.methods.promptkd import DistillModule
    from promptkd.methods.promptsrc import PromptSRCModule
    from promptkd.methods.zeroshot import zeroshot_store
    from promptkd.store import build_store

    torch.set_num_threads(choose_threads(cfg.threads))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = None if cfg.cache_dir == "" else Path(cfg.cache_dir or default_cache_dir()) / "demo"
    timer = Timer()
    torch.manual_seed(cfg.seed)

    data = timer.run("load data", sample_data, cfg)
    log(f"data: {data.counts['fewshot']} labelled base images (teacher), {data.counts['unlabelled']} unlabelled "
        f"images of all classes (student), {data.counts['test']} test images "
        f"({data.counts['test_base']} base / {data.counts['test_novel']} novel)")

    def tower(variant: str) -> ImageTowerConfig:
        return ImageTowerConfig(variant=variant, resolution=cfg.resolution)

    teacher = timer.run("load models", DemoTeacher, DemoTeacherConfig(image=tower(cfg.teacher_variant),
                        text_depth=cfg.text_depth), cache_dir=cache_dir)
    zs_student = timer.run("load models", DemoTeacher, DemoTeacherConfig(image=tower(cfg.student_variant)),
                           cache_dir=cache_dir, text=teacher.text)
    caches = {
        "teacher": timer.run("frozen trunks", warm_trunk, teacher.image, [data.fewshot, data.unlabelled, data.test],
                             f"{cfg.teacher_variant} trunk", cfg.progress),
        "student": timer.run("frozen trunks", warm_trunk, zs_student.image, [data.unlabelled, data.test],
                             f"{cfg.student_variant} trunk", cfg.progress),
    }
    for role, c in caches.items():
        if c.get("cached"):
            log(f"{role} trunk: {c['computed']} images computed, {c['hits']} reused; the cache file held "
                f"{c['loaded_from_file']} entries ({c['file']})")

    rows = {}
    # zero-shot rows: the frozen towers, the single template "a photo of a {}."
    zs_store = zeroshot_store(teacher, fm.CLASS_NAMES)
    rows["zero-shot teacher"] = timer.run("evaluate", evaluate_model, lambda x: teacher.encode_image(x, prompted=False),
                                          zs_store, data, "zeroshot", cfg, out / "zeroshot_teacher", "none")
    zs_s_store = zeroshot_store(zs_student, fm.CLASS_NAMES)
    rows["zero-shot student"] = timer.run("evaluate", evaluate_model, lambda x: zs_student.encode_image(x, prompted=False),
                                          zs_s_store, data, "zeroshot", cfg, out / "zeroshot_student", "none")
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

    # stage 2: distil into the student on unlabelled images of all classes
    student = timer.run("load models", DemoStudent, DemoStudentConfig(image=tower(cfg.student_variant),
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

    summary = {
        "dataset": DATASET, "protocol": "base2novel", "seed": cfg.seed,
        "rows": {k: {kk: round(v, 2) for kk, v in r.metrics.items()} for k, r in rows.items()},
        "counts": data.counts, "caches": caches, "config": asdict(cfg),
        "time_s": {k: round(v, 1) for k, v in timer.phases.items()}, "total_time_s": round(timer.total, 1),
        "threads": torch.get_num_threads(),
    }
    paths = write_outputs(summary, out)
    summary["outputs"] = {k: str(v) for k, v in paths.items()}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
