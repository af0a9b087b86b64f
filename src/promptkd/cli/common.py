"""Options shared by the commands that run a training stage, the list of their --set keys in --help, and
how to name this command to the user."""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path


def command_name(argv0: str | None = None, which: str | None = None) -> str:
    """How the user runs promptkd again from their shell, for printed next steps.

    ``promptkd`` when that is on PATH and is this program; else the path the user typed
    (``.venv/bin/promptkd`` after the README's set-up without activating the venv); else
    ``python -m promptkd`` with this interpreter. ``argv0``/``which`` default to ``sys.argv[0]`` and
    ``shutil.which("promptkd")``."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    which = shutil.which("promptkd") if which is None else which
    if Path(argv0).name == "promptkd":
        if which and os.path.realpath(which) == os.path.realpath(argv0):
            return "promptkd"
        if os.path.isabs(argv0):
            rel = os.path.relpath(argv0)
            return rel if not rel.startswith("..") else argv0
        return argv0
    if which:
        return "promptkd"
    python = os.path.relpath(sys.executable)
    return f"{python if not python.startswith('..') else sys.executable} -m promptkd"


def add_run_options(parser: argparse.ArgumentParser, seed_help: str) -> None:
    """--seed, --set, --resume, --overwrite, --trust-checkpoint, --debug."""
    parser.add_argument("--seed", type=int, default=None, help=seed_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=5 (repeatable; every key and value "
                             "is checked before anything runs)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in --out with its saved config (--set may change the "
                             "schedule: train.lr, warmup_lr, momentum, weight_decay, scheduler; and workers, "
                             "device, precision, max_steps, checkpointing)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run that --out already holds (its files only)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow unpickling the weights files named on this command line when they are not plain "
                             "tensor files (only for files you trust)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def settings_help(schema: str, title: str, exclude: Iterable[str] | str = (),
                  footer: Callable[[type], str] | None = None) -> type[argparse.HelpFormatter]:
    """A help formatter that ends ``--help`` with every ``--set`` key of a config schema, its default and
    its bounds or choices. ``schema`` is ``"module:Class"``, imported only when help is shown (so parsing
    arguments never imports torch); ``exclude`` lists keys not to show, or names a tuple of them in the
    schema's module; ``footer(schema_class)`` adds a closing paragraph."""
    module_name, class_name = schema.split(":")

    class SettingsHelp(argparse.HelpFormatter):
        def format_help(self) -> str:
            from promptkd import config

            module = importlib.import_module(module_name)
            cls = getattr(module, class_name)
            rows = config.describe(cls, exclude=getattr(module, exclude) if isinstance(exclude, str) else exclude)
            key_width = min(max(len(key) for key, _ in rows) + 2, 36)
            width = max(shutil.get_terminal_size().columns - 2, 60)
            lines = [f"\n{title}:"]
            for key, text in rows:
                head = f"  {key:<{key_width}}"
                if len(head) > key_width + 2:  # a long key=default gets its own line
                    lines.append(head.rstrip())
                    head = " " * (key_width + 2)
                wrapped = textwrap.wrap(text, width - len(head)) or [""]
                lines.append((head + wrapped[0]).rstrip())
                lines.extend(" " * len(head) + more for more in wrapped[1:])
            if footer is not None:
                lines.append(textwrap.fill(footer(cls), width, initial_indent="  ", subsequent_indent="  "))
            return super().format_help() + "\n".join(lines) + "\n"

    return SettingsHelp


def preset_note(_schema: type) -> str:
    """The closing paragraph of a stage's --set list."""
    return ("These are the schema's defaults; the --config preset's values apply on top of them, then --set. "
            "Presets are YAML files packaged in promptkd/presets/; a run saves the config it resolved as "
            "OUT/config.yaml.")
