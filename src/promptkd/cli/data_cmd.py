"""``promptkd data``: check a data root, list the known benchmarks, write tiny fixture datasets."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="check data roots, list benchmarks, make tiny fixtures",
                                   description="Check data roots, list the known benchmarks, make tiny fixture datasets.")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: parser.print_help() or 0)

    check = sub.add_parser("check", help="validate a data root (CoOp layout) and compare counts with the paper")
    check.add_argument("root", help="data root holding caltech-101/, imagenet/, ... as in CoOp's DATASETS.md")
    check.add_argument("--dataset", action="append", metavar="NAME",
                       help="check only this dataset (repeatable): a benchmark name, or your own data as "
                            "folder:PATH or list:FILE (relative to ROOT); default: every benchmark folder present")
    check.add_argument("--verify-images", action="store_true", help="decode every image (slow); default: existence")
    check.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                       help="processes decoding images with --verify-images (default: up to 8)")
    check.add_argument("--strict", action="store_true", help="also fail when a count differs from the paper's")
    check.add_argument("--max-problems", type=int, default=50, help="problems listed per dataset (0: all)")
    check.add_argument("--json", metavar="FILE", help="also write the reports as JSON")
    check.set_defaults(func=run_check)

    listing = sub.add_parser("list", help="the known benchmarks, their folders and the paper's counts")
    listing.set_defaults(func=run_list)

    fixture = sub.add_parser("fixture", help="write a tiny dataset in a benchmark's real layout (for tests/demos)")
    fixture.add_argument("root")
    fixture.add_argument("--dataset", action="append", metavar="NAME", required=True)
    fixture.add_argument("--classes", type=int, default=4)
    fixture.add_argument("--per-class", type=int, default=3)
    fixture.set_defaults(func=run_fixture)


def run_check(args: argparse.Namespace) -> int:
    from promptkd.data.check import check_root, format_reports, reports_as_json

    reports = check_root(args.root, args.dataset, verify_images=args.verify_images, progress=sys.stderr.isatty(),
                         workers=args.workers)
    limit = args.max_problems if args.max_problems > 0 else 10**9
    print(format_reports(reports, max_problems=limit))
    if args.json:
        Path(args.json).write_text(json.dumps(reports_as_json(reports), indent=2))
    failed = [r.name for r in reports if not r.ok(strict=args.strict)]
    if failed:
        print(f"\n{len(failed)} dataset(s) with problems: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def run_list(args: argparse.Namespace) -> int:
    from promptkd.data.benchmarks import REGISTRY

    print(f"{'dataset':16} {'folder':66} {'classes':>7} {'train':>10} {'test-base':>10} {'test-novel':>10} {'test':>8}")
    for spec in REGISTRY.values():
        where = f"{spec.folder}/{spec.image_dir}".rstrip("/")
        if spec.split_file:
            where += f" + {spec.split_file}"

        def num(v: int | None) -> str:
            return f"{v:,}" if v is not None else "-"

        print(f"{spec.name:16} {where:66} {spec.classes:>7} {num(spec.paper_train):>10} "
              f"{num(spec.paper_test_base):>10} {num(spec.paper_test_novel):>10} {num(spec.paper_test):>8}")
    return 0


def run_fixture(args: argparse.Namespace) -> int:
    from promptkd.data.fixtures import make_fixture

    for name in args.dataset:
        fx = make_fixture(args.root, name, classes=args.classes, per_class=args.per_class)
        print(f"{fx.name}: {fx.dataset_dir} ({fx.count('train')} train, {fx.count('test')} test images)")
    return 0
