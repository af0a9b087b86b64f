"""`promptkd demo` without running it: output folders, help texts, next steps, the thread rule, the
allocator setting. Fast; needs neither the data nor the weights."""

from __future__ import annotations

import os
import sys

import pytest

from promptkd.cli import build_parser
from promptkd.cli.demo_cmd import DEFAULT_OUT, QUICK, QUICK_OUT, build_config, next_steps
from promptkd.demo import pipeline, runtime


def parse(*argv: str):
    return build_parser().parse_args(["demo", *argv])


def test_quick_run_has_its_own_folder_and_the_full_run_keeps_runs_demo():
    assert build_config(parse()).out_dir == DEFAULT_OUT == "runs/demo"
    quick = build_config(parse("--quick"))
    assert quick.out_dir == QUICK_OUT == "runs/demo-quick"
    assert (quick.resolution, quick.unlabelled, quick.student_epochs) == (128, 500, 6)
    assert build_config(parse("--quick", "--out", "elsewhere")).out_dir == "elsewhere"
    assert build_config(parse("--no-cache")).cache_dir == ""
    assert build_config(parse("--set", "student_epochs=3")).student_epochs == 3


def test_help_states_what_the_options_really_do(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"{QUICK['resolution']} px" in text and "64 px" not in text and "96 px" not in text
    assert "runs/demo-quick" in text
    assert "torch's choice" not in text and "the cores that no other process is using right now" in text
    assert "(default: 1)" in text  # --seed, from argparse's %(default)s


def test_help_lists_every_set_key_with_its_real_default(capsys):
    import dataclasses
    import re

    from promptkd.cli.demo_cmd import SET_BY_OPTIONS

    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    text = capsys.readouterr().out
    listed = dict(re.findall(r"^  ([a-z_]+)=(\S+)", text.split("settings for --set")[1].split("(--quick")[0],
                                 flags=re.M))
    fields = {f.name for f in dataclasses.fields(pipeline.DemoConfig)}
    assert set(listed) == fields - set(SET_BY_OPTIONS) and listed
    for key, shown in listed.items():  # each printed default is accepted by --set and is the default
        args = build_parser().parse_args(["demo", "--set", f"{key}={shown}"])
        assert build_config(args) == build_config(build_parser().parse_args(["demo"])), key
    assert "unlabelled=500" in " ".join(text.split()) and "resolution=128" not in text.split("--quick sets")[1]


def test_next_steps_name_this_runs_folders_and_the_quick_run_says_what_it_is_for():
    steps = next_steps({"config": {"out_dir": "runs/demo"}}, quick=False, prog="promptkd")
    assert "  promptkd predict runs/demo/samples --student runs/demo/student" in "\n".join(steps)
    assert any(line.startswith("  promptkd report runs/demo ") for line in steps)
    assert not any("quick check" in line for line in steps)
    quick = "\n".join(next_steps({"config": {"out_dir": "runs/demo-quick"}}, quick=True, prog="promptkd"))
    assert "quick check" in quick and "`promptkd demo`" in quick and "--student runs/demo-quick/student" in quick


def test_next_steps_name_promptkd_as_this_shell_can_run_it(tmp_path, monkeypatch):
    from promptkd.cli.common import command_name

    monkeypatch.chdir(tmp_path)
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    script = venv_bin / "promptkd"
    script.write_text("#!/bin/sh\n")
    assert command_name(".venv/bin/promptkd", which="") == ".venv/bin/promptkd"  # venv not activated
    assert command_name(str(script), which="") == ".venv/bin/promptkd"
    assert command_name(str(script), which=str(script)) == "promptkd"  # activated: on PATH
    assert command_name(str(script), which="/usr/bin/promptkd") == ".venv/bin/promptkd"  # another one on PATH
    assert command_name("/x/pytest", which="").endswith(" -m promptkd")
    steps = "\n".join(next_steps({"config": {"out_dir": "runs/demo"}}, quick=False, prog=".venv/bin/promptkd"))
    assert "  .venv/bin/promptkd predict runs/demo/samples --student runs/demo/student" in steps
    assert "  .venv/bin/promptkd report runs/demo " in steps and "\n  promptkd" not in steps


def test_thread_rule_uses_the_cores_free_now():
    cores = os.cpu_count() or 1
    assert runtime.choose_threads(3) == 3  # asked for: used as is
    assert runtime.choose_threads(0, busy=0.0) == cores
    assert runtime.choose_threads(0, busy=float(cores)) == 1
    if cores == 2:
        assert runtime.choose_threads(0, busy=0.3) == 2  # background noise
        assert runtime.choose_threads(0, busy=1.0) == 1  # one other busy process


def test_busy_cores_is_the_share_of_busy_ticks_over_the_window(monkeypatch):
    ticks = iter([(1000, 5000), (1000 + 150, 5000 + 200)])  # (busy, total) jiffies, summed over all cores
    monkeypatch.setattr(runtime, "_cpu_ticks", lambda: next(ticks))
    monkeypatch.setattr(runtime.time, "sleep", lambda _s: None)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    assert runtime.busy_cores() == pytest.approx(1.5)
    monkeypatch.setattr(runtime, "_cpu_ticks", lambda: None)
    assert runtime.busy_cores() is None
    assert runtime.choose_threads(0) == 2  # unknown load: every core


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_busy_cores_reads_proc_stat():
    busy = runtime.busy_cores(window=0.05)
    assert busy is not None and 0.0 <= busy <= (os.cpu_count() or 1) + 1e-6


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_allocator_setting_takes_effect_with_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert runtime.keep_freed_memory() is True


def test_trunk_batches_keep_activations_under_the_mmap_threshold():
    # the largest trunk activation is ~1.5 MB per image at 128 px and grows with the pixel count
    for resolution in (64, 96, 128, 224, 512):
        batch = pipeline.trunk_batch_size(resolution)
        assert batch >= 1 and batch * 1.5e6 * (resolution / 128) ** 2 <= 32 * 2**20 or batch == 1
    assert pipeline.trunk_batch_size(128) == 16


@pytest.mark.parametrize("override,expected", [
    ("student_epochs=abc", "student_epochs='abc': expected an integer"),
    ("studnt_epochs=3", "unknown key 'studnt_epochs' (did you mean 'student_epochs'?)"),
    ("teacher_variant=efficientnet-lite3", "expected one of efficientnet-lite0, efficientnet-lite2"),
    ("teacher_method=promptkd", "expected one of promptsrc, ivlp, coop"),
    ("student_lr=-1", "student_lr=-1: expected a value > 0"),
])
def test_bad_demo_overrides_are_one_line_before_any_work(tmp_path, capsys, monkeypatch, override, expected):
    from promptkd.cli import main

    started = []
    monkeypatch.setattr(pipeline, "run_demo", lambda *a, **k: started.append(1))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not started and not out.exists()


def _previous_run(folder, **changes):
    """A folder as a finished demo run leaves it (results.json with its config), plus a report of it."""
    import dataclasses
    import json

    folder.mkdir(parents=True)
    config = {**dataclasses.asdict(pipeline.DemoConfig(out_dir=str(folder))), **changes}
    (folder / "results.json").write_text(json.dumps({"kind": pipeline.SUMMARY_KIND, "config": config}))
    (folder / "student").mkdir()
    (folder / "report.md").write_text("student HM 68.45\n")
    (folder / "report_base2novel.png").write_bytes(b"png")
    return folder


def test_a_quick_run_into_a_full_runs_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from promptkd.cli import main

    def started(*a, **k):
        raise AssertionError("the demo started")

    monkeypatch.setattr(pipeline, "sample_data", started)
    full = _previous_run(tmp_path / "full")
    before = sorted(p.name for p in full.iterdir())
    assert main(["demo", "--quick", "--out", str(full)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a demo run made with other settings" in err[0], err
    assert "unlabelled 2000 -> 500" in err[0] and "--overwrite" in err[0]
    assert sorted(p.name for p in full.iterdir()) == before  # nothing removed
    with pytest.raises(AssertionError, match="the demo started"):  # --overwrite goes ahead
        main(["demo", "--quick", "--out", str(full), "--overwrite"])
    assert not (full / "report.md").exists() and not (full / "report_base2novel.png").exists()


def test_same_settings_are_redone_and_stale_reports_go(tmp_path):
    folder = _previous_run(tmp_path / "demo", threads=2, progress=False)  # settings that change no number
    note = pipeline.prepare_out_dir(pipeline.DemoConfig(out_dir=str(folder)))
    assert note and "same settings" in note
    assert sorted(p.name for p in folder.iterdir()) == ["results.json", "student"]


def test_a_folder_with_other_files_is_refused(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match=r"holds files the demo does not write \(thesis.tex\)"):
        pipeline.prepare_out_dir(pipeline.DemoConfig(out_dir=str(folder)))
    assert pipeline.prepare_out_dir(pipeline.DemoConfig(out_dir=str(folder)), overwrite=True) is None
    assert (folder / "thesis.tex").exists()
    assert pipeline.prepare_out_dir(pipeline.DemoConfig(out_dir=str(tmp_path / "new"))) is None
