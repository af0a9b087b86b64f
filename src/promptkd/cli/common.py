"""Options shared by the commands that run a training stage."""

from __future__ import annotations

import argparse


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
