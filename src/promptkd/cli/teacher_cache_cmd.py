"""``promptkd teacher-cache``: the frozen teacher's image features for a distill run, computed ahead of it.

    promptkd teacher-cache --config distill/base2novel/dtd --data-root DATA \\
        --teacher runs/.../teacher --class-vectors runs/.../class_vectors.safetensors --seed 1 \\
        --out runs/base2novel/dtd/seed1/teacher_cache [--views epochs|K] [--dtype fp16|fp32] [--resume]

Takes the same config, data, teacher and class-vector arguments as ``promptkd distill`` (no student) and
stores, for every image of the unlabelled stream that run would train on, the teacher's normalised
features of the augmented view of each epoch (``--views epochs``, exact) or of the first K epochs
(``--views K``, replayed: epoch e uses view e mod K), plus the held-out images' features when
``method.selection=agreement``. See ``promptkd.methods.teacher_cache``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from promptkd.data.custom import DATASET_HELP

    p = subparsers.add_parser(
        "teacher-cache", help="stage 2 ahead of time: store the teacher's features of every augmented view",
        description="Run the frozen prompted teacher's image tower over the augmented views a `promptkd distill` "
                    "run with the same config and seed will draw, and store the normalised features (memory-mapped "
                    "shards, resumable), so that distillation can run without the teacher.")
    p.add_argument("--config", required=True,
                   help="the distill config (YAML file or preset, e.g. distill/base2novel/dtd)")
    p.add_argument("--data-root", help="data root in CoOp's layout (as for distill)")
    p.add_argument("--dataset", help="sets data.dataset (the config's dataset otherwise): " + DATASET_HELP)
    p.add_argument("--teacher", required=True, help="teacher artefact folder (or an authors' Dassl checkpoint "
                   "with --teacher-weights)")
    p.add_argument("--class-vectors", required=True, help="class-vector store from `promptkd class-vectors`")
    p.add_argument("--teacher-weights", help="CLIP weights of the teacher (overrides the path in the artefact)")
    p.add_argument("--out", required=True, help="cache folder (manifest.json + .npy shards)")
    p.add_argument("--seed", type=int, default=1, help="the distill run's seed (augmentation, hold-out; default 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, as for distill (e.g. --set method.selection=agreement)")
    p.add_argument("--views", default="epochs",
                   help="'epochs' (default): one view per epoch, exact; K: the first K epochs' views, replayed")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"), help="stored feature type (default fp16)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted build in --out")
    p.add_argument("--batch-size", type=int,
                   help="teacher batch size (default: the config's train.batch_size, which gives the online run's "
                        "numbers bit for bit; larger is faster and moves logits by about one float32 ulp)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="autocast of the teacher forward (default: the config's train.precision, which gives the "
                        "online run's numbers)")
    p.add_argument("--device", help="device (default: the config's train.device)")
    p.add_argument("--workers", type=int, help="data loader workers (default: the config's train.num_workers)")
    p.add_argument("--shard-size", type=int, default=8192, help="images per shard file (default 8192)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow unpickling CLIP weights that are not plain tensor files (only if you trust them)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def build_stream(settings: dict, data_root: str | None, store, image_spec):
    """``(train_set, heldout_set or None, info)``: the unlabelled stream a distill run with ``settings``
    trains on (``promptkd.stages.distillation``'s own plan and training set), the held-out images of
    ``selection=agreement`` as its selector reads them (test preprocessing), and ``info["name"]``."""
    from promptkd.data.loader import UnlabelledImages
    from promptkd.data.transforms import Preprocess
    from promptkd.methods.teacher_cache import stream_name
    from promptkd.stages.distillation import build_training_data, plan_data

    plan = plan_data(settings, data_root, store)
    train_set, _, info = build_training_data(settings, data_root, store, image_spec, plan)
    heldout = None
    if plan.held_out:
        data = settings["data"]
        heldout = UnlabelledImages(plan.held_out, Preprocess.from_spec(image_spec), on_bad_image=data["on_bad_image"],
                                   max_image_pixels=data["max_image_pixels"])
    return train_set, heldout, {**info, "name": stream_name(settings), "notes": plan.notes}


def run(args: argparse.Namespace) -> int:
    from promptkd.methods.teacher_cache import build_teacher_cache
    from promptkd.methods.teacher_io import load_teacher
    from promptkd.stages.distillation import check_store_matches_teacher, distill_settings
    from promptkd.store import ClassVectorStore

    dataset = [f"data.dataset={args.dataset}"] if args.dataset else []
    settings = distill_settings(args.config, [*dataset, *args.overrides, f"train.seed={args.seed}"])
    train = settings["train"]
    views = args.views if args.views == "epochs" else _positive_int(args.views, "--views")
    store = ClassVectorStore.load(args.class_vectors)
    teacher, _ = load_teacher(args.teacher, args.teacher_weights, args.trust_checkpoint)
    check_store_matches_teacher(store, teacher, str(args.class_vectors))
    train_set, heldout, info = build_stream(settings, args.data_root, store, teacher.image_spec)
    for note in info["notes"]:
        print(f"teacher-cache: note: {note}", file=sys.stderr)
    n_views = int(train["epochs"]) if views == "epochs" else views
    print(f"teacher-cache: {info['source']}: {len(train_set)} images x {n_views} view(s)"
          f"{f' + {len(heldout)} held out' if heldout is not None else ''}, {args.dtype} -> {args.out}",
          file=sys.stderr)
    start = time.time()
    cache = build_teacher_cache(
        teacher, train_set, args.out, epochs=int(train["epochs"]), views=views, dtype=args.dtype,
        identity={"class_vectors": store.fingerprint(), "dataset": info["name"]}, heldout=heldout,
        batch_size=args.batch_size or int(train["batch_size"]), device=args.device or train["device"],
        precision=args.precision or train["precision"],
        num_workers=train["num_workers"] if args.workers is None else args.workers, shard_size=args.shard_size,
        resume=args.resume)
    size = sum(p.stat().st_size for p in Path(args.out).iterdir() if p.is_file())
    print(f"teacher-cache: done in {time.time() - start:.1f} s: {cache.num_images} images x {cache.num_views} view(s), "
          f"{size / 2**20:.1f} MiB in {args.out}", file=sys.stderr)
    return 0


def _positive_int(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{flag} must be 'epochs' or a positive number of views, got {text!r}") from None
    if value < 1:
        raise ValueError(f"{flag} must be 'epochs' or a positive number of views, got {text!r}")
    return value
