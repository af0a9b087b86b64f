"""``promptkd data check``: every problem of a root reported in one run; exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from promptkd.cli import main
from promptkd.data.check import check_root
from promptkd.data.fixtures import make_fixture


def _broken_root(root: Path) -> dict[str, str]:
    """A root with one problem of each kind; returns a token that must appear in the report per problem."""
    dtd = make_fixture(root, "DTD", classes=3)
    Path(dtd.splits["train"][0].path).unlink()  # split entry whose image does not exist
    euro = make_fixture(root, "EuroSAT", classes=3)
    corrupt = euro.splits["test"][0].path
    Path(corrupt).write_bytes(Path(corrupt).read_bytes()[:100])  # truncated JPEG
    (root / "caltech-101" / "101_ObjectCategories").mkdir(parents=True)  # split file missing
    sketch = make_fixture(root, "ImageNetSketch", classes=3)
    for p in (sketch.dataset_dir / "images" / "n01443537").iterdir():  # empty class folder
        p.unlink()
    imnet = make_fixture(root, "ImageNet", classes=3)
    names = imnet.dataset_dir / "classnames.txt"  # class-name file disagreeing with the folders
    names.write_text(names.read_text().replace("n01484850", "n99999999"))
    make_fixture(root, "UCF101", classes=2)  # a healthy one
    return {
        "DTD": f"{dtd.splits['train'][0].path}: listed in",
        "EuroSAT": f"{corrupt}: cannot decode image",
        "Caltech101": "split_zhou_Caltech101.json: split file missing",
        "ImageNetSketch": "n01443537: class folder has no images",
        "ImageNet": "classnames.txt: no class name for folder",
    }


def test_check_reports_every_problem_in_one_run(tmp_path, capsys):
    expected = _broken_root(tmp_path)
    rc = main(["data", "check", str(tmp_path), "--verify-images", "--json", str(tmp_path / "report.json")])
    out = capsys.readouterr()
    assert rc == 1
    for token in expected.values():
        assert token in out.out
    assert "5 dataset(s) with problems" in out.err and "UCF101" not in out.err
    report = {r["name"]: r for r in json.loads((tmp_path / "report.json").read_text())}
    assert set(report) == {*expected, "UCF101"} and report["UCF101"]["ok"]
    assert report["UCF101"]["counts"] == {"classes": 2, "train": 6, "test": 4, "test_base": 2, "test_novel": 2}
    assert report["UCF101"]["mismatches"] == ["classes", "train", "test", "test_base", "test_novel"]


def test_without_verify_only_existence_is_checked(tmp_path, capsys):
    _broken_root(tmp_path)
    reports = {r.name: r for r in check_root(tmp_path)}
    assert reports["EuroSAT"].ok() and not reports["DTD"].ok()
    main(["data", "check", str(tmp_path), "--dataset", "EuroSAT"])  # its undecodable image: "ok", and why
    out = capsys.readouterr().out
    assert "ok" in out.splitlines()[1] and "listed, not opened: --verify-images decodes every one" in out
    main(["data", "check", str(tmp_path), "--dataset", "EuroSAT", "--verify-images"])
    assert "not opened" not in capsys.readouterr().out


def test_check_exit_codes(tmp_path, capsys):
    make_fixture(tmp_path, "Flowers102", classes=2)
    assert main(["data", "check", str(tmp_path)]) == 0
    assert main(["data", "check", str(tmp_path), "--strict"]) == 1  # counts differ from the paper's
    assert main(["data", "check", str(tmp_path), "--dataset", "OxfordPets"]) == 1  # named but absent
    assert "oxford_pets: dataset folder missing" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2
    assert "data root" in capsys.readouterr().err
    assert main(["data", "check", str(tmp_path), "--dataset", "NoSuchSet"]) == 2
    assert main(["data", "list"]) == 0
    assert "imagenet-adversarial/imagenet-a" in capsys.readouterr().out


def test_strict_verdict_is_the_same_in_the_table_and_the_exit_code(tmp_path, capsys):
    make_fixture(tmp_path, "Flowers102", classes=2)  # healthy, but its counts are not the paper's

    def status_cell() -> str:
        row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("Flowers102"))
        return row.split("  ")[-1].strip()

    assert main(["data", "check", str(tmp_path)]) == 0
    assert status_cell() == "ok"
    assert main(["data", "check", str(tmp_path), "--strict", "--json", str(tmp_path / "r.json")]) == 1
    assert status_cell() == "5 count(s) differ from the paper (--strict)"
    (report,) = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] is False and report["strict"] is True


def test_fixture_arguments_have_help_with_their_defaults(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        main(["data", "fixture", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "root data root to write into" in text
    assert "--classes CLASSES classes per dataset (default 4)" in text
    assert "--per-class PER_CLASS train images per class (default 3)" in text
    assert "--dataset NAME benchmark whose layout to copy" in text
