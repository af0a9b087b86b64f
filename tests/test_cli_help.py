"""Every option of every `promptkd` subcommand has a help line, and one that states its default.

One test case per subcommand (walked from promptkd.cli.build_parser, so a new command is checked
without editing this file); each case lists ALL its offending options in one failure message."""

from __future__ import annotations

import argparse

import pytest

from promptkd.cli import build_parser

NO_DEFAULT = (None, False, [], argparse.SUPPRESS)


def subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(command words, parser) for every leaf subcommand."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs and prefix:
        yield " ".join(prefix), parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from subcommands(sub, (*prefix, name))


def help_offenders(parser: argparse.ArgumentParser) -> list[str]:
    """Options (and positionals) with no help, or with a default their help does not state."""
    formatter = parser._get_formatter()
    problems = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        text = formatter._expand_help(action) if action.help else ""
        if not text.strip() or action.help == argparse.SUPPRESS:
            problems.append(f"{name}: no help")
        elif action.option_strings and action.default not in NO_DEFAULT and "default" not in text.lower():
            problems.append(f"{name}: help does not state the default ({action.default!r})")
    return problems


COMMANDS = dict(subcommands(build_parser()))


def test_every_registered_subcommand_is_checked():
    assert {"demo", "report", "train-teacher", "distill", "evaluate", "predict"} <= set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_with_its_default(command):
    offenders = help_offenders(COMMANDS[command])
    assert not offenders, f"promptkd {command}: " + "; ".join(offenders)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_takes_debug(command):
    assert any("--debug" in a.option_strings for a in COMMANDS[command]._actions), f"promptkd {command}"


def test_the_checker_finds_missing_help_and_unstated_defaults():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fine", type=int, default=3, help="a number (default: %(default)s)")
    parser.add_argument("--flag", action="store_true", help="a switch")
    parser.add_argument("--silent", type=int, default=5)
    parser.add_argument("--vague", default="x", help="something")
    parser.add_argument("path")
    assert help_offenders(parser) == ["--silent: no help", "--vague: help does not state the default ('x')",
                                      "path: no help"]


@pytest.mark.parametrize("command, schema_path", [
    ("train-teacher", "promptkd.stages.teacher:TeacherSettings"),
    ("distill", "promptkd.stages.distillation:DistillSettings"),
    ("teacher-cache", "promptkd.stages.distillation:DistillSettings"),
])
def test_stage_help_lists_every_set_key_and_its_default_parses_back(command, schema_path, capsys):
    """The key list at the end of --help is the schema the stage builds its config with (what --set
    accepts), and each printed default, given back to --set, is that default."""
    import importlib
    import re

    from promptkd import config

    module_name, name = schema_path.split(":")
    module = importlib.import_module(module_name)
    schema = getattr(module, name)
    exclude = getattr(module, "EXCLUDE", ())
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out.split("config keys for --set KEY=VALUE:")[1]
    shown = dict(re.findall(r'^  ([a-z_.]+)=("[^"]*"|\S+)', text, flags=re.M))
    assert list(shown) == config.keys_of(schema, exclude=exclude)
    defaults = config.build(schema, None, [], exclude=exclude)
    given_back = config.build(schema, None, [f"{k}={v}" for k, v in shown.items()], exclude=exclude)
    assert given_back == defaults
    assert "OUT/config.yaml" in " ".join(text.split())
