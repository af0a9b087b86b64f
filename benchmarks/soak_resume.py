"""Soak test of interruption and resume (not a timed test): kill -9 tiny runs at random steps, resume them,
and compare every learnt tensor with an uninterrupted run.

    .venv/bin/python benchmarks/soak_resume.py --trials 20            # 20 train-teacher + 20 distill runs

For each trial a fresh run is started through the CLI (``python -m promptkd``), killed with SIGKILL once
its log shows a randomly drawn global step (checkpoints every step, so kills land before, during and after
checkpoint writes), then continued with ``--resume`` until it completes (a resumed run may be killed again
with probability ``--rekill``). The artefact must equal the uninterrupted run's bit for bit. Prints k/N per
stage and exits non-zero if any trial differs or fails to resume.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

FAST = ["--set", "train.epochs=3", "--set", "train.batch_size=2", "--set", "train.precision=fp32",
        "--set", "train.num_workers=0", "--set", "train.device=cpu", "--set", "train.log_every=1",
        "--set", "train.checkpoint_every_steps=1"]
TEACHER = ["--set", "data.shots=4", "--set", "teacher.text_depth=2", "--set", "teacher.vision_depth=2",
           "--set", "method.templates=single", "--set", "method.gpa_mean=2"]


def make_world(root: Path) -> None:
    from promptkd.data.fixtures import make_fixture
    from promptkd.models.clip import tiny_clip
    from promptkd.models.weights import save_clip

    make_fixture(root / "data", "DTD", classes=4, per_class=4, test_per_class=1)
    save_clip(tiny_clip(seed=1, width=48, layers=2, image_size=32, patch_size=8), root / "teacher.safetensors")
    save_clip(tiny_clip(seed=2, width=32, layers=2, image_size=32, patch_size=8), root / "student.safetensors")


def command(kind: str, root: Path, out: Path) -> list[str]:
    if kind == "train-teacher":
        return [sys.executable, "-m", "promptkd", "train-teacher", "--data-root", str(root / "data"), "--dataset",
                "DTD", "--clip-weights", str(root / "teacher.safetensors"), "--out", str(out), "--seed", "3",
                *FAST, *TEACHER]
    return [sys.executable, "-m", "promptkd", "distill", "--config", "distill/base2novel/dtd", "--data-root",
            str(root / "data"), "--teacher", str(root / "ref_teacher"), "--class-vectors",
            str(root / "cv.safetensors"), "--student-weights", str(root / "student.safetensors"), "--out", str(out),
            "--seed", "3", *FAST, "--set", "student.depth=2", "--set", "method.selection=agreement"]


def run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed: {done.stderr[-1500:]}")


def logged_steps(out: Path) -> int:
    try:
        lines = (out / "log.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = 0
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written
        steps = max(steps, int(record.get("global_step", 0) or 0))
    return steps


def kill_at_step(cmd: list[str], out: Path, step: int, timeout: float = 300) -> bool:
    """Start ``cmd`` and SIGKILL it once the log reaches ``step``; True if it was killed (not finished)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if logged_steps(out) >= step:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        raise RuntimeError("timed out")
    return False


def same(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "adapter.safetensors")), load_file(str(b / "adapter.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="trials per stage (default %(default)s)")
    parser.add_argument("--rekill", type=float, default=0.3, help="chance that a resumed run is killed again")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    parser.add_argument("--stages", nargs="+", default=["train-teacher", "distill"], help="stages to soak")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="promptkd-soak-") as tmp:
        root = Path(tmp)
        make_world(root)
        run(command("train-teacher", root, root / "ref_teacher"))
        run([sys.executable, "-m", "promptkd", "class-vectors", "--teacher", str(root / "ref_teacher"), "--dataset",
             "DTD", "--data-root", str(root / "data"), "--out", str(root / "cv.safetensors"), "--device", "cpu"])
        failures = 0
        for kind in args.stages:
            reference = root / "ref_teacher" if kind == "train-teacher" else root / "ref_student"
            if kind == "distill":
                run(command(kind, root, reference))
            total = logged_steps(reference)
            ok, kills = 0, 0
            t0 = time.time()
            for trial in range(args.trials):
                out = root / f"{kind}_{trial}"
                cmd = command(kind, root, out)
                killed = kill_at_step(cmd, out, rng.randint(1, total))
                kills += killed
                try:
                    while killed and rng.random() < args.rekill:
                        killed = kill_at_step([*cmd, "--resume"], out, rng.randint(logged_steps(out), total))
                        kills += killed
                    if killed or not (out / "adapter.json").is_file():
                        run([*cmd, "--resume"])
                    good = same(out, reference)
                except RuntimeError as exc:
                    print(f"  {kind} trial {trial}: {exc}", file=sys.stderr)
                    good = False
                ok += good
                if not good:
                    print(f"  {kind} trial {trial}: DIFFERS from the uninterrupted run", file=sys.stderr)
            failures += args.trials - ok
            print(f"{kind}: {ok}/{args.trials} resumed runs equal the uninterrupted one bit for bit "
                  f"({kills} kill -9, {total} steps per run, {time.time() - t0:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
