"""The user's own data through the whole CLI: ``--dataset folder:PATH`` / ``list:FILE`` with no data root.

train-teacher (teacher/custom) -> class-vectors -> distill (distill/custom, a folder of unlabelled
images) -> evaluate (zero-shot and student) -> report, on a generated class-folder dataset and tiny
random CLIP checkpoints; plus the data layer's split rules and its error messages (each names the path).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from promptkd.cli import main
from promptkd.data.benchmarks import DataError, load_benchmark
from promptkd.data.custom import FOLDER_HOLDOUT, load_custom

FAST = ["--set", "train.epochs=2", "--set", "train.batch_size=4", "--set", "train.precision=fp32",
        "--set", "train.num_workers=0", "--set", "train.device=cpu"]


def run(argv: list) -> None:
    code = main([str(a) for a in argv])
    assert code == 0, f"promptkd {' '.join(map(str, argv))} exited with {code}"


def fails(argv: list, capsys) -> str:
    """The CLI's error message (exit code 2, no traceback)."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    return err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from promptkd.data.fixtures import make_image_folder, make_unlabelled_folder
    from promptkd.models.clip import tiny_clip
    from promptkd.models.weights import save_clip

    root = tmp_path_factory.mktemp("custom")
    make_image_folder(root / "my_birds", classes=4, per_class=5)  # PATH/<class>/*: 1 test image per class
    make_unlabelled_folder(root / "unlabelled", count=8)
    save_clip(tiny_clip(seed=1, width=48, layers=1, image_size=32, patch_size=8), root / "teacher_clip.safetensors")
    save_clip(tiny_clip(seed=2, width=32, layers=1, image_size=32, patch_size=8), root / "student_clip.safetensors")
    return root


def test_custom_presets_hold_the_papers_settings():
    from promptkd.stages import distill_settings, teacher_settings

    paper_student = distill_settings("distill/base2novel/caltech101")
    student = distill_settings("distill/custom", ["data.dataset=folder:x"])
    assert (student["protocol"], student["data"]["dataset"]) == ("custom", "folder:x")
    for key in ("student", "method", "train"):
        assert student[key] == paper_student[key], key
    paper_teacher = teacher_settings("teacher/base2novel")
    teacher = teacher_settings("teacher/custom")
    assert teacher["data"]["classes"] == "all"  # a deployment learns every class
    assert {**teacher, "data": paper_teacher["data"]} == paper_teacher


def test_folder_split_rules(world, tmp_path):
    from promptkd.data.fixtures import make_image_folder

    single = load_custom(f"folder:{world / 'my_birds'}")
    assert single.name == "my_birds" and single.classnames == ["class a", "class b", "class c", "class d"]
    assert [sum(s.label == c for s in single.test) for c in range(4)] == [round(5 * FOLDER_HOLDOUT)] * 4
    assert not {s.path for s in single.train} & {s.path for s in single.test} and not single.val
    # the hold-out ignores the run's seed and the current folder: same test images from a relative path
    again = load_benchmark(world, "folder:my_birds")
    assert [s.path for s in again.test] == [s.path for s in single.test]

    from promptkd.data.custom import held_out_images_in

    pool = [str(p) for p in sorted((world / "my_birds").rglob("*.jpg"))]  # the labelled folder as unlabelled pool
    assert sorted(held_out_images_in(pool, single)) == sorted(s.path for s in single.test)

    make_image_folder(tmp_path / "dtd", classes=3, per_class=2, test_per_class=1)  # train/ + test/ layout
    split = load_benchmark(None, f"folder:{tmp_path / 'dtd'}")
    assert (len(split.train), len(split.test)) == (6, 3)
    assert all("/test/" in s.path for s in split.test)
    assert split.name == "dtd-custom"  # never mistaken for the DTD benchmark (template, paper numbers)
    from promptkd.methods.templates import coop_template

    assert coop_template(split.name) == coop_template(f"folder:{tmp_path}") == "a photo of a {}."


def test_list_labels_or_class_names(world, tmp_path):
    images = sorted((world / "my_birds").rglob("*.jpg"))
    rows = [{"path": str(p), "label": p.parent.name.replace("class_", "bird "), "split": "test" if i % 5 == 0 else "train"}
            for i, p in enumerate(images)]
    path = tmp_path / "birds.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, ["path", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    bench = load_benchmark(None, f"list:{path}")
    assert bench.name == "birds" and bench.classnames == ["bird a", "bird b", "bird c", "bird d"]
    assert (len(bench.train), len(bench.test)) == (16, 4)
    numbered = tmp_path / "numbered.json"
    numbered.write_text(json.dumps([{"path": str(p), "label": 3 - i // 5, "classname": f"c{3 - i // 5}"}
                                    for i, p in enumerate(images)]))
    assert load_benchmark(None, f"list:{numbered}").classnames == ["c0", "c1", "c2", "c3"]  # the list's label order


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*fewer than .* images:UserWarning")
def test_cli_chain_on_own_folder(world, capsys):
    data, runs = f"folder:{world / 'my_birds'}", world / "runs"
    run(["train-teacher", "--config", "teacher/custom", "--dataset", data, "--clip-weights",
         world / "teacher_clip.safetensors", "--out", runs / "teacher", *FAST, "--set", "data.shots=2",
         "--set", "teacher.text_depth=1", "--set", "teacher.vision_depth=1", "--set", "method.templates=single",
         "--set", "method.gpa_mean=1"])
    assert json.loads((runs / "teacher" / "adapter.json").read_text())["class_names"] == [
        "class a", "class b", "class c", "class d"]  # teacher/custom learns every class
    run(["class-vectors", "--teacher", runs / "teacher", "--dataset", data, "--out", runs / "cv.safetensors",
         "--device", "cpu"])
    run(["distill", "--config", "distill/custom", "--dataset", data, "--teacher", runs / "teacher",
         "--class-vectors", runs / "cv.safetensors", "--student-weights", world / "student_clip.safetensors",
         "--out", runs / "student", *FAST, "--set", "student.depth=1", "--set", "data.unlabelled=folder",
         "--set", f"data.folder={world / 'unlabelled'}", "--set", "method.selection=agreement"])
    student = json.loads((runs / "student" / "adapter.json").read_text())
    assert student["config"]["data"]["dataset"] == data and student["config"]["protocol"] == "custom"
    capsys.readouterr()
    common = ["--dataset", data, "--protocol", "cross_dataset", "--device", "cpu", "--workers", "0"]
    run(["evaluate", "--model", "zeroshot", "--clip-weights", world / "teacher_clip.safetensors", *common,
         "--out", runs / "eval_zeroshot"])
    run(["evaluate", "--model", "student", "--artefact", runs / "student", *common, "--out", runs / "eval_student"])
    b2n = [*common[:2], "--protocol", "base2novel", *common[4:]]  # base = first ceil(4/2) sorted class folders
    run(["evaluate", "--model", "student", "--artefact", runs / "student", *b2n, "--out", runs / "b2n_student"])
    assert json.loads((runs / "b2n_student" / "results.json").read_text())["num_images"] == {"base": 2, "novel": 2}
    for model in ("zeroshot", "student"):
        res = json.loads((runs / f"eval_{model}" / "results.json").read_text())
        assert (res["dataset"], res["model"], res["protocol"]) == ("my_birds", model, "cross_dataset")
        assert 0.0 <= res["metrics"]["accuracy"] <= 100.0
    zs = json.loads((runs / "eval_zeroshot" / "results.json").read_text())
    assert zs["source"]["templates"] == "coop"  # an unknown dataset's CoOp template: "a photo of a {}."
    run(["report", runs, "--out", world / "report", "--quiet"])
    md = (world / "report" / "report.md").read_text()
    assert md.count("| my_birds |") >= 2 and "71.33" not in md  # no paper average beside own data
    assert "my_birds: not among the paper's targets (your own data): no paper numbers." in md
    rows = list(csv.DictReader((world / "report" / "report.csv").open()))
    mine = [r for r in rows if r["dataset"] == "my_birds"]
    assert {r["model"] for r in mine} == {"zeroshot", "student"}
    assert all(not r.get("paper_promptkd") for r in mine)  # no paper number for the user's own dataset


@pytest.mark.parametrize("command", ["train-teacher", "class-vectors", "distill", "evaluate", "data check"])
def test_help_explains_own_data(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0 and "folder:PATH" in out and "list:FILE" in out


# --- errors: each names the file or folder at fault ---------------------------------------------------


def test_folder_without_class_folders(tmp_path, capsys):
    from promptkd.data.fixtures import write_image

    flat = tmp_path / "flat"
    for i in range(3):
        write_image(flat / f"u{i}.jpg", i, 3, (32, 32), variant=i)
    err = fails(["class-vectors", "--teacher", tmp_path, "--dataset", f"folder:{flat}", "--out", tmp_path / "x"], capsys)
    assert f"{flat}: holds images but no class sub-folders" in err and "data.unlabelled=folder" in err
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'nothing'}: no class sub-folders"):
        load_benchmark(None, f"folder:{tmp_path / 'nothing'}")


def test_empty_class_folder(world, tmp_path, capsys):
    from promptkd.data.fixtures import make_image_folder

    make_image_folder(tmp_path / "ds", classes=2, per_class=2)
    (tmp_path / "ds" / "class_z").mkdir()
    err = fails(["evaluate", "--model", "zeroshot", "--clip-weights", world / "teacher_clip.safetensors",
                 "--dataset", f"folder:{tmp_path / 'ds'}", "--protocol", "cross_dataset", "--out", tmp_path / "e"],
                capsys)
    assert f"{tmp_path / 'ds' / 'class_z'}: class folder has no images" in err


def _write_list(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.write_text("path,classname,split\n" + "".join(f"{p},{c},{s}\n" for p, c, s in rows))
    return path


def test_list_errors(world, tmp_path, capsys):
    img = sorted((world / "my_birds").rglob("*.jpg"))
    unknown = _write_list(tmp_path / "unknown.csv", [(img[0], "a", "train"), (img[5], "b", "train"),
                                                     (img[1], "zebra", "test")])
    err = fails(["class-vectors", "--teacher", tmp_path, "--dataset", f"list:{unknown}", "--out", tmp_path / "x"],
                capsys)
    assert f"{unknown}: test image {img[1]} has class 'zebra', which has no train entries" in err
    missing = _write_list(tmp_path / "missing.csv", [(img[0], "a", "train"), ("gone/nope.jpg", "b", "train")])
    err = fails(["evaluate", "--model", "zeroshot", "--clip-weights", world / "teacher_clip.safetensors",
                 "--dataset", f"list:{missing}", "--protocol", "cross_dataset", "--out", tmp_path / "e"], capsys)
    assert f"{tmp_path / 'gone' / 'nope.jpg'}: listed in {missing} but missing" in err


def test_benchmark_without_data_root_and_bad_reference(capsys, tmp_path):
    err = fails(["class-vectors", "--teacher", tmp_path, "--dataset", "DTD", "--out", tmp_path / "x"], capsys)
    assert "DTD is a benchmark read from a data root: pass --data-root" in err and "folder:PATH" in err
    err = fails(["class-vectors", "--teacher", tmp_path, "--dataset", "folder:", "--out", tmp_path / "x"], capsys)
    assert "has no path" in err
    err = fails(["class-vectors", "--teacher", tmp_path, "--dataset", "folders:x", "--out", tmp_path / "x"], capsys)
    assert "unknown dataset 'folders:x'" in err and "folder:PATH" in err


def test_data_check_reports_own_data(world, tmp_path, capsys):
    from promptkd.data.fixtures import make_image_folder

    make_image_folder(tmp_path / "ok", classes=2, per_class=3)
    make_image_folder(tmp_path / "bad", classes=2, per_class=3)
    (tmp_path / "bad" / "class_c").mkdir()
    code = main(["data", "check", str(tmp_path), "--dataset", "folder:ok", "--dataset", "folder:bad", "--verify-images"])
    out = capsys.readouterr().out
    assert code == 1
    row = next(line.split() for line in out.splitlines() if line.startswith("ok "))
    assert row == ["ok", "2", "4", "2", "1", "1", "ok"]  # classes, train, test, base test, novel test, status
    assert f"{tmp_path / 'bad' / 'class_c'}: class folder has no images" in out
