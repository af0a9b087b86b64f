"""PromptSRC on a tiny CLIP: learning, frozen weights, class vectors, and exact resume through the loop."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from promptkd import artifacts
from promptkd.engine.loop import LoopConfig, fit
from promptkd.methods import teacher_io
from promptkd.methods.promptsrc import PromptSRCModule
from promptkd.models.clip_backbones import tiny_clip_teacher
from promptkd.models.prompts import PromptConfig

NAMES = ["dog", "cat", "car", "tree"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "itap of the {}."]
IVLP = PromptConfig(n_ctx_text=4, text_depth=2, ctx_init="a photo of a", n_ctx_vision=4, vision_depth=2)


def _teacher(prompts=IVLP):
    return tiny_clip_teacher(seed=0, prompts=prompts, prompt_seed=0, width=32, layers=2)


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "label": torch.arange(n) % len(NAMES)}


@pytest.mark.parametrize("method", ["promptsrc", "ivlp", "coop"])
def test_steps_reduce_the_loss_and_only_prompts_change(method):
    torch.manual_seed(0)
    prompts = teacher_io.prompt_settings_for_method(method, IVLP.to_dict())
    teacher = _teacher(prompts)
    module = PromptSRCModule(teacher, NAMES, {"method": method, "templates": TEMPLATES})
    frozen_before = {k: v.clone() for k, v in teacher.clip.state_dict().items()}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    expected = {"teacher.text_prompts.ctx"} | ({"teacher.vision_prompts.ctx"} if method != "coop" else set())
    assert trainable == expected
    prompts_before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=0.01)
    batch = _batch(4)
    module.train()
    losses = []
    for _ in range(8):
        out = module(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.97 * losses[0], losses  # a random tiny CLIP learns slowly, but it does
    for key, value in teacher.clip.state_dict().items():
        assert torch.equal(value, frozen_before[key]), f"frozen {key} changed"
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), prompts_before[name]), f"{name} did not learn"
    assert not teacher.clip.training  # frozen tower stayed in eval mode


def test_class_vectors_equal_on_the_fly_text_features_bitwise(tmp_path):
    teacher = _teacher()
    with torch.no_grad():
        teacher.text_prompts.ctx.add_(0.05 * torch.randn_like(teacher.text_prompts.ctx))
    store = teacher_io.compute_class_vectors(teacher, NAMES)
    path = store.save(tmp_path / "cv.safetensors")
    chunked = teacher_io.compute_class_vectors(teacher, NAMES, batch_size=3)  # BLAS batching: last bits only
    assert torch.allclose(chunked.vectors, store.vectors, atol=1e-6)
    loaded = teacher_io.load_class_vectors(path, NAMES)
    teacher.eval()
    with torch.no_grad():
        on_the_fly = F.normalize(teacher.encode_class_names(NAMES).float(), dim=-1)
    assert torch.equal(loaded.vectors, on_the_fly)
    assert loaded.logit_scale == pytest.approx(float(teacher.logit_scale()))
    assert loaded.teacher == teacher.identity()
    with pytest.raises(ValueError, match="cv.safetensors.*label 1"):
        teacher_io.load_class_vectors(path, ["dog", "wolf", "car", "tree"])


def test_teacher_artefact_round_trip(tmp_path):
    teacher = _teacher()
    with torch.no_grad():
        teacher.vision_prompts.ctx.add_(0.3)
    artifacts.save_adapter(teacher, tmp_path / "t", "teacher", class_names=NAMES, config={"method": "promptsrc"})
    loaded, meta = teacher_io.load_teacher(tmp_path / "t")
    images = torch.randn(2, 3, 32, 32)
    teacher.eval()
    assert torch.equal(loaded.encode_image(images), teacher.encode_image(images))
    assert torch.equal(loaded.encode_class_names(NAMES), teacher.encode_class_names(NAMES))
    assert meta["class_names"] == NAMES and not any(p.requires_grad for p in loaded.parameters())
    again, _ = teacher_io.load_teacher(tmp_path / "t" / artifacts.TENSORS)  # the tensor file names its folder
    assert torch.equal(again.vision_prompts.ctx, teacher.vision_prompts.ctx)
    (tmp_path / "other.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="--clip-weights"):
        teacher_io.load_teacher(tmp_path / "other.pt")


class _Images(Dataset):
    def __init__(self, n=8):
        self.data = _batch(n, seed=5)

    def __len__(self):
        return len(self.data["label"])

    def __getitem__(self, i):
        return {"image": self.data["image"][i], "label": int(self.data["label"][i]), "index": i}


def _run(out_dir, max_steps=None, resume=False):
    torch.manual_seed(123)  # the module's construction must not depend on the global RNG anyway
    module = PromptSRCModule(_teacher(), NAMES, {"method": "promptsrc", "templates": TEMPLATES, "epochs": 2,
                                                 "gpa_mean": 2, "gpa_std": 1})
    cfg = LoopConfig(epochs=2, batch_size=4, lr=0.01, warmup_epochs=1, warmup_lr=1e-3, num_workers=0,
                     device="cpu", deterministic=True, seed=3, max_steps=max_steps)
    result = fit(module, _Images(), cfg, out_dir, resume=resume)
    return module, result


def test_killed_and_resumed_run_ends_with_the_same_prompts(tmp_path):
    straight, result = _run(tmp_path / "straight")
    assert result["completed"] and result["global_step"] == 4
    _, partial = _run(tmp_path / "resumed", max_steps=3)  # stops inside epoch 2 (2 steps per epoch)
    assert not partial["completed"] and partial["global_step"] == 3
    resumed, result = _run(tmp_path / "resumed", resume=True)
    assert result["completed"] and result["global_step"] == 4
    for (name, a), (_, b) in zip(straight.teacher.named_parameters(), resumed.teacher.named_parameters()):
        assert torch.equal(a, b), f"{name} differs after resume"
    # GPA was applied at the end: the prompts are the aggregate of both epochs, not the last epoch's
    assert straight._gpa_epochs == [0, 1] and resumed._gpa_epochs == [0, 1]
    aggregate = straight.aggregated_prompts()
    for name, p in straight.teacher.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), aggregate[name].float())
