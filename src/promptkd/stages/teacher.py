"""Stage 1 as one call: learn the teacher's prompts on K labelled shots per class.

    run = promptkd.train_teacher(dataset="folder:my_data", clip_weights="ViT-L-14.safetensors",
                                 out="runs/my_data/teacher", preset="teacher/custom")
    run.artefact   # the teacher artefact folder (adapter.safetensors + adapter.json)

Order of work (nothing heavy before the cheap checks): the run folder is checked and locked, the
settings are resolved and validated, the dataset is read and the shots are drawn, and only then is the
CLIP model loaded. The shots follow the authors' code (Dassl + CoOp): K per class over ALL classes with
``random.seed(seed)``, then the base half is kept; see :mod:`promptkd.data.splits`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from promptkd.config import spec
from promptkd.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from promptkd.engine.loop import LoopConfig
from promptkd.methods.promptsrc import PromptSRCConfig
from promptkd.methods.teacher_io import TeacherPrompts
from promptkd.stages.common import (
    LogSettings,
    Messages,
    distributed_session,
    log_event,
    minimum_classes,
    write_run_record,
)
from promptkd.stages.run_folder import RunFolder, check_same_inputs, resolve_settings

EXCLUDE = ("method.epochs",)  # always train.epochs


@dataclass
class TeacherData:
    """The ``data`` section of stage 1."""

    classes: str = spec("base", choices=("base", "all"),
                        help="base: the first ceil(N/2) classes (base-to-novel); all: every class")
    shots: int = spec(16, ge=1, help="labelled images per class, drawn with the run seed")
    on_bad_image: str = spec("skip", choices=("skip", "error"), help="skip an unreadable image (counted) or stop")
    max_image_pixels: int = spec(DEFAULT_MAX_IMAGE_PIXELS, ge=1,
                                 help="larger images are refused (JPEGs are decoded smaller instead)")


@dataclass
class TeacherSettings:
    """Every setting of stage 1 (config.yaml); presets and --set values are checked against it."""

    teacher: TeacherPrompts = spec(default_factory=TeacherPrompts)
    method: PromptSRCConfig = spec(default_factory=PromptSRCConfig)
    data: TeacherData = spec(default_factory=TeacherData)
    train: LoopConfig = spec(default_factory=lambda: LoopConfig(precision="fp16"))
    log: LogSettings = spec(default_factory=LogSettings)


@dataclass
class TeacherConfig:
    """What to run: inputs, output folder, preset and overrides (``"key.sub=value"`` strings or a dict)."""

    dataset: str
    clip_weights: str | Path
    out: str | Path
    data_root: str | Path | None = None
    preset: str | Path | None = "teacher/base2novel"
    overrides: Sequence[str] | Mapping[str, Any] = ()
    seed: int | None = None  # default 1; on resume the run's own
    resume: bool = False
    overwrite: bool = False
    trust_checkpoint: bool = False
    arch: str | None = None  # CLIP architecture of a bare state dict (see promptkd.models.weights)
    quiet: bool = False


@dataclass
class TeacherRun:
    """What stage 1 produced."""

    out: Path
    artefact: Path | None  # None when the run stopped early (train.max_steps); resume it
    completed: bool
    settings: dict
    dataset: str
    class_names: list[str]
    shots: list[str] = field(default_factory=list)  # image paths trained on
    history: list[dict] = field(default_factory=list)

    @property
    def metrics(self) -> dict:
        return self.history[-1] if self.history else {}


def teacher_settings(preset: str | Path | None = "teacher/base2novel",
                     overrides: Sequence[str] | Mapping[str, Any] = ()) -> dict:
    """Resolved, validated stage-1 settings (defaults <- preset <- overrides) without running anything."""
    from promptkd import config as cfgmod
    from promptkd.methods.teacher_io import prompt_settings_for_method

    settings = cfgmod.build(TeacherSettings, preset, overrides, exclude=EXCLUDE, where="teacher config")
    settings["teacher"] = prompt_settings_for_method(settings["method"]["method"], settings["teacher"])
    method, epochs = settings["method"], settings["train"]["epochs"]
    if method["method"] == "promptsrc" and not 1 - 2 * method["gpa_std"] <= method["gpa_mean"] <= epochs + 2 * method["gpa_std"]:
        warnings.warn(f"method.gpa_mean={method['gpa_mean']:g} is outside the {epochs} epoch(s) of train.epochs: the "
                      "prompt aggregation (GPA) keeps essentially one end epoch's prompts; the presets put it at "
                      f"about 3/4 of the epochs (--set method.gpa_mean={max(1, round(0.75 * epochs))})", stacklevel=2)
    return settings


def draw_shots(bench, classes: str, shots: int, seed: int, cache_dir: Path | None = None):
    """The labelled training set of stage 1: K shots per class over ALL classes, drawn as Dassl draws them
    (``random.seed(seed)``, classes in order of first appearance), THEN restricted to the base half when
    ``classes == "base"`` (CoOp's ``subsample_classes`` after ``generate_fewshot_dataset``)."""
    from promptkd.data.splits import base_novel_split, few_shot_benchmark

    drawn = few_shot_benchmark(bench, shots, seed, cache_dir=cache_dir)
    return base_novel_split(drawn).base if classes == "base" else drawn


def train_teacher(cfg: TeacherConfig | None = None, **fields: Any) -> TeacherRun:
    """Stage 1: PromptSRC (or IVLP/CoOp) prompts on few-shot labelled data -> a teacher artefact in ``cfg.out``.

    Under torchrun every process runs the same loop (DDP) and only rank 0 writes files."""
    cfg = cfg or TeacherConfig(**fields)
    with distributed_session(), RunFolder(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite,
                                          command="train-teacher") as folder:
        return _train(cfg, folder)


def _train(cfg: TeacherConfig, folder: RunFolder) -> TeacherRun:
    from promptkd import artifacts
    from promptkd import config as cfgmod
    from promptkd.data.benchmarks import load_benchmark
    from promptkd.data.loader import LabelledImages
    from promptkd.data.transforms import TrainAugment
    from promptkd.engine import distributed as D
    from promptkd.engine.loop import fit, resolve_device
    from promptkd.methods.promptsrc import PromptSRCModule
    from promptkd.methods.teacher_io import build_teacher, prompt_settings_for_method

    say = Messages("train-teacher", cfg.quiet)
    folder.say_notes("train-teacher")
    out = folder.path
    settings, schedule_changes = resolve_settings(TeacherSettings, folder, cfg.preset, cfg.overrides, cfg.seed,
                                                  exclude=EXCLUDE, where="teacher config")
    settings["teacher"] = prompt_settings_for_method(settings["method"]["method"], settings["teacher"])
    loop_cfg = LoopConfig(**settings["train"])
    seed = loop_cfg.seed

    bench = load_benchmark(cfg.data_root, cfg.dataset)
    if bench.eval_only:
        raise ValueError(f"{bench.name} is evaluation-only (no labelled train split to learn prompts from)")
    data_cfg = settings["data"]
    train_bench = draw_shots(bench, data_cfg["classes"], int(data_cfg["shots"]), seed, out / "few_shot")
    class_names = list(train_bench.classnames)
    minimum_classes(class_names, f"{bench.name} ({data_cfg['classes']} classes)", "train-teacher")

    device = resolve_device(loop_cfg.device)
    torch.manual_seed(seed)  # every initialisation below comes from the run seed
    teacher = build_teacher(cfg.clip_weights, settings["teacher"], trust_checkpoint=cfg.trust_checkpoint,
                            prompt_seed=seed, **({"arch": cfg.arch} if cfg.arch else {})).to(device)
    run_info = {"dataset": cfg.dataset, "data_root": str(cfg.data_root) if cfg.data_root else None,
                "clip_weights": str(cfg.clip_weights), "clip_sha256": teacher.identity().get("sha256"),
                "config_source": str(cfg.preset) if cfg.preset else None, "seed": seed}
    check_same_inputs(folder, run_info, ("dataset", "clip_sha256"))
    if D.is_main():
        cfgmod.save(settings, out / "config.yaml")
        write_run_record(out, run_info)
    if schedule_changes:
        log_event(out, {"type": "resume_changes", "changes": schedule_changes})
        say("resuming with a changed schedule: " + "; ".join(schedule_changes))

    transform = TrainAugment(teacher.image_spec.size, teacher.image_spec.mean, teacher.image_spec.std)
    data = LabelledImages(train_bench.train, transform, seed=seed, on_bad_image=data_cfg["on_bad_image"],
                          max_image_pixels=data_cfg["max_image_pixels"])
    method_cfg = {**settings["method"], "epochs": loop_cfg.epochs}
    say(f"{settings['method']['method']} on {bench.name} ({data_cfg['classes']} classes: {len(class_names)}, "
        f"{len(data)} images), {loop_cfg.epochs} epochs, batch {loop_cfg.batch_size}, "
        f"{sum(p.numel() for p in teacher.trainable_parameters()):,} prompt values, {device} -> {out}")
    module = PromptSRCModule(teacher, class_names, method_cfg, dataset=cfg.dataset)
    result = fit(module, data, loop_cfg, out, resume=cfg.resume, tensorboard=settings["log"]["tensorboard"])
    for record in result["history"]:
        shown = "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in ("epoch", "steps"))
        say(f"  epoch {record['epoch']:>3}: {shown}")
    run = TeacherRun(out, None, bool(result["completed"]), settings, bench.name, class_names,
                     [s.path for s in train_bench.train], list(result["history"]))
    if not run.completed:
        say(f"stopped after {result['global_step']} steps (max_steps); continue with --resume")
        return run
    if D.is_main():
        teacher.eval()
        selection = "gpa" if module.cfg.uses_gpa else "last_epoch"  # GPA aggregate, or the last epoch
        artifacts.save_adapter(teacher, out, "teacher", class_names=class_names,
                               config={**copy.deepcopy(settings), "dataset": bench.name, "stage": "teacher"},
                               extra={"selection": selection})
        say(f"teacher artefact (adapter.safetensors + adapter.json) in {out}")
    D.barrier()
    run.artefact = out
    return run
