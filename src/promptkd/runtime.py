"""Running a distilled student for inference: one interface over PyTorch and onnxruntime.

A :class:`Predictor` turns a batch of preprocessed images into class probabilities and knows its class
names, its preprocessing (:class:`~promptkd.models.backbones.ImageSpec`) and its identity. Two kinds:

* :class:`TorchPredictor`: a student folder or a safetensors bundle (``promptkd.serve.load_student``), in
  fp32 or bf16 (see :mod:`promptkd.precision`);
* :class:`OnnxPredictor`: an ONNX file written by ``promptkd export`` (fp32 or int8), whose metadata
  carries the class names and preprocessing.

Images are decoded by the data loader's :func:`promptkd.data.loader.read_image` (the same decoding as
training and evaluation) and prepared by :func:`prepare_batch`.

onnxruntime starts a telemetry client when it is IMPORTED (it creates a store under
``~/.cache/Microsoft`` and may contact its collector); ``promptkd/__init__.py`` sets
``ORT_DISABLE_TELEMETRY=1`` before anything imports it, and :func:`import_onnxruntime` does the same and
turns its events off, for callers that import this module first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from promptkd.models.backbones import ImageSpec

TELEMETRY_ENV = "ORT_DISABLE_TELEMETRY"
CHECK_IMAGES = 32  # images in the --precision auto check batch


def import_onnxruntime():
    """``onnxruntime`` with its telemetry off (the environment variable it reads at import, and its switch)."""
    os.environ.setdefault(TELEMETRY_ENV, "1")
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - onnxruntime is in the serve/test extras
        raise ValueError("onnxruntime is not installed: pip install 'promptkd[serve]'") from exc
    ort.disable_telemetry_events()
    return ort


def ort_session(path: str | os.PathLike, threads: int = 0):
    """A CPU onnxruntime session for ``path`` (``threads`` intra-op threads; 0: onnxruntime's choice)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ValueError(f"{path}: onnxruntime cannot load this model ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------------------------------
# images


def decode_image(source: str | os.PathLike | bytes, name: str | None = None,
                 max_pixels: int | None = None, setting: str = "data.max_image_pixels") -> Image.Image:
    """An 8-bit RGB image from a file path or from bytes, through the data loader's decoder
    (:func:`promptkd.data.decode.read_image`: 16-bit scaling, pixel limit, one-line errors).

    Bytes (an upload) are written to a private temporary file first, since the decoder reads paths.
    Raises ``ValueError`` naming the file (or ``name`` for bytes) when it cannot be decoded."""
    from promptkd.data.decode import DEFAULT_MAX_IMAGE_PIXELS, BadImageError, read_image

    limit = DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if not isinstance(source, bytes):
        try:
            return read_image(source, max_pixels=limit, setting=setting)
        except BadImageError as exc:
            raise ValueError(str(exc)) from exc
    import tempfile

    label = name or "<upload>"
    with tempfile.TemporaryDirectory(prefix="promptkd-upload-") as tmp:
        path = os.path.join(tmp, "upload" + Path(label).suffix.lower()[:8])
        with open(path, "wb") as f:  # scratch file, removed with its folder
            f.write(source)
        try:
            return read_image(path, max_pixels=limit, setting=setting)
        except BadImageError as exc:
            raise ValueError(str(exc).replace(path, label)) from exc


class Preparer:
    """PIL images -> float32 ``[B, C, S, S]`` as the student expects (resize, centre crop, normalise).

    ``channels == 1`` (the demo's grey students) gives the luminance channel, else RGB."""

    def __init__(self, spec: ImageSpec) -> None:
        from promptkd.data.transforms import Preprocess

        self.spec = spec
        self.transform = Preprocess.from_spec(spec)

    def one(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """One image -> ``[C, S, S]``; ``generator`` is accepted for the data loader's API and unused."""
        if self.spec.channels == 1:
            grey = self.transform.resize_and_crop(image).convert("L")
            x = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0).unsqueeze(0)
            return (x - self.spec.mean[0]) / self.spec.std[0]
        return self.transform(image)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.one(im) for im in images])


# --------------------------------------------------------------------------------------------------
# predictors


@dataclass
class ModelInfo:
    """What a served / predicting model is: shown by ``GET /health`` and written beside predictions."""

    name: str
    source: str
    backend: str  # torch | onnxruntime
    precision: str  # fp32 | bf16 | int8 (the file's own for ONNX)
    class_names: list[str]
    image_spec: ImageSpec
    identity: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def key(self) -> dict:
        """What must match for two runs to count as the same model (file locations left out)."""
        backbone = {k: v for k, v in (self.identity.get("backbone") or {}).items() if k != "weights"}
        return {"backbone": backbone, **{k: v for k, v in self.identity.items() if k != "backbone"}}

    def to_json(self) -> dict:
        spec = {k: v for k, v in vars(self.image_spec).items() if k != "extra"}
        return {"name": self.name, "source": self.source, "backend": self.backend, "precision": self.precision,
                "num_classes": len(self.class_names), "image_spec": spec, "identity": self.identity,
                "notes": self.notes}


class Predictor:
    """Preprocessed images ``[B, C, S, S]`` -> probabilities ``[B, N]`` (float32 numpy)."""

    info: ModelInfo

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    @property
    def image_spec(self) -> ImageSpec:
        return self.info.image_spec

    def probabilities(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def preparer(self) -> Preparer:
        return Preparer(self.image_spec)

    def top_k(self, probs: np.ndarray, k: int) -> list[list[tuple[int, str, float]]]:
        """Per row: (label, class name, probability) of the k most probable classes, best first."""
        k = max(1, min(int(k), probs.shape[1]))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(int(i), self.class_names[int(i)], float(row[i])) for i in idx] for row, idx in zip(probs, order)]


class TorchPredictor(Predictor):
    """A loaded student (``promptkd.serve.LoadedStudent``) in PyTorch, fp32 or bf16 (autocast)."""

    def __init__(self, loaded, precision: str = "fp32", device: str | torch.device = "cpu",
                 notes: Sequence[str] = ()) -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16 here, not {precision!r}")
        self.loaded = loaded
        self.device = torch.device(device)
        self.precision = precision
        self.model = loaded.classifier("logits").to(self.device).eval()
        identity = {"backbone": loaded.meta.get("backbone") or loaded.student.identity(),
                    "store_fingerprint": loaded.store.fingerprint(),
                    "adapter_sha256": loaded.meta.get("adapter_sha256")}
        self.info = ModelInfo(name=_model_name(loaded.source), source=loaded.source, backend="torch",
                              precision=precision, class_names=list(loaded.store.class_names),
                              image_spec=loaded.image_spec, identity=identity, notes=list(notes))

    @torch.no_grad()
    def logits(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(batch, dtype=torch.float32).to(self.device)
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return self.model(x).float()
        return self.model(x).float()

    def probabilities(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        return self.logits(batch).softmax(dim=-1).cpu().numpy()


class OnnxPredictor(Predictor):
    """An ONNX file exported by promptkd (fp32 or int8), run by onnxruntime on the CPU."""

    def __init__(self, path: str | os.PathLike, threads: int = 0) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: ONNX file not found")
        props = read_onnx_metadata(self.path)
        self.session = ort_session(self.path, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.output_kind = props.get("promptkd.output", "probabilities")
        spec = ImageSpec(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in json.loads(props["promptkd.image_spec"]).items()})
        quant = json.loads(props.get("promptkd.quantization", "null") or "null")
        identity = {"backbone": json.loads(props.get("promptkd.identity", "{}")),
                    "store_fingerprint": props.get("promptkd.store_fingerprint")}
        if quant:
            identity["quantization"] = quant
        self.info = ModelInfo(name=self.path.stem, source=str(self.path), backend="onnxruntime",
                              precision="int8" if quant else "fp32",
                              class_names=json.loads(props["promptkd.class_names"]), image_spec=spec,
                              identity=identity)

    def probabilities(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        x = batch.numpy() if isinstance(batch, torch.Tensor) else batch
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
        if self.output_kind == "logits":
            out = out - out.max(axis=1, keepdims=True)
            out = np.exp(out)
            out /= out.sum(axis=1, keepdims=True)
        return out.astype(np.float32, copy=False)


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``promptkd.*`` metadata of an exported ONNX file (class names, preprocessing, provenance)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc})") from exc
    props = {p.key: p.value for p in model.metadata_props}
    if "promptkd.class_names" not in props or "promptkd.image_spec" not in props:
        raise ValueError(f"{path}: this ONNX file was not exported by promptkd (no class names / preprocessing "
                         "in its metadata); export it with `promptkd export --format onnx`")
    return props


def _model_name(source: str) -> str:
    p = Path(source)
    return p.stem if p.suffix else p.name


def expand_inputs(items: Sequence[str]) -> list[str]:
    """Command-line inputs -> image paths: folders are searched recursively (sorted), files kept as given
    (a missing file stays in the list: it gets a row saying so, as does a broken link inside a folder)."""
    import warnings

    from promptkd.data.benchmarks import list_images
    from promptkd.data.scan import IMAGE_EXTENSIONS, DanglingLinkWarning

    out: list[str] = []
    for item in items:
        if not Path(item).is_dir():
            out.append(str(item))
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = list_images(item)
        broken = [p for w in caught if isinstance(w.message, DanglingLinkWarning) for p in w.message.paths
                  if Path(p).suffix.lower() in IMAGE_EXTENSIONS]
        for w in caught:  # other notes (loops...) as they were
            if not isinstance(w.message, DanglingLinkWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        out.extend(sorted([*found, *broken]))
    return out


def check_batch_from_files(spec: ImageSpec, paths: Sequence[str], limit: int = CHECK_IMAGES) -> torch.Tensor | None:
    """The first ``limit`` readable images of ``paths``, prepared: the batch ``--precision auto`` checks on."""
    images = []
    for p in paths:
        if len(images) >= limit:
            break
        try:
            images.append(decode_image(p))
        except (ValueError, OSError):
            continue
    return Preparer(spec)(images) if images else None


BACKENDS = ("auto", "torch", "onnxruntime")
AUTO_ONNX_MIN_IMAGES = 256  # below this, exporting to ONNX first costs more than it saves


def load_predictor(path: str | os.PathLike, *, precision: str = "auto", device: str = "cpu", threads: int = 0,
                   check_images: torch.Tensor | None = None, check_paths: Sequence[str] = (),
                   backend: str | None = None, expected_images: int | None = None, check_limit: int = CHECK_IMAGES,
                   **builder_options) -> Predictor:
    """A predictor for a student folder, a safetensors bundle or an exported ONNX file.

    ``precision`` (``auto`` | ``fp32`` | ``bf16``) applies to PyTorch models and is resolved by
    :func:`promptkd.precision.resolve_precision` on ``check_images``, else the first ``check_limit``
    readable ``check_paths``; with fewer than :data:`promptkd.precision.MIN_CHECK_IMAGES` real images to
    check on, ``auto`` stays fp32 (a check of n images rejects bf16 only when it sees a disagreement: 200+
    images make the 99.5% rule meaningful, at the cost of two passes over them). An ONNX file runs at the
    precision it was exported with (fp32 or int8); ``bf16`` is refused for it.

    ``backend`` for a folder or bundle (``None``: PyTorch; an ONNX file always runs on onnxruntime):
    ``torch``, ``onnxruntime`` (exported to fp32 ONNX in memory first,
    the same outputs within 1e-5; CPU, fp32 only) or ``auto``: onnxruntime when the precision resolves to
    fp32 on a CPU (measured faster there: ``benchmarks/bench_precision.py``) and the job is long enough to
    repay the export (a server: ``expected_images=None``, or at least :data:`AUTO_ONNX_MIN_IMAGES`
    images), PyTorch otherwise."""
    from promptkd.precision import resolve_precision
    from promptkd.serve import load_student

    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    p = Path(path)
    if p.suffix == ".onnx":
        if precision not in ("auto", "fp32", "int8"):
            raise ValueError(f"{p}: an ONNX file runs at the precision it was exported with; --precision "
                             f"{precision} applies to student folders and bundles only")
        if backend == "torch":
            raise ValueError(f"{p}: an ONNX file runs on onnxruntime (--backend torch needs a folder or bundle)")
        return OnnxPredictor(p, threads)
    backend = backend or "torch"
    if backend == "onnxruntime" and (precision == "bf16" or torch.device(device).type != "cpu"):
        raise ValueError("--backend onnxruntime runs fp32 on the CPU: use --precision fp32/auto and --device cpu")
    if threads > 0:
        torch.set_num_threads(threads)
    loaded = load_student(p, device=device, **builder_options)
    fp32 = TorchPredictor(loaded, "fp32", device)
    if backend == "onnxruntime":
        precision = "fp32"
    choice = None
    if check_images is None and precision == "auto":
        from promptkd.precision import PrecisionChoice, native_bf16

        if native_bf16(device)[0]:  # the check only runs where bf16 is a candidate
            check_images = check_batch_from_files(fp32.image_spec, check_paths, check_limit)
            if check_images is None:  # synthetic images say little about real ones: stay with fp32
                choice = PrecisionChoice("fp32", "precision auto -> fp32: bf16 is only kept after a check on real "
                                                 "images, and none were given (--check-images DIR)")
    if choice is None:
        choice = resolve_precision(precision, device=device,
                                   check=(lambda dtype: _check_logits(fp32, dtype, check_images)))
    long_job = expected_images is None or expected_images >= AUTO_ONNX_MIN_IMAGES
    use_ort = backend == "onnxruntime" or (backend == "auto" and choice.precision == "fp32" and long_job
                                           and torch.device(device).type == "cpu")
    if not use_ort:
        return TorchPredictor(loaded, choice.precision, device, notes=[choice.reason])
    return onnx_twin(loaded, fp32, threads, notes=[choice.reason, f"backend {backend} -> onnxruntime (fp32 "
                                                   "export of the same student, made in a temporary folder)"])


def onnx_twin(loaded, torch_predictor: TorchPredictor, threads: int = 0, notes: Sequence[str] = ()) -> OnnxPredictor:
    """The student exported to fp32 ONNX (temporary file) and loaded in onnxruntime; it keeps the PyTorch
    predictor's name and identity, so files written by either count as the same model."""
    import tempfile

    from promptkd.serve import export_onnx

    with tempfile.TemporaryDirectory(prefix="promptkd-ort-") as tmp:
        predictor = OnnxPredictor(export_onnx(loaded, Path(tmp) / "student.onnx", output="logits"), threads)
    info = torch_predictor.info
    predictor.info = ModelInfo(name=info.name, source=info.source, backend="onnxruntime", precision="fp32",
                               class_names=info.class_names, image_spec=info.image_spec, identity=info.identity,
                               notes=list(notes))
    return predictor


def _check_logits(fp32: TorchPredictor, precision: str, images: torch.Tensor) -> torch.Tensor:
    fp32.precision = precision
    try:
        return fp32.logits(images)
    finally:
        fp32.precision = "fp32"


def synthetic_check_batch(spec: ImageSpec, n: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random images (blurred noise + gradients), normalised as the model expects, when no real
    images are at hand for the precision check."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, spec.channels, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(spec.size, spec.size), mode="bilinear", align_corners=False)
    mean = torch.tensor(spec.mean[: spec.channels]).view(1, -1, 1, 1)
    std = torch.tensor(spec.std[: spec.channels]).view(1, -1, 1, 1)
    return (x - mean) / std
