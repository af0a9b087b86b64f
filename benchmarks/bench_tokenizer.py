"""Tokenizer throughput (texts/s): our CLIP tokenizer (cold and warm BPE cache) vs transformers' CLIPTokenizer.

The workload is what the project tokenizes most: the 1000 ImageNet class names in PromptSRC's 60
templates (60,000 prompts, batches of 77-token rows). transformers' tokenizer is the Rust-backed one
built from the same vocabulary (it skips OpenAI's ftfy/HTML clean-up, so it does less work).

    .venv/bin/python benchmarks/bench_tokenizer.py --templates 60 --out bench_tokenizer.json

Numbers depend on the CPU and on what else runs; compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from promptkd.data.benchmarks import packaged_asset, prompt_name
from promptkd.methods.templates import PROMPTSRC_TEMPLATES, fill
from promptkd.models.tokenizer import Tokenizer


def imagenet_names() -> list[str]:
    lines = packaged_asset("imagenet_classnames.txt").read_text(encoding="utf-8").splitlines()
    return [prompt_name(line.split(" ", 1)[1]) for line in lines if line.strip()]


def timed(fn, texts, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        fn(texts[i : i + batch])
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--templates", type=int, default=60, help="how many PromptSRC templates (1-60)")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    names = imagenet_names()
    texts = [fill(t, n) for t in PROMPTSRC_TEMPLATES[: args.templates] for n in names]
    results: dict[str, float | int | str] = {"texts": len(texts), "batch": args.batch}

    tok = Tokenizer()
    cold = timed(tok, texts, args.batch)
    warm = timed(tok, texts, args.batch)
    results["ours_cold_texts_per_s"] = round(len(texts) / cold, 1)
    results["ours_warm_texts_per_s"] = round(len(texts) / warm, 1)
    results["piece_cache"] = str(tok._piece_ids.cache_info())

    try:
        from transformers import CLIPTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            hf = CLIPTokenizer.from_pretrained(tok.save_hf_dir(tmp))
        hf_fn = lambda batch: hf(batch, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        hf_time = timed(hf_fn, texts, args.batch)
        results["transformers_texts_per_s"] = round(len(texts) / hf_time, 1)
        results["ours_warm_vs_transformers"] = round(hf_time / warm, 3)
    except ImportError:
        results["transformers_texts_per_s"] = "transformers not installed"

    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
