"""``promptkd teacher-cache``: the frozen teacher's image features for a distill run, computed ahead of it.

    promptkd teacher-cache --config distill/base2novel/dtd --data-root DATA \\
        --teacher runs/.../teacher --class-vectors runs/.../class_vectors.safetensors --seed 1 \\
        --out runs/base2novel/dtd/seed1/teacher_cache [--views epochs|K] [--dtype fp16|fp32] [--resume]

Takes the same config, data, teacher and class-vector arguments as ``promptkd distill`` (no student) and
stores, for every image of the unlabelled stream that run would train on, the teacher's normalised
features of the augmented view of each epoch (``--views epochs``, exact) or of the first K epochs
(``--views K``, replayed: epoch e uses view e mod K), plus the held-out images' features when
``method.selection=agreement``. :func:`promptkd.stages.build_teacher_cache` does the work; see
``promptkd.methods.teacher_cache`` for the storage.
"""

from __future__ import annotations

import argparse

from promptkd.cli.common import preset_note, settings_help


def register(subparsers: argparse._SubParsersAction) -> None:
    from promptkd.data.custom import DATASET_HELP

    p = subparsers.add_parser(
        "teacher-cache", formatter_class=settings_help("promptkd.stages.distillation:DistillSettings", "config keys for --set KEY=VALUE",
                                                (), preset_note),
        help="stage 2 ahead of time: store the teacher's features of every augmented view",
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


def run(args: argparse.Namespace) -> int:
    from promptkd.stages.teacher_cache import TeacherCacheConfig, build_teacher_cache

    build_teacher_cache(TeacherCacheConfig(
        teacher=args.teacher, class_vectors=args.class_vectors, out=args.out, preset=args.config, dataset=args.dataset,
        data_root=args.data_root, teacher_weights=args.teacher_weights, overrides=args.overrides, seed=args.seed,
        views=args.views, dtype=args.dtype, batch_size=args.batch_size, precision=args.precision, device=args.device,
        workers=args.workers, shard_size=args.shard_size, resume=args.resume, trust_checkpoint=args.trust_checkpoint))
    return 0
