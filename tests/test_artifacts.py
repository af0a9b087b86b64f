"""Adapter artefacts and the AdapterMixin contract, on a small stand-in backbone."""

import json

import pytest
import torch
from torch import nn

from promptkd import artifacts
from promptkd.models import backbones
from promptkd.store import ClassVectorStore


class TinyStudent(backbones.Student):
    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8))  # frozen, has buffers
        self.prompt = nn.Parameter(torch.randn(2, 8, generator=g))
        self.head = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))  # trainable, has buffers
        with torch.no_grad():
            for p in self.trunk.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.trunk.requires_grad_(False)
        self.embed_dim = 4

    def forward(self, images):
        return self.head(self.trunk(images.flatten(1)) + self.prompt.sum(0))

    def logit_scale(self):
        return torch.tensor(100.0)

    def identity(self):
        return {"kind": "tiny-test", "seed": 0}


backbones.register_builder("tiny-test", "student", lambda identity, **_: TinyStudent(identity["seed"]))


def test_adapter_holds_trainable_tensors_and_their_buffers_only():
    model = TinyStudent()
    keys = set(model.adapter_state_dict())
    assert "prompt" in keys and "head.0.weight" in keys
    assert {"head.1.running_mean", "head.1.running_var", "head.1.num_batches_tracked"} <= keys
    assert not any(k.startswith("trunk.") for k in keys)


def test_frozen_modules_stay_in_eval_mode():
    model = TinyStudent().train()
    assert model.head[1].training and not model.trunk[1].training
    before = model.trunk[1].running_mean.clone()
    model(torch.randn(5, 6))
    assert torch.equal(model.trunk[1].running_mean, before)  # frozen BN statistics untouched
    assert not torch.equal(model.head[1].running_mean, torch.zeros(4))


def test_save_load_round_trip_rebuilds_from_identity(tmp_path):
    model = TinyStudent().train()
    for _ in range(3):
        model(torch.randn(5, 6))  # move BN statistics so buffers matter
    with torch.no_grad():
        model.prompt.add_(1.0)
    store = ClassVectorStore(torch.nn.functional.normalize(torch.randn(3, 4), dim=-1), ["a", "b", "c"], 50.0)
    out = artifacts.save_adapter(model, tmp_path / "student", "student", store=store, config={"lr": 0.1})
    loaded, meta = artifacts.load_adapter(out, role="student")
    x = torch.randn(4, 6)
    assert torch.equal(loaded.eval()(x), model.eval()(x))
    assert meta["class_names"] == ["a", "b", "c"] and meta["store_fingerprint"] == store.fingerprint()
    assert ClassVectorStore.load(out / artifacts.STORE).fingerprint() == store.fingerprint()
    with pytest.raises(ValueError, match="is a student, not a teacher"):
        artifacts.load_adapter(out, role="teacher")


def test_corrupt_or_mismatched_artefacts_are_refused(tmp_path):
    out = artifacts.save_adapter(TinyStudent(), tmp_path / "s", "student")
    original = (out / artifacts.TENSORS).read_bytes()
    data = bytearray(original)
    data[-1] ^= 0xFF
    (out / artifacts.TENSORS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        artifacts.load_adapter(out)
    (out / artifacts.TENSORS).write_bytes(original)
    meta = json.loads((out / artifacts.META).read_text())
    meta["backbone"]["kind"] = "nope"
    (out / artifacts.META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="no student builder for backbone kind 'nope'"):
        artifacts.load_adapter(out)
    with pytest.raises(FileNotFoundError, match="adapter.json"):
        artifacts.load_adapter(tmp_path)


def test_load_adapter_state_dict_names_key_and_shape():
    model = TinyStudent()
    state = model.adapter_state_dict()
    state["prompt"] = torch.zeros(3, 8)
    with pytest.raises(ValueError, match=r"prompt: file has \(3, 8\)"):
        model.load_adapter_state_dict(state, source="x.safetensors")
    del state["prompt"]
    with pytest.raises(ValueError, match="missing keys \\['prompt'\\]"):
        model.load_adapter_state_dict(state, source="x.safetensors")
