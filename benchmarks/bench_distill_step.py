"""One stage-2 distillation step: stored class vectors vs recomputing the teacher's text features.

Teacher CLIP ViT-L/14 (IVLP prompts, depth 9) and student CLIP ViT-B/16 (VPT-deep prompts, depth 9, + the
conv-BN-ReLU-conv projector), random weights, batch 8 of 224 px images, SGD step on the student. Two ways:

* ``stored``: the class vectors W come from the store, computed once (this project, DistillModule);
* ``recompute``: the prompted teacher text tower runs over all N class names every step, under no_grad,
  as the authors' code does (its ``CustomCLIP_teacher.forward`` encodes the prompts on every call).

Each (variant, N) runs in its own subprocess so that its peak resident memory (``ru_maxrss``, which
sees torch's allocations) belongs to it alone. Class names are the first N ImageNet names.

    .venv/bin/python benchmarks/bench_distill_step.py --classes 100 1000 --steps 2 --warmup 1 \\
        --out bench_distill_step.json

CPU numbers depend on the machine and on what else runs; compare the ratio measured in one run.
"""

from __future__ import annotations

import argparse
import json
import resource
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


def recompute_class_vectors(module, names: list[str]) -> None:
    """The authors' way: the prompted text tower over every class name, every step (no gradient)."""
    with torch.no_grad():
        module.class_vectors = F.normalize(module.teacher.encode_class_names(names).float(), dim=-1)


def worker(variant: str, classes: int, batch: int, steps: int, warmup: int) -> dict:
    module, names, images = build(classes, batch)
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.005, momentum=0.9,
                          weight_decay=5e-4)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        if variant == "recompute":
            recompute_class_vectors(module, names)
        loss = module({"image": images})["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step_s = sum(times) / len(times)
    return {"variant": variant, "classes": classes, "batch": batch, "steps": steps, "step_s": step_s,
            "images_per_s": batch / step_s, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--worker", nargs=2, metavar=("VARIANT", "CLASSES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.batch, args.steps, args.warmup)))
        return

    rows = []
    for classes in args.classes:
        for variant in ("stored", "recompute"):
            cmd = [sys.executable, __file__, "--worker", variant, str(classes), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
            print(f"running {variant} with {classes} classes ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"worker {variant}/{classes} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"\nPromptKD distillation step, ViT-L/14 teacher -> ViT-B/16 student, batch {args.batch}, "
          f"{args.steps} timed step(s) after {args.warmup} warm-up, {rows[0]['threads']} CPU threads")
    print(f"{'classes':>8} {'variant':>10} {'s/step':>9} {'img/s':>8} {'peak RSS MiB':>13} {'speed-up':>9}")
    for classes in args.classes:
        pair = {r["variant"]: r for r in rows if r["classes"] == classes}
        ratio = pair["recompute"]["step_s"] / pair["stored"]["step_s"]
        for variant in ("stored", "recompute"):
            r = pair[variant]
            extra = f"{ratio:8.2f}x" if variant == "stored" else ""
            print(f"{classes:>8} {variant:>10} {r['step_s']:9.2f} {r['images_per_s']:8.3f} {r['peak_rss_mib']:13.0f} {extra:>9}")
        pair["stored"]["speedup_vs_recompute"] = ratio
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "argv": sys.argv}, f, indent=2)


if __name__ == "__main__":
    main()
