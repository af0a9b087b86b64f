"""Reading the authors' Dassl checkpoint files: weights-only first, full unpickling only on opt-in."""

import sys

import pytest
import torch

from promptkd.methods import dassl_import

SCHED_MODULE = """
class ConstantWarmupScheduler:
    def __init__(self, lr):
        self.lr = lr
"""


def _prompts_state(prefix: str = "") -> dict:
    g = torch.Generator().manual_seed(0)
    state = {
        "prompt_learner.ctx": torch.randn(4, 8, generator=g),
        "prompt_learner.token_prefix": torch.randn(3, 1, 8, generator=g),
        "prompt_learner.token_suffix": torch.randn(3, 72, 8, generator=g),
        "image_encoder.VPT": torch.randn(4, 16, generator=g),
        "image_encoder.conv1.weight": torch.randn(16, 3, 4, 4, generator=g),
        "text_encoder.ln_final.weight": torch.randn(8, generator=g),
        "logit_scale": torch.tensor(4.6052),
        "prompt_learner.ZS_image_encoder.conv1.weight": torch.randn(16, 3, 4, 4, generator=g),
    }
    for i in (1, 2):
        state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(4, 8, generator=g)
        state[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(4, 16, generator=g)
    return {prefix + k: v for k, v in state.items()}


def _save_with_foreign_object(tmp_path, state) -> str:
    """A Dassl-like file that pickles an object of a module the loading side does not have."""
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "fake_dassl_sched.py").write_text(SCHED_MODULE)
    sys.path.insert(0, str(mod_dir))
    try:
        import fake_dassl_sched

        path = tmp_path / "run" / "VLPromptLearner" / "model.pth.tar-20"
        path.parent.mkdir(parents=True)
        torch.save({"state_dict": state, "epoch": 20, "optimizer": {}, "val_result": 81.5,
                    "scheduler": {"successor": fake_dassl_sched.ConstantWarmupScheduler(0.005)}}, path)
    finally:
        sys.path.remove(str(mod_dir))
        sys.modules.pop("fake_dassl_sched", None)
    return str(path)


def test_pickled_objects_need_the_opt_in_and_then_load_without_the_module(tmp_path):
    path = _save_with_foreign_object(tmp_path, _prompts_state("module."))
    with pytest.raises(dassl_import.UntrustedCheckpointError, match="--trust-checkpoint"):
        dassl_import.read_dassl_teacher(path)
    prompts = dassl_import.read_dassl_teacher(tmp_path / "run", trust_checkpoint=True)  # folder lookup too
    assert (prompts.text_depth, prompts.vision_depth, prompts.n_ctx_text, prompts.n_ctx_vision) == (3, 3, 4, 4)
    assert torch.equal(prompts.text[0], _prompts_state()["prompt_learner.ctx"])
    assert torch.equal(prompts.vision[2], _prompts_state()["image_encoder.transformer.resblocks.2.VPT_shallow"])
    assert prompts.logit_scale == pytest.approx(100.0, rel=1e-4)
    assert prompts.info["epoch"] == 20 and prompts.info["val_result"] == pytest.approx(81.5)
    # frozen CLIP tensors come back under OpenAI names; cached embeddings and the ZS copy are dropped
    assert set(prompts.frozen) == {"visual.conv1.weight", "ln_final.weight", "logit_scale"}


def test_plain_tensor_files_load_without_opt_in(tmp_path):
    path = tmp_path / "model-best.pth.tar"
    torch.save({"state_dict": _prompts_state(), "epoch": 7}, path)
    assert dassl_import.read_dassl_teacher(path).info["epoch"] == 7
    torch.save({"state_dict": _prompts_state(), "epoch": 3}, tmp_path / "legacy.pth.tar",
               _use_new_zipfile_serialization=False)  # the pre-1.6 torch.save format
    assert dassl_import.read_dassl_teacher(tmp_path / "legacy.pth.tar").info["epoch"] == 3
    torch.save(_prompts_state(), tmp_path / "bare.pt")  # a bare state dict
    assert dassl_import.read_dassl_teacher(tmp_path / "bare.pt").text_depth == 3


def test_bad_files_are_refused_with_the_file_named(tmp_path):
    broken = tmp_path / "broken.pth.tar"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth.tar"):
        dassl_import.read_dassl_teacher(broken)
    state = _prompts_state()
    del state["prompt_learner.ctx"]
    torch.save({"state_dict": state}, tmp_path / "noctx.pt")
    with pytest.raises(ValueError, match="noctx.pt.*not an IVLP"):
        dassl_import.read_dassl_teacher(tmp_path / "noctx.pt")
    state = _prompts_state()
    del state["text_encoder.transformer.resblocks.1.VPT_shallow"]
    torch.save({"state_dict": state}, tmp_path / "gap.pt")
    with pytest.raises(ValueError, match="not contiguous"):
        dassl_import.read_dassl_teacher(tmp_path / "gap.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model-best"):
        dassl_import.read_dassl_teacher(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not found"):
        dassl_import.read_dassl_teacher(tmp_path / "missing")
