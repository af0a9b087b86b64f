"""``promptkd train-teacher`` (stage 1: PromptSRC/IVLP/CoOp prompts on few-shot labelled data) and
``promptkd convert-teacher`` (the authors' released Dassl checkpoints -> our teacher artefact)."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

# settings that may change when a run is resumed (they do not change what is computed)
RESUMABLE_CHANGES = ("train.num_workers", "train.device", "train.log_every", "train.max_steps",
                     "train.checkpoint_every_steps")


def defaults() -> dict:
    """Every key a teacher config may set, with the paper's values (presets override, --set too)."""
    from promptkd.engine.loop import LoopConfig
    from promptkd.methods.promptsrc import PromptSRCConfig
    from promptkd.methods.teacher_io import PROMPT_DEFAULTS

    method = PromptSRCConfig().to_dict()
    method.pop("epochs")  # always the loop's epochs
    train = LoopConfig(precision="fp16").as_dict()
    return {
        "teacher": dict(PROMPT_DEFAULTS),
        "method": method,
        "data": {"classes": "base", "shots": 16, "on_bad_image": "skip"},
        "train": train,
    }


def register(subparsers: argparse._SubParsersAction) -> None:
    from promptkd.data.custom import DATA_ROOT_HELP, DATASET_HELP

    train = subparsers.add_parser(
        "train-teacher", help="stage 1: learn the teacher's prompts (PromptSRC) on few-shot labelled data",
        description="Train the teacher's prompts (PromptSRC by default; IVLP and CoOp with --set "
                    "method.method=ivlp|coop) on K shots per class of a benchmark, and save the teacher "
                    "artefact (prompts in safetensors + JSON) in --out.")
    train.add_argument("--config", default="teacher/base2novel",
                       help="YAML file or packaged preset (teacher/base2novel, teacher/imagenet_all, "
                            "teacher/custom)")
    train.add_argument("--data-root", help=DATA_ROOT_HELP)
    train.add_argument("--dataset", required=True, help=DATASET_HELP)
    train.add_argument("--clip-weights", required=True, help="CLIP checkpoint of the teacher (e.g. ViT-L-14.pt)")
    train.add_argument("--out", required=True, help="run folder: config, logs, checkpoints and the artefact")
    train.add_argument("--seed", type=int, default=None,
                       help="seed for the few-shot draw and training (default 1; on --resume the run's own)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    train.add_argument("--resume", action="store_true",
                       help="continue the interrupted run in --out with its saved config (--set may change only "
                            + ", ".join(RESUMABLE_CHANGES) + ")")
    train.add_argument("--trust-checkpoint", action="store_true",
                       help="allow unpickling --clip-weights when it is not a plain tensor file (only if you trust it)")
    train.add_argument("--debug", action="store_true", help="show tracebacks")
    train.set_defaults(func=run_train)

    conv = subparsers.add_parser(
        "convert-teacher", help="convert the authors' Dassl teacher checkpoint to our teacher artefact",
        description="Read an authors' PromptSRC/PromptKD teacher checkpoint (model-best.pth.tar, "
                    "model.pth.tar-20 or its run folder), check it against the CLIP weights, and write a "
                    "teacher artefact (prompts in safetensors + JSON).")
    conv.add_argument("src", help="Dassl checkpoint file or folder")
    conv.add_argument("--clip-weights", required=True, help="the CLIP weights the teacher was trained from")
    conv.add_argument("--out", required=True, help="artefact folder to write")
    conv.add_argument("--class-names", help="text file, one class name per line, recorded in the artefact")
    conv.add_argument("--trust-checkpoint", action="store_true",
                      help="allow full unpickling of the checkpoint (Dassl files pickle the LR scheduler)")
    conv.add_argument("--debug", action="store_true", help="show tracebacks")
    conv.set_defaults(func=run_convert)


# --- train-teacher -------------------------------------------------------------------------------------


def resolve_config(config: str | None, overrides: list[str], seed: int) -> dict:
    """defaults <- preset <- --set; method constraints applied; the seed recorded in train.seed."""
    from promptkd import config as cfgmod
    from promptkd.methods.teacher_io import prompt_settings_for_method

    cfg = cfgmod.resolve(defaults(), config, [*overrides, f"train.seed={seed}"])
    cfg["teacher"] = prompt_settings_for_method(cfg["method"]["method"], cfg["teacher"])
    if cfg["data"]["classes"] not in ("base", "all"):
        raise ValueError(f"data.classes must be 'base' or 'all', not {cfg['data']['classes']!r}")
    if int(cfg["data"]["shots"]) < 1:
        raise ValueError(f"data.shots must be >= 1, got {cfg['data']['shots']}")
    return cfg


def check_resume_config(saved: dict, new: dict, where: Path) -> None:
    from promptkd.config import differences

    changed = differences(saved, new, RESUMABLE_CHANGES)
    if changed:
        shown = ", ".join(changed[:8])
        raise ValueError(f"{where}: cannot resume with a different config ({shown}); use a new --out")


def training_set(cfg: dict, data_root: str, dataset: str, out: Path, image_spec):
    """(LabelledImages of K shots per class, class names in label order, benchmark name)."""
    from promptkd.data.benchmarks import load_benchmark
    from promptkd.data.loader import LabelledImages
    from promptkd.data.splits import base_novel_split, few_shot_benchmark
    from promptkd.data.transforms import TrainAugment

    bench = load_benchmark(data_root, dataset)
    if bench.eval_only:
        raise ValueError(f"{bench.name} is evaluation-only (no labelled train split to learn prompts from)")
    if cfg["data"]["classes"] == "base":
        bench = base_novel_split(bench).base
    seed = int(cfg["train"]["seed"])
    shots = few_shot_benchmark(bench, int(cfg["data"]["shots"]), seed, cache_dir=out / "few_shot")
    transform = TrainAugment(image_spec.size, image_spec.mean, image_spec.std)
    data = LabelledImages(shots.train, transform, seed=seed, on_bad_image=cfg["data"]["on_bad_image"])
    return data, list(shots.classnames), bench.name


def _config_for_run(args: argparse.Namespace, out: Path) -> dict:
    """A fresh run: defaults <- preset <- --set. A resumed run: the saved config <- --set (only settings
    that do not change the computation may differ)."""
    from promptkd import config as cfgmod

    saved_cfg = out / "config.yaml"
    has_checkpoint = (out / "checkpoints" / "last.pt").is_file()
    if has_checkpoint and not args.resume:
        raise ValueError(f"{out}: holds an earlier run (checkpoints/last.pt); pass --resume or choose another --out")
    if args.resume and saved_cfg.is_file():
        saved = cfgmod.load_yaml(saved_cfg)
        saved.setdefault("train", {})["max_steps"] = None  # a stop point applies to one invocation only
        overrides = list(args.overrides) + ([f"train.seed={args.seed}"] if args.seed is not None else [])
        cfg = cfgmod.apply_overrides(saved, overrides)
        check_resume_config(saved, cfg, saved_cfg)
        return cfg
    return resolve_config(args.config, args.overrides, 1 if args.seed is None else args.seed)


def _check_same_run(out: Path, run_info: dict) -> None:
    """On resume: same dataset and the same CLIP weights (by checksum) as the interrupted run."""
    previous_path = out / "run.json"
    if not previous_path.is_file():
        return
    previous = json.loads(previous_path.read_text())
    for key in ("dataset", "clip_sha256"):
        if previous.get(key) and previous.get(key) != run_info.get(key):
            raise ValueError(f"{previous_path}: cannot resume, {key} was {previous[key]!r}, now {run_info[key]!r}")


def run_train(args: argparse.Namespace) -> int:
    """Under torchrun every process runs the same loop (DDP); only rank 0 writes files."""
    from promptkd.engine import distributed as D

    D.init_from_env()
    try:
        return _run_train(args, D.is_main())
    finally:
        D.barrier()
        D.cleanup()


def _run_train(args: argparse.Namespace, main_process: bool) -> int:
    from promptkd import artifacts
    from promptkd import config as cfgmod
    from promptkd.engine.loop import LoopConfig, fit, resolve_device
    from promptkd.methods.promptsrc import PromptSRCModule
    from promptkd.methods.teacher_io import build_teacher

    out = Path(args.out)
    cfg = _config_for_run(args, out)
    loop_cfg = LoopConfig.from_dict(cfg["train"])
    device = resolve_device(loop_cfg.device)
    teacher = build_teacher(args.clip_weights, cfg["teacher"], trust_checkpoint=args.trust_checkpoint).to(device)
    run_info = {"dataset": args.dataset, "data_root": str(args.data_root), "clip_weights": str(args.clip_weights),
                "clip_sha256": teacher.identity().get("sha256"), "config_source": args.config}
    if args.resume:
        _check_same_run(out, run_info)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfgmod.save(cfg, out / "config.yaml")
        (out / "run.json").write_text(json.dumps(run_info, indent=2))

    data, class_names, bench_name = training_set(cfg, args.data_root, args.dataset, out, teacher.image_spec)
    method_cfg = {**cfg["method"], "epochs": loop_cfg.epochs}
    say = (lambda *a, **k: print(*a, **k)) if main_process else (lambda *a, **k: None)
    say(f"train-teacher: {cfg['method']['method']} on {bench_name} ({cfg['data']['classes']} classes: "
          f"{len(class_names)}, {len(data)} images), {loop_cfg.epochs} epochs, batch {loop_cfg.batch_size}, "
          f"{sum(p.numel() for p in teacher.trainable_parameters()):,} prompt values, {device} -> {out}",
          file=sys.stderr)
    module = PromptSRCModule(teacher, class_names, method_cfg, dataset=args.dataset)
    result = fit(module, data, loop_cfg, out, resume=args.resume)
    for record in result["history"]:
        shown = "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in ("epoch", "steps"))
        say(f"  epoch {record['epoch']:>3}: {shown}", file=sys.stderr)
    if not result["completed"]:
        say(f"train-teacher: stopped after {result['global_step']} steps (max_steps); continue with --resume",
              file=sys.stderr)
        return 0
    if not main_process:
        return 0
    teacher.eval()
    selection = "gpa" if module.cfg.uses_gpa else "last_epoch"  # the prompts kept: GPA aggregate or last epoch
    artifacts.save_adapter(teacher, out, "teacher", class_names=class_names,
                           config={**copy.deepcopy(cfg), "dataset": bench_name, "stage": "teacher"},
                           extra={"selection": selection})
    print(f"train-teacher: teacher artefact (adapter.safetensors + adapter.json) in {out}", file=sys.stderr)
    return 0


# --- convert-teacher -----------------------------------------------------------------------------------


def run_convert(args: argparse.Namespace) -> int:
    from promptkd.methods.teacher_io import convert_dassl_teacher, read_class_names

    names = read_class_names(args.class_names) if args.class_names else None
    out = convert_dassl_teacher(args.src, args.clip_weights, args.out, trust_checkpoint=args.trust_checkpoint,
                                class_names=names)
    print(f"convert-teacher: wrote {out}")
    return 0
