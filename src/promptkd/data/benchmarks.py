"""The 11 base-to-novel benchmarks and the 4 ImageNet variants, as data; plus the user's own datasets.

Every benchmark is a :class:`DatasetSpec` in :data:`REGISTRY` (folder names, split file, layout rule,
the paper's counts), laid out as in CoOp's DATASETS.md under one data root::

    root/caltech-101/101_ObjectCategories/...   root/caltech-101/split_zhou_Caltech101.json
    root/imagenet/images/{train,val}/<wnid>/...  root/imagenet/classnames.txt
    ...

:func:`load_benchmark` turns a spec into a :class:`Benchmark` of :class:`Sample` lists. Labels and
class names follow CoOp exactly: for split-file datasets they are the split file's, for ImageNet the
sorted wnid folders, for FGVCAircraft the line order of ``variants.txt``. Class names are returned
ready for a text encoder: CoOp's prompt learners replace ``_`` by a space, so we do it here, once.
``test`` is the evaluation split, as in CoOp (ImageNet's test is its ``val`` folder, which CoOp also
uses as val). The ImageNet variants are evaluation-only; as in CoOp their train list is the test list
(the paper's domain-generalisation runs distil on the unlabelled target test images).

Problems (missing files, empty folders, class-name disagreements) are collected, not raised one at a
time: a load reports every problem it finds in one :class:`DataError`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from promptkd.data.scan import IMAGE_EXTENSIONS, images_in, is_image_file, subfolders

MAX_LISTED_PROBLEMS = 20


class DataError(ValueError):
    """Something is wrong with a dataset on disk. ``problems`` lists every issue (each names a file)."""

    def __init__(self, header: str, problems: list[str]):
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:MAX_LISTED_PROBLEMS])
        more = len(self.problems) - MAX_LISTED_PROBLEMS
        tail = f"\n  ... and {more} more (run `promptkd data check` for the full list)" if more > 0 else ""
        super().__init__(f"{header}: {len(self.problems)} problem(s):\n  {shown}{tail}")


@dataclass(frozen=True, slots=True)
class Sample:
    path: str
    label: int
    classname: str


@dataclass
class Benchmark:
    """A dataset's class list and its train / val / test samples (labels index ``classnames``)."""

    name: str
    classnames: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    root: str = ""
    eval_only: bool = False  # ImageNet variants: train is the (unlabelled-use) test list
    class_ids: list[str] = field(default_factory=list)  # wnids for ImageNet and its variants
    imagenet_indices: list[int] = field(default_factory=list)  # ImageNet-1k label of each class (A, R)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def splits(self) -> dict[str, list[Sample]]:
        return {"train": self.train, "val": self.val, "test": self.test}


@dataclass(frozen=True)
class DatasetSpec:
    """Where a benchmark lives under the data root and how its labels are read."""

    name: str
    folder: str
    layout: str  # split_json | fgvc_aircraft | imagenet | imagenet_v2 | wnid_folders
    image_dir: str = ""
    split_file: str = ""
    classes: int = 0  # the paper's class count
    paper_train: int | None = None
    paper_test_base: int | None = None
    paper_test_novel: int | None = None
    paper_test: int | None = None
    aliases: tuple[str, ...] = ()
    subset_asset: str = ""  # packaged list of the wnids of a 200-class ImageNet subset
    ignore: tuple[str, ...] = ()
    rename: tuple[tuple[str, str], ...] = ()  # CoOp's NEW_CNAMES: raw folder name -> class name


    @property
    def eval_only(self) -> bool:
        return self.layout in ("imagenet_v2", "wnid_folders")


def _split(name, folder, image_dir, split_file, classes, train, base, novel, aliases=(), rename=()):
    return DatasetSpec(name, folder, "split_json", image_dir, split_file, classes, train, base, novel,
                       base + novel, aliases, rename=tuple(rename))


# CoOp renames these classes when it writes its split files; applied again here so that a split file
# written with raw folder names gives the same class names (the official files already use them).
CALTECH101_NAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
    "SeaLake": "Sea or Lake",
}


REGISTRY: dict[str, DatasetSpec] = {
    s.name: s
    for s in [
        DatasetSpec("ImageNet", "imagenet", "imagenet", "images", "", 1000, 1_281_167, 25_000, 25_000, 50_000),
        _split("Caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", 100, 4128, 1549, 916,
               rename=CALTECH101_NAMES.items()),
        _split("OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json", 37, 2944, 1881, 1788),
        _split("StanfordCars", "stanford_cars", "", "split_zhou_StanfordCars.json", 196, 6509, 4002, 4039),
        _split("Flowers102", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", 102, 4093, 1053, 1410,
               ("OxfordFlowers", "Flowers")),
        _split("Food101", "food-101", "images", "split_zhou_Food101.json", 101, 50_500, 15_300, 15_000),
        DatasetSpec("FGVCAircraft", "fgvc_aircraft", "fgvc_aircraft", "images", "", 100, 3334, 1666, 1667, 3333,
                    ("Aircraft",)),
        _split("SUN397", "sun397", "SUN397", "split_zhou_SUN397.json", 397, 15_880, 9950, 9900),
        _split("DTD", "dtd", "images", "split_zhou_DescribableTextures.json", 47, 2820, 864, 828,
               ("DescribableTextures",)),
        _split("EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json", 10, 13_500, 4200, 3900,
               rename=EUROSAT_NAMES.items()),
        _split("UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", 101, 7639, 1934, 1849),
        DatasetSpec("ImageNetV2", "imagenetv2", "imagenet_v2", "imagenetv2-matched-frequency-format-val",
                    classes=1000, paper_test=10_000, aliases=("ImageNet-V2",)),
        DatasetSpec("ImageNetSketch", "imagenet-sketch", "wnid_folders", "images", classes=1000,
                    paper_test=50_889, aliases=("ImageNet-Sketch", "Sketch")),
        DatasetSpec("ImageNetA", "imagenet-adversarial", "wnid_folders", "imagenet-a", classes=200,
                    paper_test=7500, aliases=("ImageNet-A",), subset_asset="imagenet_a_synsets.txt",
                    ignore=("README.txt",)),
        DatasetSpec("ImageNetR", "imagenet-rendition", "wnid_folders", "imagenet-r", classes=200,
                    paper_test=30_000, aliases=("ImageNet-R",), subset_asset="imagenet_r_synsets.txt",
                    ignore=("README.txt",)),
    ]
}

BASE_TO_NOVEL = [n for n, s in REGISTRY.items() if not s.eval_only]
IMAGENET_VARIANTS = [n for n, s in REGISTRY.items() if s.eval_only]


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def get_spec(name: str) -> DatasetSpec:
    """The spec for a benchmark name (case, '-' and '_' insensitive; aliases such as OxfordFlowers)."""
    wanted = _key(name)
    for spec in REGISTRY.values():
        if wanted in {_key(spec.name), *map(_key, spec.aliases)}:
            return spec
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(REGISTRY)}; or your own data: "
                     "folder:PATH (class sub-folders) or list:FILE.csv|.json")


def prompt_name(raw: str) -> str:
    """CoOp's class-name clean-up before prompting: underscores become spaces."""
    return raw.replace("_", " ").strip()


def _subdirs(folder: Path, ignore: Iterable[str] = ()) -> list[str]:
    return subfolders(folder, ignore)


def _images_in(folder: Path, recursive: bool = False) -> list[str]:
    """Sorted image paths in a folder (sorted so every machine lists the same order)."""
    return images_in(folder, recursive)


def read_classnames_file(path: Path) -> dict[str, str]:
    """``wnid class name`` lines (CoOp's ImageNet classnames.txt) -> ordered {wnid: name}."""
    out: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(" ", 1)
        if len(parts) != 2:
            raise DataError(str(path), [f"{path}:{lineno}: expected 'wnid class name', got {line!r}"])
        out[parts[0]] = parts[1].strip()
    return out


def packaged_asset(name: str) -> Path:
    return Path(str(resources.files("promptkd.data") / "assets" / name))


def imagenet_classnames(root: Path, own_folder: Path | None = None) -> tuple[dict[str, str], Path]:
    """ImageNet's {wnid: name}: the dataset's own classnames.txt, else imagenet/classnames.txt, else packaged."""
    for candidate in ([own_folder / "classnames.txt"] if own_folder else []) + [root / "imagenet" / "classnames.txt"]:
        if candidate.is_file():
            return read_classnames_file(candidate), candidate
    asset = packaged_asset("imagenet_classnames.txt")
    return read_classnames_file(asset), asset


def _entry_problem(entry) -> str | None:
    """Why a split entry is not ``[relative path, int label, class name]``, or None."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 3:
        return f"expected [relative path, int label, class name], got {entry!r}"
    path, label, name = entry
    if not isinstance(path, str) or not path.strip():
        return f"the path must be a non-empty string, got {path!r}"
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        return f"the label must be an integer >= 0, got {label!r}"
    if not isinstance(name, str) or not name.strip():
        return f"the class name must be a non-empty string, got {name!r}"
    return None


def _samples_from_entries(entries, prefix: Path, where: str, problems: list[str]) -> list[tuple[str, int, str]]:
    if not isinstance(entries, list):
        problems.append(f"{where}: must be a list of [relative path, int label, class name] entries, "
                        f"got {type(entries).__name__} {str(entries)[:60]!r}")
        return []
    out = []
    for i, entry in enumerate(entries):
        reason = _entry_problem(entry)
        if reason:
            problems.append(f"{where}[{i}]: {reason}")
            continue
        out.append((str(prefix / entry[0]), int(entry[1]), str(entry[2])))
    return out


def read_split_json(path: Path, problems: list[str]) -> dict | None:
    """A CoOp split file's object (``train``/``val``/``test`` keys checked), or None with the problem."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        problems.append(f"{path}: not valid JSON ({exc})")
        return None
    if not isinstance(data, dict) or not {"train", "val", "test"} <= set(data):
        got = f"keys {sorted(data)}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        problems.append(f"{path}: expected an object with 'train', 'val' and 'test' lists, got {got}")
        return None
    return data


def _assemble(name: str, splits: dict[str, list[tuple[str, int, str]]], source: str, problems: list[str],
              check_files: bool) -> tuple[list[str], dict[str, list[Sample]]]:
    """Check labels are 0..N-1 with one name each, optionally that files exist; build Samples."""
    names: dict[int, str] = {}
    for split, rows in splits.items():
        for path, label, raw in rows:
            prev = names.setdefault(label, raw)
            if prev != raw:
                problems.append(f"{source}: label {label} is called {prev!r} and {raw!r} ({split}: {path})")
                names[label] = prev
    n = max(names) + 1 if names else 0
    missing_labels = sorted(set(range(n)) - set(names))
    if missing_labels or any(lab < 0 for lab in names):
        problems.append(f"{source}: labels must be 0..{n - 1} with no gaps; missing {missing_labels[:10]}")
    if check_files:
        for rows in splits.values():
            problems.extend(f"{path}: listed in {source} but " + ("a broken symbolic link (target missing)"
                                                                 if os.path.islink(path) else "missing")
                            for path, _, _ in rows if not os.path.isfile(path))
    classnames = [prompt_name(names.get(i, f"class_{i}")) for i in range(n)]
    out = {s: [Sample(p, lab, classnames[lab] if 0 <= lab < n else str(lab)) for p, lab, _ in rows]
           for s, rows in splits.items()}
    return classnames, out


def _split_file_advice(spec: DatasetSpec, root: Path) -> str:
    from promptkd.data.split_files import has_packaged_split, write_command

    if has_packaged_split(spec.name):
        return f"promptkd ships CoOp's copy: `{write_command(root, spec.name)}` writes it"
    return "CoOp's DATASETS.md explains where to get it"


def _load_split_json(spec: DatasetSpec, folder: Path, problems: list[str], check_files: bool):
    split_path = folder / spec.split_file
    if not split_path.is_file():
        problems.append(f"{split_path}: split file missing ({_split_file_advice(spec, folder.parent)})")
        return None
    data = read_split_json(split_path, problems)
    if data is None:
        return None
    prefix = folder / spec.image_dir if spec.image_dir else folder
    if not prefix.is_dir():
        problems.append(f"{prefix}: image folder missing")
        check_files = False
    rows = {s: _samples_from_entries(data[s], prefix, f"{split_path}:{s}", problems) for s in ("train", "val", "test")}
    if spec.rename:
        renamed = dict(spec.rename)
        rows = {s: [(p, lab, renamed.get(raw, raw)) for p, lab, raw in r] for s, r in rows.items()}
    classnames, splits = _assemble(spec.name, rows, str(split_path), problems, check_files)
    _check_category_names(folder / "cat_to_name.json", classnames, split_path, problems)
    return Benchmark(spec.name, classnames, splits["train"], splits["val"], splits["test"], str(folder))


def _check_category_names(path: Path, classnames: list[str], split_path: Path, problems: list[str]) -> None:
    """Flowers102 ships ``cat_to_name.json`` (category = label + 1); when present it must agree with the split."""
    if not path.is_file():
        return
    try:
        by_category = {int(k): str(v) for k, v in json.loads(path.read_text()).items()}
    except (json.JSONDecodeError, ValueError, AttributeError) as exc:
        problems.append(f"{path}: expected a JSON object {{category number: name}} ({exc})")
        return
    for label, name in enumerate(classnames):
        other = by_category.get(label + 1)
        if other is not None and prompt_name(other) != name:
            problems.append(f"{path}: category {label + 1} is {other!r} but {split_path} calls label {label} {name!r}")


def _load_fgvc(spec: DatasetSpec, folder: Path, problems: list[str], check_files: bool):
    variants_path = folder / "variants.txt"
    if not variants_path.is_file():
        problems.append(f"{variants_path}: class list missing")
        return None
    variants = [line.strip() for line in variants_path.read_text().splitlines() if line.strip()]
    label_of = {v: i for i, v in enumerate(variants)}
    rows: dict[str, list[tuple[str, int, str]]] = {}
    for split in ("train", "val", "test"):
        list_path = folder / f"images_variant_{split}.txt"
        rows[split] = []
        if not list_path.is_file():
            problems.append(f"{list_path}: image list missing")
            continue
        for lineno, line in enumerate(list_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in label_of:
                problems.append(f"{list_path}:{lineno}: variant {variant!r} is not in {variants_path}")
                continue
            rows[split].append((str(folder / spec.image_dir / f"{image_id}.jpg"), label_of[variant], variant))
    _, splits = _assemble(spec.name, rows, str(folder), problems, check_files)
    classnames = [prompt_name(v) for v in variants]
    splits = {s: [Sample(x.path, x.label, classnames[x.label]) for x in v] for s, v in splits.items()}
    return Benchmark(spec.name, classnames, splits["train"], splits["val"], splits["test"], str(folder))


def _scan_class_folders(split_dir: Path, folders: list[str], label_of: dict[str, int], names: list[str],
                        problems: list[str]) -> list[Sample]:
    from promptkd.progress import progress_bar

    out: list[Sample] = []
    for folder in progress_bar(folders, desc=f"listing {split_dir}", unit="class", leave=False,
                               enabled=len(folders) >= 200):
        images = _images_in(split_dir / folder)
        if not images:
            problems.append(f"{split_dir / folder}: class folder has no images")
        label = label_of[folder]
        out.extend(Sample(p, label, names[label]) for p in images)
    return out


def _load_imagenet(spec: DatasetSpec, folder: Path, problems: list[str], check_files: bool):
    names_by_wnid, names_source = imagenet_classnames(folder.parent, folder)
    image_root = folder / spec.image_dir
    split_dirs = {"train": image_root / "train", "val": image_root / "val"}
    found: dict[str, list[str]] = {}
    for split, d in split_dirs.items():
        if not d.is_dir():
            problems.append(f"{d}: folder missing")
            continue
        found[split] = _subdirs(d)
        if not found[split] and any(is_image_file(e.name) for e in os.scandir(d)):
            problems.append(f"{d}: images must be in one folder per wnid (CoOp's DATASETS.md: sort val into class folders)")
    if "train" not in found:
        return None
    wnids = found["train"]
    unknown = [w for w in wnids if w not in names_by_wnid]
    problems.extend(f"{names_source}: no class name for folder {split_dirs['train'] / w}" for w in unknown)
    val_set = set(found.get("val", wnids))
    problems.extend(f"{split_dirs['val'] / w}: class folder missing (present in train)" for w in wnids if w not in val_set)
    problems.extend(f"{split_dirs['val'] / w}: class folder not in train" for w in sorted(val_set - set(wnids)))
    label_of = {w: i for i, w in enumerate(wnids)}
    classnames = [prompt_name(names_by_wnid.get(w, w)) for w in wnids]
    train = _scan_class_folders(split_dirs["train"], wnids, label_of, classnames, problems)
    test = _scan_class_folders(split_dirs["val"], [w for w in found.get("val", []) if w in label_of],
                               label_of, classnames, problems)
    # CoOp evaluates on val and also uses it as the val split (the same list)
    return Benchmark(spec.name, classnames, train, test, test, str(folder), class_ids=wnids)


def _load_imagenet_v2(spec: DatasetSpec, folder: Path, problems: list[str], check_files: bool):
    names_by_wnid, names_source = imagenet_classnames(folder.parent, folder)
    wnids = list(names_by_wnid)
    classnames = [prompt_name(names_by_wnid[w]) for w in wnids]
    image_root = folder / spec.image_dir
    if not image_root.is_dir():
        problems.append(f"{image_root}: folder missing")
        return None
    folders = _subdirs(image_root)
    bad = [f for f in folders if not (f.isdigit() and int(f) < len(wnids))]
    problems.extend(f"{image_root / f}: expected a folder named by an ImageNet label 0..{len(wnids) - 1} "
                    f"(classes from {names_source})" for f in bad)
    labels = sorted(int(f) for f in folders if f not in bad)
    problems.extend(f"{image_root / str(lab)}: class folder missing" for lab in sorted(set(range(len(wnids))) - set(labels)))
    label_of = {str(lab): lab for lab in labels}
    test = _scan_class_folders(image_root, [str(lab) for lab in labels], label_of, classnames, problems)
    return Benchmark(spec.name, classnames, list(test), [], test, str(folder), eval_only=True, class_ids=wnids)


def _load_wnid_folders(spec: DatasetSpec, folder: Path, problems: list[str], check_files: bool):
    """ImageNet-Sketch, -A, -R: one folder per wnid; labels follow sorted folders, as in CoOp."""
    names_by_wnid, names_source = imagenet_classnames(folder.parent, folder)
    image_root = folder / spec.image_dir
    if not image_root.is_dir():
        problems.append(f"{image_root}: folder missing")
        return None
    wnids = _subdirs(image_root, spec.ignore)
    allowed = set(packaged_asset(spec.subset_asset).read_text().split()) if spec.subset_asset else set(names_by_wnid)
    problems.extend(f"{image_root / w}: not a class of {spec.name}" for w in wnids if w not in allowed)
    problems.extend(f"{names_source}: no class name for folder {image_root / w}"
                    for w in wnids if w in allowed and w not in names_by_wnid)
    wnids = [w for w in wnids if w in allowed]
    if len(wnids) < len(allowed):
        warnings.warn(f"{image_root}: {len(wnids)} of {spec.name}'s {len(allowed)} class folders present", stacklevel=3)
    label_of = {w: i for i, w in enumerate(wnids)}
    classnames = [prompt_name(names_by_wnid.get(w, w)) for w in wnids]
    test = _scan_class_folders(image_root, wnids, label_of, classnames, problems)
    imagenet_order = {w: i for i, w in enumerate(packaged_imagenet_wnids())}
    indices = [imagenet_order.get(w, -1) for w in wnids]
    return Benchmark(spec.name, classnames, list(test), [], test, str(folder), eval_only=True,
                     class_ids=wnids, imagenet_indices=indices)


def packaged_imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids in label order."""
    return list(read_classnames_file(packaged_asset("imagenet_classnames.txt")))


_LOADERS = {
    "split_json": _load_split_json,
    "fgvc_aircraft": _load_fgvc,
    "imagenet": _load_imagenet,
    "imagenet_v2": _load_imagenet_v2,
    "wnid_folders": _load_wnid_folders,
}


def collect_benchmark(root: str | os.PathLike, name: str, problems: list[str], *, check_files: bool = True
                      ) -> Benchmark | None:
    """Load a benchmark, appending every problem to ``problems``; None when it cannot be read at all."""
    spec = get_spec(name)
    folder = Path(root).expanduser().absolute() / spec.folder
    if not folder.is_dir():
        problems.append(f"{folder}: dataset folder missing (expected CoOp's layout: <root>/{spec.folder})")
        return None
    try:
        return _LOADERS[spec.layout](spec, folder, problems, check_files)
    except DataError as exc:  # an unreadable class-name file
        problems.extend(exc.problems)
        return None


def load_benchmark(root: str | os.PathLike | None, name: str, *, check_files: bool = True) -> Benchmark:
    """Read benchmark ``name`` under data ``root`` (CoOp layout); raise :class:`DataError` listing all problems.

    ``name`` may also be the user's own data, ``folder:PATH`` or ``list:FILE`` (see :func:`load_custom`;
    ``root`` is then optional). ``check_files`` verifies that every image named by a split file exists
    (folder-scanned datasets always list what exists)."""
    from promptkd.data.custom import CUSTOM_DATASET_SYNTAX, is_custom_dataset, load_custom

    if is_custom_dataset(name):
        return load_custom(name, root, check_files=check_files)
    if root is None or str(root) == "":
        raise ValueError(f"{get_spec(name).name} is a benchmark read from a data root: pass --data-root ROOT "
                         f"(CoOp's layout), or use your own data with --dataset {CUSTOM_DATASET_SYNTAX}")
    problems: list[str] = []
    bench = collect_benchmark(root, name, problems, check_files=check_files)
    if problems or bench is None:
        raise DataError(f"{get_spec(name).name} under {root}", problems)
    return bench


# ---------------------------------------------------------------------------------------------------
# the user's own data


def _folder_split(folder: Path, problems: list[str]) -> dict[str, list[str]]:
    classes = _subdirs(folder)
    out: dict[str, list[str]] = {}
    for c in classes:
        images = _images_in(folder / c, recursive=True)
        if not images:
            problems.append(f"{folder / c}: class folder has no images")
        out[c] = images
    return out


def load_image_folder(root: str | os.PathLike, *, name: str | None = None, holdout: float = 0.0,
                      seed: int = 0) -> Benchmark:
    """A folder per class (sorted folder names -> labels 0..N-1), or ``train/``, ``val/``, ``test/``
    sub-folders each holding the same class folders. Without a test folder, ``holdout`` moves that
    fraction of each class (chosen with ``random.Random(seed)``) to test."""
    import random

    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(str(root), [f"{root}: folder missing"])
    problems: list[str] = []
    has_splits = (root / "train").is_dir()
    parts = {s: _folder_split(root / s, problems) for s in ("train", "val", "test") if (root / s).is_dir()} \
        if has_splits else {"train": _folder_split(root, problems)}
    classes = sorted(parts["train"])
    if not classes:
        problems.append(f"{root}: no class folders found (expected one sub-folder of images per class)")
    for split, by_class in parts.items():
        problems.extend(f"{root / split / c}: class folder not in train" for c in by_class if c not in parts["train"])
    if problems:
        raise DataError(str(root), problems)
    if "test" not in parts and holdout > 0:
        rng = random.Random(seed)
        parts["test"] = {}
        for c in classes:
            images = list(parts["train"][c])
            n_test = min(len(images) - 1, round(len(images) * holdout))
            picked = set(rng.sample(images, n_test)) if n_test > 0 else set()
            parts["train"][c] = [p for p in images if p not in picked]
            parts["test"][c] = [p for p in images if p in picked]
    names = [prompt_name(c) for c in classes]

    def samples(split: str) -> list[Sample]:
        by_class = parts.get(split, {})
        return [Sample(p, i, names[i]) for i, c in enumerate(classes) for p in by_class.get(c, [])]

    return Benchmark(name or root.name, names, samples("train"), samples("val"), samples("test"), str(root))


def _rows_from_list(path: Path, problems: list[str]) -> list[tuple[str, dict]]:
    """``(where, row)`` for every entry of a CSV or JSON list (``where``: "line N" / "entry N" / "train[i]");
    entries that are not rows at all are problems naming their position, every one of them."""
    import csv

    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            problems.append(f"{path}: not valid JSON ({exc})")
            return []
        if isinstance(data, dict):  # CoOp split structure
            unknown = sorted(set(data) - {"train", "val", "test"})
            if unknown or not data:
                problems.append(f"{path}: a split object has 'train', 'val' and/or 'test' lists, got keys {sorted(data)}")
            rows = []
            for split in ("train", "val", "test"):
                entries = _samples_from_entries(data.get(split, []), Path(), f"{path}: {split}", problems)
                rows.extend((f"{split}[{i}]", {"path": p, "label": lab, "classname": c, "split": split})
                            for i, (p, lab, c) in enumerate(entries))
            return rows
        if isinstance(data, list):
            for i, row in enumerate(data):
                if not isinstance(row, dict):
                    problems.append(f"{path}: entry {i + 1}: expected an object with path, label and/or classname "
                                    f"and split, got {row!r}")
            return [(f"entry {i + 1}", dict(r)) for i, r in enumerate(data) if isinstance(r, dict)]
        problems.append(f"{path}: expected a list of objects or a {{train, val, test}} split object, "
                        f"got a JSON {type(data).__name__}")
        return []
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            reader = csv.DictReader(f)
            if reader.fieldnames:
                reader.fieldnames = [str(name).strip() for name in reader.fieldnames]
            if not reader.fieldnames or "path" not in reader.fieldnames:
                problems.append(f"{path}: CSV needs a header with 'path' and 'label' and/or 'classname' columns, "
                                f"got {reader.fieldnames}")
                return []
            return [(f"line {reader.line_num}", row) for row in reader]
    except UnicodeDecodeError as exc:
        problems.append(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as CSV UTF-8")
        return []
    except csv.Error as exc:
        problems.append(f"{path}: not a readable CSV file ({exc})")
        return []


def _label_or_classname(label, cname) -> tuple[int | None, str | None]:
    """A row's (int label or None, class name or None): a non-numeric ``label`` is a class name."""
    cname = str(cname).strip() if cname not in (None, "") else None
    if label is None or (isinstance(label, str) and not label.strip()):
        return None, cname
    try:
        return int(str(label).strip()), cname
    except ValueError:
        if cname is None or cname == str(label).strip():
            return None, str(label).strip()
        return None, None  # both a non-numeric label and a class name: reported as a bad entry


def _row_problems(row: dict) -> list[str]:
    """What is wrong with one entry of a list file (empty when it is usable)."""
    reasons = []
    path = row.get("path")
    if not isinstance(path, str) or not path.strip():
        reasons.append("no image path")
    split = str(row.get("split") or "train").strip()
    if split not in ("train", "val", "test"):
        reasons.append(f"split {split!r} is not train, val or test")
    raw_label, raw_name = row.get("label"), row.get("classname") or row.get("class")
    label, cname = _label_or_classname(raw_label, raw_name)
    if label is not None and label < 0:
        reasons.append(f"label {label} is negative")
    elif label is None and not cname:
        if raw_label not in (None, "") and raw_name not in (None, ""):
            reasons.append(f"label {str(raw_label).strip()!r} is not a number and differs from classname "
                           f"{str(raw_name).strip()!r}")
        else:
            reasons.append("no label or classname")
    return reasons


def load_list(list_file: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
              name: str | None = None, check_files: bool = True) -> Benchmark:
    """A CSV (header: path, label and/or classname, optional split) or JSON list of images.

    Relative paths are resolved against ``image_root`` (default: the list file's folder). ``label`` is
    an integer label or, when not a number, a class name. With class names only, labels follow sorted
    names; with labels only, names are the label numbers."""
    list_file = Path(list_file).expanduser()
    if not list_file.is_file():
        raise DataError(str(list_file), [f"{list_file}: list file missing"])
    base = Path(image_root).expanduser() if image_root else list_file.parent
    problems: list[str] = []
    rows = _rows_from_list(list_file, problems)
    parsed: dict[str, list[tuple[str, int | None, str | None]]] = {"train": [], "val": [], "test": []}
    for where, row in rows:
        reasons = _row_problems(row)
        if reasons:
            problems.append(f"{list_file}: {where}: {'; '.join(reasons)}")
            continue
        label, cname = _label_or_classname(row.get("label"), row.get("classname") or row.get("class"))
        parsed[str(row.get("split") or "train").strip()].append((str(base / str(row["path"])), label, cname))
    if not any(parsed.values()):
        raise DataError(str(list_file), problems or [f"{list_file}: no entries"])
    with_label = {lab is not None for rs in parsed.values() for _, lab, _ in rs}
    if len(with_label) > 1:
        problems.append(f"{list_file}: some entries give a number label and others only a class name; "
                        "use one or the other for every entry")
    names_known = sorted({c for rs in parsed.values() for _, lab, c in rs if c and lab is None})
    auto = {c: i for i, c in enumerate(names_known)}
    full = {s: [(p, lab if lab is not None else auto[c], c if c else str(lab)) for p, lab, c in rs]
            for s, rs in parsed.items()}
    # the rows that parsed are checked too (missing files...), so that one run lists every problem
    classnames, splits = _assemble(name or list_file.stem, full, str(list_file), problems, check_files)
    if problems:
        raise DataError(str(list_file), problems)
    return Benchmark(name or list_file.stem, classnames, splits["train"], splits["val"], splits["test"], str(base))


def list_images(folder: str | os.PathLike) -> list[str]:
    """Every image under ``folder`` (recursive, sorted): an unlabelled set for distillation."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(str(folder), [f"{folder}: folder missing"])
    images = _images_in(folder, recursive=True)
    if not images:
        raise DataError(str(folder), [f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found"])
    return images

