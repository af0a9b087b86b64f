"""``promptkd convert SRC DST.safetensors``: any CLIP checkpoint we read -> one plain safetensors file.

The main use is OpenAI's released ``.pt`` files: they are TorchScript archives, and loading one runs code
stored in it. Convert once with ``--trust-checkpoint``; afterwards only the tensor file is read. The output
records the resolved architecture (heads, activation, normalisation), so it loads alone: an open_clip
state dict converted with ``--arch ViT-H-14`` (or its open_clip_config.json beside it) needs neither later.
"""

from __future__ import annotations

import argparse
import sys

DTYPES = {"keep": None, "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a CLIP checkpoint (OpenAI .pt, open_clip, HF folder) to safetensors",
        description="Read a CLIP checkpoint (OpenAI's TorchScript .pt, an open_clip/OpenAI-named state dict, "
                    "or a Hugging Face CLIP folder), check it loads into our CLIP, and write its tensors in "
                    "OpenAI names to DST.safetensors with the architecture in the file's metadata.")
    p.add_argument("src", help="CLIP checkpoint file or Hugging Face folder")
    p.add_argument("dst", help="output .safetensors file")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow loading SRC when that can run code from it (TorchScript, full pickles); "
                        "only for files from a source you trust")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="keep",
                   help="store floating-point tensors in this precision (default: as in SRC)")
    p.add_argument("--arch", metavar="NAME|FILE.json", default=None,
                   help="what the tensors cannot say (attention heads, activation, normalisation): a known "
                        "architecture (ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336, ViT-H-14, ViT-g-14, ViT-bigG-14: "
                        "open_clip's names, GELU; NAME-quickgelu or OpenAI's ViT-B/16, ViT-L/14@336px: QuickGELU) "
                        "or an open_clip model config file. Default: the file's own record, the "
                        "open_clip_config.json or config.json beside it, OpenAI's rule for TorchScript files")
    p.add_argument("--act", choices=["quick_gelu", "gelu"], default=None,
                   help="activation to record, overriding every other source")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from promptkd.models.clip_archs import describe
    from promptkd.models.weights import convert_checkpoint

    dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    if Path(args.dst).exists() and Path(args.dst).resolve() == Path(args.src).resolve():
        raise ValueError(f"{args.dst}: output would overwrite the input")
    ckpt = convert_checkpoint(args.src, args.dst, trust_checkpoint=args.trust_checkpoint, dtype=dtype, act=args.act,
                              arch=args.arch)
    print(f"{ckpt.source} ({ckpt.format}) -> {args.dst}: {describe(ckpt.config)} (from {ckpt.arch_source})",
          file=sys.stderr)
    for note in ckpt.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0
