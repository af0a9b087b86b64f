"""Image-encoder throughput of our CLIP (random weights) and the fraction of this machine's matmul rate.

For each architecture and precision: images/s of ``CLIP.encode_image`` (no grad, eval), the encoder's
FLOPs per image (counted analytically; cross-checked with torch's FlopCounterMode, which on CPU
may not count the attention matmuls inside scaled_dot_product_attention), the achieved GFLOP/s,
and that as a fraction of a big square matmul's GFLOP/s in the same precision, measured in the same run.

Precisions: ``fp32``; ``bf16`` = fp32 weights under ``torch.autocast(dtype=bfloat16)`` (as training runs);
``bf16w`` = weights cast to bf16. On a shared CPU the numbers are noisy; compare ratios from one run.

    python benchmarks/bench_clip_throughput.py --archs ViT-B/16 ViT-L/14 --batch 4 --iters 3 --out bench_out
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from promptkd.models.clip import CLIP, VisionConfig, init_clip_, preset
from promptkd.models.prompts import VisionPrompts

MODES = ("fp32", "bf16", "bf16w")


def vit_flops(v: VisionConfig, embed_dim: int, n_prompts: int = 0) -> int:
    """Multiply-adds x 2 of one image through the ViT image tower (LayerNorms/softmax/GELU ignored)."""
    patches = v.grid**2
    n = patches + 1 + n_prompts
    w, m = v.width, v.mlp_width
    per_layer = 2 * n * w * 3 * w + 2 * n * n * w * 2 + 2 * n * w * w + 2 * n * w * m * 2
    return 2 * patches * 3 * v.patch_size**2 * w + v.layers * per_layer + 2 * w * embed_dim


def counted_flops(model: CLIP, images: torch.Tensor, prompts) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_image(images, prompts=prompts)
    return counter.get_total_flops()


def precision_context(mode: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()


def matmul_rate(mode: str, size: int, reps: int) -> float:
    """GFLOP/s of a [size x size] @ [size x size] matmul in the given precision."""
    dtype = torch.bfloat16 if mode == "bf16w" else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    with precision_context(mode):
        (a @ b).sum()
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        elapsed = time.perf_counter() - start
    return 2 * size**3 * reps / elapsed / 1e9


def encoder_rate(model: CLIP, images: torch.Tensor, prompts, mode: str, warmup: int, iters: int) -> float:
    """Images per second of encode_image."""
    with torch.no_grad(), precision_context(mode):
        for _ in range(warmup):
            model.encode_image(images, prompts=prompts)
        start = time.perf_counter()
        for _ in range(iters):
            model.encode_image(images, prompts=prompts)
        elapsed = time.perf_counter() - start
    return images.shape[0] * iters / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="+", default=["ViT-B/16", "ViT-L/14"])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=0, help="VPT tokens appended (the student uses 4)")
    ap.add_argument("--matmul-size", type=int, default=2048)
    ap.add_argument("--matmul-reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json and results.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    peak = {mode: matmul_rate(mode, args.matmul_size, args.matmul_reps) for mode in args.modes}
    rows = []
    for arch in args.archs:
        cfg = preset(arch).image_only()
        base = init_clip_(CLIP(cfg)).eval()
        prompts = VisionPrompts(args.prompts, 1, cfg.vision.width) if args.prompts else None
        images = torch.randn(args.batch, 3, cfg.vision.image_size, cfg.vision.image_size)
        flops = vit_flops(cfg.vision, cfg.embed_dim, args.prompts)
        counted = counted_flops(base, images[:1], prompts)
        for mode in args.modes:
            model = base.to(torch.bfloat16) if mode == "bf16w" else base.float()
            p = prompts.to(torch.bfloat16) if (prompts is not None and mode == "bf16w") else prompts
            ips = encoder_rate(model, images, p, mode, args.warmup, args.iters)
            gflops = ips * flops / 1e9
            rows.append({"arch": arch, "mode": mode, "batch": args.batch, "images_per_s": ips,
                         "gflops_per_image": flops / 1e9, "gflops_per_image_counted": counted / 1e9,
                         "achieved_gflops_per_s": gflops, "matmul_gflops_per_s": peak[mode],
                         "fraction_of_matmul": gflops / peak[mode]})
            print(f"{arch:10s} {mode:6s} {ips:8.2f} img/s  {gflops:7.1f} GFLOP/s  "
                  f"= {gflops / peak[mode]:.2f} of matmul ({peak[mode]:.1f} GFLOP/s)", flush=True)
            base = base.float()

    header = ("| arch | precision | img/s | GFLOPs/img (analytic / counted) | achieved GFLOP/s | matmul GFLOP/s "
              "| fraction |\n|---|---|---|---|---|---|---|")
    lines = [header] + [
        f"| {r['arch']} | {r['mode']} | {r['images_per_s']:.2f} | {r['gflops_per_image']:.1f} / "
        f"{r['gflops_per_image_counted']:.1f} | {r['achieved_gflops_per_s']:.1f} | {r['matmul_gflops_per_s']:.1f} "
        f"| {r['fraction_of_matmul']:.2f} |" for r in rows]
    info = f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, iters {args.iters}"
    print(info)
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
        (args.out / "results.md").write_text(info + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
