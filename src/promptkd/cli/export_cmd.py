"""``promptkd export --student DIR --format onnx|safetensors --out FILE``.

* ``onnx``: a graph from images to probabilities (or logits) with the class vectors baked in; class
  names and preprocessing are in the model's metadata. ``--quantize int8`` writes an int8 graph:
  static with ``--calibration`` (a folder of unlabelled images, or a dataset with ``--data-root``),
  dynamic without.
* ``safetensors``: one self-contained file (whole student encoder, prompts, projector, class vectors,
  metadata) that `promptkd predict --student FILE` loads without the original CLIP checkpoint."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from promptkd.cli.predict_cmd import add_weights_options
    from promptkd.precision import PRECISION_CHOICES

    parser = subparsers.add_parser("export", help="export a distilled student to ONNX (fp32/int8) or a self-contained safetensors file",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, metavar="PATH", help="student artefact folder (or bundle)")
    parser.add_argument("--format", required=True, choices=("onnx", "safetensors"), help="file format")
    parser.add_argument("--out", required=True, metavar="FILE", help="file to write")
    parser.add_argument("--output", choices=("probabilities", "logits"), default="probabilities",
                        help="ONNX output (default probabilities)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="int8 ONNX through onnxruntime's quantisation (default: none, fp32)")
    parser.add_argument("--calibration", metavar="FOLDER|DATASET", default=None,
                        help="calibration images for static int8: a folder (searched recursively, no labels needed) "
                             "or a dataset (benchmark name with --data-root, folder:PATH, list:FILE; its train "
                             "images). Default: none, which gives dynamic int8")
    parser.add_argument("--data-root", default=None, help="data root for a benchmark named by --calibration")
    parser.add_argument("--calibration-size", type=int, default=128,
                        help="calibration images used, spread over the source (default 128)")
    parser.add_argument("--quantize-mode", choices=("auto", "static", "dynamic"), default="auto",
                        help="auto (default): static with --calibration, dynamic without")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                        help="stored precision (default auto = fp32: the machine that runs the file chooses; "
                             "bf16 halves a safetensors bundle)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    add_weights_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from promptkd.cli.predict_cmd import builder_options
    from promptkd.serve import export_student

    report = export_student(args.student, args.out, fmt=args.format, output=args.output, opset=args.opset,
                            quantize=args.quantize, calibration=args.calibration, data_root=args.data_root,
                            calibration_size=args.calibration_size, quantize_mode=args.quantize_mode,
                            precision=args.precision, **builder_options(args))
    for note in report.notes:
        print(f"note: {note}")
    print(report.line())
    return 0
