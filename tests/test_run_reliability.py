"""No silent wrong input, no lost run, one clear line for every failure (issue 11's run-level items).

Everything goes through the CLI (``promptkd.cli.main``), on a tiny fixture and tiny random CLIP files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from promptkd.cli import main

FAST = ["--set", "train.epochs=2", "--set", "train.batch_size=2", "--set", "train.precision=fp32",
        "--set", "train.num_workers=0", "--set", "train.device=cpu", "--set", "data.shots=2",
        "--set", "teacher.text_depth=1", "--set", "teacher.vision_depth=1", "--set", "method.templates=single",
        "--set", "method.gpa_mean=1"]


def _cli(argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from promptkd.data.fixtures import make_fixture, make_image_folder
    from promptkd.models.clip import tiny_clip
    from promptkd.models.weights import save_clip

    root = tmp_path_factory.mktemp("reliability")
    make_fixture(root / "data", "Caltech101", classes=4, per_class=2, test_per_class=1)
    make_image_folder(root / "one_class", classes=1, per_class=4)
    save_clip(tiny_clip(seed=1, width=32, layers=1, image_size=32, patch_size=8), root / "clip.safetensors")
    return root


def _teacher_args(world: Path, out: Path) -> list:
    return ["train-teacher", "--data-root", world / "data", "--dataset", "Caltech101",
            "--clip-weights", world / "clip.safetensors", "--out", out, *FAST]


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


@pytest.mark.parametrize("override,expected", [
    ("method.kd_weight=-5", "method.kd_weight=-5: expected a value > 0"),
    ("train.epochs=2.5", "train.epochs=2.5: expected an integer"),
    ("method.temperature=.nan", "method.temperature=nan: NaN is not a valid value"),
    ("train.lr=nan", "train.lr='nan': NaN is not a valid value"),
    ("train.batch_size=abc", "train.batch_size='abc': expected an integer"),
    ("train=5", "train is a section"),
    ("train.lrr=0.1", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    ("method.selection=best", "method.selection='best': expected one of last, agreement, val, paper"),
])
def test_bad_settings_are_one_line_before_anything_is_written(world, capsys, override, expected):
    out = world / "bad" / override.split("=")[0]
    argv = ["distill", "--config", "distill/base2novel/caltech101", "--data-root", world / "data",
            "--teacher", world / "nowhere", "--class-vectors", world / "nowhere.safetensors",
            "--student-weights", world / "clip.safetensors", "--out", out, "--set", override]
    assert _cli(argv) == 2
    line = _err_line(capsys)
    assert expected in line, line
    assert not out.exists() or not any(out.iterdir())  # nothing written: no config.yaml, no run.json


def test_scientific_notation_is_the_number_the_user_meant(world):
    from promptkd.stages import distill_settings, teacher_settings

    assert teacher_settings(overrides=["train.lr=1e-3", "train.warmup_lr=5e-4"])["train"]["lr"] == 0.001
    assert distill_settings("distill/custom", ["data.dataset=folder:x", "method.kd_weight=1e3"])["method"]["kd_weight"] == 1000.0


def test_a_one_class_dataset_is_refused_by_both_stages(world, capsys):
    argv = ["train-teacher", "--dataset", f"folder:{world / 'one_class'}", "--clip-weights", world / "clip.safetensors",
            "--config", "teacher/custom", "--out", world / "one", *FAST]
    assert _cli(argv) == 2
    assert "needs at least 2 classes, found 1" in _err_line(capsys)

    import torch

    from promptkd.store import ClassVectorStore

    ClassVectorStore(torch.nn.functional.normalize(torch.randn(1, 32), dim=-1), ["only"], 100.0).save(world / "one.cv")
    argv = ["distill", "--config", "distill/custom", "--dataset", f"folder:{world / 'one_class'}", "--teacher",
            world / "nowhere", "--class-vectors", world / "one.cv", "--student-weights", world / "clip.safetensors",
            "--out", world / "one_student"]
    assert _cli(argv) == 2
    assert "distill needs at least 2 classes, found 1" in _err_line(capsys)


@pytest.mark.filterwarnings("ignore:.*fewer than .* images:UserWarning")
def test_earlier_runs_are_never_replaced_silently(world, capsys, tmp_path):
    out = tmp_path / "teacher"
    assert _cli(_teacher_args(world, out)) == 0
    capsys.readouterr()
    assert _cli(_teacher_args(world, out)) == 2  # finished: refused
    assert "holds a finished run (adapter.json); pass --overwrite" in _err_line(capsys)
    import torch
    from safetensors.torch import load_file

    trained = load_file(out / "adapter.safetensors")
    assert _cli([*_teacher_args(world, out), "--resume"]) == 0  # finished: says so, trains nothing again
    assert "this run had already finished: nothing is trained again" in capsys.readouterr().err
    again = load_file(out / "adapter.safetensors")  # (the file's header order is not fixed: compare tensors)
    assert set(again) == set(trained) and all(torch.equal(again[k], trained[k]) for k in trained)
    import shutil

    shutil.rmtree(out / "checkpoints")  # a finished run without checkpoints is still a run
    assert _cli(_teacher_args(world, out)) == 2
    _err_line(capsys)
    before = (out / "adapter.safetensors").read_bytes()
    assert _cli([*_teacher_args(world, out), "--overwrite", "--seed", "5"]) == 0
    assert (out / "adapter.safetensors").read_bytes() != before  # really replaced: another seed
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sum(r["type"] == "start" for r in records) == 1  # the old log went with the old run

    vectors = tmp_path / "cv.safetensors"
    argv = ["class-vectors", "--teacher", out, "--dataset", "Caltech101", "--data-root", world / "data",
            "--out", vectors, "--device", "cpu"]
    assert _cli(argv) == 0
    capsys.readouterr()
    stamp = vectors.stat().st_mtime_ns
    assert _cli(argv) == 2
    assert "exists (class vectors of 4 classes" in _err_line(capsys)
    assert vectors.stat().st_mtime_ns == stamp
    assert _cli([*argv, "--overwrite"]) == 0


def test_unwritable_or_wrong_out_is_refused_before_loading_anything(world, capsys, tmp_path):
    missing_weights = tmp_path / "no_such_clip.safetensors"  # would fail later, when the model loads
    as_file = tmp_path / "a_file"
    as_file.write_text("x")
    argv = ["train-teacher", "--data-root", world / "data", "--dataset", "Caltech101", "--clip-weights",
            missing_weights, *FAST]
    assert _cli([*argv, "--out", as_file]) == 2
    assert "--out exists and is not a folder" in _err_line(capsys)
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        assert _cli([*argv, "--out", ro / "run"]) == 2
        assert "not writable" in _err_line(capsys)
    assert _cli([*argv, "--out", "/proc/promptkd-run"]) == 2  # a read-only file system, even for root
    line = _err_line(capsys)
    assert "/proc/promptkd-run" in line and "no_such_clip" not in line


def test_stale_partial_files_are_removed_and_empty_records_name_their_file(world, capsys, tmp_path):
    out = tmp_path / "teacher"
    assert _cli([*_teacher_args(world, out), "--set", "train.max_steps=1"]) == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / "checkpoints" / f"last.pt.tmp{int(dead.stdout)}"
    stale.write_bytes(b"half a checkpoint")
    (out / "run.json").write_text("")
    capsys.readouterr()
    assert _cli([*_teacher_args(world, out), "--resume"]) == 2
    assert "run.json: run record is empty" in _err_line(capsys)
    assert not stale.exists()
    (out / "run.json").unlink()
    (out / "config.yaml").write_text("")
    assert _cli([*_teacher_args(world, out), "--resume"]) == 2
    assert "config.yaml: the saved config is empty" in _err_line(capsys)


def test_a_second_run_into_the_same_folder_is_refused_naming_the_holder(world, tmp_path):
    out = tmp_path / "locked"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from promptkd.stages.run_folder import RunFolder\n"
        f"with RunFolder({str(out)!r}, command='distill'):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, "-m", "promptkd", *map(str, _teacher_args(world, out))],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"another promptkd run is using this folder (pid {holder.pid}" in second.stderr
        assert "`distill`" in second.stderr and "Traceback" not in second.stderr
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up: its lock is taken over, and said so
    result = subprocess.run([sys.executable, "-m", "promptkd", *map(str, _teacher_args(world, out)),
                             "--set", "train.max_steps=1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"a lock left by pid {holder.pid}" in result.stderr
    assert not (out / ".promptkd.lock").exists()


def test_files_written_atomically_respect_the_umask(tmp_path):
    from promptkd import config as cfgmod
    from promptkd.fileio import atomic_write_json

    old = os.umask(0o022)
    try:
        cfgmod.save({"a": 1}, tmp_path / "config.yaml")
        atomic_write_json(tmp_path / "run.json", {"b": 2})
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"config.yaml": 0o644, "run.json": 0o644}
    assert not list(tmp_path.glob("*.tmp*"))


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "a command is required" in capsys.readouterr().err


def test_lock_waits_for_nobody_after_a_clean_exit(tmp_path):
    from promptkd.stages.run_folder import LOCK_FILE, RunFolder

    with RunFolder(tmp_path / "x", command="t") as folder:
        assert (folder.path / LOCK_FILE).is_file()
        t0 = time.time()
    assert not (tmp_path / "x" / LOCK_FILE).exists() and time.time() - t0 < 5


@pytest.mark.filterwarnings("ignore:.*fewer than .* images:UserWarning")
def test_tensorboard_curves_equal_the_jsonl_log(world, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "teacher"
    assert _cli([*_teacher_args(world, out), "--set", "log.tensorboard=true", "--set", "train.log_every=1"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    loss = [(e.step, e.value) for e in events.Scalars("step/loss")]
    assert loss == [(r["global_step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    assert [e.value for e in events.Scalars("step/lr")] == pytest.approx([r["lr"] for r in steps])
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [e.value for e in events.Scalars("epoch/gpa_weight")] == pytest.approx([r["gpa_weight"] for r in epochs])

    evaluated = tmp_path / "eval"
    assert _cli(["evaluate", "--model", "teacher", "--artefact", out, "--data-root", world / "data", "--dataset",
                 "Caltech101", "--protocol", "base2novel", "--out", evaluated, "--device", "cpu", "--workers", 0,
                 "--tensorboard"]) == 0
    events = EventAccumulator(str(evaluated / "tensorboard"))
    events.Reload()
    metrics = json.loads((evaluated / "results.json").read_text())["metrics"]
    assert events.Scalars("eval/Caltech101/hm")[0].value == pytest.approx(metrics["hm"], abs=1e-3)


def test_a_write_that_fails_midway_is_one_line_and_leaves_no_partial_file(world, tmp_path):
    out = tmp_path / "small"
    args = " ".join(f"'{a}'" for a in map(str, _teacher_args(world, out)))
    # ulimit -f 8: 8 KiB per file, enough for the config and logs, not for a checkpoint (EFBIG, as a full disk)
    done = subprocess.run(["bash", "-c", f"ulimit -f 8; exec '{sys.executable}' -m promptkd {args}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"{out / 'checkpoints' / 'last.pt'}: cannot write" in done.stderr
    assert "file too large" in done.stderr
    assert not list(out.rglob("*.tmp*"))  # the partial checkpoint is gone


def test_the_seed_comes_from_seed_or_set_and_a_resume_applies_a_changed_momentum(tmp_path):
    from promptkd.stages.distillation import DistillSettings
    from promptkd.stages.run_folder import RunFolder, RunFolderError, resolve_settings

    folder = RunFolder(tmp_path / "run", command="t")
    preset = "distill/base2novel/dtd"
    assert resolve_settings(DistillSettings, folder, preset, ["train.seed=7"], None)[0]["train"]["seed"] == 7
    assert resolve_settings(DistillSettings, folder, preset, [], 3)[0]["train"]["seed"] == 3
    assert resolve_settings(DistillSettings, folder, preset, [], None)[0]["train"]["seed"] == 1
    with pytest.raises(RunFolderError, match=r"--seed 3 and --set train.seed=7 disagree"):
        resolve_settings(DistillSettings, folder, preset, ["train.seed=7"], 3)

    import torch

    from promptkd.engine.loop import LoopConfig, fit
    from test_loop_training import ToyData, ToyMethod

    cfg = LoopConfig(epochs=2, batch_size=4, lr=0.1, warmup_epochs=0, num_workers=0, log_every=1, precision="fp32",
                     max_steps=2)
    torch.manual_seed(0)
    fit(ToyMethod(), ToyData(), cfg, tmp_path / "fit")
    seen = []
    method = ToyMethod()
    resumed = LoopConfig(**{**cfg.as_dict(), "max_steps": None, "momentum": 0.0, "weight_decay": 0.5})
    import promptkd.engine.loop as loop_module

    real_sgd = torch.optim.SGD

    class Recording(real_sgd):
        def step(self, *a, **k):
            seen.append({(g["momentum"], g["weight_decay"]) for g in self.param_groups})
            return super().step(*a, **k)

    loop_module.torch.optim.SGD = Recording
    try:
        fit(method, ToyData(), resumed, tmp_path / "fit", resume=True)
    finally:
        loop_module.torch.optim.SGD = real_sgd
    assert seen and all(s == {(0.0, 0.5)} for s in seen)
