"""Inference precision on this machine's CPU: fp32 vs bf16 vs what `--precision auto` picks, and onnxruntime.

For a CLIP ViT-B/16 student (random weights, 4 prompt tokens at 9 layers, projector, 100 class vectors)
and, when given, the trained demo student (EfficientNet-Lite0, on the demo's test images):

* PyTorch fp32; bf16 autocast (what `predict`/`serve --precision bf16` run); bf16 weights
  (``model.to(torch.bfloat16)``, for reference); onnxruntime fp32 (an fp32 ONNX export);
* what ``--precision auto`` resolves to here (``promptkd.precision.resolve_precision``: the CPU flags, then
  top-1 agreement with fp32 on a check batch: the demo's test images for the demo student, synthetic
  images for the random ViT) and why;
* images/s at batch 1 and 8 (median of --reps timed calls, variants interleaved) and top-1 agreement of
  each variant with PyTorch fp32.

    .venv/bin/python benchmarks/bench_precision.py --demo-student /tmp/demo_run/student --out bench_precision.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def measure(name: str, loaded, check_images: torch.Tensor, threads: int, reps: int, work: Path,
            sizes: tuple[int, ...]) -> dict:
    from promptkd.precision import cpu_flags, resolve_precision, top1_agreement
    from promptkd.runtime import OnnxPredictor, TorchPredictor
    from promptkd.serve import export_onnx

    torch.set_num_threads(threads)
    fp32 = TorchPredictor(loaded, "fp32")
    bf16 = TorchPredictor(loaded, "bf16")
    cast_student = copy.deepcopy(loaded.student).to(torch.bfloat16).eval()
    vectors, scale = loaded.store.vectors.float(), float(loaded.store.logit_scale)

    def cast(x: torch.Tensor) -> torch.Tensor:  # bf16 weights and activations; the cosine head in fp32
        f = cast_student(x.to(torch.bfloat16)).float()
        return scale * torch.nn.functional.normalize(f, dim=-1) @ vectors.t()

    onnx_path = export_onnx(loaded, work / f"{name}.onnx", output="logits")
    ort = OnnxPredictor(onnx_path, threads)

    def check(p: str) -> torch.Tensor:
        return (fp32 if p == "fp32" else bf16).logits(check_images)

    choice = resolve_precision("auto", check=check)
    runs = {
        "pytorch fp32": lambda x: fp32.logits(x),
        "pytorch bf16 autocast": lambda x: bf16.logits(x),
        "pytorch bf16 weights": cast,
        "onnxruntime fp32": lambda x: torch.from_numpy(ort.session.run(None, {"images": x.numpy()})[0]),
    }
    out: dict = {"auto": {"precision": choice.precision, "reason": choice.reason, "agreement": choice.agreement},
                 "cpu_flags": sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "avx512f", "avx2", "avx512_vnni"})}
    with torch.no_grad():
        ref = fp32.logits(check_images)
        for variant, fn in runs.items():
            out[variant] = {"top1_agreement_with_fp32": round(100 * top1_agreement(ref, fn(check_images)), 2)}
        for b in sizes:
            x = check_images[:b] if check_images.shape[0] >= b else check_images[:1].repeat(b, 1, 1, 1)
            timings: dict[str, list[float]] = {v: [] for v in runs}
            for fn in runs.values():
                fn(x)  # warm-up
            for _ in range(reps):
                for variant, fn in runs.items():
                    timings[variant].append(_once(fn, x))
            for variant, ts in timings.items():
                out[variant][f"batch{b}_images_per_s"] = round(b / statistics.median(ts), 2)
    auto_variant = "pytorch bf16 autocast" if choice.precision == "bf16" else "pytorch fp32"
    out["auto"].update({k: v for k, v in out[auto_variant].items() if k.endswith("images_per_s")})
    for b in sizes:
        k = f"batch{b}_images_per_s"
        out[f"onnxruntime_over_pytorch_fp32_batch{b}"] = round(out["onnxruntime fp32"][k] / out["pytorch fp32"][k], 2)
    return out


def _once(fn, x) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def vit_student(classes: int):
    from promptkd.models.clip import CLIP, preset
    from promptkd.models.clip_backbones import ClipStudent
    from promptkd.models.prompts import PromptConfig
    from promptkd.serve import LoadedStudent
    from promptkd.store import ClassVectorStore

    torch.manual_seed(0)
    clip = CLIP(preset("ViT-B/16").image_only())
    with torch.no_grad():  # a fresh CLIP leaves some weights at zero (they come from a checkpoint)
        for p in clip.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.02)
    backbone = ClipStudent(clip, 768,
                           PromptConfig(n_ctx_text=0, text_depth=0, ctx_init=None, n_ctx_vision=4, vision_depth=9))
    store = ClassVectorStore(torch.nn.functional.normalize(torch.randn(classes, 768), dim=-1),
                             [f"class {i}" for i in range(classes)], 100.0)
    return LoadedStudent(backbone.eval(), store, {"backbone": backbone.identity()}, "vit-b16-random")


def demo_images(student: Path, n: int) -> torch.Tensor:
    from promptkd.demo.pipeline import DemoConfig, sample_data

    meta = json.loads((student / "adapter.json").read_text())
    demo_cfg = meta["config"]["demo"]
    cfg = DemoConfig(**{k: v for k, v in demo_cfg.items() if k in DemoConfig.__dataclass_fields__})
    return sample_data(cfg).test.images[:n].unsqueeze(1).float().div(255.0)


def main() -> None:
    from promptkd.runtime import synthetic_check_batch
    from promptkd.serve import load_student

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-student", default=None, help="a trained demo student folder (optional)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--check-images", type=int, default=200, help="images in the agreement check")
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--out", help="write the figures as JSON")
    args = parser.parse_args()
    report: dict = {"threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        if args.demo_student:
            loaded = load_student(args.demo_student)
            report["demo student (EfficientNet-Lite0)"] = measure(
                "demo", loaded, demo_images(Path(args.demo_student), args.check_images), args.threads, args.reps,
                Path(tmp), (1, 8, 64))
        if not args.skip_vit:
            loaded = vit_student(args.classes)
            report["ViT-B/16 student (random weights)"] = measure(
                "vit", loaded, synthetic_check_batch(loaded.image_spec, n=min(args.check_images, 64)),
                args.threads, args.reps, Path(tmp), (1, 8))
    for model, r in report.items():
        if not isinstance(r, dict):
            continue
        print(f"\n{model}: auto -> {r['auto']['precision']} ({r['auto']['reason']})")
        sizes = sorted({int(k[5:].split('_')[0]) for v in r.values() if isinstance(v, dict) for k in v
                        if k.startswith("batch")})
        print(f"{'':26}" + "".join(f"{'b' + str(b) + ' img/s':>12}" for b in sizes) + f"{'top-1 agree':>13}")
        for variant in ("pytorch fp32", "pytorch bf16 autocast", "pytorch bf16 weights", "onnxruntime fp32", "auto"):
            row = r[variant]
            print(f"{variant:26}" + "".join(f"{row.get(f'batch{b}_images_per_s', ''):>12}" for b in sizes)
                  + f"{row.get('top1_agreement_with_fp32', ''):>13}")
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
