"""``promptkd data``: check a data root, list the known benchmarks, write the packaged split files,
write tiny fixture datasets."""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from promptkd.data.decode import DEFAULT_MAX_IMAGE_PIXELS

    parser = subparsers.add_parser("data", help="check data roots, list benchmarks, write split files, make fixtures",
                                   description="Check data roots, list the known benchmarks, write CoOp's split files "
                                               "(packaged with promptkd) into a data root, make tiny fixture datasets.")
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
    check.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                       help="with --verify-images: images over N pixels are problems, except JPEGs, which are "
                            "decoded reduced as in training (the config's data.max_image_pixels; "
                            f"default {DEFAULT_MAX_IMAGE_PIXELS:,}, Pillow's limit)")
    check.add_argument("--strict", action="store_true",
                       help="also fail (in the table and the exit code) when a count differs from the paper's")
    check.add_argument("--max-problems", type=int, default=50, help="problems listed per dataset (0: all; default 50)")
    check.add_argument("--json", metavar="FILE", help="also write the reports as JSON")
    check.add_argument("--debug", action="store_true", help="show tracebacks")
    check.set_defaults(func=run_check)

    listing = sub.add_parser("list", help="the known benchmarks, their folders and the paper's counts")
    listing.add_argument("--debug", action="store_true", help="show tracebacks")
    listing.set_defaults(func=run_list)

    splits = sub.add_parser("splits", help="list or write CoOp's split files packaged with promptkd",
                            description="CoOp's split_zhou_*.json files (byte-for-byte copies ship with promptkd). "
                                        "Without --write: list them. With --write ROOT: write them into ROOT's "
                                        "dataset folders; an identical file is left alone, a different one is "
                                        "never replaced without --overwrite.")
    splits.add_argument("--write", metavar="ROOT", help="data root (CoOp layout) to write the split files into")
    splits.add_argument("--dataset", action="append", metavar="NAME",
                        help="only this benchmark (repeatable; its folder is created if needed); default: every "
                             "benchmark with a packaged split file whose folder exists under ROOT")
    splits.add_argument("--overwrite", action="store_true", help="replace existing split files that differ")
    splits.add_argument("--debug", action="store_true", help="show tracebacks")
    splits.set_defaults(func=run_splits)

    fixture = sub.add_parser("fixture", help="write a tiny dataset in a benchmark's real layout (for tests/demos)",
                             description="Write tiny synthetic datasets (small patterned JPEGs) in the real on-disk "
                                         "layout of the named benchmarks, for tests and demos.")
    fixture.add_argument("root", help="data root to write into (created if needed)")
    fixture.add_argument("--dataset", action="append", metavar="NAME", required=True,
                         help="benchmark whose layout to copy (repeatable; `promptkd data list` names them)")
    fixture.add_argument("--classes", type=int, default=4, help="classes per dataset (default 4)")
    fixture.add_argument("--per-class", type=int, default=3, help="train images per class (default 3)")
    fixture.add_argument("--debug", action="store_true", help="show tracebacks")
    fixture.set_defaults(func=run_fixture)


def run_check(args: argparse.Namespace) -> int:
    from promptkd.data.check import check_root, format_reports, reports_as_json
    from promptkd.fileio import atomic_write_json

    if args.max_image_pixels < 1:
        raise ValueError(f"--max-image-pixels must be >= 1, got {args.max_image_pixels}")
    reports = check_root(args.root, args.dataset, verify_images=args.verify_images, progress=sys.stderr.isatty(),
                         workers=args.workers, max_image_pixels=args.max_image_pixels)
    limit = args.max_problems if args.max_problems > 0 else 10**9
    print(format_reports(reports, max_problems=limit, strict=args.strict, verified=args.verify_images))
    if args.json:
        atomic_write_json(args.json, reports_as_json(reports, strict=args.strict))
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


def run_splits(args: argparse.Namespace) -> int:
    from promptkd.data.benchmarks import get_spec
    from promptkd.data.split_files import files_for, packaged_split, packaged_split_datasets, write_split_files

    if args.write is None:
        if args.dataset or args.overwrite:
            raise ValueError("--dataset and --overwrite go with --write ROOT")
        print(f"{'dataset':14} {'folder':14} {'files':60} {'train':>6} {'val':>6} {'test':>6}")
        for name in packaged_split_datasets():
            split = packaged_split(name)
            print(f"{name:14} {get_spec(name).folder:14} {', '.join(files_for(name)):60} "
                  f"{len(split['train']):>6} {len(split['val']):>6} {len(split['test']):>6}")
        from promptkd.cli.common import command_name

        print(f"\nwrite them into a data root: {command_name()} data splits --write ROOT [--dataset NAME]")
        return 0
    for w in write_split_files(args.write, args.dataset, overwrite=args.overwrite):
        said = {"written": "written", "unchanged": "identical file already there", "replaced": "replaced (--overwrite)"}
        print(f"{w.dataset}: {w.path} ({said[w.status]})")
    return 0


def run_fixture(args: argparse.Namespace) -> int:
    from promptkd.data.fixtures import make_fixture

    for name in args.dataset:
        fx = make_fixture(args.root, name, classes=args.classes, per_class=args.per_class)
        print(f"{fx.name}: {fx.dataset_dir} ({fx.count('train')} train, {fx.count('test')} test images)")
    return 0
