"""Zero-shot class vectors against a float64 computation of the template-averaging formula."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch import nn

from promptkd.methods import templates as tmpl
from promptkd.methods.zeroshot import zeroshot_class_vectors, zeroshot_store
from promptkd.models.backbones import Teacher
from promptkd.store import ClassVectorStore

HASH_DIM, EMBED_DIM = 24, 16


def _hashed(text: str) -> np.ndarray:
    """A deterministic float64 vector per text, whose norm also depends on the text's length."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(HASH_DIM) * (1 + len(text) / 10)


class FakeTeacher(Teacher):
    """Random linear towers: text = hashed text vector @ W, image = flattened image @ V."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.text_tower = nn.Linear(HASH_DIM, EMBED_DIM, bias=False)
        self.image_tower = nn.Linear(3 * 4 * 4, EMBED_DIM, bias=False)
        self.requires_grad_(False)
        self.embed_dim = EMBED_DIM
        self.seen: list[str] = []

    def encode_text(self, texts):
        self.seen.extend(texts)
        assert not self.training, "the frozen text tower must run in eval mode"
        x = torch.tensor(np.stack([_hashed(t) for t in texts]), dtype=torch.float32)
        return self.text_tower(x)

    def encode_image(self, images, prompted=True):
        return self.image_tower(images.flatten(1))

    def logit_scale(self):
        return torch.tensor(100.0)

    def identity(self):
        return {"kind": "fake", "arch": "linear"}

    def text_features64(self, texts) -> np.ndarray:
        w = self.text_tower.weight.detach().double().numpy()
        return np.stack([_hashed(t) for t in texts]) @ w.T


def _reference(teacher: FakeTeacher, names, templates) -> np.ndarray:
    """float64: normalise each template's features, average over templates, renormalise."""
    acc = np.zeros((len(names), EMBED_DIM))
    for t in templates:
        f = teacher.text_features64([t.replace("{}", n.replace("_", " ").strip()) for n in names])
        acc += f / np.linalg.norm(f, axis=1, keepdims=True)
    acc /= len(templates)
    return acc / np.linalg.norm(acc, axis=1, keepdims=True)


NAMES = ["golden_retriever", "tabby cat", "Airbus A320", "banded", "apple_pie"]


def test_ensemble_matches_float64_formula():
    teacher = FakeTeacher()
    templates = list(tmpl.PROMPTSRC_TEMPLATES[:5]) + ["{} texture."]
    got = zeroshot_class_vectors(teacher, NAMES, templates)
    assert got.shape == (len(NAMES), EMBED_DIM) and got.dtype == torch.float32 and got.device.type == "cpu"
    ref = _reference(teacher, NAMES, templates)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-6)
    # the test can tell the formulas apart: averaging raw features first gives other vectors
    raw = sum(teacher.text_features64([t.replace("{}", n.replace("_", " ")) for n in NAMES]) for t in templates)
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    assert np.abs(raw - ref).max() > 1e-3


def test_single_template_is_the_normalised_text_feature_and_names_are_cleaned():
    teacher = FakeTeacher()
    got = zeroshot_class_vectors(teacher, NAMES, ["a photo of a {}, a type of pet."])
    assert teacher.seen[0] == "a photo of a golden retriever, a type of pet."
    f = teacher.text_features64(teacher.seen)
    np.testing.assert_allclose(got.numpy(), f / np.linalg.norm(f, axis=1, keepdims=True), atol=1e-6)
    default = zeroshot_class_vectors(FakeTeacher(), NAMES)
    np.testing.assert_allclose(default.numpy(), _reference(teacher, NAMES, ["a photo of a {}."]), atol=1e-6)


def test_batching_and_mode_restoration():
    teacher = FakeTeacher().train()
    templates = ["a photo of a {}.", "art of the {}."]
    a = zeroshot_class_vectors(teacher, NAMES, templates, batch_size=2)
    assert teacher.training  # restored after the frozen pass
    b = zeroshot_class_vectors(teacher, NAMES, templates, batch_size=256)
    assert torch.allclose(a, b, atol=1e-7)


def test_store_round_trip_and_logits(tmp_path):
    teacher = FakeTeacher()
    store = zeroshot_store(teacher, NAMES, tmpl.template_set("coop", "DTD"))
    assert isinstance(store, ClassVectorStore)
    assert store.class_names == NAMES and store.logit_scale == 100.0
    assert store.teacher["kind"] == "fake"
    assert store.teacher["class_vectors"] == {"source": "zeroshot", "templates": ["{} texture."]}
    loaded = ClassVectorStore.load(store.save(tmp_path / "zs.safetensors"), expect_classes=NAMES)
    assert torch.equal(loaded.vectors, store.vectors) and loaded.teacher == store.teacher
    images = torch.randn(3, 3, 4, 4)
    feats = teacher.encode_image(images, prompted=False).double().numpy()
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    ref_logits = 100.0 * feats @ _reference(teacher, NAMES, ["{} texture."]).T
    np.testing.assert_allclose(loaded.logits(teacher.encode_image(images)).numpy(), ref_logits, atol=1e-4)


def test_bad_inputs():
    teacher = FakeTeacher()
    with pytest.raises(ValueError, match="exactly one"):
        zeroshot_class_vectors(teacher, NAMES, ["no placeholder"])
    with pytest.raises(ValueError, match="empty"):
        zeroshot_class_vectors(teacher, NAMES, [])
    with pytest.raises(ValueError, match="at least one class"):
        zeroshot_class_vectors(teacher, [], ["{}"])
    with pytest.raises(ValueError, match="unknown template set"):
        tmpl.template_set("fancy")


def test_template_tables():
    assert len(tmpl.PROMPTSRC_TEMPLATES) == 60 and len(set(tmpl.PROMPTSRC_TEMPLATES)) == 60
    assert tmpl.PROMPTSRC_TEMPLATES[0] == "a photo of a {}." and tmpl.PROMPTSRC_TEMPLATES[-1] == "itap of the {}."
    assert len(tmpl.IMAGENET_TEMPLATES_SELECT) == 7
    for t in [*tmpl.PROMPTSRC_TEMPLATES, *tmpl.IMAGENET_TEMPLATES_SELECT, *tmpl.COOP_TEMPLATES.values()]:
        assert t.count("{}") == 1
    from promptkd.data.benchmarks import REGISTRY

    assert set(tmpl.COOP_TEMPLATES) == set(REGISTRY)  # every benchmark has its CoOp template
    assert tmpl.coop_template("OxfordFlowers") == "a photo of a {}, a type of flower."  # alias
    assert tmpl.coop_template("describable_textures") == "{} texture."
    assert tmpl.coop_template("Food101") == "a photo of {}, a type of food."
    assert tmpl.coop_template("my_custom_set") == tmpl.coop_template(None) == "a photo of a {}."
    assert tmpl.template_set("ensemble") == list(tmpl.PROMPTSRC_TEMPLATES)
    assert tmpl.template_set("single") == ["a photo of a {}."]
    assert tmpl.fill("a photo of a person doing {}.", "Apply_Eye_Makeup") == "a photo of a person doing Apply Eye Makeup."


def test_zeroshot_with_a_tiny_clip_teacher_and_the_real_tokenizer():
    """Integration: CLIP teacher + real tokenizer; checked against the formula on a float64 copy of the tower."""
    backbones = pytest.importorskip("promptkd.models.clip_backbones")
    import copy

    from promptkd.models.tokenizer import default_tokenizer

    teacher = backbones.tiny_clip_teacher(seed=0, width=32, layers=1)
    names = ["golden_retriever", "tabby cat", "apple pie"]
    templates = ["a photo of a {}.", "a photo of a {}, a type of pet.", "art of the {}."]
    store = zeroshot_store(teacher, names, templates)
    assert store.vectors.shape == (3, teacher.embed_dim)
    model64 = copy.deepcopy(teacher.clip).double()
    tok = default_tokenizer()
    acc = torch.zeros(3, teacher.embed_dim, dtype=torch.float64)
    with torch.no_grad():
        for t in templates:
            f = model64.encode_text(tok([t.replace("{}", n.replace("_", " ")) for n in names]))
            acc += torch.nn.functional.normalize(f, dim=-1)
    ref = torch.nn.functional.normalize(acc / len(templates), dim=-1)
    torch.testing.assert_close(store.vectors.double(), ref, atol=1e-5, rtol=0)
    assert store.logit_scale == pytest.approx(float(teacher.logit_scale()))
