"""``promptkd predict IMAGE|FOLDER... --student PATH [--out predictions.csv|.jsonl]``: top-k classes.

Only the student image encoder, its projector and the stored class vectors are used: no text encoder
is built and no tokenizer is loaded. ``--student`` is a student folder, a safetensors bundle or an ONNX
file from ``promptkd export`` (fp32 or int8, run by onnxruntime).

Every image gives one row; an image that cannot be read is listed with the reason, the others are
still predicted, and the command exits with status 1. ``--out`` appends rows to a CSV or JSON-lines
file as it goes; rerunning the same command skips the images already in it (resumable)."""

from __future__ import annotations

import argparse
import json
import sys

EXIT_SOME_UNREADABLE = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    from promptkd.precision import PRECISION_CHOICES

    parser = subparsers.add_parser("predict", help="classify images with a distilled student (no text encoder)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders (searched recursively)")
    parser.add_argument("--student", required=True, metavar="PATH",
                        help="student artefact folder, a bundle from `promptkd export --format safetensors`, "
                             "or an ONNX file from `promptkd export --format onnx`")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="write rows to FILE.csv or FILE.jsonl (appended; a rerun skips images already in it) "
                             "instead of printing them (default: print)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table (without --out)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                        help="auto (default): bf16 where the CPU/GPU computes it natively and it agrees with fp32 "
                             "on the first 32+ images (>= 99.5%% top-1), else fp32. ONNX files run as exported")
    parser.add_argument("--backend", choices=("auto", "torch", "onnxruntime"), default="auto",
                        help="for a folder or bundle: auto (default) runs fp32 jobs of 256+ images on the CPU through "
                             "onnxruntime (exported on the fly; faster there, same outputs), else PyTorch")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: the library's choice)")
    parser.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                        help="larger images get an error row (JPEGs are decoded smaller instead) (default: "
                             "89,478,485, Pillow's limit)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
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
    from promptkd.batch_predict import format_rows, predict_rows, predict_to_file
    from promptkd.runtime import expand_inputs, load_predictor

    paths = expand_inputs(args.images)
    predictor = load_predictor(args.student, precision=args.precision, device=args.device, threads=args.threads,
                               check_paths=paths, backend=args.backend, expected_images=len(paths),
                               **builder_options(args))
    for note in predictor.info.notes:
        print(f"note: {note}", file=sys.stderr)
    progress = not args.no_progress and (args.out is not None or len(paths) > 4 * args.batch_size)
    if args.out:
        summary = predict_to_file(predictor, paths, args.out, top_k=args.top_k, batch_size=args.batch_size,
                                  progress=progress, max_pixels=args.max_image_pixels)
    else:
        rows, summary = predict_rows(predictor, paths, top_k=args.top_k, batch_size=args.batch_size,
                                     progress=progress, max_pixels=args.max_image_pixels)
        print(json.dumps([r.to_json() for r in rows], indent=2) if args.json else format_rows(rows))
    print(summary.line(), file=sys.stderr)
    if summary.errors:
        print(f"{len(summary.errors)} image(s) could not be read:", file=sys.stderr)
        for path, reason in summary.errors[:50]:
            print(f"  {path}: {reason}", file=sys.stderr)
        if len(summary.errors) > 50:
            print(f"  ... and {len(summary.errors) - 50} more (rows with an error in {args.out})", file=sys.stderr)
        return EXIT_SOME_UNREADABLE
    return 0
