"""``promptkd export --student DIR --format onnx|safetensors --out FILE``.

* ``onnx``: a graph from images to probabilities (or logits) with the class vectors baked in; class
  names and preprocessing are in the model's metadata.
* ``safetensors``: one self-contained file (whole student encoder, prompts, projector, class vectors,
  metadata) that `promptkd predict --student FILE` loads without the original CLIP checkpoint."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from promptkd.cli.predict_cmd import add_weights_options

    parser = subparsers.add_parser("export", help="export a distilled student to ONNX or a self-contained safetensors file",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, metavar="PATH", help="student artefact folder (or bundle)")
    parser.add_argument("--format", required=True, choices=("onnx", "safetensors"))
    parser.add_argument("--out", required=True, metavar="FILE")
    parser.add_argument("--output", choices=("probabilities", "logits"), default="probabilities",
                        help="ONNX output (default probabilities)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    add_weights_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from promptkd.cli.predict_cmd import builder_options
    from promptkd.serve import export_onnx, load_student, save_bundle

    loaded = load_student(args.student, **builder_options(args))
    if args.format == "onnx":
        path = export_onnx(loaded, args.out, output=args.output, opset=args.opset)
    else:
        path = save_bundle(loaded, args.out)
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({size:.1f} MiB, {loaded.store.num_classes} classes)")
    return 0
