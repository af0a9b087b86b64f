"""Checkpoint layouts real users have, checked against transformers' own forward pass:

* a weights file inside a Hugging Face hub cache (``snapshots/<rev>/<file>`` is a symbolic link into
  ``blobs/``): its config is beside the link, and must be read there (a LAION GELU model would otherwise be
  taken for QuickGELU);
* a ``CLIPVisionModelWithProjection`` folder (flat config, no text tower, no logit_scale) as a student;
* older transformers' sharded ``pytorch_model.bin.index.json`` folders;
* a state dict without ``logit_scale``: fine for an image tower (students never use it), refused with the
  reason for a whole CLIP (a teacher's logit scale cannot be guessed)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from test_clip_parity import SHAPES, assert_same, captions, hf_reference, make_hf_model, ours, photos, rel_err

transformers = pytest.importorskip("transformers")

from promptkd.models.weights import load_clip  # noqa: E402


@pytest.fixture(scope="module")
def gelu_case(tmp_path_factory):
    """Shape B of test_clip_parity (GELU, 3 heads): heads and activation must come from the config."""
    model = make_hf_model("B", seed=3)
    folder = tmp_path_factory.mktemp("hf_B")
    model.save_pretrained(folder)
    images, tokens = photos(SHAPES["B"]["vision"]["image_size"]), captions()
    return {"model": model, "folder": folder, "images": images, "tokens": tokens,
            "ref": hf_reference(model, images, tokens)}


def _hub_cache(src_folder, root):
    """transformers' cache layout: every file of a snapshot is a relative link to a blob named by hash."""
    snap = root / "models--someone--clip" / "snapshots" / "0123abcd"
    blobs = root / "models--someone--clip" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir(parents=True)
    for i, f in enumerate(sorted(src_folder.iterdir())):
        blob = blobs / f"{i:040x}"
        shutil.copyfile(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    return snap


def test_a_weights_file_in_a_hub_cache_reads_the_config_beside_its_link(gelu_case, tmp_path):
    snap = _hub_cache(gelu_case["folder"], tmp_path)
    for given in (snap, snap / "model.safetensors"):
        loaded = load_clip(given, with_info=True)
        assert loaded.model.cfg.act == "gelu" and loaded.model.cfg.vision.heads == 3, given
        assert loaded.source.startswith(str(snap)), loaded.source  # the path the user gave, not the blob
        assert_same(ours(loaded.model, gelu_case["images"], gelu_case["tokens"]), gelu_case["ref"], str(given))


def test_a_vision_tower_with_projection_loads_as_a_student(gelu_case, tmp_path):
    cfg = gelu_case["model"].config
    vision = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**{**cfg.vision_config.to_dict(), "projection_dim": cfg.projection_dim})).eval()
    vision.load_state_dict({k: v for k, v in gelu_case["model"].state_dict().items()
                            if k.startswith(("vision_model.", "visual_projection."))})
    vision.save_pretrained(tmp_path / "vision")
    assert json.loads((tmp_path / "vision" / "config.json").read_text())["model_type"] == "clip_vision_model"
    model = load_clip(tmp_path / "vision", image_only=True)
    assert model.cfg.vision.heads == 3 and model.cfg.act == "gelu"
    with torch.no_grad():
        ref = vision(pixel_values=gelu_case["images"]).image_embeds
        got = model.encode_image(gelu_case["images"])
    assert rel_err(got, ref) <= 1e-5 and rel_err(got, gelu_case["ref"]["image"]) <= 1e-5


def test_sharded_pytorch_model_bin_folder(gelu_case, tmp_path):
    """transformers < 5 with safe_serialization=False and a max_shard_size (written by hand here)."""
    state = gelu_case["model"].state_dict()
    keys = list(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), 1):
        name = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: state[k] for k in part}, tmp_path / name)
        weight_map.update(dict.fromkeys(part, name))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copyfile(gelu_case["folder"] / "config.json", tmp_path / "config.json")
    assert_same(ours(load_clip(tmp_path), gelu_case["images"], gelu_case["tokens"]), gelu_case["ref"], "sharded bin")


def test_no_logit_scale_is_fine_for_an_image_tower_and_refused_for_a_whole_clip(gelu_case, tmp_path):
    whole = load_clip(gelu_case["folder"])
    state = {k: v.contiguous() for k, v in whole.state_dict().items() if k != "logit_scale"}
    arch = tmp_path / "open_clip_config.json"
    from test_clip_parity import open_clip_model_cfg

    arch.write_text(json.dumps({"model_cfg": open_clip_model_cfg("B")}))
    save_file(state, tmp_path / "open_clip_model.safetensors")
    student = load_clip(tmp_path / "open_clip_model.safetensors", image_only=True)
    with torch.no_grad():
        assert rel_err(student.encode_image(gelu_case["images"]), gelu_case["ref"]["image"]) <= 1e-5
    save_file({k: v for k, v in state.items() if k.startswith("visual.")}, tmp_path / "visual_only.safetensors")
    assert load_clip(tmp_path / "visual_only.safetensors", image_only=True).cfg.text is None
    with pytest.raises(ValueError, match=r"open_clip_model.safetensors: no 'logit_scale' tensor, so the logits' "
                                         r"temperature is unknown"):
        load_clip(tmp_path / "open_clip_model.safetensors")
