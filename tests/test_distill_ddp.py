"""DDP: 2 CPU processes (gloo, launched by torchrun) reach the same prompts as 1 process with the same
global batch, through the same training loop: 1 process x batch 8 against 2 processes x 2 micro-batches
of 2 images (gradient accumulation, so DDP's no_sync path is exercised too).

The student here uses the LINEAR projector: with the paper's BatchNorm projector each rank would
normalise with its own 2-image statistics, which is not the 8-image computation of a single process
(SyncBatchNorm would be needed for equality). Tolerance: float32 summation order differs between an
8-image batch and four accumulated, all-reduced 2-image parts, and kd_weight 1000 with lr 0.05 amplifies
it over 6 steps (measured: at most 4e-6 absolute), so we allow 1e-4 relative / 1e-5 absolute.

Run as a script (``python -m torch.distributed.run --nproc_per_node=2 tests/test_distill_ddp.py OUT``)
this file is the worker.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from promptkd.engine import distributed  # noqa: E402
from promptkd.engine.loop import LoopConfig, fit  # noqa: E402
from promptkd.methods.promptkd import DistillModule  # noqa: E402
from promptkd.stages.common import distributed_session  # noqa: E402
from promptkd.store import build_store  # noqa: E402
from test_distill_module import CLASSES, Images, TinyStudent, TinyTeacher  # noqa: E402

STEPS = 6


def models():
    torch.manual_seed(0)  # the projector's initialisation draws from the global RNG
    return TinyTeacher(), TinyStudent(projector="linear")


def run(out_dir: str, batch_size: int, grad_accum: int = 1, checkpoint_every_steps: int = 0) -> None:
    teacher, student = models()
    module = DistillModule(teacher, student, build_store(teacher, CLASSES), kd_weight=1000.0)
    cfg = LoopConfig(epochs=2, batch_size=batch_size, grad_accum=grad_accum, lr=0.05, warmup_epochs=0,
                     num_workers=0, seed=4, max_steps=STEPS, log_every=1, checkpoint_every_steps=checkpoint_every_steps)
    fit(module, Images(32, 2), cfg, out_dir)


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    run(str(tmp_path / "single"), batch_size=8)
    # PYTHONFAULTHANDLER: a rank that aborts prints every thread's Python stack
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           __file__, str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]

    single = torch.load(tmp_path / "single/checkpoints/last.pt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp/checkpoints/last.pt", weights_only=True)
    assert single["global_step"] == ddp["global_step"] == STEPS
    assert ddp["config"]["world_size"] == 2 and len(ddp["rng"]) == 2
    initial = models()[1].adapter_state_dict()
    assert set(single["trainable"]) == {f"student.{k}" for k in initial}
    for key, value in single["trainable"].items():
        assert not torch.equal(value, initial[key.removeprefix("student.")]), f"{key} did not train"
        torch.testing.assert_close(ddp["trainable"][key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_a_checkpoint_rank_0_cannot_write_stops_every_rank_at_once(tmp_path):
    """Disk full on rank 0: every rank stops at that checkpoint with the reason (with NCCL, a rank left
    waiting at the next collective would hang until its timeout)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           __file__, str(tmp_path / "ddp"), "disk-full"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "No space left on device" in proc.stderr  # rank 0's own error
    assert "rank 0 could not write the checkpoint" in proc.stderr and "this rank stops too" in proc.stderr, \
        proc.stderr[-4000:]
    assert "Connection closed by peer" not in proc.stderr


if __name__ == "__main__":
    with distributed_session():  # the stages' own join/barrier/leave
        assert distributed.world_size() == 2
        if sys.argv[2:] == ["disk-full"]:
            import errno

            from promptkd.engine import loop

            real, calls = loop.save_checkpoint, []

            def full_on_rank_0(path, payload):
                calls.append(1)
                if distributed.rank() == 0 and len(calls) == 2:
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
                real(path, payload)

            loop.save_checkpoint = full_on_rank_0
            run(sys.argv[1], batch_size=2, grad_accum=2, checkpoint_every_steps=1)
        else:
            run(sys.argv[1], batch_size=2, grad_accum=2)
