"""Zero-shot classification: class vectors from the frozen text tower over prompt templates.

For each template t the frozen text features of "t(class name)" are L2-normalised, averaged over the
templates and renormalised (CLIP's prompt-ensembling recipe):

    w_c = normalize( (1/T) * sum_t normalize(f_text(t(c))) )

With one template this is just the normalised text feature. The result is a
:class:`~promptkd.store.ClassVectorStore`, so zero-shot CLIP is evaluated by the same code as the
teacher and the student (``store.logits(teacher.encode_image(x, prompted=False))``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from promptkd.methods.templates import DEFAULT_TEMPLATE, check_templates, fill
from promptkd.progress import progress_bar
from promptkd.store import ClassVectorStore


@torch.no_grad()
def zeroshot_class_vectors(teacher, class_names: Sequence[str], templates: Sequence[str] = (DEFAULT_TEMPLATE,),
                           batch_size: int = 256, progress: bool = False) -> Tensor:
    """``[N, D]`` float32 CPU tensor of L2-normalised class vectors from ``teacher.encode_text``.

    ``templates`` hold one ``{}`` each; class names get CoOp's clean-up (``_`` -> space) first.
    """
    names = list(class_names)
    if not names:
        raise ValueError("zero-shot classification needs at least one class name")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    templates = check_templates(templates)
    was_training = teacher.training
    teacher.eval()
    total: Tensor | None = None
    try:
        for template in progress_bar(templates, desc="zero-shot templates", unit="template",
                                    enabled=progress and len(templates) >= 2):
            texts = [fill(template, name) for name in names]
            chunks = [teacher.encode_text(texts[i : i + batch_size]).float().cpu() for i in range(0, len(texts), batch_size)]
            feats = F.normalize(torch.cat(chunks), dim=-1)
            if feats.shape[0] != len(names):
                raise ValueError(f"encode_text returned {feats.shape[0]} features for {len(names)} texts")
            total = feats if total is None else total + feats
    finally:
        teacher.train(was_training)
    assert total is not None
    return F.normalize(total / len(templates), dim=-1)


def zeroshot_store(teacher, class_names: Sequence[str], templates: Sequence[str] = (DEFAULT_TEMPLATE,),
                   batch_size: int = 256, progress: bool = False) -> ClassVectorStore:
    """A class-vector store of zero-shot vectors; the teacher identity records the templates used."""
    templates = check_templates(templates)
    vectors = zeroshot_class_vectors(teacher, class_names, templates, batch_size=batch_size, progress=progress)
    identity = dict(teacher.identity())
    identity["class_vectors"] = {"source": "zeroshot", "templates": list(templates)}
    return ClassVectorStore(vectors=vectors, class_names=list(class_names),
                            logit_scale=float(teacher.logit_scale()), teacher=identity)
