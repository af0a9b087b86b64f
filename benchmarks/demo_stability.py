"""How much the demo's numbers depend on the machine: the demo run cold (its own trunk cache) under
CPU-kernel variants that emulate other machines, with every intermediate compared to the first variant.

Each variant is a subprocess with its own environment:

* ``threads=N``: torch intra-op threads;
* ``ATEN_CPU_CAPABILITY=default|avx2|avx512``: ATen's vectorised kernels (``default`` = no SIMD);
* ``ONEDNN_MAX_CPU_ISA=SSE41|AVX2``: oneDNN's convolution kernels;
* ``MKL_CBWR=COMPATIBLE``: MKL's GEMM code path.

Recorded per variant: the frozen trunks' cached outputs, both ridge alignment matrices, the class vectors,
the learnt tensors after every epoch of both stages, and the table. Printed: the largest relative
difference of each intermediate from the first variant, the epoch where the trained tensors part, and
the Base/Novel/HM spread of every row.

Run (slow: one cold demo per variant; nice it on a shared machine):

    nice .venv/bin/python benchmarks/demo_stability.py --out /tmp/stability
    nice .venv/bin/python benchmarks/demo_stability.py --out /tmp/s --variants base threads2 --set student_lr=0.02
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

VARIANTS: dict[str, dict[str, str]] = {
    "base": {"threads": "1"},
    "threads2": {"threads": "2"},
    "aten-default": {"threads": "1", "ATEN_CPU_CAPABILITY": "default"},
    "aten-avx2": {"threads": "1", "ATEN_CPU_CAPABILITY": "avx2"},
    "onednn-avx2": {"threads": "1", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "onednn-sse41": {"threads": "1", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "mkl-compatible": {"threads": "1", "MKL_CBWR": "COMPATIBLE"},
    "all-other": {"threads": "2", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                  "MKL_CBWR": "COMPATIBLE"},
}

# runs inside each variant's process: the demo with hooks that keep the intermediates
CHILD = r"""
import json, sys
import torch
from safetensors.torch import save_file
from promptkd.demo import pipeline
from promptkd.engine import loop

out, threads, overrides = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
saved = {}
real_fit = loop.fit

def fit(module, dataset, cfg, out_dir, **kw):
    stage = "stage1" if "teacher" in str(out_dir) else "stage2"
    previous = getattr(module, "on_epoch_end", None)

    def on_epoch_end(epoch):
        result = previous(epoch) if previous is not None else {}
        flat = [p.detach().flatten().double() for p in module.parameters() if p.requires_grad]
        saved[f"{stage}_epoch{epoch + 1}"] = torch.cat(flat).float()
        return result

    module.on_epoch_end = on_epoch_end
    return real_fit(module, dataset, cfg, out_dir, **kw)

loop.fit = fit
from promptkd.demo import backbones
real_init = backbones.DemoTeacher.__init__

def init(self, *a, **kw):
    real_init(self, *a, **kw)
    saved[f"align_{self.image.cfg.variant}"] = self.align.matrix.detach().clone()

backbones.DemoTeacher.__init__ = init
cfg = pipeline.DemoConfig(out_dir=out + "/run", cache_dir=out + "/cache", threads=threads, progress=False,
                          **overrides)
summary = pipeline.run_demo(cfg, log=lambda _: None)
save_file({k: v.contiguous() for k, v in saved.items()}, out + "/intermediates.safetensors")
json.dump(summary, open(out + "/summary.json", "w"), indent=1)
"""


def run_variant(name: str, root: Path, overrides: dict) -> Path:
    settings = dict(VARIANTS[name])
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    threads = settings.pop("threads")
    env = {**os.environ, **settings}
    cmd = [sys.executable, "-c", CHILD, str(out), threads, json.dumps(overrides)]
    subprocess.run(cmd, env=env, check=True)
    return out


def load_tensors(out: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(out / "intermediates.safetensors"))
    for trunk in sorted((out / "cache" / "demo").glob("trunk-*.safetensors")):
        data = load_file(str(trunk))
        order = sorted(range(len(data["digests"])), key=lambda i: bytes(data["digests"][i].tolist()))
        tensors[re.sub(r"-\d+px-.*", "", trunk.name)] = data["maps"][torch.tensor(order)]
    for role in ("teacher", "student"):
        tensors[f"class_vectors_{role}"] = load_file(str(out / "run" / role / "class_vectors.safetensors"))["class_vectors"]
    return tensors


def compare(root: Path, names: list[str]) -> dict:
    ref = load_tensors(root / names[0])
    report = {"intermediates": {}, "rows": {}}
    for name in names[1:]:
        other = load_tensors(root / name)
        diffs = {}
        for key, a in ref.items():
            b = other.get(key)
            if b is None or b.shape != a.shape:
                continue
            scale = a.double().abs().max().clamp_min(1e-30)
            diffs[key] = float((a.double() - b.double()).abs().max() / scale)
        report["intermediates"][name] = diffs
    for name in names:
        report["rows"][name] = json.loads((root / name / "summary.json").read_text())["rows"]
    return report


def print_report(report: dict, names: list[str]) -> None:
    keys = sorted({k for d in report["intermediates"].values() for k in d},
                  key=lambda k: (k.startswith("stage"), k.split("_epoch")[0], int(k.split("epoch")[1]) if "epoch" in k else 0))
    print(f"max |difference| / max |value|, each variant vs {names[0]}:")
    print(f"{'intermediate':<38}" + "".join(f"{n:>15}" for n in names[1:]))
    for key in keys:
        print(f"{key:<38}" + "".join(f"{report['intermediates'][n].get(key, float('nan')):>15.2e}" for n in names[1:]))
    print("\nBase / Novel / HM per variant:")
    rows = report["rows"][names[0]].keys()
    for row in rows:
        print(f"  {row}:")
        values = {n: report["rows"][n][row] for n in names}
        for n, m in values.items():
            print(f"    {n:<16} {m['base']:6.2f} {m['novel']:6.2f} {m['hm']:6.2f}")
        hms = [m["hm"] for m in values.values()]
        print(f"    HM spread (max - min): {max(hms) - min(hms):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="working folder (one sub-folder per variant)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="the first is the reference (default: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a DemoConfig override for every variant, e.g. --set student_lr=0.02")
    parser.add_argument("--compare-only", action="store_true", help="only compare variants already run")
    args = parser.parse_args()
    from promptkd.config import apply_overrides
    from promptkd.demo.pipeline import DemoConfig

    defaults = DemoConfig().__dict__
    overrides = {k: v for k, v in apply_overrides(dict(defaults), args.overrides).items() if v != defaults[k]}
    root = Path(args.out)
    for name in args.variants:
        if not args.compare_only and not (root / name / "summary.json").is_file():
            print(f"running {name} ...", file=sys.stderr, flush=True)
            run_variant(name, root, overrides)
    report = compare(root, args.variants)
    (root / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print_report(report, args.variants)


if __name__ == "__main__":
    main()
