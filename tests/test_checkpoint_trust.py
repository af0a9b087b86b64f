"""Trust, file recognition, prompt depths and file modes of checkpoints and artefacts (issues 9.5, 11.12,
11.17, 11.18).

* ``--trust-checkpoint`` covers the files named on the command line only: a pickle whose path is written
  inside someone's ``adapter.json`` is never unpickled (a malicious one would create a marker file).
* Bytes that merely start like a pickle are reported as "not a checkpoint", never as "pass
  --trust-checkpoint"; real torch.save files with Python objects still get that advice.
* A checkpoint whose prompts go deeper than its model is refused, naming the key.
* Artefacts and converted weights get the umask's mode, like every other file.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import zipfile
from pathlib import Path

import pytest
import torch

from promptkd import artifacts
from promptkd.cli import main
from promptkd.methods import dassl_import
from promptkd.models.clip import tiny_clip
from promptkd.models.clip_backbones import load_clip_student, load_clip_teacher, tiny_clip_teacher
from promptkd.models.prompts import PromptConfig
from promptkd.models.weights import UntrustedCheckpointError, load_clip, save_clip
from promptkd.store import build_store

NAMES = ["red fox", "grey wolf", "brown bear"]
TEACHER_PROMPTS = PromptConfig(n_ctx_text=2, text_depth=1, n_ctx_vision=2, vision_depth=1)


class MakesMarker:
    """Unpickling this runs ``open(marker, "w")``: it stands for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def world(tmp_path):
    """A teacher and a student artefact whose adapter.json point at a malicious pickle of the same tensors."""
    clip = tiny_clip(seed=1, width=32, layers=1, image_size=32, patch_size=8)
    safe = save_clip(clip, tmp_path / "clip.safetensors")
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil_clip.pt"
    torch.save({"state_dict": clip.state_dict(), "hook": MakesMarker(marker)}, evil)
    assert not marker.exists()
    teacher = load_clip_teacher(safe, TEACHER_PROMPTS)
    artifacts.save_adapter(teacher, tmp_path / "teacher", "teacher", class_names=NAMES)
    student = load_clip_student(safe, teacher_dim=teacher.embed_dim, prompts=PromptConfig(vision_depth=1))
    artifacts.save_adapter(student, tmp_path / "student", "student", store=build_store(teacher, NAMES))
    for folder in ("teacher", "student"):  # what a third party's artefact could say
        meta_path = tmp_path / folder / artifacts.META
        meta = json.loads(meta_path.read_text())
        meta["backbone"]["weights"] = str(evil)
        meta_path.write_text(json.dumps(meta))
    (tmp_path / "names.txt").write_text("\n".join(NAMES))
    image = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    return {"root": tmp_path, "evil": evil, "marker": marker, "image": image}


def test_trust_never_reaches_a_pickle_named_inside_an_artefact(world, capsys):
    root, marker = world["root"], world["marker"]
    with pytest.raises(UntrustedCheckpointError, match="promptkd convert .*evil_clip.pt") as info:
        artifacts.load_adapter(root / "teacher", trust_checkpoint=True)
    assert "covers only files named on the command line" in str(info.value)
    assert not marker.exists()

    cv = ["class-vectors", "--teacher", str(root / "teacher"), "--class-names", str(root / "names.txt"),
          "--out", str(root / "cv.safetensors"), "--device", "cpu"]
    assert main([*cv, "--trust-checkpoint"]) == 2
    err = capsys.readouterr().err
    assert "promptkd convert" in err and "Traceback" not in err and not marker.exists()
    assert main(["predict", str(world["image"]), "--student", str(root / "student"), "--trust-checkpoint"]) == 2
    assert "promptkd convert" in capsys.readouterr().err and not marker.exists()

    # the same file named on the command line: refused without the flag, unpickled with it (the user's call)
    assert main([*cv, "--clip-weights", str(world["evil"])]) == 2
    assert "--trust-checkpoint" in capsys.readouterr().err and not marker.exists()
    assert main([*cv, "--clip-weights", str(world["evil"]), "--trust-checkpoint"]) == 0
    assert marker.exists()


def _noise(path: Path, first: bytes = b"\x80", size: int = 4000) -> Path:
    rng = random.Random(0)
    path.write_bytes(first + bytes(rng.getrandbits(8) for _ in range(size)))
    return path


class NotATensor:
    pass


def test_bytes_that_only_look_like_a_pickle_are_not_called_one(tmp_path, capsys):
    from promptkd.models.weights import is_torch_pickle

    garbage = _noise(tmp_path / "garbage.pt")
    plain_pickle = tmp_path / "plain.pkl"  # a real pickle, but not a torch.save file
    plain_pickle.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=2))
    not_torch_zip = tmp_path / "archive.pt"
    with zipfile.ZipFile(not_torch_zip, "w") as z:
        z.writestr("notes.txt", "hello")
    real = tmp_path / "real.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, real)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(real.read_bytes()[: len(real.read_bytes()) // 2])
    for bad in (garbage, plain_pickle, not_torch_zip, truncated):
        assert not is_torch_pickle(bad), bad
        for trust in (False, True):  # even a trusting caller never unpickles it
            with pytest.raises(ValueError, match="not a PyTorch checkpoint|damaged zip archive") as info:
                load_clip(bad, trust_checkpoint=trust)
            assert not isinstance(info.value, UntrustedCheckpointError)
            assert "trust" not in str(info.value) and str(bad) in str(info.value)
        with pytest.raises(ValueError, match="not a PyTorch checkpoint") as info:
            dassl_import.read_dassl_teacher(bad, trust_checkpoint=True)
        assert not isinstance(info.value, dassl_import.UntrustedCheckpointError)
    assert main(["convert", str(garbage), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "not a PyTorch checkpoint" in err and "--trust-checkpoint" not in err

    # real torch.save files with Python objects, zip and legacy format, still get the advice to trust
    for name, zip_format in (("objects.pt", True), ("objects_legacy.pt", False)):
        path = tmp_path / name
        torch.save({"state_dict": {"w": torch.zeros(2)}, "x": NotATensor()}, path,
                   _use_new_zipfile_serialization=zip_format)
        assert is_torch_pickle(path)
        with pytest.raises(UntrustedCheckpointError, match="--trust-checkpoint"):
            load_clip(path)
        with pytest.raises(dassl_import.UntrustedCheckpointError, match="--trust-checkpoint"):
            dassl_import.read_dassl_teacher(path)


def _dassl_state(deep_vision_layers: tuple[int, ...]) -> dict:
    g = torch.Generator().manual_seed(0)
    state = {"prompt_learner.ctx": torch.randn(4, 8, generator=g), "image_encoder.VPT": torch.randn(4, 16, generator=g),
             "text_encoder.transformer.resblocks.1.VPT_shallow": torch.randn(4, 8, generator=g)}
    for i in (0, 1):  # the frozen CLIP in the checkpoint: 2 blocks per tower
        state[f"text_encoder.transformer.resblocks.{i}.ln_1.weight"] = torch.ones(8)
        state[f"image_encoder.transformer.resblocks.{i}.ln_1.weight"] = torch.ones(16)
    for i in deep_vision_layers:
        state[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(4, 16, generator=g)
    return state


def test_prompts_deeper_than_the_model_are_refused_naming_the_key(tmp_path):
    ok = tmp_path / "ok.pth.tar"
    torch.save({"state_dict": _dassl_state((1,))}, ok)
    assert dassl_import.read_dassl_teacher(ok).vision_depth == 2
    deep = tmp_path / "deep.pth.tar"
    torch.save({"state_dict": _dassl_state((1, 2))}, deep)
    with pytest.raises(ValueError, match=r"deep.pth.tar: image_encoder\.transformer\.resblocks\.2\.VPT_shallow: "
                                         r"a prompt for layer 2, but the checkpoint's vision transformer has 2 layers"):
        dassl_import.read_dassl_teacher(deep)

    # our own artefact, whose adapter.json claims more prompt layers than its CLIP has
    teacher = tiny_clip_teacher(seed=0, prompts=PromptConfig(text_depth=2, vision_depth=2), layers=2)
    out = artifacts.save_adapter(teacher, tmp_path / "teacher", "teacher")
    meta = json.loads((out / artifacts.META).read_text())
    meta["backbone"]["prompts"]["vision_depth"] = 3
    (out / artifacts.META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"adapter.json: backbone.prompts.vision_depth = 3: .* has only 2 layers"):
        artifacts.load_adapter(out)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_artefacts_and_converted_weights_get_the_umasks_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        clip = tiny_clip(seed=2, width=32, layers=1, image_size=32, patch_size=8)
        weights = save_clip(clip, tmp_path / "clip.safetensors")
        teacher = load_clip_teacher(weights, TEACHER_PROMPTS)
        student = load_clip_student(weights, teacher_dim=teacher.embed_dim, prompts=PromptConfig(vision_depth=1))
        out = artifacts.save_adapter(student, tmp_path / "student", "student", store=build_store(teacher, NAMES))
        assert main(["convert", str(weights), str(tmp_path / "converted.safetensors")]) == 0
    finally:
        os.umask(old)
    files = [out / artifacts.TENSORS, out / artifacts.META, out / artifacts.STORE, weights,
             tmp_path / "converted.safetensors"]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(mode) for f in files}
    assert not list(tmp_path.rglob("*.tmp*"))  # no temporary left behind
