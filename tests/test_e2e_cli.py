"""End to end through the `promptkd` CLI on a tiny CoOp-layout fixture and tiny random CLIP checkpoints:

train-teacher -> class-vectors -> distill -> evaluate (zeroshot, teacher, student) -> report, for 2 seeds,
then predict and export with the distilled student. Everything runs in-process (``main(argv)``), 2 epochs
on 32 px images, so the whole chain stays within about a minute on two CPU cores.
"""

from __future__ import annotations

import csv
import json

import pytest

from promptkd.cli import main

SEEDS = (1, 2)
FAST = ["--set", "train.epochs=2", "--set", "train.batch_size=4", "--set", "train.precision=fp32",
        "--set", "train.num_workers=0", "--set", "train.device=cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from promptkd.data.fixtures import make_fixture
    from promptkd.models.clip import tiny_clip
    from promptkd.models.weights import save_clip

    root = tmp_path_factory.mktemp("e2e")
    make_fixture(root / "data", "Caltech101", classes=4, per_class=4, test_per_class=2)
    # a wider teacher than the student, so the projector really maps 32 -> 48 dimensions
    save_clip(tiny_clip(seed=1, width=48, layers=1, image_size=32, patch_size=8), root / "teacher_clip.safetensors")
    save_clip(tiny_clip(seed=2, width=32, layers=1, image_size=32, patch_size=8), root / "student_clip.safetensors")
    return root


def run(argv: list[str]) -> None:
    code = main([str(a) for a in argv])
    assert code == 0, f"promptkd {' '.join(map(str, argv))} exited with {code}"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*fewer than .* images:UserWarning")  # 1 val image per class in the fixture
def test_full_pipeline_two_seeds(world):
    data, runs = world / "data", world / "runs"
    for seed in SEEDS:
        r = runs / "base2novel" / "Caltech101" / f"seed{seed}"
        run(["train-teacher", "--data-root", data, "--dataset", "Caltech101", "--clip-weights",
             world / "teacher_clip.safetensors", "--out", r / "teacher", "--seed", seed, *FAST,
             "--set", "data.shots=2", "--set", "teacher.text_depth=1", "--set", "teacher.vision_depth=1",
             "--set", "method.templates=single", "--set", "method.gpa_mean=1"])
        run(["class-vectors", "--teacher", r / "teacher", "--dataset", "Caltech101", "--data-root", data,
             "--out", r / "class_vectors.safetensors", "--device", "cpu"])
        run(["distill", "--config", "distill/base2novel/caltech101", "--data-root", data, "--teacher", r / "teacher",
             "--class-vectors", r / "class_vectors.safetensors", "--student-weights",
             world / "student_clip.safetensors", "--out", r / "student", "--seed", seed, *FAST,
             "--set", "student.depth=1"])
        common = ["--data-root", data, "--dataset", "Caltech101", "--protocol", "base2novel", "--seed", seed,
                  "--device", "cpu", "--workers", "0"]
        run(["evaluate", "--model", "zeroshot", "--clip-weights", world / "teacher_clip.safetensors", *common,
             "--out", r / "eval_zeroshot"])
        run(["evaluate", "--model", "teacher", "--artefact", r / "teacher", *common, "--out", r / "eval_teacher"])
        run(["evaluate", "--model", "student", "--artefact", r / "student", *common, "--out", r / "eval_student"])
        for model in ("zeroshot", "teacher", "student"):
            res = json.loads((r / f"eval_{model}" / "results.json").read_text())
            assert (res["model"], res["seed"], res["dataset"]) == (model, seed, "Caltech101")
            assert set(res["metrics"]) == {"base", "novel", "hm"}
            assert res["num_images"] == {"base": 4, "novel": 4}  # 2 base + 2 novel classes, 2 test images each

    report_dir = world / "report"
    run(["report", runs, "--out", report_dir, "--quiet"])
    md = (report_dir / "report.md").read_text()
    assert "## Base-to-novel (seeds 1, 2;" in md
    for model, paper_row in (("zeroshot", "CLIP"), ("teacher", "Teacher (ViT-L/14 PromptSRC)"), ("student", "PromptKD")):
        assert f"### {model} (selection:" in md and f"paper row: {paper_row})" in md
    assert md.count("| Caltech101 |") == 4  # overview + one row per model kind
    assert md.count("| **Average (1 dataset)** |") == 3
    assert "missing" not in md and "Mixed model-selection" not in md
    rows = list(csv.DictReader((report_dir / "report.csv").open()))
    assert [(r["model"], r["dataset"], r["n_seeds"] or r["n_datasets"]) for r in rows] == [
        ("zeroshot", "Caltech101", "2"), ("zeroshot", "Average", "1"),
        ("teacher", "Caltech101", "2"), ("teacher", "Average", "1"),
        ("student", "Caltech101", "2"), ("student", "Average", "1")]
    png = (report_dir / "report_base2novel.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000

    # results say which teacher a student came from; evaluate files them under the artefact's own seed
    # and protocol (report places each results.json by them), and refuses another
    r2 = runs / "base2novel" / "Caltech101" / "seed2"
    res = json.loads((r2 / "eval_student" / "results.json").read_text())
    assert res["source"]["teacher"]["artefact"] == str(r2 / "teacher") and res["source"]["teacher"]["selection"] == "gpa"
    kept = json.loads((r2 / "student" / "adapter.json").read_text())["selection"]
    assert kept["selection"] == "last_epoch" and kept["selected_epoch"] == 2  # FAST: 2 epochs
    teacher_res = json.loads((r2 / "eval_teacher" / "results.json").read_text())
    assert teacher_res["source"]["teacher_selection"] == "gpa"
    zs = json.loads((r2 / "eval_zeroshot" / "results.json").read_text())["source"]
    from promptkd.models.clip_backbones import tensors_sha256
    from promptkd.models.weights import load_clip

    assert zs["clip_sha256"] == tensors_sha256(load_clip(world / "teacher_clip.safetensors").state_dict())
    assert res["source"]["precision"] in ("fp32", "bf16") and res["source"]["precision_requested"] == "auto"
    again = ["evaluate", "--model", "student", "--artefact", str(r2 / "student"), "--data-root", str(data),
             "--dataset", "Caltech101", "--device", "cpu", "--workers", "0", "--out", str(world / "again")]
    run([*again, "--protocol", "base2novel"])  # no --seed: the student's own
    assert json.loads((world / "again" / "results.json").read_text())["seed"] == 2
    assert main([*again, "--protocol", "base2novel", "--seed", "1"]) == 2
    assert main([*again, "--protocol", "cross_dataset"]) == 2
    assert main(["evaluate", "--model", "teacher", "--artefact", str(r2 / "teacher"), "--data-root", str(data),
                 "--dataset", "Caltech101", "--protocol", "base2novel", "--seed", "1", "--device", "cpu",
                 "--out", str(world / "again_teacher")]) == 2

    # the distilled student on its own: predict, ONNX, self-contained bundle
    student = runs / "base2novel" / "Caltech101" / "seed1" / "student"
    image = next((data / "caltech-101").rglob("*.jpg"))
    run(["predict", image, "--student", student, "--top-k", "2", "--json"])
    run(["export", "--student", student, "--format", "onnx", "--out", world / "student.onnx"])
    run(["export", "--student", student, "--format", "safetensors", "--out", world / "student.safetensors"])
    run(["predict", image, "--student", world / "student.safetensors", "--top-k", "1"])
    assert (world / "student.onnx").stat().st_size > 10_000
