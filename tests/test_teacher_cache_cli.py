"""`promptkd teacher-cache` then `promptkd distill --teacher-cache` end to end on a fixture dataset.

The teacher goes through a real artefact, the student through a real CLIP weights file (as in
tests/test_distill_cli.py). The cached run (the teacher is never loaded) must train the student that
`promptkd distill` trains with the online teacher.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from promptkd import artifacts  # noqa: E402
from promptkd.cli import main  # noqa: E402
from promptkd.data.fixtures import make_fixture, make_unlabelled_folder  # noqa: E402
from promptkd.methods import teacher_cache as tc  # noqa: E402
from promptkd.models.backbones import ImageSpec  # noqa: E402
from promptkd.models.clip import tiny_clip  # noqa: E402
from promptkd.models.weights import save_clip  # noqa: E402
from promptkd.stages import distillation as stage  # noqa: E402
from promptkd.store import ClassVectorStore, build_store  # noqa: E402
from test_distill_module import IMAGE, TinyTeacher  # noqa: E402

RUN = ["--set", "student.depth=2", "--set", "train.epochs=2", "--set", "train.batch_size=4",
       "--set", "train.num_workers=0", "--set", "train.precision=fp32", "--set", "train.lr=0.01",
       "--set", "method.kd_weight=10"]


@pytest.fixture
def setup(tmp_path):
    fx = make_fixture(tmp_path / "data", "DTD", classes=4, per_class=4, test_per_class=2)
    teacher = TinyTeacher()
    with torch.no_grad():
        teacher.text_prompts.ctx.add_(0.5 * torch.randn(teacher.text_prompts.ctx.shape,
                                                        generator=torch.Generator().manual_seed(3)))
    artifacts.save_adapter(teacher, tmp_path / "teacher", "teacher", class_names=fx.classnames)
    build_store(teacher, fx.classnames).save(tmp_path / "cv.safetensors")
    save_clip(tiny_clip(seed=1, width=32, layers=2, image_size=IMAGE), tmp_path / "student_clip.safetensors")
    common = ["--config", "distill/base2novel/dtd", "--data-root", str(tmp_path / "data"),
              "--teacher", str(tmp_path / "teacher"), "--class-vectors", str(tmp_path / "cv.safetensors"), *RUN]
    return tmp_path, fx, common


def test_cache_from_the_cli_trains_the_same_student_as_promptkd_distill(setup, capsys):
    tmp_path, _, common = setup
    agreement = ["--set", "method.selection=agreement", "--set", "data.holdout=0.25"]
    cache_dir = tmp_path / "cache"
    assert main(["teacher-cache", *common, *agreement, "--seed", "2", "--dtype", "fp32", "--out", str(cache_dir),
                 "--shard-size", "5"]) == 0
    err = capsys.readouterr().err
    assert "teacher-cache: DTD transductive: 12 images x 2 view(s) + 4 held out, fp32" in err and "done in" in err
    assert "teacher-cache: done, 24/24 view in " in err and "\r" not in err  # plain progress lines in a log
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["complete"] and manifest["layout"]["num_shards"] == 3 and manifest["layout"]["heldout_images"] == 4
    assert manifest["identity"]["dataset"] == "dtd transductive" and manifest["identity"]["views"] == "epochs"

    online, cached = tmp_path / "online", tmp_path / "cached"
    student = ["--student-weights", str(tmp_path / "student_clip.safetensors")]
    assert main(["distill", *common, *agreement, "--seed", "2", *student, "--out", str(online)]) == 0
    assert main(["distill", *common, *agreement, "--seed", "2", *student, "--out", str(cached),
                 "--teacher-cache", str(cache_dir)]) == 0
    saved = load_file(str(online / artifacts.TENSORS))  # distill's artefact (the selected epoch)
    got = load_file(str(cached / artifacts.TENSORS))
    assert saved.keys() == got.keys()
    assert max(float((saved[k].float() - got[k].float()).abs().max()) for k in saved) <= 1e-5  # measured: 0

    def epochs(run):
        return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["type"] == "epoch"]

    assert [r["select_score"] for r in epochs(cached)] == [r["select_score"] for r in epochs(online)]
    assert [r["loss"] for r in epochs(cached)] == pytest.approx([r["loss"] for r in epochs(online)], rel=1e-6)
    meta = json.loads((cached / artifacts.META).read_text())
    assert meta["unlabelled"]["teacher_cache"]["dtype"] == "fp32"

    # the same cache refuses a run with another seed (images, seed) or stream (dataset), naming the field
    capsys.readouterr()
    assert main(["distill", *common, *agreement, "--seed", "3", *student, "--out", str(tmp_path / "x"),
                 "--teacher-cache", str(cache_dir)]) == 2
    assert "seed (cache 2, run 3)" in capsys.readouterr().err
    assert main(["distill", *common, *agreement, "--seed", "2", *student, "--out", str(tmp_path / "y"),
                 "--set", "data.unlabelled=inductive", "--teacher-cache", str(cache_dir)]) == 2
    assert 'dataset (cache "dtd transductive", run "dtd inductive")' in capsys.readouterr().err


def test_folder_and_inductive_streams_k_views_and_resume_from_the_cli(setup, capsys):
    tmp_path, fx, common = setup
    make_unlabelled_folder(tmp_path / "mine", count=7)
    folder = ["--set", "data.unlabelled=folder", "--set", f"data.folder={tmp_path / 'mine'}"]
    out = tmp_path / "folder_cache"
    assert main(["teacher-cache", *common, *folder, "--views", "1", "--out", str(out)]) == 0
    settings = stage.distill_settings("distill/base2novel/dtd", [*RUN[1::2], *folder[1::2], "train.seed=1"])
    store = ClassVectorStore.load(tmp_path / "cv.safetensors")
    plan = stage.plan_data(settings, str(tmp_path / "data"), store)
    train_set = stage.training_stream(settings, plan, ImageSpec(size=IMAGE))
    assert tc.stream_name(settings) == "folder" and not plan.held_out and len(train_set) == 7
    expected = tc.cache_identity(teacher=tc.teacher_checksum_of_artefact(tmp_path / "teacher"),
                                 class_vectors=store.fingerprint(), dataset="folder", train_set=train_set, epochs=2,
                                 views=1, dtype="fp16")
    cache = tc.open_teacher_cache(out, expected)
    assert cache.num_views == 1 and cache.view_features(0).dtype == torch.float16

    inductive = tmp_path / "inductive_cache"
    assert main(["teacher-cache", *common, "--set", "data.unlabelled=inductive", "--out", str(inductive)]) == 0
    assert tc.open_teacher_cache(inductive).num_images == 8  # the base classes' train images
    capsys.readouterr()
    assert main(["teacher-cache", *common, "--set", "data.unlabelled=inductive", "--out", str(inductive)]) == 2
    assert "holds a teacher cache already; pass --resume" in capsys.readouterr().err
    assert main(["teacher-cache", *common, "--set", "data.unlabelled=inductive", "--out", str(inductive),
                 "--resume"]) == 0  # complete already: nothing to do
    assert main(["teacher-cache", *common, "--out", str(inductive), "--resume"]) == 2  # another stream
    assert "cannot resume" in capsys.readouterr().err
    assert main(["teacher-cache", *common, "--views", "0", "--out", str(tmp_path / "z")]) == 2
    assert "views must be 'epochs' or a positive number of views" in capsys.readouterr().err
    assert main(["teacher-cache", *common, "--views", "3", "--out", str(tmp_path / "z")]) == 2
    assert "views must be between 1 and epochs (2)" in capsys.readouterr().err
