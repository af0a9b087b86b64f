"""The teacher cache (promptkd.methods.teacher_cache): equivalence with the online teacher, fp16 bound,
cached distillation = online distillation, identity refusals, kill -9 + resume.

Tiny random CLIP pair (tests/test_distill_module.py) on a fixture DTD (promptkd.data.fixtures) read
through the real stream: UnlabelledImages + TrainAugment, augmentation a function of (seed, epoch, index).

Tolerances.
* fp32 cache, 1e-6: built with the run's batch size (4 here; the build pads a shard's short last
  batch), the cached logits equal the online teacher's in the loop's shuffled batches bit for bit
  (measured 0). A batched forward's rows round differently with the batch SIZE (not its contents): a
  build with batch 2 gives logits up to 1.4e-6 (1.5 ulp at s_T = 14.3) off the online run's at batch 4,
  which is why the build follows the run's batch size by default.
* fp16 cache: a unit-norm feature f stored in fp16 becomes f + e with |e_i| <= u |f_i| + 2^-25
  (round to nearest, u = 2^-11; 2^-25 is half the smallest subnormal step bound, for tiny components),
  so ||e|| <= u ||f|| + sqrt(D) 2^-25, and for a unit class vector w the logit error is
  |s (f + e) . w - s f . w| <= s ||e|| (Cauchy-Schwarz) <= s (2^-11 + sqrt(D) 2^-25) = 6.98e-3 here
  (s = 14.29, D = 48), plus 1e-6 of float32 rounding in the comparison. For CLIP ViT-L/14 (s = 100, D = 768)
  the same bound is 0.049.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from promptkd import artifacts  # noqa: E402
from promptkd.data.fixtures import make_fixture  # noqa: E402
from promptkd.data.loader import UnlabelledImages, make_loader  # noqa: E402
from promptkd.data.transforms import Preprocess, TrainAugment  # noqa: E402
from promptkd.engine.loop import LoopConfig, fit  # noqa: E402
from promptkd.methods import teacher_cache as tc  # noqa: E402
from promptkd.methods.promptkd import DistillModule, agreement_selector  # noqa: E402
from promptkd.store import build_store  # noqa: E402
from test_distill_module import IMAGE, TinyStudent, TinyTeacher  # noqa: E402

EPOCHS = 3
SEED = 5


def trained_teacher():
    """A tiny teacher whose prompts differ from their initialisation (as an artefact's would)."""
    teacher = TinyTeacher()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        teacher.text_prompts.ctx.add_(0.5 * torch.randn(teacher.text_prompts.ctx.shape, generator=g))
        teacher.vision_prompts.ctx.add_(0.5 * torch.randn(teacher.vision_prompts.ctx.shape, generator=g))
    return teacher.requires_grad_(False).eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Fixture images, teacher, store, a stream + held-out split, and the exact fp32 cache of 3 epochs."""
    root = tmp_path_factory.mktemp("teacher_cache")
    fx = make_fixture(root / "data", "DTD", classes=4, per_class=5)
    paths = [s.path for s in fx.splits["train"]]
    teacher = trained_teacher()
    # class vectors spread around the teacher's image features, so its predictions vary across images
    with torch.no_grad():
        protos = teacher.encode_image(torch.stack([Preprocess(IMAGE)(fx_image) for fx_image in _images(paths[::5])]))
    from promptkd.store import ClassVectorStore

    vectors = torch.nn.functional.normalize(protos - protos.mean(0), dim=-1)
    store = ClassVectorStore(vectors, fx.classnames, float(teacher.logit_scale()))
    train_paths = [p for i, p in enumerate(paths) if i % 5 != 4]  # 16 images, 4 per class
    train = UnlabelledImages(train_paths, TrainAugment(IMAGE), seed=SEED)
    held = UnlabelledImages(paths[4::5], Preprocess(IMAGE))  # one per class
    ident = {"class_vectors": store.fingerprint(), "dataset": "dtd transductive"}
    cache = tc.build_teacher_cache(teacher, train, root / "exact32", epochs=EPOCHS, dtype="fp32", identity=ident,
                                   heldout=held, batch_size=4, heldout_batch_size=3, shard_size=6, progress=False)
    return {"root": root, "fx": fx, "paths": train_paths, "teacher": teacher, "store": store, "train": train,
            "held": held, "ident": ident, "cache": cache}


def _images(paths):
    from promptkd.data.loader import read_image

    return [read_image(p) for p in paths]


def online_module(w, student_seed=1, **kw):
    torch.manual_seed(0)  # the projector's initialisation draws from the global RNG
    return DistillModule(w["teacher"], TinyStudent(seed=student_seed), w["store"], **kw)


def cached_module(w, cache, student_seed=1, **kw):
    torch.manual_seed(0)
    return DistillModule(None, TinyStudent(seed=student_seed), w["store"], teacher_logit_scale=cache.logit_scale, **kw)


# -- equivalence --------------------------------------------------------------------------------------


def test_exact_fp32_cache_gives_the_online_teacher_logits_for_every_epoch_and_index(world):
    w, cache = world, world["cache"]
    module = online_module(w)
    assert cache.num_views == EPOCHS and cache.num_images == 16 and cache.num_shards == 3
    seen = set()
    worst = 0.0
    for epoch in range(EPOCHS):  # the batches a distill run draws (shuffled, batch 4), through the online teacher
        loader = make_loader(w["train"], 4, shuffle=True, seed=SEED)
        loader.set_epoch(epoch)
        for batch in loader:
            online = module.teacher_logits(batch["image"])
            feats = torch.stack([torch.from_numpy(cache.features(epoch, int(i))) for i in batch["index"]])
            worst = max(worst, float((online - module.cached_teacher_logits(feats)).abs().max()))
            seen.update((epoch, int(i)) for i in batch["index"])
    assert seen == {(e, i) for e in range(EPOCHS) for i in range(16)}
    assert worst <= 1e-6 and worst == 0.0, worst  # bit-equal: same arithmetic, same batch size
    # the held-out features are the online selector's: fp32 teacher on test-preprocessed images
    for batch in make_loader(w["held"], 3):
        with torch.no_grad():
            want = torch.nn.functional.normalize(w["teacher"].encode_image(batch["image"]).float(), dim=-1)
        assert torch.equal(cache.heldout_features()[batch["index"]], want)


def test_fp16_cache_stays_within_the_derived_bound(world, tmp_path):
    w = world
    half = tc.build_teacher_cache(w["teacher"], w["train"], tmp_path / "half", epochs=EPOCHS, identity=w["ident"],
                                  batch_size=4, shard_size=6, progress=False)
    assert half.dtype == "fp16" and half.identity["dtype"] == "fp16"
    u, dim, scale = 2.0**-11, half.dim, half.logit_scale
    bound = scale * (u + math.sqrt(dim) * 2.0**-25) + 1e-6
    module = online_module(w)
    worst = 0.0
    for epoch in range(EPOCHS):
        exact = w["cache"].view_features(epoch)
        stored = half.view_features(epoch)
        assert stored.dtype == torch.float16
        # storage is round-to-nearest fp16 of the exact features, element by element
        assert ((stored.float() - exact).abs() <= u * exact.abs() + 2.0**-25).all()
        diff = module.cached_teacher_logits(stored) - module.cached_teacher_logits(exact)
        worst = max(worst, float(diff.abs().max()))
    assert 0 < worst <= bound, (worst, bound)  # > 0: the comparison does see the fp16 rounding


def test_k_view_cache_replays_the_first_k_epochs_views(world, tmp_path):
    w = world
    k2 = tc.build_teacher_cache(w["teacher"], w["train"], tmp_path / "k2", epochs=EPOCHS, views=2, dtype="fp32",
                                identity=w["ident"], batch_size=4, shard_size=6, progress=False)
    assert k2.views == 2 and [k2.view_for_epoch(e) for e in range(5)] == [0, 1, 0, 1, 0]
    spec = tc.cache_image_spec(tmp_path / "k2")  # the teacher's spec, for a run that does not load it
    assert (spec.size, spec.mean, spec.std) == (IMAGE, w["teacher"].image_spec.mean, w["teacher"].image_spec.std)
    for view in range(2):  # the K views are the exact cache's first K views, bit for bit
        for shard in range(k2.num_shards):
            name = tc.shard_name(view, shard)
            assert (tmp_path / "k2" / name).read_bytes() == (w["root"] / "exact32" / name).read_bytes()
    assert not (tmp_path / "k2" / tc.shard_name(2, 0)).exists()
    stream = tc.CachedTeacherImages(w["train"], k2)
    sample = stream[(2, 7)]  # epoch 2 replays epoch 0's augmentation, for the student's image too
    assert torch.equal(sample["image"], w["train"][(0, 7)]["image"])
    assert not torch.equal(sample["image"], w["train"][(2, 7)]["image"])
    assert torch.equal(sample["teacher_features"], w["cache"].view_features(0)[7])
    with pytest.raises(ValueError, match="holds views for 3 epoch"):
        w["cache"].view_for_epoch(3)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_cached_distill_run_ends_with_the_online_student_also_through_resume_and_agreement(world, tmp_path):
    """Online: teacher in the loop. Cached: no teacher at all, interrupted mid-epoch and resumed. Both
    select by agreement on the held-out images (cached: the stored held-out features)."""
    w, cache = world, world["cache"]
    cfg = LoopConfig(epochs=EPOCHS, batch_size=4, lr=0.05, warmup_epochs=0, num_workers=0, seed=SEED,
                     precision="fp32", log_every=1)
    held_loader = make_loader(w["held"], 3)
    kd = {"kd_weight": 1.0, "weighting": "batchmean"}
    online = online_module(w, selection="agreement", select_fn=agreement_selector(held_loader), **kd)
    got_online = fit(online, w["train"], cfg, tmp_path / "online")

    stream = tc.CachedTeacherImages(w["train"], cache)
    def cached():
        return cached_module(w, cache, selection="agreement",
                             select_fn=agreement_selector(held_loader, cache.heldout_features()), **kd)
    first = cached()
    fit(first, stream, LoopConfig(**{**cfg.as_dict(), "max_steps": 6}), tmp_path / "cached")  # stops in epoch 2
    assert first.teacher is None
    resumed = cached()
    got_cached = fit(resumed, stream, cfg, tmp_path / "cached")

    assert got_cached["global_step"] == got_online["global_step"] == EPOCHS * 4
    scores = [r["select_score"] for r in got_cached["history"]]
    assert scores == [r["select_score"] for r in got_online["history"]] and max(scores) > 0
    assert [r["agreement"] for r in got_cached["history"]] == pytest.approx(
        [r["agreement"] for r in got_online["history"]])
    assert resumed.best_epoch == online.best_epoch
    start = TinyStudent(seed=1).adapter_state_dict()
    final_online, final_cached = online.student.adapter_state_dict(), resumed.student.adapter_state_dict()
    assert _max_diff(final_online, start) > 1e-3  # training moved the student
    assert _max_diff(final_online, final_cached) <= 1e-5  # (measured: 0, the same arithmetic throughout)


@pytest.mark.parametrize("selection", ["paper", "val"])
def test_labelled_selection_rules_and_a_k_view_run_need_no_teacher(world, tmp_path, selection):
    w = world
    k1 = tc.build_teacher_cache(w["teacher"], w["train"], tmp_path / "k1", epochs=EPOCHS, views=1,
                                identity=w["ident"], batch_size=8, progress=False)
    labelled = [{"image": torch.stack([w["held"][i]["image"] for i in range(4)]), "label": torch.tensor([0, 1, 0, 1])}]
    from promptkd.methods.promptkd import labelled_accuracy_selector

    module = cached_module(w, k1, selection=selection, select_fn=labelled_accuracy_selector(labelled, rows=[0, 1]))
    # two DataLoader workers: each opens the cache's memory maps itself
    cfg = LoopConfig(epochs=2, batch_size=4, lr=0.05, warmup_epochs=0, num_workers=2, seed=SEED, precision="fp32")
    out = fit(module, tc.CachedTeacherImages(w["train"], k1), cfg, tmp_path / "run")
    assert out["completed"] and len(out["history"]) == 2 and "select_score" in out["history"][0]
    with pytest.raises(ValueError, match="teacher_logit_scale"):
        DistillModule(None, TinyStudent(), w["store"])
    with pytest.raises(ValueError, match="must carry 'teacher_features'"):
        module({"image": torch.zeros(2, 3, IMAGE, IMAGE)})


# -- identity -----------------------------------------------------------------------------------------


def expected_for(w, **changes):
    base = tc.cache_identity(teacher=tc.teacher_checksum_of(w["teacher"]), class_vectors=w["store"].fingerprint(),
                             dataset="dtd transductive", train_set=w["train"], heldout_set=w["held"], epochs=EPOCHS,
                             views="epochs", dtype="fp32")
    return {**base, **changes}


@pytest.mark.parametrize("field,value", [
    ("teacher", "0" * 64), ("class_vectors", "0123456789abcdef"), ("dataset", "dtd inductive"),
    ("images", "f" * 64), ("heldout_images", None), ("heldout_preprocess", {"kind": "Preprocess", "size": 64}),
    ("augmentation", {"kind": "TrainAugment", "size": 64}), ("seed", SEED + 1), ("views", 2), ("epochs", EPOCHS + 1),
    ("dtype", "fp16"),
])
def test_a_cache_whose_identity_differs_is_refused_naming_the_field(world, field, value):
    path = world["cache"].path
    assert tc.open_teacher_cache(path, expected_for(world)).num_views == EPOCHS  # the true identity opens
    with pytest.raises(ValueError, match=rf"built for another run: {field} \("):
        tc.open_teacher_cache(path, expected_for(world, **{field: value}))


def test_identity_follows_what_changes_the_numbers(world, tmp_path):
    w = world
    base = expected_for(w)
    # another teacher (other prompts), other class vectors, other seed, other images, another epoch count
    other_teacher = TinyTeacher()
    assert tc.teacher_checksum_of(other_teacher) != base["teacher"]
    assert build_store(other_teacher, w["fx"].classnames).fingerprint() != base["class_vectors"]
    reseeded = UnlabelledImages(w["paths"][:16], TrainAugment(IMAGE), seed=SEED + 1)
    assert expected_for(w, **{"seed": reseeded.seed})["seed"] != base["seed"]
    fewer = tc.cache_identity(teacher="t", class_vectors="c", dataset="d", train_set=UnlabelledImages(
        w["paths"][:15], TrainAugment(IMAGE), seed=SEED), epochs=EPOCHS)
    assert fewer["images"] != base["images"]
    flipless = tc.cache_identity(teacher="t", class_vectors="c", dataset="d", train_set=UnlabelledImages(
        w["paths"][:16], TrainAugment(IMAGE, hflip=0.0), seed=SEED), epochs=EPOCHS)
    assert flipless["augmentation"] != base["augmentation"]
    # the same images in a moved data folder keep the image-list hash
    moved = [str(tmp_path / "elsewhere" / os.path.relpath(p, w["fx"].root)) for p in w["paths"][:16]]
    assert tc.path_list_sha256(moved) == base["images"]
    # an exact cache serves shorter runs, not longer ones; views/dtype None accept any
    assert tc.identity_differences(w["cache"].identity, {**base, "epochs": EPOCHS - 1, "views": None,
                                                         "dtype": None}) == []
    with pytest.raises(ValueError, match="unknown teacher-cache identity field"):
        tc.identity_differences(w["cache"].identity, {"colour": 1})


def test_teacher_checksum_from_the_artefact_alone_equals_the_loaded_teachers(world, tmp_path):
    from promptkd.methods.teacher_io import load_teacher

    teacher = TinyTeacher()
    with torch.no_grad():
        teacher.vision_prompts.ctx.mul_(1.5)
    artifacts.save_adapter(teacher, tmp_path / "teacher", "teacher", class_names=world["fx"].classnames)
    loaded, _ = load_teacher(tmp_path / "teacher")
    from_files = tc.teacher_checksum_of_artefact(tmp_path / "teacher")
    assert from_files == tc.teacher_checksum_of(loaded) == tc.teacher_checksum_of(teacher)
    assert tc.teacher_checksum_for(tmp_path / "teacher") == from_files
    assert from_files != tc.teacher_checksum_of(TinyTeacher())


def test_build_refuses_to_overwrite_and_to_resume_other_settings(world, tmp_path):
    w = world
    out = tmp_path / "c"
    tc.build_teacher_cache(w["teacher"], w["train"], out, epochs=1, identity=w["ident"], progress=False)
    with pytest.raises(ValueError, match="holds a teacher cache already; pass --resume"):
        tc.build_teacher_cache(w["teacher"], w["train"], out, epochs=1, identity=w["ident"], progress=False)
    with pytest.raises(ValueError, match="cannot resume.*dtype"):
        tc.build_teacher_cache(w["teacher"], w["train"], out, epochs=1, dtype="fp32", identity=w["ident"],
                               resume=True, progress=False)
    again = tc.build_teacher_cache(w["teacher"], w["train"], out, epochs=1, identity=w["ident"], resume=True,
                                   progress=False)
    assert again.num_views == 1
    (out / "manifest.json").write_text('{"format": "promptkd.teacher_cache.v1", "complete": false}')
    with pytest.raises(ValueError, match="incomplete"):
        tc.open_teacher_cache(out)
    with pytest.raises(ValueError, match="seed 9 differs"):
        tc.build_teacher_cache(w["teacher"], w["train"], tmp_path / "d", epochs=1, seed=9, identity=w["ident"])
    with pytest.raises(ValueError, match="views must be between 1 and epochs"):
        tc.build_teacher_cache(w["teacher"], w["train"], tmp_path / "d", epochs=2, views=3, identity=w["ident"])


# -- kill -9 and resume -------------------------------------------------------------------------------

BUILD_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from promptkd.data.loader import UnlabelledImages
from promptkd.data.transforms import TrainAugment
from promptkd.methods import teacher_cache as tc
from test_teacher_cache import trained_teacher, IMAGE
paths = {paths!r}
teacher = trained_teacher()
if {slow}:
    encode = teacher.encode_image
    def slow(*a, **k):
        time.sleep(0.25)
        return encode(*a, **k)
    teacher.encode_image = slow
train = UnlabelledImages(paths, TrainAugment(IMAGE), seed=7)
tc.build_teacher_cache(teacher, train, {out!r}, epochs=4, identity={{"class_vectors": "cv", "dataset": "d"}},
                       batch_size=3, shard_size=5, resume={resume}, progress=False)
"""


def _build(w, out, slow, resume):
    script = BUILD_SCRIPT.format(tests=str(Path(__file__).resolve().parent), paths=w["paths"][:16], out=str(out),
                                 slow=slow, resume=resume)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_build_killed_mid_way_resumes_to_the_same_files(world, tmp_path):
    whole = _build(world, tmp_path / "whole", slow=False, resume=False)
    killed = _build(world, tmp_path / "killed", slow=True, resume=False)
    deadline = time.time() + 120
    while len(list((tmp_path / "killed").glob("v*.npy"))) < 3:  # 16 shards in all (4 views x 4 shards)
        assert killed.poll() is None and time.time() < deadline, killed.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    done_before = len(list((tmp_path / "killed").glob("v*.npy")))
    assert 3 <= done_before < 16
    with pytest.raises(ValueError, match="incomplete"):
        tc.open_teacher_cache(tmp_path / "killed")
    resumed = _build(world, tmp_path / "killed", slow=False, resume=True)
    for proc in (whole, resumed):
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err.decode()[-3000:]
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "killed").iterdir())  # no stray temporaries
    assert len([n for n in names if n.startswith("v")]) == 16
    for name in names:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "killed" / name).read_bytes(), name
    cache = tc.open_teacher_cache(tmp_path / "killed")
    assert np.isfinite(cache.view_features(3).numpy()).all()
