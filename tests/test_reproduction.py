"""Exact reproduction of the authors' runs: their few-shot images, one seed -> one run, every selection rule.

* The teacher's shots on the real Flowers102 split equal an independent re-implementation of Dassl's
  sampler (``random.seed(seed)``; per label in order of first appearance, ``random.sample``; over ALL
  classes, then CoOp keeps the base half), through the same stage the CLI calls.
* Two CLI runs with the same ``--seed`` give bitwise-identical artefacts; another seed differs.
* ``val`` and ``paper`` selection keep the epoch whose student scores best on the images they name,
  checked against ``promptkd evaluate`` on the artefact they keep (another code path).
"""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from promptkd.cli import main


def dassl_few_shot(items: list, num_shots: int) -> list:
    """Dassl's DatasetBase.generate_fewshot_dataset for one data source (written here from its description)."""
    by_label: dict[int, list] = {}
    for item in items:
        by_label.setdefault(item[1], []).append(item)
    out = []
    for group in by_label.values():
        out.extend(random.sample(group, num_shots) if len(group) >= num_shots else group)
    return out


def _cli(argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def tiny_clips(tmp_path_factory):
    from promptkd.models.clip import tiny_clip
    from promptkd.models.weights import save_clip

    root = tmp_path_factory.mktemp("clips")
    save_clip(tiny_clip(seed=1, width=48, layers=2, image_size=32, patch_size=8), root / "teacher.safetensors")
    save_clip(tiny_clip(seed=2, width=32, layers=2, image_size=32, patch_size=8), root / "student.safetensors")
    return root


def test_teacher_shots_are_the_authors_images_on_the_real_flowers_split(tmp_path, tiny_clips):
    from promptkd.data.fixtures import layout_placeholders
    from promptkd.data.split_files import packaged_split
    from promptkd.stages import TeacherConfig, train_teacher

    layout_placeholders(tmp_path / "data", "Flowers102")  # the packaged real split; empty files: nothing decoded
    raw = packaged_split("Flowers102")
    labels = [item[1] for item in raw["train"]]
    assert labels != sorted(labels)  # the train list is not sorted by label: the draw order matters here
    n_base = math.ceil(102 / 2)
    image_dir = tmp_path / "data" / "oxford_flowers" / "jpg"
    for seed in (1, 2, 3):
        random.seed(seed)
        train = dassl_few_shot(raw["train"], 16)
        dassl_few_shot(raw["val"], min(16, 4))  # CoOp draws val from the same stream, after train
        expected = [str(image_dir / item[0]) for item in train if item[1] < n_base]  # subsample_classes: base
        run = train_teacher(TeacherConfig(
            dataset="Flowers102", data_root=tmp_path / "data", clip_weights=tiny_clips / "teacher.safetensors",
            out=tmp_path / f"teacher{seed}", seed=seed, quiet=True,
            overrides={"train.max_steps": 0, "train.device": "cpu", "train.num_workers": 0,
                       "method.templates": "single", "teacher.text_depth": 1, "teacher.vision_depth": 1}))
        assert not run.completed and len(run.class_names) == n_base
        assert run.shots == expected, f"seed {seed}: the shots differ from Dassl's"
    assert (tmp_path / "teacher1" / "few_shot").is_dir()


@pytest.fixture(scope="module")
def dtd(tmp_path_factory):
    from promptkd.data.fixtures import make_fixture

    root = tmp_path_factory.mktemp("repro")
    make_fixture(root / "data", "DTD", classes=4, per_class=4, val_per_class=2, test_per_class=2, size=(36, 36))
    return root


FAST = ["--set", "train.epochs=2", "--set", "train.batch_size=4", "--set", "train.precision=fp32",
        "--set", "train.num_workers=0", "--set", "train.device=cpu"]
TEACHER_FAST = [*FAST, "--set", "data.shots=2", "--set", "teacher.text_depth=1", "--set", "teacher.vision_depth=2",
                "--set", "method.templates=single", "--set", "method.gpa_mean=1"]


def _teacher(dtd, tiny_clips, out: Path, seed: int) -> None:
    assert _cli(["train-teacher", "--data-root", dtd / "data", "--dataset", "DTD", "--clip-weights",
                 tiny_clips / "teacher.safetensors", "--out", out, "--seed", seed, *TEACHER_FAST]) == 0


def _tensors(folder: Path) -> dict:
    return load_file(str(folder / "adapter.safetensors"))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.filterwarnings("ignore:.*fewer than .* images:UserWarning")
def test_the_same_seed_gives_the_same_run_and_another_seed_another(dtd, tiny_clips):
    runs = dtd / "seeds"
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        torch.manual_seed(1000 + ord(name))  # whatever the global RNG holds must not matter
        _teacher(dtd, tiny_clips, runs / name / "teacher", seed)
    assert _equal(_tensors(runs / "a" / "teacher"), _tensors(runs / "b" / "teacher"))
    assert not _equal(_tensors(runs / "a" / "teacher"), _tensors(runs / "c" / "teacher"))

    assert _cli(["class-vectors", "--teacher", runs / "a" / "teacher", "--dataset", "DTD", "--data-root",
                 dtd / "data", "--out", runs / "cv.safetensors", "--device", "cpu"]) == 0
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        torch.manual_seed(2000 + ord(name))
        assert _cli(["distill", "--config", "distill/base2novel/dtd", "--data-root", dtd / "data", "--teacher",
                     runs / "a" / "teacher", "--class-vectors", runs / "cv.safetensors", "--student-weights",
                     tiny_clips / "student.safetensors", "--out", runs / name / "student", "--seed", seed, *FAST,
                     "--set", "student.depth=1"]) == 0
    a, b, c = (_tensors(runs / n / "student") for n in "abc")
    assert _equal(a, b) and not _equal(a, c)
    projector = [k for k in a if k.startswith("projector.")]
    assert projector and not all(torch.equal(a[k], c[k]) for k in projector)  # the projector's init is seeded too


def _summary_scores(out: Path) -> list[float]:
    with open(out / "summary.csv") as f:
        return [float(row["select_score"]) for row in csv.DictReader(f)]


@pytest.mark.filterwarnings("ignore:.*fewer than .* images:UserWarning")
@pytest.mark.parametrize("rule,protocol,label", [
    ("val", "base2novel", "best_val (labelled validation images)"),
    ("paper", "base2novel", "best_base_test (paper; uses test labels)"),
    ("paper", "cross_dataset", "best_target_test (paper; uses test labels)"),
])
def test_val_and_paper_selection_keep_the_best_epoch_on_their_images(dtd, tiny_clips, rule, protocol, label):
    runs = dtd / f"select_{rule}_{protocol}"
    teacher = dtd / "seeds" / "a" / "teacher"
    if not (teacher / "adapter.json").is_file():
        _teacher(dtd, tiny_clips, teacher, 1)
    vectors = runs / "cv.safetensors"
    assert _cli(["class-vectors", "--teacher", teacher, "--dataset", "DTD", "--data-root", dtd / "data",
                 "--out", vectors, "--device", "cpu"]) == 0
    preset = "distill/base2novel/dtd" if protocol == "base2novel" else "distill/cross_dataset/dtd"
    out = runs / "student"
    assert _cli(["distill", "--config", preset, "--data-root", dtd / "data", "--teacher", teacher,
                 "--class-vectors", vectors, "--student-weights", tiny_clips / "student.safetensors", "--out", out,
                 *FAST, "--set", "train.epochs=3", "--set", "train.lr=0.05", "--set", "student.depth=1",
                 "--set", f"method.selection={rule}", "--set", "data.val_shots=0"]) == 0
    meta = json.loads((out / "adapter.json").read_text())
    scores = _summary_scores(out)
    assert meta["selection"]["selection"] == label
    assert meta["selection"]["selected_epoch"] == scores.index(max(scores)) + 1
    # the kept student, evaluated by `promptkd evaluate` on the same images, scores what selection recorded
    if rule == "paper":
        evaluated = runs / "eval"
        assert _cli(["evaluate", "--model", "student", "--artefact", out, "--data-root", dtd / "data", "--dataset",
                     "DTD", "--protocol", protocol, "--out", evaluated, "--device", "cpu", "--workers", 0]) == 0
        metrics = json.loads((evaluated / "results.json").read_text())["metrics"]
        got = metrics["base"] if protocol == "base2novel" else metrics["accuracy"]
        assert got == pytest.approx(max(scores), abs=1e-6)
        assert json.loads((evaluated / "results.json").read_text())["selection"] == label
    else:  # val: base-class validation images over the base class vectors, scored by hand
        from promptkd.data.benchmarks import load_benchmark
        from promptkd.serve import load_student, predict

        bench = load_benchmark(dtd / "data", "DTD")
        base = [s for s in bench.val if s.label < 2]
        student = load_student(out)
        student.store = student.store.subset([0, 1])
        preds = predict(student, [s.path for s in base], top_k=1)
        hits = sum(p.top[0][1] == bench.classnames[s.label] for p, s in zip(preds, base))
        assert 100.0 * hits / len(base) == pytest.approx(max(scores), abs=1e-6)
    shutil.rmtree(runs)


def test_val_selection_is_refused_where_no_validation_split_exists(tmp_path, tiny_clips):
    from promptkd.data.fixtures import make_fixture
    from promptkd.stages.distillation import distill_settings, plan_data
    from promptkd.store import ClassVectorStore

    make_fixture(tmp_path / "data", "ImageNet", classes=4)
    from promptkd.data.benchmarks import load_benchmark

    names = load_benchmark(tmp_path / "data", "ImageNet").classnames
    store = ClassVectorStore(torch.nn.functional.normalize(torch.randn(4, 8), dim=-1), names, 100.0)
    settings = distill_settings("distill/base2novel/imagenet", ["method.selection=val"])
    with pytest.raises(ValueError, match="ImageNet has no validation split apart from its test split"):
        plan_data(settings, tmp_path / "data", store)
