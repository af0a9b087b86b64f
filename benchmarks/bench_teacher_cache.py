"""Stage 2 from a teacher cache vs online: step time, cache build rate, bytes per view, ImageNet figures.

Teacher CLIP ViT-L/14 (IVLP prompts, depth 9) and student CLIP ViT-B/16 (VPT-deep prompts, depth 9, +
the conv-BN-ReLU-conv projector), random weights, batch 8 of 224 px images, N class vectors (stored).

* ``online``: DistillModule with the teacher: teacher image forward (no grad) + student forward and
  backward + SGD step (what `promptkd distill` does today);
* ``cached``: DistillModule without teacher; the batch carries the teacher's fp16 features (what
  ``distill --teacher-cache`` does): student forward and backward + SGD step.

Both in ONE process, steps interleaved (online, cached, online, ...), medians, so that a shared
machine's load hits both alike; wall seconds and the process's CPU seconds (steadier when other
processes compete for the cores) are both reported. Then the cache build (``build_teacher_cache`` over real JPEG files:
decode, augmentation, teacher forward, fp16, shard write) against the teacher's forward alone, the
bytes per stored view (shard files on disk / views), and the derived figures for ImageNet
(1,281,167 images x 20 epochs) at fp16 for views = 20 and views = 4.

    nice .venv/bin/python benchmarks/bench_teacher_cache.py --steps 3 --warmup 1 --build-images 16 \\
        --out bench_teacher_cache.json

FLOP ratio (multiply-adds x 2, 224 px): teacher forward ~158 GFLOPs per image, student forward ~35 and
backward ~35 (activation gradients only: the frozen weights get none), so online/cached ~ 228/70 = 3.3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_IMAGES = 1_281_167
IMAGENET_EPOCHS = 20


def build_models(classes: int, batch: int):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_distill_step import imagenet_names

    from promptkd.models.clip import preset, random_clip
    from promptkd.models.clip_backbones import STUDENT_PROMPTS, ClipStudent, ClipTeacher
    from promptkd.models.prompts import PromptConfig
    from promptkd.store import ClassVectorStore

    torch.manual_seed(0)
    teacher = ClipTeacher(random_clip(preset("ViT-L/14"), seed=0), PromptConfig(), random_init_seed=0, prompt_seed=0)
    teacher.requires_grad_(False).eval()

    def student():
        torch.manual_seed(1)
        return ClipStudent(random_clip(preset("ViT-B/16").image_only(), seed=1), teacher.embed_dim, STUDENT_PROMPTS,
                           projector="mlp", random_init_seed=1, prompt_seed=1)

    vectors = F.normalize(torch.randn(classes, teacher.embed_dim, generator=torch.Generator().manual_seed(3)), dim=-1)
    store = ClassVectorStore(vectors, imagenet_names(classes), float(teacher.logit_scale()))
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    return teacher, student, store, images


def sgd(module):
    return torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.005, momentum=0.9,
                           weight_decay=5e-4)


class Clock:
    """Wall seconds and this process's CPU seconds (all threads) of a block. On a shared machine the CPU
    seconds are the steadier measure of the work done: waiting for a core does not count."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def timed_step(module, opt, batch: dict) -> Clock:
    with Clock() as clock:
        loss = module(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clock


def write_images(folder: Path, n: int) -> list[str]:
    """``n`` smooth random RGB JPEGs of 320x256 (decode + random-resized-crop cost like a real photo's)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        coarse = rng.uniform(0, 255, (8, 10, 3)).astype(np.uint8)
        img = Image.fromarray(coarse).resize((320, 256), Image.Resampling.BICUBIC)
        path = folder / f"img{i:04d}.jpg"
        img.save(path, "JPEG", quality=90)
        paths.append(str(path))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--build-images", type=int, default=16, help="images in the timed cache build (1 view)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    from promptkd.data.loader import UnlabelledImages
    from promptkd.data.transforms import TrainAugment
    from promptkd.methods.promptkd import DistillModule
    from promptkd.methods.teacher_cache import build_teacher_cache

    teacher, make_student, store, images = build_models(args.classes, args.batch)
    online = DistillModule(teacher, make_student(), store, kd_weight=1000.0).train()
    cached = DistillModule(None, make_student(), store, kd_weight=1000.0,
                           teacher_logit_scale=float(teacher.logit_scale())).train()
    with torch.no_grad():
        feats = F.normalize(teacher.encode_image(images).float(), dim=-1).half()
    batches = {"online": {"image": images}, "cached": {"image": images, "teacher_features": feats}}
    modules = {"online": online, "cached": cached}
    opts = {k: sgd(m) for k, m in modules.items()}
    times: dict[str, list[float]] = {"online": [], "cached": [], "teacher_forward": []}
    cpu: dict[str, list[float]] = {k: [] for k in times}
    for i in range(args.warmup + args.steps):
        this_round = {}
        for variant in ("online", "cached"):
            this_round[variant] = timed_step(modules[variant], opts[variant], batches[variant])
        with Clock() as this_round["teacher_forward"], torch.no_grad():
            teacher.encode_image(images)
        if i >= args.warmup:
            for key, clock in this_round.items():
                times[key].append(clock.wall)
                cpu[key].append(clock.cpu)
        print(f"round {i + 1}/{args.warmup + args.steps}{' (warm-up)' if i < args.warmup else ''}: " + ", ".join(
            f"{k} {c.wall:.2f} s ({c.cpu:.2f} CPU s)" for k, c in this_round.items()), file=sys.stderr, flush=True)
    step = {k: statistics.median(v) for k, v in times.items()}
    step_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    paired = statistics.median(o / c for o, c in zip(times["online"], times["cached"]))

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), args.build_images)
        stream = UnlabelledImages(paths, TrainAugment(224), seed=1)
        with Clock() as build:
            build_teacher_cache(teacher, stream, Path(tmp) / "cache", epochs=1, dtype="fp16",
                                identity={"class_vectors": store.fingerprint(), "dataset": "bench"},
                                batch_size=args.batch, progress=False)
        build_s, build_cpu = build.wall, build.cpu
        shards = [p for p in (Path(tmp) / "cache").iterdir() if p.name.startswith("v")]
        shard_bytes = sum(p.stat().st_size for p in shards)
    bytes_per_view = shard_bytes / args.build_images
    row_bytes = teacher.embed_dim * 2
    build_rate = args.build_images / build_s
    teacher_rate = args.batch / step["teacher_forward"]
    online_rate, cached_rate = args.batch / step["online"], args.batch / step["cached"]

    # CPU seconds per image (per view for the build): the machine-independent-ish unit of the derived figures
    per_image = {"online": step_cpu["online"] / args.batch, "cached": step_cpu["cached"] / args.batch,
                 "build": build_cpu / args.build_images}
    training = IMAGENET_IMAGES * IMAGENET_EPOCHS
    online_h = training * per_image["online"] / 3600
    cached_h = training * per_image["cached"] / 3600
    imagenet = {}
    for views in (IMAGENET_EPOCHS, 4):
        stored = IMAGENET_IMAGES * views
        build_h = stored * per_image["build"] / 3600
        imagenet[f"views={views}"] = {
            "stored_views": stored, "bytes": stored * row_bytes, "GiB": stored * row_bytes / 2**30,
            "teacher_forwards": stored, "share_of_online_teacher_work": views / IMAGENET_EPOCHS,
            "build_cpu_hours": build_h, "first_run_cpu_hours": build_h + cached_h,
            "first_run_vs_online": online_h / (build_h + cached_h), "further_run_vs_online": online_h / cached_h}
    derived = {"online_run_cpu_hours": online_h, "cached_training_cpu_hours": cached_h}
    load = os.getloadavg()
    result = {"batch": args.batch, "classes": args.classes, "threads": torch.get_num_threads(),
              "step_s": step, "all_s": times, "step_cpu_s": step_cpu, "all_cpu_s": cpu,
              "speedup_cached_vs_online": step["online"] / step["cached"],
              "speedup_cpu_time": step_cpu["online"] / step_cpu["cached"], "speedup_paired_wall": paired,
              "images_per_s": {"online": online_rate, "cached": cached_rate, "teacher_forward": teacher_rate,
                               "cache_build": build_rate},
              "build_rate_vs_teacher_forward": build_rate / teacher_rate,
              "build_cpu_s_per_view": per_image["build"],
              "teacher_forward_cpu_s_per_image": step_cpu["teacher_forward"] / args.batch,
              "bytes_per_view_on_disk": bytes_per_view,
              "bytes_per_view_payload": row_bytes, "imagenet": imagenet, "imagenet_training": derived,
              "load_average": load, "argv": sys.argv}

    print(f"\nStage-2 step, ViT-L/14 teacher -> ViT-B/16 student (random weights), batch {args.batch}, {args.classes} "
          f"classes, median of {args.steps} interleaved step(s) after {args.warmup} warm-up round(s), "
          f"{result['threads']} CPU threads, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print(f"{'':>28} {'s/step':>8} {'img/s':>8} {'CPU s/step':>11}")
    print(f"{'online (teacher runs)':>28} {step['online']:8.2f} {online_rate:8.3f} {step_cpu['online']:11.2f}")
    print(f"{'cached (fp16 features)':>28} {step['cached']:8.2f} {cached_rate:8.3f} {step_cpu['cached']:11.2f}")
    print(f"{'teacher forward alone':>28} {step['teacher_forward']:8.2f} {teacher_rate:8.3f} "
          f"{step_cpu['teacher_forward']:11.2f}")
    print(f"speed-up cached vs online: {result['speedup_cached_vs_online']:.2f}x (median wall), "
          f"{paired:.2f}x (median of the rounds' wall ratios), {result['speedup_cpu_time']:.2f}x (median CPU time)")
    print(f"cache build (decode + augment + teacher + fp16 + shard write, {args.build_images} images): "
          f"{build_rate:.3f} views/s = {result['build_rate_vs_teacher_forward']:.2f} x the teacher forward's wall rate; "
          f"{per_image['build']:.2f} CPU s per view vs {step_cpu['teacher_forward'] / args.batch:.2f} CPU s per image "
          f"for the teacher forward alone ({step_cpu['teacher_forward'] / args.batch / per_image['build']:.2f}x)")
    print(f"bytes per view: {row_bytes} payload (768 x fp16), {bytes_per_view:.1f} on disk in this small build "
          f"(one .npy header of 128 bytes per shard; 8192-image shards make it {row_bytes + 128 / 8192:.2f})")
    print(f"ImageNet ({IMAGENET_IMAGES:,} images, {IMAGENET_EPOCHS} epochs), fp16, in CPU hours at this machine's "
          f"per-image costs: online run {online_h:,.0f}; training from a cache {cached_h:,.0f}")
    for key, v in imagenet.items():
        print(f"  {key:>9}: {v['stored_views']:,} views, {v['GiB']:.1f} GiB, {v['share_of_online_teacher_work']:.0%} "
              f"of the online run's teacher forwards; build {v['build_cpu_hours']:,.0f}; first run (build + "
              f"training) {v['first_run_cpu_hours']:,.0f} = {v['first_run_vs_online']:.2f}x cheaper than online, "
              f"every further run on the cache {v['further_run_vs_online']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
