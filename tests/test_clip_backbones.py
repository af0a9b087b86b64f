"""ClipTeacher / ClipStudent as backbones (identity, rebuild, frozen parts) and the PromptKD projector."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from promptkd.models.backbones import build_from_identity
from promptkd.models.clip import random_clip, tiny_clip, tiny_clip_config
from promptkd.models.clip_backbones import (
    ClipStudent,
    load_clip_student,
    load_clip_teacher,
    tensors_sha256,
    tiny_clip_student,
    tiny_clip_teacher,
)
from promptkd.models.projector import build_projector
from promptkd.models.prompts import PromptConfig
from promptkd.models.weights import save_clip

PROMPTS = PromptConfig(n_ctx_text=4, text_depth=2, n_ctx_vision=4, vision_depth=2)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_clip(tiny_clip(seed=5), tmp_path_factory.mktemp("w") / "tiny.safetensors")


def images(n=2, size=32):
    torch.manual_seed(0)
    return torch.randn(n, 3, size, size)


# -- projector ------------------------------------------------------------------------------------


def test_projector_size_matches_the_paper():
    n = sum(p.numel() for p in build_projector("mlp", 512, 768).parameters())
    assert n == 512 * 768 + 768 + 2 * 768 + 768 * 768 + 768 == 986_112  # the paper's ~0.99M
    assert sum(p.numel() for p in build_projector("linear", 512, 768).parameters()) == 512 * 768 + 768
    with pytest.raises(ValueError, match="unknown projector"):
        build_projector("mlp2", 4, 4)


@pytest.mark.parametrize("train", [True, False])
def test_projector_matches_float64_math(train):
    torch.manual_seed(0)
    proj = build_projector("mlp", 12, 20)
    with torch.no_grad():
        proj.bn.running_mean.normal_()
        proj.bn.running_var.uniform_(0.5, 2)
        proj.bn.weight.normal_()
        proj.bn.bias.normal_()
    proj.train(train)
    x = torch.randn(6, 12)
    got = proj(x)
    d = torch.float64
    h = x.to(d) @ proj.conv1.weight[:, :, 0, 0].to(d).t() + proj.conv1.bias.to(d)
    if train:
        mean, var = h.mean(0), h.var(0, unbiased=False)
    else:
        mean, var = proj.bn.running_mean.to(d), proj.bn.running_var.to(d)
    h = (h - mean) / torch.sqrt(var + proj.bn.eps) * proj.bn.weight.to(d) + proj.bn.bias.to(d)
    ref = h.clamp_min(0) @ proj.conv2.weight[:, :, 0, 0].to(d).t() + proj.conv2.bias.to(d)
    torch.testing.assert_close(got.to(d), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, 12\]"):
        proj(torch.randn(2, 11))


# -- teacher --------------------------------------------------------------------------------------


def test_teacher_interface_and_identity(weights):
    teacher = load_clip_teacher(weights, prompts=PROMPTS)
    x = images()
    assert teacher.encode_image(x).shape == (2, 64) and teacher.embed_dim == 64
    assert teacher.encode_class_names(["cat", "dog"]).shape == (2, 64)
    torch.testing.assert_close(teacher.encode_class_names(["cat"], prompted=False), teacher.encode_text(["a photo of a cat."]))
    torch.testing.assert_close(teacher.logit_scale(), teacher.clip.logit_scale.detach().exp())
    assert teacher.image_spec.size == 32
    ident = teacher.identity()
    assert ident["kind"] == "clip" and ident["role"] == "teacher" and ident["weights"] == str(weights.resolve())
    assert ident["prompts"] == PROMPTS.to_dict() and ident["arch"]["vision"]["width"] == 64
    assert ident["sha256"] == tensors_sha256(teacher.clip.state_dict())
    # the checksum names the stored weights, whatever precision they are loaded in
    assert load_clip_teacher(weights, prompts=PROMPTS, dtype=torch.bfloat16).identity()["sha256"] == ident["sha256"]
    assert set(teacher.adapter_state_dict()) == {"text_prompts.ctx", "vision_prompts.ctx"}
    # text context initialised from "a photo of a"
    ids = torch.tensor(teacher.tokenizer.encode("a photo of a"))
    torch.testing.assert_close(teacher.text_prompts.ctx[0].detach(), teacher.clip.token_embedding(ids).detach())


def test_teacher_rebuilds_from_identity(weights, tmp_path):
    teacher = load_clip_teacher(weights, prompts=PROMPTS, prompt_seed=3)
    rebuilt = build_from_identity(teacher.identity(), "teacher")
    rebuilt.load_adapter_state_dict(teacher.adapter_state_dict())
    x = images()
    with torch.no_grad():
        assert torch.equal(rebuilt.encode_image(x), teacher.encode_image(x))
        assert torch.equal(rebuilt.encode_class_names(["cat"]), teacher.encode_class_names(["cat"]))
    # the same tensors in another format pass the checksum; other weights are refused
    moved = tmp_path / "moved.pt"
    torch.save(teacher.clip.state_dict(), moved)
    build_from_identity(teacher.identity(), "teacher", weights=str(moved))
    other = save_clip(tiny_clip(seed=6), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not the ones the artefact was trained with"):
        build_from_identity(teacher.identity(), "teacher", weights=str(other))
    wider = save_clip(tiny_clip(seed=5, width=32), tmp_path / "wider.safetensors")
    with pytest.raises(ValueError, match="architecture"):
        build_from_identity(teacher.identity(), "teacher", weights=str(wider))


def test_tiny_helpers_are_deterministic_and_rebuildable():
    a, b = tiny_clip_teacher(seed=1), tiny_clip_teacher(seed=1)
    assert a.identity() == b.identity() and a.identity()["weights"] is None
    assert torch.equal(a.text_prompts.ctx, b.text_prompts.ctx)
    assert tiny_clip_teacher(seed=2).identity()["sha256"] != a.identity()["sha256"]
    rebuilt = build_from_identity(a.identity(), "teacher")  # from the seed, no file
    assert rebuilt.identity()["sha256"] == a.identity()["sha256"]
    rebuilt_state = rebuilt.clip.state_dict()
    assert all(torch.equal(value, rebuilt_state[key]) for key, value in a.clip.state_dict().items())


# -- student --------------------------------------------------------------------------------------


def test_student_keeps_only_the_image_tower(weights):
    student = load_clip_student(weights, teacher_dim=96, prompts=PromptConfig(vision_depth=2))
    assert not student.clip.has_text
    assert not any(k.startswith(("token_embedding", "transformer.", "ln_final", "text_projection"))
                   for k in student.state_dict() if k.startswith("clip."))
    x = images(3)
    student.train()
    assert not student.clip.training and student.projector.training
    out = student(x)
    assert out.shape == (3, 96) and student.embed_dim == 96
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {"vision_prompts.ctx"} | {f"projector.{n}" for n, _ in student.projector.named_parameters()}
    out.square().sum().backward()
    assert all(p.grad is None for p in student.clip.parameters())
    assert student.vision_prompts.ctx.grad.abs().flatten(1).sum(1).gt(0).all()
    # the adapter carries the projector's BatchNorm statistics
    assert "projector.bn.running_mean" in student.adapter_state_dict()
    # the image tower is exactly the full model's
    teacher = load_clip_teacher(weights, prompts=PromptConfig(n_ctx_text=0, n_ctx_vision=0))
    torch.testing.assert_close(student.clip.encode_image(x), teacher.encode_image(x), rtol=0, atol=0)
    ident = student.identity()
    assert ident["role"] == "student" and ident["teacher_dim"] == 96 and ident["projector"] == "mlp"
    assert ident["arch"]["text"] is None and ident["prompts"]["n_ctx_text"] == 0


def test_student_rebuilds_from_identity_and_from_a_bundle_state_dict(weights):
    student = load_clip_student(weights, teacher_dim=48, prompts=PromptConfig(vision_depth=2), projector="linear",
                                prompt_seed=4)
    student.eval()
    x = images()
    rebuilt = build_from_identity(student.identity(), "student")
    rebuilt.load_adapter_state_dict(student.adapter_state_dict())
    assert torch.equal(rebuilt.eval()(x), student(x))
    # an exported bundle carries every tensor: no weights file is read
    ident = {**student.identity(), "weights": "/nonexistent/clip.safetensors"}
    state = student.state_dict()
    bare = build_from_identity(ident, "student", state_dict=state)
    bare.load_state_dict(state, strict=True)
    assert torch.equal(bare.eval()(x), student(x))


def test_tiny_student_and_seeded_rebuild():
    student = tiny_clip_student(seed=7, teacher_dim=32, width=32, layers=1)
    assert isinstance(student, ClipStudent) and student(images()).shape == (2, 32)
    rebuilt = build_from_identity(student.identity(), "student")
    assert rebuilt.identity()["sha256"] == student.identity()["sha256"]
    # tiny students have exactly the image tower of the tiny CLIP with the same seed and shape
    full = random_clip(tiny_clip_config(width=32, layers=1), seed=7)
    torch.testing.assert_close(student.clip.encode_image(images()), full.encode_image(images()), rtol=0, atol=0)


def test_image_only_file_loads_as_student_not_teacher(tmp_path):
    clip = tiny_clip(seed=1)
    state = {k: v for k, v in clip.state_dict().items() if k.startswith("visual.") or k == "logit_scale"}
    path = tmp_path / "image_only.safetensors"
    save_file(state, str(path))  # a plain state dict: its (tiny, unknown) architecture is given with arch=
    assert load_clip_student(path, teacher_dim=64, prompts=PromptConfig(vision_depth=1),
                             arch=clip.cfg)(images()).shape == (2, 64)
    with pytest.raises(ValueError, match="needs the text tower"):
        load_clip_teacher(path, prompts=PROMPTS, arch=clip.cfg)


def test_student_exports_to_onnx(tmp_path):
    """The export path (TorchScript-based ONNX exporter) handles our attention and prompts; dynamic batch."""
    ort = pytest.importorskip("onnxruntime")
    import warnings

    student = tiny_clip_student(seed=0, teacher_dim=48, prompts=PromptConfig(vision_depth=2)).eval()
    path = tmp_path / "student.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(student, (images(1),), str(path), dynamo=False, input_names=["images"],
                          output_names=["features"], dynamic_axes={"images": {0: "b"}, "features": {0: "b"}},
                          opset_version=17)
    x = images(3)
    got = ort.InferenceSession(str(path)).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), student(x), rtol=1e-4, atol=1e-5)


def test_class_name_tokens_are_built_once_per_class_list(monkeypatch):
    from promptkd.models.clip_backbones import tiny_clip_teacher

    teacher = tiny_clip_teacher(seed=0, width=32, layers=1, image_size=32, patch_size=16)
    first = teacher.class_name_tokens(["cat", "dog"])
    calls = []
    original = teacher.tokenizer.encode
    monkeypatch.setattr(teacher.tokenizer, "encode", lambda text: calls.append(text) or original(text))
    assert teacher.class_name_tokens(["cat", "dog"]) is first and not calls
    other = teacher.class_name_tokens(["dog", "cat"])
    assert calls and torch.equal(other[0], first[1]) and torch.equal(other[1], first[0])
