"""``promptkd report RUNS_DIR``: every results.json under a folder -> the paper's tables + plots."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="gather results.json files over seeds into tables (markdown, CSV) and plots, beside the paper's",
        description=__doc__,
    )
    parser.add_argument("runs_dir", metavar="RUNS_DIR", help="folder searched recursively for results.json")
    parser.add_argument("--out", metavar="DIR", help="where report.md, report.csv and the PNGs go (default: RUNS_DIR)")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="K",
                        help="seeds every cell should have (default: every seed found); fewer are flagged")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    parser.add_argument("--quiet", action="store_true", help="do not print the markdown report")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from promptkd.report import make_report

    report = make_report(args.runs_dir, args.out, seeds=args.seeds, plot=not args.no_plot)
    if not args.quiet:
        print(report.markdown)
    for kind, path in report.files.items():
        print(f"wrote {kind}: {path}", file=sys.stderr)
    return 0
