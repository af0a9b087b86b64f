"""The training loop: exact resume, gradient accumulation, non-finite losses, the LR schedule."""

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from promptkd.engine import loop
from promptkd.engine.loop import LoopConfig, NonFiniteLossError, fit


class ToyData(Dataset):
    """Regression pairs as dict samples; ``set_epoch`` calls are recorded."""

    def __init__(self, n: int = 48, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = self.x @ torch.randn(6, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
        self.epochs_seen: list[int] = []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}

    def set_epoch(self, epoch):
        self.epochs_seen.append(epoch)


class ToyMethod(nn.Module):
    """A frozen trunk, a trainable head with BatchNorm (buffers) and dropout (uses the global RNG)."""

    def __init__(self, dropout: float = 0.2, crash_at_call: int | None = None, nan_at_call: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(6, 6)
        self.trunk.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(dropout), nn.Linear(8, 1))
        self.calls = 0
        self.crash_at_call, self.nan_at_call = crash_at_call, nan_at_call
        self.epoch_hook_calls: list[int] = []
        self.train_end_calls = 0

    def forward(self, batch):
        self.calls += 1
        if self.crash_at_call == self.calls:
            raise KeyboardInterrupt("simulated kill")
        pred = self.head(self.trunk(batch["x"]))
        loss = ((pred - batch["y"]) ** 2).mean()
        if self.nan_at_call == self.calls:
            loss = loss * float("nan")
        return {"loss": loss, "mae": (pred - batch["y"]).abs().mean().detach()}

    def on_epoch_end(self, epoch):
        self.epoch_hook_calls.append(epoch)
        return {"hook_epoch": float(epoch)}

    def on_train_end(self):
        self.train_end_calls += 1

    def state_dict_extra(self):
        return {"hook_calls": list(self.epoch_hook_calls)}

    def load_state_dict_extra(self, state):
        self.epoch_hook_calls = list(state["hook_calls"])


def cfg(**kw) -> LoopConfig:
    base = dict(epochs=3, batch_size=8, lr=0.05, num_workers=0, seed=3, deterministic=True, log_every=1)
    base.update(kw)
    return LoopConfig(**base)


def trained(module):
    return {k: v.clone() for k, v in loop.trainable_state(module).items()}


def test_resume_after_kill_mid_epoch_matches_uninterrupted_run(tmp_path):
    reference = ToyMethod()
    ref_out = fit(reference, ToyData(), cfg(), tmp_path / "ref")
    assert ref_out["completed"] and ref_out["global_step"] == 3 * 6

    # killed during the 10th step (epoch 2, step 4); checkpoints after every step
    victim = ToyMethod(crash_at_call=10)
    with pytest.raises(KeyboardInterrupt):
        fit(victim, ToyData(), cfg(checkpoint_every_steps=1), tmp_path / "run")
    ckpt = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (1, 3, 9)

    fresh = ToyMethod()  # a new process would start from fresh weights
    data = ToyData()
    out = fit(fresh, data, cfg(checkpoint_every_steps=1), tmp_path / "run")
    assert out["completed"] and out["global_step"] == ref_out["global_step"]
    assert fresh.calls == 18 - 9  # only the remaining batches were consumed
    assert data.epochs_seen[-2:] == [1, 2]
    want, got = trained(reference), trained(fresh)
    assert want.keys() == got.keys() and "head.1.running_mean" in got and "trunk.weight" not in got
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    assert fresh.epoch_hook_calls == [0, 1, 2] and fresh.train_end_calls == 1
    assert [r["epoch"] for r in out["history"]] == [1, 2, 3]
    for got_row, want_row in zip(out["history"], ref_out["history"]):  # epoch means include pre-kill steps
        assert got_row["loss"] == pytest.approx(want_row["loss"], rel=1e-6)
        assert got_row["mae"] == pytest.approx(want_row["mae"], rel=1e-6)
    rows = (tmp_path / "run/summary.csv").read_text().strip().splitlines()
    assert rows[0].startswith("epoch,lr,steps") and len(rows) == 4
    records = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert any(r["type"] == "resume" and r["global_step"] == 9 for r in records)


def test_interrupt_by_max_steps_then_continue_and_completed_run_is_not_retrained(tmp_path):
    reference = ToyMethod()
    fit(reference, ToyData(), cfg(epochs=2), tmp_path / "ref")
    first = ToyMethod()
    out = fit(first, ToyData(), cfg(epochs=2, max_steps=7), tmp_path / "run")
    assert not out["completed"] and out["global_step"] == 7 and first.train_end_calls == 0
    second = ToyMethod()
    fit(second, ToyData(), cfg(epochs=2), tmp_path / "run")
    for key, value in trained(reference).items():
        torch.testing.assert_close(trained(second)[key], value, rtol=0, atol=0)
    third = ToyMethod()
    out = fit(third, ToyData(), cfg(epochs=2), tmp_path / "run")
    assert third.calls == 0 and third.train_end_calls == 1 and out["completed"]
    for key, value in trained(reference).items():
        torch.testing.assert_close(trained(third)[key], value, rtol=0, atol=0)


def test_resume_refuses_a_different_batch_size(tmp_path):
    fit(ToyMethod(), ToyData(), cfg(epochs=2, max_steps=2), tmp_path / "run")
    with pytest.raises(ValueError, match="batch_size 8 -> 4"):
        fit(ToyMethod(), ToyData(), cfg(epochs=2, batch_size=4), tmp_path / "run")


def test_grad_accum_two_half_batches_equal_one_full_batch(tmp_path):
    # no batch statistics, no dropout: the mean loss over 2b samples splits exactly into two halves
    def model():
        torch.manual_seed(1)
        m = ToyMethod(dropout=0.0)
        m.head[1] = nn.Identity()
        return m

    full, accum = model(), model()
    out_full = fit(full, ToyData(n=64), cfg(batch_size=16), tmp_path / "full")
    out_acc = fit(accum, ToyData(n=64), cfg(batch_size=8, grad_accum=2), tmp_path / "accum")
    assert out_full["global_step"] == out_acc["global_step"] == 12
    assert accum.calls == 2 * full.calls
    for key, value in trained(full).items():
        torch.testing.assert_close(trained(accum)[key], value, rtol=1e-5, atol=1e-6)
    assert out_acc["last"]["loss"] == pytest.approx(out_full["last"]["loss"], rel=1e-4)


def test_nan_loss_stops_with_the_step_and_keeps_last_good_checkpoint(tmp_path):
    good = ToyMethod()
    fit(good, ToyData(), cfg(max_steps=4), tmp_path / "good")
    bad = ToyMethod(nan_at_call=5)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 5 \(global step 5\).*last good checkpoint"):
        fit(bad, ToyData(), cfg(checkpoint_every_steps=2), tmp_path / "bad")
    ckpt = torch.load(tmp_path / "bad/checkpoints/last.pt", weights_only=True)
    assert ckpt["global_step"] == 4
    for key, value in trained(good).items():
        assert torch.isfinite(ckpt["trainable"][key]).all()
        torch.testing.assert_close(ckpt["trainable"][key], value, rtol=0, atol=0)
    assert torch.isfinite(bad.head[0].weight).all()  # the bad step never reached the optimiser
    errors = [json.loads(x) for x in (tmp_path / "bad/log.jsonl").read_text().splitlines()]
    assert errors[-1]["type"] == "error" and errors[-1]["global_step"] == 5


def test_lr_schedule_is_constant_warmup_then_dassl_cosine(tmp_path):
    c = LoopConfig(epochs=4, lr=0.1, warmup_epochs=1, warmup_lr=1e-5)
    # by hand: warm-up; cos(0); (1 + cos(pi/4)) / 2; (1 + cos(pi/2)) / 2
    assert [loop.lr_at_epoch(c, e) for e in range(4)] == pytest.approx([1e-5, 0.1, 0.0853553390593, 0.05])
    # the paper's 20 epochs against torch's own CosineAnnealingLR(T_max=20) stepped once per epoch after warm-up
    c20 = LoopConfig(epochs=20, lr=0.005)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.005)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    expected = [1e-5]
    for _ in range(19):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [loop.lr_at_epoch(c20, e) for e in range(20)] == pytest.approx(expected, rel=1e-12)
    assert loop.lr_at_epoch(c20, 19) == pytest.approx(0.005 * (1 + math.cos(0.9 * math.pi)) / 2)
    # the loop applies it: the epoch records carry the lr each epoch actually used
    out = fit(ToyMethod(), ToyData(n=16), cfg(epochs=4, lr=0.1), tmp_path)
    assert [r["lr"] for r in out["history"]] == pytest.approx([1e-5, 0.1, 0.0853553390593, 0.05])


def test_config_round_trip_and_bad_settings():
    c = LoopConfig(epochs=5, precision="bf16")
    assert LoopConfig.from_dict(c.as_dict()) == c
    with pytest.raises(ValueError, match="unknown training loop setting"):
        LoopConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="precision"):
        LoopConfig(precision="fp8")


def test_bf16_autocast_runs_on_cpu(tmp_path):
    out = fit(ToyMethod(), ToyData(n=16), cfg(epochs=1, warmup_epochs=0, precision="bf16"), tmp_path)
    assert out["completed"] and math.isfinite(out["last"]["loss"])


def test_log_after_a_resume_has_each_step_once(tmp_path):
    """Steps after the last checkpoint are replayed on resume: their first records are dropped."""
    victim = ToyMethod(crash_at_call=10)  # killed in step 10; the last checkpoint is after step 8
    with pytest.raises(KeyboardInterrupt):
        fit(victim, ToyData(), cfg(checkpoint_every_steps=4, log_every=1), tmp_path / "run")
    before = [json.loads(x) for x in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in before if r["type"] == "step"] == list(range(1, 10))
    fit(ToyMethod(), ToyData(), cfg(checkpoint_every_steps=4, log_every=1), tmp_path / "run")
    records = [json.loads(x) for x in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records if r["type"] == "step"] == list(range(1, 19))
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1, 2, 3]
    assert [r["dropped_records"] for r in records if r["type"] == "resume"] == [1]
