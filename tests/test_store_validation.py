"""A class-vector store is validated whole when loaded: one line naming the file and the field for each
kind of damage; stores are written atomically with the umask's mode."""

from __future__ import annotations

import json
import os
import stat
import warnings

import pytest
import torch
from safetensors.torch import save_file

from promptkd.store import FORMAT, ClassVectorStore

NAMES = ["cat", "dog", "fish"]


def good_vectors() -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=-1)


def write_raw(path, vectors=None, **meta_changes):
    """A store file written directly with safetensors (not through ClassVectorStore.save), so that it can
    hold anything; ``meta_changes`` values replace metadata fields (None removes the field)."""
    meta = {"format": FORMAT, "class_names": json.dumps(NAMES), "logit_scale": "100.0",
            "teacher": json.dumps({"kind": "test"})}
    for key, value in meta_changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    save_file({"class_vectors": good_vectors() if vectors is None else vectors}, str(path), metadata=meta)
    return path


def refused(path, *fragments: str) -> str:
    with pytest.raises(ValueError) as err:
        ClassVectorStore.load(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_a_well_formed_store_loads(tmp_path):
    store = ClassVectorStore.load(write_raw(tmp_path / "ok.safetensors"), expect_classes=NAMES)
    assert store.class_names == NAMES and store.logit_scale == 100.0 and torch.equal(store.vectors, good_vectors())


def test_nan_or_infinite_rows(tmp_path):
    for bad in (float("nan"), float("inf")):
        vectors = good_vectors()
        vectors[1, 3] = bad
        refused(write_raw(tmp_path / "v.safetensors", vectors), "tensor 'class_vectors'", "row 1", "'dog'", "NaN or inf")


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf", "0", "-4.6", "abc"])
def test_bad_logit_scale(tmp_path, scale):
    refused(write_raw(tmp_path / "s.safetensors", logit_scale=scale), "field 'logit_scale'")


def test_missing_metadata_fields(tmp_path):
    refused(write_raw(tmp_path / "a.safetensors", class_names=None), "no field 'class_names'")
    refused(write_raw(tmp_path / "b.safetensors", logit_scale=None), "no field 'logit_scale'")
    refused(write_raw(tmp_path / "c.safetensors", format=None), "field 'format'")


@pytest.mark.parametrize("names,fragment", [
    ("cat, dog, fish", "field 'class_names' is not valid JSON"),
    (json.dumps({"0": "cat"}), "field 'class_names' must be a JSON list"),
    (json.dumps("cat dog fish"), "field 'class_names' must be a JSON list"),
    (json.dumps(["cat", 2, "fish"]), "field 'class_names' must hold non-empty strings (1 do not: entry 1: 2)"),
    (json.dumps(["cat", " ", "fish"]), "entry 1: ' '"),
    (json.dumps(["cat", "dog"]), "tensor 'class_vectors' has 3 rows but field 'class_names' has 2 names"),
])
def test_class_names_of_the_wrong_shape(tmp_path, names, fragment):
    refused(write_raw(tmp_path / "n.safetensors", class_names=names), fragment)


def test_teacher_identity_must_be_an_object(tmp_path):
    refused(write_raw(tmp_path / "t.safetensors", teacher="[1, 2]"), "field 'teacher' must be a JSON object")
    refused(write_raw(tmp_path / "u.safetensors", teacher="{oops"), "field 'teacher' is not valid JSON")


def test_rows_must_be_unit_norm(tmp_path):
    vectors = good_vectors()
    vectors[2] *= 3.0
    refused(write_raw(tmp_path / "n.safetensors", vectors), "must be L2-normalised", "row 2", "'fish'", "norm 3")
    refused(write_raw(tmp_path / "z.safetensors", torch.zeros(3, 8)), "row 0", "norm 0")
    refused(write_raw(tmp_path / "d.safetensors", torch.ones(3, 4, 2)), "[classes, dim] matrix, got (3, 4, 2)")
    refused(write_raw(tmp_path / "i.safetensors", torch.ones(3, 8, dtype=torch.int32)), "floating-point")


def test_duplicate_names_are_allowed_with_a_warning(tmp_path):
    # ImageNet's CLIP-style class list really has two duplicates, so refusing them would refuse ImageNet
    path = write_raw(tmp_path / "dup.safetensors", class_names=json.dumps(["crane", "dog", "crane"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = ClassVectorStore.load(path)
    assert store.class_names == ["crane", "dog", "crane"]
    assert any("'crane' at labels [0, 2]" in str(w.message) and str(path) in str(w.message) for w in caught)


def test_a_nan_store_is_never_written(tmp_path):
    store = ClassVectorStore(good_vectors(), NAMES, 100.0)
    store.vectors = store.vectors.clone()
    store.vectors[0, 0] = float("nan")
    with pytest.raises(ValueError, match="row 0"):
        store.save(tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="logit_scale"):
        ClassVectorStore(good_vectors(), NAMES, float("inf"))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_store_is_written_atomically_with_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = ClassVectorStore(good_vectors(), NAMES, 50.0, {"k": 1}).save(tmp_path / "sub" / "cv.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in path.parent.iterdir()) == ["cv.safetensors"]  # no temporary left
    assert ClassVectorStore.load(path).teacher == {"k": 1}
