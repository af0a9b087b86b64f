"""Prompt points of our CLIP: where prompts go, at which layers they are replaced, what they leave alone."""

from __future__ import annotations

import pytest
import torch

from promptkd.models.clip import random_clip, tiny_clip_config
from promptkd.models.clip_backbones import FROZEN_TEMPLATE, ClipTeacher
from promptkd.models.prompts import PromptConfig, TextPrompts, VisionPrompts

NAMES = ["cat", "golden retriever", "aircraft carrier"]


@pytest.fixture(scope="module")
def clip():
    return random_clip(tiny_clip_config(width=64, layers=4, heads=2, image_size=32, patch_size=8), seed=3)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.randn(3, 3, 32, 32)


def capture_block_io(transformer):
    """Record the input and output of every residual block of a transformer."""
    inputs, outputs, handles = {}, {}, []
    for i, block in enumerate(transformer.resblocks):
        handles.append(block.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].detach())))
        handles.append(block.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out.detach())))
    return inputs, outputs, handles


def test_no_prompts_is_plain_clip(clip, images):
    teacher = ClipTeacher(clip, PromptConfig(n_ctx_text=0, n_ctx_vision=0))
    assert teacher.text_prompts is None and teacher.vision_prompts is None and not teacher.trainable_parameters()
    with torch.no_grad():
        assert torch.equal(teacher.encode_image(images, prompted=True), clip.encode_image(images))
        full = teacher.tokenizer([FROZEN_TEMPLATE.format(n) for n in NAMES])
        last = int(full.argmax(-1).max()) + 1  # the teacher drops padding after the last EOT
        plain = clip.encode_text(full[:, :last])
        assert torch.equal(teacher.encode_class_names(NAMES, prompted=True), plain)
        # ... which the causal mask makes equal to the padded computation up to rounding
        torch.testing.assert_close(plain, clip.encode_text(full), rtol=1e-5, atol=1e-5)
    depth0 = ClipTeacher(clip, PromptConfig(text_depth=0, vision_depth=0))
    assert depth0.text_prompts is None and depth0.vision_prompts is None


def test_shallow_context_initialised_from_words_equals_the_template(clip):
    """ctx[0] = embeddings of "a photo of a", depth 1: exactly CLIP on "a photo of a {name}." (same EOT)."""
    teacher = ClipTeacher(clip, PromptConfig(n_ctx_text=4, text_depth=1, ctx_init="a photo of a", vision_depth=0))
    with torch.no_grad():
        prompted = teacher.encode_class_names(NAMES, prompted=True)
        frozen = teacher.encode_class_names(NAMES, prompted=False)
    torch.testing.assert_close(prompted, frozen, rtol=0, atol=1e-6)
    # deeper prompts (random) do change the features; so does editing the context
    deep = ClipTeacher(clip, PromptConfig(n_ctx_text=4, text_depth=3, vision_depth=0), prompt_seed=0)
    deep.text_prompts.ctx.data[0] = teacher.text_prompts.ctx.data[0]
    with torch.no_grad():
        assert not torch.allclose(deep.encode_class_names(NAMES), frozen, atol=1e-4)


def test_class_name_tokens(clip):
    teacher = ClipTeacher(clip, PromptConfig(n_ctx_text=4, text_depth=2, vision_depth=0))
    tok = teacher.tokenizer
    tokens = teacher.class_name_tokens(["golden retriever", "a " * 200])
    body = tok.encode("golden retriever.")
    placeholder = tok.encode("X")[0]
    assert tokens[0, : 6 + len(body)].tolist() == [tok.sot_id, *[placeholder] * 4, *body, tok.eot_id]
    assert tokens[0, 6 + len(body):].eq(0).all()
    assert tokens[1, -1].item() == tok.eot_id and tokens.argmax(-1)[1].item() == 76  # cut, EOT kept


def test_vision_prompts_replaced_exactly_at_layers_below_depth(clip, images):
    depth, n = 3, 4
    teacher = ClipTeacher(clip, PromptConfig(n_ctx_text=0, n_ctx_vision=n, vision_depth=depth), prompt_seed=1)
    ctx = teacher.vision_prompts.ctx.detach()
    inputs, outputs, handles = capture_block_io(clip.visual.transformer)
    with torch.no_grad():
        teacher.encode_image(images)
        x0 = clip.visual.ln_pre(torch.cat([clip.visual.embed(images), ctx[0].expand(3, -1, -1)], dim=1))
    for h in handles:
        h.remove()
    grid = clip.cfg.vision.grid
    assert inputs[0].shape == (3, 1 + grid * grid + n, 64)
    torch.testing.assert_close(inputs[0], x0, rtol=0, atol=0)
    for i in range(1, len(clip.visual.transformer.resblocks)):
        if i < depth:  # fresh tokens at the end, everything else carried over
            assert torch.equal(inputs[i][:, -n:], ctx[i].expand(3, -1, -1)), i
            assert torch.equal(inputs[i][:, :-n], outputs[i - 1][:, :-n]), i
            assert not torch.equal(inputs[i][:, -n:], outputs[i - 1][:, -n:]), i
        else:  # untouched
            assert torch.equal(inputs[i], outputs[i - 1]), i


def test_text_prompts_replaced_exactly_at_layers_below_depth(clip):
    depth, n = 2, 3
    teacher = ClipTeacher(clip, PromptConfig(n_ctx_text=n, text_depth=depth, ctx_init=None, vision_depth=0),
                          prompt_seed=2)
    ctx = teacher.text_prompts.ctx.detach()
    inputs, outputs, handles = capture_block_io(clip.transformer)
    with torch.no_grad():
        feats = teacher.encode_class_names(NAMES)
        tokens = teacher.class_name_tokens(NAMES)
        tokens = tokens[:, : int(tokens.argmax(-1).max()) + 1]  # padding after the last EOT is dropped
        emb = clip.token_embedding(tokens)
        emb[:, 1 : 1 + n] = ctx[0]
        x0 = emb + clip.positional_embedding[: tokens.shape[1]]
    for h in handles:
        h.remove()
    assert torch.equal(inputs[0], x0)
    for i in range(1, 4):
        if i < depth:
            assert torch.equal(inputs[i][:, 1 : 1 + n], ctx[i].expand(len(NAMES), -1, -1)), i
            assert torch.equal(inputs[i][:, :1], outputs[i - 1][:, :1])
            assert torch.equal(inputs[i][:, 1 + n:], outputs[i - 1][:, 1 + n:])
        else:
            assert torch.equal(inputs[i], outputs[i - 1]), i
    # pooling still at EOT: recompute the head from the last block's output
    last = clip.ln_final(outputs[3])
    eot = tokens.argmax(-1)
    assert (eot > 1 + n).all()
    torch.testing.assert_close(feats, last[torch.arange(len(NAMES)), eot] @ clip.text_projection, rtol=0, atol=0)


def test_gradients_reach_only_prompts(clip, images):
    teacher = ClipTeacher(clip, PromptConfig(n_ctx_text=4, text_depth=3, n_ctx_vision=2, vision_depth=3),
                          prompt_seed=0)
    assert {n for n, p in teacher.named_parameters() if p.requires_grad} == {"text_prompts.ctx", "vision_prompts.ctx"}
    teacher.train()
    assert not teacher.clip.training  # frozen parts stay in eval mode
    loss = teacher.encode_image(images).square().sum() + teacher.encode_class_names(NAMES).square().sum()
    loss.backward()
    assert all(p.grad is None for p in teacher.clip.parameters())
    for module in (teacher.text_prompts, teacher.vision_prompts):
        per_layer = module.ctx.grad.abs().flatten(1).sum(1)
        assert (per_layer > 0).all(), per_layer  # every layer's prompt influences the output
    # the un-prompted paths do not depend on any trainable tensor
    assert not teacher.encode_image(images, prompted=False).requires_grad
    assert not teacher.encode_class_names(NAMES, prompted=False).requires_grad


def test_prompt_modules_check_their_inputs():
    with pytest.raises(ValueError, match="n_ctx >= 1"):
        VisionPrompts(0, 2, 8)
    with pytest.raises(ValueError, match="too short"):
        TextPrompts(4, 1, 8).insert(torch.zeros(1, 5, 8))
    with pytest.raises(ValueError, match="non-negative"):
        PromptConfig(vision_depth=-1)
    with pytest.raises(ValueError, match="unknown prompt settings"):
        PromptConfig.from_dict({"n_ctx": 4})
    clip = random_clip(tiny_clip_config(layers=2), seed=0)
    with pytest.raises(ValueError, match="depth 9 exceeds the 2 layers .*; set teacher.text_depth to at most 2"):
        ClipTeacher(clip, PromptConfig())
    with pytest.raises(ValueError, match="vision prompt depth 9 .*; set teacher.vision_depth to at most 2"):
        ClipTeacher(clip, PromptConfig(text_depth=2))
    from promptkd.models.clip_backbones import STUDENT_PROMPTS, ClipStudent

    with pytest.raises(ValueError, match="vision prompt depth 9 .*; set student.depth to at most 2"):
        ClipStudent(clip, 32, STUDENT_PROMPTS)
