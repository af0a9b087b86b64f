"""Whole stages as library calls, each with a typed config, used by the CLI and by Python users alike.

* :func:`train_teacher` (stage 1) -> :class:`TeacherRun`
* :func:`build_class_vectors` -> :class:`ClassVectorsRun`
* :func:`build_teacher_cache` (stage 2's teacher outputs, ahead of it) -> :class:`TeacherCacheRun`
* :func:`distill` (stage 2) -> :class:`StudentRun`
* :func:`evaluate_model` -> :class:`EvalRun`

Each takes its config dataclass (or the same fields as keyword arguments), checks the output and every
setting before loading a model, and writes its files atomically into its output.
"""

from promptkd.stages.class_vectors import ClassVectorsConfig, ClassVectorsRun, build_class_vectors
from promptkd.stages.distillation import DistillConfig, DistillSettings, StudentRun, distill, distill_settings
from promptkd.stages.evaluation import EvalRun, EvaluateConfig, evaluate_model
from promptkd.stages.teacher import TeacherConfig, TeacherRun, TeacherSettings, teacher_settings, train_teacher
from promptkd.stages.teacher_cache import TeacherCacheConfig, TeacherCacheRun, build_teacher_cache

__all__ = [
    "ClassVectorsConfig", "ClassVectorsRun", "build_class_vectors",
    "DistillConfig", "DistillSettings", "StudentRun", "distill", "distill_settings",
    "EvalRun", "EvaluateConfig", "evaluate_model",
    "TeacherConfig", "TeacherRun", "TeacherSettings", "teacher_settings", "train_teacher",
    "TeacherCacheConfig", "TeacherCacheRun", "build_teacher_cache",
]
