"""Progress output: plain lines (no carriage returns, one per ~10% of a long step, one per short step)
when not on a terminal, tqdm on a terminal, nothing when switched off; through the training loop and
the evaluation's feature pass as the commands use them."""

from __future__ import annotations

import io
import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from promptkd import progress
from promptkd.progress import MODE_ENV, progress_bar


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress.time, "monotonic", fake)
    monkeypatch.delenv(MODE_ENV, raising=False)
    return fake


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_long_step_prints_a_line_per_tenth_and_no_carriage_return(clock):
    out = io.StringIO()
    bar = progress_bar(total=200, desc="trunk", unit="img", stream=out)
    for _ in range(200):
        clock.now += 0.5  # 100 s in all: every 10% is 10 s after the previous line
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [line.split()[1] for line in lines[:-1]] == [f"{p}%" for p in range(10, 100, 10)]
    assert lines[0] == "trunk:  10% 20/200 img, 10s so far, ~1m30s left"
    assert lines[-1] == "trunk: done, 200/200 img in 1m40s"


def test_short_step_is_one_line_and_lines_are_never_closer_than_the_interval(clock):
    out = io.StringIO()
    with progress_bar(total=50, desc="epoch 1/3", unit="step", stream=out) as bar:
        for _ in range(50):
            clock.now += 0.01
            bar.update(1)
        bar.set_postfix(loss="0.5")
    assert out.getvalue() == "epoch 1/3: done, 50/50 step in 0s (loss=0.5)\n"

    out = io.StringIO()
    bar = progress_bar(total=100, desc="x", stream=out)  # 10% every 2 s, lines at most every 3 s
    for _ in range(100):
        clock.now += 0.2
        bar.update(1)
    bar.close()
    percents = [int(line.split()[1].rstrip("%")) for line in out.getvalue().splitlines()[:-1]]
    assert percents == [20, 40, 60, 80]


def test_iterating_an_unsized_iterable_and_stopping_early(clock):
    out = io.StringIO()
    assert list(progress_bar(iter(range(4)), desc="files", stream=out)) == [0, 1, 2, 3]
    assert out.getvalue() == "files: done, 4 it in 0s\n"
    out = io.StringIO()
    bar = progress_bar(total=10, desc="stage", stream=out)
    bar.update(3)
    bar.close()
    bar.close()  # once only
    assert out.getvalue() == "stage: stopped at 3/10 it after 0s\n"


def test_terminal_gets_tqdm_and_the_environment_variable_overrides(clock, monkeypatch):
    from tqdm import tqdm

    tty = TtyStream()
    bar = progress_bar(total=3, desc="load", stream=tty)
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setenv(MODE_ENV, "plain")
    assert isinstance(progress_bar(total=3, stream=tty), progress.PlainProgress)
    monkeypatch.setenv(MODE_ENV, "off")
    quiet = io.StringIO()
    with progress_bar(total=3, stream=quiet) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""
    monkeypatch.setenv(MODE_ENV, "fancy")
    with pytest.raises(ValueError, match="PROMPTKD_PROGRESS='fancy'"):
        progress_bar(total=3, stream=quiet)
    monkeypatch.delenv(MODE_ENV)
    disabled = io.StringIO()
    with progress_bar(total=3, stream=disabled, enabled=False) as bar:
        bar.update(3)
    assert disabled.getvalue() == ""


# --- as the commands use it ----------------------------------------------------------------------------

class Pairs(Dataset):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "image": self.x[i], "label": i % 3}


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 1)

    def forward(self, batch):
        return {"loss": ((self.head(batch["x"]) - batch["y"]) ** 2).mean()}


def test_training_loop_writes_one_plain_line_per_epoch_to_a_log(tmp_path, capsys, monkeypatch):
    from promptkd.engine.loop import LoopConfig, fit

    monkeypatch.delenv(MODE_ENV, raising=False)
    fit(Regression(), Pairs(), LoopConfig(epochs=3, batch_size=8, lr=0.01, num_workers=0, seed=0), tmp_path)
    err = capsys.readouterr().err  # pytest's capture is not a terminal
    assert "\r" not in err
    done = [line for line in err.splitlines() if ": done, " in line]
    assert [line.split(":")[0] for line in done] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("8/8 step" in line and "loss=" in line for line in done)


def test_feature_extraction_progress_is_plain_in_a_log(capsys, monkeypatch):
    from promptkd.evaluate import extract_features

    monkeypatch.delenv(MODE_ENV, raising=False)
    feats, labels = extract_features(lambda x: x * 2, DataLoader(Pairs(), batch_size=16), desc="test features")
    assert feats.shape == (64, 4) and labels.tolist() == [i % 3 for i in range(64)]
    assert re.fullmatch(r"test features: done, 4/4 batch in \d+s\n", capsys.readouterr().err)


def test_a_bad_progress_setting_is_refused_before_any_work(monkeypatch, capsys):
    from promptkd.cli import main
    from promptkd.demo import pipeline

    monkeypatch.setenv(MODE_ENV, "bogus")
    monkeypatch.setattr(pipeline, "run_demo", lambda *a, **k: pytest.fail("the demo started"))
    assert main(["demo", "--quick", "--out", "unused"]) == 2
    assert capsys.readouterr().err.strip() == "promptkd demo: error: PROMPTKD_PROGRESS='bogus': expected one of bar, plain, off"
