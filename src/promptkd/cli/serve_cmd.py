"""``promptkd serve STUDENT``: serve a distilled student over HTTP on this machine.

STUDENT is a student folder, a safetensors bundle or an ONNX file (fp32 or int8) from
``promptkd export``. Open http://127.0.0.1:8000/ for a page that classifies a dropped image; the JSON
API (``POST /predict``, ``GET /classes``, ``GET /health``) is described at ``/docs``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from promptkd.cli.predict_cmd import add_weights_options
    from promptkd.precision import PRECISION_CHOICES
    from promptkd.server import ServeConfig

    d = ServeConfig()
    p = subparsers.add_parser("serve", help="serve a student over HTTP (JSON API + a web page)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("student", metavar="STUDENT", help="student folder, safetensors bundle or exported .onnx file")
    p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host}: this machine only)")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port})")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"classes per image unless a request asks (default {d.top_k})")
    p.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb,
                   help=f"largest request body in MiB (default {d.max_upload_mb:g})")
    p.add_argument("--max-images", type=int, default=d.max_images, help=f"images per request (default {d.max_images})")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help=f"largest image, width x height (default {d.max_pixels:,})")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"images per forward pass, gathered across requests (default {d.max_batch})")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help=f"how long a pass waits for more images (default {d.max_wait_ms:g} ms)")
    p.add_argument("--max-pending", type=int, default=d.max_pending,
                   help=f"images queued before new requests get 503 (default {d.max_pending})")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                   help="auto (default): bf16 where native and agreeing with fp32 on the check images, else fp32; "
                        "ONNX files run as exported")
    p.add_argument("--backend", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="for a folder or bundle: auto (default) serves fp32 on the CPU through onnxruntime (exported "
                        "at start; faster there, same outputs), bf16 and GPUs through PyTorch")
    p.add_argument("--check-images", metavar="FOLDER", default=None,
                   help="real images for the --precision auto check, up to 256 used (without them auto serves "
                        "fp32: bf16 is only kept after agreeing with fp32 on real images)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for the model (default 0: the library's choice)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default info)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    add_weights_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from promptkd.cli.predict_cmd import builder_options
    from promptkd.server import ServeConfig, serve

    cfg = ServeConfig(host=args.host, port=args.port, top_k=args.top_k, max_upload_mb=args.max_upload_mb,
                      max_images=args.max_images, max_pixels=args.max_pixels, max_batch=args.max_batch,
                      max_wait_ms=args.max_wait_ms, max_pending=args.max_pending)
    serve(args.student, cfg, precision=args.precision, device=args.device, threads=args.threads,
          check_images=args.check_images, log_level=args.log_level, backend=args.backend, **builder_options(args))
    return 0
