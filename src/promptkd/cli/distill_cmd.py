"""``promptkd distill``: stage 2, distil the frozen prompted teacher into the student from unlabelled images.

    promptkd distill --config distill/base2novel/caltech101 --data-root DATA \\
        --teacher runs/.../teacher --class-vectors runs/.../class_vectors.safetensors \\
        --student-weights ViT-B-16.pt --out runs/base2novel/caltech101/seed1/student --seed 1

Multi-GPU: ``torchrun --nproc_per_node=N -m promptkd distill ...`` (``train.batch_size`` is per process).
The run folder gets ``config.yaml`` (the resolved config), ``run.json``, ``log.jsonl``, ``summary.csv``,
``checkpoints/last.pt`` and, when training completes, the student artefact (``adapter.safetensors``,
``adapter.json`` recording the selection rule, ``class_vectors.safetensors``).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from pathlib import Path

UNLABELLED_MODES = ("transductive", "inductive", "folder")
PROTOCOLS = ("base2novel", "cross_dataset", "domain_generalization", "custom")
# settings that may change when a run is resumed (they do not change what is computed)
RESUMABLE_CHANGES = ("train.num_workers", "train.device", "train.log_every", "train.max_steps",
                     "train.checkpoint_every_steps")


def defaults() -> dict:
    """Every key a distillation config may set, with the paper's base-to-novel values."""
    from promptkd.engine.loop import LoopConfig

    return {
        "protocol": "base2novel",
        "data": {
            "dataset": None,  # benchmark name, folder:PATH or list:FILE (own data); None with unlabelled=folder
            "unlabelled": "transductive",  # transductive (paper) | inductive (base classes) | folder
            "folder": None,  # a folder of unlabelled images (unlabelled=folder)
            "holdout": 0.1,  # share of the unlabelled images held out for selection=agreement
            "on_bad_image": "skip",
        },
        "student": {"kind": "clip", "n_ctx": 4, "depth": 9, "projector": "mlp"},
        "method": {"temperature": 1.0, "kd_weight": 1000.0, "weighting": "authors", "selection": "last"},
        "train": LoopConfig(precision="fp16").as_dict(),
    }


def register(subparsers: argparse._SubParsersAction) -> None:
    from promptkd.data.custom import DATASET_HELP

    p = subparsers.add_parser(
        "distill", help="stage 2: distil the teacher into the student's prompts from unlabelled images",
        description="Train the student's prompts and projector so that its logits over the stored class "
                    "vectors match the frozen teacher's (KL divergence), on unlabelled images only. Presets: "
                    "distill/base2novel/<dataset>, distill/cross_dataset/<dataset>, "
                    "distill/domain_generalization/<variant>, distill/custom (your own data).")
    p.add_argument("--config", required=True, help="YAML file or packaged preset, e.g. distill/base2novel/dtd")
    p.add_argument("--data-root", help="data root in CoOp's layout (benchmarks; optional with folder:PATH / "
                   "list:FILE datasets and with data.unlabelled=folder)")
    p.add_argument("--dataset", help="sets data.dataset (the config's dataset otherwise): " + DATASET_HELP)
    p.add_argument("--teacher", required=True,
                   help="teacher artefact folder (train-teacher / convert-teacher), or an authors' Dassl checkpoint "
                        "(then --teacher-weights is required)")
    p.add_argument("--class-vectors", required=True, help="class-vector store from `promptkd class-vectors`")
    p.add_argument("--student-weights", required=True, help="CLIP checkpoint of the student (e.g. ViT-B-16.pt)")
    p.add_argument("--teacher-weights", help="CLIP weights of the teacher (overrides the path in the artefact)")
    p.add_argument("--out", required=True, help="run folder: config, logs, checkpoints and the student artefact")
    p.add_argument("--seed", type=int, default=1, help="seed for data order, augmentation and hold-out (default 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set method.selection=agreement (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow unpickling CLIP weights that are not plain tensor files (only if you trust them)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


# --- configuration --------------------------------------------------------------------------------------


def resolve_config(config: str | None, overrides: list[str], seed: int) -> dict:
    from promptkd import config as cfgmod
    from promptkd.methods.promptkd import SELECTIONS, WEIGHTINGS

    cfg = cfgmod.resolve(defaults(), config, [*overrides, f"train.seed={seed}"])
    data, method = cfg["data"], cfg["method"]
    problems = []
    if cfg["protocol"] not in PROTOCOLS:
        problems.append(f"protocol must be one of {PROTOCOLS}, not {cfg['protocol']!r}")
    if data["unlabelled"] not in UNLABELLED_MODES:
        problems.append(f"data.unlabelled must be one of {UNLABELLED_MODES}, not {data['unlabelled']!r}")
    if data["unlabelled"] == "folder" and not data["folder"]:
        problems.append("data.unlabelled=folder needs data.folder=PATH")
    if data["unlabelled"] != "folder" and not data["dataset"]:
        problems.append("data.dataset is not set (or use data.unlabelled=folder with data.folder=PATH)")
    if not 0.0 < float(data["holdout"]) < 1.0:
        problems.append(f"data.holdout must be in (0, 1), got {data['holdout']}")
    if method["weighting"] not in WEIGHTINGS:
        problems.append(f"method.weighting must be one of {WEIGHTINGS}, not {method['weighting']!r}")
    if method["selection"] not in SELECTIONS:
        problems.append(f"method.selection must be one of {tuple(SELECTIONS)}, not {method['selection']!r}")
    if method["selection"] == "paper" and (cfg["protocol"] != "base2novel" or data["unlabelled"] == "folder"):
        problems.append("method.selection=paper (best epoch on the base test set) only exists for base2novel "
                        "runs on a benchmark")
    if float(method["temperature"]) <= 0:
        problems.append(f"method.temperature must be > 0, got {method['temperature']}")
    if problems:
        raise ValueError("invalid distill config: " + "; ".join(problems))
    return cfg


def check_resume(saved_cfg: dict, cfg: dict, saved_run: dict, run_info: dict, where: Path) -> None:
    from promptkd.config import differences

    changed = differences(saved_cfg, cfg, RESUMABLE_CHANGES)
    for key in ("store_fingerprint", "teacher_adapter_sha256"):
        if saved_run.get(key) != run_info.get(key):
            changed.append(f"{key}: {saved_run.get(key)!r} -> {run_info.get(key)!r}")
    if changed:
        raise ValueError(f"{where}: cannot resume with different settings ({'; '.join(changed[:8])}); use a new --out")


# --- models ---------------------------------------------------------------------------------------------


def load_teacher(path: str, weights: str | None, trust_checkpoint: bool):
    """``(teacher, meta)``: a teacher artefact (or an authors' Dassl checkpoint, given ``weights``), frozen."""
    from promptkd.methods.teacher_io import load_teacher as load

    return load(path, weights=weights, trust_checkpoint=trust_checkpoint)


def build_student(student_cfg: dict, weights: str, teacher_dim: int, trust_checkpoint: bool, seed: int = 0):
    """The frozen CLIP image encoder with fresh VPT-deep prompts and a projector into ``teacher_dim``."""
    if student_cfg.get("kind", "clip") != "clip":
        raise ValueError(f"student.kind {student_cfg.get('kind')!r}: only 'clip' students are built here")
    from promptkd.models.clip_backbones import load_clip_student

    prompts = {"n_ctx_text": 0, "text_depth": 0, "ctx_init": None,
               "n_ctx_vision": int(student_cfg["n_ctx"]), "vision_depth": int(student_cfg["depth"])}
    return load_clip_student(weights, teacher_dim, prompts, projector=student_cfg["projector"],
                             trust_checkpoint=trust_checkpoint, prompt_seed=seed)


SPOT_CHECK_CLASSES = 4
SPOT_CHECK_MIN_COSINE = 0.999


def check_store_matches_teacher(store, teacher, where: str) -> None:
    """The class vectors must come from THIS teacher: same identity (the weights path aside), and the
    teacher re-encodes a few class names to the stored vectors (cosine >= 0.999), which also catches
    other trained prompts on the same backbone."""
    import torch

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


# --- data -----------------------------------------------------------------------------------------------


def split_holdout(paths: list[str], share: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) paths: a seeded ``share`` of the images, at least one, never trained on."""
    order = list(range(len(paths)))
    random.Random(seed).shuffle(order)
    n_hold = max(1, round(share * len(paths)))
    held = set(order[:n_hold])
    return [p for i, p in enumerate(paths) if i not in held], [p for i, p in enumerate(paths) if i in held]


def build_data(cfg: dict, data_root: str | None, store, image_spec):
    """(unlabelled training set, select_fn or None, description) for the configured setting."""
    from promptkd.data.benchmarks import load_benchmark
    from promptkd.data.custom import held_out_images_in, is_custom_dataset
    from promptkd.data.loader import LabelledImages, UnlabelledImages, make_loader
    from promptkd.data.splits import base_novel_split, unlabelled_from
    from promptkd.data.transforms import Preprocess, TrainAugment
    from promptkd.engine import distributed as D
    from promptkd.methods.promptkd import agreement_selector, base_accuracy_selector

    data, train, method = cfg["data"], cfg["train"], cfg["method"]
    seed = int(train["seed"])
    bench = None
    if data["unlabelled"] == "folder":
        paths = unlabelled_from(data["folder"])
        source = f"folder {data['folder']}"
        if not paths:
            raise ValueError(f"{data['folder']}: no images found for distillation")
        if data["dataset"] and (data_root or is_custom_dataset(data["dataset"])):  # the dataset it is tested on
            bench = load_benchmark(data_root, data["dataset"])
            store.check_classes(bench.classnames, source=f"{bench.name} dataset")
            leaked = held_out_images_in(paths, bench)
            if leaked and D.is_main():
                print(f"distill: note: {len(leaked)} of {bench.name}'s test images are in {data['folder']} (e.g. "
                      f"{leaked[0]}): an evaluation on them is transductive, not held out", file=sys.stderr)
    else:
        bench = load_benchmark(data_root, data["dataset"])
        store.check_classes(bench.classnames, source=f"{bench.name} dataset")
        paths = unlabelled_from(bench, data["unlabelled"])
        source = f"{bench.name} {data['unlabelled']}"
    shard = (D.rank(), D.world_size()) if D.world_size() > 1 else None
    eval_tf = Preprocess.from_spec(image_spec)
    select_fn = None
    held: list[str] = []
    if method["selection"] == "agreement":
        paths, held = split_holdout(paths, float(data["holdout"]), seed)
        held_set = UnlabelledImages(held, eval_tf, on_bad_image=data["on_bad_image"])
        select_fn = agreement_selector(make_loader(held_set, 64, num_workers=train["num_workers"], distributed=shard))
    elif method["selection"] == "paper":
        base_test = base_novel_split(bench).base.test
        test_set = LabelledImages(base_test, eval_tf, on_bad_image=data["on_bad_image"])
        select_fn = base_accuracy_selector(make_loader(test_set, 64, num_workers=train["num_workers"],
                                                       distributed=shard))
    train_set = UnlabelledImages(paths, TrainAugment.from_spec(image_spec), seed=seed,
                                 on_bad_image=data["on_bad_image"])
    info = {"source": source, "images": len(paths), "held_out": len(held)}
    return train_set, select_fn, info


# --- the command ----------------------------------------------------------------------------------------


def distill(cfg: dict, teacher, student, store, train_set, select_fn, out: Path, *, resume: bool,
            run_info: dict) -> dict:
    """Run stage 2 with built models and data; save the student artefact when training completes."""
    from promptkd import artifacts
    from promptkd.engine import distributed as D
    from promptkd.engine.loop import LoopConfig, fit
    from promptkd.methods.promptkd import DistillModule

    m = cfg["method"]
    module = DistillModule(teacher, student, store, temperature=float(m["temperature"]),
                           kd_weight=float(m["kd_weight"]), weighting=m["weighting"], selection=m["selection"],
                           select_fn=select_fn)
    loop_cfg = LoopConfig.from_dict(cfg["train"])
    result = fit(module, train_set, loop_cfg, out, resume=resume)
    if not result["completed"]:
        return result
    if D.is_main():
        student.eval()
        record = module.selection_record()
        artifacts.save_adapter(student, out, "student", store=store, config=copy.deepcopy(cfg), extra={
            "selection": record, "protocol": cfg["protocol"], "dataset": cfg["data"]["dataset"],
            "seed": int(cfg["train"]["seed"]), "teacher": run_info.get("teacher_summary", {}),
            "unlabelled": run_info.get("unlabelled", {}), "final_metrics": result["last"]})
    D.barrier()
    return result


def run(args: argparse.Namespace) -> int:
    from promptkd import config as cfgmod
    from promptkd.engine import distributed as D
    from promptkd.engine.loop import resolve_device
    from promptkd.store import ClassVectorStore

    D.init_from_env()
    try:
        out = Path(args.out)
        dataset = [f"data.dataset={json.dumps(args.dataset)}"] if getattr(args, "dataset", None) else []
        cfg = resolve_config(args.config, [*dataset, *args.overrides], args.seed)
        if (out / "checkpoints" / "last.pt").is_file() and not args.resume:
            raise ValueError(f"{out}: holds an earlier run (checkpoints/last.pt); pass --resume or choose another --out")
        store = ClassVectorStore.load(args.class_vectors)
        device = resolve_device(cfg["train"]["device"])
        if device.type == "cpu" and cfg["train"]["precision"] == "fp16" and D.is_main():
            print("distill: note: precision fp16 (the paper's GPU setting) on a CPU runs fp16 autocast without a "
                  "gradient scaler and is often slower; consider --set train.precision=fp32 (or bf16)",
                  file=sys.stderr)
        teacher, teacher_meta = load_teacher(args.teacher, args.teacher_weights, args.trust_checkpoint)
        run_info = {"config_source": args.config, "data_root": args.data_root, "teacher": str(args.teacher),
                    "class_vectors": str(args.class_vectors), "student_weights": str(args.student_weights),
                    "store_fingerprint": store.fingerprint(),
                    "teacher_adapter_sha256": teacher_meta.get("adapter_sha256")}
        if args.resume and (out / "config.yaml").is_file() and (out / "run.json").is_file():
            check_resume(cfgmod.load_yaml(out / "config.yaml"), cfg, json.loads((out / "run.json").read_text()),
                         run_info, out / "config.yaml")
        check_store_matches_teacher(store, teacher, str(args.class_vectors))
        student = build_student(cfg["student"], args.student_weights, store.dim, args.trust_checkpoint,
                                seed=int(cfg["train"]["seed"]))
        teacher, student = teacher.to(device), student.to(device)
        spec_t, spec_s = teacher.image_spec, student.image_spec
        if (spec_t.size, spec_t.mean, spec_t.std) != (spec_s.size, spec_s.mean, spec_s.std):
            raise ValueError(f"teacher and student expect different images ({spec_t} vs {spec_s}); both must see "
                             "the same augmented batch")
        train_set, select_fn, data_info = build_data(cfg, args.data_root, store, spec_s)
        run_info.update(unlabelled=data_info, teacher_summary={
            "artefact": str(args.teacher), "adapter_sha256": teacher_meta.get("adapter_sha256"),
            "dataset": teacher_meta.get("config", {}).get("dataset")})
        if D.is_main():
            cfgmod.save(cfg, out / "config.yaml")
            (out / "run.json").write_text(json.dumps(run_info, indent=2, default=str))
            n_train = sum(p.numel() for p in student.trainable_parameters())
            print(f"distill: {data_info['source']}: {data_info['images']} unlabelled images"
                  f"{' (+' + str(data_info['held_out']) + ' held out)' if data_info['held_out'] else ''}, "
                  f"{store.num_classes} classes, {n_train:,} trainable values, selection {cfg['method']['selection']}, "
                  f"{cfg['train']['epochs']} epochs x batch {cfg['train']['batch_size']} x {D.world_size()} "
                  f"process(es) -> {out}", file=sys.stderr)
        result = distill(cfg, teacher, student, store, train_set, select_fn, out, resume=args.resume,
                         run_info=run_info)
        if D.is_main():
            if not result["completed"]:
                print(f"distill: stopped after {result['global_step']} steps (max_steps); continue with --resume",
                      file=sys.stderr)
            else:
                last = result["last"]
                print(f"distill: done (loss {last.get('loss', float('nan')):.4g}, teacher agreement "
                      f"{last.get('agreement', float('nan')):.1f}%); student artefact in {out}", file=sys.stderr)
        return 0
    finally:
        D.cleanup()
