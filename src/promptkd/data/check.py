"""``promptkd data check``: validate a data root and compare its counts with the paper's.

Every problem of every dataset is collected in one run (missing split files, missing images, broken
symbolic links, empty class folders, class-name disagreements; with ``verify_images`` also every image
that does not decode, is over the pixel limit, or decodes to a constant picture), so a user fixes them
all at once instead of one crash at a time. A missing split file that promptkd ships comes with the
command that writes it; a split file that differs from the shipped one gets a note.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from promptkd.data.benchmarks import REGISTRY, Benchmark, DataError, collect_benchmark, get_spec
from promptkd.data.custom import custom_dataset_path, is_custom_dataset, load_custom
from promptkd.data.decode import DEFAULT_MAX_IMAGE_PIXELS, image_problem
from promptkd.data.scan import DanglingLinkWarning, DataScanWarning
from promptkd.data.split_files import compare_with_packaged
from promptkd.data.splits import base_novel_split


@dataclass
class DatasetReport:
    name: str
    folder: str
    present: bool
    counts: dict[str, int | None] = field(default_factory=dict)  # classes, train, test, test_base, test_novel
    paper: dict[str, int | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def mismatches(self) -> list[str]:
        return [k for k, v in self.paper.items() if v is not None and self.counts.get(k) not in (None, v)]

    def ok(self, strict: bool = False) -> bool:
        return not self.problems and not (strict and self.mismatches)

    def status(self, strict: bool = False) -> str:
        """The table's verdict, the same one the exit code follows."""
        if self.problems:
            return f"{len(self.problems)} problem(s)"
        if strict and self.mismatches:
            return f"{len(self.mismatches)} count(s) differ from the paper (--strict)"
        return "ok"


def _sort_warnings(caught: list[warnings.WarningMessage], report: DatasetReport) -> None:
    """Loader warnings: broken links become problems (one per link), everything else a note."""
    for w in caught:
        message = w.message
        if isinstance(message, DanglingLinkWarning):
            report.problems.extend(f"{p}: broken symbolic link (target {os.readlink(p) if os.path.islink(p) else '?'} "
                                   "does not exist)" for p in message.paths)
        elif isinstance(message, DataScanWarning):
            report.notes.extend(f"{p}: {message.what.replace('(s)', '')}" for p in message.paths)
        else:
            report.notes.append(str(message))
    report.problems[:] = list(dict.fromkeys(report.problems))  # a folder listed twice warns twice
    report.notes[:] = list(dict.fromkeys(report.notes))


def _counts(bench: Benchmark) -> dict[str, int | None]:
    out: dict[str, int | None] = {"classes": bench.num_classes, "train": None if bench.eval_only else len(bench.train),
                                  "test": len(bench.test), "test_base": None, "test_novel": None}
    if not bench.eval_only:
        halves = base_novel_split(bench)
        out["test_base"], out["test_novel"] = len(halves.base.test), len(halves.novel.test)
    return out


def _decode_error(path: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> str | None:
    if not os.path.isfile(path):
        return None  # already reported as missing (or as a broken link)
    return image_problem(path, max_pixels=max_pixels)


def _verify_images(bench: Benchmark, progress: bool, workers: int,
                   max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> list[str]:
    """Decode every image once (in ``workers`` processes); the problems, in path order."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    from promptkd.progress import progress_bar

    paths = sorted({s.path for split in (bench.train, bench.val, bench.test) for s in split})
    bar = dict(desc=f"decoding {bench.name}", unit="img", total=len(paths), enabled=progress, leave=False)
    check = partial(_decode_error, max_pixels=max_pixels)
    if workers <= 1 or len(paths) < 256:
        results = [check(p) for p in progress_bar(paths, **bar)]
    else:
        with ProcessPoolExecutor(workers) as pool:
            results = list(progress_bar(pool.map(check, paths, chunksize=64), **bar))
    return [r for r in results if r]


def check_dataset(root: str | os.PathLike, name: str, *, verify_images: bool = False,
                  progress: bool = False, workers: int = 1,
                  max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> DatasetReport:
    """Load one benchmark collecting all its problems; counts next to the paper's."""
    if is_custom_dataset(name):
        return check_custom_dataset(root, name, verify_images=verify_images, progress=progress, workers=workers,
                                    max_image_pixels=max_image_pixels)
    spec = get_spec(name)
    folder = Path(root).expanduser() / spec.folder
    paper = {"classes": spec.classes, "train": spec.paper_train, "test": spec.paper_test,
             "test_base": spec.paper_test_base, "test_novel": spec.paper_test_novel}
    report = DatasetReport(spec.name, str(folder), folder.is_dir(), paper=paper)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bench = collect_benchmark(root, spec.name, report.problems, check_files=True)
    _sort_warnings(caught, report)
    if spec.split_file and (folder / spec.split_file).is_file():
        differs = compare_with_packaged(spec.name, folder / spec.split_file)
        if differs:
            report.notes.append(differs)
    if spec.layout in ("imagenet", "imagenet_v2", "wnid_folders") and report.present \
            and not (folder / "classnames.txt").is_file():
        source = Path(root).expanduser() / "imagenet" / "classnames.txt"
        report.notes.append(f"no {folder / 'classnames.txt'}: class names read from "
                            f"{source if source.is_file() else 'the packaged ImageNet list'}")
    if bench is not None:
        report.counts = _counts(bench)
        if verify_images:
            report.problems.extend(_verify_images(bench, progress, workers, max_image_pixels))
    return report


def check_custom_dataset(root: str | os.PathLike | None, name: str, *, verify_images: bool = False,
                         progress: bool = False, workers: int = 1,
                         max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> DatasetReport:
    """The user's own ``folder:PATH`` / ``list:FILE`` data: its problems and counts (no paper counts)."""
    path = custom_dataset_path(name, root)
    report = DatasetReport(name, str(path), path.exists())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            bench = load_custom(name, root)
        except DataError as exc:
            report.problems.extend(exc.problems)
            bench = None
    _sort_warnings(caught, report)
    if bench is not None:
        report.name = bench.name
        report.counts = _counts(bench)
        if verify_images:
            report.problems.extend(_verify_images(bench, progress, workers, max_image_pixels))
    return report


def check_root(root: str | os.PathLike, names: list[str] | None = None, *, verify_images: bool = False,
               progress: bool = False, workers: int = 1,
               max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> list[DatasetReport]:
    """Check the named datasets, or every benchmark whose folder exists under ``root``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist")
    if names:
        wanted = [n if is_custom_dataset(n) else get_spec(n).name for n in names]
    else:
        wanted = [n for n, s in REGISTRY.items() if (root / s.folder).is_dir()]
        if not wanted:
            raise FileNotFoundError(
                f"no benchmark folder under {root} (expected CoOp's layout, e.g. {root}/caltech-101, {root}/imagenet)")
    return [check_dataset(root, n, verify_images=verify_images, progress=progress, workers=workers,
                          max_image_pixels=max_image_pixels) for n in wanted]


def _cell(value: int | None, paper: int | None) -> str:
    if value is None:
        return "-"
    if paper is None:
        return f"{value:,}"
    return f"{value:,}" if value == paper else f"{value:,} (paper {paper:,}) *"


def format_reports(reports: list[DatasetReport], *, max_problems: int = 50, strict: bool = False,
                   verified: bool = True) -> str:
    """A readable table (counts, * where they differ from the paper; the verdict ``--strict`` gives), then
    every problem per dataset; ``verified=False`` (images listed, not decoded) says so under the table."""
    columns = ["classes", "train", "test", "test_base", "test_novel"]
    rows = [["dataset", *columns, "status"]]
    for r in reports:
        status = r.status(strict)
        rows.append([r.name, *[_cell(r.counts.get(c), r.paper.get(c)) for c in columns], status])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if any(r.mismatches for r in reports):
        lines.append("* differs from the paper's count")
    if not verified and any(r.present for r in reports):
        lines.append("(image files were listed, not opened: --verify-images decodes every one and lists those "
                     "that cannot be read)")
    for r in reports:
        if r.problems or r.notes:
            lines.append("")
            lines.append(f"{r.name} ({r.folder}):")
        lines.extend(f"  note: {n}" for n in r.notes)
        lines.extend(f"  {p}" for p in r.problems[:max_problems])
        if len(r.problems) > max_problems:
            lines.append(f"  ... and {len(r.problems) - max_problems} more (--max-problems 0 lists all)")
    return "\n".join(lines)


def reports_as_json(reports: list[DatasetReport], strict: bool = False) -> list[dict]:
    return [{**asdict(r), "ok": r.ok(strict), "status": r.status(strict), "strict": strict,
             "mismatches": r.mismatches} for r in reports]
