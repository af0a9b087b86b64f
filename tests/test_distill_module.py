"""Stage-2 distillation: the loss against float64 and a hand computation, label-freeness, learning.

The backbones are helper A's tiny random CLIP pair (promptkd.models.clip_backbones): a teacher of width
64 with IVLP prompts and a narrower student (width 32, embedding 32) with VPT-deep prompts and a
projector into the teacher's 48-dimensional space.
"""

import math

import pytest
import torch
from torch.utils.data import Dataset

from promptkd.engine.loop import LoopConfig, fit
from promptkd.methods.promptkd import DistillModule, agreement_selector, base_accuracy_selector, distillation_loss
from promptkd.models.clip_backbones import tiny_clip_student, tiny_clip_teacher
from promptkd.store import ClassVectorStore, build_store

IMAGE = 32
TEACHER_DIM = 48


def TinyTeacher(seed: int = 0, prompt_seed: int = 0):  # noqa: N802 (reads like the class it stands for)
    return tiny_clip_teacher(seed=seed, prompt_seed=prompt_seed, width=64, layers=2, embed_dim=TEACHER_DIM,
                             image_size=IMAGE)


def TinyStudent(projector: str = "mlp", teacher_dim: int = TEACHER_DIM, seed: int = 1):  # noqa: N802
    return tiny_clip_student(seed=seed, teacher_dim=teacher_dim, projector=projector, width=32, layers=2,
                             image_size=IMAGE)


CLASSES = ["cat", "dog", "car", "tree", "boat", "cup"]


class Images(Dataset):
    """Unlabelled images as ``{"image", "index"}`` samples (no label key, like the real stream): smooth
    random colour patterns plus noise, varied enough that a random CLIP does not map them all alike."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        coarse = torch.randn(n, 3, 4, 4, generator=g) * 1.5
        self.x = torch.nn.functional.interpolate(coarse, size=IMAGE, mode="bilinear") + 0.2 * torch.randn(
            n, 3, IMAGE, IMAGE, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "index": i}


def make_module(projector="mlp", **kw):
    torch.manual_seed(0)  # the projector's initialisation draws from the global RNG
    teacher, student = TinyTeacher(), TinyStudent(projector=projector)
    store = build_store(teacher, CLASSES)
    return DistillModule(teacher, student, store, **kw)


# -- the loss ------------------------------------------------------------------------------------------


def reference_kl(t, s, temperature, kd_weight, weighting):
    """Float64 evaluation of kd_weight * T^2 * sum_b sum_c p log(p / q) / (B*N or B)."""
    t, s = t.double() / temperature, s.double() / temperature
    p = torch.exp(t - torch.logsumexp(t, -1, keepdim=True))
    log_p, log_q = torch.log(p), s - torch.logsumexp(s, -1, keepdim=True)
    total = (p * (log_p - log_q)).sum()
    denom = t.numel() if weighting == "authors" else t.shape[0]
    return kd_weight * temperature**2 * total / denom


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("weighting", ["authors", "batchmean"])
def test_loss_matches_float64_reference(temperature, weighting):
    g = torch.Generator().manual_seed(7)
    t, s = torch.randn(5, 11, generator=g) * 8, torch.randn(5, 11, generator=g) * 8
    got = distillation_loss(t, s, temperature, weighting, kd_weight=3.0)
    want = reference_kl(t, s, temperature, 3.0, weighting)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(want), rel=1e-5, abs=1e-7)


def test_authors_weighting_on_a_two_by_three_example_done_by_hand():
    ln2 = math.log(2)
    t = torch.tensor([[0.0, 0.0, 0.0], [ln2, 0.0, 0.0]])
    s = torch.tensor([[ln2, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # row 1: p = (1/3, 1/3, 1/3), q = (1/2, 1/4, 1/4): KL = 1/3 ln(2/3) + 2/3 ln(4/3) = 1/3 ln(32/27)
    # row 2: p = (1/2, 1/4, 1/4), q = (1/3, 1/3, 1/3): KL = 1/2 ln(3/2) + 1/2 ln(3/4) = 1/2 ln(9/8)
    kl_sum = math.log(32 / 27) / 3 + math.log(9 / 8) / 2  # = 0.1155245...
    assert float(distillation_loss(t, s, 1.0, "authors", 1000.0)) == pytest.approx(1000 * kl_sum / 6, rel=1e-6)
    assert float(distillation_loss(t, s, 1.0, "batchmean", 1.0)) == pytest.approx(kl_sum / 2, rel=1e-6)
    assert 1000 * kl_sum / 6 == pytest.approx(19.2540886, rel=1e-7)


def test_module_loss_is_the_formula_on_teacher_and_student_logits():
    module = make_module(temperature=2.0, kd_weight=1000.0).train()
    images = Images(4, 0).x
    out = module({"image": images})
    vectors = torch.nn.functional.normalize(torch.stack([module.teacher.encode_class_names([c])[0] for c in CLASSES]).double(), dim=-1)
    with torch.no_grad():
        s_t, s_s = float(module.teacher.logit_scale()), float(module.student.logit_scale())
        t = s_t * torch.nn.functional.normalize(module.teacher.encode_image(images).double(), dim=-1) @ vectors.t()
        s = s_s * torch.nn.functional.normalize(module.student(images).double(), dim=-1) @ vectors.t()
    assert float(out["loss"].detach()) == pytest.approx(float(reference_kl(t, s, 2.0, 1000.0, "authors")), rel=1e-4)
    assert not module.teacher.training and all(not p.requires_grad for p in module.teacher.parameters())


# -- labels never reach the loss ----------------------------------------------------------------------


class Watched(dict):
    """A batch that records which keys the method reads."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.read: list[str] = []

    def __getitem__(self, key):
        self.read.append(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.append(key)
        return super().get(key, default)


def test_labels_cannot_reach_the_loss():
    module = make_module().train()
    images = Images(6, 3).x
    labels = torch.arange(6) % len(CLASSES)

    def loss_and_grads(batch):
        module.zero_grad()
        loss = module(batch)["loss"]
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in module.student.trainable_parameters()]

    batch = Watched(image=images, label=labels, index=torch.arange(6))
    plain, plain_grads = loss_and_grads(batch)
    assert batch.read == ["image"]
    permuted, permuted_grads = loss_and_grads({"image": images, "label": labels[torch.randperm(6)]})
    unlabelled, _ = loss_and_grads({"image": images})
    assert plain == permuted == unlabelled
    for a, b in zip(plain_grads, permuted_grads):
        assert torch.equal(a, b)


# -- learning: only prompts and projector move; the student comes to agree with the teacher ------------


def test_distillation_learns_and_touches_only_prompts_and_projector(tmp_path):
    # A random tiny text tower gives class vectors that one class wins for nearly every image, which
    # would make agreement meaningless; here the (fixed) class vectors are spread around the teacher's
    # image features instead (centred features of 6 prototype images), so the teacher's predictions vary.
    torch.manual_seed(0)
    teacher, student = TinyTeacher(), TinyStudent()
    with torch.no_grad():
        prototypes = teacher.encode_image(Images(len(CLASSES), 123).x)
    vectors = torch.nn.functional.normalize(prototypes - prototypes.mean(0), dim=-1)
    store = ClassVectorStore(vectors, CLASSES, float(teacher.logit_scale()))
    module = DistillModule(teacher, student, store, kd_weight=1.0, weighting="batchmean")
    frozen_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    frozen_before.update({f"student.{k}": v.clone() for k, v in module.student.state_dict().items()
                          if not k.startswith(("projector.", "vision_prompts."))})
    trainable_before = {k: v.clone() for k, v in module.student.adapter_state_dict().items()}
    assert {k.split(".")[0] for k in trainable_before} == {"vision_prompts", "projector"}

    held_out = torch.utils.data.DataLoader(Images(48, 99), batch_size=16)
    agreement = agreement_selector(held_out)
    fixed = {"image": Images(16, 5).x}
    with torch.no_grad():
        module.eval()
        loss_before = float(module(fixed)["loss"])
    agree_before = agreement(module)["score"]

    with torch.no_grad():
        assert len(set(module.teacher_logits(held_out.dataset.x).argmax(-1).tolist())) >= 3
    cfg = LoopConfig(epochs=3, batch_size=16, lr=0.05, warmup_epochs=0, num_workers=0, seed=0, log_every=5)
    fit(module, Images(64, 1), cfg, tmp_path)

    with torch.no_grad():
        module.eval()
        loss_after = float(module(fixed)["loss"])
    agree_after = agreement(module)["score"]
    assert loss_after < 0.7 * loss_before
    assert agree_after > agree_before + 30, (agree_before, agree_after)
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, frozen_before[key]), key
    for key, value in module.student.state_dict().items():
        if f"student.{key}" in frozen_before:
            assert torch.equal(value, frozen_before[f"student.{key}"]), key
    changed = [k for k, v in module.student.adapter_state_dict().items() if not torch.equal(v, trainable_before[k])]
    assert "vision_prompts.ctx" in changed and "projector.conv1.weight" in changed and "projector.bn.running_mean" in changed


def test_agreement_selection_keeps_the_best_epoch_and_survives_resume(tmp_path):
    scores = iter([10.0, 30.0, 20.0])

    def fake_select(module):  # stands for a held-out measurement; deterministic scores per epoch
        return {"score": next(scores)}

    module = make_module(selection="agreement", select_fn=fake_select)
    cfg = LoopConfig(epochs=3, batch_size=16, lr=0.05, warmup_epochs=0, num_workers=0, seed=0, max_steps=3)
    fit(module, Images(32, 1), cfg, tmp_path)  # stops inside epoch 2 (2 steps per epoch)
    kept = {k: v.clone() for k, v in module.best_state.items()}
    assert module.best_epoch == 0
    resumed = make_module(selection="agreement", select_fn=fake_select)
    out = fit(resumed, Images(32, 1), LoopConfig(**{**cfg.as_dict(), "max_steps": None}), tmp_path)
    assert [r["select_score"] for r in out["history"]] == [10.0, 30.0, 20.0]
    assert resumed.best_epoch == 1 and out["history"][-1]["best_epoch"] == 2
    assert not torch.equal(kept["vision_prompts.ctx"], resumed.best_state["vision_prompts.ctx"])  # epoch 1 -> 2
    final = resumed.student.adapter_state_dict()
    for key, value in resumed.best_state.items():
        assert torch.equal(final[key], value)  # on_train_end loaded the best epoch's tensors
    assert resumed.selection_record()["selection"].startswith("best_teacher_agreement")


def test_paper_selection_scores_base_classes_only_and_says_it_uses_test_labels():
    module = make_module(selection="paper", select_fn=lambda m: {"score": 0.0})
    assert module.selection_label == "best_base_test (paper; uses test labels)"
    images = Images(12, 4).x
    with torch.no_grad():
        module.eval()
        base_pred = module.student_logits(images)[:, :3].argmax(-1)  # first ceil(6/2) classes
    loader = [{"image": images, "label": base_pred}]
    assert base_accuracy_selector(loader)(module)["score"] == 100.0
    wrong = [{"image": images, "label": (base_pred + 1) % 3}]
    assert base_accuracy_selector(wrong)(module)["score"] == 0.0


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="weighting"):
        make_module(weighting="mean")
    with pytest.raises(ValueError, match="needs a select_fn"):
        make_module(selection="agreement")
    teacher = TinyTeacher()
    with pytest.raises(ValueError, match="projects to 24 dimensions but the class vectors have 48"):
        DistillModule(teacher, TinyStudent(teacher_dim=24), build_store(teacher, CLASSES))


def test_agreement_selector_runs_the_frozen_teacher_once_and_scores_like_a_fresh_count():
    module = make_module()
    held_out = torch.utils.data.DataLoader(Images(20, 7), batch_size=8)
    calls = []
    original = module.teacher.encode_image
    module.teacher.encode_image = lambda *a, **k: calls.append(1) or original(*a, **k)
    select = agreement_selector(held_out)
    first = select(module)["score"]
    assert len(calls) == 3  # one teacher pass per batch, the first time only
    with torch.no_grad():
        for p in module.student.trainable_parameters():
            p.add_(0.5 * torch.randn_like(p))  # the student moves between epochs, the teacher does not
    second = select(module)["score"]
    assert len(calls) == 3
    with torch.no_grad():
        module.eval()
        x = held_out.dataset.x
        expected = 100.0 * float((module.teacher_logits(x).argmax(-1) == module.student_logits(x).argmax(-1)).float().mean())
    assert second == pytest.approx(expected) and 0 <= first <= 100
