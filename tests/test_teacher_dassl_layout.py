"""An authors' Dassl checkpoint (their key layout, built here around a tiny CLIP) gives our teacher the
same prompts, hence the same logits, as setting those prompts by hand; wrong CLIP weights are refused."""

import pytest
import torch
import torch.nn.functional as F

from promptkd.methods import dassl_import, teacher_io
from promptkd.models.clip_backbones import tiny_clip_teacher
from promptkd.models.prompts import PromptConfig

PROMPTS = PromptConfig(n_ctx_text=4, text_depth=2, ctx_init="a photo of a", n_ctx_vision=3, vision_depth=2)
NAMES = ["golden retriever", "tabby cat", "space shuttle"]


def _logits(teacher, images):
    teacher.eval()
    with torch.no_grad():
        img = F.normalize(teacher.encode_image(images), dim=-1)
        txt = F.normalize(teacher.encode_class_names(NAMES), dim=-1)
    return teacher.logit_scale() * img @ txt.t()


def _authors_state_dict(teacher, text, vision) -> dict:
    """The state dict of the authors' CustomCLIP (IVLP) for this CLIP, CLIP weights in fp16 as theirs."""
    sd = {}
    for key, value in teacher.clip.state_dict().items():
        value = value.half() if value.ndim >= 2 else value.clone()  # their convert_weights: matrices to fp16
        if key.startswith("visual."):
            sd["image_encoder." + key[len("visual."):]] = value
            sd["prompt_learner.ZS_image_encoder." + key[len("visual."):]] = value
        elif key == "logit_scale":
            sd[key] = value
        elif key != "token_embedding.weight":  # CustomCLIP holds no token embedding
            sd["text_encoder." + key] = value
    sd["prompt_learner.ctx"] = text[0].half()  # initialised from fp16 token embeddings
    sd["image_encoder.VPT"] = vision[0].clone()
    for i in range(1, len(text)):
        sd[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = text[i].clone()
    for i in range(1, len(vision)):
        sd[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = vision[i].clone()
    n_cls, width = len(NAMES), teacher.clip.cfg.text.width
    sd["prompt_learner.token_prefix"] = torch.randn(n_cls, 1, width).half()
    sd["prompt_learner.token_suffix"] = torch.randn(n_cls, 72, width).half()
    return sd


def test_dassl_checkpoint_gives_the_logits_of_hand_set_prompts(tmp_path):
    torch.manual_seed(0)
    # prompts exactly representable in fp16 (the authors store ctx in fp16)
    text = [(torch.randn(4, 64) * 0.1).half().float() for _ in range(2)]
    vision = [(torch.randn(3, 64) * 0.1).half().float() for _ in range(2)]
    by_hand = tiny_clip_teacher(seed=0, prompts=PROMPTS, prompt_seed=1)
    with torch.no_grad():
        for i in range(2):
            by_hand.text_prompts.ctx[i] = text[i]
            by_hand.vision_prompts.ctx[i] = vision[i]

    state = {"module." + k: v for k, v in _authors_state_dict(by_hand, text, vision).items()}
    path = tmp_path / "Caltech101" / "VLPromptLearner" / "model-best.pth.tar"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": state, "epoch": 20, "optimizer": {"state": {}}, "val_result": 97.1}, path)

    prompts = dassl_import.read_dassl_teacher(tmp_path / "Caltech101")
    assert teacher_io.dassl_prompt_config(prompts) == {**PROMPTS.to_dict()}
    converted = tiny_clip_teacher(seed=0, prompts=teacher_io.dassl_prompt_config(prompts), prompt_seed=7)
    images = torch.randn(5, 3, 32, 32)
    assert not torch.equal(_logits(converted, images), _logits(by_hand, images))  # fresh prompts differ
    teacher_io.apply_dassl_prompts(converted, prompts, str(path))
    assert torch.equal(_logits(converted, images), _logits(by_hand, images))
    assert torch.equal(converted.text_prompts.ctx, by_hand.text_prompts.ctx)


def test_checkpoint_from_other_clip_weights_or_depths_is_refused(tmp_path):
    text = [torch.randn(4, 64) * 0.1 for _ in range(2)]
    vision = [torch.randn(3, 64) * 0.1 for _ in range(2)]
    source = tiny_clip_teacher(seed=0, prompts=PROMPTS)
    path = tmp_path / "model.pth.tar-20"
    torch.save({"state_dict": _authors_state_dict(source, text, vision)}, path)
    prompts = dassl_import.read_dassl_teacher(path)
    other_weights = tiny_clip_teacher(seed=3, prompts=PROMPTS)
    with pytest.raises(ValueError, match="differs from the CLIP weights"):
        teacher_io.apply_dassl_prompts(other_weights, prompts, str(path))
    wider = tiny_clip_teacher(seed=0, prompts=PROMPTS, width=32)
    with pytest.raises(ValueError, match="another CLIP architecture"):
        teacher_io.apply_dassl_prompts(wider, prompts, str(path))
    shallow = tiny_clip_teacher(seed=0, prompts={**PROMPTS.to_dict(), "text_depth": 1})
    with pytest.raises(ValueError, match="text prompts for layers"):
        teacher_io.set_layer_prompts(shallow, prompts.text, prompts.vision, str(path))
