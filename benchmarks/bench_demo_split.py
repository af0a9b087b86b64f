"""Where the demo's time goes: frozen trunk vs trainable tail of EfficientNet-Lite, per cut point and
thread count (CPU). The trunk runs once per image (then it is cached); the tail runs forward+backward at
every training step. Run: .venv/bin/python benchmarks/bench_demo_split.py [--resolution 128] [--batch 8]
Numbers are noisy on a shared machine: compare the ratios of one run."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def measure(variant: str, split_stage: int, threads: int, resolution: int, batch: int, reps: int) -> dict:
    import torch

    from promptkd.models.efficientnet_lite import load_efficientnet_lite

    torch.set_num_threads(threads)
    model = load_efficientnet_lite(variant)
    split = model.stage_end(split_stage)
    x = torch.randn(batch, 3, resolution, resolution)
    with torch.no_grad():
        maps = model.trunk(x, split)
        t0 = time.perf_counter()
        for _ in range(reps):
            model.trunk(x, split)
        trunk = (time.perf_counter() - t0) / reps
    prompt = torch.zeros(maps.shape[1:], requires_grad=True)
    model.tail(maps + prompt, split).sum().backward()
    t0 = time.perf_counter()
    for _ in range(reps):
        model.tail(maps + prompt, split).sum().backward()
    tail = (time.perf_counter() - t0) / reps
    return {"variant": variant, "split_stage": split_stage, "threads": threads, "map": list(maps.shape[1:]),
            "trunk_ms_per_image": round(1000 * trunk / batch, 2), "tail_fwd_bwd_ms_per_step": round(1000 * tail, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:  # a single measurement in a fresh process (thread settings don't leak)
        variant, split, threads = args.one.split(",")
        print(json.dumps(measure(variant, int(split), int(threads), args.resolution, args.batch, args.reps)))
        return
    rows = []
    for variant in ("efficientnet-lite2", "efficientnet-lite0"):
        for split in (4, 5):
            for threads in (1, 2):
                out = subprocess.run([sys.executable, __file__, "--one", f"{variant},{split},{threads}",
                                      "--resolution", str(args.resolution), "--batch", str(args.batch),
                                      "--reps", str(args.reps)], capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    print(f"\n| variant | cut after stage | threads | map | trunk ms/image | tail fwd+bwd ms/step (batch {args.batch}) |")
    print("|---|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['split_stage']} | {r['threads']} | {r['map']} | {r['trunk_ms_per_image']} "
              f"| {r['tail_fwd_bwd_ms_per_step']} |")


if __name__ == "__main__":
    main()
