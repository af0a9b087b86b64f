"""CoOp's split files ship with the package: `data splits --write` puts them into a data root (never over
a different file without --overwrite), `data check` suggests it and compares, and the wheel carries them."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from promptkd.cli import main
from promptkd.data.benchmarks import get_spec, load_benchmark
from promptkd.data.split_files import (
    SHA256,
    packaged_bytes,
    packaged_split,
    packaged_split_datasets,
    write_split_files,
)

REPO = Path(__file__).resolve().parents[1]
# the project's reference copies beside the repository (or beside a worktree's parent); absent on a fresh clone
REFERENCE = next((p for p in (REPO.parent / "shared" / "reference" / "splits",
                              REPO.parent.parent / "shared" / "reference" / "splits") if p.is_dir()), Path("/nonexistent"))
# (train, val, test, classes) of each CoOp split file, as counted in shared/reference/splits/README.md
COUNTS = {"Caltech101": (4128, 1649, 2465, 100), "OxfordPets": (2944, 736, 3669, 37),
          "StanfordCars": (6509, 1635, 8041, 196), "Flowers102": (4093, 1633, 2463, 102),
          "DTD": (2820, 1128, 1692, 47), "EuroSAT": (13500, 5400, 8100, 10), "UCF101": (7639, 1898, 3783, 101)}


def test_the_seven_split_files_are_packaged_with_their_counts():
    assert packaged_split_datasets() == list(COUNTS)
    for name, (train, val, test, classes) in COUNTS.items():
        split = packaged_split(name)
        labels = {e[1] for part in split.values() for e in part}
        assert (len(split["train"]), len(split["val"]), len(split["test"]), len(labels)) == (train, val, test, classes)
    for asset, digest in SHA256.items():
        assert hashlib.sha256(packaged_bytes(asset)).hexdigest() == digest


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="the project's shared/reference/splits is not beside the repository")
def test_packaged_files_are_byte_copies_of_the_reference():
    for asset in SHA256:
        assert packaged_bytes(asset) == (REFERENCE / asset).read_bytes(), asset


def test_write_into_a_root_then_load(tmp_path, capsys):
    (tmp_path / "dtd").mkdir()
    (tmp_path / "oxford_flowers").mkdir()
    assert main(["data", "splits", "--write", str(tmp_path)]) == 0  # every folder present, nothing else
    out = capsys.readouterr().out
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json"))
    assert written == ["dtd/split_zhou_DescribableTextures.json", "oxford_flowers/cat_to_name.json",
                       "oxford_flowers/split_zhou_OxfordFlowers.json"]
    assert "(written)" in out
    assert (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").read_bytes() == \
        packaged_bytes("split_zhou_DescribableTextures.json")
    assert main(["data", "splits", "--write", str(tmp_path), "--dataset", "eurosat"]) == 0  # named: folder made
    assert json.loads((tmp_path / "eurosat" / "split_zhou_EuroSAT.json").read_text())["train"][0][2] == "Annual Crop Land"
    (tmp_path / "eurosat" / "2750").mkdir()
    bench = load_benchmark(tmp_path, "EuroSAT", check_files=False)
    assert len(bench.train) == 13500 and bench.classnames[0] == "Annual Crop Land"


def test_a_different_existing_file_is_kept_without_overwrite(tmp_path, capsys):
    folder = tmp_path / "dtd"
    folder.mkdir()
    split = folder / "split_zhou_DescribableTextures.json"
    split.write_text('{"mine": true}')
    assert main(["data", "splits", "--write", str(tmp_path), "--dataset", "DTD"]) == 2
    err = capsys.readouterr().err
    assert f"{split}" in err and "--overwrite" in err and split.read_text() == '{"mine": true}'
    assert main(["data", "splits", "--write", str(tmp_path), "--dataset", "DTD"]) == 2  # still refused
    assert main(["data", "splits", "--write", str(tmp_path), "--dataset", "DTD", "--overwrite"]) == 0
    assert "replaced" in capsys.readouterr().out
    assert split.read_bytes() == packaged_bytes("split_zhou_DescribableTextures.json")
    assert main(["data", "splits", "--write", str(tmp_path), "--dataset", "DTD"]) == 0
    assert "identical file already there" in capsys.readouterr().out
    assert [w.status for w in write_split_files(tmp_path, ["DTD"])] == ["unchanged"]


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "splits", "--write", str(tmp_path)]) == 2  # no dataset folder at all
    assert "name the datasets with --dataset" in capsys.readouterr().err
    assert main(["data", "splits", "--write", str(tmp_path), "--dataset", "Food101"]) == 2
    assert "no packaged split file for Food101" in capsys.readouterr().err
    assert main(["data", "splits", "--write", str(tmp_path / "nowhere"), "--dataset", "DTD"]) == 2
    assert main(["data", "splits"]) == 0
    assert "EuroSAT" in capsys.readouterr().out


def test_check_suggests_the_command_and_notes_a_changed_split(tmp_path, capsys):
    (tmp_path / "caltech-101" / "101_ObjectCategories").mkdir(parents=True)
    assert main(["data", "check", str(tmp_path), "--dataset", "Caltech101"]) == 1
    out = capsys.readouterr().out
    assert f"`promptkd data splits --write {tmp_path} --dataset Caltech101` writes it" in out
    assert main(["data", "splits", "--write", str(tmp_path)]) == 0
    split = tmp_path / "caltech-101" / "split_zhou_Caltech101.json"
    data = json.loads(split.read_text())
    data["test"] = data["test"][:-1]
    split.write_text(json.dumps(data))
    main(["data", "check", str(tmp_path), "--dataset", "Caltech101"])
    assert f"{split} differs from CoOp's split file packaged with promptkd" in capsys.readouterr().out


def test_no_note_when_the_split_is_the_packaged_one_in_other_formatting(tmp_path, capsys):
    folder = tmp_path / get_spec("UCF101").folder
    folder.mkdir()
    (folder / "split_zhou_UCF101.json").write_text(json.dumps(packaged_split("UCF101")))  # compact, same content
    main(["data", "check", str(tmp_path), "--dataset", "UCF101"])
    assert "differs" not in capsys.readouterr().out


def test_pyproject_ships_the_split_files_in_the_wheel(tmp_path):
    source = tmp_path / "source"  # a copy: building leaves build/ and *.egg-info beside the sources
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(source)], capture_output=True, text=True)
    if built.returncode != 0 and "No module named" in built.stderr:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip().splitlines()[-1]}")
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("promptkd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for asset in SHA256:
        assert f"promptkd/data/assets/splits/{asset}.gz" in names, asset
    assert "promptkd/data/assets/splits/README.md" in names
