"""``--precision auto``: bf16 only where it is native and does not change the answers, else fp32.

On a CPU, bf16 pays off only with native bf16 arithmetic (AVX512-BF16 or AMX: the ``avx512_bf16`` /
``amx_bf16`` flags of ``/proc/cpuinfo``); without it PyTorch emulates bf16 and runs several times
slower than fp32. Even where it is native, bf16 rounds activations to 8 mantissa bits, so ``auto``
also runs a check batch in fp32 and in bf16 and keeps bf16 only if the top-1 class agrees on at least
:data:`MIN_AGREEMENT` of it. On CUDA the same check runs where the GPU supports bf16.

Callers give a ``check(precision) -> logits`` function; see :func:`promptkd.runtime.load_predictor`
and, for evaluation, the recipe in :func:`resolve_precision`'s docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

PRECISION_CHOICES = ("auto", "fp32", "bf16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
MIN_AGREEMENT = 0.995
MIN_CHECK_IMAGES = 32  # fewer check images than this: fp32 (at 32, bf16 must agree on every one)


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # fp32 | bf16
    reason: str  # one line for the user
    agreement: float | None = None  # top-1 agreement bf16 vs fp32 on the check batch, when measured


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (empty when ``cpuinfo`` cannot be read, e.g. not Linux)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def native_bf16(device: str | torch.device = "cpu", cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and why (a short phrase)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, "the GPU supports bf16" if ok else "the GPU has no bf16 support"
    if dev.type != "cpu":
        return False, f"no bf16 rule for device {dev.type}"
    found = sorted(cpu_flags(cpuinfo) & set(NATIVE_BF16_FLAGS))
    if found:
        return True, f"the CPU has {'/'.join(found)}"
    return False, "the CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag)"


def top1_agreement(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Fraction of rows whose arg-max class is the same in both logit (or probability) tensors."""
    if reference.shape != other.shape or reference.ndim != 2 or reference.shape[0] == 0:
        raise ValueError(f"need two [B, N] tensors of the same shape, got {tuple(reference.shape)} and "
                         f"{tuple(other.shape)}")
    return float((reference.argmax(dim=1) == other.argmax(dim=1)).float().mean())


def resolve_precision(requested: str, *, device: str | torch.device = "cpu",
                      check: Callable[[str], torch.Tensor] | None = None,
                      cpuinfo: str | Path = "/proc/cpuinfo", min_agreement: float = MIN_AGREEMENT) -> PrecisionChoice:
    """Turn ``--precision`` (``auto`` | ``fp32`` | ``bf16``) into fp32 or bf16.

    ``auto`` picks bf16 only when ``device`` has native bf16 AND ``check`` (a function giving the model's
    logits on one fixed check batch at a precision: ``check("fp32")``, ``check("bf16")``) agrees on the
    top-1 class for >= ``min_agreement`` of the batch; otherwise fp32. Explicit ``fp32``/``bf16`` are
    returned as asked. For evaluation (``evaluate_benchmark(..., precision=...)``) the caller would run
    ``check = lambda p: model_logits(first_test_batch, autocast=p)`` and pass ``choice.precision`` on."""
    if requested not in PRECISION_CHOICES:
        raise ValueError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}, not {requested!r}")
    if requested != "auto":
        return PrecisionChoice(requested, f"{requested} as requested")
    native, why = native_bf16(device, cpuinfo)
    if not native:
        return PrecisionChoice("fp32", f"auto -> fp32: {why}")
    if check is None:
        return PrecisionChoice("fp32", f"auto -> fp32: {why}, but no check batch to compare bf16 with fp32")
    with torch.no_grad():
        reference = check("fp32").float()
        if reference.shape[0] < MIN_CHECK_IMAGES:  # a handful of agreeing images proves nothing
            return PrecisionChoice("fp32", f"auto -> fp32: {why}, but only {reference.shape[0]} image(s) to check bf16 "
                                           f"against fp32 (it needs {MIN_CHECK_IMAGES})")
        agreement = top1_agreement(reference, check("bf16").float())
    if agreement >= min_agreement:
        return PrecisionChoice("bf16", f"auto -> bf16: {why}; top-1 agreement with fp32 {100 * agreement:.1f}% "
                                       f"on the check batch", agreement)
    return PrecisionChoice("fp32", f"auto -> fp32: {why}, but top-1 agreement with fp32 is only "
                                   f"{100 * agreement:.1f}% (< {100 * min_agreement:.1f}%)", agreement)
