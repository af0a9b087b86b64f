"""Report: mean/std over seeds against numpy, markdown/CSV contents, flags, plot file, paper table."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest

from promptkd import paper
from promptkd.cli import main
from promptkd.report import collect, make_report


def write(root, protocol, dataset, seed, model, metrics, selection="last"):
    d = root / protocol / dataset / f"seed{seed}" / f"eval_{model}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps({
        "protocol": protocol, "dataset": dataset, "seed": seed, "model": model, "selection": selection,
        "metrics": metrics}))


@pytest.fixture
def runs(tmp_path):
    rng = random.Random(0)
    values = {}
    for ds in ("Caltech101", "DTD"):
        for seed in (1, 2, 3):
            for model in ("zeroshot", "student"):
                b, n = 60 + 30 * rng.random(), 50 + 30 * rng.random()
                values[(model, ds, seed)] = (b, n)
                write(tmp_path / "runs", "base2novel", ds, seed, model,
                      {"base": b, "novel": n, "hm": paper.harmonic_mean(b, n)})
    return tmp_path / "runs", values


def hm(b, n):
    return 2 * b * n / (b + n)


def test_means_and_stds_match_numpy(runs, tmp_path):
    root, values = runs
    rep = make_report(root, tmp_path / "out", plot=False)
    rows = {(r["model"], r["dataset"]): r for r in rep.tables[0].rows}
    for model in ("zeroshot", "student"):
        for ds in ("Caltech101", "DTD"):
            bs = np.array([values[(model, ds, s)][0] for s in (1, 2, 3)])
            ns = np.array([values[(model, ds, s)][1] for s in (1, 2, 3)])
            row = rows[(model, ds)]
            assert row["base_mean"] == pytest.approx(bs.mean())
            assert row["base_std"] == pytest.approx(bs.std(ddof=1))
            assert row["novel_std"] == pytest.approx(ns.std(ddof=1))
            assert row["hm"] == pytest.approx(hm(bs.mean(), ns.mean()))
            assert row["hm_std"] == pytest.approx(np.std([hm(b, n) for b, n in zip(bs, ns)], ddof=1))
        avg = rows[(model, "Average")]
        base_means = [np.mean([values[(model, ds, s)][0] for s in (1, 2, 3)]) for ds in ("Caltech101", "DTD")]
        novel_means = [np.mean([values[(model, ds, s)][1] for s in (1, 2, 3)]) for ds in ("Caltech101", "DTD")]
        assert avg["base_mean"] == pytest.approx(np.mean(base_means))
        assert avg["hm"] == pytest.approx(hm(np.mean(base_means), np.mean(novel_means)))
        # the paper's average over the same two datasets, the paper's way
        ref = paper.PAPER_ROW_FOR_MODEL[model]
        pb = np.mean([paper.BASE_TO_NOVEL[ref][d].base for d in ("Caltech101", "DTD")])
        pn = np.mean([paper.BASE_TO_NOVEL[ref][d].novel for d in ("Caltech101", "DTD")])
        assert avg["paper_hm"] == pytest.approx(hm(pb, pn))


def test_markdown_and_csv_contents(runs, tmp_path):
    root, values = runs
    rep = make_report(root, tmp_path / "out", plot=False)
    md = (tmp_path / "out" / "report.md").read_text()
    assert md == rep.markdown
    b = np.array([values[("student", "DTD", s)][0] for s in (1, 2, 3)])
    assert f"| DTD | {b.mean():.2f} ± {b.std(ddof=1):.2f} |" in md
    assert "### student (selection: last; paper row: PromptKD)" in md
    assert "| **Average (2 datasets)** |" in md
    assert "| Caltech101 | 96.84 | 94.00 | 95.40 |" not in md  # paper cells sit after the run's columns
    assert "| 98.91 | 96.65 | 97.77 |" in md  # PromptKD's Caltech101 row next to the student
    assert "Mixed model-selection" not in md and "Notes" not in md
    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert [(r["model"], r["dataset"]) for r in rows] == [
        ("zeroshot", "Caltech101"), ("zeroshot", "DTD"), ("zeroshot", "Average"),
        ("student", "Caltech101"), ("student", "DTD"), ("student", "Average")]
    assert rows[3]["paper_hm"] == "97.77" and rows[3]["seeds"] == "1 2 3"


def test_missing_seed_dataset_and_mixed_selection_are_flagged(runs, tmp_path):
    root, _ = runs
    (root / "base2novel" / "DTD" / "seed3" / "eval_student" / "results.json").unlink()
    write(root, "base2novel", "EuroSAT", 1, "zeroshot", {"base": 50.0, "novel": 60.0})
    write(root, "base2novel", "Caltech101", 2, "student", {"base": 90.0, "novel": 80.0}, selection="best_val")
    (root / "junk").mkdir()
    (root / "junk" / "results.json").write_text('{"protocol": "base2novel"}')
    write(root / "copy", "base2novel", "DTD", 1, "zeroshot", {"base": 1.0, "novel": 1.0})
    rep = make_report(root, tmp_path / "out", plot=False)
    md = rep.markdown
    assert "student DTD: seed(s) 3 missing; mean over seed(s) 1, 2" in md
    assert "| DTD† |" in md
    assert "student: no results for EuroSAT" in md
    assert "**Mixed model-selection rules in this base2novel table**" in md
    assert "student Caltech101: seeds selected by different rules (best_val, last)" in md
    assert any("junk/results.json: skipped" in p and "missing key(s)" in p for p in rep.problems)
    assert any(p.startswith("duplicate zeroshot DTD seed 1") for p in rep.problems)
    assert "| **Average (2 datasets)** |" in md and "| **Average (3 datasets)** |" in md
    overview = next(line for line in md.splitlines() if line.startswith("| **Average** |"))
    assert overview.count("(2 datasets)") == 1  # the student's average covers Caltech101 and DTD only


def test_accuracy_protocols_and_plot(tmp_path):
    root = tmp_path / "runs"
    accs = {"ImageNetV2": [60.0, 62.0], "ImageNetA": [50.0, 55.0]}
    for ds, vals in accs.items():
        for seed, v in zip((1, 2), vals):
            write(root, "domain_generalization", ds, seed, "student", {"accuracy": v})
    write(root, "cross_dataset", "DTD", 1, "teacher", {"accuracy": 40.0})
    assert main([  # through the CLI
        "report", str(root), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"| ImageNetV2 | 61.00 ± {np.std([60, 62], ddof=1):.2f} | 69.77 |" in md
    assert "| **Average** | 56.75 (2 targets) | 71.47 (all 4 targets) |" in md
    assert "## Cross-dataset" in md and "| DTD | 40.00 | — |" in md
    for name in ("report_domain_generalization.png", "report_cross_dataset.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        from PIL import Image

        with Image.open(tmp_path / "out" / name) as img:
            img.verify()


def test_collect_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="runs folder not found"):
        collect(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2


def test_paper_table_is_self_consistent():
    """Transcription check: HM of each row and the Average rows, from the paper's own cells."""
    for method in paper.METHODS:
        rows = [paper.BASE_TO_NOVEL[method][d] for d in paper.BASE_TO_NOVEL_DATASETS]
        avg = paper.BASE_TO_NOVEL[method]["Average"]
        assert np.mean([r.base for r in rows]) == pytest.approx(avg.base, abs=0.006)
        assert np.mean([r.novel for r in rows]) == pytest.approx(avg.novel, abs=0.006)
        assert hm(avg.base, avg.novel) == pytest.approx(avg.hm, abs=0.006)
        for d in paper.BASE_TO_NOVEL_DATASETS:
            r = paper.BASE_TO_NOVEL[method][d]
            if (method, d) not in paper.PRINTED_HM_DIFFERS:
                assert hm(r.base, r.novel) == pytest.approx(r.hm, abs=0.011), (method, d)
    dg = paper.DOMAIN_GENERALIZATION[paper.PROMPTKD]
    assert np.mean(list(dg.values())) == pytest.approx(paper.DOMAIN_GENERALIZATION_AVERAGE[paper.PROMPTKD], abs=0.006)
    assert paper.base_to_novel_average(paper.PROMPTKD, list(paper.BASE_TO_NOVEL_DATASETS)).hm == 83.73


def test_zero_shot_rows_never_count_as_mixed_selection(tmp_path):
    root = tmp_path / "runs"
    for seed in (1, 2):
        write(root, "base2novel", "DTD", seed, "zeroshot", {"base": 50.0, "novel": 55.0}, selection="none")
        write(root, "base2novel", "DTD", seed, "student", {"base": 80.0, "novel": 70.0}, selection="last_epoch")
    md = make_report(root, tmp_path / "out", plot=False).markdown
    assert "Mixed model-selection" not in md


def test_selection_rules_across_model_kinds(tmp_path):
    root = tmp_path / "runs"
    write(root, "base2novel", "DTD", 1, "teacher", {"base": 80.0, "novel": 70.0}, selection="gpa")
    write(root, "base2novel", "DTD", 1, "student", {"base": 80.0, "novel": 70.0}, selection="last_epoch")
    md = make_report(root, tmp_path / "a", plot=False).markdown
    assert "Mixed model-selection" not in md  # the normal pipeline: GPA teacher, last-epoch student
    assert "### teacher (selection: gpa;" in md and "### student (selection: last_epoch;" in md
    write(root, "base2novel", "DTD", 1, "student", {"base": 80.0, "novel": 70.0},
          selection="best_base_test (paper; uses test labels)")
    md = make_report(root, tmp_path / "b", plot=False).markdown
    assert "**Mixed model-selection rules in this base2novel table**" in md
    assert "some models were selected with test-set labels and others were not" in md


def test_a_demo_folder_gives_every_row_once_and_no_problem(tmp_path, capsys):
    """`promptkd demo` writes a summary results.json at the top and one per row; its two zero-shot rows
    (teacher and student backbones) are told apart by their "name"."""
    root = tmp_path / "demo"
    rows = {"zeroshot_teacher": ("zeroshot", "zeroshot (teacher backbone)", "none", 38.5, 52.8),
            "zeroshot_student": ("zeroshot", "zeroshot (student backbone)", "none", 24.1, 53.6),
            "teacher": ("teacher", "teacher", "gpa", 74.2, 55.5),
            "student": ("student", "student", "last_epoch", 77.2, 62.4)}
    for folder, (model, name, selection, b, n) in rows.items():
        (root / folder).mkdir(parents=True)
        (root / folder / "results.json").write_text(json.dumps({
            "protocol": "base2novel", "dataset": "fashion_mnist", "seed": 1, "model": model, "name": name,
            "selection": selection, "metrics": {"base": b, "novel": n, "hm": hm(b, n)}}))
    summary = {"kind": "promptkd-demo-summary", "dataset": "fashion_mnist", "protocol": "base2novel", "seed": 1,
               "rows": {"student": {"base": 77.2, "novel": 62.4, "hm": 69.0}}}
    (root / "results.json").write_text(json.dumps(summary))
    assert main(["report", str(root), "--no-plot"]) == 0
    captured = capsys.readouterr()
    assert "Problems" not in captured.out and "skipped" not in captured.out and "duplicate" not in captured.out
    assert "4 result file(s)" in captured.out
    section = captured.out.split("### zeroshot (teacher backbone) (selection: none; paper row: CLIP)")[1]
    assert section.split("\n\n")[1].splitlines()[2] == "| fashion_mnist | 38.50 | 52.80 | 44.53 | 1 | — | — | — | — |"
    table = list(csv.DictReader((root / "report.csv").open()))
    models = [r["model"] for r in table if r["dataset"] == "fashion_mnist"]
    assert models == ["zeroshot (student backbone)", "zeroshot (teacher backbone)", "teacher", "student"]
    by_model = {r["model"]: r for r in table if r["dataset"] == "fashion_mnist"}
    assert float(by_model["zeroshot (teacher backbone)"]["base_mean"]) == 38.5
    assert float(by_model["zeroshot (student backbone)"]["novel_mean"]) == 53.6
    assert by_model["zeroshot (teacher backbone)"]["kind"] == "zeroshot"
    # an older demo summary (no "kind") is also recognised and passed over
    del summary["kind"]
    (root / "results.json").write_text(json.dumps(summary))
    assert not make_report(root, tmp_path / "old", plot=False).problems


def test_cross_dataset_average_leaves_out_the_source_dataset(tmp_path):
    root = tmp_path / "runs"
    write(root, "cross_dataset", "ImageNet", 1, "teacher", {"accuracy": 50.0})  # the source
    write(root, "cross_dataset", "Caltech101", 1, "teacher", {"accuracy": 25.0})
    write(root, "cross_dataset", "DTD", 1, "teacher", {"accuracy": 45.0})
    assert main(["report", str(root), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| ImageNet | 50.00 |" in md and "Model selection: teacher: last." in md
    assert "| **Average** | 35.00 (2 targets) |" in md  # (25 + 45) / 2, not (50 + 25 + 45) / 3
    assert "ImageNet: not a target of this protocol (the source dataset): shown, not counted in the Average." in md
    row = [r for r in csv.DictReader((tmp_path / "out" / "report.csv").open()) if r["dataset"] == "Average"][0]
    assert float(row["accuracy_mean"]) == 35.0 and row["n_datasets"] == "2"


def test_students_of_differently_chosen_teachers_are_flagged(tmp_path):
    root = tmp_path / "runs"
    for seed, rule in ((1, "gpa"), (2, "gpa"), (3, "authors_best_on_test")):
        d = root / "base2novel" / "DTD" / f"seed{seed}" / "eval_student"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({
            "protocol": "base2novel", "dataset": "DTD", "seed": seed, "model": "student", "selection": "last_epoch",
            "metrics": {"base": 70.0, "novel": 60.0, "hm": hm(70.0, 60.0)},
            "source": {"teacher": {"artefact": f"t{seed}", "selection": rule}}}))
    assert main(["report", str(root), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    md = " ".join((tmp_path / "out" / "report.md").read_text().split())
    assert ("student rows of this base2novel table come from teachers chosen by different rules** "
            "(authors_best_on_test: 1 run, gpa: 2 runs)") in md


def test_one_teacher_per_dataset_is_not_a_missing_seed(runs, tmp_path):
    root, _ = runs  # students and zero-shot rows for seeds 1-3
    write(root, "base2novel", "DTD", 1, "teacher", {"base": 80.0, "novel": 60.0, "hm": hm(80.0, 60.0)})
    write(root, "base2novel", "Caltech101", 1, "teacher", {"base": 90.0, "novel": 70.0, "hm": hm(90.0, 70.0)})
    assert main(["report", str(root), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "teacher DTD: seed(s)" not in md and "missing" not in md
    assert "teacher: one teacher per dataset (seed 1), reused by the students of every seed" in " ".join(md.split())
    write(root, "base2novel", "DTD", 2, "teacher", {"base": 81.0, "novel": 61.0, "hm": hm(81.0, 61.0)})
    assert main(["report", str(root), "--out", str(tmp_path / "out2"), "--quiet"]) == 0  # teachers per seed: gaps count
    assert "teacher Caltech101: seed(s) 2, 3 missing" in (tmp_path / "out2" / "report.md").read_text()
