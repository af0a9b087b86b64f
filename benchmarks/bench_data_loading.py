"""Decode + train-augmentation throughput (images/s) of the data loader with 0, 1 and 2 workers.

Generates 500x375 JPEGs (about the size of typical benchmark images), then times full epochs of
``UnlabelledImages`` + ``make_loader`` with the paper's train augmentation (RandomResizedCrop 224,
flip, CLIP normalisation) after one warm-up epoch (persistent workers already started).

    .venv/bin/python benchmarks/bench_data_loading.py --images 256 --workers 0 1 2 --out bench_data.json

Numbers depend on the CPU and on what else runs; compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from promptkd.data.loader import UnlabelledImages, make_loader, read_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def train_transform(size: int):
    """The project's TrainAugment (helper B's data/transforms.py); a PIL fallback while it is absent."""
    try:
        from promptkd.data.transforms import TrainAugment

        return TrainAugment(size, CLIP_MEAN, CLIP_STD), "promptkd.data.transforms.TrainAugment"
    except ImportError:
        return _FallbackAugment(size), "fallback (PIL RandomResizedCrop + flip + normalise, in this script)"


class _FallbackAugment:
    def __init__(self, size: int):
        self.size = size
        self.mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        w, h = img.size
        area = w * h * float(torch.empty(()).uniform_(0.08, 1.0, generator=generator))
        ratio = float(torch.empty(()).uniform_(np.log(3 / 4), np.log(4 / 3), generator=generator).exp())
        cw, ch = min(w, int(round((area * ratio) ** 0.5))), min(h, int(round((area / ratio) ** 0.5)))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
        img = img.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
        if float(torch.rand((), generator=generator)) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std


def make_images(folder: Path, count: int, size=(500, 375)) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    for i in range(count):
        base = np.stack([np.sin(xx / (7 + i % 13)), np.cos(yy / (5 + i % 11)), np.sin((xx + yy) / 17)], -1)
        img = (127 + 100 * base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8)
        path = folder / f"img{i:04d}.jpg"
        Image.fromarray(img).save(path, "JPEG", quality=90)
        paths.append(str(path))
    return paths


def time_epochs(paths: list[str], transform, workers: int, batch_size: int, epochs: int) -> float:
    loader = make_loader(UnlabelledImages(paths, transform), batch_size=batch_size, shuffle=True,
                         num_workers=workers, pin_memory=False)
    loader.set_epoch(0)
    for _ in loader:  # warm-up: starts the persistent workers
        pass
    start = time.perf_counter()
    seen = 0
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        for batch in loader:
            seen += batch["image"].shape[0]
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per configuration")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    transform, which = train_transform(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), args.images)
        start = time.perf_counter()
        for p in paths:
            read_image(p)
        decode_only = len(paths) / (time.perf_counter() - start)
        results = {"images": args.images, "image_size": [500, 375], "crop": args.size, "transform": which,
                   "batch_size": args.batch_size, "decode_only_img_per_s": round(decode_only, 1), "workers": {}}
        for w in args.workers:
            results["workers"][str(w)] = round(time_epochs(paths, transform, w, args.batch_size, args.epochs), 1)
    print(f"transform: {which}")
    print(f"decode only (main process): {results['decode_only_img_per_s']:8.1f} img/s")
    base = results["workers"].get("0")
    for w, ips in results["workers"].items():
        ratio = f"  ({ips / base:.2f}x vs 0 workers)" if base else ""
        print(f"decode + augment, {w} worker(s): {ips:8.1f} img/s{ratio}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
