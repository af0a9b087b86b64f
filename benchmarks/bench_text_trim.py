"""Cost of one prompted text-tower pass (forward + backward) over N class names, with token sequences
padded to 77 versus trimmed after the batch's last EOT (what ClipTeacher does). Random weights.

    .venv/bin/python benchmarks/bench_text_trim.py --arch ViT-L/14 --classes 100 --reps 2
"""

from __future__ import annotations

import argparse
import time

import torch

from promptkd.models.clip import preset, random_clip
from promptkd.models.clip_backbones import ClipTeacher, _trim_after_eot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="ViT-L/14")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    teacher = ClipTeacher(random_clip(preset(args.arch)))
    names = [line.split(" ", 1)[1].strip() for line in open(_classnames())][: args.classes]
    full = teacher.class_name_tokens(names)
    trimmed = _trim_after_eot(full)
    results = {}
    for label, tokens in (("padded to 77", full), ("trimmed", trimmed)):
        times = []
        for _ in range(args.reps + 1):
            t0 = time.perf_counter()
            feats = teacher.clip.encode_text(tokens, prompts=teacher.text_prompts)
            feats.float().pow(2).sum().backward()
            times.append(time.perf_counter() - t0)
        results[label] = min(times[1:])
        print(f"{label:>13}: {tokens.shape[1]:2d} tokens, {results[label]:.2f} s per forward+backward "
              f"over {len(names)} class names")
    print(f"speed-up: {results['padded to 77'] / results['trimmed']:.1f}x")


def _classnames() -> str:
    from importlib import resources

    return str(resources.files("promptkd") / "data" / "assets" / "imagenet_classnames.txt")


if __name__ == "__main__":
    main()
