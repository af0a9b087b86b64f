"""A reduced `promptkd demo` end to end on the real data and weights: the core stages (PromptSRC via the
training loop, the class-vector store, distillation, evaluation) on EfficientNet-Lite + MiniLM. The
distilled student must beat its zero-shot baseline on held-out test images it never saw."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from promptkd.cli import main
from promptkd.cli.demo_cmd import QUICK, missing_requirements

pytestmark = pytest.mark.skipif(bool(missing_requirements(None)), reason="demo data or packages not installed")


def test_cli_says_what_is_missing(tmp_path, capsys):
    assert main(["demo", "--check", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and str(tmp_path) in err
    assert main(["demo", "--check"]) == 0


@pytest.mark.slow
def test_quick_demo_end_to_end_through_the_cli(tmp_path, demo_cache_dir, monkeypatch, capsys):
    from promptkd.artifacts import load_adapter
    from promptkd.demo.pipeline import DemoConfig, sample_data
    from promptkd.store import ClassVectorStore

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PROMPTKD_PROGRESS", raising=False)
    torch.manual_seed(0)
    assert main(["demo", "--quick", "--cache-dir", str(demo_cache_dir)]) == 0
    captured = capsys.readouterr()
    run = tmp_path / "runs" / "demo-quick"  # its own folder: runs/demo is the full demo's
    assert not (tmp_path / "runs" / "demo").exists()
    summary = json.loads((run / "results.json").read_text())
    rows = summary["rows"]
    assert set(rows) == {"zero-shot teacher", "zero-shot student", "teacher", "student"}
    # PromptKD's claim at demo scale: distillation from unlabelled images beats the zero-shot student
    assert rows["student"]["hm"] > rows["zero-shot student"]["hm"] + 5, rows
    assert rows["teacher"]["base"] > rows["zero-shot teacher"]["base"], rows
    assert summary["counts"]["test"] == 10 * QUICK["test_per_class"]
    assert (run / "results.png").stat().st_size > 1000 and "| student, distilled" in (run / "results.md").read_text()

    # what it says: what the quick run is for, the table, the next steps with this run's paths
    out = captured.out
    assert "a one-minute check that every stage runs (not the demo's result)" in out
    assert re.search(rf"student, distilled \(stage 2\) +{rows['student']['base']:.1f} +{rows['student']['novel']:.1f}", out)
    assert f"promptkd predict {run / 'samples'} --student {run / 'student'}".replace(str(tmp_path) + "/", "") in out
    # progress into a log: plain lines (model loading, both trunk passes, every epoch), no carriage return
    err = captured.err
    assert "\r" not in err
    assert "loading models: done, 3/3 model" in err
    assert sum(": done, " in line and "trunk (once per image)" in line for line in err.splitlines()) == 2
    assert sum(line.startswith("epoch ") and ": done, " in line for line in err.splitlines()) == \
        QUICK["teacher_epochs"] + QUICK["student_epochs"]

    # each row is also a core results.json, and the student artefact reloads to the same predictions
    assert json.loads((run / "student" / "results.json").read_text())["metrics"]["hm"] == pytest.approx(rows["student"]["hm"], abs=0.01)
    student, meta = load_adapter(run / "student", role="student")
    store = ClassVectorStore.load(run / "student" / "class_vectors.safetensors", expect_classes=meta["class_names"])
    test = sample_data(DemoConfig(**QUICK)).test
    x = torch.stack([test[i]["image"] for i in range(len(test))])
    y = torch.tensor([test[i]["label"] for i in range(len(test))])
    with torch.no_grad():
        logits = store.logits(student.eval()(x))
    base = y < 5
    acc_base = (logits[base][:, :5].argmax(-1) == y[base]).float().mean().item() * 100
    assert acc_base == pytest.approx(rows["student"]["base"], abs=0.01)

    # the next steps work as printed: predict on the sample images, report on the folder
    samples = sorted((run / "samples").glob("*.png"))
    assert len(samples) == 20 and {p.name.rsplit("_", 1)[0] for p in samples} >= {"ankle_boot", "t-shirt"}
    assert main(["predict", "runs/demo-quick/samples", "--student", "runs/demo-quick/student", "--json",
                 "--top-k", "1"]) == 0  # as printed (the default backend and precision)
    preds = json.loads(capsys.readouterr().out)
    assert [Path(p["path"]).name for p in preds] == [p.name for p in samples] and all(p["predictions"] for p in preds)
    assert main(["predict", "runs/demo-quick/samples", "--student", "runs/demo-quick/student", "--json",
                 "--top-k", "1", "--backend", "torch", "--precision", "fp32"]) == 0
    preds = json.loads(capsys.readouterr().out)
    # the same images decoded here and classified by the student in memory: the same top-1 class
    import numpy as np
    from PIL import Image

    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p), dtype=np.float32) / 255.0)[None] for p in samples])
    with torch.no_grad():
        top1 = store.logits(student(pixels)).argmax(-1).tolist()
    assert [p["predictions"][0]["label"] for p in preds] == top1
    assert main(["report", "runs/demo-quick", "--no-plot"]) == 0
    report = capsys.readouterr().out
    assert "4 result file(s)" in report and "Problems" not in report
    assert "### zeroshot (teacher backbone)" in report and "### zeroshot (student backbone)" in report
