"""THE training loop, shared by stage 1 (teacher prompts) and stage 2 (distillation).

A method hands over an ``nn.Module`` whose ``forward(batch) -> dict`` returns ``"loss"`` (a scalar
tensor) and any float metrics. The loop never knows which method it runs. It:

* optimises the parameters with ``requires_grad`` (SGD with momentum and weight decay);
* follows Dassl's schedule: ``warmup_epochs`` at the constant ``warmup_lr``, then cosine annealing from
  ``lr`` with period ``epochs`` (so the last epoch does not reach 0; see :func:`lr_at_epoch`), the
  learning rate changing once per epoch;
* wraps the module in DistributedDataParallel when torch.distributed is initialised (torchrun);
* runs autocast (fp32 / bf16 / fp16; fp16 on CUDA uses a GradScaler) and gradient accumulation;
* writes ``out_dir/log.jsonl`` (step and epoch records), ``out_dir/summary.csv`` (one row per epoch)
  and ``out_dir/checkpoints/last.pt`` (atomically; read back with ``torch.load(weights_only=True)``);
* resumes exactly, also mid-epoch: the data order of an epoch is a function of (seed, epoch), the
  batches already consumed are skipped, RNG states, optimiser and method state are restored;
* calls ``module.on_epoch_end(epoch) -> dict`` (0-based epoch) and ``module.on_train_end()`` when
  defined, and saves/restores ``module.state_dict_extra()`` / ``load_state_dict_extra(state)``;
* stops with :class:`NonFiniteLossError` (naming the step) on a NaN/inf loss, before that step touches
  the parameters, leaving the last good checkpoint in place.

Batch size is per process and per micro-batch: one optimiser step sees
``batch_size * world_size * grad_accum`` samples. Micro-batches at the end of an epoch that do not fill
a whole accumulation window are skipped, so every optimiser step sees the same number of samples.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from promptkd.config import spec, validate_instance
from promptkd.engine import distributed as D
from promptkd.fileio import OutputError, atomic_write, atomic_writer, describe_os_error

CHECKPOINT_FORMAT = "promptkd.loop_checkpoint.v1"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULERS = ("cosine", "constant")
# settings that must not change when a run resumes: they define what "batch k of epoch e" means
RESUME_INVARIANTS = ("batch_size", "grad_accum", "seed", "world_size")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass
class LoopConfig:
    """The optimisation settings of both stages (the ``train`` section of a config)."""

    epochs: int = spec(20, ge=1, help="passes over the training set")
    batch_size: int = spec(8, ge=1, help="images per process per micro-batch")
    lr: float = spec(0.005, gt=0, le=1e3, help="peak learning rate (SGD)")
    momentum: float = spec(0.9, ge=0, lt=1, help="SGD momentum")
    weight_decay: float = spec(5e-4, ge=0, le=1, help="SGD weight decay")
    scheduler: str = spec("cosine", choices=SCHEDULERS, help="learning-rate schedule after the warm-up")
    warmup_epochs: int = spec(1, ge=0, help="epochs at the constant warmup_lr")
    warmup_lr: float = spec(1e-5, gt=0, le=1e3, help="learning rate during the warm-up")
    precision: str = spec("fp32", choices=tuple(PRECISIONS), help="autocast dtype (fp16 on a CPU runs fp32)")
    grad_accum: int = spec(1, ge=1, help="micro-batches per optimiser step")
    num_workers: int = spec(2, ge=0, help="data-loading processes")
    seed: int = spec(1, ge=0, help="seed of data order, augmentation and initialisation")
    device: str = spec("auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, cuda:1 ...")
    checkpoint_every_steps: int = spec(0, ge=0, help="0: checkpoint at epoch ends only")
    max_steps: int | None = spec(None, ge=0, help="stop (resumably) after this many optimiser steps in total")
    deterministic: bool = spec(False, help="deterministic algorithms (slower on GPU)")
    log_every: int = spec(10, ge=1, help="optimiser steps between step records in log.jsonl")
    sync_batchnorm: bool = spec(True, help="on CUDA under DDP: trainable BatchNorm sees the global batch")

    def __post_init__(self) -> None:
        validate_instance(self, "training loop config (train.*)")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError(f"invalid training loop config: train.warmup_epochs={self.warmup_epochs} must be less "
                             f"than train.epochs={self.epochs} (set train.warmup_epochs=0 to train "
                             f"{self.epochs} epoch(s) without a warm-up)")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> LoopConfig:
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training loop setting(s) {unknown} (known: {sorted(known)})")
        return cls(**data)


# --------------------------------------------------------------------------------------------------
# schedule, device, precision


def lr_at_epoch(cfg: LoopConfig, epoch: int) -> float:
    """Learning rate during 0-based ``epoch``, as Dassl's ConstantWarmupScheduler + CosineAnnealingLR.

    Epochs ``0..W-1`` use ``warmup_lr``; epoch ``e >= W`` uses ``lr * (1 + cos(pi * (e - W) / E)) / 2``
    with ``E = epochs`` (Dassl builds the cosine with T_max = MAX_EPOCH and recounts from the end of the
    warm-up, WARMUP_RECOUNT=True), eta_min = 0. With E=20, W=1 the last epoch runs at lr*(1+cos(0.9 pi))/2.
    """
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    if cfg.scheduler == "constant":
        return cfg.lr
    t = epoch - cfg.warmup_epochs
    return cfg.lr * (1.0 + math.cos(math.pi * t / cfg.epochs)) / 2.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", D.local_rank())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", D.local_rank())
    return device


def autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_determinism(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


# --------------------------------------------------------------------------------------------------
# data: our image datasets go through promptkd.data.loader.make_loader; anything else through a
# DataLoader with the same contract (``set_epoch(epoch, start_batch)``, order a function of seed+epoch)


class _SkippingSampler(Sampler[int]):
    """DistributedSampler order (seed + epoch, any world size incl. 1) minus the first ``start`` items."""

    def __init__(self, dataset: Dataset, rank: int, world: int, seed: int, drop_last: bool):
        self.base = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                       drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        for n, i in enumerate(self.base):
            if n >= self.start:
                yield i

    def __len__(self) -> int:
        return max(0, len(self.base) - self.start)


class _GenericEpochLoader(DataLoader):
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start=start_batch * (self.batch_size or 1))


def build_train_loader(dataset: Dataset, cfg: LoopConfig, collate_fn: Callable | None = None) -> DataLoader:
    """A loader with ``set_epoch(epoch, start_batch)`` whose epoch order depends only on (seed, epoch)."""
    rank, world = D.rank(), D.world_size()
    drop_last = len(dataset) >= cfg.batch_size * world
    from promptkd.data import loader as data_loader

    if isinstance(dataset, data_loader._ImageDataset) and collate_fn is None:
        return data_loader.make_loader(dataset, cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                                       seed=cfg.seed, drop_last=drop_last,
                                       distributed=(rank, world) if world > 1 else None)
    workers = cfg.num_workers
    return _GenericEpochLoader(
        dataset, batch_size=cfg.batch_size, sampler=_SkippingSampler(dataset, rank, world, cfg.seed, drop_last),
        num_workers=workers, collate_fn=collate_fn, drop_last=drop_last,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
    )


# --------------------------------------------------------------------------------------------------
# checkpoints


def trainable_state(module: nn.Module) -> dict[str, Tensor]:
    """Parameters with requires_grad plus the buffers of the modules owning them (e.g. BatchNorm stats)."""
    out = {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}
    owners = [n for n, m in module.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    for name, m in module.named_modules():
        if name in owners or any(o and name.startswith(o + ".") for o in owners):
            for b_name, buf in m.named_buffers(recurse=False):
                if buf is not None:
                    out[f"{name}.{b_name}" if name else b_name] = buf.detach().cpu().clone()
    return out


def load_trainable_state(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    expected = trainable_state(module)
    missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unknown:
        raise ValueError(f"{source}: checkpoint does not fit this model (missing {missing[:6]}, unknown {unknown[:6]})")
    own = dict(module.named_parameters())
    own.update(dict(module.named_buffers()))
    with torch.no_grad():
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, model has {tuple(own[key].shape)}")
            own[key].copy_(value.to(own[key].device, own[key].dtype))


def rng_state() -> dict:
    """RNG states as tensors/lists only, so ``torch.load(weights_only=True)`` can read them."""
    np_kind, np_keys, np_pos, np_gauss, np_cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_gauss), float(np_cached)],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save to a temporary file in the same folder, then an atomic rename; a failed write (full disk,
    ``ulimit -f``) leaves the previous checkpoint in place and raises one line naming the file."""
    try:
        with atomic_writer(path) as f:
            torch.save(payload, f)
    except RuntimeError as exc:  # torch's zip writer reports a failed write as a RuntimeError
        kept = "the previous checkpoint is kept" if path.is_file() else "no checkpoint was written"
        raise OutputError(None, f"{path}: cannot write the checkpoint ({' '.join(str(exc).split())[:200]}); "
                                f"{kept}. Free space (or raise ulimit -f) and continue with --resume") from None


def load_checkpoint(path: Path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or something that is not a plain tensor checkpoint
        raise ValueError(f"{path}: cannot read training checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a promptkd training checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return payload


# --------------------------------------------------------------------------------------------------
# logging


class RunLog:
    """log.jsonl (append) and summary.csv (rewritten from the epoch history), on the main rank only;
    with ``tensorboard``, the step and epoch scalars also go to ``out_dir/tensorboard``."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool = False):
        self.out_dir, self.enabled = out_dir, enabled
        self.tb = None
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                self.tb = open_tensorboard(out_dir / "tensorboard")

    def write(self, record: dict) -> None:
        if self.enabled:
            path = self.out_dir / "log.jsonl"
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(record, default=float) + "\n")
            except OSError as exc:
                raise OutputError(exc.errno, describe_os_error(exc, path)) from None
            if self.tb is not None and record.get("type") in ("step", "epoch"):
                kind = record["type"]
                step = int(record.get("global_step", record.get("steps", 0)))
                for key, value in record.items():
                    if key not in ("type", "epoch", "step", "global_step", "steps", "time") and \
                            isinstance(value, (int, float)) and not isinstance(value, bool):
                        self.tb.add_scalar(f"{kind}/{key}", value, step)
                self.tb.flush()

    def drop_after(self, global_step: int) -> int:
        """On resume: remove the step and epoch records past ``global_step`` (the checkpoint's), which the
        resumed run logs again; returns how many were removed."""
        path = self.out_dir / "log.jsonl"
        if not self.enabled or not path.is_file():
            return 0
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                dropped += 1
                continue
            step = record.get("global_step", record.get("steps"))
            if record.get("type") in ("step", "epoch") and step is not None and int(step) > global_step:
                dropped += 1
                continue
            kept.append(line + "\n")
        if dropped:
            atomic_write(path, "".join(kept))
        return dropped

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def summary(self, history: list[dict]) -> None:
        if not self.enabled or not history:
            return
        columns: list[str] = []
        for row in history:
            columns += [k for k in row if k not in columns]
        with atomic_writer(self.out_dir / "summary.csv", "w") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(history)


def open_tensorboard(log_dir: Path):
    """A TensorBoard SummaryWriter, or a clear error naming the missing package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ValueError("log.tensorboard=true needs the `tensorboard` package: pip install 'promptkd[tensorboard]' "
                         f"({exc})") from None
    return SummaryWriter(log_dir=str(log_dir))


def _float_metrics(out: dict) -> dict[str, float]:
    metrics = {}
    for key, value in out.items():
        if isinstance(value, Tensor):
            if value.numel() != 1:
                continue
            value = value.detach().float().item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[key] = float(value)
    return metrics


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from promptkd.progress import progress_bar  # a bar on a terminal, a few plain lines in a log

    return progress_bar(total=total, initial=initial, desc=desc, unit="step", leave=False)


# --------------------------------------------------------------------------------------------------
# the loop


def effective_precision(precision: str, device: torch.device) -> str:
    """fp16 autocast on a CPU has no gradient scaler and is slow: a CPU runs fp16 settings in fp32."""
    return "fp32" if precision == "fp16" and device.type == "cpu" else precision


def fit(module: nn.Module, train_dataset: Dataset, cfg: LoopConfig, out_dir: str | os.PathLike, *,
        resume: bool = True, collate_fn: Callable | None = None, tensorboard: bool = False) -> dict:
    """Train ``module`` on ``train_dataset``; returns a summary dict (history, steps, checkpoint path)."""
    out_dir = Path(out_dir)
    log = RunLog(out_dir, D.is_main(), tensorboard=tensorboard)
    try:
        return _fit(module, train_dataset, cfg, out_dir, log, resume=resume, collate_fn=collate_fn)
    finally:
        log.close()


def _fit(module: nn.Module, train_dataset: Dataset, cfg: LoopConfig, out_dir: Path, log: RunLog, *,
         resume: bool, collate_fn: Callable | None) -> dict:
    main = D.is_main()
    world = D.world_size()
    ckpt_path = out_dir / "checkpoints" / "last.pt"
    device = resolve_device(cfg.device)
    precision = effective_precision(cfg.precision, device)
    if precision != cfg.precision and main:
        import sys

        print(f"note: precision {cfg.precision} on {device.type} runs as {precision} (fp16 autocast on a CPU has no "
              "gradient scaler and is slow)", file=sys.stderr)
    set_determinism(cfg.seed + D.rank(), cfg.deterministic)

    # -- model, optimiser, precision ------------------------------------------------------------------
    module.to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the module has no trainable parameters (nothing has requires_grad=True)")
    optimizer = torch.optim.SGD(params, lr=lr_at_epoch(cfg, 0), momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    use_scaler = precision == "fp16" and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    model: nn.Module = module
    if world > 1:
        if cfg.sync_batchnorm and device.type == "cuda":  # SyncBatchNorm has no CPU (gloo) kernel
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        model = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)

    loader = build_train_loader(train_dataset, cfg, collate_fn)
    loader.set_epoch(0)
    steps_per_epoch = len(loader) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"the training set gives {len(loader)} batch(es) per epoch, fewer than grad_accum="
                         f"{cfg.grad_accum}: lower batch_size/grad_accum or add data ({len(train_dataset)} samples)")
    run_cfg = {**cfg.as_dict(), "world_size": world}

    # -- resume ----------------------------------------------------------------------------------------
    epoch, step_in_epoch, global_step, history = 0, 0, 0, []
    sums: dict[str, float] = {}  # this epoch's metrics summed over its steps so far (restored on resume)
    n_steps = 0
    if resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        changed = [k for k in RESUME_INVARIANTS if ckpt["config"].get(k) != run_cfg[k]]
        if changed:
            raise ValueError(f"{ckpt_path}: cannot resume, these settings differ from the checkpoint's: "
                             + ", ".join(f"{k} {ckpt['config'].get(k)!r} -> {run_cfg[k]!r}" for k in changed)
                             + " (use a new output folder)")
        load_trainable_state(module, ckpt["trainable"], str(ckpt_path))
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # a schedule changed on --resume applies (the lr: every epoch)
            group["momentum"], group["weight_decay"] = cfg.momentum, cfg.weight_decay
        if use_scaler and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if hasattr(module, "load_state_dict_extra") and ckpt.get("extra") is not None:
            module.load_state_dict_extra(ckpt["extra"])
        epoch, step_in_epoch, global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        history = list(ckpt["history"])
        if step_in_epoch > 0:
            sums, n_steps = dict(ckpt.get("epoch_sums") or {}), int(ckpt.get("epoch_steps") or 0)
        rngs = ckpt["rng"]
        set_rng_state(rngs[D.rank()] if D.rank() < len(rngs) else rngs[0])
        replayed = log.drop_after(global_step)
        log.write({"type": "resume", "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                   "dropped_records": replayed, "time": time.time()})

    def checkpoint() -> None:
        rngs = D.all_gather_object(rng_state())
        failure = None
        if main:
            try:
                write_checkpoint(rngs)
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks have heard of it
                failure = exc
        # every rank learns whether the write worked and stops with rank 0, instead of waiting at the next
        # collective for a rank that is gone (NCCL would wait out its timeout)
        failed = D.broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
        if failure is not None:
            raise failure
        if failed:  # an OSError, so that the CLI says it in one line on this rank too
            raise OutputError(errno.EIO, f"rank 0 could not write the checkpoint {ckpt_path} ({failed}); "
                                         "this rank stops too")

    def write_checkpoint(rngs: list) -> None:
        save_checkpoint(ckpt_path, {
            "format": CHECKPOINT_FORMAT, "trainable": trainable_state(module),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if use_scaler else None,
            "scheduler": {"name": f"constant_warmup+{cfg.scheduler}", "epoch": epoch,
                          "lr": optimizer.param_groups[0]["lr"]},
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "rng": rngs, "history": history, "config": run_cfg, "epoch_sums": dict(sums), "epoch_steps": n_steps,
            "extra": module.state_dict_extra() if hasattr(module, "state_dict_extra") else None,
        })

    if main:
        log.write({"type": "start", "config": run_cfg, "steps_per_epoch": steps_per_epoch,
                   "samples_per_step": cfg.batch_size * world * cfg.grad_accum,
                   "trainable_parameters": sum(p.numel() for p in params), "device": str(device),
                   "precision": precision,
                   "time": time.time()})

    # -- epochs ----------------------------------------------------------------------------------------
    stopped = False
    while epoch < cfg.epochs and not stopped:
        lr = lr_at_epoch(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        loader.set_epoch(epoch, start_batch=step_in_epoch * cfg.grad_accum)
        loader.generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # worker seeds only
        window: dict[str, float] = {}  # metrics summed since the last step record
        window_steps = 0
        bar = _progress(steps_per_epoch, step_in_epoch, f"epoch {epoch + 1}/{cfg.epochs}", main)
        batches = iter(loader)
        t_epoch = time.time()
        while step_in_epoch < steps_per_epoch:
            if cfg.max_steps is not None and global_step >= cfg.max_steps:
                stopped = True
                break
            step_metrics: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                batch = move_to(next(batches), device)
                last_micro = micro == cfg.grad_accum - 1
                sync = model.no_sync() if (world > 1 and not last_micro) else contextlib.nullcontext()
                with sync:
                    with autocast(device, precision):
                        out = model(batch)
                    loss = out["loss"]
                    if loss.ndim != 0:
                        raise ValueError(f"forward must return a scalar 'loss', got shape {tuple(loss.shape)}")
                    total = D.all_reduce_sum(loss.detach().float().reshape(1))
                    if not torch.isfinite(total).all():
                        where = f"epoch {epoch + 1}, step {step_in_epoch + 1} (global step {global_step + 1})"
                        kept = (f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.is_file()
                                else "no checkpoint had been written yet")
                        if bar is not None:
                            bar.close()
                        log.write({"type": "error", "error": "non-finite loss", "epoch": epoch,
                                   "global_step": global_step + 1, "loss": float(loss.detach().float())})
                        raise NonFiniteLossError(f"non-finite loss ({float(loss.detach().float())}) at {where}; "
                                                 f"{kept}. Continue from it with a lower learning rate or fp32, e.g. "
                                                 "--resume --set train.lr=... --set train.precision=fp32")
                    scaler.scale(loss / cfg.grad_accum).backward()
                metrics = {**_float_metrics(out), "loss": float(total) / world}  # loss: mean over ranks
                for k, v in metrics.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + v / cfg.grad_accum
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step_in_epoch += 1
            global_step += 1
            n_steps += 1
            for k, v in step_metrics.items():
                sums[k] = sums.get(k, 0.0) + v
                window[k] = window.get(k, 0.0) + v
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_metrics['loss']:.4g}", lr=f"{lr:.2e}")
            window_steps += 1
            if global_step % cfg.log_every == 0 or step_in_epoch == steps_per_epoch:
                log.write({"type": "step", "epoch": epoch, "step": step_in_epoch, "global_step": global_step,
                           "lr": lr, **{k: v / window_steps for k, v in window.items()}, "time": time.time()})
                window, window_steps = {}, 0
            if cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0 \
                    and step_in_epoch < steps_per_epoch:
                checkpoint()
        if bar is not None:
            bar.close()
        if stopped:
            checkpoint()
            break

        # -- epoch end: metrics, hook, checkpoint -----------------------------------------------------
        record = {"epoch": epoch + 1, "lr": lr, "steps": global_step}
        record.update(D.all_reduce_mean({k: v / max(1, n_steps) for k, v in sums.items()}))
        if hasattr(module, "on_epoch_end"):
            record.update(_float_metrics(module.on_epoch_end(epoch) or {}))
        record["epoch_seconds"] = round(time.time() - t_epoch, 3)
        history.append(record)
        log.write({"type": "epoch", **record, "time": time.time()})
        log.summary(history)
        epoch, step_in_epoch = epoch + 1, 0
        sums, n_steps = {}, 0
        checkpoint()

    report_bad_images = getattr(train_dataset, "report_bad_images", None)
    if callable(report_bad_images):  # the last epoch's (the earlier ones were reported by set_epoch)
        report_bad_images()
    completed = epoch >= cfg.epochs
    if completed and hasattr(module, "on_train_end"):
        module.on_train_end()
    if main:
        log.write({"type": "end", "completed": completed, "global_step": global_step, "time": time.time()})
    return {"completed": completed, "epochs_done": epoch, "global_step": global_step,
            "steps_per_epoch": steps_per_epoch, "history": history, "checkpoint": str(ckpt_path),
            "last": history[-1] if history else {}}
