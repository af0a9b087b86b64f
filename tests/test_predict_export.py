"""Predict / export with a saved student: top-k, ONNX (checker + onnxruntime vs PyTorch), bundle round trip.

A toy student (conv trunk + prompt + projector, registered as backbone kind ``toy``) keeps these
tests independent of CLIP; tests/test_e2e_cli.py and the CLIP test below run the real ClipStudent.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from promptkd.artifacts import save_adapter
from promptkd.cli import main
from promptkd.models.backbones import ImageSpec, Student, register_builder
from promptkd.serve import export_onnx, load_bundle, load_student, predict
from promptkd.store import ClassVectorStore

SPEC = ImageSpec(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


class ToyStudent(Student):
    """Frozen conv trunk (weights from the identity's seed) + learnt prompt bias + learnt projector."""

    image_spec = SPEC

    def __init__(self, seed: int = 0, width: int = 8, embed_dim: int = 6):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.trunk = nn.Sequential(nn.Conv2d(3, width, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        with torch.no_grad():
            for p in self.trunk.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
                p.requires_grad_(False)
        self.prompt = nn.Parameter(torch.zeros(width))
        self.projector = nn.Sequential(nn.Linear(width, embed_dim), nn.BatchNorm1d(embed_dim))
        self.embed_dim = embed_dim
        self.seed = seed

    def forward(self, images):
        return self.projector(self.trunk(images) + self.prompt)

    def logit_scale(self):
        return torch.tensor(100.0)

    def identity(self):
        return {"kind": "toy", "seed": self.seed}


def _build_toy(identity, weights=None, state_dict=None, **_):
    return ToyStudent(int(identity["seed"]))


register_builder("toy", "student", _build_toy)

CLASSES = ["red thing", "green thing", "blue thing", "grey thing"]


@pytest.fixture
def student_dir(tmp_path):
    torch.manual_seed(0)
    s = ToyStudent(seed=3)
    with torch.no_grad():
        s.prompt.normal_()
        s.projector[1].running_mean.normal_()  # a trained BN state must survive the round trip
    s.eval()
    store = ClassVectorStore(torch.nn.functional.normalize(torch.randn(4, 6), dim=-1), CLASSES, 100.0, {"kind": "toy-t"})
    return save_adapter(s, tmp_path / "student", "student", store=store), s, store


def _images(tmp_path, n=3):
    from PIL import Image

    paths = []
    rng = np.random.default_rng(0)
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_load_student_restores_learnt_tensors(student_dir):
    folder, s, store = student_dir
    loaded = load_student(folder)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.student(x), s(x))
    assert loaded.store.class_names == CLASSES and loaded.store.fingerprint() == store.fingerprint()


def test_changed_store_is_refused(student_dir):
    folder, _, store = student_dir
    ClassVectorStore(store.vectors.flip(0), CLASSES, 100.0).save(folder / "class_vectors.safetensors")
    with pytest.raises(ValueError, match="differ from the ones the student was distilled with"):
        load_student(folder)


def test_predict_topk_matches_manual_softmax(student_dir, tmp_path):
    pytest.importorskip("promptkd.data.transforms")
    from promptkd.data.loader import read_image
    from promptkd.serve import preprocess_for

    folder, s, store = student_dir
    paths = _images(tmp_path)
    preds = predict(load_student(folder), paths, top_k=3, batch_size=2)
    x = torch.stack([preprocess_for(SPEC)(read_image(p)) for p in paths])
    with torch.no_grad():
        f = torch.nn.functional.normalize(s(x), dim=-1)
    probs = (100.0 * f @ store.vectors.t()).softmax(-1)
    for pred, row in zip(preds, probs):
        order = row.argsort(descending=True)[:3].tolist()
        assert [i for i, _, _ in pred.top] == order
        assert [n for _, n, _ in pred.top] == [CLASSES[i] for i in order]
        np.testing.assert_allclose([p for _, _, p in pred.top], row[order].numpy(), rtol=1e-5)


def test_predict_cli_json_and_text(student_dir, tmp_path, capsys):
    pytest.importorskip("promptkd.data.transforms")
    folder, _, _ = student_dir
    paths = _images(tmp_path, 2)
    assert main(["predict", *paths, "--student", str(folder), "--top-k", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["path"] for d in data] == paths and all(len(d["predictions"]) == 2 for d in data)
    assert all(d["predictions"][0]["probability"] >= d["predictions"][1]["probability"] for d in data)
    assert main(["predict", str(tmp_path), "--student", str(folder), "--top-k", "1", "--json"]) == 0  # a folder
    assert sorted(d["path"] for d in json.loads(capsys.readouterr().out)) == sorted(paths)
    assert main(["predict", paths[0], "--student", str(folder), "--top-k", "9"]) == 0  # k clipped to 4 classes
    out = capsys.readouterr().out.splitlines()
    assert out[0] == paths[0] and len(out) == 5 and out[1].lstrip().startswith("1. ")
    assert main(["predict", str(tmp_path / "missing.png"), "--student", str(folder)]) == 1  # listed, exit 1
    assert "missing.png: file not found" in capsys.readouterr().err


def test_onnx_export_matches_pytorch(student_dir, tmp_path):
    onnx = pytest.importorskip("onnx")
    folder, _, _ = student_dir
    loaded = load_student(folder)
    for output in ("probabilities", "logits"):
        path = export_onnx(loaded, tmp_path / f"s_{output}.onnx", output=output)
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        props = {p.key: p.value for p in model.metadata_props}
        assert json.loads(props["promptkd.class_names"]) == CLASSES
        ort = pytest.importorskip("onnxruntime")
        x = torch.randn(5, 3, 32, 32)  # batch 5 while exported with batch 1: the batch axis is dynamic
        with torch.no_grad():
            expected = loaded.classifier(output)(x).numpy()
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"images": x.numpy()})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        if output == "probabilities":
            np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)


def test_bundle_round_trip_without_original_weights(student_dir, tmp_path, monkeypatch):
    folder, s, store = student_dir
    assert main(["export", "--student", str(folder), "--format", "safetensors", "--out", str(tmp_path / "b.safetensors")]) == 0
    loaded = load_bundle(tmp_path / "b.safetensors")
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(loaded.student(x), s(x))
    assert loaded.store.class_names == CLASSES
    torch.testing.assert_close(loaded.store.vectors, store.vectors)
    assert loaded.meta["role"] == "student"
    # every weight comes from the file: a builder giving different frozen weights changes nothing
    from promptkd.models import backbones

    monkeypatch.setitem(backbones._BUILDERS, ("toy", "student"), lambda identity, **_: ToyStudent(seed=99))
    torch.testing.assert_close(load_student(tmp_path / "b.safetensors").student(x), s(x))


def test_bad_inputs_are_named(tmp_path):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bogus.safetensors"):
        load_bundle(bogus)
    with pytest.raises(FileNotFoundError, match="student not found"):
        load_student(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter.json"):
        load_student(tmp_path / "empty")


def test_unreadable_image_is_named(student_dir, tmp_path, capsys):
    pytest.importorskip("promptkd.data.transforms")
    folder, _, _ = student_dir
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    assert main(["predict", str(bad), "--student", str(folder)]) == 1  # listed with the reason, exit 1
    assert "broken.jpg: cannot decode image" in capsys.readouterr().err


# --- the real CLIP student: prediction never builds a text tower nor loads the tokenizer ----------------

_NO_TEXT_SCRIPT = r"""
import importlib.abc, json, sys
class BlockTokenizer(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "promptkd.models.tokenizer":
            raise ImportError("the tokenizer must not be imported at prediction time")
        return None
sys.meta_path.insert(0, BlockTokenizer())
from promptkd.models import clip as clip_module
built = []
original = clip_module.CLIP.__init__
def guarded(self, cfg):
    if cfg.text is not None:
        raise AssertionError("a CLIP text tower was constructed at prediction time")
    built.append(cfg)
    original(self, cfg)
clip_module.CLIP.__init__ = guarded
from promptkd.cli import main
from promptkd.serve import load_student
argv = json.loads(sys.argv[1])
code = main(argv)
loaded = load_student(argv[argv.index("--student") + 1])
names = [n for n, _ in loaded.student.named_parameters()]
assert names and all(n.startswith(("clip.visual.", "clip.logit_scale", "vision_prompts.", "projector.")) for n in names), names
assert "promptkd.models.tokenizer" not in sys.modules
print(json.dumps({"code": code, "built": len(built)}))
"""


@pytest.fixture
def clip_student_dir(tmp_path):
    from promptkd.models.clip import tiny_clip
    from promptkd.models.clip_backbones import load_clip_student
    from promptkd.models.prompts import PromptConfig
    from promptkd.models.weights import save_clip

    torch.manual_seed(0)
    weights = save_clip(tiny_clip(seed=1, width=32, layers=1, image_size=32, patch_size=8), tmp_path / "clip.safetensors")
    prompts = PromptConfig(n_ctx_text=0, text_depth=0, ctx_init=None, n_ctx_vision=2, vision_depth=1)
    student = load_clip_student(weights, teacher_dim=24, prompts=prompts)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.normal_(0, 0.2)
    store = ClassVectorStore(torch.nn.functional.normalize(torch.randn(4, 24), dim=-1), CLASSES, 100.0)
    return save_adapter(student.eval(), tmp_path / "student", "student", store=store), student


def test_clip_student_predicts_without_text_tower_or_tokenizer(clip_student_dir, tmp_path):
    import subprocess

    folder, _ = clip_student_dir
    paths = _images(tmp_path, 2)
    argv = ["predict", *paths, "--student", str(folder), "--top-k", "3", "--json"]
    proc = subprocess.run([sys.executable, "-c", _NO_TEXT_SCRIPT, json.dumps(argv)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    status = json.loads(lines[-1])
    assert status["code"] == 0 and status["built"] >= 1  # image-only CLIPs were built, no text tower
    preds = json.loads("\n".join(lines[:-1]))
    assert [len(p["predictions"]) for p in preds] == [3, 3]
    assert {p["predictions"][0]["class_name"] for p in preds} <= set(CLASSES)


def test_clip_student_onnx_and_bundle(clip_student_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    folder, student = clip_student_dir
    loaded = load_student(folder)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = loaded.classifier("probabilities")(x).numpy()
    path = export_onnx(loaded, tmp_path / "clip_student.onnx")
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # the bundle loads with the CLIP weights file gone
    bundle = tmp_path / "bundle.safetensors"
    assert main(["export", "--student", str(folder), "--format", "safetensors", "--out", str(bundle)]) == 0
    (tmp_path / "clip.safetensors").unlink()
    again = load_student(bundle)
    with torch.no_grad():
        np.testing.assert_allclose(again.classifier("probabilities")(x).numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="clip.safetensors"):
        load_student(folder)  # the folder needs the original weights file


def _recipe_input(path, recipe) -> np.ndarray:
    """The model input made with PIL and numpy from the file's own recipe, as a program without promptkd would."""
    from PIL import Image

    steps = {s["op"]: s for s in recipe["steps"]}
    img = Image.open(path).convert(steps["decode"]["mode"])
    size, (w, h) = steps["resize"]["short_side"], img.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if new != img.size:
        img = img.resize(new, {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[steps["resize"]["interpolation"]])
    crop = steps["center_crop"]["size"]
    left, top = round((img.width - crop) / 2), round((img.height - crop) / 2)
    img = img.crop((left, top, left + crop, top + crop))
    if "grey" in steps:
        img = img.convert("L")
    x = np.asarray(img, dtype=np.float32) * steps["scale"]["factor"]
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    mean, std = (np.asarray(steps["normalize"][k], dtype=np.float32)[:, None, None] for k in ("mean", "std"))
    return ((x - mean) / std)[None].astype(np.float32)


@pytest.mark.parametrize("channels", [3, 1])
def test_an_exported_file_says_how_to_prepare_images_for_plain_onnxruntime(tmp_path, channels):
    """Non-square images (where the resize and crop rules matter): the recipe in the ONNX metadata alone,
    implemented here with PIL and numpy, gives promptkd's own predictions."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from PIL import Image

    from promptkd.runtime import load_predictor

    class Grey(ToyStudent):
        image_spec = ImageSpec(size=32, mean=(0.4, 0.4, 0.4), std=(0.3, 0.3, 0.3), interpolation="bilinear",
                               channels=1)

        def __init__(self, seed=0):
            super().__init__(seed)
            self.trunk[0] = nn.Conv2d(1, 8, 3, stride=2).requires_grad_(False)
            gen = torch.Generator().manual_seed(seed)  # frozen: rebuilt from the seed, as ToyStudent's
            with torch.no_grad():
                for p in self.trunk[0].parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

        def identity(self):
            return {"kind": "toy-grey", "seed": self.seed}

    register_builder("toy-grey", "student", lambda identity, **_: Grey(int(identity["seed"])))
    torch.manual_seed(0)
    model = (ToyStudent(seed=3) if channels == 3 else Grey(seed=3)).eval()
    store = ClassVectorStore(torch.nn.functional.normalize(torch.randn(4, 6), dim=-1), CLASSES, 100.0)
    folder = save_adapter(model, tmp_path / "student", "student", store=store)
    path = export_onnx(load_student(folder), tmp_path / "s.onnx")
    recipe = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["promptkd.preprocessing"])
    assert recipe["input"]["shape"] == ["batch", channels, 32, 32]
    rng = np.random.default_rng(1)
    images = []
    for i, (w, h) in enumerate([(57, 41), (37, 61), (33, 32), (32, 32)]):  # 61 * 32 / 37 = 52.8: int, not round
        p = tmp_path / f"odd{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        images.append(p)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = np.concatenate([sess.run(None, {recipe["input"]["name"]: _recipe_input(p, recipe)})[0] for p in images])
    ours = load_predictor(str(folder), precision="fp32", backend="torch")
    want = ours.probabilities(ours.preparer()([Image.open(p) for p in images]))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
