"""One stage-2 distillation step: stored class vectors vs recomputing the teacher's text features.

Teacher CLIP ViT-L/14 (IVLP prompts, depth 9) and student CLIP ViT-B/16 (VPT-deep prompts, depth 9, + the
conv-BN-ReLU-conv projector), random weights, batch 8 of 224 px images, SGD step on the student. Three ways:

* ``stored``: the class vectors W come from the store, computed once (this project, DistillModule);
* ``authors``: the authors' step, the baseline: their teacher (``CustomCLIP_teacher.forward``) runs the
  prompted text tower over all N class prompts at the full 77-token context on every call, under
  no_grad;
* ``recompute``: the same recomputation with our text tower, whose sequences are trimmed after the
  batch's last EOT (``ClipTeacher.encode_class_names``): what recomputing would cost here today.

FLOP model (multiply-adds x 2): image step ~ 158 (teacher) + 35 + 35 (student forward, backward) =
228 GFLOPs per image; ViT-L/14's text tower at 77 tokens ~ 13.1 GFLOPs per class prompt (77 tokens x 12
layers x 12 x 768^2 multiply-adds), so the authors' step costs (8 x 228 + N x 13.1) / (8 x 228) of ours:
1.7x at N = 100 and 8.2x at N = 1000, the limits a measured speed-up can approach.

Timing: all variants in ONE process, their steps interleaved, medians reported, so that the load of a
shared machine hits them alike; wall seconds and the process's CPU seconds (steadier when other
processes compete for the cores). Memory: each variant runs one step in its own subprocess, so that its
peak resident memory (``ru_maxrss``, which sees torch's allocations) belongs to it alone; the weights of
both models (~1.7 GB in fp32) dominate it. Class names are the first N ImageNet names.

    .venv/bin/python benchmarks/bench_distill_step.py --classes 100 1000 --steps 2 --warmup 1 \\
        --out bench_distill_step.json

CPU numbers depend on the machine and on what else runs; compare the ratio measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def imagenet_names(n: int) -> list[str]:
    from promptkd.data.benchmarks import packaged_asset, prompt_name

    lines = packaged_asset("imagenet_classnames.txt").read_text(encoding="utf-8").splitlines()
    names = [prompt_name(line.split(" ", 1)[1]) for line in lines if line.strip()]
    if n > len(names):
        raise ValueError(f"only {len(names)} ImageNet class names available, asked for {n}")
    return names[:n]


def build(classes: int, batch: int):
    from promptkd.methods.promptkd import DistillModule
    from promptkd.models.clip import preset, random_clip
    from promptkd.models.clip_backbones import STUDENT_PROMPTS, ClipStudent, ClipTeacher
    from promptkd.models.prompts import PromptConfig
    from promptkd.store import ClassVectorStore

    torch.manual_seed(0)
    teacher = ClipTeacher(random_clip(preset("ViT-L/14"), seed=0), PromptConfig(), random_init_seed=0, prompt_seed=0)
    student = ClipStudent(random_clip(preset("ViT-B/16").image_only(), seed=1), teacher.embed_dim, STUDENT_PROMPTS,
                          projector="mlp", random_init_seed=1, prompt_seed=1)
    names = imagenet_names(classes)
    # The stored variant's step cost does not depend on the vectors' values, so the store is random unit
    # vectors here (building the real one is a single pass of the text tower, outside any step).
    vectors = F.normalize(torch.randn(classes, teacher.embed_dim, generator=torch.Generator().manual_seed(3)), dim=-1)
    store = ClassVectorStore(vectors, names, float(teacher.logit_scale()))
    module = DistillModule(teacher, student, store, kd_weight=1000.0).train()
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    return module, names, images


VARIANTS = ("stored", "authors", "recompute")


def recompute_class_vectors(module, names: list[str]) -> None:
    """The prompted text tower over every class name, every step (no gradient), trimmed after EOT."""
    with torch.no_grad():
        module.class_vectors = F.normalize(module.teacher.encode_class_names(names).float(), dim=-1)


def authors_class_vectors(module, names: list[str]) -> None:
    """The authors' way: every class prompt at the full 77-token context, every step (no gradient)."""
    teacher = module.teacher
    with torch.no_grad():
        tokens = teacher.class_name_tokens(names).to(teacher.clip.logit_scale.device)  # [N, 77]
        module.class_vectors = F.normalize(teacher.clip.encode_text(tokens, prompts=teacher.text_prompts).float(),
                                           dim=-1)


def step(module, opt, images: torch.Tensor, names: list[str], variant: str) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one step."""
    start, start_cpu = time.perf_counter(), time.process_time()
    if variant == "recompute":
        recompute_class_vectors(module, names)
    elif variant == "authors":
        authors_class_vectors(module, names)
    loss = module({"image": images})["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - start, time.process_time() - start_cpu


def worker(mode: str, classes: int, batch: int, steps: int, warmup: int) -> dict:
    """``time``: all variants in one process, steps interleaved (stored, authors, recompute, stored, ...)
    so that machine load hits them alike; medians. ``memory-<variant>``: one step of one variant, for its
    peak RSS."""
    module, names, images = build(classes, batch)
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.005, momentum=0.9,
                          weight_decay=5e-4)
    if mode.startswith("memory-"):
        variant = mode.removeprefix("memory-")
        step(module, opt, images, names, variant)
        return {"mode": mode, "classes": classes,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    stored_vectors = module.class_vectors.clone()
    for i in range(warmup + steps):
        for variant in VARIANTS:
            if variant == "stored":
                module.class_vectors = stored_vectors
            elapsed, cpu_s = step(module, opt, images, names, variant)
            if i >= warmup:
                times[variant].append(elapsed)
                cpu[variant].append(cpu_s)
            print(f"{classes} classes, round {i + 1}/{warmup + steps}: {variant} {elapsed:.1f} s ({cpu_s:.1f} CPU s)",
                  file=sys.stderr, flush=True)
    return {"mode": "time", "classes": classes, "batch": batch, "threads": torch.get_num_threads(),
            "step_s": {k: statistics.median(v) for k, v in times.items()}, "all_step_s": times,
            "step_cpu_s": {k: statistics.median(v) for k, v in cpu.items()}, "all_step_cpu_s": cpu}


def run_worker(mode: str, classes: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, str(classes), "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    print(f"running {mode} with {classes} classes ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if mode == "time" else subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {mode}/{classes} failed:\n{(proc.stderr or '')[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-RSS subprocesses")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "CLASSES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.batch, args.steps, args.warmup)))
        return

    results = []
    for classes in args.classes:
        timing = run_worker("time", classes, args)
        memory = {} if args.no_memory else {
            v: run_worker(f"memory-{v}", classes, args)["peak_rss_mib"] for v in VARIANTS}
        sec, cpu = timing["step_s"], timing["step_cpu_s"]
        results.append({"classes": classes, "timing": timing, "peak_rss_mib": memory,
                        "speedup_vs_authors": sec["authors"] / sec["stored"],
                        "speedup_vs_recompute": sec["recompute"] / sec["stored"],
                        "cpu_speedup_vs_authors": cpu["authors"] / cpu["stored"],
                        "cpu_speedup_vs_recompute": cpu["recompute"] / cpu["stored"]})
    load = os.getloadavg()
    print(f"\nPromptKD distillation step, ViT-L/14 teacher -> ViT-B/16 student (random weights), batch {args.batch}, "
          f"median of {args.steps} interleaved step(s) after {args.warmup} warm-up round(s), "
          f"{results[0]['timing']['threads']} CPU threads, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print(f"{'classes':>8} {'variant':>28} {'s/step':>8} {'img/s':>7} {'CPU s/step':>11} {'peak RSS MiB':>13} "
          f"{'stored is (wall, CPU)':>22}")
    labels = {"stored": "stored vectors (ours)", "authors": "authors (77-token recompute)",
              "recompute": "recompute, trimmed context"}
    for r in results:
        wall, cpu = r["timing"]["step_s"], r["timing"]["step_cpu_s"]
        for variant in VARIANTS:
            extra = f"{wall[variant] / wall['stored']:.2f}x, {cpu[variant] / cpu['stored']:.2f}x" \
                if variant != "stored" else ""
            rss = r["peak_rss_mib"].get(variant)
            print(f"{r['classes']:>8} {labels[variant]:>28} {wall[variant]:8.2f} {args.batch / wall[variant]:7.3f} "
                  f"{cpu[variant]:11.2f} {'' if rss is None else f'{rss:.0f}':>13} {extra:>22}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"results": results, "load_average": load, "argv": sys.argv}, f, indent=2)


if __name__ == "__main__":
    main()
