"""The README's Python API block, run exactly as written, in a folder holding the files it names (tiny random
CLIP checkpoints under the real names, a small image folder, a photo)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- readme-python-api"


def readme_block() -> str:
    text = README.read_text()
    start = text.index(MARKER)
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, "no python block after the marker"
    return match.group(1)


@pytest.mark.slow
def test_the_readme_python_api_block_runs_as_written(tmp_path):
    from promptkd.data.fixtures import make_image_folder
    from promptkd.models.clip import tiny_clip
    from promptkd.models.weights import save_clip

    make_image_folder(tmp_path / "my_data", classes=3, per_class=10)
    shutil.copy(tmp_path / "my_data" / "class_a" / "img0.jpg", tmp_path / "photo.jpg")
    save_clip(tiny_clip(seed=1, width=48, layers=9, image_size=32, patch_size=8), tmp_path / "ViT-L-14.safetensors")
    save_clip(tiny_clip(seed=2, width=32, layers=9, image_size=32, patch_size=8), tmp_path / "ViT-B-16.safetensors")
    code = readme_block()
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert re.match(r"student my_data seed 1: accuracy \d+\.\d\d", lines[0]), lines
    assert len(lines) == 2 and "photo.jpg" in lines[1]  # one prediction printed
    for made in ("teacher/adapter.json", "class_vectors.safetensors", "student/adapter.json", "eval_student/results.json"):
        assert (tmp_path / "runs" / "my_data" / made).is_file(), made
