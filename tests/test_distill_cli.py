"""`promptkd distill`: presets, the run folder and artefact, resume, and clear errors.

End to end on a fixture dataset with helper A's tiny random CLIP pair: the teacher goes through a real
teacher artefact (save_adapter -> load_adapter), the student through a real CLIP weights file.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from promptkd import artifacts, config  # noqa: E402
from promptkd.cli import main  # noqa: E402
from promptkd.data.fixtures import make_fixture  # noqa: E402
from promptkd.models.clip import tiny_clip  # noqa: E402
from promptkd.models.weights import save_clip  # noqa: E402
from promptkd.stages import distillation as distill_stage  # noqa: E402
from promptkd.store import build_store  # noqa: E402
from test_distill_module import IMAGE, TinyTeacher  # noqa: E402

B2N = ["imagenet", "caltech101", "oxfordpets", "stanfordcars", "flowers102", "food101", "fgvcaircraft",
       "sun397", "dtd", "eurosat", "ucf101"]


def test_every_preset_resolves_with_the_papers_settings():
    names = [n for n in config.preset_names() if n.startswith("distill/") and n != "distill/custom"]  # own data
    assert len(names) == 11 + 10 + 4
    for name in names:
        cfg = distill_stage.distill_settings(name)
        protocol, dataset = name.split("/")[1:]
        assert cfg["protocol"] == protocol and cfg["data"]["dataset"].lower() == dataset
        assert cfg["data"]["unlabelled"] == "transductive" and cfg["method"]["selection"] == "last"
        assert cfg["student"]["n_ctx"] == 4 and cfg["method"]["temperature"] == 1.0
        assert cfg["student"]["depth"] == (9 if protocol == "base2novel" else 3)
        assert (cfg["train"]["epochs"], cfg["train"]["batch_size"], cfg["train"]["lr"]) == (20, 8, 0.005)
        low = protocol == "base2novel" and dataset in ("fgvcaircraft", "flowers102", "dtd")
        assert cfg["method"]["kd_weight"] == (200.0 if low else 1000.0), name
    assert sorted(n.split("/")[-1] for n in names if "/base2novel/" in n) == sorted(B2N)


def test_bad_configs_are_refused_with_the_reason():
    settings = distill_stage.distill_settings
    with pytest.raises(ValueError, match="selection=paper reads a labelled dataset"):
        settings("distill/custom", ["method.selection=paper", "data.unlabelled=folder", "data.folder=x"])
    with pytest.raises(ValueError, match="data.unlabelled=folder needs data.folder"):
        settings("distill/base2novel/dtd", ["data.unlabelled=folder"])
    with pytest.raises(ValueError, match="unknown key 'method.kd_wieght' \\(did you mean 'method.kd_weight'\\?\\)"):
        settings("distill/base2novel/dtd", ["method.kd_wieght=3"])


@pytest.fixture
def setup(tmp_path):
    fx = make_fixture(tmp_path / "data", "DTD", classes=4, per_class=4, test_per_class=2)
    teacher = TinyTeacher()
    with torch.no_grad():
        # "trained" prompts, which the artefact must carry (a constant shift would vanish in LayerNorm)
        teacher.text_prompts.ctx.add_(0.5 * torch.randn(teacher.text_prompts.ctx.shape, generator=torch.Generator().manual_seed(3)))
    artifacts.save_adapter(teacher, tmp_path / "teacher", "teacher", class_names=fx.classnames)
    build_store(teacher, fx.classnames).save(tmp_path / "cv.safetensors")
    save_clip(tiny_clip(seed=1, width=32, layers=2, image_size=IMAGE), tmp_path / "student_clip.safetensors")
    base = ["distill", "--config", "distill/base2novel/dtd", "--data-root", str(tmp_path / "data"),
            "--teacher", str(tmp_path / "teacher"), "--class-vectors", str(tmp_path / "cv.safetensors"),
            "--student-weights", str(tmp_path / "student_clip.safetensors"), "--set", "student.depth=2",
            "--set", "train.epochs=2", "--set", "train.batch_size=4", "--set", "train.num_workers=0",
            "--set", "train.precision=fp32", "--set", "train.lr=0.01"]
    return tmp_path, fx, base


def test_distill_run_writes_config_logs_and_a_student_artefact(setup, capsys):
    tmp_path, fx, base = setup
    out = tmp_path / "student"
    assert main([*base, "--out", str(out), "--seed", "2", "--set", "method.selection=agreement",
                 "--set", "data.holdout=0.25"]) == 0
    saved = config.load_yaml(out / "config.yaml")
    assert saved["train"]["seed"] == 2 and saved["method"]["kd_weight"] == 200.0
    run = json.loads((out / "run.json").read_text())
    assert run["unlabelled"] == {"source": "DTD transductive", "images": 12, "held_out": 4}
    rows = (out / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and "select_score" in rows[0] and "agreement" in rows[0]
    student, meta = artifacts.load_adapter(out, role="student")
    assert meta["backbone"]["prompts"]["vision_depth"] == 2 and meta["backbone"]["teacher_dim"] == 48
    assert meta["selection"]["selection"].startswith("best_teacher_agreement")
    assert meta["selection"]["selected_epoch"] in (1, 2) and meta["protocol"] == "base2novel"
    assert meta["class_names"] == fx.classnames and (out / artifacts.STORE).is_file()
    err = capsys.readouterr().err
    assert "distill: DTD transductive: 12 unlabelled images (+4 held out)" in err
    assert f"kept the epoch-{meta['selection']['selected_epoch']} student (best_teacher_agreement" in err
    with pytest.raises(SystemExit):  # a finished run is never replaced silently
        sys.exit(main([*base, "--out", str(out)]))
    assert "holds a finished run (adapter.json); pass --overwrite" in capsys.readouterr().err


def test_paper_selection_is_labelled_and_interrupted_runs_resume(setup):
    tmp_path, _, base = setup
    out = tmp_path / "paper"
    args = [*base, "--out", str(out), "--set", "method.selection=paper"]
    assert main([*args, "--set", "train.max_steps=3"]) == 0
    assert not (out / artifacts.META).exists()  # interrupted: no artefact yet
    assert main([*args, "--set", "train.max_steps=3", "--resume"]) == 0  # max_steps may change on resume...
    assert main([*args, "--resume"]) == 0
    meta = json.loads((out / artifacts.META).read_text())
    assert meta["selection"]["selection"] == "best_base_test (paper; uses test labels)"
    assert main([*args, "--resume", "--set", "method.kd_weight=5"]) == 2  # ...the method may not


def test_class_vectors_from_another_teacher_are_refused(setup, capsys):
    tmp_path, fx, base = setup
    other = TinyTeacher()  # same backbone and identity, other prompts: only the re-encoding check sees it
    build_store(other, fx.classnames).save(tmp_path / "cv.safetensors")
    assert main([*base, "--out", str(tmp_path / "x")]) == 2
    assert "computed by another teacher (re-encoding" in capsys.readouterr().err
    wider = TinyTeacher(seed=5)  # other frozen weights: the identity differs
    build_store(wider, fx.classnames).save(tmp_path / "cv.safetensors")
    assert main([*base, "--out", str(tmp_path / "x")]) == 2
    assert "identity differs in ['random_init_seed', 'sha256']" in capsys.readouterr().err


def test_unlabelled_streams_transductive_inductive_folder_and_holdout(tmp_path):
    from promptkd.data.fixtures import make_unlabelled_folder
    from promptkd.models.backbones import ImageSpec
    from promptkd.store import ClassVectorStore

    fx = make_fixture(tmp_path / "data", "DTD", classes=4, per_class=4)
    store = ClassVectorStore(torch.nn.functional.normalize(torch.randn(4, 8), dim=-1), fx.classnames, 100.0)
    spec = ImageSpec(size=IMAGE)

    def stream(*overrides):
        cfg = distill_stage.distill_settings("distill/base2novel/dtd", list(overrides))
        return distill_stage.build_training_data(cfg, str(tmp_path / "data"), store, spec)

    data, select_fn, info = stream()
    assert info == {"source": "DTD transductive", "images": 16, "held_out": 0} and select_fn is None
    assert set(data[0]) == {"image", "index"} and tuple(data[0]["image"].shape) == (3, IMAGE, IMAGE)
    train_paths = {s.path for s in fx.splits["train"]}
    assert set(data.paths) == train_paths  # every train image of every class, nothing from test/val

    data, _, info = stream("data.unlabelled=inductive")
    assert info["images"] == 8 and set(data.paths) == {s.path for s in fx.splits["train"] if s.label < 2}

    data, select_fn, info = stream("method.selection=agreement", "data.holdout=0.25")
    assert info["images"] == 12 and info["held_out"] == 4 and select_fn is not None
    assert set(data.paths) < train_paths  # the held-out quarter is not trained on

    folder = make_unlabelled_folder(tmp_path / "mine", count=5)
    data, _, info = stream("data.unlabelled=folder", f"data.folder={tmp_path / 'mine'}")
    assert info["images"] == 5 and sorted(data.paths) == sorted(folder)
    with pytest.raises(FileNotFoundError, match=r"data.folder=unlabeled: no such folder \(/.*/unlabeled\)"):
        stream("data.unlabelled=folder", "data.folder=unlabeled")  # the key, what was given, where it looked

    other = ClassVectorStore(store.vectors, [*fx.classnames[:3], "zebra"], 100.0)
    with pytest.raises(ValueError, match="class vectors do not match the DTD dataset's classes"):
        distill_stage.build_training_data(distill_stage.distill_settings("distill/base2novel/dtd"),
                                          str(tmp_path / "data"), other, spec)
