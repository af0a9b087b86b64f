"""``promptkd predict IMAGE... --student DIR``: top-k classes of images with a distilled student.

Only the student image encoder, its projector and the stored class vectors are used: no text encoder
is built and no tokenizer is loaded."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="classify images with a distilled student (no text encoder)",
                                   description=__doc__)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders (searched recursively)")
    parser.add_argument("--student", required=True, metavar="PATH",
                        help="student artefact folder, or a bundle written by `promptkd export --format safetensors`")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per image (default 5)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    add_weights_options(parser)
    parser.set_defaults(func=run)


def add_weights_options(parser: argparse.ArgumentParser) -> None:
    """Options for rebuilding a student folder's frozen backbone (not needed for a bundle)."""
    parser.add_argument("--clip-weights", metavar="FILE",
                        help="CLIP checkpoint to use instead of the path recorded in adapter.json (same checksum)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow unpickling a legacy (pickled) CLIP checkpoint; only for files you trust")


def builder_options(args: argparse.Namespace) -> dict:
    options = {}
    if getattr(args, "clip_weights", None):
        options["weights"] = args.clip_weights
    if getattr(args, "trust_checkpoint", False):
        options["trust_checkpoint"] = True
    return options


def run(args: argparse.Namespace) -> int:
    from promptkd.data.benchmarks import list_images
    from promptkd.serve import format_predictions, load_student, predict

    images = [p for arg in args.images for p in (list_images(arg) if Path(arg).is_dir() else [arg])]
    loaded = load_student(args.student, device=args.device, **builder_options(args))
    preds = predict(loaded, images, top_k=args.top_k, batch_size=args.batch_size, device=args.device)
    if args.json:
        print(json.dumps([p.to_json() for p in preds], indent=2))
    else:
        print(format_predictions(preds))
    return 0
