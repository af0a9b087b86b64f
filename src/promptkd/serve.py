"""Using a distilled student on its own: load, predict, export (ONNX, self-contained safetensors bundle).

A saved student is a folder (``artifacts.save_adapter(..., store=...)``): ``adapter.safetensors`` (the
learnt prompts + projector), ``class_vectors.safetensors`` (the teacher's class vectors it was distilled
with) and ``adapter.json``. Inference needs the student IMAGE encoder, the projector and the stored
class vectors only: no text encoder is built and no tokenizer is loaded anywhere in this module.

The bundle (``export --format safetensors``) is ONE file holding the whole student (frozen encoder
weights included), the class vectors and the JSON metadata, so it loads without the original CLIP
checkpoint: tensors ``model.<name>`` (the student's full state dict) and ``class_vectors``; metadata
``format``, ``identity``, ``class_names``, ``logit_scale``, ``image_spec`` and ``adapter`` (the
artefact's adapter.json).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from promptkd.artifacts import STORE, load_adapter, read_meta
from promptkd.models.backbones import ImageSpec, build_from_identity
from promptkd.store import ClassVectorStore

BUNDLE_FORMAT = "promptkd.student_bundle.v1"
OUTPUTS = ("probabilities", "logits")


class StudentClassifier(nn.Module):
    """images -> probabilities (or logits) over the stored classes; the class vectors are a buffer."""

    def __init__(self, student: nn.Module, store: ClassVectorStore, output: str = "probabilities"):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, not {output!r}")
        self.student = student
        self.register_buffer("class_vectors", store.vectors.detach().float().clone())
        self.register_buffer("logit_scale", torch.tensor(float(store.logit_scale)))
        self.output = output
        self.class_names = list(store.class_names)

    def forward(self, images: Tensor) -> Tensor:
        feats = self.student(images).float()
        feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        logits = self.logit_scale * feats @ self.class_vectors.t()
        return logits.softmax(dim=-1) if self.output == "probabilities" else logits


# --------------------------------------------------------------------------------------------------
# loading


@dataclass
class LoadedStudent:
    student: nn.Module
    store: ClassVectorStore
    meta: dict  # the artefact's adapter.json (or the bundle's copy of it)
    source: str

    @property
    def image_spec(self) -> ImageSpec:
        return getattr(self.student, "image_spec", ImageSpec())

    def classifier(self, output: str = "probabilities") -> StudentClassifier:
        return StudentClassifier(self.student, self.store, output).eval()


def load_student_folder(folder: str | os.PathLike, **builder_options) -> LoadedStudent:
    """A student artefact folder: rebuild the frozen backbone, load prompts + projector and the store."""
    folder, meta = read_meta(folder)
    if meta.get("role") != "student":
        raise ValueError(f"{folder}: this artefact is a {meta.get('role')}, not a student")
    store_path = folder / STORE
    if not store_path.is_file():
        raise FileNotFoundError(f"{folder}: {STORE} is missing (a student folder carries its class vectors)")
    store = ClassVectorStore.load(store_path, expect_classes=meta.get("class_names"))
    recorded = meta.get("store_fingerprint")
    if recorded and recorded != store.fingerprint():
        raise ValueError(f"{store_path}: class vectors differ from the ones the student was distilled with "
                         f"(fingerprint {store.fingerprint()} vs {recorded} in adapter.json)")
    student, meta = load_adapter(folder, role="student", **builder_options)
    student.eval()
    return LoadedStudent(student, store, meta, str(folder))


def load_student(path: str | os.PathLike, *, device: str | torch.device = "cpu", **builder_options) -> LoadedStudent:
    """A student folder or an exported ``.safetensors`` bundle, on ``device``, in eval mode."""
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors" and p.name != STORE:
        loaded = load_bundle(p)
    elif p.exists():
        loaded = load_student_folder(p, **builder_options)
    else:
        raise FileNotFoundError(f"student not found: {p} (a student folder or an exported .safetensors bundle)")
    loaded.student.to(device)
    return loaded


# --------------------------------------------------------------------------------------------------
# prediction


def preprocess_for(spec: ImageSpec):
    """The test-time transform of a backbone: resize (short side) + centre crop + normalisation, giving
    ``spec.channels`` channels (the demo's grey students take the luminance)."""
    from promptkd.runtime import Preparer

    return Preparer(spec).one


@dataclass
class Prediction:
    image: str
    top: list[tuple[int, str, float]]  # (label, class name, probability)

    def to_json(self) -> dict:
        return {"image": self.image, "predictions": [
            {"label": i, "class_name": n, "probability": round(p, 6)} for i, n, p in self.top]}


@torch.no_grad()
def predict(loaded: LoadedStudent, images: Sequence[str | os.PathLike], *, top_k: int = 5, batch_size: int = 32,
            device: str | torch.device = "cpu") -> list[Prediction]:
    """Top-k classes with probabilities for each image file (softmax of the scaled cosine logits)."""
    from promptkd.data.loader import BadImageError, read_image

    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    transform = preprocess_for(loaded.image_spec)
    model = loaded.classifier("probabilities").to(device)
    k = min(top_k, loaded.store.num_classes)
    out: list[Prediction] = []
    paths = [str(p) for p in images]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image file(s) not found: {', '.join(missing[:10])}")
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        try:
            batch = torch.stack([transform(read_image(p)) for p in chunk]).to(device)
        except BadImageError as exc:
            raise ValueError(str(exc)) from exc
        probs, labels = model(batch).topk(k, dim=-1)
        for path, pr, lab in zip(chunk, probs.tolist(), labels.tolist()):
            out.append(Prediction(path, [(i, loaded.store.class_names[i], p) for i, p in zip(lab, pr)]))
    return out


def format_predictions(preds: Sequence[Prediction]) -> str:
    lines = []
    for p in preds:
        lines.append(p.image)
        width = max(len(n) for _, n, _ in p.top)
        lines.extend(f"  {r + 1}. {n:<{width}}  {100 * pr:6.2f}%" for r, (_, n, pr) in enumerate(p.top))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# export


def export_onnx(loaded: LoadedStudent, out: str | os.PathLike, *, output: str = "probabilities",
                opset: int = 17, batch_size: int = 1) -> Path:
    """ONNX graph ``images [B,3,S,S] -> probabilities|logits [B,N]`` with the class vectors baked in.

    Uses the TorchScript-based exporter (``dynamo=False``): it needs no ``onnxscript``. The batch
    axis is dynamic; the image size is the student's ``image_spec.size``."""
    from promptkd.fileio import atomic_save_with

    model = loaded.classifier(output).cpu().eval()
    size = loaded.image_spec.size
    dummy = torch.zeros(batch_size, loaded.image_spec.channels, size, size)

    def write(name: str) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter's notice
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # input shape checks, fixed at trace
            torch.onnx.export(
                model, (dummy,), name, dynamo=False, input_names=["images"], output_names=[output],
                dynamic_axes={"images": {0: "batch"}, output: {0: "batch"}}, opset_version=opset,
            )
        _annotate_onnx(Path(name), loaded, output)

    return atomic_save_with(out, write)


def _annotate_onnx(path: Path, loaded: LoadedStudent, output: str) -> None:
    """Record class names, preprocessing and provenance in the ONNX model's metadata_props."""
    import onnx

    model = onnx.load(str(path))
    spec = loaded.image_spec
    props = {
        "promptkd.class_names": json.dumps(loaded.store.class_names),
        "promptkd.output": output,
        "promptkd.image_spec": json.dumps(_spec_json(spec)),
        "promptkd.preprocessing": json.dumps(preprocessing_recipe(spec)),
        "promptkd.identity": json.dumps(loaded.meta.get("backbone", {}), sort_keys=True, default=str),
        "promptkd.store_fingerprint": loaded.store.fingerprint(),
    }
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(path))


def preprocessing_recipe(spec: ImageSpec, input_name: str = "images") -> dict:
    """The exact test-time preprocessing of ``spec``, written into exported files so that a program without
    promptkd can reproduce it (``predict``/``serve`` do these steps; see :class:`promptkd.runtime.Preparer`)."""
    grey = spec.channels == 1
    mean, std = (list(spec.mean[:1]), list(spec.std[:1])) if grey else (list(spec.mean), list(spec.std))
    return {
        "input": {"name": input_name, "layout": "NCHW", "dtype": "float32",
                  "shape": ["batch", spec.channels, spec.size, spec.size]},
        "steps": [
            {"op": "decode", "mode": "RGB", "note": "PIL Image.convert('RGB'); 16-bit grey scaled v * 255 / 65535"},
            {"op": "resize", "short_side": spec.size, "long_side": "int(short_side * long / short), truncated",
             "interpolation": spec.interpolation, "note": "skipped when the image already has that size"},
            {"op": "center_crop", "size": spec.size,
             "offset": "left = round((width - size) / 2), top = round((height - size) / 2), Python's round"},
            *([{"op": "grey", "note": "PIL Image.convert('L') of the cropped RGB image"}] if grey else []),
            {"op": "scale", "factor": 1 / 255},
            {"op": "normalize", "mean": mean, "std": std, "note": "(x - mean) / std per channel"},
        ],
    }


def _spec_json(spec: ImageSpec) -> dict:
    d = dataclasses.asdict(spec)
    d.pop("extra", None)
    return d


def save_bundle(loaded: LoadedStudent, out: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """One safetensors file: the full student (frozen weights too), class vectors, JSON metadata.

    ``dtype=torch.bfloat16`` stores the model's floating-point tensors in bf16 (half the size; they are
    read back into fp32 parameters); the class vectors stay fp32."""
    from promptkd.fileio import atomic_save_with

    def cast(v: Tensor) -> Tensor:
        v = v.detach().cpu()
        return v.to(dtype) if dtype is not None and v.is_floating_point() else v

    tensors = {f"model.{k}": cast(v).contiguous() for k, v in loaded.student.state_dict().items()}
    tensors["class_vectors"] = loaded.store.vectors.detach().cpu().float().contiguous()
    identity = loaded.meta.get("backbone") or loaded.student.identity()
    meta = {
        "format": BUNDLE_FORMAT,
        "identity": json.dumps(identity, sort_keys=True, default=str),
        "class_names": json.dumps(loaded.store.class_names),
        "logit_scale": repr(float(loaded.store.logit_scale)),
        "teacher": json.dumps(loaded.store.teacher, sort_keys=True, default=str),
        "image_spec": json.dumps(_spec_json(loaded.image_spec)),
        "preprocessing": json.dumps(preprocessing_recipe(loaded.image_spec)),
        "adapter": json.dumps(loaded.meta, default=str),
    }
    if dtype is not None:
        meta["dtype"] = str(dtype).replace("torch.", "")
    return atomic_save_with(out, lambda name: save_file(_dedupe_shared(tensors), name, metadata=meta))


def _dedupe_shared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses tensors sharing memory (tied weights): give each its own copy."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def load_bundle(path: str | os.PathLike) -> LoadedStudent:
    """Rebuild a student from a bundle alone: architecture from the identity, every weight from the file."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != BUNDLE_FORMAT:
                raise ValueError(f"{path}: not a promptkd student bundle (format {meta.get('format')!r}, "
                                 f"expected {BUNDLE_FORMAT})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except ValueError:
        raise
    except Exception as exc:  # corrupt or not safetensors
        raise ValueError(f"{path}: not a readable safetensors bundle ({exc})") from exc
    identity = json.loads(meta["identity"])
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    student = build_from_identity(identity, "student", state_dict=state)
    missing, unexpected = student.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: bundle does not fit the rebuilt student; missing {list(missing)[:8]}, "
                         f"unexpected {list(unexpected)[:8]}")
    student.eval()
    store = ClassVectorStore(tensors["class_vectors"].float(), json.loads(meta["class_names"]),
                             float(meta["logit_scale"]), json.loads(meta.get("teacher", "{}")))
    return LoadedStudent(student, store, json.loads(meta.get("adapter", "{}")), str(path))


# --------------------------------------------------------------------------------------------------
# the export command as one library call


@dataclass
class ExportReport:
    path: Path
    num_classes: int
    precision: str
    notes: list[str]

    def line(self) -> str:
        size = self.path.stat().st_size / 2**20
        return f"wrote {self.path} ({size:.1f} MiB, {self.num_classes} classes, {self.precision})"


def export_student(student: str | os.PathLike, out: str | os.PathLike, *, fmt: str, output: str = "probabilities",
                   opset: int = 17, quantize: str | None = None, calibration: str | None = None,
                   data_root: str | None = None, calibration_size: int = 128, quantize_mode: str = "auto",
                   precision: str = "auto", **builder_options) -> ExportReport:
    """``promptkd export``: ONNX (fp32 or int8) or a self-contained safetensors bundle (fp32 or bf16).

    ``precision=auto`` stores fp32: the file runs on machines this process cannot see, and
    ``predict``/``serve --precision auto`` choose bf16 where they run. ``quantize="int8"`` (ONNX only) is
    static with ``calibration`` images (a folder, or a dataset with ``data_root``), else dynamic."""
    from promptkd.precision import PRECISION_CHOICES

    if fmt not in ("onnx", "safetensors"):
        raise ValueError(f"--format must be onnx or safetensors, not {fmt!r}")
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}, not {precision!r}")
    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize must be int8, not {quantize!r}")
    if quantize and fmt != "onnx":
        raise ValueError("--quantize int8 applies to --format onnx (onnxruntime runs the int8 graph)")
    if quantize and precision == "bf16":
        raise ValueError("--quantize int8 and --precision bf16 exclude each other")
    if calibration and not quantize:
        raise ValueError("--calibration is only used with --quantize int8")
    if fmt == "onnx" and precision == "bf16":
        raise ValueError("--precision bf16 is not offered for ONNX (onnxruntime's CPU kernels are fp32/int8): "
                         "use --quantize int8 for a smaller, faster file")
    notes = []
    if precision == "auto" and not quantize:  # int8 has no float precision to choose
        notes.append("precision auto -> fp32: an exported file runs on machines this one cannot check; "
                     "`promptkd predict/serve --precision auto` pick bf16 where it pays")
    loaded = load_student(student, **builder_options)
    if fmt == "safetensors":
        dtype = torch.bfloat16 if precision == "bf16" else None
        path = save_bundle(loaded, out, dtype=dtype)
        return ExportReport(path, loaded.store.num_classes, "bf16" if dtype else "fp32", notes)
    if not quantize:
        path = export_onnx(loaded, out, output=output, opset=opset)
        return ExportReport(path, loaded.store.num_classes, "fp32", notes)
    from promptkd.quantize import export_int8

    path, record = export_int8(loaded, out, calibration=calibration, data_root=data_root,
                               calibration_size=calibration_size, mode=quantize_mode, output=output, opset=opset)
    if record["mode"] == "dynamic" and not calibration:
        notes.append("no --calibration images: dynamic int8 (activation ranges computed per batch)")
    else:
        notes.append(f"static int8 calibrated on {record.get('calibration_images')} images "
                     f"from {record.get('calibration_source')}")
    return ExportReport(path, loaded.store.num_classes, "int8", notes)


def resolve_precision(requested: str, **kwargs):
    """See :func:`promptkd.precision.resolve_precision` (re-exported here for serving code)."""
    from promptkd.precision import resolve_precision as resolve

    return resolve(requested, **kwargs)
