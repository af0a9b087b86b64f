"""``promptkd class-vectors``: run the prompted teacher's text tower ONCE over every class name of a
dataset (base and novel) and store the L2-normalised class vectors for stage 2 and inference
(:func:`promptkd.stages.build_class_vectors` does the work)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from promptkd.data.custom import DATA_ROOT_HELP, DATASET_HELP

    p = subparsers.add_parser(
        "class-vectors", help="pre-compute the teacher's class vectors for every class of a dataset",
        description="Encode every class name of a dataset (all classes: base and novel, in label order) with "
                    "the prompted teacher text tower, once, and save them with the class names, the logit "
                    "scale and the teacher's identity in one .safetensors file.")
    p.add_argument("--teacher", required=True,
                   help="teacher artefact folder (from train-teacher/convert-teacher), or an authors' Dassl "
                        "checkpoint (then --clip-weights is required)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="its class list (base and novel, in label order) is used; " + DATASET_HELP)
    src.add_argument("--class-names", help="text file with one class name per line, in label order")
    p.add_argument("--data-root", help=DATA_ROOT_HELP)
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--clip-weights", help="CLIP weights (overrides the path recorded in the teacher artefact)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow unpickling a checkpoint named here that is not a plain tensor file (only if you trust it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="class names per text-tower batch (default %(default)s)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from promptkd.stages import ClassVectorsConfig, build_class_vectors

    build_class_vectors(ClassVectorsConfig(
        teacher=args.teacher, out=args.out, dataset=args.dataset, class_names=args.class_names,
        data_root=args.data_root, clip_weights=args.clip_weights, trust_checkpoint=args.trust_checkpoint,
        device=args.device, batch_size=args.batch_size, overwrite=args.overwrite))
    return 0
