"""Tiny on-disk datasets in every real layout, for tests (ours and other helpers') and the e2e test.

``make_fixture(root, "Caltech101", classes=4, per_class=3)`` writes ``root/caltech-101/...`` exactly
as CoOp's DATASETS.md lays it out (real folder names, real file-name patterns, the split JSON in the
real structure with real class names for the first classes) with small JPEGs whose colour and stripe
pattern depend on the class, so a tiny model can learn them. ``layout_placeholders`` lays out EMPTY
files for every entry of a real split file (for counting tests that must not decode).
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from promptkd.data.benchmarks import Sample, get_spec, packaged_asset, prompt_name, read_classnames_file

# (class folder or key, class name as the real split file writes it) for the first classes
_REAL_CLASSES: dict[str, list[tuple[str, str]]] = {
    "Caltech101": [("Faces", "face"), ("Leopards", "leopard"), ("Motorbikes", "motorbike"),
                   ("accordion", "accordion"), ("airplanes", "airplane"), ("anchor", "anchor")],
    "OxfordPets": [("Abyssinian", "abyssinian"), ("american_bulldog", "american_bulldog"),
                   ("american_pit_bull_terrier", "american_pit_bull_terrier"), ("basset_hound", "basset_hound"),
                   ("beagle", "beagle"), ("Bengal", "bengal")],
    "StanfordCars": [("", "2000 AM General Hummer SUV"), ("", "2012 Acura RL Sedan"), ("", "2012 Acura TL Sedan"),
                     ("", "2008 Acura TL Type-S"), ("", "2012 Acura TSX Sedan"), ("", "2001 Acura Integra Type R")],
    "Flowers102": [("", "pink primrose"), ("", "hard-leaved pocket orchid"), ("", "canterbury bells"),
                   ("", "sweet pea"), ("", "english marigold"), ("", "tiger lily")],
    "Food101": [("apple_pie", "apple_pie"), ("baby_back_ribs", "baby_back_ribs"), ("baklava", "baklava"),
                ("beef_carpaccio", "beef_carpaccio"), ("beef_tartare", "beef_tartare"), ("beet_salad", "beet_salad")],
    "SUN397": [("a/abbey", "abbey"), ("a/airplane_cabin", "airplane_cabin"),
               ("a/airport_terminal", "airport_terminal"), ("a/alley", "alley"),
               ("a/amphitheater", "amphitheater"), ("a/apartment_building/outdoor", "outdoor apartment_building")],
    "DTD": [(c, c) for c in ("banded", "blotchy", "braided", "bubbly", "bumpy", "chequered")],
    "EuroSAT": [("AnnualCrop", "Annual Crop Land"), ("Forest", "Forest"),
                ("HerbaceousVegetation", "Herbaceous Vegetation Land"), ("Highway", "Highway or Road"),
                ("Industrial", "Industrial Buildings"), ("Pasture", "Pasture Land"),
                ("PermanentCrop", "Permanent Crop Land"), ("Residential", "Residential Buildings"),
                ("River", "River"), ("SeaLake", "Sea or Lake")],
    "UCF101": [(c, c) for c in ("Apply_Eye_Makeup", "Apply_Lipstick", "Archery", "Baby_Crawling",
                                "Balance_Beam", "Band_Marching")],
    "FGVCAircraft": [("", v) for v in ("707-320", "727-200", "737-200", "737-300", "A300B4", "Cessna 172")],
}


@dataclass
class Fixture:
    """What :func:`make_fixture` wrote: the data root, the dataset folder, expected contents."""

    root: Path
    dataset_dir: Path
    name: str
    classnames: list[str]  # as the loader must return them (after CoOp's clean-up)
    splits: dict[str, list[Sample]] = field(default_factory=dict)

    def count(self, split: str) -> int:
        return len(self.splits.get(split, []))


def class_image(label: int, num_classes: int, size: tuple[int, int] = (40, 32), variant: int = 0) -> Image.Image:
    """A learnable synthetic image: hue and stripe orientation/frequency from ``label``, noise from ``variant``."""
    w, h = size
    rgb = np.array(colorsys.hsv_to_rgb(label / max(1, num_classes), 0.8, 0.9)) * 255
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = np.pi * (label % 4) / 4
    freq = 0.25 + 0.15 * (label % 3)
    stripes = 0.5 + 0.5 * np.sign(np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle))))
    rng = np.random.default_rng([label, variant])
    img = rgb[None, None, :] * (0.55 + 0.45 * stripes[..., None]) + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_image(path: Path, label: int, num_classes: int, size: tuple[int, int], variant: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    class_image(label, num_classes, size, variant).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def _class_table(name: str, classes: int) -> list[tuple[str, str]]:
    table = list(_REAL_CLASSES.get(name, []))[:classes]
    for i in range(len(table), classes):
        folder = f"class{i:03d}"
        table.append((f"z/{folder}" if name == "SUN397" else folder, f"class_{i:03d}" if name != "FGVCAircraft" else f"Variant-{i}"))
    return table


def _rel_path(name: str, folder: str, label: int, split: str, n: int, counter: int) -> str:
    """Relative image path as the real dataset names its files."""
    if name == "Caltech101":
        return f"{folder}/image_{n + 1:04d}.jpg"
    if name == "OxfordPets":
        return f"{folder}_{n + 1}.jpg"
    if name == "StanfordCars":
        return f"{'cars_test' if split == 'test' else 'cars_train'}/{counter:05d}.jpg"
    if name == "Flowers102":
        return f"image_{counter:05d}.jpg"
    if name == "Food101":
        return f"{folder}/{100000 + counter}.jpg"
    if name == "SUN397":
        return f"{folder}/sun_{counter:06d}.jpg"
    if name == "DTD":
        return f"{folder}/{folder}_{n + 1:04d}.jpg"
    if name == "EuroSAT":
        return f"{folder}/{folder}_{n + 1}.jpg"
    if name == "UCF101":
        return f"{folder}/v_{folder.replace('_', '')}_g{n + 1:02d}_c01.jpg"
    raise ValueError(name)


def make_fixture(root: str | os.PathLike, name: str, *, classes: int = 4, per_class: int = 3,
                 val_per_class: int = 1, test_per_class: int = 2, size: tuple[int, int] = (40, 32)) -> Fixture:
    """Write a tiny copy of benchmark ``name`` under ``root`` in its real layout; return what it holds."""
    spec = get_spec(name)
    root = Path(root)
    ds = root / spec.folder
    ds.mkdir(parents=True, exist_ok=True)
    counts = {"train": per_class, "val": val_per_class, "test": test_per_class}
    splits: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    counter = 0

    def emit(path: Path, label: int, cname: str, split: str) -> None:
        nonlocal counter
        write_image(path, label, classes, size, variant=counter)
        splits[split].append(Sample(str(path), label, cname))
        counter += 1

    if spec.layout in ("split_json", "fgvc_aircraft"):
        table = _class_table(spec.name, classes)
        names = [prompt_name(raw) for _, raw in table]
        entries: dict[str, list] = {"train": [], "val": [], "test": []}
        image_dir = ds / spec.image_dir if spec.image_dir else ds
        for split in ("train", "val", "test"):
            n_total = 0
            for label, (folder, raw) in enumerate(table):
                for n in range(counts[split]):
                    offset = n + (0 if split == "train" else per_class + (val_per_class if split == "test" else 0))
                    if spec.layout == "fgvc_aircraft":
                        rel = f"{1000000 + counter:07d}.jpg"
                    else:
                        rel = _rel_path(spec.name, folder, label, split, offset, counter + 1)
                    emit(image_dir / rel, label, names[label], split)
                    entries[split].append([rel, label, raw])
                    n_total += 1
        if spec.layout == "split_json":
            (ds / spec.split_file).write_text(json.dumps(entries, indent=4))
            if spec.name == "Flowers102":
                (ds / "cat_to_name.json").write_text(json.dumps({str(i + 1): raw for i, (_, raw) in enumerate(table)}))
        else:
            (ds / "variants.txt").write_text("".join(f"{raw}\n" for _, raw in table))
            for split in ("train", "val", "test"):
                lines = [f"{rel[:-4]} {raw}\n" for rel, _, raw in entries[split]]
                (ds / f"images_variant_{split}.txt").write_text("".join(lines))
        return Fixture(root, ds, spec.name, names, splits)

    imagenet = read_classnames_file(packaged_asset("imagenet_classnames.txt"))
    if spec.subset_asset:
        wnids = packaged_asset(spec.subset_asset).read_text().split()[:classes]
    else:
        wnids = list(imagenet)[:classes]
    names = [prompt_name(imagenet[w]) for w in wnids]
    (ds / "classnames.txt").write_text("".join(f"{w} {imagenet[w]}\n" for w in wnids))
    if spec.layout == "imagenet":
        for split, folder, per in (("train", "train", per_class), ("test", "val", test_per_class)):
            for label, w in enumerate(wnids):
                for n in range(per):
                    fname = f"{w}_{n + 1}.JPEG" if split == "train" else f"ILSVRC2012_val_{counter + 1:08d}.JPEG"
                    emit(ds / "images" / folder / w / fname, label, names[label], split)
        splits["val"] = splits["test"]
        return Fixture(root, ds, spec.name, names, splits)
    for label, w in enumerate(wnids):
        for n in range(test_per_class):
            folder = str(label) if spec.layout == "imagenet_v2" else w
            emit(ds / spec.image_dir / folder / f"{counter:04x}{n}.jpeg", label, names[label], "test")
    if spec.ignore:
        (ds / spec.image_dir / spec.ignore[0]).write_text("not a class folder\n")
    splits["train"] = list(splits["test"])
    return Fixture(root, ds, spec.name, names, splits)


def layout_placeholders(root: str | os.PathLike, name: str, split_file: str | os.PathLike | None = None) -> Path:
    """Lay out a real split file in ``root`` in ``name``'s layout and an EMPTY file per entry; the split
    file is ``split_file``, or by default the copy packaged with promptkd (:mod:`promptkd.data.split_files`)."""
    spec = get_spec(name)
    if spec.layout != "split_json":
        raise ValueError(f"{spec.name} has no split_zhou file")
    ds = Path(root) / spec.folder
    ds.mkdir(parents=True, exist_ok=True)
    if split_file is None:
        from promptkd.data.split_files import write_split_files

        write_split_files(root, [spec.name])
        split_file = ds / spec.split_file
    else:
        shutil.copyfile(split_file, ds / spec.split_file)
    image_dir = ds / spec.image_dir if spec.image_dir else ds
    data = json.loads(Path(split_file).read_text())
    rels = {e[0] for s in ("train", "val", "test") for e in data[s]}
    for d in {os.path.dirname(r) for r in rels}:
        (image_dir / d).mkdir(parents=True, exist_ok=True)
    for r in rels:
        (image_dir / r).touch()
    return ds


# ---------------------------------------------------------------------------------------------------
# the user's own data


def make_image_folder(root: str | os.PathLike, *, classes: int = 3, per_class: int = 4,
                      test_per_class: int = 0, size: tuple[int, int] = (40, 32)) -> list[str]:
    """Class folders ``class_a``, ``class_b``... (under ``train/`` and ``test/`` when ``test_per_class``)."""
    root = Path(root)
    names = [f"class_{chr(ord('a') + i)}" for i in range(classes)]
    for split, per in (("train", per_class), ("test", test_per_class)):
        if per == 0:
            continue
        base = root / split if test_per_class else root
        for label, c in enumerate(names):
            for n in range(per):
                write_image(base / c / f"img{n}.jpg", label, classes, size, variant=100 * label + n + 50 * (split == "test"))
    return names


def make_unlabelled_folder(root: str | os.PathLike, *, count: int = 6, size: tuple[int, int] = (40, 32)) -> list[str]:
    """``count`` images in nested sub-folders (some PNG), for the unlabelled-folder stream."""
    root = Path(root)
    out = []
    for i in range(count):
        path = root / f"batch{i % 2}" / ("deep" if i % 3 == 0 else "") / f"u{i}.{'png' if i % 2 else 'jpg'}"
        write_image(path, i % 3, 3, size, variant=1000 + i)
        out.append(str(path))
    return sorted(out)
