"""Bad data through the real commands: one `error:` line naming the file (exit 2), also when the image is
read in a DataLoader worker; class names from a file get the dataset route's clean-up."""

from __future__ import annotations

import pytest
import torch

from promptkd.artifacts import save_adapter
from promptkd.cli import main
from promptkd.data.benchmarks import load_benchmark
from promptkd.data.fixtures import make_fixture, make_image_folder
from promptkd.models.clip import tiny_clip
from promptkd.models.clip_backbones import load_clip_student, load_clip_teacher
from promptkd.models.prompts import PromptConfig
from promptkd.models.weights import save_clip
from promptkd.store import ClassVectorStore, build_store

FAST_TEACHER = ["--set", "train.epochs=2", "--set", "train.batch_size=2", "--set", "train.precision=fp32",
                "--set", "train.device=cpu", "--set", "data.shots=2", "--set", "teacher.text_depth=1",
                "--set", "teacher.vision_depth=1", "--set", "method.gpa_mean=1",
                "--set", "method.templates=imagenet_select"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    make_fixture(root / "data", "Caltech101", classes=4, per_class=2, test_per_class=2)
    weights = save_clip(tiny_clip(seed=1, width=32, layers=1, image_size=32, patch_size=8), root / "clip.safetensors")
    teacher = load_clip_teacher(weights, PromptConfig(n_ctx_text=2, text_depth=1, n_ctx_vision=2, vision_depth=1),
                                prompt_seed=0)
    save_adapter(teacher, root / "teacher", "teacher")
    student = load_clip_student(weights, teacher.embed_dim, PromptConfig(n_ctx_text=0, text_depth=0, ctx_init=None,
                                                                         n_ctx_vision=2, vision_depth=1), prompt_seed=0)
    bench = load_benchmark(root / "data", "Caltech101")
    save_adapter(student.eval(), root / "student", "student", store=build_store(teacher, bench.classnames))
    return root, weights


def _corrupt(path: str) -> None:
    with open(path, "wb") as f:
        f.write(b"\xff\xd8 not a jpeg")


def _one_error_line(err: str, command: str, path: str) -> None:
    """Exactly one ``promptkd CMD: error: ...`` line, naming ``path``, and no traceback (a progress bar
    may precede it on the same terminal line)."""
    marker = f"promptkd {command}: error: "
    assert err.count(marker) == 1, err
    message = err.split(marker, 1)[1]
    assert message.endswith("\n") and "\n" not in message[:-1] and path in message, err
    assert "Traceback" not in err and "DataLoader worker" not in err


def test_evaluate_with_workers_reports_a_bad_image_in_one_line(world, tmp_path, capsys):
    import shutil

    root, _ = world
    shutil.copytree(root / "data" / "caltech-101", tmp_path / "data" / "caltech-101")
    victim = load_benchmark(tmp_path / "data", "Caltech101").test[3].path
    _corrupt(victim)
    rc = main(["evaluate", "--model", "student", "--artefact", str(root / "student"), "--data-root",
               str(tmp_path / "data"), "--dataset", "Caltech101", "--protocol", "base2novel", "--out",
               str(tmp_path / "out"), "--workers", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    _one_error_line(err, "evaluate", victim)
    assert f"{victim}: cannot decode image" in err


def test_training_with_on_bad_image_error_stops_with_one_line(world, tmp_path, capsys):
    import shutil

    root, weights = world
    shutil.copytree(root / "data" / "caltech-101", tmp_path / "data" / "caltech-101")
    victim = load_benchmark(tmp_path / "data", "Caltech101").train[0].path  # a base class: every image is a shot
    _corrupt(victim)
    rc = main(["train-teacher", "--data-root", str(tmp_path / "data"), "--dataset", "Caltech101", "--clip-weights",
               str(weights), "--out", str(tmp_path / "teacher"), "--seed", "1", *FAST_TEACHER,
               "--set", "data.on_bad_image=error", "--set", "train.num_workers=2"])
    err = capsys.readouterr().err
    assert rc == 2
    _one_error_line(err, "train-teacher", victim)


@pytest.mark.filterwarnings("ignore:.*fewer than .* images:UserWarning")
def test_skipped_images_of_every_epoch_are_listed_the_last_one_included(world, tmp_path):
    import shutil
    import warnings

    root, weights = world
    shutil.copytree(root / "data" / "caltech-101", tmp_path / "data" / "caltech-101")
    victim = load_benchmark(tmp_path / "data", "Caltech101").train[0].path  # a shot: read in every epoch
    _corrupt(victim)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(["train-teacher", "--data-root", str(tmp_path / "data"), "--dataset", "Caltech101",
                   "--clip-weights", str(weights), "--out", str(tmp_path / "teacher"), "--seed", "1", *FAST_TEACHER,
                   "--set", "train.num_workers=0"])
    assert rc == 0
    summaries = sorted(str(w.message).split(":")[0] for w in caught if "were replaced by the next" in str(w.message))
    assert summaries == ["epoch 1", "epoch 2"]  # 1-based as the loop prints them; epoch 2 is the last
    assert all(victim in str(w.message) for w in caught if "were replaced by the next" in str(w.message))


def test_class_names_from_a_file_are_cleaned_like_the_dataset_route(world, tmp_path):
    root, _ = world
    make_image_folder(tmp_path / "mine", classes=3, per_class=1)  # class_a, class_b, class_c
    names_file = tmp_path / "names.txt"
    names_file.write_text("\ufeff# my classes\nclass_a\n  class_b \n\nclass_c\n")  # BOM, comment, spaces
    from_dataset, from_file = tmp_path / "d.safetensors", tmp_path / "f.safetensors"
    assert main(["class-vectors", "--teacher", str(root / "teacher"), "--dataset", f"folder:{tmp_path / 'mine'}",
                 "--out", str(from_dataset), "--device", "cpu"]) == 0
    assert main(["class-vectors", "--teacher", str(root / "teacher"), "--class-names", str(names_file),
                 "--out", str(from_file), "--device", "cpu"]) == 0
    a, b = ClassVectorStore.load(from_dataset), ClassVectorStore.load(from_file)
    assert a.class_names == b.class_names == ["class a", "class b", "class c"]
    assert torch.equal(a.vectors, b.vectors)
