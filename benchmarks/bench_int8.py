"""int8 ONNX students, side by side in one run: accuracy on the demo, speed and size of a ViT-B/16 student.

1. Accuracy (needs a trained demo student, e.g. `promptkd demo --out /tmp/demo_run`): the demo's student
   exported to ONNX fp32 and int8 through `promptkd export` (static: calibrated on 128 of the demo's
   UNLABELLED train images written as PNGs; dynamic: no data), evaluated on the demo's test images
   (the same 2,000 as the demo's table): base / novel / HM next to PyTorch fp32. Extra static variants
   (every convolution in int8, per-tensor weights, QOperator format, entropy calibration) are quantised
   through the library with the same images.
2. Speed: a CLIP ViT-B/16 student (random weights, 4 prompt tokens at 9 layers, projector, 100 class
   vectors) in PyTorch fp32, onnxruntime fp32 and onnxruntime int8 (dynamic; static QDQ with
   Conv+MatMul+Gemm or MatMul only; static QOperator), at batch 1 and 8; median of --reps timed calls
   after a warm-up, all variants interleaved; file sizes.

    .venv/bin/python benchmarks/bench_int8.py --demo-student /tmp/demo_run/student --out bench_int8.json

Figures depend on the CPU and on what else runs on it; compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def hm(base: float, novel: float) -> float:
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0


def base_novel(probs: np.ndarray, labels: np.ndarray, base: list[int]) -> dict:
    """Base accuracy among base classes on base-class images, novel likewise (the paper's protocol)."""
    n = probs.shape[1]
    novel = [c for c in range(n) if c not in base]
    out = {}
    for name, group in (("base", base), ("novel", novel)):
        mask = np.isin(labels, group)
        pred = np.asarray(group)[probs[mask][:, group].argmax(1)]
        out[name] = 100 * float((pred == labels[mask]).mean())
    out["hm"] = hm(out["base"], out["novel"])
    return out


def accuracy_part(student: Path, work: Path, threads: int, calib_count: int) -> dict:
    from PIL import Image

    from promptkd.cli import main
    from promptkd.demo.pipeline import DemoConfig, sample_data
    from promptkd.quantize import QuantizeSettings, quantize_onnx
    from promptkd.runtime import OnnxPredictor, load_predictor

    meta = json.loads((student / "adapter.json").read_text())
    demo_cfg = meta["config"]["demo"]
    cfg = DemoConfig(**{k: v for k, v in demo_cfg.items() if k in DemoConfig.__dataclass_fields__})
    data = sample_data(cfg)
    calib = work / "calibration"
    calib.mkdir()
    for i in range(min(calib_count, len(data.unlabelled))):
        Image.fromarray(data.unlabelled.images[i].numpy()).save(calib / f"u{i:04d}.png")
    files = {"onnx fp32": work / "demo_fp32.onnx", "onnx int8 static (default)": work / "demo_int8_static.onnx",
             "onnx int8 dynamic": work / "demo_int8_dynamic.onnx"}
    t0 = time.perf_counter()
    assert main(["export", "--student", str(student), "--format", "onnx", "--out", str(files["onnx fp32"])]) == 0
    assert main(["export", "--student", str(student), "--format", "onnx", "--quantize", "int8", "--calibration",
                 str(calib), "--calibration-size", str(calib_count),
                 "--out", str(files["onnx int8 static (default)"])]) == 0
    if main(["export", "--student", str(student), "--format", "onnx", "--quantize", "int8",
             "--out", str(files["onnx int8 dynamic"])]) != 0:  # a CNN student has nothing for dynamic int8
        del files["onnx int8 dynamic"]
    variants = {"onnx int8 static, every conv int8": QuantizeSettings(mode="static", sensitive_convs_fp32=False),
                "onnx int8 static per-tensor weights": QuantizeSettings(mode="static", per_channel=False),
                "onnx int8 static QOperator": QuantizeSettings(mode="static", quant_format="qoperator"),
                "onnx int8 static entropy calibration": QuantizeSettings(mode="static", calibration_method="entropy")}
    from promptkd.quantize import calibration_batches, calibration_paths

    fp32_pred = OnnxPredictor(files["onnx fp32"])
    for name, settings in variants.items():
        files[name] = work / (name.replace(" ", "_") + ".onnx")
        batches = calibration_batches(calibration_paths(str(calib), limit=calib_count), fp32_pred.image_spec)
        quantize_onnx(files["onnx fp32"], files[name], settings, batches, calibration_source=str(calib))
    export_s = time.perf_counter() - t0
    images = data.test.images.unsqueeze(1).float().div(255.0)  # [N, 1, 28, 28] in [0, 1], as the demo
    labels = data.test.labels.numpy()
    results = {}
    torch_pred = load_predictor(student, precision="fp32", threads=threads)
    results["pytorch fp32"] = {"probs": np.concatenate([torch_pred.probabilities(images[i:i + 250])
                                                        for i in range(0, len(images), 250)])}
    for name, path in files.items():
        pred = OnnxPredictor(path, threads)
        results[name] = {"probs": np.concatenate([pred.probabilities(images[i:i + 250])
                                                  for i in range(0, len(images), 250)]),
                         "mib": path.stat().st_size / 2**20}
    ref = results["pytorch fp32"]["probs"].argmax(1)
    table = {}
    for name, r in results.items():
        m = base_novel(r["probs"], labels, data.base_classes)
        table[name] = {**{k: round(v, 2) for k, v in m.items()},
                       "top1_agreement_with_pytorch": round(100 * float((r["probs"].argmax(1) == ref).mean()), 2)}
        if "mib" in r:
            table[name]["size_mib"] = round(r["mib"], 2)
    fp32_hm = table["onnx fp32"]["hm"]
    for name in table:
        table[name]["hm_drop_vs_onnx_fp32"] = round(fp32_hm - table[name]["hm"], 2)
    reported = json.loads((student.parent / "results.json").read_text())["rows"].get("student") \
        if (student.parent / "results.json").is_file() else None
    return {"table": table, "demo_reported_student_row": reported, "test_images": int(len(labels)),
            "calibration_images": calib_count, "export_and_quantise_s": round(export_s, 1)}


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def speed_part(work: Path, threads: int, reps: int, classes: int, calib_count: int) -> dict:
    from bench_precision import vit_student  # the same random ViT-B/16 student (a script beside this one)

    from promptkd.quantize import QuantizeSettings, quantize_onnx
    from promptkd.runtime import ort_session, synthetic_check_batch
    from promptkd.serve import export_onnx

    loaded = vit_student(classes)
    fp32 = export_onnx(loaded, work / "vit_fp32.onnx")
    calib = synthetic_check_batch(loaded.image_spec, n=calib_count, seed=1).numpy()
    variants = {
        "onnx int8 dynamic (default without data)": QuantizeSettings(mode="dynamic"),
        "onnx int8 dynamic per-channel": QuantizeSettings(mode="dynamic", per_channel=True),
        "onnx int8 static QDQ Conv+MatMul+Gemm (default)": QuantizeSettings(mode="static"),
        "onnx int8 static QDQ MatMul only": QuantizeSettings(mode="static", op_types=("MatMul",)),
        "onnx int8 static QOperator": QuantizeSettings(mode="static", quant_format="qoperator"),
        "onnx int8 static QDQ, patch conv int8 too": QuantizeSettings(mode="static", sensitive_convs_fp32=False),
    }
    variants["onnx int8 dynamic (default without data)"].per_channel = False
    files = {"onnx fp32": fp32}
    quant_s = {}
    for name, settings in variants.items():
        path = work / ("vit_" + "".join(c if c.isalnum() else "_" for c in name) + ".onnx")
        t = time.perf_counter()
        batches = [calib[i:i + 8] for i in range(0, len(calib), 8)] if settings.mode == "static" else None
        quantize_onnx(fp32, path, settings, batches, calibration_source="synthetic")
        quant_s[name] = round(time.perf_counter() - t, 1)
        files[name] = path
    sessions = {name: ort_session(path, threads) for name, path in files.items()}
    torch.set_num_threads(threads)
    classifier = loaded.classifier("probabilities")
    out: dict = {name: {"size_mib": round(Path(p).stat().st_size / 2**20, 1)} for name, p in files.items()}
    out["pytorch fp32"] = {}
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224)
        xn = x.numpy()
        runners = {"pytorch fp32": lambda x=x: classifier(x)}
        for name, sess in sessions.items():
            runners[name] = (lambda s=sess, xn=xn: s.run(None, {"images": xn}))
        with torch.no_grad():
            for fn in runners.values():
                fn()  # warm-up
            timings: dict[str, list[float]] = {name: [] for name in runners}
            for _ in range(reps):  # interleaved so that load changes hit every variant alike
                for name, fn in runners.items():
                    timings[name].append(median_time(fn, 1))
        for name, ts in timings.items():
            out[name][f"batch{batch}_images_per_s"] = round(batch / statistics.median(ts), 2)
    for name in out:
        for batch in (1, 8):
            key = f"batch{batch}_images_per_s"
            out[name][f"batch{batch}_speedup_vs_onnx_fp32"] = round(out[name][key] / out["onnx fp32"][key], 2)
    # int8 vs fp32 outputs on the random-weight model (not an accuracy figure: random weights)
    x = torch.from_numpy(synthetic_check_batch(loaded.image_spec, n=16, seed=7).numpy())
    ref = sessions["onnx fp32"].run(None, {"images": x.numpy()})[0]
    for name, sess in sessions.items():
        got = sess.run(None, {"images": x.numpy()})[0]
        out[name]["max_abs_prob_diff_vs_fp32"] = float(np.abs(got - ref).max())
    return {"table": out, "quantise_s": quant_s, "classes": classes, "reps": reps}


def print_table(title: str, table: dict, columns: list[str]) -> None:
    print(f"\n{title}")
    width = max(len(n) for n in table) + 2
    print(" " * width + "  ".join(f"{c:>14}" for c in columns))
    for name, row in table.items():
        print(f"{name:<{width}}" + "  ".join(f"{row.get(c, ''):>14}" for c in columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-student", default="runs/demo/student", help="a trained demo student folder")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and onnxruntime threads")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per variant and batch size")
    parser.add_argument("--classes", type=int, default=100, help="class vectors of the ViT-B/16 student")
    parser.add_argument("--calibration-images", type=int, default=128)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--out", help="write all figures as JSON")
    args = parser.parse_args()
    report: dict = {"threads": args.threads, "cpu": _cpu_name()}
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        work = Path(tmp)
        if not args.skip_accuracy:
            (work / "acc").mkdir()
            acc = accuracy_part(Path(args.demo_student), work / "acc", args.threads, args.calibration_images)
            report["accuracy"] = acc
            print_table(f"demo student on {acc['test_images']} test images (calibration: "
                        f"{acc['calibration_images']} unlabelled train images)", acc["table"],
                        ["base", "novel", "hm", "hm_drop_vs_onnx_fp32", "top1_agreement_with_pytorch", "size_mib"])
            print(f"demo's own table, student row: {acc['demo_reported_student_row']}")
        if not args.skip_speed:
            (work / "speed").mkdir()
            sp = speed_part(work / "speed", args.threads, args.reps, args.classes, min(args.calibration_images, 32))
            report["speed"] = sp
            print_table(f"ViT-B/16 student (random weights), images/s with {args.threads} threads, median of "
                        f"{args.reps}", sp["table"],
                        ["batch1_images_per_s", "batch8_images_per_s", "batch8_speedup_vs_onnx_fp32", "size_mib"])
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
