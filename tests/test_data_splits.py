"""Splits: base/novel, seeded few-shot with a JSON cache, and label-free unlabelled streams."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import warnings
from collections import defaultdict

import pytest
import torch

from promptkd.data.benchmarks import Benchmark, Sample, load_benchmark
from promptkd.data.fixtures import make_fixture
from promptkd.data.loader import UnlabelledImages, make_loader
from promptkd.data.splits import (
    base_novel_split,
    class_halves,
    few_shot,
    few_shot_benchmark,
    unlabelled_from,
    unlabelled_paths,
)


def _samples(per_class: dict[int, int]) -> list[Sample]:
    out = []
    for label, n in per_class.items():
        out.extend(Sample(f"/data/c{label}/img{i:03d}.jpg", label, f"class {label}") for i in range(n))
    random.Random(0).shuffle(out)  # classes interleaved, as in real split files
    return out


def _dassl_reference(samples: list[Sample], k: int, seed: int) -> list[Sample]:
    """Dassl's generate_fewshot_dataset as documented: global RNG seeded, classes in order of first
    appearance, random.sample(items, k) per class (all items when fewer)."""
    state = random.getstate()
    try:
        random.seed(seed)
        tracker = defaultdict(list)
        for s in samples:
            tracker[s.label].append(s)
        out = []
        for items in tracker.values():
            out.extend(random.sample(items, k) if len(items) >= k else items)
        return out
    finally:
        random.setstate(state)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 101, 397])
def test_class_halves(n):
    base, novel = class_halves(n)
    assert base + novel == list(range(n)) and len(base) == (n + 1) // 2


def test_few_shot_deterministic_and_seed_dependent():
    samples = _samples({c: 30 for c in range(6)})
    a, b = few_shot(samples, 4, seed=1), few_shot(list(samples), 4, seed=1)
    assert a == b and len(a) == 24
    assert all(sum(s.label == c for s in a) == 4 for c in range(6))
    assert few_shot(samples, 4, seed=2) != a
    assert a == _dassl_reference(samples, 4, 1)


def test_few_shot_same_across_processes_and_hash_seeds(tmp_path):
    code = ("from promptkd.data.benchmarks import Sample; from promptkd.data.splits import few_shot;"
            "s=[Sample(f'/d/{c}/{i}.jpg', c, str(c)) for i in range(20) for c in range(5)];"
            "print([x.path for x in few_shot(s, 3, 7)])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": h}).stdout for h in ("0", "12345")}
    assert len(outs) == 1


def test_few_shot_k_larger_than_class_keeps_all_and_warns():
    samples = _samples({0: 10, 1: 2, 2: 16})
    with pytest.warns(UserWarning, match=r"1 class\(es\) have fewer than 8 images.*1 \('class 1': 2\)"):
        picked = few_shot(samples, 8, seed=3)
    counts = {c: sum(s.label == c for s in picked) for c in range(3)}
    assert counts == {0: 8, 1: 2, 2: 8}


def test_few_shot_cache_is_json_keyed_and_checked(tmp_path):
    samples = _samples({0: 12, 1: 12})
    first = few_shot(samples, 2, seed=5, cache_dir=tmp_path, name="toy")
    cache = tmp_path / "toy_shot2_seed5.json"
    record = json.loads(cache.read_text())
    assert (record["k"], record["seed"], record["paths"]) == (2, 5, [s.path for s in first])
    record["indices"] = [0, 1, 2, 3]  # a cache is trusted only for the list it was made from:
    cache.write_text(json.dumps(record))
    assert few_shot(samples, 2, seed=5, cache_dir=tmp_path, name="toy") == [samples[i] for i in range(4)]
    other = samples[:-1]
    with pytest.warns(UserWarning, match="different sample list"):
        again = few_shot(other, 2, seed=5, cache_dir=tmp_path, name="toy")
    assert again == few_shot(other, 2, seed=5)
    assert not list(tmp_path.glob("*.pkl"))


def test_few_shot_benchmark_then_base_matches_coop_order(tmp_path):
    make_fixture(tmp_path, "Caltech101", classes=5, per_class=6, val_per_class=5)
    bench = load_benchmark(tmp_path, "Caltech101")
    fs = few_shot_benchmark(bench, 2, seed=1, cache_dir=tmp_path / "cache")
    assert len(fs.train) == 10 and len(fs.val) == 10 and fs.test == bench.test
    # Dassl draws val after train from one seeded stream
    state = random.getstate()
    random.seed(1)
    tracker_train, tracker_val = defaultdict(list), defaultdict(list)
    for x in bench.train:
        tracker_train[x.label].append(x)
    for x in bench.val:
        tracker_val[x.label].append(x)
    expected_train = [y for items in tracker_train.values() for y in random.sample(items, 2)]
    expected_val = [y for items in tracker_val.values() for y in random.sample(items, 2)]
    random.setstate(state)
    assert (fs.train, fs.val) == (expected_train, expected_val)
    base = base_novel_split(fs).base
    assert len(base.train) == 6 and {s.label for s in base.train} == {0, 1, 2}
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


def test_unlabelled_stream_cannot_carry_labels(tmp_path):
    make_fixture(tmp_path, "EuroSAT", classes=4, per_class=2)
    bench = load_benchmark(tmp_path, "EuroSAT")
    paths = unlabelled_paths(bench, "transductive")
    assert paths == [s.path for s in bench.train] and all(isinstance(p, str) for p in paths)
    # labels cannot be smuggled in: samples (with .label) and (path, label) pairs are refused
    with pytest.raises(TypeError, match="paths only"):
        UnlabelledImages(bench.train, lambda img, generator=None: torch.zeros(3, 4, 4))
    with pytest.raises(TypeError, match="paths only"):
        UnlabelledImages([(s.path, s.label) for s in bench.train], lambda img, generator=None: torch.zeros(3, 4, 4))

    def transform(img, generator=None):
        return torch.zeros(3, 4, 4)

    ds = UnlabelledImages(paths, transform)
    # nothing label-like is stored: the dataset is only its paths, a transform and seeds
    assert all("label" not in key for key in vars(ds))
    # relabelling the benchmark in any way leaves the stream (and what it yields) identical
    scrambled = Benchmark(bench.name, bench.classnames, [Sample(s.path, 0, "x") for s in bench.train], [], [])
    assert unlabelled_paths(scrambled) == paths
    batches = list(make_loader(ds, batch_size=3))
    assert all(set(b) == {"image", "index"} for b in batches)
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(len(paths)))


def test_inductive_and_folder_streams(tmp_path):
    make_fixture(tmp_path, "DTD", classes=5, per_class=2)
    bench = load_benchmark(tmp_path, "DTD")
    inductive = unlabelled_paths(bench, "inductive")
    assert inductive == [s.path for s in bench.train if s.label < 3] and len(inductive) == 6
    assert unlabelled_from(tmp_path / "dtd" / "images" / "banded") == sorted(
        s.path for s in bench.splits()["train"] + bench.val + bench.test if s.label == 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_fixture(tmp_path, "ImageNetR", classes=2)
        variant = load_benchmark(tmp_path, "ImageNetR")
    assert unlabelled_paths(variant) == [s.path for s in variant.test]
    with pytest.raises(ValueError, match="evaluation-only"):
        unlabelled_paths(variant, "inductive")
    with pytest.raises(ValueError, match="unknown unlabelled mode"):
        unlabelled_paths(bench, "everything")
