import json

import pytest
import torch

from promptkd import config
from promptkd.store import ClassListMismatch, ClassVectorStore


def test_overrides_parse_yaml_values_and_reject_unknown_keys():
    defaults = {"optim": {"lr": 0.005, "epochs": 20}, "name": "x"}
    cfg = config.resolve(defaults, overrides=["optim.lr=0.16", "name=y"])
    assert cfg["optim"]["lr"] == pytest.approx(0.16) and cfg["name"] == "y"
    assert defaults["optim"]["lr"] == 0.005  # defaults untouched
    with pytest.raises(config.ConfigError, match="optim.lrr"):
        config.resolve(defaults, overrides=["optim.lrr=1"])


def test_yaml_round_trip(tmp_path):
    cfg = {"a": {"b": [1, 2]}, "p": tmp_path}
    path = config.save(cfg, tmp_path / "c.yaml")
    assert config.load_yaml(path) == {"a": {"b": [1, 2]}, "p": str(tmp_path)}


def test_store_round_trip_and_class_check(tmp_path):
    vec = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    store = ClassVectorStore(vec, ["cat", "dog", "fish"], 100.0, {"kind": "test"})
    path = store.save(tmp_path / "cv.safetensors")
    loaded = ClassVectorStore.load(path, expect_classes=["cat", "dog", "fish"])
    assert torch.equal(loaded.vectors, vec) and loaded.logit_scale == 100.0
    assert loaded.teacher == {"kind": "test"} and loaded.fingerprint() == store.fingerprint()
    with pytest.raises(ClassListMismatch, match="label 1"):
        ClassVectorStore.load(path, expect_classes=["cat", "wolf", "fish"])
    with pytest.raises(ClassListMismatch, match="2"):
        ClassVectorStore.load(path, expect_classes=["cat", "dog"])


def test_store_logits_match_float64_reference():
    vec = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    store = ClassVectorStore(vec, list("abcde"), 100.0)
    feats = torch.randn(2, 4)
    ref = 100.0 * (feats.double() / feats.double().norm(dim=-1, keepdim=True)) @ vec.double().t()
    assert torch.allclose(store.logits(feats).double(), ref, rtol=1e-5, atol=1e-4)
    assert json.loads(json.dumps(store.class_names)) == list("abcde")


def test_flatten_and_differences_name_each_changed_key():
    old = {"train": {"lr": 0.005, "num_workers": 2}, "data": {"shots": 16}}
    new = {"train": {"lr": 0.01, "num_workers": 8}, "data": {"shots": 16, "extra": 1}}
    assert config.flatten(old) == {"train.lr": 0.005, "train.num_workers": 2, "data.shots": 16}
    assert config.differences(old, new, ignore=["train.num_workers"]) == [
        "data.extra: None -> 1", "train.lr: 0.005 -> 0.01"]


def test_a_misspelt_preset_gets_the_closest_name_and_an_unknown_one_the_groups():
    from promptkd import config as cfgmod

    with pytest.raises(cfgmod.ConfigError, match=r"'teacher/custum'.*\(did you mean 'teacher/custom'\?\)"):
        cfgmod.load_yaml("teacher/custum")
    with pytest.raises(cfgmod.ConfigError, match=r"did you mean 'distill/base2novel/dtd'\?"):
        cfgmod.load_yaml("distill/base2novel/dtdd")
    with pytest.raises(cfgmod.ConfigError) as err:
        cfgmod.load_yaml("nothing")
    assert "distill/base2novel/..." in str(err.value) and "teacher/imagenet_all" in str(err.value)
    assert "distill/base2novel/caltech101" not in str(err.value)  # groups, not all 29 presets


def test_settings_that_defeat_their_purpose_say_which_key_to_change():
    import warnings

    from promptkd.engine.loop import LoopConfig
    from promptkd.stages import teacher_settings

    with pytest.raises(ValueError, match=r"train.warmup_epochs=1 must be less than train.epochs=1 .*warmup_epochs=0"):
        LoopConfig(epochs=1, warmup_epochs=1)
    with pytest.warns(UserWarning, match=r"method.gpa_mean=15 is outside the 2 epoch\(s\).*method.gpa_mean=2\)"):
        teacher_settings("teacher/base2novel", ["train.epochs=2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        teacher_settings("teacher/base2novel")  # the paper's 20 epochs, mean 15
        teacher_settings("teacher/base2novel", ["train.epochs=2", "method.gpa_mean=2"])
        teacher_settings("teacher/base2novel", ["train.epochs=2", "method.method=ivlp"])  # no GPA in IVLP
