"""The ``promptkd`` command. Each subcommand lives in its own module under ``promptkd.cli`` and
exposes ``register(subparsers)``; this file only discovers them, so ``--help`` lists what exists."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path

# module name (under promptkd.cli) for each group of subcommands, in --help order
SUBCOMMAND_MODULES = [
    "demo_cmd",
    "data_cmd",
    "teacher_cmd",
    "class_vectors_cmd",
    "distill_cmd",
    "teacher_cache_cmd",
    "evaluate_cmd",
    "report_cmd",
    "predict_cmd",
    "export_cmd",
    "serve_cmd",
    "convert_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    from promptkd import __version__

    parser = argparse.ArgumentParser(
        prog="promptkd",
        description="Unsupervised prompt distillation of CLIP-like vision-language models (PromptKD).",
    )
    parser.add_argument("--version", action="version", version=f"promptkd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"promptkd.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"promptkd.cli.{name}":
                continue  # that group is not part of this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_usage(sys.stderr)
        print("promptkd: error: a command is required (promptkd --help lists them)", file=sys.stderr)
        return 2
    formatwarning = warnings.formatwarning
    if not getattr(args, "debug", False):
        warnings.formatwarning = _warning_line(args.command, formatwarning)
    try:
        from promptkd.progress import progress_mode

        progress_mode()  # a bad $PROMPTKD_PROGRESS is refused before any work
        result = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `promptkd predict ... | head`: the reader left, nothing to report
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as exc:  # bad input, a missing or unwritable file: one line naming it
        if getattr(args, "debug", False):
            raise
        _close_progress_bars()
        print(f"promptkd {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from promptkd.engine.loop import NonFiniteLossError

        if not isinstance(exc, NonFiniteLossError) or getattr(args, "debug", False):
            raise
        _close_progress_bars()
        print(f"promptkd {args.command}: error: {exc}", file=sys.stderr)  # names the step; checkpoint kept
        return 3
    finally:
        warnings.formatwarning = formatwarning
    return int(result or 0)


def _warning_line(command: str, default):
    """promptkd's own warnings as one line, ``promptkd COMMAND: warning: ...`` (others, and --debug, as Python
    shows them: file, line and source)."""
    package = str(Path(__file__).resolve().parents[1])

    def format_warning(message, category, filename, lineno, line=None) -> str:
        if issubclass(category, UserWarning) and str(Path(filename).resolve()).startswith(package):
            return f"promptkd {command}: warning: {' '.join(str(message).split())}\n"
        return default(message, category, filename, lineno, line)

    return format_warning


def _close_progress_bars() -> None:
    """An error ends the run mid-bar: close open bars so the error starts on its own line."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in str(exc):
        return f"{exc.filename}: {exc.strerror or exc}"
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
