"""Loader: dict samples, augmentation seeded by (seed, epoch, index), workers, resume, bad images, shards."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from promptkd.data.benchmarks import load_benchmark
from promptkd.data.fixtures import make_fixture
from promptkd.data.loader import (
    BadImageError,
    LabelledImages,
    UnlabelledImages,
    make_loader,
    read_image,
    sample_seed,
)


class RandomCrop:
    """A tiny stand-in for TrainAugment: random 16x16 crop + flip drawn from the given generator."""

    def __call__(self, img, generator: torch.Generator | None = None) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
        top = int(torch.randint(0, x.shape[1] - 16 + 1, (1,), generator=generator))
        left = int(torch.randint(0, x.shape[2] - 16 + 1, (1,), generator=generator))
        x = x[:, top:top + 16, left:left + 16]
        if torch.rand((), generator=generator) < 0.5:
            x = x.flip(-1)
        return x.contiguous()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_fixture(root, "OxfordPets", classes=3, per_class=4)
    return load_benchmark(root, "OxfordPets")


def _epoch(loader, epoch, start_batch=0):
    loader.set_epoch(epoch, start_batch)
    return list(loader)


def test_labelled_batches_follow_the_contract(bench):
    ds = LabelledImages(bench.train, RandomCrop(), seed=0)
    batches = _epoch(make_loader(ds, batch_size=5, shuffle=True, seed=3), 0)
    b = batches[0]
    assert set(b) == {"image", "label", "index"}
    assert b["image"].dtype == torch.float32 and b["image"].shape == (5, 3, 16, 16)
    assert b["label"].dtype == torch.int64
    idx = torch.cat([x["index"] for x in batches])
    assert sorted(idx.tolist()) == list(range(len(bench.train)))
    labels = torch.cat([x["label"] for x in batches])
    assert labels.tolist() == [bench.train[i].label for i in idx.tolist()]


def test_augmentation_depends_on_seed_epoch_index_not_workers(bench):
    ds = LabelledImages(bench.train, RandomCrop(), seed=11)
    serial = make_loader(ds, batch_size=4, shuffle=True, seed=1, num_workers=0)
    parallel = make_loader(LabelledImages(bench.train, RandomCrop(), seed=11), batch_size=4, shuffle=True,
                           seed=1, num_workers=2)
    for epoch in (0, 1):  # persistent workers must see the new epoch
        a, b = _epoch(serial, epoch), _epoch(parallel, epoch)
        for x, y in zip(a, b):
            assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"])
    e0, e1 = _epoch(serial, 0), _epoch(serial, 1)
    assert not torch.equal(e0[0]["index"], e1[0]["index"])  # a new order per epoch
    # the same sample gets a different augmentation in another epoch, the same one when the epoch repeats
    assert not torch.equal(ds[(0, 5)]["image"], ds[(1, 5)]["image"])
    assert torch.equal(ds[(1, 5)]["image"], ds[(1, 5)]["image"])
    assert sample_seed(0, 1, 2) != sample_seed(0, 2, 1)


def test_resume_mid_epoch_reproduces_the_rest(bench):
    ds = LabelledImages(bench.train, RandomCrop(), seed=4)
    loader = make_loader(ds, batch_size=3, shuffle=True, seed=9)
    full = _epoch(loader, 2)
    resumed = _epoch(make_loader(LabelledImages(bench.train, RandomCrop(), seed=4), batch_size=3, shuffle=True,
                                 seed=9), 2, start_batch=2)
    assert len(resumed) == len(full) - 2
    for x, y in zip(full[2:], resumed):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"])


def test_distributed_shards(bench):
    n = len(bench.test)
    seen = []
    for rank in range(3):
        loader = make_loader(LabelledImages(bench.test, RandomCrop()), batch_size=2, distributed=(rank, 3))
        seen += torch.cat([b["index"] for b in _epoch(loader, 0)]).tolist()
    assert sorted(seen) == list(range(n))  # evaluation: each sample exactly once over ranks
    train_idx = []
    for rank in range(2):
        loader = make_loader(LabelledImages(bench.train, RandomCrop()), batch_size=2, shuffle=True, seed=0,
                             distributed={"rank": rank, "world_size": 2})
        train_idx.append(torch.cat([b["index"] for b in _epoch(loader, 1)]).tolist())
    assert not set(train_idx[0]) & set(train_idx[1]) and len(train_idx[0]) == len(train_idx[1])
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        make_loader(LabelledImages(bench.train, RandomCrop()), batch_size=2, distributed=(2, 2))


def _corrupt(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 3])  # truncated JPEG


def test_corrupt_and_missing_images_are_named(tmp_path):
    make_fixture(tmp_path, "DTD", classes=2, per_class=3)
    bench = load_benchmark(tmp_path, "DTD")
    bad, missing = bench.train[1].path, bench.train[4].path
    _corrupt(bad)
    Path(missing).unlink()
    with pytest.raises(BadImageError, match=f"{bad}: cannot decode image"):
        read_image(bad)
    strict = LabelledImages(bench.train, RandomCrop(), on_bad_image="error")
    with pytest.raises(BadImageError, match=f"{missing}: image file missing"):
        strict[4]
    lenient = LabelledImages(bench.train, RandomCrop(), on_bad_image="skip")
    loader = make_loader(lenient, batch_size=2, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = _epoch(loader, 0)
    idx = torch.cat([b["index"] for b in batches]).tolist()
    labels = torch.cat([b["label"] for b in batches]).tolist()
    assert idx == [0, 2, 2, 3, 5, 5]  # each bad sample replaced by the next readable one
    assert labels == [bench.train[i].label for i in idx]
    assert set(lenient.bad_images()) == {bad, missing}  # seen by the worker processes
    with pytest.warns(UserWarning, match=r"epoch 1: 2 unreadable image\(s\)") as record:
        loader.set_epoch(1)
    assert bad in str(record[0].message) and missing in str(record[0].message)
    assert set(lenient.bad_seen) == {bad, missing} and lenient.bad_images() == {}


def test_all_bad_stops_with_the_paths(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"x{i}.jpg"
        p.write_bytes(b"not a jpeg")
        paths.append(str(p))
    ds = UnlabelledImages(paths, RandomCrop())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BadImageError, match="consecutive unreadable images"):
            ds[0]


def test_grayscale_and_png_decode_to_rgb(tmp_path):
    from PIL import Image

    Image.new("L", (20, 20), 128).save(tmp_path / "g.png")
    Image.new("RGBA", (20, 20), (10, 20, 30, 40)).save(tmp_path / "a.png")
    ds = UnlabelledImages([tmp_path / "g.png", tmp_path / "a.png"], RandomCrop())
    assert ds[0]["image"].shape == (3, 16, 16) and ds[1]["image"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="on_bad_image"):
        UnlabelledImages([], RandomCrop(), on_bad_image="ignore")


def test_iterating_again_without_set_epoch_moves_on(bench):
    ds = LabelledImages(bench.train, RandomCrop(), seed=2)
    loader = make_loader(ds, batch_size=12, shuffle=True, seed=5)
    first, second = next(iter(loader)), next(iter(loader))
    assert ds.epoch == 1 and not torch.equal(first["index"], second["index"])
    loader.set_epoch(0)
    assert torch.equal(next(iter(loader))["image"], first["image"])


def test_path_table_round_trips_unicode_paths():
    from promptkd.data.loader import PathTable

    paths = ["/d/a.jpg", "/d/ümlaut/é.png", "", "rel/x.JPEG"]
    table = PathTable(paths)
    assert list(table) == paths and len(table) == 4 and table[-1] == "rel/x.JPEG"
    with pytest.raises(IndexError):
        table[4]


def test_plain_datasets_get_indices_and_epochs():
    class Squares(torch.utils.data.Dataset):
        epochs: list[int] = []

        def __len__(self):
            return 5

        def __getitem__(self, i):
            return {"x": torch.tensor(i * i), "index": i}

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    ds = Squares()
    loader = make_loader(ds, batch_size=5, shuffle=True, seed=1)
    a, b = next(iter(loader)), next(iter(loader))
    assert sorted(a["x"].tolist()) == [0, 1, 4, 9, 16] and ds.epochs == [1]
    assert not torch.equal(a["index"], b["index"])


def test_with_the_project_transforms(bench):
    transforms = pytest.importorskip("promptkd.data.transforms", reason="data/transforms.py (helper B) not present")
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    train = LabelledImages(bench.train, transforms.TrainAugment(24, mean, std), seed=1)
    a = _epoch(make_loader(train, batch_size=4, shuffle=True, seed=0, num_workers=0), 3)
    b = _epoch(make_loader(LabelledImages(bench.train, transforms.TrainAugment(24, mean, std), seed=1),
                           batch_size=4, shuffle=True, seed=0, num_workers=2), 3)
    assert a[0]["image"].shape == (4, 3, 24, 24)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    test = LabelledImages(bench.test, transforms.Preprocess(24, mean, std))
    assert torch.equal(test[(0, 1)]["image"], test[(7, 1)]["image"])  # evaluation has no randomness


def test_transform_errors_name_the_file(bench):
    def broken(img, generator=None):
        raise ValueError("size mismatch")

    with pytest.raises(RuntimeError, match=f"{bench.train[2].path}: transform failed.*size mismatch"):
        LabelledImages(bench.train, broken)[2]


@pytest.mark.parametrize("n, world, drop_last", [(32, 2, False), (30, 4, False), (30, 4, True)])
def test_ranks_split_the_single_process_permutation(n, world, drop_last):
    """Each step over all ranks holds the images of one single-process step with the batch x world (so a
    DDP run trains on the same global batches as one process), every epoch, padded like DistributedSampler."""
    from promptkd.data.loader import SeededShuffle

    batch = 2
    for epoch in range(3):
        one = SeededShuffle(n, seed=5)
        one.set_epoch(epoch)
        order = list(one)
        ranks = [SeededShuffle(n, 5, r, world, drop_last) for r in range(world)]
        for r in ranks:
            r.set_epoch(epoch)
        per_rank = [list(r) for r in ranks]
        assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == len(ranks[0])
        total = len(per_rank[0]) * world
        assert total == (n - n % world if drop_last else -(-n // world) * world)
        for step in range(len(per_rank[0]) // batch):
            union = sorted(i for p in per_rank for i in p[step * batch:(step + 1) * batch])
            padded = (order * 2)[:total]
            assert union == sorted(padded[step * batch * world:(step + 1) * batch * world]), (epoch, step)
        covered = {i for p in per_rank for i in p}
        assert covered == set(order[:total]) if drop_last else covered == set(range(n))


def test_make_loader_uses_the_shared_permutation_for_any_number_of_processes():
    from promptkd.data.loader import make_loader

    data = list(range(24))  # any map-style dataset
    single = make_loader(data, 8, shuffle=True, seed=3)
    single.set_epoch(1)
    first = next(iter(single))
    ranks = [make_loader(data, 4, shuffle=True, seed=3, distributed=(r, 2)) for r in range(2)]
    for loader in ranks:
        loader.set_epoch(1)
    together = torch.cat([next(iter(loader)) for loader in ranks])
    assert sorted(together.tolist()) == sorted(first.tolist())
