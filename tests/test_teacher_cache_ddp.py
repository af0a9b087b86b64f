"""DDP with a teacher cache: 2 CPU processes (gloo, torchrun) train from the cache exactly as they train
with the online teacher. Each rank's DistributedSampler shard reaches CachedTeacherImages as (epoch,
index) keys, so every rank must read the features of its own images and epochs; a mid-epoch stop and
resume is included. Both runs use the per-rank batch size the cache was built with (2), so the cached
logits are the online ones bit for bit and the students agree to 1e-6.

Run as a script (``python -m torch.distributed.run --nproc_per_node=2 tests/test_teacher_cache_ddp.py
DATA_JSON OUT``) this file is the worker.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from promptkd.data.fixtures import make_fixture  # noqa: E402
from promptkd.data.loader import UnlabelledImages  # noqa: E402
from promptkd.data.transforms import TrainAugment  # noqa: E402
from promptkd.engine import distributed  # noqa: E402
from promptkd.engine.loop import LoopConfig, fit  # noqa: E402
from promptkd.methods import teacher_cache as tc  # noqa: E402
from promptkd.methods.promptkd import DistillModule  # noqa: E402
from promptkd.stages.common import distributed_session  # noqa: E402
from promptkd.store import build_store  # noqa: E402
from test_distill_module import CLASSES, IMAGE, TinyStudent, TinyTeacher  # noqa: E402

SEED = 4


def stream(paths):
    return UnlabelledImages(paths, TrainAugment(IMAGE), seed=SEED)


def worker(spec: dict, out: str) -> None:
    teacher = TinyTeacher()
    store = build_store(teacher, CLASSES)
    train = stream(spec["paths"])
    cache = tc.open_teacher_cache(spec["cache"])
    cfg = LoopConfig(epochs=2, batch_size=2, lr=0.02, warmup_epochs=0, num_workers=0, seed=SEED, log_every=1,
                     precision="fp32")
    kd = {"kd_weight": 1.0, "weighting": "batchmean"}
    torch.manual_seed(0)
    fit(DistillModule(teacher, TinyStudent(projector="linear"), store, **kd), train, cfg, f"{out}/online")
    cached = tc.CachedTeacherImages(train, cache)

    def module():
        torch.manual_seed(0)
        return DistillModule(None, TinyStudent(projector="linear"), store, teacher_logit_scale=cache.logit_scale, **kd)

    fit(module(), cached, LoopConfig(**{**cfg.as_dict(), "max_steps": 3}), f"{out}/cached")  # stops in epoch 2
    fit(module(), cached, cfg, f"{out}/cached")


def test_two_gloo_processes_train_from_the_cache_as_from_the_teacher(tmp_path):
    fx = make_fixture(tmp_path / "data", "DTD", classes=4, per_class=2)
    paths = [s.path for s in fx.splits["train"]]
    tc.build_teacher_cache(TinyTeacher(), stream(paths), tmp_path / "cache", epochs=2, dtype="fp32",
                           identity={"class_vectors": "cv", "dataset": "dtd"}, batch_size=2, shard_size=3,
                           progress=False)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"paths": paths, "cache": str(tmp_path / "cache")}))
    # PYTHONFAULTHANDLER: a rank that aborts prints every thread's Python stack
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           __file__, str(spec), str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    online = torch.load(tmp_path / "ddp/online/checkpoints/last.pt", weights_only=True)
    cached = torch.load(tmp_path / "ddp/cached/checkpoints/last.pt", weights_only=True)
    assert online["global_step"] == cached["global_step"] == 4 and cached["config"]["world_size"] == 2
    assert [r["loss"] for r in cached["history"]] == [r["loss"] for r in online["history"]]
    torch.manual_seed(0)
    initial = TinyStudent(projector="linear").adapter_state_dict()
    for key, value in online["trainable"].items():
        assert not torch.equal(value, initial[key.removeprefix("student.")]), f"{key} did not train"
        torch.testing.assert_close(cached["trainable"][key], value, rtol=0, atol=1e-6)


if __name__ == "__main__":
    with distributed_session():  # the stages' own join/barrier/leave
        assert distributed.world_size() == 2
        worker(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2])
