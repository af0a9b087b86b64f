"""`promptkd evaluate` on fixture datasets with a tiny CLIP: CLI results equal a hand-written loop."""

from __future__ import annotations

import json

import pytest
import torch

from promptkd.artifacts import save_adapter
from promptkd.cli import main
from promptkd.data.benchmarks import load_benchmark
from promptkd.data.fixtures import make_fixture
from promptkd.data.loader import read_image
from promptkd.data.transforms import Preprocess
from promptkd.models.clip import tiny_clip
from promptkd.models.clip_backbones import load_clip_student, load_clip_teacher
from promptkd.models.prompts import PromptConfig
from promptkd.models.weights import save_clip
from promptkd.store import ClassVectorStore, build_store

# the ImageNet-A fixture holds 4 of the 200 class folders on purpose
pytestmark = pytest.mark.filterwarnings("ignore:.*class folders present:UserWarning")

STUDENT_PROMPTS = PromptConfig(n_ctx_text=0, text_depth=0, ctx_init=None, n_ctx_vision=2, vision_depth=1)
TEACHER_PROMPTS = PromptConfig(n_ctx_text=2, text_depth=1, n_ctx_vision=2, vision_depth=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    make_fixture(root / "data", "Caltech101", classes=5, per_class=2, test_per_class=3)
    make_fixture(root / "data", "ImageNetA", classes=4, test_per_class=3)
    weights = save_clip(tiny_clip(seed=1, width=32, layers=1, image_size=32, patch_size=8), root / "clip.safetensors")
    teacher = load_clip_teacher(weights, TEACHER_PROMPTS, prompt_seed=0)
    save_adapter(teacher, root / "teacher", "teacher")
    student = load_clip_student(weights, teacher.embed_dim, STUDENT_PROMPTS, prompt_seed=0)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.normal_(0, 0.5)
    bench = load_benchmark(root / "data", "Caltech101")
    save_adapter(student.eval(), root / "student", "student", store=build_store(teacher, bench.classnames))
    return root, weights, student


def _features(model, samples):
    pre = Preprocess(32)
    with torch.no_grad():
        return model(torch.stack([pre(read_image(s.path)) for s in samples]))


def _acc(feats, labels, vectors):
    pred = (torch.nn.functional.normalize(feats, dim=-1) @ vectors.t()).argmax(-1)
    return 100.0 * (pred == labels).double().mean().item()


def test_student_base_to_novel_equals_hand_loop(setup):
    root, _, student = setup
    out = root / "runs" / "b2n" / "seed1" / "student"
    assert main(["evaluate", "--model", "student", "--artefact", str(root / "student"), "--data-root",
                 str(root / "data"), "--dataset", "Caltech101", "--protocol", "base2novel", "--seed", "1",
                 "--out", str(out), "--workers", "0", "--device", "cpu"]) == 0
    res = json.loads((out / "results.json").read_text())
    bench = load_benchmark(root / "data", "Caltech101")
    store = ClassVectorStore.load(root / "student" / "class_vectors.safetensors")
    feats = _features(student, bench.test)
    labels = torch.tensor([s.label for s in bench.test])
    base, novel = [0, 1, 2], [3, 4]  # ceil(5/2) = 3 base classes
    mb, mn = labels < 3, labels >= 3
    b = _acc(feats[mb], labels[mb], store.vectors[base])
    n = _acc(feats[mn], labels[mn] - 3, store.vectors[novel])
    assert res["metrics"]["base"] == pytest.approx(b, abs=1e-3)
    assert res["metrics"]["novel"] == pytest.approx(n, abs=1e-3)
    assert res["metrics"]["hm"] == pytest.approx(0 if b + n == 0 else 2 * b * n / (b + n), abs=1e-3)
    assert res["num_images"] == {"base": 9, "novel": 6} and res["model"] == "student"
    assert (out / "per_class.csv").read_text().count("\n") == 6 and (out / "results.md").is_file()


def test_zeroshot_and_teacher_write_results(setup):
    root, weights, _ = setup
    for model, source in (("zeroshot", ["--clip-weights", str(weights)]), ("teacher", ["--artefact", str(root / "teacher")])):
        out = root / "runs" / model
        assert main(["evaluate", "--model", model, *source, "--data-root", str(root / "data"), "--dataset",
                     "Caltech101", "--protocol", "cross_dataset", "--seed", "2", "--out", str(out), "--workers", "0",
                     "--device", "cpu"]) == 0
        res = json.loads((out / "results.json").read_text())
        assert res["protocol"] == "cross_dataset" and res["seed"] == 2 and res["model"] == model
        assert 0.0 <= res["metrics"]["accuracy"] <= 100.0 and res["num_images"] == {"all": 15}
    assert json.loads((root / "runs" / "zeroshot" / "results.json").read_text())["selection"] == "none"


def test_imagenet_subset_against_a_larger_store(setup, tmp_path):
    """ImageNet-A: a student whose store holds more classes, in another order; logits over the subset only."""
    root, _, student = setup
    bench = load_benchmark(root / "data", "ImageNetA")
    names = ["zebra", bench.classnames[2], "tench", bench.classnames[0], bench.classnames[3], "goldfish",
             bench.classnames[1]]
    torch.manual_seed(5)
    store = ClassVectorStore(torch.nn.functional.normalize(torch.randn(len(names), student.embed_dim), dim=-1), names, 100.0)
    folder = save_adapter(student, tmp_path / "student_in", "student", store=store)
    out = tmp_path / "dg"
    assert main(["evaluate", "--model", "student", "--artefact", str(folder), "--data-root", str(root / "data"),
                 "--dataset", "ImageNet-A", "--protocol", "domain_generalization", "--out", str(out),
                 "--workers", "0", "--device", "cpu"]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = [names.index(c) for c in bench.classnames]
    feats = _features(student, bench.test)
    labels = torch.tensor([s.label for s in bench.test])
    assert res["metrics"]["accuracy"] == pytest.approx(_acc(feats, labels, store.vectors[rows]), abs=1e-3)
    assert res["dataset"] == "ImageNetA" and res["num_classes"] == {"all": 4}


def test_bad_combinations_are_clear(setup, capsys):
    root, weights, _ = setup
    base = ["--data-root", str(root / "data"), "--out", str(root / "bad"), "--workers", "0"]
    assert main(["evaluate", "--model", "student", "--artefact", str(root / "student"), "--dataset", "ImageNetA",
                 "--protocol", "base2novel", *base]) == 2
    assert "evaluation-only" in capsys.readouterr().err
    assert main(["evaluate", "--model", "zeroshot", "--dataset", "Caltech101", "--protocol", "base2novel", *base]) == 2
    assert "--clip-weights" in capsys.readouterr().err
    assert main(["evaluate", "--model", "teacher", "--artefact", str(root / "student"), "--dataset", "Caltech101",
                 "--protocol", "base2novel", *base]) == 2
    assert "not a teacher" in capsys.readouterr().err
    assert main(["evaluate", "--model", "student", "--artefact", str(root / "student"), "--dataset", "Caltech101",
                 "--protocol", "domain_generalization", *base]) == 2
    assert "domain generalisation targets" in capsys.readouterr().err


def test_unreadable_test_image_stops_with_its_name(setup, tmp_path, capsys):
    import shutil

    root, _, _ = setup
    shutil.copytree(root / "data" / "caltech-101", tmp_path / "data" / "caltech-101")
    bench = load_benchmark(tmp_path / "data", "Caltech101")
    victim = bench.test[4].path
    with open(victim, "wb") as f:
        f.write(b"\xff\xd8 not a jpeg")
    assert main(["evaluate", "--model", "student", "--artefact", str(root / "student"), "--data-root",
                 str(tmp_path / "data"), "--dataset", "Caltech101", "--protocol", "base2novel", "--out",
                 str(tmp_path / "out"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert victim in err and "Traceback" not in err
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("native", [False, True])
def test_precision_auto_checks_bf16_on_the_test_images(setup, monkeypatch, capsys, native):
    from promptkd import precision as prec

    root, _, _ = setup
    monkeypatch.setattr(prec, "native_bf16", lambda device="cpu", cpuinfo=None: (native, "faked for the test"))
    monkeypatch.setattr(prec, "MIN_CHECK_IMAGES", 8)  # the fixture has 15 test images (the real rule: 32)
    out = root / "runs" / f"auto_{native}"
    assert main(["evaluate", "--model", "student", "--artefact", str(root / "student"), "--data-root",
                 str(root / "data"), "--dataset", "Caltech101", "--protocol", "base2novel", "--out", str(out),
                 "--device", "cpu", "--workers", "0"]) == 0  # --precision auto is the default
    err = capsys.readouterr().err
    if native:  # the check ran on the 15 test images and reported its agreement
        assert "evaluate: auto -> " in err and "agreement with fp32" in err
    else:
        assert "evaluate: auto -> fp32: faked for the test" in err
    fp32 = root / "runs" / f"fp32_{native}"
    assert main(["evaluate", "--model", "student", "--artefact", str(root / "student"), "--data-root",
                 str(root / "data"), "--dataset", "Caltech101", "--protocol", "base2novel", "--out", str(fp32),
                 "--device", "cpu", "--workers", "0", "--precision", "fp32"]) == 0
    got, want = (json.loads((d / "results.json").read_text())["metrics"] for d in (out, fp32))
    if not native or "auto -> fp32" in err:
        assert got == want
    else:
        assert abs(got["hm"] - want["hm"]) <= 100 / 15 * 2  # at most a couple of images may change
