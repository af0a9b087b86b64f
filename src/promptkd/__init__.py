"""promptkd: unsupervised prompt distillation (PromptKD, CVPR 2024) for vision-language models.

Stage 1 teaches a big prompted teacher from a few labelled images; its class vectors are stored once;
stage 2 distils a small prompted student from unlabelled images by matching the teacher's logits.

The Python API is re-exported here and imported lazily (``import promptkd`` stays cheap). Whole stages::

    import promptkd
    teacher = promptkd.train_teacher(dataset="folder:my_data", clip_weights="ViT-L-14.safetensors",
                                     out="runs/t", preset="teacher/custom")
    vectors = promptkd.build_class_vectors(teacher=teacher.artefact, dataset="folder:my_data", out="runs/cv.safetensors")
    student = promptkd.distill(teacher=teacher.artefact, class_vectors=vectors.path, out="runs/s",
                               student_weights="ViT-B-16.safetensors", preset="distill/custom", dataset="folder:my_data")

and the parts they are made of (``load_clip_teacher``, ``build_store``, ``DistillModule``, ``fit``, ...).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"

# onnxruntime starts its telemetry client when it is imported (it reads this variable then): promptkd
# contacts nothing on the network, so it is off unless the user set the variable themselves.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# public name -> module that defines it
_API: dict[str, str] = {
    # whole stages (what the CLI runs)
    "train_teacher": "promptkd.stages.teacher",
    "build_class_vectors": "promptkd.stages.class_vectors",
    "distill": "promptkd.stages.distillation",
    "evaluate_model": "promptkd.stages.evaluation",
    "build_teacher_cache": "promptkd.stages.teacher_cache",
    "TeacherConfig": "promptkd.stages.teacher",
    "ClassVectorsConfig": "promptkd.stages.class_vectors",
    "DistillConfig": "promptkd.stages.distillation",
    "EvaluateConfig": "promptkd.stages.evaluation",
    "register_student": "promptkd.models.students",
    # models
    "load_clip": "promptkd.models.weights",
    "save_clip": "promptkd.models.weights",
    "ClipTeacher": "promptkd.models.clip_backbones",
    "ClipStudent": "promptkd.models.clip_backbones",
    "load_clip_teacher": "promptkd.models.clip_backbones",
    "load_clip_student": "promptkd.models.clip_backbones",
    "PromptConfig": "promptkd.models.prompts",
    "Tokenizer": "promptkd.models.tokenizer",
    "Teacher": "promptkd.models.backbones",
    "Student": "promptkd.models.backbones",
    # class vectors and artefacts
    "ClassVectorStore": "promptkd.store",
    "build_store": "promptkd.store",
    "save_adapter": "promptkd.artifacts",
    "load_adapter": "promptkd.artifacts",
    # data
    "load_benchmark": "promptkd.data.benchmarks",
    "base_novel_split": "promptkd.data.splits",
    "few_shot": "promptkd.data.splits",
    "LabelledImages": "promptkd.data.loader",
    "UnlabelledImages": "promptkd.data.loader",
    "Preprocess": "promptkd.data.transforms",
    "TrainAugment": "promptkd.data.transforms",
    # methods and the loop
    "zeroshot_store": "promptkd.methods.zeroshot",
    "PromptSRCModule": "promptkd.methods.promptsrc",
    "DistillModule": "promptkd.methods.promptkd",
    "distillation_loss": "promptkd.methods.promptkd",
    "load_teacher": "promptkd.methods.teacher_io",
    "LoopConfig": "promptkd.engine.loop",
    "fit": "promptkd.engine.loop",
    # evaluation and serving
    "evaluate_benchmark": "promptkd.evaluate",
    "load_student": "promptkd.serve",
    "predict": "promptkd.serve",
    "export_student": "promptkd.serve",
    "load_predictor": "promptkd.runtime",
    "resolve_precision": "promptkd.precision",
    "predict_to_file": "promptkd.batch_predict",
    "create_app": "promptkd.server",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'promptkd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
