"""Evaluation protocols: accuracy/HM on hand-built logits, base/novel re-indexing, class mapping, files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from promptkd.evaluate import (
    accuracy,
    class_groups,
    evaluate_features,
    extract_features,
    harmonic_mean,
    map_classes_to_store,
    restrict_labels,
    write_results,
)
from promptkd.store import ClassVectorStore

NAMES5 = ["cat", "dog", "fox", "owl", "eel"]


def basis_store(names=NAMES5, dim=None) -> ClassVectorStore:
    dim = dim or len(names)
    return ClassVectorStore(torch.eye(len(names), dim), list(names), 100.0)


def e(i: int, dim: int = 5) -> torch.Tensor:
    return torch.eye(dim)[i]


def test_accuracy_and_hm_by_hand():
    assert accuracy(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2])) == pytest.approx(75.0)
    assert accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) == 0.0
    assert harmonic_mean(75.0, 200.0 / 3) == pytest.approx(2 * 75 * (200 / 3) / (75 + 200 / 3))
    assert harmonic_mean(80.0, 80.0) == pytest.approx(80.0)
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_class_groups_first_ceil_half_is_base():
    assert class_groups("base2novel", 5) == {"base": [0, 1, 2], "novel": [3, 4]}
    assert class_groups("base2novel", 4) == {"base": [0, 1], "novel": [2, 3]}
    assert class_groups("cross_dataset", 3) == {"all": [0, 1, 2]}
    with pytest.raises(ValueError, match="unknown protocol"):
        class_groups("b2n", 4)
    with pytest.raises(ValueError, match="at least 2 classes"):
        class_groups("base2novel", 1)


def test_restrict_labels_reindexes_in_group_order():
    mask, local = restrict_labels(torch.tensor([5, 2, 7, 2, 0]), [7, 2])
    assert mask.tolist() == [False, True, True, True, False]
    assert local.tolist() == [1, 0, 1]


def test_base_to_novel_on_hand_built_features():
    # 5 classes, one-hot class vectors: base = {0,1,2}, novel = {3,4}
    feats = torch.stack([
        e(0), e(1), e(1), e(2),            # base images, labels 0 1 2 2 -> 3 of 4 right
        e(0) + 0.5 * e(3),                 # novel label 3: globally class 0 wins, within novel 3 wins
        e(4),                              # novel label 4: right
        e(3) + 0.1 * e(4),                 # novel label 4: predicted 3, wrong
    ])
    labels = torch.tensor([0, 1, 2, 2, 3, 4, 4])
    res = evaluate_features(feats, labels, basis_store(), NAMES5, "base2novel", dataset="toy", seed=1,
                            model="student")
    assert res.metrics["base"] == pytest.approx(75.0)
    assert res.metrics["novel"] == pytest.approx(200 / 3)
    assert res.metrics["hm"] == pytest.approx(2 * 75 * (200 / 3) / (75 + 200 / 3))
    novel = res.groups["novel"]
    assert novel.num_images == 3 and novel.num_classes == 2
    assert [(r.label, r.class_name, r.correct, r.total) for r in novel.per_class] == [(3, "owl", 1, 1), (4, "eel", 1, 2)]
    base = res.groups["base"]
    assert [(r.correct, r.total) for r in base.per_class] == [(1, 1), (1, 1), (1, 2)]
    # over all classes, the first novel image would be misclassified: the restriction matters
    cross = evaluate_features(feats, labels, basis_store(), NAMES5, "cross_dataset", dataset="toy", seed=1,
                              model="student")
    assert cross.metrics["accuracy"] == pytest.approx(100 * 4 / 7)


def test_against_float64_reference():
    torch.manual_seed(0)
    n_cls, dim, n = 9, 16, 200
    vectors = torch.nn.functional.normalize(torch.randn(n_cls, dim), dim=-1)
    store = ClassVectorStore(vectors, [f"c{i}" for i in range(n_cls)], 50.0)
    feats = torch.randn(n, dim) * 3
    labels = torch.randint(0, n_cls, (n,))
    res = evaluate_features(feats, labels, store, store.class_names, "base2novel", dataset="r", seed=0,
                            model="teacher")
    f = feats.double().numpy()
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    w = vectors.double().numpy()
    y = labels.numpy()
    expected = {}
    for group, classes in (("base", range(5)), ("novel", range(5, 9))):
        classes = list(classes)
        keep = np.isin(y, classes)
        pred = np.array(classes)[np.argmax(f[keep] @ w[classes].T, axis=1)]
        expected[group] = 100 * np.mean(pred == y[keep])
    assert res.metrics["base"] == pytest.approx(expected["base"])
    assert res.metrics["novel"] == pytest.approx(expected["novel"])
    b, nv = expected["base"], expected["novel"]
    assert res.metrics["hm"] == pytest.approx(2 * b * nv / (b + nv))


def test_imagenet_subset_uses_subset_vectors_only():
    # a 6-class "ImageNet" store; a 2-class subset (ImageNet-A style) mapped to rows 4 and 1
    names = ["a", "b", "c", "d", "e", "f"]
    store = basis_store(names, 6)
    feats = torch.stack([e(4, 6) + 0.9 * e(0, 6), e(1, 6) + 0.2 * e(4, 6), e(4, 6)])
    labels = torch.tensor([0, 1, 1])  # subset labels: 0 -> "e", 1 -> "b"
    res = evaluate_features(feats, labels, store, ["e", "b"], "domain_generalization", dataset="ImageNetA",
                            seed=1, model="student", imagenet_indices=[4, 1])
    assert res.metrics["accuracy"] == pytest.approx(200 / 3)
    assert res.groups["all"].num_classes == 2


def test_map_classes_to_store():
    store = basis_store(["a", "b", "c", "d"], 4)
    assert map_classes_to_store(store, ["a", "b", "c", "d"]) == [0, 1, 2, 3]
    assert map_classes_to_store(store, ["d", "b"]) == [3, 1]  # by name
    assert map_classes_to_store(store, ["d", "b"], imagenet_indices=[3, 1]) == [3, 1]
    with pytest.raises(ValueError, match="different ImageNet class-name files"):
        map_classes_to_store(store, ["d", "b"], imagenet_indices=[2, 1])
    with pytest.raises(ValueError, match=r"not in the store.*zebra"):
        map_classes_to_store(store, ["a", "zebra"], source="MyData")
    dup = ClassVectorStore(torch.eye(3), ["crane", "crane", "x"], 100.0)
    with pytest.raises(ValueError, match="appear twice"):
        map_classes_to_store(dup, ["crane"])


def test_dimension_mismatch_is_clear():
    with pytest.raises(ValueError, match="dimension 3, class vectors 5"):
        evaluate_features(torch.zeros(2, 3), torch.tensor([0, 1]), basis_store(), NAMES5, "cross_dataset",
                          dataset="t", seed=0, model="zeroshot")


def test_extract_features_batches_once_in_order():
    torch.manual_seed(1)
    images = torch.randn(7, 3, 4, 4)
    labels = torch.arange(7) % 3
    loader = [{"image": images[i : i + 3], "label": labels[i : i + 3], "index": torch.arange(i, min(i + 3, 7))}
              for i in range(0, 7, 3)]
    calls = []
    proj = torch.randn(48, 5)

    def encode(x):
        calls.append(x.shape[0])
        return x.flatten(1) @ proj

    feats, got = extract_features(encode, loader, progress=False)
    assert calls == [3, 3, 1]
    torch.testing.assert_close(feats, images.flatten(1) @ proj)
    assert got.tolist() == labels.tolist()
    feats16, _ = extract_features(encode, loader, progress=False, amp_dtype=torch.bfloat16)
    assert feats16.dtype == torch.float32
    torch.testing.assert_close(feats16, feats, atol=0.2, rtol=0.05)


def test_write_results_files(tmp_path):
    feats = torch.stack([e(0), e(1), e(3), e(3)])
    res = evaluate_features(feats, torch.tensor([0, 2, 3, 4]), basis_store(), NAMES5, "base2novel",
                            dataset="toy", seed=3, model="teacher", selection="last", source={"artefact": "x"})
    paths = write_results(res, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert {k: data[k] for k in ("protocol", "dataset", "seed", "model", "selection")} == {
        "protocol": "base2novel", "dataset": "toy", "seed": 3, "model": "teacher", "selection": "last"}
    assert data["metrics"] == {"base": 50.0, "novel": 50.0, "hm": 50.0}
    assert data["num_images"] == {"base": 2, "novel": 2}
    rows = list(csv.DictReader(paths["per_class"].open()))
    assert len(rows) == 5
    assert rows[2] == {"group": "base", "label": "2", "class_name": "fox", "correct": "0", "total": "1",
                       "accuracy": "0.00"}
    table = paths["table"].read_text()
    assert "| **HM** | | | **50.00** |" in table and "teacher on toy" in table


def test_empty_test_split_error_names_the_dataset():
    from types import SimpleNamespace

    from promptkd.evaluate import ImageClassifier, evaluate_benchmark
    from promptkd.models.backbones import ImageSpec

    bench = SimpleNamespace(name="MyData", test=[], eval_only=False, classnames=["a", "b"], imagenet_indices=())
    clf = ImageClassifier(lambda x: x, basis_store(["a", "b"]), ImageSpec(), "student")
    with pytest.raises(ValueError, match="MyData: the test split is empty"):
        evaluate_benchmark(clf, bench, "cross_dataset", seed=1, num_workers=0, progress=False)
