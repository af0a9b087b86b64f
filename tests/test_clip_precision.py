"""Reduced precision on CPU: bf16 autocast and bf16/fp16 weights against the fp32 model.

Stated tolerance (tiny 2-layer model, 4 images and 4 class names): every bf16 feature is within
BF16_REL = 3e-2 of the fp32 one relative to the largest fp32 magnitude, with cosine similarity >= 0.999.
(bf16 keeps 8 significant bits, ~4e-3 relative per rounding; measured here: ~8e-3.) fp16 weights: 1e-2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from promptkd.models.clip_backbones import tiny_clip_student, tiny_clip_teacher
from promptkd.models.prompts import PromptConfig

BF16_REL, FP16_REL, MIN_COS = 3e-2, 1e-2, 0.999
NAMES = ["cat", "dog", "container ship", "airliner"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def min_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).min())


def teacher_and_images():
    teacher = tiny_clip_teacher(seed=0, prompts=PromptConfig(text_depth=2, vision_depth=2))
    torch.manual_seed(0)
    return teacher, torch.randn(4, 3, 32, 32)


def test_bf16_autocast_close_to_fp32():
    teacher, x = teacher_and_images()
    with torch.no_grad():
        ref_img, ref_txt = teacher.encode_image(x), teacher.encode_class_names(NAMES)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            img, txt = teacher.encode_image(x), teacher.encode_class_names(NAMES)
    assert img.dtype == torch.bfloat16 and txt.dtype == torch.bfloat16  # autocast really ran in bf16
    for got, ref in ((img, ref_img), (txt, ref_txt)):
        assert rel(got, ref) <= BF16_REL and min_cos(got, ref) >= MIN_COS
        assert rel(got, ref) > 0  # and it is not silently fp32


def test_bf16_autocast_training_step_gives_fp32_prompt_gradients():
    teacher, x = teacher_and_images()
    student = tiny_clip_student(seed=1, teacher_dim=64, prompts=PromptConfig(vision_depth=2))
    student.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            target = F.normalize(teacher.encode_image(x).float(), dim=-1)
        loss = (F.normalize(student(x).float(), dim=-1) - target).square().sum()
    loss.backward()
    assert torch.isfinite(loss)
    for p in student.trainable_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()


def test_bf16_and_fp16_weights():
    teacher, x = teacher_and_images()
    with torch.no_grad():
        ref_img, ref_txt = teacher.encode_image(x), teacher.encode_class_names(NAMES)
        for dtype, tol in ((torch.bfloat16, BF16_REL), (torch.float16, FP16_REL)):
            half = tiny_clip_teacher(seed=0, prompts=PromptConfig(text_depth=2, vision_depth=2)).to(dtype)
            img, txt = half.encode_image(x), half.encode_class_names(NAMES)
            assert img.dtype == dtype and txt.dtype == dtype
            assert rel(img, ref_img) <= tol and rel(txt, ref_txt) <= tol, dtype
            assert min_cos(img, ref_img) >= MIN_COS and min_cos(txt, ref_txt) >= MIN_COS
