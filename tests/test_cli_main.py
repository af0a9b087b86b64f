import argparse

import pytest

from promptkd import cli
from promptkd.engine.loop import NonFiniteLossError


def _parser_raising(exc: Exception) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptkd")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("boom")
    p.add_argument("--debug", action="store_true")

    def fail(_args):
        raise exc

    p.set_defaults(func=fail)
    return parser


def test_user_errors_are_one_line_and_nan_losses_too(monkeypatch, capsys):
    monkeypatch.setattr(cli, "build_parser", lambda: _parser_raising(ValueError("data/x.json: broken")))
    assert cli.main(["boom"]) == 2
    assert capsys.readouterr().err.strip() == "promptkd boom: error: data/x.json: broken"
    nan = NonFiniteLossError("loss is nan at epoch 2, step 7; last good checkpoint: runs/x/checkpoints/last.pt")
    monkeypatch.setattr(cli, "build_parser", lambda: _parser_raising(nan))
    assert cli.main(["boom"]) == 3
    assert "step 7" in capsys.readouterr().err
    with pytest.raises(NonFiniteLossError):
        cli.main(["boom", "--debug"])


def test_programming_errors_are_not_hidden(monkeypatch):
    monkeypatch.setattr(cli, "build_parser", lambda: _parser_raising(RuntimeError("bug")))
    with pytest.raises(RuntimeError, match="bug"):
        cli.main(["boom"])
