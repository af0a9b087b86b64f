"""Evaluation as one call: one model (zero-shot CLIP, a teacher or a student) on one dataset under one
protocol -> results.json, results.md and per_class.csv.

    result = promptkd.evaluate_model(model="student", artefact="runs/x/student", dataset="folder:my_data",
                                     protocol="cross_dataset", out="runs/x/eval_student")
    result.metrics   # {"accuracy": ...} or {"base", "novel", "hm"}
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from promptkd.stages.common import Messages

MODELS = ("zeroshot", "teacher", "student")
TEMPLATES = ("coop", "single", "promptsrc", "imagenet_select")


@dataclass
class EvaluateConfig:
    model: str  # zeroshot | teacher | student
    dataset: str
    protocol: str  # base2novel | cross_dataset | domain_generalization
    out: str | Path
    artefact: str | Path | None = None  # teacher/student artefact (student: or bundle)
    clip_weights: str | Path | None = None  # zeroshot: the CLIP file; otherwise overrides the recorded path
    data_root: str | Path | None = None
    templates: str = "coop"
    seed: int | None = None  # None: the seed the artefact records (1 for zero-shot CLIP)
    batch_size: int = 64
    workers: int = 2
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 only where native and agreeing with fp32 on the test images
    trust_checkpoint: bool = False
    arch: str | None = None  # CLIP architecture of a bare state dict (zeroshot)
    progress: bool | None = None  # None: bars on a terminal
    max_image_pixels: int | None = None  # None: promptkd.data.decode.DEFAULT_MAX_IMAGE_PIXELS
    tensorboard: bool = False  # also write the metrics as TensorBoard scalars to OUT/tensorboard
    quiet: bool = False


@dataclass
class EvalRun:
    metrics: dict
    result: Any = field(repr=False)  # promptkd.evaluate.EvalResult
    files: dict = field(default_factory=dict)

    @property
    def summary(self) -> str:
        from promptkd.evaluate import summary_line

        return summary_line(self.result)


def check_request(cfg: EvaluateConfig) -> None:
    from promptkd.evaluate import PROTOCOLS

    if cfg.model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, not {cfg.model!r}")
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {cfg.protocol!r}")
    if cfg.templates not in TEMPLATES:
        raise ValueError(f"templates must be one of {', '.join(TEMPLATES)}, not {cfg.templates!r}")
    if cfg.model == "zeroshot":
        if not cfg.clip_weights:
            raise ValueError("--model zeroshot needs --clip-weights FILE")
        if cfg.artefact:
            raise ValueError("--model zeroshot takes --clip-weights, not --artefact")
    elif not cfg.artefact:
        raise ValueError(f"--model {cfg.model} needs --artefact PATH")
    if cfg.batch_size < 1 or cfg.workers < 0:
        raise ValueError(f"batch size must be >= 1 and workers >= 0 (got {cfg.batch_size}, {cfg.workers})")


PAPER_PROTOCOLS = ("base2novel", "cross_dataset", "domain_generalization")


def check_recorded(cfg: EvaluateConfig, recorded: dict) -> int:
    """The seed to file the results under: the artefact's own unless said otherwise, and never another one.

    ``report`` files each results.json by its seed and protocol, so a student evaluated under another seed
    or protocol than it was distilled with would stand in the wrong table cell (a student distilled for
    your own data, protocol ``custom``, may be evaluated under any protocol)."""
    own_seed, own_protocol = recorded.get("seed"), recorded.get("protocol")
    what = f"the {cfg.model} in {cfg.artefact}"
    if cfg.seed is not None and own_seed is not None and int(cfg.seed) != int(own_seed):
        raise ValueError(f"--seed {cfg.seed}, but {what} was trained with seed {own_seed} (its adapter.json); "
                         f"results are filed by seed: pass --seed {own_seed} or leave --seed out")
    if own_protocol in PAPER_PROTOCOLS and cfg.protocol != own_protocol:
        raise ValueError(f"--protocol {cfg.protocol}, but {what} was distilled for {own_protocol} (its adapter.json); "
                         f"pass --protocol {own_protocol}")
    return int(cfg.seed if cfg.seed is not None else own_seed if own_seed is not None else 1)


def evaluate_model(cfg: EvaluateConfig | None = None, **fields: Any) -> EvalRun:
    """Features of every test image (once), the protocol's metrics, and the files in ``cfg.out``."""
    from promptkd.data.benchmarks import load_benchmark
    from promptkd.engine.loop import resolve_device
    from promptkd.evaluate import (
        check_protocol_dataset,
        evaluate_benchmark,
        student_classifier,
        teacher_classifier,
        write_results,
        zeroshot_classifier,
    )

    cfg = cfg or EvaluateConfig(**fields)
    check_request(cfg)
    say = Messages("evaluate", cfg.quiet)
    device = resolve_device(cfg.device)
    bench = load_benchmark(cfg.data_root, cfg.dataset)
    check_protocol_dataset(cfg.protocol, bench)  # before loading any model
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: --out exists and is not a folder")
    options: dict = {"trust_checkpoint": True} if cfg.trust_checkpoint else {}
    if cfg.model == "zeroshot":
        if cfg.arch:
            options["arch"] = cfg.arch
        clf = zeroshot_classifier(cfg.clip_weights, bench, device=device, templates=cfg.templates, **options)
    else:
        if cfg.clip_weights:
            options["weights"] = cfg.clip_weights
        if cfg.model == "teacher":
            clf = teacher_classifier(cfg.artefact, bench.classnames, device=device, **options)
        else:
            clf = student_classifier(cfg.artefact, device=device, **options)
    seed = check_recorded(cfg, clf.source.get("recorded") or {})
    progress = sys.stderr.isatty() if cfg.progress is None else cfg.progress
    result = evaluate_benchmark(clf, bench, cfg.protocol, seed=seed, batch_size=cfg.batch_size,
                                num_workers=cfg.workers, device=device, precision=cfg.precision, progress=progress,
                                max_image_pixels=cfg.max_image_pixels)
    files = write_results(result, out)
    if cfg.tensorboard:
        from promptkd.engine.loop import open_tensorboard

        writer = open_tensorboard(out / "tensorboard")
        for key, value in result.metrics.items():
            writer.add_scalar(f"eval/{result.dataset}/{key}", value, seed)
        writer.close()
        files["tensorboard"] = out / "tensorboard"
    run = EvalRun(dict(result.metrics), result, files)
    say(f"wrote {files['json']}, {files['table'].name}, {files['per_class'].name}")
    return run
