"""Stage 2 as one call: distil the frozen prompted teacher into a student from unlabelled images.

    run = promptkd.distill(teacher="runs/x/teacher", class_vectors="runs/x/class_vectors.safetensors",
                           student_weights="ViT-B-16.safetensors", out="runs/x/student",
                           preset="distill/custom", dataset="folder:my_data")
    run.artefact   # the student artefact folder (adapter + class vectors)

Order of work: the run folder is checked and locked, settings are resolved and validated, the class
vectors and the image lists are read and checked against each other, and only then are the models
loaded. Labels never reach the loss: the training stream is built from image paths only.

Model selection (``method.selection``), i.e. which epoch's student is kept:

====================  ==========================================================  ====================
rule                  reads                                                       labels
====================  ==========================================================  ====================
``last``              nothing: the final epoch                                    none
``agreement``         teacher-student top-1 agreement on a held-out share of the  none
                      unlabelled images (``data.holdout``; never trained on)
``val``               accuracy on the dataset's validation images (base classes   val labels
                      for base2novel; ``data.val_shots`` per class as Dassl draws
                      them, 0 = the whole val split)
``paper``             accuracy on the TEST set: base classes for base2novel, the  test labels
                      target's classes otherwise (the authors' Dassl best_val
                      with val = test); labelled as such in every output
====================  ==========================================================  ====================
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from promptkd.config import spec
from promptkd.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from promptkd.engine.loop import LoopConfig
from promptkd.methods.promptkd import SELECTIONS, WEIGHTINGS
from promptkd.stages.common import (
    LogSettings,
    Messages,
    distributed_session,
    log_event,
    minimum_classes,
    write_run_record,
)
from promptkd.stages.run_folder import RunFolder, RunFolderError, check_same_inputs, resolve_settings

UNLABELLED_MODES = ("transductive", "inductive", "folder")
PROTOCOLS = ("base2novel", "cross_dataset", "domain_generalization", "custom")
SELECTION_LABELS = {
    "last": SELECTIONS["last"],
    "agreement": SELECTIONS["agreement"],
    "val": "best_val (labelled validation images)",
    "paper": "best_base_test (paper; uses test labels)",
    "paper_target": "best_target_test (paper; uses test labels)",
}


@dataclass
class DistillData:
    """The ``data`` section of stage 2."""

    dataset: str | None = spec(None, help="benchmark name, folder:PATH or list:FILE (the classes, and the images "
                                          "of transductive/inductive streams)")
    unlabelled: str = spec("transductive", choices=UNLABELLED_MODES,
                           help="transductive: train images of all classes (the paper); inductive: base classes "
                                "only; folder: every image under data.folder")
    folder: str | None = spec(None, help="folder of unlabelled images (data.unlabelled=folder)")
    holdout: float = spec(0.1, gt=0, lt=1, help="share of the unlabelled images held out for selection=agreement")
    val_shots: int = spec(4, ge=0, help="selection=val: validation images per class, drawn as Dassl draws them "
                                        "(0: the whole validation split)")
    on_bad_image: str = spec("skip", choices=("skip", "error"), help="skip an unreadable image (counted) or stop")
    max_image_pixels: int = spec(DEFAULT_MAX_IMAGE_PIXELS, ge=1,
                                 help="larger images are refused (JPEGs are decoded smaller instead)")


@dataclass
class StudentSettings:
    """The ``student`` section."""

    arch: str = spec("clip", help="student backbone: clip (a CLIP image tower from --student-weights, the paper), "
                                  "a CLIP architecture (ViT-B-16, ...) for a bare state dict, efficientnet-lite0, "
                                  "efficientnet-lite2, or a registered one (promptkd.models.students)")
    n_ctx: int = spec(4, ge=0, help="VPT-deep prompt tokens (CLIP students)")
    depth: int = spec(9, ge=0, help="prompted layers (9 base-to-novel, 3 cross-dataset); 0 turns the prompt off")
    projector: str = spec("mlp", choices=("mlp", "linear"),
                          help="mlp: conv1x1-BN-ReLU-conv1x1 into the teacher's space (the paper); linear")


@dataclass
class DistillMethod:
    """The ``method`` section."""

    temperature: float = spec(1.0, gt=0, le=100, help="KD temperature T (the loss is T^2 KL)")
    kd_weight: float = spec(1000.0, gt=0, le=1e6, help="KD weight (authors' weighting: effective kd_weight / N)")
    weighting: str = spec("authors", choices=WEIGHTINGS, help="authors: sum KL / (B x N); batchmean: sum KL / B")
    selection: str = spec("last", choices=("last", "agreement", "val", "paper"),
                          help="which epoch's student is kept (see promptkd.stages.distillation)")


@dataclass
class DistillSettings:
    """Every setting of stage 2 (config.yaml); presets and --set values are checked against it."""

    protocol: str = spec("base2novel", choices=PROTOCOLS, help="the experiment the run belongs to (recorded)")
    data: DistillData = spec(default_factory=DistillData)
    student: StudentSettings = spec(default_factory=StudentSettings)
    method: DistillMethod = spec(default_factory=DistillMethod)
    train: LoopConfig = spec(default_factory=lambda: LoopConfig(precision="fp16"))
    log: LogSettings = spec(default_factory=LogSettings)


@dataclass
class DistillConfig:
    """What to run: inputs, output folder, preset and overrides (``"key.sub=value"`` strings or a dict)."""

    teacher: str | Path  # teacher artefact folder, or an authors' Dassl checkpoint (then teacher_weights)
    class_vectors: str | Path
    out: str | Path
    student_weights: str | Path | None = None  # None: the student architecture's own default (EfficientNet-Lite)
    preset: str | Path | None = None
    dataset: str | None = None  # sets data.dataset
    data_root: str | Path | None = None
    teacher_weights: str | Path | None = None
    overrides: Sequence[str] | Mapping[str, Any] = ()
    seed: int | None = None  # default 1; on resume the run's own
    resume: bool = False
    overwrite: bool = False
    trust_checkpoint: bool = False
    student_arch: str | None = None  # sets student.arch (efficientnet-lite0, ViT-B-16, ...)
    teacher_cache: str | Path | None = None  # a `promptkd teacher-cache` folder: the teacher is not loaded
    quiet: bool = False


@dataclass
class StudentRun:
    """What stage 2 produced."""

    out: Path
    artefact: Path | None  # None when the run stopped early (train.max_steps); resume it
    completed: bool
    settings: dict
    selection: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    @property
    def metrics(self) -> dict:
        return self.history[-1] if self.history else {}


# --------------------------------------------------------------------------------------------------
# settings


def distill_settings(preset: str | Path | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()) -> dict:
    """Resolved, validated stage-2 settings (defaults <- preset <- overrides) without running anything."""
    from promptkd import config as cfgmod

    settings = cfgmod.build(DistillSettings, preset, overrides, where="distill config")
    check_settings(settings)
    return settings


def check_settings(settings: dict) -> None:
    """Rules that involve several keys (each key alone is checked by the schema)."""
    data, method = settings["data"], settings["method"]
    problems = []
    if data["unlabelled"] == "folder" and not data["folder"]:
        problems.append("data.unlabelled=folder needs data.folder=PATH")
    if data["unlabelled"] != "folder" and not data["dataset"]:
        problems.append("data.dataset is not set (--dataset NAME, or data.unlabelled=folder with data.folder=PATH)")
    if method["selection"] in ("paper", "val") and not data["dataset"]:
        problems.append(f"method.selection={method['selection']} reads a labelled dataset: set data.dataset")
    try:
        from promptkd.models.students import resolve_student

        resolve_student(settings["student"]["arch"])
    except ValueError as exc:
        problems.append(f"student.arch: {exc}")
    if problems:
        raise RunFolderError("invalid distill config: " + "; ".join(problems))


def selection_label(selection: str, protocol: str) -> str:
    if selection == "paper" and protocol != "base2novel":
        return SELECTION_LABELS["paper_target"]
    return SELECTION_LABELS[selection]


# --------------------------------------------------------------------------------------------------
# data: planned from file lists before any model is loaded


@dataclass
class DataPlan:
    train_paths: list[str]
    held_out: list[str]
    source: str
    bench: Any = None  # the labelled dataset the run is about (classes, val/test for selection), if any
    notes: list[str] = field(default_factory=list)
    labelled: tuple[list, list[int]] | None = None  # selection=val/paper: (samples, store rows of their labels)

    def info(self) -> dict:
        return {"source": self.source, "images": len(self.train_paths), "held_out": len(self.held_out)}


def split_holdout(paths: list[str], share: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) paths: a seeded ``share`` of the images, at least one, never trained on."""
    order = list(range(len(paths)))
    random.Random(seed).shuffle(order)
    n_hold = max(1, round(share * len(paths)))
    held = set(order[:n_hold])
    return [p for i, p in enumerate(paths) if i not in held], [p for i, p in enumerate(paths) if i in held]


def plan_data(settings: dict, data_root: str | Path | None, store) -> DataPlan:
    """Image lists of the unlabelled stream (and the held-out share), checked against the class vectors."""
    from promptkd.data.benchmarks import load_benchmark
    from promptkd.data.custom import held_out_images_in, is_custom_dataset
    from promptkd.data.splits import unlabelled_from

    data, seed = settings["data"], int(settings["train"]["seed"])
    bench, notes = None, []
    if data["dataset"] and (data["unlabelled"] != "folder" or data_root or is_custom_dataset(data["dataset"])):
        bench = load_benchmark(data_root, data["dataset"])
        store.check_classes(bench.classnames, source=f"{bench.name} dataset")
    if data["unlabelled"] == "folder":
        folder = Path(data["folder"]).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"data.folder={data['folder']}: no such folder ({folder.resolve()}); it should "
                                    "hold the unlabelled images (sub-folders are searched too)")
        paths = unlabelled_from(folder)
        source = f"folder {data['folder']}"
        if not paths:
            raise ValueError(f"{data['folder']}: no images found for distillation")
        if bench is not None:
            leaked = held_out_images_in(paths, bench)
            if leaked:
                notes.append(f"{len(leaked)} of {bench.name}'s test images are in {data['folder']} (e.g. {leaked[0]}): "
                             "an evaluation on them is transductive, not held out")
    else:
        paths = unlabelled_from(bench, data["unlabelled"])
        source = f"{bench.name} {data['unlabelled']}"
        if not paths:
            raise ValueError(f"{bench.name}: no {data['unlabelled']} images to distil from")
    held: list[str] = []
    if settings["method"]["selection"] == "agreement":
        paths, held = split_holdout(paths, float(data["holdout"]), seed)
    plan = DataPlan(paths, held, source, bench, notes)
    plan.labelled = selection_images(settings, plan, store)
    return plan


def selection_images(settings: dict, plan: DataPlan, store) -> tuple[list, list[int]] | None:
    """Labelled images of the ``val`` / ``paper`` rules and the store rows their labels index, or None."""
    from promptkd.data.splits import base_novel_split, few_shot
    from promptkd.evaluate import map_classes_to_store

    selection, protocol = settings["method"]["selection"], settings["protocol"]
    if selection not in ("val", "paper"):
        return None
    bench = plan.bench
    if protocol == "base2novel":
        # store rows = labels (the store was checked against the class list); base labels keep their numbers
        rows = list(base_novel_split(bench).base_labels)
    else:
        rows = map_classes_to_store(store, bench.classnames, bench.imagenet_indices, source=bench.name)
    if selection == "paper":
        samples = list(bench.test)
    else:
        if not bench.val or bench.val is bench.test or bench.eval_only:
            raise ValueError(f"{bench.name} has no validation split apart from its test split: method.selection=val "
                             "is not possible (use agreement, or paper)")
        samples = list(bench.val)
        shots = int(settings["data"]["val_shots"])
        if shots:  # over all classes, after the 16 train shots of the same seeded stream, as Dassl draws val
            samples = few_shot(bench.val, shots, int(settings["train"]["seed"]), name=f"{bench.name}_val",
                               after=(bench.train, 16))
    keep = set(rows) if protocol == "base2novel" else None
    if keep is not None:
        samples = [s for s in samples if s.label in keep]
    if not samples:
        raise ValueError(f"{bench.name}: no {'test' if selection == 'paper' else 'validation'} images for "
                         f"method.selection={selection}")
    return samples, rows


def _image_options(settings: dict) -> dict:
    data = settings["data"]
    return {"on_bad_image": data["on_bad_image"], "max_image_pixels": data["max_image_pixels"]}


def training_stream(settings: dict, plan: DataPlan, image_spec):
    """The unlabelled training images with the paper's augmentation, deterministic per (seed, epoch, index)."""
    from promptkd.data.loader import UnlabelledImages
    from promptkd.data.transforms import TrainAugment

    return UnlabelledImages(plan.train_paths, TrainAugment.from_spec(image_spec), seed=int(settings["train"]["seed"]),
                            **_image_options(settings))


def heldout_images(settings: dict, plan: DataPlan, image_spec):
    """The held-out unlabelled images of ``selection=agreement`` with test preprocessing (None otherwise)."""
    from promptkd.data.loader import UnlabelledImages
    from promptkd.data.transforms import Preprocess

    if not plan.held_out:
        return None
    return UnlabelledImages(plan.held_out, Preprocess.from_spec(image_spec), **_image_options(settings))


def build_selector(settings: dict, plan: DataPlan, store, image_spec, *, heldout=None, heldout_features=None):
    """The ``select_fn`` of the configured rule (None for ``last``). ``heldout_features``: the teacher's
    features of the held-out images from a teacher cache (agreement without a teacher)."""
    from promptkd.data.loader import LabelledImages, make_loader
    from promptkd.data.transforms import Preprocess
    from promptkd.engine import distributed as D
    from promptkd.methods.promptkd import agreement_selector, labelled_accuracy_selector

    shard = (D.rank(), D.world_size()) if D.world_size() > 1 else None
    workers = int(settings["train"]["num_workers"])
    if settings["method"]["selection"] == "agreement":
        held = heldout if heldout is not None else heldout_images(settings, plan, image_spec)
        return agreement_selector(make_loader(held, 64, num_workers=workers, distributed=shard),
                                  teacher_features=heldout_features)
    if plan.labelled is None:
        return None
    samples, rows = plan.labelled
    labelled = LabelledImages(samples, Preprocess.from_spec(image_spec), **_image_options(settings))
    return labelled_accuracy_selector(make_loader(labelled, 64, num_workers=workers, distributed=shard), rows)


def build_training_data(settings: dict, data_root: str | Path | None, store, image_spec, plan: DataPlan | None = None):
    """``(unlabelled training set, select_fn or None, info)`` of a run: what :func:`distill` trains on."""
    plan = plan or plan_data(settings, data_root, store)
    return training_stream(settings, plan, image_spec), build_selector(settings, plan, store, image_spec), plan.info()


# --------------------------------------------------------------------------------------------------
# models


SPOT_CHECK_CLASSES = 4
SPOT_CHECK_MIN_COSINE = 0.999


def check_store_matches_teacher(store, teacher, where: str) -> None:
    """The class vectors must come from THIS teacher: same identity (the weights path aside), and the
    teacher re-encodes a few class names to the stored vectors (cosine >= 0.999), which also catches
    other trained prompts on the same backbone."""
    from promptkd.config import flatten

    if store.teacher:
        a = {k: v for k, v in flatten(store.teacher).items() if k != "weights"}
        b = {k: v for k, v in flatten(teacher.identity()).items() if k != "weights"}
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if differ:
            raise ValueError(f"{where}: these class vectors were computed by another teacher (identity differs in "
                             f"{differ[:6]}); run `promptkd class-vectors` with this teacher")
    n = min(SPOT_CHECK_CLASSES, store.num_classes)
    with torch.no_grad():
        fresh = torch.nn.functional.normalize(teacher.encode_class_names(store.class_names[:n]).float().cpu(), dim=-1)
    cosine = (fresh * store.vectors[:n].float()).sum(-1)
    if float(cosine.min()) < SPOT_CHECK_MIN_COSINE:
        raise ValueError(f"{where}: these class vectors were computed by another teacher (re-encoding "
                         f"{store.class_names[:n]} gives cosine {float(cosine.min()):.4f} < {SPOT_CHECK_MIN_COSINE} "
                         "with the stored vectors); run `promptkd class-vectors` with this teacher")


def build_student(student_cfg: dict, weights: str | Path | None, teacher_dim: int, image_spec, *,
                  trust_checkpoint: bool = False, seed: int = 0, logit_scale: float = 100.0):
    """The frozen student backbone named by ``student.arch`` (:mod:`promptkd.models.students`) with fresh
    prompts (drawn from ``seed``) and a projector into ``teacher_dim`` (initialised from the global RNG:
    seed it first, as :func:`distill` does)."""
    from promptkd.models.students import StudentRequest
    from promptkd.models.students import build_student as build

    request = StudentRequest(weights=weights, teacher_dim=teacher_dim, image_spec=image_spec,
                             n_ctx=int(student_cfg["n_ctx"]), depth=int(student_cfg["depth"]),
                             projector=student_cfg["projector"], seed=seed, trust_checkpoint=trust_checkpoint,
                             logit_scale=logit_scale)
    return build(student_cfg["arch"], request)


# --------------------------------------------------------------------------------------------------
# the stage


def distill(cfg: DistillConfig | None = None, **fields: Any) -> StudentRun:
    """Stage 2 -> a student artefact in ``cfg.out`` (prompts + projector + the class vectors).

    Under torchrun every process runs the same loop (DDP) and only rank 0 writes files."""
    cfg = cfg or DistillConfig(**fields)
    with distributed_session(), RunFolder(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite,
                                          command="distill") as folder:
        return _distill(cfg, folder)


def _distill(cfg: DistillConfig, folder: RunFolder) -> StudentRun:
    from promptkd import artifacts
    from promptkd import config as cfgmod
    from promptkd.engine import distributed as D
    from promptkd.engine.loop import fit, resolve_device
    from promptkd.methods.promptkd import DistillModule
    from promptkd.methods.teacher_io import load_teacher
    from promptkd.store import ClassVectorStore

    say = Messages("distill", cfg.quiet)
    folder.say_notes("distill")
    out = folder.path
    overrides: Any = cfg.overrides
    for key, value in (("data.dataset", cfg.dataset), ("student.arch", cfg.student_arch)):
        if value:
            overrides = ({**overrides, key: value} if isinstance(overrides, Mapping)
                         else [*overrides, f"{key}={value}"])
    settings, schedule_changes = resolve_settings(DistillSettings, folder, cfg.preset, overrides, cfg.seed,
                                                  where="distill config")
    check_settings(settings)
    seed = int(settings["train"]["seed"])
    loop_cfg = LoopConfig(**settings["train"])

    from promptkd.models.students import resolve_student

    if resolve_student(settings["student"]["arch"])[0].needs_weights and not cfg.student_weights:
        raise ValueError(f"student.arch={settings['student']['arch']} needs --student-weights FILE (a CLIP checkpoint)")
    store = ClassVectorStore.load(cfg.class_vectors)
    minimum_classes(store.class_names, str(cfg.class_vectors), "distill")
    plan = plan_data(settings, cfg.data_root, store)
    for note in plan.notes:
        say(f"note: {note}")

    device = resolve_device(loop_cfg.device)
    if cfg.teacher_cache:  # the teacher's outputs were computed ahead: it is not loaded at all
        from promptkd.methods.teacher_cache import cache_image_spec

        teacher, teacher_meta, spec_t = None, _teacher_meta(cfg.teacher), cache_image_spec(cfg.teacher_cache)
    else:
        teacher, teacher_meta = load_teacher(cfg.teacher, weights=cfg.teacher_weights,
                                             trust_checkpoint=cfg.trust_checkpoint)
        check_store_matches_teacher(store, teacher, str(cfg.class_vectors))
        teacher, spec_t = teacher.to(device), teacher.image_spec
    torch.manual_seed(seed)  # the projector's initialisation comes from the run seed
    student = build_student(settings["student"], cfg.student_weights, store.dim, spec_t,
                            trust_checkpoint=cfg.trust_checkpoint, seed=seed,
                            logit_scale=float(store.logit_scale)).to(device)
    spec_s = student.image_spec
    if (spec_t.size, spec_t.mean, spec_t.std) != (spec_s.size, spec_s.mean, spec_s.std):
        raise ValueError(f"teacher and student expect different images ({spec_t} vs {spec_s}); both must see the "
                         "same augmented batch")

    train_set, info = training_stream(settings, plan, spec_s), plan.info()
    cache = None
    if cfg.teacher_cache:
        train_set, cache, select_fn = _from_cache(cfg, settings, plan, store, train_set, spec_s)
        info["teacher_cache"] = {"path": str(cfg.teacher_cache), "views": cache.views, "dtype": cache.dtype}
    else:
        select_fn = build_selector(settings, plan, store, spec_s)
    label = selection_label(settings["method"]["selection"], settings["protocol"])
    run_info = {"config_source": str(cfg.preset) if cfg.preset else None,
                "data_root": str(cfg.data_root) if cfg.data_root else None, "teacher": str(cfg.teacher),
                "class_vectors": str(cfg.class_vectors), "student_weights": str(cfg.student_weights),
                "store_fingerprint": store.fingerprint(), "teacher_adapter_sha256": teacher_meta.get("adapter_sha256"),
                "student_sha256": student.identity().get("sha256"), "seed": seed, "unlabelled": info,
                "teacher_cache": info.get("teacher_cache"),
                "teacher_summary": {"artefact": str(cfg.teacher), "adapter_sha256": teacher_meta.get("adapter_sha256"),
                                    "dataset": teacher_meta.get("config", {}).get("dataset"),
                                    "selection": teacher_meta.get("selection")}}
    check_same_inputs(folder, run_info, ("store_fingerprint", "teacher_adapter_sha256", "student_sha256",
                                         "teacher_cache"))
    if D.is_main():
        cfgmod.save(settings, out / "config.yaml")
        write_run_record(out, run_info)
        if plan.held_out:
            from promptkd.fileio import atomic_write_json

            atomic_write_json(out / "held_out.json", {"seed": seed, "share": settings["data"]["holdout"],
                                                      "paths": plan.held_out})
    if schedule_changes:
        log_event(out, {"type": "resume_changes", "changes": schedule_changes})
        say("resuming with a changed schedule: " + "; ".join(schedule_changes))
    n_train = sum(p.numel() for p in student.trainable_parameters())
    say(f"{info['source']}: {info['images']} unlabelled images"
        f"{' (+' + str(info['held_out']) + ' held out)' if info['held_out'] else ''}, {store.num_classes} classes, "
        f"{n_train:,} trainable values, selection {settings['method']['selection']}, {loop_cfg.epochs} epochs x batch "
        f"{loop_cfg.batch_size} x {D.world_size()} process(es) -> {out}")

    m = settings["method"]
    module = DistillModule(teacher, student, store, temperature=m["temperature"], kd_weight=m["kd_weight"],
                           weighting=m["weighting"], selection=m["selection"], select_fn=select_fn,
                           selection_label=label, teacher_logit_scale=cache.logit_scale if cache else None)
    result = fit(module, train_set, loop_cfg, out, resume=cfg.resume, tensorboard=settings["log"]["tensorboard"])
    run = StudentRun(out, None, bool(result["completed"]), settings, data=info, history=list(result["history"]))
    if not run.completed:
        say(f"stopped after {result['global_step']} steps (max_steps); continue with --resume")
        return run
    run.selection = module.selection_record()
    if run.selection.get("selected_epoch") is None and result.get("epochs_done"):
        run.selection["selected_epoch"] = int(result["epochs_done"])  # the last epoch's student is the one kept
    if D.is_main():
        student.eval()
        artifacts.save_adapter(student, out, "student", store=store, config=copy.deepcopy(settings), extra={
            "selection": run.selection, "protocol": settings["protocol"], "dataset": settings["data"]["dataset"],
            "seed": seed, "teacher": run_info["teacher_summary"], "unlabelled": info, "final_metrics": result["last"]})
        last = result["last"]
        sel = run.selection
        say(f"done (loss {last.get('loss', float('nan')):.4g}, teacher agreement "
            f"{last.get('agreement', float('nan')):.1f}%); kept the epoch-{sel.get('selected_epoch')} student "
            f"({sel.get('selection')}); student artefact in {out}")
    D.barrier()
    run.artefact = out
    return run


def _teacher_meta(teacher: str | Path) -> dict:
    """adapter.json of a teacher artefact (an authors' checkpoint has none)."""
    from promptkd import artifacts

    try:
        return artifacts.read_meta(teacher)[1]
    except FileNotFoundError:
        return {}


def _from_cache(cfg: DistillConfig, settings: dict, plan: DataPlan, store, train_set, image_spec):
    """``(stream with the cached teacher features, cache, select_fn)``; a cache built for another teacher,
    store, stream, seed, augmentation or held-out set is refused naming the field."""
    from promptkd.methods import teacher_cache as tc

    heldout = heldout_images(settings, plan, image_spec)
    expected = tc.cache_identity(
        teacher=tc.teacher_checksum_for(cfg.teacher, cfg.teacher_weights, cfg.trust_checkpoint),
        class_vectors=store.fingerprint(), dataset=tc.stream_name(settings), train_set=train_set,
        heldout_set=heldout, epochs=int(settings["train"]["epochs"]), views=None, dtype=None)
    cache = tc.open_teacher_cache(cfg.teacher_cache, expected)
    select_fn = build_selector(settings, plan, store, image_spec, heldout=heldout,
                               heldout_features=cache.heldout_features() if heldout is not None else None)
    return tc.CachedTeacherImages(train_set, cache), cache, select_fn
