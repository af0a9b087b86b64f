"""A reduced `promptkd demo` end to end on the real data and weights: the core stages (PromptSRC via the
training loop, the class-vector store, distillation, evaluation) on EfficientNet-Lite + MiniLM. The
distilled student must beat its zero-shot baseline on held-out test images it never saw."""

from __future__ import annotations

import json

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
def test_reduced_demo_end_to_end(tmp_path, demo_cache_dir):
    from promptkd.artifacts import load_adapter
    from promptkd.demo.pipeline import DemoConfig, run_demo, sample_data
    from promptkd.store import ClassVectorStore

    torch.manual_seed(0)
    cfg = DemoConfig(out_dir=str(tmp_path / "run"), cache_dir=str(demo_cache_dir), progress=False, **QUICK)
    summary = run_demo(cfg, log=lambda _: None)
    rows = summary["rows"]
    assert set(rows) == {"zero-shot teacher", "zero-shot student", "teacher", "student"}
    # PromptKD's claim at demo scale: distillation from unlabelled images beats the zero-shot student
    assert rows["student"]["hm"] > rows["zero-shot student"]["hm"] + 5, rows
    assert rows["teacher"]["base"] > rows["zero-shot teacher"]["base"], rows
    run = tmp_path / "run"
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk["rows"] == rows and on_disk["counts"]["test"] == 10 * QUICK["test_per_class"]
    assert (run / "results.png").stat().st_size > 1000 and "| student, distilled" in (run / "results.md").read_text()
    # each row is also a core results.json, and the student artefact reloads to the same predictions
    assert json.loads((run / "student" / "results.json").read_text())["metrics"]["hm"] == pytest.approx(rows["student"]["hm"], abs=0.01)
    student, meta = load_adapter(run / "student", role="student")
    store = ClassVectorStore.load(run / "student" / "class_vectors.safetensors", expect_classes=meta["class_names"])
    test = sample_data(cfg).test
    x = torch.stack([test[i]["image"] for i in range(len(test))])
    y = torch.tensor([test[i]["label"] for i in range(len(test))])
    with torch.no_grad():
        logits = store.logits(student.eval()(x))
    base = y < 5
    acc_base = (logits[base][:, :5].argmax(-1) == y[base]).float().mean().item() * 100
    assert acc_base == pytest.approx(rows["student"]["base"], abs=0.01)
