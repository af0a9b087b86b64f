"""Image lists and split files: Excel's BOM is accepted, every bad row is listed with its number, and a
split file of the wrong shape is a problem naming the file and the field (never a TypeError)."""

from __future__ import annotations

import json

import pytest

from promptkd.cli import main
from promptkd.data.benchmarks import DataError, load_benchmark, load_list
from promptkd.data.fixtures import make_fixture, make_image_folder


@pytest.fixture
def images(tmp_path):
    make_image_folder(tmp_path, classes=2, per_class=2)  # class_a/img0.jpg ...
    return tmp_path


def test_csv_saved_by_excel_with_a_bom_is_read(images):
    rows = "path,label,split\r\nclass_a/img0.jpg,cat,train\r\nclass_b/img0.jpg,dog,train\r\nclass_a/img1.jpg,cat,test\r\n"
    (images / "list.csv").write_bytes(b"\xef\xbb\xbf" + rows.encode())  # Excel's "CSV UTF-8"
    bench = load_list(images / "list.csv")
    assert bench.classnames == ["cat", "dog"] and len(bench.train) == 2 and len(bench.test) == 1
    (images / "spaced.csv").write_text("path , label\nclass_a/img0.jpg,cat\nclass_b/img1.jpg,dog\n")
    assert load_list(images / "spaced.csv").classnames == ["cat", "dog"]
    (images / "list.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"path": "class_a/img0.jpg", "label": "cat"}]).encode())
    assert load_list(images / "list.json").classnames == ["cat"]


def test_json_list_rows_that_are_not_objects_are_all_listed(images):
    rows = [{"path": "class_a/img0.jpg", "label": "cat"}, 5, {"path": "class_b/img0.jpg", "label": "dog"},
            "class_a/img1.jpg", ["class_b/img1.jpg", "dog"]]
    (images / "list.json").write_text(json.dumps(rows))
    with pytest.raises(DataError) as err:
        load_list(images / "list.json")
    assert [p.split(": ", 2)[1] for p in err.value.problems] == ["entry 2", "entry 4", "entry 5"]
    assert all(p.startswith(f"{images / 'list.json'}: entry") for p in err.value.problems)


def test_csv_bad_rows_are_all_listed_with_their_line_numbers(images):
    text = ("path,label,split\nclass_a/img0.jpg,cat,train\n,dog,train\nclass_b/img0.jpg,,train\n"
            "class_b/img1.jpg,dog,holdout\nclass_a/img1.jpg,-3,train\n")
    (images / "list.csv").write_text(text)
    with pytest.raises(DataError) as err:
        load_list(images / "list.csv")
    assert [p.split(": ", 1)[1] for p in err.value.problems] == [
        "line 3: no image path", "line 4: no label or classname",
        "line 5: split 'holdout' is not train, val or test", "line 6: label -3 is negative"]


def test_a_bad_row_and_a_missing_file_are_listed_in_one_run(images, capsys):
    """The rows that parse are checked too, so fixing the list takes one round, not one per problem."""
    text = ("path,label,split\nclass_a/img0.jpg,cat,train\nclass_b/img0.jpg,dog,tset\n"
            "class_b/gone.jpg,dog,train\nclass_a/img1.jpg,cat,test\nclass_b/img1.jpg,dog,test\n")
    (images / "list.csv").write_text(text)
    assert main(["data", "check", str(images), "--dataset", "list:list.csv"]) != 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "line 3: split 'tset' is not train, val or test" in text
    assert str(images / "class_b" / "gone.jpg") in text


@pytest.mark.parametrize("content,field", [
    ({"train": "oops"}, "train"),
    ({"train": [["class_a/img0.jpg", 0, "cat"]], "val": 5}, "val"),
    ({"train": [[5, 0, "cat"]]}, "train[0]"),
    ({"train": [["class_a/img0.jpg", "0", "cat"]]}, "train[0]"),
    ({"train": [["class_a/img0.jpg", 0]]}, "train[0]"),
    ({"train": [["class_a/img0.jpg", True, "cat"]]}, "train[0]"),
])
def test_list_in_coop_split_shape_with_a_bad_field(images, capsys, content, field):
    (images / "bad.json").write_text(json.dumps(content))
    with pytest.raises(DataError) as err:
        load_list(images / "bad.json")
    assert err.value.problems[0].startswith(f"{images / 'bad.json'}: {field}")
    rc = main(["class-vectors", "--dataset", f"list:{images / 'bad.json'}", "--teacher", str(images / "none"),
               "--out", str(images / "cv.safetensors")])
    err_text = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err_text and f"bad.json: {field}" in err_text


@pytest.mark.parametrize("content,expected", [
    ({"train": "oops", "val": [], "test": []}, "split_zhou_DescribableTextures.json:train: must be a list"),
    ({"train": [[5, 0, "banded"]], "val": [], "test": []}, ":train[0]: the path must be a non-empty string, got 5"),
    ({"train": [], "val": [["banded/x.jpg", -1, "banded"]], "test": []}, ":val[0]: the label must be an integer >= 0"),
    ({"train": [], "val": [], "test": [["banded/x.jpg", 0, None]]}, ":test[0]: the class name must be a non-empty"),
    ({"train": []}, "expected an object with 'train', 'val' and 'test' lists, got keys ['train']"),
    (["train"], "expected an object with 'train', 'val' and 'test' lists, got a JSON list"),
])
def test_benchmark_split_file_of_the_wrong_shape(tmp_path, capsys, content, expected):
    fx = make_fixture(tmp_path, "DTD", classes=2)
    split = fx.dataset_dir / "split_zhou_DescribableTextures.json"
    split.write_text(json.dumps(content))
    with pytest.raises(DataError, match="1 problem") as err:
        load_benchmark(tmp_path, "DTD")
    assert err.value.problems[0].startswith(str(split)) and expected in err.value.problems[0]
    assert main(["data", "check", str(tmp_path), "--dataset", "DTD"]) == 1
    assert expected in capsys.readouterr().out
