"""One command that checks promptkd on a GPU and prints a table (within 8 minutes on one H200).

    python benchmarks/gpu_check.py --out gpu_check.json            # cuda:0, the real architectures
    python benchmarks/gpu_check.py --device cpu --tiny             # the same code, tiny models, on CPU

Sections (random weights everywhere; nothing is downloaded):

1. parity: our CLIP ViT-L/14 (image and text towers) on the device against float32 on the CPU, on
   L2-normalised features: fp32 (TF32 off) within 1e-4; autocast bf16 within 2^-7 and fp16 within
   2^-10, i.e. twice each format's unit roundoff (CPU autocast measured 0.45 and 0.37 of it on ViT-B/16).
2. distill step, ViT-L/14 teacher -> ViT-B/16 student (prompts depth 9, conv projector), 1000 classes,
   online (teacher forward in the step) and cached (fp16 teacher features in the batch), batch 8, 64 and
   256, autocast bf16 and fp16 (fp16 with a GradScaler, as the loop): images/s, peak memory, and the
   step's achieved FLOP rate as a fraction of the measured bf16 matmul rate (section 5).
3. PromptSRC teacher step (ViT-L/14, IVLP 4+4 tokens depth 9, batch 8, fp16 autocast + GradScaler, as
   teacher/base2novel) over 100 and 1000 classes: s/step and peak memory (one frozen template, so the
   set-up stays short; the step's cost does not depend on it).
4. torchrun smoke: ``torch.distributed.run --nproc_per_node=1`` starts a worker that opens an NCCL
   process group (gloo on CPU), all-reduces, and runs ``promptkd distill`` (the CLI) on a fixture
   dataset with tiny random CLIP files on the device; checks the student artefact.
5. the device's bf16 matmul rate (8192^3, or 512^3 with --tiny).

``--tiny`` swaps the models for tiny CLIPs, the batches for 2/4/8 and the class counts for 10/20, so
the whole script runs in about a minute on a CPU (tests/test_gpu_check.py runs it that way). A time
budget (``--budget``, default 420 s) skips what would not fit and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROWS: list[dict] = []


def row(section: str, setting: str, value: str, limit: str = "", ok: bool | None = None, **data) -> None:
    ROWS.append({"section": section, "setting": setting, "value": value, "limit": limit,
                 "status": "" if ok is None else ("ok" if ok else "FAIL"), **data})
    print(f"[{section}] {setting}: {value} {limit} {'' if ok is None else ('ok' if ok else 'FAIL')}", file=sys.stderr,
          flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def fmt_mem(gib: float | None) -> str:
    return "n/a on CPU" if gib is None else f"{gib:.1f} GiB"


def architectures(tiny: bool):
    """(teacher CLIP config, student CLIP config)."""
    from promptkd.models.clip import preset, tiny_clip_config

    if tiny:
        return (tiny_clip_config(width=64, layers=2, image_size=32, embed_dim=48),
                tiny_clip_config(width=32, layers=2, image_size=32, text=False))
    return preset("ViT-L/14"), preset("ViT-B/16").image_only()


def autocast(device: torch.device, precision: str):
    from promptkd.engine.loop import autocast as loop_autocast

    return loop_autocast(device, precision)


# --- 1. parity -------------------------------------------------------------------------------------------

TOLERANCES = {"fp32": 1e-4, "bf16": 2.0**-7, "fp16": 2.0**-10}


def check_parity(device: torch.device, tiny: bool) -> None:
    from promptkd.models.clip import random_clip

    cfg, _ = architectures(tiny)
    clip = random_clip(cfg, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    size = cfg.vision.image_size
    images = torch.randn(2, 3, size, size, generator=g)
    tokens = torch.randint(1, 400, (3, 24), generator=g)
    tokens[:, -1] = cfg.text.vocab_size - 1  # EOT: the largest id
    with torch.no_grad():
        ref = {"image": F.normalize(clip.encode_image(images).float(), dim=-1),
               "text": F.normalize(clip.encode_text(tokens).float(), dim=-1)}
        clip = clip.to(device)
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            for precision in ("fp32", "bf16", "fp16"):
                with autocast(device, precision):
                    got = {"image": clip.encode_image(images.to(device)), "text": clip.encode_text(tokens.to(device))}
                for tower, feats in got.items():
                    err = float((F.normalize(feats.float(), dim=-1).cpu() - ref[tower]).abs().max())
                    tol = TOLERANCES[precision]
                    row("parity", f"{'tiny CLIP' if tiny else 'ViT-L/14'} {tower} {precision} vs CPU fp32",
                        f"max |d| {err:.2e}", f"<= {tol:.1e}", err <= tol, error=err)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    del clip


# --- 2. distill step -----------------------------------------------------------------------------------


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def training_step(module, data: dict, device: torch.device, precision: str):
    """One optimiser step of ``module`` on ``data`` as the loop runs it (autocast; fp16: a GradScaler)."""
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")

    def one_step() -> None:
        with autocast(device, precision):
            loss = module(data)["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return one_step


def check_distill(device: torch.device, tiny: bool, batches: list[int], classes: int, steps: int,
                  matmul_tflops: float | None, deadline: float) -> None:
    from promptkd.methods.promptkd import DistillModule
    from promptkd.models.clip import random_clip
    from promptkd.models.clip_backbones import STUDENT_PROMPTS, ClipStudent, ClipTeacher
    from promptkd.models.prompts import PromptConfig
    from promptkd.store import ClassVectorStore

    t_cfg, s_cfg = architectures(tiny)
    depth = 2 if tiny else 9
    prompts = PromptConfig(text_depth=depth, vision_depth=depth)
    teacher = ClipTeacher(random_clip(t_cfg, seed=0), prompts, random_init_seed=0, prompt_seed=0).to(device)
    teacher.requires_grad_(False).eval()
    student_prompts = {**STUDENT_PROMPTS.to_dict(), "vision_depth": depth}
    vectors = F.normalize(torch.randn(classes, teacher.embed_dim, generator=torch.Generator().manual_seed(3)), dim=-1)
    store = ClassVectorStore(vectors, [f"class {i}" for i in range(classes)], float(teacher.logit_scale()))
    size = t_cfg.vision.image_size
    for precision in ("bf16", "fp16"):
        for batch in batches:
            for variant in ("online", "cached"):
                if time.time() > deadline:
                    row("distill", f"{variant} {precision} batch {batch}", "skipped (time budget)")
                    continue
                torch.manual_seed(1)
                student = ClipStudent(random_clip(s_cfg, seed=1), teacher.embed_dim, student_prompts,
                                      projector="mlp", random_init_seed=1, prompt_seed=1).to(device)
                module = DistillModule(teacher if variant == "online" else None, student, store, kd_weight=1000.0,
                                       teacher_logit_scale=None if variant == "online" else store.logit_scale)
                module.to(device).train()
                images = torch.randn(batch, 3, size, size, device=device)
                data = {"image": images}
                if variant == "cached":
                    with torch.no_grad(), autocast(device, precision):
                        data["teacher_features"] = F.normalize(teacher.encode_image(images).float(), dim=-1).half()
                one_step = training_step(module, data, device, precision)
                try:
                    one_step()  # warm-up (kernels, allocator)
                    flops = count_flops(one_step)
                    reset_peak(device)
                    times = []
                    for _ in range(steps):
                        sync(device)
                        start = time.perf_counter()
                        one_step()
                        sync(device)
                        times.append(time.perf_counter() - start)
                except torch.cuda.OutOfMemoryError:
                    row("distill", f"{variant} {precision} batch {batch}", "out of memory")
                    del module, student, one_step
                    reset_peak(device)
                    continue
                sec = statistics.median(times)
                tflops = flops / sec / 1e12
                share = f", {tflops:.3g} TFLOP/s = {tflops / matmul_tflops:.1%} of bf16 matmul" if matmul_tflops else ""
                row("distill", f"{variant} {precision} batch {batch}",
                    f"{batch / sec:.1f} img/s, {fmt_mem(peak_gib(device))}{share}", images_per_s=batch / sec,
                    peak_gib=peak_gib(device), step_s=sec, flops_per_step=flops,
                    matmul_fraction=tflops / matmul_tflops if matmul_tflops else None)
                del module, student, one_step
                reset_peak(device)
    pairs: dict[tuple[str, str], dict[str, dict]] = {}
    for r in ROWS:
        if r["section"] == "distill" and "images_per_s" in r:
            variant, precision, _, batch = r["setting"].split()
            pairs.setdefault((precision, batch), {})[variant] = r
    for (precision, batch), both in pairs.items():
        if len(both) == 2:
            online, cached = both["online"], both["cached"]
            row("distill", f"cached / online {precision} batch {batch}",
                f"{cached['images_per_s'] / online['images_per_s']:.2f}x",
                f"(FLOP ratio {online['flops_per_step'] / cached['flops_per_step']:.2f}x)")


# --- 3. PromptSRC teacher step ---------------------------------------------------------------------------


def check_teacher_step(device: torch.device, tiny: bool, class_counts: list[int], steps: int, deadline: float) -> None:
    from promptkd.methods.promptsrc import PromptSRCModule
    from promptkd.models.clip import random_clip
    from promptkd.models.clip_backbones import ClipTeacher
    from promptkd.models.prompts import PromptConfig

    t_cfg, _ = architectures(tiny)
    depth = 2 if tiny else 9
    clip = random_clip(t_cfg, seed=0)
    batch, size = 8, t_cfg.vision.image_size
    for n in class_counts:
        if time.time() > deadline:
            row("teacher", f"PromptSRC {n} classes", "skipped (time budget)")
            continue
        teacher = ClipTeacher(clip, PromptConfig(text_depth=depth, vision_depth=depth), prompt_seed=0).to(device)
        names = [f"class number {i}" for i in range(n)]
        module = PromptSRCModule(teacher, names, {"method": "promptsrc"}, templates=["a photo of a {}."]).to(device)
        module.train()
        data = {"image": torch.randn(batch, 3, size, size, device=device),
                "label": torch.arange(batch, device=device) % n}
        one_step = training_step(module, data, device, "fp16")
        try:
            times = []
            reset_peak(device)
            for i in range(steps + 1):
                sync(device)
                start = time.perf_counter()
                one_step()
                sync(device)
                if i:
                    times.append(time.perf_counter() - start)
        except torch.cuda.OutOfMemoryError:
            row("teacher", f"PromptSRC {n} classes batch {batch} fp16", "out of memory")
            continue
        finally:
            del module, one_step
        sec = statistics.median(times)
        row("teacher", f"PromptSRC {n} classes batch {batch} fp16", f"{sec:.3f} s/step, {fmt_mem(peak_gib(device))}",
            step_s=sec, peak_gib=peak_gib(device))
        reset_peak(device)


# --- 4. torchrun smoke -----------------------------------------------------------------------------------


def prepare_distill_fixture(root: Path) -> list[str]:
    """Fixture DTD, tiny teacher artefact + class vectors, tiny student CLIP file; the distill arguments."""
    from promptkd import artifacts
    from promptkd.data.fixtures import make_fixture
    from promptkd.models.clip import tiny_clip
    from promptkd.models.clip_backbones import tiny_clip_teacher
    from promptkd.models.weights import save_clip
    from promptkd.store import build_store

    fx = make_fixture(root / "data", "DTD", classes=4, per_class=4)
    teacher = tiny_clip_teacher(seed=0, width=64, layers=2, embed_dim=48, image_size=32)
    artifacts.save_adapter(teacher, root / "teacher", "teacher", class_names=fx.classnames)
    build_store(teacher, fx.classnames).save(root / "cv.safetensors")
    save_clip(tiny_clip(seed=1, width=32, layers=2, image_size=32), root / "student.safetensors")
    return ["distill", "--config", "distill/base2novel/dtd", "--data-root", str(root / "data"),
            "--teacher", str(root / "teacher"), "--class-vectors", str(root / "cv.safetensors"),
            "--student-weights", str(root / "student.safetensors"), "--out", str(root / "student"),
            "--set", "student.depth=2", "--set", "train.epochs=2", "--set", "train.batch_size=4",
            "--set", "train.num_workers=0", "--set", "train.precision=fp32"]


def distill_worker(device: str, argv: list[str]) -> int:
    """Inside torchrun: open the process group (NCCL on CUDA), all-reduce, then run the distill CLI."""
    import torch.distributed as dist

    from promptkd.cli import main

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    t = torch.ones(1, device=torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu")
    dist.all_reduce(t)
    print(json.dumps({"backend": dist.get_backend(), "world_size": dist.get_world_size(), "all_reduce": float(t)}))
    code = main([*argv, "--set", f"train.device={device}"])
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


def check_torchrun(device: torch.device, deadline: float) -> None:
    if time.time() > deadline:
        row("torchrun", "1-process distill", "skipped (time budget)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        argv = prepare_distill_fixture(Path(tmp))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=1",
               __file__, "--distill-worker", str(device), "--", *argv]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        start = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(30, deadline - time.time()))
        info = next((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")), {})
        artefact = (Path(tmp) / "student" / "adapter.safetensors").is_file()
        ok = proc.returncode == 0 and artefact and info.get("all_reduce") == 1.0
        detail = (f"{info.get('backend')} world {info.get('world_size')}, all-reduce {info.get('all_reduce')}, "
                  f"exit {proc.returncode}, artefact {'written' if artefact else 'MISSING'}, "
                  f"{time.time() - start:.0f} s")
        row("torchrun", "1-process distill (CLI, fixture, tiny CLIP)", detail, "", ok)
        if not ok:
            print(proc.stderr[-3000:], file=sys.stderr)


# --- 5. matmul rate ----------------------------------------------------------------------------------------


def matmul_tflops(device: torch.device, n: int, reps: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    sec = (time.perf_counter() - start) / reps
    return 2 * n**3 / sec / 1e12


# --- main ----------------------------------------------------------------------------------------------------


def print_table(header: str) -> None:
    print(header)
    widths = [max(len(str(r[k])) for r in ROWS + [{"section": "section", "setting": "setting", "value": "value",
                                                     "limit": "limit", "status": "status"}])
              for k in ("section", "setting", "value", "limit", "status")]
    names = ("section", "setting", "value", "limit", "status")
    print(" | ".join(n.ljust(w) for n, w in zip(names, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in ROWS:
        print(" | ".join(str(r[k]).ljust(w) for k, w in zip(names, widths)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny models, small batches: a CPU smoke run")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; later sections are skipped past it")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per setting (median)")
    ap.add_argument("--skip", nargs="*", default=[], choices=("parity", "distill", "teacher", "torchrun"),
                    help="sections to leave out")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--distill-worker", help=argparse.SUPPRESS)
    ap.add_argument("worker_argv", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.distill_worker:
        return distill_worker(args.distill_worker, args.worker_argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: CUDA is not available here; use --device cpu --tiny for a smoke run")
    start = time.time()
    deadline = start + args.budget
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    tflops = matmul_tflops(device, 512 if args.tiny else 8192, 3 if args.tiny else 20)
    row("matmul", f"bf16 {512 if args.tiny else 8192}^3", f"{tflops:.3g} TFLOP/s", tflops=tflops)
    batches, classes = ([2, 4, 8], [10, 20]) if args.tiny else ([8, 64, 256], [100, 1000])
    sections = {
        "parity": lambda: check_parity(device, args.tiny),
        "distill": lambda: check_distill(device, args.tiny, batches, 1000 if not args.tiny else 20, args.steps, tflops,
                                         deadline),
        "teacher": lambda: check_teacher_step(device, args.tiny, classes, max(1, args.steps // 2), deadline),
        "torchrun": lambda: check_torchrun(device, deadline),
    }
    for section, run in sections.items():
        if section in args.skip:
            continue
        try:
            run()
        except Exception as exc:  # one broken section must not hide the others' results
            row(section, "error", f"{type(exc).__name__}: {exc}"[:200], "", False)
    elapsed = time.time() - start
    failed = [r for r in ROWS if r["status"] == "FAIL"]
    models = "tiny models" if args.tiny else "ViT-L/14 -> ViT-B/16, random weights"
    print_table(f"\npromptkd GPU check on {name}, torch {torch.__version__}, {models}, {elapsed:.0f} s, "
                f"load average {os.getloadavg()[0]:.1f}")
    print(f"\n{len(failed)} check(s) failed" if failed else "\nall checks passed")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": name, "torch": torch.__version__, "tiny": args.tiny,
                                              "seconds": elapsed, "rows": ROWS}, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
