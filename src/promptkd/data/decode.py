"""Decoding one image file to 8-bit RGB: the single decoder of training, evaluation, predict and serve.

:func:`read_image` is what every consumer calls (datasets in :mod:`promptkd.data.loader`, ``data check``,
``predict``/``serve``). It differs from a bare ``Image.open(path).convert("RGB")`` in three ways:

* **16-bit images are scaled, not clipped.** Pillow opens a 16-bit grayscale PNG/TIFF as mode ``I;16``
  (``I;16B``, or ``I`` in older Pillow) and ``convert("RGB")`` clips every value above 255, so a
  normal 16-bit photo decodes almost white. Here the full range 0..65535 maps to 0..255
  (``round(v * 255 / 65535)``). Pillow already reduces 16-bit RGB(A) and gray+alpha PNGs to 8 bits by
  keeping the high byte (within one level of the same mapping), so those go through unchanged.
* **A pixel limit** (``max_pixels``, the config's ``data.max_image_pixels``; default
  :data:`DEFAULT_MAX_IMAGE_PIXELS`, Pillow's own limit) replaces Pillow's global decompression-bomb
  check. A JPEG over the limit is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
  ``Image.draft``), the smallest reduction that fits, so it never exists at full size in memory; any
  other format over the limit is a bad image with the reason.
* **Every failure is a** :class:`BadImageError` (a ``ValueError``) whose one-line message names the file.

:func:`image_problem` is ``data check --verify-images``: decode, then flag images whose decoded
range is degenerate (a constant picture, typically a 16-bit or float file decoded wrongly).
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np
from PIL import Image

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS: 1024**3 // 4 // 3 (~0.25 GB as RGB)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_OPEN_LOCK = threading.Lock()  # Image.MAX_IMAGE_PIXELS is a module global: change it under a lock only


class BadImageError(ValueError):
    """An image file could not be read or decoded; the message names the file.

    A ValueError, so the CLI prints it as one ``error:`` line. Raised inside a DataLoader worker, torch
    re-raises it in the main process as ``BadImageError(<worker traceback text>)``; the constructor
    recognises that text and keeps only the original message, so the user sees the same one line."""

    def __init__(self, message: str = ""):
        super().__init__(_unwrap_worker_message(str(message), type(self)))


def _unwrap_worker_message(message: str, cls: type) -> str:
    if not message.startswith(f"Caught {cls.__name__} "):
        return message
    marker = f"{cls.__module__}.{cls.__qualname__}: "
    head, found, original = message.rpartition(marker)
    return original.strip() if found else message


def _open(path: str | os.PathLike) -> Image.Image:
    """``Image.open`` with Pillow's own pixel check off (ours, with the configured limit, follows)."""
    with _OPEN_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def image_size(source) -> tuple[int, int]:
    """(width, height) from an image's header (a path or a file object), without decoding its pixels and
    without Pillow's own decompression-bomb check (the caller applies its limit)."""
    with _open(source) as img:
        return img.size


def _jpeg_reduction(size: tuple[int, int], max_pixels: int) -> int | None:
    """The smallest libjpeg scale-down (1, 2, 4, 8) whose output fits ``max_pixels``; None if none does."""
    w, h = size
    for s in (1, 2, 4, 8):
        if math.ceil(w / s) * math.ceil(h / s) <= max_pixels:
            return s
    return None


def _limit_pixels(img: Image.Image, path: str, max_pixels: int | None, setting: str = "data.max_image_pixels") -> None:
    """Apply the pixel limit before anything is decoded: draft-reduce a JPEG, refuse anything else."""
    w, h = img.size
    if max_pixels is None or w * h <= max_pixels:
        return
    what = f"{w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} ({setting})"
    if img.format != "JPEG":
        raise BadImageError(f"{path}: image too large: {what}; only JPEGs are reduced while decoding, "
                            "so downscale it or raise the limit")
    scale = _jpeg_reduction((w, h), max_pixels)
    if scale is None:
        raise BadImageError(f"{path}: image too large: {what}, even at the smallest JPEG decoding scale (1/8)")
    img.draft("RGB", (w // scale, h // scale))
    if img.size[0] * img.size[1] > max_pixels:  # draft refused (e.g. several tiles): never decode at full size
        raise BadImageError(f"{path}: image too large: {what}, and this JPEG cannot be decoded at a reduced scale")


def _to_rgb(img: Image.Image, path: str) -> Image.Image:
    """8-bit RGB from any mode; 16-bit single-channel data scaled from 0..65535 (not clipped)."""
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(img)
        if mode == "I":  # 32-bit container: 16-bit PNG/TIFF data in older Pillow versions
            lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
            if lo < 0 or hi > 65535:
                raise BadImageError(f"{path}: 32-bit integer pixels in {lo}..{hi} are not supported "
                                    "(expected 8- or 16-bit data); save it as an 8- or 16-bit image")
        scaled = (values.astype(np.uint32) * 255 + 32767) // 65535  # round(v * 255 / 65535), exactly
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    if mode == "F":
        values = np.asarray(img)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 255):
            raise BadImageError(f"{path}: floating-point pixels outside 0..255 are not supported "
                                "(range {:.4g}..{:.4g}); save it as an 8- or 16-bit image".format(
                                    float(np.nanmin(values)), float(np.nanmax(values))))
    return img if mode == "RGB" else img.convert("RGB")


def read_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
               setting: str = "data.max_image_pixels") -> Image.Image:
    """Decode an image file to 8-bit RGB (16-bit data scaled, JPEGs over ``max_pixels`` reduced while
    decoding, other images over it refused; ``None``: no limit). Raises :class:`BadImageError` naming
    the file on any failure; ``setting`` is how the user raises the limit (named in that message)."""
    path = os.fspath(path)
    if max_pixels is not None and int(max_pixels) < 1:
        raise ValueError(f"max_pixels (data.max_image_pixels) must be a positive number of pixels, got {max_pixels}")
    try:
        with _open(path) as img:
            _limit_pixels(img, path, max_pixels, setting)
            img.load()
            return _to_rgb(img, path)
    except BadImageError:
        raise
    except FileNotFoundError as exc:
        if os.path.islink(path):
            raise BadImageError(f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist)") from exc
        raise BadImageError(f"{path}: image file missing") from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        raise BadImageError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc


def degenerate_range(img: Image.Image) -> str | None:
    """Why a decoded RGB image carries no picture (every channel spans at most one level), else None."""
    extrema = img.getextrema()
    lo, hi = min(e[0] for e in extrema), max(e[1] for e in extrema)
    if all(e[1] - e[0] <= 1 for e in extrema):
        kind = "a constant" if all(e[1] == e[0] for e in extrema) else "an almost constant"
        return f"decodes to {kind} image (values {lo}..{hi}): an unsupported bit depth, or an empty picture"
    return None


def image_problem(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> str | None:
    """``data check --verify-images`` for one file: None when it decodes to a real picture, else why not."""
    try:
        img = read_image(path, max_pixels=max_pixels)
    except BadImageError as exc:
        return str(exc)
    reason = degenerate_range(img)
    return f"{os.fspath(path)}: {reason}" if reason else None
