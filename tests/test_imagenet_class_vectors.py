"""ImageNet's class list (CoOp's classnames.txt, as packaged) names two classes twice: "missile" (n03773504,
n04008634) and "sunglasses" (n04355933, n04356056). The authors encode one prompt per label, so both
labels of a pair get the same text feature; `promptkd class-vectors --dataset ImageNet` must do the same
instead of refusing the dataset (which blocked every ImageNet distill preset), and say so in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import torch
import torch.nn.functional as F

from promptkd import artifacts
from promptkd.data.benchmarks import packaged_asset, packaged_imagenet_wnids, prompt_name, read_classnames_file
from promptkd.models.clip import tiny_clip
from promptkd.models.clip_backbones import load_clip_teacher
from promptkd.models.prompts import PromptConfig
from promptkd.models.weights import save_clip
from promptkd.store import ClassVectorStore

PAIRS = {"missile": ("n03773504", "n04008634"), "sunglasses": ("n04355933", "n04356056")}


def _imagenet_root(root):
    """CoOp's ImageNet layout with the real class list and one (never read) file per class folder."""
    ds = root / "imagenet"
    ds.mkdir(parents=True)
    shutil.copyfile(packaged_asset("imagenet_classnames.txt"), ds / "classnames.txt")
    for wnid in packaged_imagenet_wnids():
        for split in ("train", "val"):
            folder = ds / "images" / split / wnid
            folder.mkdir(parents=True)
            (folder / f"{wnid}_1.JPEG").touch()
    return root


def test_class_vectors_of_imagenet_keep_both_labels_of_a_repeated_name(tmp_path):
    clip = save_clip(tiny_clip(seed=3, width=32, layers=1, image_size=32, patch_size=8), tmp_path / "clip.safetensors")
    teacher = load_clip_teacher(clip, PromptConfig(text_depth=1, vision_depth=1))
    artifacts.save_adapter(teacher, tmp_path / "teacher", "teacher")
    data = _imagenet_root(tmp_path / "data")
    out = tmp_path / "imagenet_cv.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PROMPTKD_PROGRESS": "off"}
    done = subprocess.run([sys.executable, "-m", "promptkd", "class-vectors", "--teacher", tmp_path / "teacher",
                           "--dataset", "ImageNet", "--data-root", data, "--out", out, "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    warning = [ln for ln in done.stderr.splitlines() if "appear more than once" in ln]
    assert len(warning) == 1 and warning[0].startswith("promptkd class-vectors: warning: 2 class name(s)")
    assert "'missile' at labels [" in warning[0] and "UserWarning" not in done.stderr

    wnid_names = read_classnames_file(packaged_asset("imagenet_classnames.txt"))
    names = [prompt_name(wnid_names[w]) for w in packaged_imagenet_wnids()]
    store = ClassVectorStore.load(out, expect_classes=names)  # what distill checks the store against
    assert len(store.class_names) == 1000
    wnids = packaged_imagenet_wnids()
    with torch.no_grad():
        for name, pair in PAIRS.items():
            a, b = (wnids.index(w) for w in pair)
            assert store.class_names[a] == store.class_names[b] == name
            expected = F.normalize(teacher.encode_class_names([name]).float(), dim=-1)[0]
            torch.testing.assert_close(store.vectors[a], expected, rtol=0, atol=1e-6)
            assert torch.equal(store.vectors[a], store.vectors[b])
        some = [0, 1, 999]
        expected = F.normalize(teacher.encode_class_names([names[i] for i in some]).float(), dim=-1)
        torch.testing.assert_close(store.vectors[some], expected, rtol=0, atol=1e-6)
