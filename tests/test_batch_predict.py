"""`promptkd predict` on folders: unreadable images listed (exit 1), rows to CSV/JSONL, resuming, ONNX students.

The colour student (tests/deploy_models.py) answers by construction: a red image is "red"."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy_models import CLASSES, colour_image, save_colour_student
from promptkd.cli import main


@pytest.fixture
def colour_setup(tmp_path):
    student = save_colour_student(tmp_path / "student")
    images = tmp_path / "images"
    images.mkdir()
    truth = {}
    for i, colour in enumerate(["red", "green", "blue", "green", "red", "blue", "red"]):
        truth[str(colour_image(images / f"{i:02d}_{colour}.png", colour, seed=i))] = colour
    bad = images / "05b_broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return student, images, truth, str(bad)


def test_folder_with_an_unreadable_image_predicts_the_rest_and_exits_1(colour_setup, capsys):
    student, images, truth, bad = colour_setup
    code = main(["predict", str(images), "--student", str(student), "--top-k", "1", "--json", "--precision", "fp32"])
    captured = capsys.readouterr()
    assert code == 1
    rows = json.loads(captured.out)
    assert [r["path"] for r in rows] == sorted([*truth, bad])  # every file gets a row, in order
    for r in rows:
        if r["path"] == bad:
            assert r["predictions"] is None and "cannot decode" in r["error"]
        else:
            assert r["error"] is None and r["predictions"][0]["class_name"] == truth[r["path"]]
    assert f"{bad}: cannot decode image" in captured.err and "1 image(s) could not be read" in captured.err


def test_missing_file_is_a_row_not_a_crash(colour_setup, tmp_path, capsys):
    student, _, truth, _ = colour_setup
    good = next(iter(truth))
    assert main(["predict", good, str(tmp_path / "missing.png"), "--student", str(student)]) == 1
    captured = capsys.readouterr()
    assert "missing.png: file not found" in captured.err
    assert captured.out.splitlines()[0] == good


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_rows_match_an_independent_softmax(colour_setup, tmp_path):
    from PIL import Image

    student, images, truth, bad = colour_setup
    out = tmp_path / "preds.csv"
    assert main(["predict", str(images), "--student", str(student), "--out", str(out), "--top-k", "2",
                 "--precision", "fp32"]) == 1
    rows = _read_csv(out)
    assert list(rows[0]) == ["path", "label_1", "probability_1", "label_2", "probability_2", "error"]
    assert len(rows) == len(truth) + 1
    for row in rows:
        if row["path"] == bad:
            assert row["label_1"] == "" and row["error"]
            continue
        # the colour student by hand: mean of the normalised pixels, cosine with one-hot vectors, x10
        x = (np.asarray(Image.open(row["path"]).convert("RGB").resize((32, 32), Image.BILINEAR), np.float64) / 255
             - 0.5) / 0.25
        f = x.reshape(-1, 3).mean(0)
        logits = 10 * f / np.linalg.norm(f)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        order = np.argsort(-p)
        assert row["label_1"] == truth[row["path"]] == CLASSES[order[0]]
        assert row["label_2"] == CLASSES[order[1]]
        np.testing.assert_allclose(float(row["probability_1"]), p[order[0]], atol=2e-5)


def test_rerun_resumes_after_a_kill_and_skips_what_is_written(colour_setup, tmp_path, capsys):
    student, images, truth, bad = colour_setup
    out = tmp_path / "preds.csv"
    paths = sorted([*truth, bad])
    # a first run over the first 3 images, then a kill in the middle of writing the 4th row
    assert main(["predict", *paths[:3], "--student", str(student), "--out", str(out), "--precision", "fp32"]) == 0
    with open(out, "a") as f:
        f.write(f"{paths[3]},gre")  # no newline: the row was cut by the kill
    capsys.readouterr()
    code = main(["predict", str(images), "--student", str(student), "--out", str(out), "--precision", "fp32"])
    err = capsys.readouterr().err
    assert code == 1  # the broken image is still listed
    assert "3 already in" in err and f"{len(paths) - 3} image(s) predicted" not in err
    rows = _read_csv(out)
    assert [r["path"] for r in rows] == paths  # each once, the cut row redone
    assert all(r["label_1"] == truth[r["path"]] for r in rows if r["path"] != bad)
    # a third run tries the unreadable image again (it may have been fixed); still broken, still listed
    assert main(["predict", str(images), "--student", str(student), "--out", str(out), "--precision", "fp32"]) == 1
    err = capsys.readouterr().err
    assert f"0 image(s) predicted, {len(paths) - 1} already in" in err and "1 that failed before tried again" in err
    assert bad in err and sorted(r["path"] for r in _read_csv(out)) == paths
    # fixed: the next run predicts it, and its error row is gone
    from deploy_models import colour_image

    Path(bad).unlink()
    colour_image(Path(bad), "blue", seed=9)  # a real JPEG now (the suffix says so)
    assert main(["predict", str(images), "--student", str(student), "--out", str(out), "--precision", "fp32"]) == 0
    rows = {r["path"]: r for r in _read_csv(out)}
    assert len(rows) == len(paths) and rows[bad]["label_1"] == "blue" and not rows[bad]["error"]


def test_resume_refuses_another_model_or_top_k(colour_setup, tmp_path, capsys):
    from promptkd.serve import export_onnx, load_student

    student, images, truth, _ = colour_setup
    out = tmp_path / "preds.jsonl"
    good = sorted(truth)
    assert main(["predict", *good[:2], "--student", str(student), "--out", str(out), "--top-k", "2"]) == 0
    capsys.readouterr()
    assert main(["predict", *good, "--student", str(student), "--out", str(out), "--top-k", "3"]) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("note:")]
    assert len(err) == 1 and f"{out}: was written with --top-k 2, not 3" in err[0], err
    other = tmp_path / "other"
    from deploy_models import ColourStudent, colour_store
    from promptkd.artifacts import save_adapter

    save_adapter(ColourStudent(scale=2.0).eval(), other, "student", store=colour_store())
    assert main(["predict", *good, "--student", str(other), "--out", str(out), "--top-k", "2"]) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("note:")]
    assert len(err) == 1 and f"holds predictions of another model, {student} (torch, " in err[0], err
    assert f"not {other} (torch, " in err[0] and "{" not in err[0]  # the files, not a JSON dump
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["predictions"] for line in lines)
    # the same model exported to ONNX predicts the same classes
    onnx_path = export_onnx(load_student(student), tmp_path / "s.onnx")
    assert main(["predict", *good, "--student", str(onnx_path), "--json", "--top-k", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["predictions"][0]["class_name"] for r in rows] == [truth[p] for p in good]


def test_bad_output_name_and_progress_lines(colour_setup, tmp_path, capsys):
    student, images, _, _ = colour_setup
    assert main(["predict", str(images), "--student", str(student), "--out", str(tmp_path / "p.txt")]) == 2
    assert "must end in .csv or .jsonl" in capsys.readouterr().err
    # not a terminal: plain progress lines, no carriage returns
    assert main(["predict", str(images), "--student", str(student), "--out", str(tmp_path / "p.csv"),
                 "--batch-size", "2"]) == 1
    err = capsys.readouterr().err
    assert "\r" not in err and "predict: done, 8/8 img in " in err


def test_onnx_and_torch_agree_through_the_predictor_interface(colour_setup, tmp_path):
    from promptkd.runtime import OnnxPredictor, load_predictor
    from promptkd.serve import export_onnx, load_student

    student, _, _, _ = colour_setup
    torch_pred = load_predictor(student, precision="fp32")
    onnx_pred = OnnxPredictor(export_onnx(load_student(student), tmp_path / "s.onnx", output="logits"))
    assert onnx_pred.class_names == torch_pred.class_names == CLASSES
    assert onnx_pred.info.backend == "onnxruntime" and onnx_pred.info.precision == "fp32"
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(onnx_pred.probabilities(x), torch_pred.probabilities(x), rtol=1e-4, atol=1e-5)


def test_backend_auto_uses_onnxruntime_for_long_fp32_jobs_with_the_same_answers(colour_setup, tmp_path, capsys):
    from promptkd.runtime import OnnxPredictor, TorchPredictor, load_predictor

    student, images, truth, _ = colour_setup
    torch_pred = load_predictor(student, precision="fp32", backend="auto", expected_images=10)
    ort_pred = load_predictor(student, precision="fp32", backend="auto", expected_images=None)  # a server
    assert isinstance(torch_pred, TorchPredictor) and isinstance(ort_pred, OnnxPredictor)
    assert ort_pred.info.key() == torch_pred.info.key() and ort_pred.info.name == "student"
    x = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # fp32 in both, summed in other orders: ~1e-6 relative on the logits, times the student's logit scale
    np.testing.assert_allclose(ort_pred.probabilities(x), torch_pred.probabilities(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="runs fp32 on the CPU"):
        load_predictor(student, precision="bf16", backend="onnxruntime")
    # rows written through onnxruntime are resumed by PyTorch (the same model), and agree
    out = tmp_path / "p.csv"
    paths = sorted(truth)
    assert main(["predict", *paths[:3], "--student", str(student), "--out", str(out), "--backend", "onnxruntime",
                 "--precision", "fp32"]) == 0
    assert main(["predict", *paths, "--student", str(student), "--out", str(out), "--backend", "torch",
                 "--precision", "fp32"]) == 0
    assert [r["label_1"] for r in _read_csv(out)] == [truth[p] for p in paths]
    assert "backend onnxruntime -> onnxruntime" in capsys.readouterr().err


def test_a_broken_link_in_a_folder_gets_a_row_and_exit_1(colour_setup, tmp_path, capsys):
    import os

    student, images, truth, bad = colour_setup
    Path(bad).unlink()
    link = images / "03b_moved.png"
    os.symlink(tmp_path / "gone.png", link)  # its target was moved away
    out = tmp_path / "preds.csv"
    assert main(["predict", str(images), "--student", str(student), "--out", str(out), "--precision", "fp32"]) == 1
    rows = {r["path"]: r for r in _read_csv(out)}
    assert set(rows) == {*truth, str(link)} and rows[str(link)]["error"]
    assert str(link) in capsys.readouterr().err


def test_the_pixel_limit_is_named_as_predict_takes_it(colour_setup, tmp_path, capsys):
    from deploy_models import colour_image

    student, _, _, _ = colour_setup
    big = colour_image(tmp_path / "wide.png", "green", size=(300, 200))
    assert main(["predict", str(big), "--student", str(student), "--max-image-pixels", "50000"]) == 1
    assert "over the limit of 50,000 (--max-image-pixels)" in capsys.readouterr().err
    assert main(["predict", str(big), "--student", str(student), "--max-image-pixels", "60000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["predictions"][0]["class_name"] == "green"
