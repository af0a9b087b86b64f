"""Benchmarks: every layout through a tiny fixture, and the real split files (packaged with promptkd)
reproduce the paper's counts."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest

from promptkd.data.benchmarks import (
    REGISTRY,
    DataError,
    get_spec,
    list_images,
    load_benchmark,
    load_image_folder,
    load_list,
    packaged_asset,
)
from promptkd.data.fixtures import layout_placeholders, make_fixture, make_image_folder, make_unlabelled_folder
from promptkd.data.split_files import packaged_bytes
from promptkd.data.splits import base_novel_split

# the project's reference copies, outside the repository: only for checking the packaged ImageNet subsets
SPLITS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "splits"

# The paper's train / test-base / test-novel counts and class counts (copied by hand from the paper's
# tables as summarised in shared/reference/promptkd.md), independent of the registry's own numbers.
PAPER = {
    "Caltech101": (4128, 1549, 916, 100),
    "OxfordPets": (2944, 1881, 1788, 37),
    "StanfordCars": (6509, 4002, 4039, 196),
    "Flowers102": (4093, 1053, 1410, 102),
    "DTD": (2820, 864, 828, 47),
    "EuroSAT": (13500, 4200, 3900, 10),
    "UCF101": (7639, 1934, 1849, 101),
}


@pytest.mark.parametrize("name", list(REGISTRY))
def test_fixture_layout_loads_with_counts_labels_and_names(tmp_path, name):
    classes, per_class, test_per_class = 5, 3, 2
    fx = make_fixture(tmp_path, name, classes=classes, per_class=per_class, test_per_class=test_per_class)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # A/R: "5 of 200 class folders present"
        bench = load_benchmark(tmp_path, name)
    assert bench.classnames == fx.classnames and len(bench.classnames) == classes
    assert [(s.path, s.label, s.classname) for s in bench.test] == [(s.path, s.label, s.classname) for s in fx.splits["test"]]
    assert len(bench.test) == classes * test_per_class
    for s in bench.test + bench.train:
        assert bench.classnames[s.label] == s.classname and "_" not in s.classname
    if bench.eval_only:
        assert [s.path for s in bench.train] == [s.path for s in bench.test]
    else:
        assert len(bench.train) == classes * per_class
        assert sorted({s.label for s in bench.train}) == list(range(classes))
    halves = base_novel_split(bench)
    assert halves.base_labels == [0, 1, 2] and halves.novel_labels == [3, 4]
    assert halves.base.classnames == bench.classnames[:3] and halves.novel.classnames == bench.classnames[3:]
    assert len(halves.base.test) == 3 * test_per_class and len(halves.novel.test) == 2 * test_per_class
    assert sorted({s.label for s in halves.novel.test}) == [0, 1]  # novel labels re-indexed from 0
    for s in halves.novel.test:
        assert halves.novel.classnames[s.label] == s.classname


def test_class_name_rules_follow_coop(tmp_path):
    make_fixture(tmp_path, "EuroSAT", classes=4)
    make_fixture(tmp_path, "SUN397", classes=6)
    make_fixture(tmp_path, "UCF101", classes=2)
    assert load_benchmark(tmp_path, "eurosat").classnames == [
        "Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road"]
    assert load_benchmark(tmp_path, "SUN397").classnames[-1] == "outdoor apartment building"
    assert load_benchmark(tmp_path, "ucf-101").classnames == ["Apply Eye Makeup", "Apply Lipstick"]
    assert get_spec("OxfordFlowers").name == get_spec("flowers_102").name == "Flowers102"


def test_split_written_with_raw_folder_names_gets_coop_names(tmp_path):
    fx = make_fixture(tmp_path, "EuroSAT", classes=3)
    split_path = fx.dataset_dir / "split_zhou_EuroSAT.json"
    data = json.loads(split_path.read_text())
    for entries in data.values():
        for e in entries:
            e[2] = e[0].split("/")[0]  # "AnnualCrop", as the folder is called
    split_path.write_text(json.dumps(data))
    assert load_benchmark(tmp_path, "EuroSAT").classnames == fx.classnames


def test_imagenet_subsets_map_to_imagenet_labels(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_fixture(tmp_path, "ImageNetA", classes=3)
        bench = load_benchmark(tmp_path, "imagenet-a")
    wnids_1k = [line.split()[0] for line in packaged_asset("imagenet_classnames.txt").read_text().splitlines()]
    assert [wnids_1k[i] for i in bench.imagenet_indices] == bench.class_ids
    assert bench.imagenet_indices == sorted(bench.imagenet_indices)  # label order = ImageNet order


@pytest.mark.skipif(not SPLITS_DIR.is_dir(), reason=f"shared reference splits not found at {SPLITS_DIR}")
@pytest.mark.parametrize("subset", ["a", "r"])
def test_packaged_subsets_match_reference_indices(subset):
    wnids_1k = (SPLITS_DIR / "imagenet_synsets.txt").read_text().split()
    names_1k = [line.split()[0] for line in packaged_asset("imagenet_classnames.txt").read_text().splitlines()]
    assert names_1k == wnids_1k
    indices = [int(x) for x in (SPLITS_DIR / f"imagenet_{subset}_indices.txt").read_text().split()]
    assert [wnids_1k[i] for i in indices] == packaged_asset(f"imagenet_{subset}_synsets.txt").read_text().split()


@pytest.mark.parametrize("name", list(PAPER))
def test_real_split_files_reproduce_paper_counts(tmp_path, name):
    layout_placeholders(tmp_path, name)  # the packaged split file + an empty file per entry: nothing is decoded
    bench = load_benchmark(tmp_path, name)
    halves = base_novel_split(bench)
    train, test_base, test_novel, classes = PAPER[name]
    assert (len(bench.train), len(halves.base.test), len(halves.novel.test), bench.num_classes) == (
        train, test_base, test_novel, classes)
    assert len(halves.base.classnames) == math.ceil(classes / 2)
    if name == "Flowers102":  # split names agree with the dataset's cat_to_name map (label = category - 1)
        cat_to_name = json.loads(packaged_bytes("oxford_flowers_cat_to_name.json"))
        assert bench.classnames == [cat_to_name[str(i + 1)] for i in range(classes)]


def test_missing_split_file_names_it(tmp_path):
    (tmp_path / "caltech-101" / "101_ObjectCategories").mkdir(parents=True)
    with pytest.raises(DataError, match="split_zhou_Caltech101.json: split file missing"):
        load_benchmark(tmp_path, "Caltech101")


def test_missing_dataset_folder_names_expected_layout(tmp_path):
    with pytest.raises(DataError, match=r"oxford_pets: dataset folder missing"):
        load_benchmark(tmp_path, "OxfordPets")


def test_missing_images_all_listed(tmp_path):
    fx = make_fixture(tmp_path, "DTD", classes=3)
    gone = [fx.splits["train"][0].path, fx.splits["test"][-1].path]
    for p in gone:
        Path(p).unlink()
    with pytest.raises(DataError) as err:
        load_benchmark(tmp_path, "DTD")
    assert err.value.problems == [f"{p}: listed in {fx.dataset_dir / 'split_zhou_DescribableTextures.json'} but missing"
                                  for p in gone]
    assert len(load_benchmark(tmp_path, "DTD", check_files=False).train) == 9


def test_split_with_conflicting_class_names(tmp_path):
    fx = make_fixture(tmp_path, "Food101", classes=2)
    split_path = fx.dataset_dir / "split_zhou_Food101.json"
    data = json.loads(split_path.read_text())
    data["test"][0][2] = "apple tart"
    split_path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="label 0 is called 'apple_pie' and 'apple tart'"):
        load_benchmark(tmp_path, "Food101")


def test_imagenet_classnames_file_disagreeing_with_folders(tmp_path):
    fx = make_fixture(tmp_path, "ImageNet", classes=3)
    names = fx.dataset_dir / "classnames.txt"
    names.write_text("\n".join(names.read_text().splitlines()[:2]) + "\n")  # drop the third wnid
    with pytest.raises(DataError, match=r"classnames.txt: no class name for folder .*n01484850"):
        load_benchmark(tmp_path, "ImageNet")


def test_flowers_category_names_disagreeing_with_split(tmp_path):
    fx = make_fixture(tmp_path, "Flowers102", classes=3)
    names = fx.dataset_dir / "cat_to_name.json"
    names.write_text(json.dumps({"1": "pink primrose", "2": "sweet pea", "3": "canterbury bells"}))
    with pytest.raises(DataError, match=r"cat_to_name.json: category 2 is 'sweet pea' but .*split_zhou_OxfordFlowers.json "
                                        r"calls label 1 'hard-leaved pocket orchid'"):
        load_benchmark(tmp_path, "Flowers102")


def test_fgvc_variant_not_in_class_list(tmp_path):
    fx = make_fixture(tmp_path, "FGVCAircraft", classes=3)
    lines = (fx.dataset_dir / "images_variant_test.txt").read_text().splitlines()
    lines[1] = lines[1].split(" ")[0] + " Boeing 999"
    (fx.dataset_dir / "images_variant_test.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"images_variant_test.txt:2: variant 'Boeing 999' is not in .*variants.txt"):
        load_benchmark(tmp_path, "FGVCAircraft")


def test_empty_class_folder_is_reported(tmp_path):
    make_fixture(tmp_path, "ImageNetSketch", classes=3)
    folder = tmp_path / "imagenet-sketch" / "images" / "n01443537"
    for p in folder.iterdir():
        p.unlink()
    with pytest.raises(DataError, match=r"n01443537: class folder has no images"):
        load_benchmark(tmp_path, "ImageNetSketch")
    make_image_folder(tmp_path / "mine", classes=2, per_class=2)
    (tmp_path / "mine" / "class_z").mkdir()
    with pytest.raises(DataError, match=r"mine/class_z: class folder has no images"):
        load_image_folder(tmp_path / "mine")


def test_image_folder_and_lists(tmp_path):
    names = make_image_folder(tmp_path / "flat", classes=3, per_class=4)
    bench = load_image_folder(tmp_path / "flat", holdout=0.25, seed=1)
    assert bench.classnames == [n.replace("_", " ") for n in names]
    assert (len(bench.train), len(bench.test)) == (9, 3)
    assert [s.label for s in bench.test] == [0, 1, 2]
    make_image_folder(tmp_path / "split", classes=2, per_class=3, test_per_class=2)
    bench = load_image_folder(tmp_path / "split")
    assert (len(bench.train), len(bench.test)) == (6, 4)

    csv = tmp_path / "flat" / "list.csv"
    csv.write_text("path,classname,split\nclass_b/img0.jpg,zebra,train\nclass_a/img0.jpg,cat,train\n"
                   "class_a/img1.jpg,cat,test\n")
    bench = load_list(csv)
    assert bench.classnames == ["cat", "zebra"]
    assert [(Path(s.path).name, s.label) for s in bench.train] == [("img0.jpg", 1), ("img0.jpg", 0)]
    js = tmp_path / "flat" / "list.json"
    js.write_text(json.dumps([{"path": "class_c/img0.jpg", "label": 1, "classname": "c"},
                              {"path": "class_a/img0.jpg", "label": 0, "classname": "a"}]))
    assert load_list(js).classnames == ["a", "c"]
    js.write_text(json.dumps([{"path": "nope.jpg", "label": 0, "classname": "a"}]))
    with pytest.raises(DataError, match="nope.jpg: listed in .*list.json but missing"):
        load_list(js)


def test_unlabelled_folder_is_recursive_and_sorted(tmp_path):
    written = make_unlabelled_folder(tmp_path / "u", count=6)
    (tmp_path / "u" / "notes.txt").write_text("x")
    assert list_images(tmp_path / "u") == written
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="empty: no images"):
        list_images(tmp_path / "empty")


def test_fixture_images_are_learnable(tmp_path):
    """Class-dependent colours: a nearest-class-mean classifier on mean RGB gets every test image right."""
    import numpy as np
    from PIL import Image

    fx = make_fixture(tmp_path, "Caltech101", classes=6, per_class=3, test_per_class=3)

    def feature(path):
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).mean(axis=(0, 1))

    means = np.stack([np.mean([feature(s.path) for s in fx.splits["train"] if s.label == c], axis=0)
                      for c in range(6)])
    predicted = [int(np.argmin(((means - feature(s.path)) ** 2).sum(1))) for s in fx.splits["test"]]
    assert predicted == [s.label for s in fx.splits["test"]]
