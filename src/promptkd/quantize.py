"""int8 ONNX students: onnxruntime's quantisation of an fp32 export, with the class vectors baked in.

Two modes (``promptkd export --format onnx --quantize int8``):

* **static** (with ``--calibration``): activation ranges are measured once on calibration images (an
  unlabelled folder, or the train images of a dataset), weights are int8 per output channel; QDQ format
  (QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into int8 kernels); uint8 activations x
  int8 weights, the combination x86's int8 dot-product instructions (VNNI) are built for.
* **dynamic** (no calibration data): int8 weights; activation ranges are computed per batch at run time.
  Only MatMul/Gemm are quantised (a transformer's weights); convolutions stay fp32, so a CNN student
  gains little from it: calibrate it.

Some nodes always stay fp32 (:func:`excluded_nodes`): the classifier head, and in static mode the
convolutions measured to be sensitive on the demo's EfficientNet student (stem, depthwise, linear
projections; ``benchmarks/bench_int8.py`` measures each choice). The graph is first run through onnxruntime's pre-processing (shape
inference + graph optimisation), as its documentation advises. The result keeps promptkd's metadata
(class names, preprocessing, identity) plus ``promptkd.quantization``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from promptkd.fileio import atomic_save_with
from promptkd.runtime import import_onnxruntime, read_onnx_metadata

MODES = ("static", "dynamic")
# operators quantised by default (see the module docstring and benchmarks/bench_int8.py)
STATIC_OPS: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
DYNAMIC_OPS: tuple[str, ...] = ("MatMul", "Gemm")


@dataclass
class QuantizeSettings:
    mode: str = "static"
    per_channel: bool = True
    op_types: tuple[str, ...] | None = None  # None: STATIC_OPS / DYNAMIC_OPS
    quant_format: str = "qdq"  # qdq | qoperator (static only)
    calibration_method: str = "minmax"  # minmax | percentile | entropy (static only)
    activations: str = "uint8"  # uint8 | int8 (static only)
    reduce_range: bool = False  # 7-bit weights (for x86 CPUs without VNNI, where u8 x s8 products can saturate)
    exclude: tuple[str, ...] = ()  # node-name prefixes kept in fp32 (beyond the classifier head, always kept)
    sensitive_convs_fp32: bool = True  # stem, depthwise and linear-output convolutions stay fp32 (excluded_nodes)
    preprocess: bool = True
    extra: dict = field(default_factory=dict)

    def ops(self) -> tuple[str, ...]:
        return tuple(self.op_types) if self.op_types else (STATIC_OPS if self.mode == "static" else DYNAMIC_OPS)


class _BatchReader:
    """onnxruntime's CalibrationDataReader protocol over an iterable of float32 batches."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]) -> None:
        self.input_name = input_name
        self._it: Iterator[np.ndarray] = iter(batches)
        self.images = 0

    def get_next(self) -> dict | None:
        batch = next(self._it, None)
        if batch is None:
            return None
        self.images += batch.shape[0]
        return {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    def rewind(self) -> None:  # pragma: no cover - only used by onnxruntime's multi-pass calibrators
        raise RuntimeError("calibration batches can be read once")


def quantize_onnx(fp32_path: str | os.PathLike, out: str | os.PathLike, settings: QuantizeSettings,
                  calibration: Iterable[np.ndarray] | None = None, calibration_source: str = "",
                  name: str | None = None) -> Path:
    """Write an int8 copy of the promptkd ONNX file ``fp32_path`` to ``out`` (static needs ``calibration``).
    ``name`` is how error messages call the model (default: ``fp32_path``)."""
    ort = import_onnxruntime()
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    if settings.mode not in MODES:
        raise ValueError(f"quantisation mode must be one of {MODES}, not {settings.mode!r}")
    if settings.mode == "static" and calibration is None:
        raise ValueError("static int8 quantisation needs calibration images (--calibration FOLDER or dataset)")
    props = read_onnx_metadata(fp32_path)
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="promptkd-quant-") as tmp:
        source = Path(fp32_path)
        if settings.preprocess:
            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
            source = pre
        record = {"mode": settings.mode, "per_channel": settings.per_channel, "op_types": list(settings.ops()),
                  "onnxruntime": ort.__version__}
        raw = Path(tmp) / "int8.onnx"
        excluded = excluded_nodes(source, settings.exclude, settings.sensitive_convs_fp32)
        record.update(fp32_nodes=len(excluded), sensitive_convs_fp32=settings.sensitive_convs_fp32)
        if settings.mode == "dynamic":
            quantize_dynamic(str(source), str(raw), op_types_to_quantize=list(settings.ops()),
                             per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                             weight_type=QuantType.QInt8, nodes_to_exclude=excluded)
        else:
            import onnx

            input_name = onnx.load(str(source), load_external_data=False).graph.input[0].name
            reader = _BatchReader(input_name, calibration)
            method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                      "entropy": CalibrationMethod.Entropy}[settings.calibration_method]
            fmt = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}[settings.quant_format]
            try:
                quantize_static(str(source), str(raw), reader, quant_format=fmt, op_types_to_quantize=list(settings.ops()),
                                nodes_to_exclude=excluded, reduce_range=settings.reduce_range,
                                per_channel=settings.per_channel,
                                activation_type=QuantType.QUInt8 if settings.activations == "uint8" else QuantType.QInt8,
                                weight_type=QuantType.QInt8, calibrate_method=method,
                                extra_options=dict(settings.extra))
            except Exception as exc:  # onnxruntime says only 'No data is collected.'
                if reader.images == 0:
                    raise ValueError(f"no readable calibration images in {calibration_source or 'the calibration set'}") from exc
                raise
            if reader.images == 0:
                raise ValueError(f"no calibration images were read from {calibration_source or 'the calibration set'}")
            record.update(format=settings.quant_format, calibration_method=settings.calibration_method,
                          calibration_images=reader.images,
                          # the set's name only: the file travels, and this machine's folders are not its business
                          calibration_source=Path(calibration_source).name or calibration_source)
        quantized = _int8_nodes(raw)
        if quantized == 0:
            raise ValueError(f"{name or fp32_path}: {settings.mode} int8 found nothing to quantise in this student "
                             f"(dynamic int8 covers MatMul/Gemm layers; convolutions need static int8: pass "
                             f"--calibration FOLDER)")
        record["int8_nodes"] = quantized
        _copy_metadata(raw, props, record)
        atomic_save_with(out, lambda name: Path(name).write_bytes(raw.read_bytes()))
    return out


ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Gelu", "Elu", "Selu", "Tanh"}


def excluded_nodes(path: str | os.PathLike, prefixes: Sequence[str] = (), sensitive_convs: bool = True) -> list[str]:
    """Nodes left in fp32 (by name).

    Always: the classifier head, i.e. every node outside the exported ``student`` module (feature
    normalisation, the product with the class vectors, softmax): a few thousand multiply-adds that, in int8,
    would round the cosine similarities deciding between close classes. With ``sensitive_convs`` also the
    convolutions measured to lose accuracy in int8 on the demo's EfficientNet-Lite0 student
    (benchmarks/bench_int8.py): the first convolution (the stem, or a ViT's patch embedding), depthwise /
    grouped convolutions and convolutions whose output feeds no activation (linear bottleneck
    projections). Plus nodes whose name starts with one of ``prefixes``."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    keep: list[str] = []
    first_conv = True
    for node in graph.node:
        if not node.name.startswith("/student/") or any(node.name.startswith(p) for p in prefixes):
            keep.append(node.name)
            continue
        if node.op_type != "Conv" or not sensitive_convs:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        linear = not any(op in ACTIVATIONS for out in node.output for op in consumers.get(out, []))
        if first_conv or group > 1 or linear:
            keep.append(node.name)
        first_conv = False
    return keep


INT8_OPS = {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv",
            "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}


def _int8_nodes(path: Path) -> int:
    import onnx

    return sum(n.op_type in INT8_OPS for n in onnx.load(str(path), load_external_data=False).graph.node)


def _copy_metadata(path: Path, props: dict[str, str], record: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    existing = {p.key for p in model.metadata_props}
    for key, value in {**props, "promptkd.quantization": json.dumps(record, sort_keys=True)}.items():
        if key in existing:
            continue
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def calibration_batches(paths: Sequence[str], spec, batch_size: int = 16) -> Iterator[np.ndarray]:
    """Preprocessed float32 batches of calibration images; unreadable files are skipped (the file records
    how many images were read, and none at all is an error)."""
    from promptkd.runtime import Preparer, decode_image

    prepare = Preparer(spec)
    chunk: list = []
    for p in paths:
        try:
            chunk.append(decode_image(p))
        except ValueError:
            continue
        if len(chunk) == batch_size:
            yield prepare(chunk).numpy()
            chunk = []
    if chunk:
        yield prepare(chunk).numpy()


def calibration_paths(source: str, *, data_root: str | None = None, limit: int = 128, seed: int = 0) -> list[str]:
    """Up to ``limit`` image paths for calibration, spread over ``source`` (fixed by ``seed``).

    ``source`` is a folder of images (searched recursively, labels not needed), or a dataset reference
    as elsewhere in promptkd (a benchmark name with ``data_root``, ``folder:PATH``, ``list:FILE``), whose
    train images are used."""
    from promptkd.data.benchmarks import list_images, load_benchmark

    if limit < 1:
        raise ValueError(f"--calibration-size must be >= 1, got {limit}")
    if Path(source).is_dir() and ":" not in source:
        paths = list_images(source)
    else:
        bench = load_benchmark(data_root, source)
        paths = [s.path for s in bench.train]
        if not paths:
            raise ValueError(f"{source}: no train images to calibrate with")
    if len(paths) <= limit:
        return list(paths)
    rng = np.random.default_rng(seed)
    return [paths[i] for i in sorted(rng.choice(len(paths), size=limit, replace=False))]


def settings_json(settings: QuantizeSettings) -> dict:
    return asdict(settings)


def export_int8(loaded, out: str | os.PathLike, *, calibration: str | None = None, data_root: str | None = None,
                calibration_size: int = 128, mode: str = "auto", output: str = "probabilities", opset: int = 17,
                settings: QuantizeSettings | None = None) -> tuple[Path, dict]:
    """Export ``loaded`` (a ``serve.LoadedStudent``) to fp32 ONNX in a temporary folder, then quantise it to
    ``out``. ``mode`` auto: static when ``calibration`` is given, else dynamic. Returns the path and the
    quantisation record stored in the file's metadata."""
    from promptkd.serve import export_onnx

    if mode not in ("auto", *MODES):
        raise ValueError(f"--quantize-mode must be auto, static or dynamic, not {mode!r}")
    if mode == "auto":
        mode = "static" if calibration else "dynamic"
    if mode == "static" and not calibration:
        raise ValueError("static int8 quantisation needs --calibration (a folder of images or a dataset)")
    settings = settings or QuantizeSettings(mode=mode)
    settings.mode = mode
    batches = None
    if mode == "static":
        paths = calibration_paths(calibration, data_root=data_root, limit=calibration_size)
        batches = calibration_batches(paths, loaded.image_spec)
    with tempfile.TemporaryDirectory(prefix="promptkd-export-") as tmp:
        fp32 = export_onnx(loaded, Path(tmp) / "fp32.onnx", output=output, opset=opset)
        path = quantize_onnx(fp32, out, settings, batches, calibration_source=str(calibration or ""),
                             name=loaded.source)
    return path, json.loads(read_onnx_metadata(path)["promptkd.quantization"])
