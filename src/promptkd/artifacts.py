"""Learnt artefacts, peft-style: only the learnt tensors in ``adapter.safetensors`` + ``adapter.json``.

``adapter.json`` holds what is needed to rebuild and trust the model: the role (teacher/student), the
backbone identity (kind, architecture, weights path and checksum, prompt config), the class names in
label order, the fingerprint of the class-vector store it was trained on, and the training config. A
student folder also carries ``class_vectors.safetensors`` so it can predict on its own.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from promptkd.fileio import atomic_save_with, atomic_write_json, read_json
from promptkd.models.backbones import AdapterMixin, IdentityError, build_from_identity

FORMAT = "promptkd.adapter.v1"
TENSORS = "adapter.safetensors"
META = "adapter.json"
STORE = "class_vectors.safetensors"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_adapter(
    model: AdapterMixin,
    out_dir: str | Path,
    role: str,
    *,
    class_names: list[str] | None = None,
    store=None,
    config: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write adapter.safetensors + adapter.json (+ class_vectors.safetensors when a store is given).

    Every file is written atomically with the mode a plain ``open()`` gives (the umask's), and
    adapter.json last, so a folder with an adapter.json is complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in model.adapter_state_dict().items()}
    atomic_save_with(out / TENSORS, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT, "role": role}))
    meta: dict[str, Any] = {
        "format": FORMAT,
        "role": role,
        "backbone": model.identity(),
        "class_names": list(class_names) if class_names is not None else (store.class_names if store else None),
        "adapter_sha256": file_sha256(out / TENSORS),
        "num_tensors": len(tensors),
        "num_values": int(sum(t.numel() for t in tensors.values())),
        "config": config or {},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if store is not None:
        atomic_save_with(out / STORE, store.save)
        meta["store_fingerprint"] = store.fingerprint()
    meta.update(extra or {})
    atomic_write_json(out / META, meta, default=str)
    return out


def read_meta(path: str | Path) -> tuple[Path, dict]:
    """Locate an artefact folder (or its adapter.json) and read its metadata, checking the format."""
    p = Path(path)
    folder = p.parent if p.name in (META, TENSORS) else p
    meta_path = folder / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: no {META} here (not a promptkd artefact folder)")
    meta = read_json(meta_path, "artefact metadata")
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object, found {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unknown artefact format {meta.get('format')!r}, expected {FORMAT}")
    return folder, meta


def load_adapter(path: str | Path, role: str | None = None, **builder_options) -> tuple[AdapterMixin, dict]:
    """Rebuild the backbone from the recorded identity, then strictly load the learnt tensors."""
    folder, meta = read_meta(path)
    if role is not None and meta.get("role") != role:
        raise ValueError(f"{folder}: this artefact is a {meta.get('role')}, not a {role}")
    tensor_path = folder / TENSORS
    if not tensor_path.is_file():
        raise FileNotFoundError(f"{folder}: {TENSORS} is missing")
    digest = file_sha256(tensor_path)
    if meta.get("adapter_sha256") and digest != meta["adapter_sha256"]:
        raise ValueError(f"{tensor_path}: checksum differs from {META} (file changed or corrupt)")
    try:
        model = build_from_identity(meta["backbone"], meta["role"], **builder_options)
    except IdentityError as exc:
        raise IdentityError(f"{folder / META}: {exc}") from None
    model.load_adapter_state_dict(load_file(str(tensor_path)), source=str(tensor_path))
    return model, meta
