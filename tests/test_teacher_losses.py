"""PromptSRC's regularisers and Gaussian prompt aggregation against float64 references."""

import math

import pytest
import torch
from torch import nn

from promptkd.methods import promptsrc
from promptkd.models import backbones


def _unit64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True)


def test_feature_l1_matches_float64_formula():
    torch.manual_seed(0)
    a, b = torch.randn(5, 7) * 3, torch.randn(5, 7)
    reference = (_unit64(a) - _unit64(b)).abs().mean()
    assert promptsrc.feature_l1(a, b).double().item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logits_kl_is_kl_frozen_to_prompted_summed_over_batch_and_classes(temperature):
    torch.manual_seed(1)
    prompted, frozen = torch.randn(4, 6) * 5, torch.randn(4, 6) * 5
    p = torch.softmax(prompted.double() / temperature, -1)
    q = torch.softmax(frozen.double() / temperature, -1)  # the frozen model is the target
    reference = (q * (q.log() - p.log())).sum() * temperature**2 / prompted.numel()
    got = promptsrc.logits_kl(prompted, frozen, temperature)
    assert got.double().item() == pytest.approx(reference.item(), rel=1e-5)
    # direction matters: the reverse KL is a different number
    reverse = (p * (p.log() - q.log())).sum() * temperature**2 / prompted.numel()
    assert abs(reverse.item() - reference.item()) > 1e-3


def test_gaussian_epoch_weights_follow_the_density_and_sum_to_one():
    weights = promptsrc.gaussian_epoch_weights(20, mean=15, std=1)
    density = [math.exp(-0.5 * (e - 15) ** 2) / math.sqrt(2 * math.pi) for e in range(1, 21)]
    total = sum(density)
    assert weights == pytest.approx([d / total for d in density], rel=1e-12)
    assert max(range(20), key=weights.__getitem__) == 14  # epoch 15 (1-based) weighs most
    far = promptsrc.gaussian_epoch_weights(2, mean=40, std=1)  # density underflows in float64
    assert all(math.isfinite(w) for w in far) and sum(far) == pytest.approx(1.0)
    assert far[1] > far[0]


class ToyTeacher(backbones.Teacher):
    """A two-tower stand-in: frozen linear encoders plus additive prompts in both towers."""

    def __init__(self, dim: int = 6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.image_tower = nn.Linear(12, dim)
        self.word = nn.Embedding(50, dim)
        for p in (*self.image_tower.parameters(), self.word.weight):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g))
            p.requires_grad_(False)
        self.vision_prompt = nn.Parameter(torch.randn(dim, generator=g) * 0.5)
        self.text_prompt = nn.Parameter(torch.randn(dim, generator=g) * 0.5)
        self.embed_dim = dim

    def _ids(self, texts):
        return torch.tensor([sum(map(ord, t)) % 50 for t in texts])

    def encode_image(self, images, prompted=True):
        f = self.image_tower(images.flatten(1))
        return f + self.vision_prompt if prompted else f

    def encode_class_names(self, class_names, prompted=True):
        if not prompted:
            return self.encode_text([f"a photo of a {c}." for c in class_names])
        return self.word(self._ids(class_names)) + self.text_prompt

    def encode_text(self, texts):
        return self.word(self._ids(texts))

    def logit_scale(self):
        return torch.tensor(100.0)

    def identity(self):
        return {"kind": "toy"}


def test_module_loss_is_ce_plus_weighted_regularisers_float64():
    torch.manual_seed(2)
    teacher = ToyTeacher()
    names = ["cat", "dog", "ship"]
    templates = ["a photo of a {}.", "art of the {}.", "a {} in a video game."]
    module = promptsrc.PromptSRCModule(teacher, names, {"method": "promptsrc", "templates": templates})
    images, labels = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 1])
    out = module({"image": images, "label": labels})

    # float64 reference from the teacher's raw features
    img = teacher.encode_image(images).detach()
    txt = teacher.encode_class_names(names).detach()
    frozen_img = teacher.encode_image(images, prompted=False).detach()
    ens = torch.stack([teacher.encode_text([t.format(c) for c in names]).double() for t in templates]).mean(0)
    logits = 100.0 * _unit64(img) @ _unit64(txt).t()
    frozen_logits = 100.0 * _unit64(frozen_img) @ _unit64(ens).t()
    ce = torch.nn.functional.cross_entropy(logits, labels)
    l_img = 10 * (_unit64(img) - _unit64(frozen_img)).abs().mean()
    l_txt = 25 * (_unit64(txt) - _unit64(ens)).abs().mean()
    p, q = torch.log_softmax(logits, -1), torch.log_softmax(frozen_logits, -1)
    l_kl = (q.exp() * (q - p)).sum() / logits.numel()
    assert out["l_image"].item() == pytest.approx(l_img.item(), rel=1e-5)
    assert out["l_text"].item() == pytest.approx(l_txt.item(), rel=1e-5)
    assert out["l_logits"].item() == pytest.approx(l_kl.item(), rel=1e-4, abs=1e-6)
    assert out["loss"].item() == pytest.approx((ce + l_img + l_txt + l_kl).item(), rel=1e-5)
    # the ensemble is computed once, at construction
    assert torch.allclose(module.frozen_text_features.double(), _unit64(ens), atol=1e-6)


def test_ivlp_and_coop_options_train_with_cross_entropy_only():
    teacher = ToyTeacher()
    for method in ("ivlp", "coop"):
        module = promptsrc.PromptSRCModule(teacher, ["a", "b"], {"method": method})
        out = module({"image": torch.randn(2, 3, 2, 2), "label": torch.tensor([0, 1])})
        assert "l_image" not in out and torch.equal(out["loss"].detach(), out["ce"])
        assert module.on_epoch_end(0) == {}
    with pytest.raises(ValueError, match="method must be one of"):
        promptsrc.PromptSRCConfig(method="maple")


def test_gpa_equals_hand_weighted_average_and_survives_a_state_round_trip():
    epochs = 4
    teacher = ToyTeacher()
    cfg = {"method": "promptsrc", "epochs": epochs, "gpa_mean": 3, "gpa_std": 1, "templates": ["{}"]}
    module = promptsrc.PromptSRCModule(teacher, ["a", "b"], cfg)
    snapshots = []
    for epoch in range(epochs):
        with torch.no_grad():
            teacher.vision_prompt.copy_(torch.randn(6))
            teacher.text_prompt.copy_(torch.randn(6))
        snapshots.append((teacher.vision_prompt.double().clone(), teacher.text_prompt.double().clone()))
        module.on_epoch_end(epoch)
        if epoch == 1:  # a resume between epochs: a fresh module picks the accumulated state up
            state = module.state_dict_extra()
            module = promptsrc.PromptSRCModule(teacher, ["a", "b"], cfg)
            module.load_state_dict_extra(state)
    module.on_train_end()
    dens = [math.exp(-0.5 * (e - 3) ** 2) for e in range(1, epochs + 1)]
    w = [d / sum(dens) for d in dens]
    want_v = sum(wi * v for wi, (v, _) in zip(w, snapshots))
    want_t = sum(wi * t for wi, (_, t) in zip(w, snapshots))
    assert torch.allclose(teacher.vision_prompt.double(), want_v, atol=1e-6)
    assert torch.allclose(teacher.text_prompt.double(), want_t, atol=1e-6)
