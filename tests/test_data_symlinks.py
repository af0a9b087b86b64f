"""Symbolic links in datasets: looping folder links are never followed (no extra class, no copies, no
endless walk), legitimate ones are, and broken links are reported by `data check`."""

from __future__ import annotations

import os
import warnings

import pytest

from promptkd.cli import main
from promptkd.data.benchmarks import list_images, load_benchmark
from promptkd.data.check import check_root
from promptkd.data.custom import load_custom
from promptkd.data.fixtures import make_fixture, make_image_folder, make_unlabelled_folder
from promptkd.data.scan import DanglingLinkWarning, SymlinkLoopWarning
from promptkd.data.splits import unlabelled_from


def _load(ref: str, root):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bench = load_custom(ref, root)
    return bench, [w.message for w in caught]


@pytest.mark.parametrize("target", [".", "..", "/"])
def test_folder_root_link_to_itself_or_an_ancestor_is_not_a_class(tmp_path, target):
    data = tmp_path / "pets"
    make_image_folder(data, classes=3, per_class=5)
    plain, _ = _load("folder:pets", tmp_path)
    os.symlink(target, data / "zz_everything")  # sorts last: would become a 4th class holding all images
    bench, caught = _load("folder:pets", tmp_path)
    assert bench.classnames == plain.classnames == ["class a", "class b", "class c"]
    assert sorted(s.path for s in bench.train + bench.test) == sorted(s.path for s in plain.train + plain.test)
    loops = [w for w in caught if isinstance(w, SymlinkLoopWarning)]
    assert len(loops) == 1 and loops[0].paths == [str(data / "zz_everything")]


def test_link_inside_a_class_folder_back_to_an_ancestor_adds_no_copies(tmp_path):
    data = tmp_path / "pets"
    make_image_folder(data, classes=2, per_class=5)
    plain, _ = _load("folder:pets", tmp_path)
    os.symlink("../..", data / "class_a" / "up")  # class_a/up -> tmp_path: holds pets/ itself
    os.symlink("..", data / "class_b" / "self")
    bench, caught = _load("folder:pets", tmp_path)
    assert [(s.path, s.label) for s in bench.train] == [(s.path, s.label) for s in plain.train]
    assert {p for w in caught if isinstance(w, SymlinkLoopWarning) for p in w.paths} == {
        str(data / "class_a" / "up"), str(data / "class_b" / "self")}


def test_legitimate_folder_links_are_followed(tmp_path):
    elsewhere = tmp_path / "disk2"
    make_image_folder(elsewhere, classes=2, per_class=3)
    data = tmp_path / "mine"
    data.mkdir()
    os.symlink(elsewhere / "class_a", data / "cats")  # a class folder on another disk
    os.symlink(elsewhere / "class_b", data / "dogs")
    bench, _ = _load("folder:mine", tmp_path)
    assert bench.classnames == ["cats", "dogs"] and len(bench.train) + len(bench.test) == 6
    unlabelled = tmp_path / "unlabelled"
    real = make_unlabelled_folder(unlabelled, count=4)
    os.symlink(elsewhere / "class_a", unlabelled / "more")  # a linked sub-folder of the unlabelled stream
    paths = unlabelled_from(str(unlabelled))
    assert sorted(paths) == sorted(real + [str(unlabelled / "more" / f"img{i}.jpg") for i in range(3)])


def test_unlabelled_walk_ends_on_links_that_point_at_each_other(tmp_path):
    a, b = tmp_path / "u" / "a", tmp_path / "u" / "b"
    make_unlabelled_folder(a, count=2)
    make_unlabelled_folder(b, count=2)
    os.symlink(b, a / "to_b")
    os.symlink(a, b / "to_a")
    os.symlink(tmp_path / "u", a / "to_top")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = list_images(tmp_path / "u")
    real = {os.path.realpath(p) for p in paths}
    assert len(real) == 4  # each real image; the a -> b -> a cycle is cut where it closes
    assert all(p.count("to_a") + p.count("to_b") <= 1 for p in paths)
    assert any(isinstance(w.message, SymlinkLoopWarning) for w in caught)


def test_broken_links_are_skipped_and_reported_by_data_check(tmp_path, capsys):
    data = tmp_path / "pets"
    make_image_folder(data, classes=2, per_class=4)
    os.symlink(tmp_path / "gone.jpg", data / "class_a" / "lost.jpg")
    os.symlink(tmp_path / "gone_folder", data / "class_c")  # a whole class folder on an unmounted disk
    bench, caught = _load("folder:pets", tmp_path)
    assert all("lost.jpg" not in s.path for s in bench.train + bench.test)
    dangling = {p for w in caught if isinstance(w, DanglingLinkWarning) for p in w.paths}
    assert dangling == {str(data / "class_a" / "lost.jpg"), str(data / "class_c")}
    rc = main(["data", "check", str(tmp_path), "--dataset", "folder:pets", "--verify-images"])
    out = capsys.readouterr().out
    assert rc == 1 and "2 problem(s)" in out
    assert f"{data / 'class_a' / 'lost.jpg'}: broken symbolic link (target {tmp_path / 'gone.jpg'} does not exist)" in out
    assert f"{data / 'class_c'}: broken symbolic link" in out


def test_broken_link_named_by_a_split_file_is_reported_as_such(tmp_path):
    fx = make_fixture(tmp_path, "DTD", classes=3)
    victim = fx.splits["test"][0].path
    os.remove(victim)
    os.symlink(tmp_path / "nowhere.jpg", victim)
    report = check_root(tmp_path, ["DTD"], verify_images=True)[0]
    assert report.problems == [f"{victim}: listed in {fx.dataset_dir / 'split_zhou_DescribableTextures.json'} "
                               "but a broken symbolic link (target missing)"]


def test_benchmark_class_folder_scan_skips_loops(tmp_path):
    make_fixture(tmp_path, "ImageNetSketch", classes=3)
    images = tmp_path / "imagenet-sketch" / "images"
    before = load_benchmark(tmp_path, "ImageNetSketch")
    os.symlink("..", images / "n99999999")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        after = load_benchmark(tmp_path, "ImageNetSketch")
    assert after.class_ids == before.class_ids and len(after.test) == len(before.test)
