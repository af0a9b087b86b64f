"""``promptkd class-vectors``: run the prompted teacher's text tower ONCE over every class name of a
dataset (base and novel) and store the L2-normalised class vectors for stage 2 and inference."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    p.add_argument("--clip-weights", help="CLIP weights (overrides the path recorded in the teacher artefact)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow unpickling a checkpoint that is not a plain tensor file (only if you trust it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument("--batch-size", type=int, default=256, help="class names per text-tower batch")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def dataset_class_names(data_root: str | None, dataset: str) -> list[str]:
    """Every class of a benchmark in label order (base classes first, then novel)."""
    from promptkd.data.benchmarks import load_benchmark

    return list(load_benchmark(data_root, dataset, check_files=False).classnames)


def run(args: argparse.Namespace) -> int:
    from promptkd.engine.loop import resolve_device
    from promptkd.methods.teacher_io import compute_class_vectors, load_teacher, read_class_names

    names = (read_class_names(args.class_names) if args.class_names
             else dataset_class_names(args.data_root, args.dataset))
    teacher, meta = load_teacher(args.teacher, weights=args.clip_weights, trust_checkpoint=args.trust_checkpoint)
    teacher = teacher.to(resolve_device(args.device))
    store = compute_class_vectors(teacher, names, batch_size=args.batch_size)
    out = store.save(Path(args.out))
    trained_on = meta.get("class_names") or []
    extra = ""
    if trained_on:
        seen = len(set(trained_on) & set(names))
        extra = f"; {seen} of them among the teacher's {len(trained_on)} training classes"
    print(f"class-vectors: {store.num_classes} classes x {store.dim} dims, logit scale {store.logit_scale:.4g}"
          f"{extra} -> {out} (fingerprint {store.fingerprint()})", file=sys.stderr)
    return 0
