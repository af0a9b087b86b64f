"""scripts/reproduce_base2novel.sh as a user runs it (without an activated venv): one teacher per dataset reused
by every seed (the authors' protocol), a student per seed, evaluations, and a report; re-running skips
everything finished."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = "--set train.epochs=1 --set train.warmup_epochs=0 --set train.batch_size=4 --set train.precision=fp32 --set train.num_workers=0 " \
       "--set train.device=cpu"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_script_trains_one_teacher_per_dataset_and_a_student_per_seed(tmp_path):
    if not (ROOT / ".venv" / "bin" / "promptkd").is_file():
        pytest.skip("no .venv in this checkout (bash scripts/setup.sh makes it)")
    from promptkd.data.fixtures import make_fixture
    from promptkd.models.clip import tiny_clip
    from promptkd.models.weights import save_clip

    make_fixture(tmp_path / "data", "DTD", classes=4, per_class=3, test_per_class=1)
    save_clip(tiny_clip(seed=1, width=48, layers=1, image_size=32, patch_size=8), tmp_path / "t.safetensors")
    save_clip(tiny_clip(seed=2, width=32, layers=1, image_size=32, patch_size=8), tmp_path / "s.safetensors")
    env = {k: v for k, v in os.environ.items() if k != "PROMPTKD"}
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if ".venv" not in p)  # not activated
    env.update(DATASETS="dtd", SEEDS="1 2", OUT=str(tmp_path / "runs"),
               TEACHER_SET=f"{FAST} --set data.shots=2 --set teacher.text_depth=1 --set teacher.vision_depth=1 "
                           "--set method.templates=single --set method.gpa_mean=1",
               STUDENT_SET=f"{FAST} --set student.depth=1")
    cmd = ["bash", str(ROOT / "scripts" / "reproduce_base2novel.sh"), str(tmp_path / "data"),
           str(tmp_path / "t.safetensors"), str(tmp_path / "s.safetensors")]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = tmp_path / "runs" / "dtd"
    assert (runs / "teacher" / "adapter.json").is_file() and not (runs / "seed1" / "teacher").exists()
    teachers = {json.loads((runs / f"seed{s}" / "student" / "run.json").read_text())["teacher"] for s in (1, 2)}
    assert teachers == {str(runs / "teacher")}  # both seeds distil from the one teacher
    seeds = {json.loads((runs / f"seed{s}" / "student" / "adapter.json").read_text())["seed"] for s in (1, 2)}
    assert seeds == {1, 2}
    assert (tmp_path / "runs" / "report" / "report.md").is_file()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "train-teacher" not in again.stderr and "distill:" not in again.stderr
    # other student settings over the same OUT: refused before anything runs, nothing mixed into the table
    other = subprocess.run(cmd, env={**env, "STUDENT_SET": f"{FAST} --set student.depth=1 --set method.selection=paper"},
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "was made with other settings" in other.stderr and "distill:" not in other.stderr
    assert str(runs / "seed1" / "student") in other.stderr
