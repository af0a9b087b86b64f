"""Cost of one stage-1 training step (forward + backward) for PromptSRC, IVLP and CoOp, and where it goes.

PromptSRC adds to IVLP a frozen (no-grad) image pass per step; its frozen template-ensemble text features
are computed once at construction (also timed). Every method runs the prompted text tower over ALL
training classes each step, so the step cost grows with the number of classes (ImageNet base: 500).
Random CLIP weights of a given width/depth; prompts as the paper (4+4 tokens, deep up to --depth).

    python benchmarks/bench_teacher_step.py --width 128 --layers 4 --image 64 --patch 16 \\
        --classes 10 50 --batch 8 --steps 3 --out bench_out

Writes ``teacher_step.json`` and ``teacher_step.md`` under --out. On a shared CPU absolute numbers are
noisy; compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from promptkd.methods.promptsrc import PromptSRCModule
from promptkd.methods.teacher_io import prompt_settings_for_method
from promptkd.methods.templates import template_set
from promptkd.models.clip import random_clip, tiny_clip_config
from promptkd.models.clip_backbones import ClipTeacher


def step_seconds(module: PromptSRCModule, batch: dict, steps: int) -> float:
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    module.train()
    times = []
    for i in range(steps + 1):  # the first step warms up
        t0 = time.perf_counter()
        out = module(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        if batch["image"].is_cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--image", type=int, default=64)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--depth", type=int, default=None, help="prompt depth (default: all layers, at most 9)")
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args()

    device = torch.device(args.device)
    depth = args.depth or min(9, args.layers)
    arch = tiny_clip_config(width=args.width, layers=args.layers, image_size=args.image, patch_size=args.patch)
    clip = random_clip(arch, seed=0).to(device)
    templates = template_set("promptsrc")
    ClipTeacher(clip, {"text_depth": depth, "vision_depth": depth}).encode_text(["warm up the tokenizer"])
    rows = []
    for n_classes in args.classes:
        names = [f"class number {i}" for i in range(n_classes)]
        batch = {"image": torch.randn(args.batch, 3, args.image, args.image, device=device),
                 "label": torch.arange(args.batch, device=device) % n_classes}
        for method in ("promptsrc", "ivlp", "coop"):
            prompts = prompt_settings_for_method(method, {"text_depth": depth, "vision_depth": depth})
            teacher = ClipTeacher(clip, prompts, prompt_seed=0)
            t0 = time.perf_counter()
            module = PromptSRCModule(teacher, names, {"method": method, "templates": templates})
            setup = time.perf_counter() - t0
            seconds = step_seconds(module, batch, args.steps)
            rows.append({"classes": n_classes, "method": method, "step_s": seconds,
                         "setup_s": setup, "prompt_values": sum(p.numel() for p in teacher.trainable_parameters())})
            print(f"{n_classes:>5} classes  {method:9}  step {seconds * 1000:8.1f} ms  setup {setup:6.2f} s", flush=True)
    for row in rows:
        ivlp = next(r for r in rows if r["classes"] == row["classes"] and r["method"] == "ivlp")
        row["vs_ivlp"] = row["step_s"] / ivlp["step_s"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"arch": arch.to_dict(), "prompt_depth": depth, "batch": args.batch, "device": str(device),
            "templates": len(templates), "torch_threads": torch.get_num_threads()}
    (out / "teacher_step.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"Teacher training step (fwd+bwd), width {args.width}, {args.layers} layers, {args.image}px, "
             f"batch {args.batch}, {device}; PromptSRC setup = frozen {len(templates)}-template ensemble", "",
             "| classes | method | step (ms) | x IVLP | setup (s) |", "|---|---|---|---|---|"]
    lines += [f"| {r['classes']} | {r['method']} | {r['step_s'] * 1000:.1f} | {r['vs_ivlp']:.2f} | {r['setup_s']:.2f} |"
              for r in rows]
    (out / "teacher_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
