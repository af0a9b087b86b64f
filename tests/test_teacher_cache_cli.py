"""`promptkd teacher-cache` end to end on a fixture dataset, and the distill-stage integration it serves.

The teacher goes through a real artefact, the student through a real CLIP weights file (as in
tests/test_distill_cli.py). ``distill_from_cache`` below is the integration the distill stage makes for
``--teacher-cache PATH`` (the teacher is never loaded), built from ``promptkd.stages.distillation``'s
own pieces; its student must equal the one `promptkd distill` trains with the online teacher.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from promptkd import artifacts  # noqa: E402
from promptkd.cli import main, teacher_cache_cmd  # noqa: E402
from promptkd.data.fixtures import make_fixture, make_unlabelled_folder  # noqa: E402
from promptkd.data.loader import make_loader  # noqa: E402
from promptkd.engine.loop import LoopConfig, fit  # noqa: E402
from promptkd.methods import teacher_cache as tc  # noqa: E402
from promptkd.methods.promptkd import DistillModule, agreement_selector  # noqa: E402
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


def distill_from_cache(cache_dir, teacher_dir, cv_path, student_weights, data_root, overrides, seed, out):
    """What the distill stage does with --teacher-cache: settings and stream as for an online run, the
    expected identity, the cache, a DistillModule without teacher, agreement from the cached held-out
    features, engine.loop.fit on the cached stream."""
    settings = stage.distill_settings("distill/base2novel/dtd", [*overrides, f"train.seed={seed}"])
    store = ClassVectorStore.load(cv_path)
    torch.manual_seed(seed)  # the projector's initialisation, as the stage seeds it
    student = stage.build_student(settings["student"], student_weights, store.dim, tc.cache_image_spec(cache_dir),
                                  seed=seed)
    train_set, heldout, _ = teacher_cache_cmd.build_stream(settings, data_root, store, student.image_spec)
    expected = tc.cache_identity(
        teacher=tc.teacher_checksum_for(teacher_dir), class_vectors=store.fingerprint(),
        dataset=tc.stream_name(settings), train_set=train_set, heldout_set=heldout,
        epochs=settings["train"]["epochs"], views=None, dtype=None)
    cache = tc.open_teacher_cache(cache_dir, expected)
    m = settings["method"]
    select_fn = None
    if m["selection"] == "agreement":
        select_fn = agreement_selector(make_loader(heldout, 64), teacher_features=cache.heldout_features())
    module = DistillModule(None, student, store, temperature=m["temperature"], kd_weight=m["kd_weight"],
                           weighting=m["weighting"], selection=m["selection"], select_fn=select_fn,
                           selection_label=stage.selection_label(m["selection"], settings["protocol"]),
                           teacher_logit_scale=cache.logit_scale)
    result = fit(module, tc.CachedTeacherImages(train_set, cache), LoopConfig(**settings["train"]), out)
    return student, result


def test_cache_from_the_cli_trains_the_same_student_as_promptkd_distill(setup, capsys):
    tmp_path, _, common = setup
    agreement = ["--set", "method.selection=agreement", "--set", "data.holdout=0.25"]
    cache_dir = tmp_path / "cache"
    assert main(["teacher-cache", *common, *agreement, "--seed", "2", "--dtype", "fp32", "--out", str(cache_dir),
                 "--shard-size", "5"]) == 0
    err = capsys.readouterr().err
    assert "teacher-cache: DTD transductive: 12 images x 2 view(s) + 4 held out, fp32" in err and "done in" in err
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["complete"] and manifest["layout"]["num_shards"] == 3 and manifest["layout"]["heldout_images"] == 4
    assert manifest["identity"]["dataset"] == "dtd transductive" and manifest["identity"]["views"] == "epochs"

    overrides = [*RUN[1::2], *agreement[1::2]]  # the --set values
    online = tmp_path / "online"
    assert main(["distill", *common, *agreement, "--seed", "2", "--student-weights",
                 str(tmp_path / "student_clip.safetensors"), "--out", str(online)]) == 0
    paths = (tmp_path / "teacher", tmp_path / "cv.safetensors", str(tmp_path / "student_clip.safetensors"),
             str(tmp_path / "data"), overrides, 2)
    student, result = distill_from_cache(cache_dir, *paths, tmp_path / "cached")
    assert result["completed"]
    saved = load_file(str(online / artifacts.TENSORS))  # distill's artefact (the selected epoch)
    got = student.adapter_state_dict()
    assert saved.keys() == got.keys()
    assert max(float((saved[k].float() - got[k].float()).abs().max()) for k in saved) <= 1e-5  # measured: 0
    epochs = [json.loads(line) for line in (online / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["type"] == "epoch"]
    assert [r["select_score"] for r in result["history"]] == [r["select_score"] for r in epochs]
    assert [r["loss"] for r in result["history"]] == pytest.approx([r["loss"] for r in epochs], rel=1e-6)

    # the same cache refuses a run with another seed (images, seed) or stream (dataset), naming the field
    with pytest.raises(ValueError, match=r"built for another run: .*seed \(cache 2, run 3\)"):
        distill_from_cache(cache_dir, tmp_path / "teacher", tmp_path / "cv.safetensors",
                           str(tmp_path / "student_clip.safetensors"), str(tmp_path / "data"), overrides, 3,
                           tmp_path / "x")
    with pytest.raises(ValueError, match=r"dataset \(cache \"dtd transductive\", run \"dtd inductive\"\)"):
        distill_from_cache(cache_dir, tmp_path / "teacher", tmp_path / "cv.safetensors",
                           str(tmp_path / "student_clip.safetensors"), str(tmp_path / "data"),
                           [*overrides, "data.unlabelled=inductive"], 2, tmp_path / "x")


def test_folder_and_inductive_streams_k_views_and_resume_from_the_cli(setup, capsys):
    tmp_path, fx, common = setup
    make_unlabelled_folder(tmp_path / "mine", count=7)
    folder = ["--set", "data.unlabelled=folder", "--set", f"data.folder={tmp_path / 'mine'}"]
    out = tmp_path / "folder_cache"
    assert main(["teacher-cache", *common, *folder, "--views", "1", "--out", str(out)]) == 0
    settings = stage.distill_settings("distill/base2novel/dtd", [*RUN[1::2], *folder[1::2], "train.seed=1"])
    store = ClassVectorStore.load(tmp_path / "cv.safetensors")
    train_set, heldout, info = teacher_cache_cmd.build_stream(settings, str(tmp_path / "data"), store,
                                                              ImageSpec(size=IMAGE))
    assert info["name"] == "folder" and heldout is None and len(train_set) == 7
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
    assert "--views must be 'epochs' or a positive number of views" in capsys.readouterr().err
    assert main(["teacher-cache", *common, "--views", "3", "--out", str(tmp_path / "z")]) == 2
    assert "views must be between 1 and epochs (2)" in capsys.readouterr().err
