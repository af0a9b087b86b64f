"""Predicting many images: in order, in batches, into a CSV or JSON-lines file that a rerun resumes.

* Every input path gives exactly one row: its top-k classes with probabilities, or the reason it could
  not be read (``error``). Unreadable images are never dropped silently; the caller exits non-zero.
* ``--out FILE.csv`` / ``FILE.jsonl`` is appended to batch by batch (flushed each time), so a run killed
  after hours keeps what it wrote; rerunning the same command skips every path already in the file (a
  partly written last line is cut off first). A side file ``FILE.meta.json`` records the model and
  top-k, and a rerun with another model or top-k is refused instead of mixing two models' rows.
  (This file is appended to, so it is not written through ``fileio.atomic_write``; the side file is.)

CSV columns: ``path, label_1, probability_1, ..., label_k, probability_k, error``; JSON lines:
``{"path": ..., "predictions": [{"label", "class_name", "probability"}, ...], "error": null}``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from promptkd.fileio import atomic_write, atomic_write_json, read_json
from promptkd.progress import progress_bar
from promptkd.runtime import Predictor, decode_image

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass
class Row:
    path: str
    top: list[tuple[int, str, float]] | None = None  # (label, class name, probability), best first
    error: str | None = None

    def to_json(self) -> dict:
        preds = None if self.top is None else [
            {"label": i, "class_name": n, "probability": round(p, 6)} for i, n, p in self.top]
        return {"path": self.path, "predictions": preds, "error": self.error}


@dataclass
class Summary:
    total: int
    predicted: int = 0
    skipped: int = 0  # already in the output file
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this run and earlier ones
    out: str | None = None
    seconds: float = 0.0
    retried: int = 0  # rows of images that had failed in an earlier run, dropped and tried again

    def line(self) -> str:
        parts = [f"{self.predicted} image(s) predicted"]
        if self.skipped:
            parts.append(f"{self.skipped} already in {self.out} (skipped)")
        if self.retried:
            parts.append(f"{self.retried} that failed before tried again")
        if self.errors:
            parts.append(f"{len(self.errors)} unreadable")
        rate = self.predicted / self.seconds if self.seconds > 0 else 0.0
        where = f" -> {self.out}" if self.out else ""
        return ", ".join(parts) + f" in {self.seconds:.1f} s ({rate:.1f} images/s){where}"


def _reason(exc: Exception, path: str) -> str:
    text = str(exc)
    return text[len(path) + 2:] if text.startswith(path + ": ") else text


def iter_predictions(predictor: Predictor, paths: Sequence[str], *, top_k: int = 5, batch_size: int = 32,
                     max_pixels: int | None = None) -> Iterator[list[Row]]:
    """Rows for ``paths`` in order, one list per batch; unreadable files give rows with ``error``."""
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    prepare = predictor.preparer()
    for start in range(0, len(paths), batch_size):
        rows = [Row(str(p)) for p in paths[start : start + batch_size]]
        images, good = [], []
        for row in rows:
            if not os.path.isfile(row.path):
                row.error = "file not found" if not os.path.exists(row.path) else "not a file"
                continue
            try:
                images.append(decode_image(row.path, max_pixels=max_pixels, setting="--max-image-pixels"))
                good.append(row)
            except ValueError as exc:
                row.error = _reason(exc, row.path)
        if images:
            probs = predictor.probabilities(prepare(images))
            for row, top in zip(good, predictor.top_k(probs, top_k)):
                row.top = top
        yield rows


# --------------------------------------------------------------------------------------------------
# output files


def output_format(out: str | os.PathLike) -> str:
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{out}: --out must end in .csv or .jsonl (one row per image)")
    return FORMATS[suffix]


def csv_header(top_k: int) -> list[str]:
    cols = ["path"]
    for r in range(1, top_k + 1):
        cols += [f"label_{r}", f"probability_{r}"]
    return cols + ["error"]


def _csv_line(row: Row, top_k: int) -> str:
    cells: list[str] = [row.path]
    top = row.top or []
    for r in range(top_k):
        cells += [top[r][1], f"{top[r][2]:.6f}"] if r < len(top) else ["", ""]
    cells.append(row.error or "")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(cells)
    return buf.getvalue()


def _trim_partial_line(path: Path) -> None:
    """Cut a last line that a killed run left without its newline."""
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def read_done(out: Path, fmt: str, top_k: int) -> dict[str, str | None]:
    """Paths already in ``out`` -> their error (None when predicted)."""
    _trim_partial_line(out)
    done: dict[str, str | None] = {}
    text = out.read_text(encoding="utf-8")
    if fmt == "csv":
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None:
            return done
        if header != csv_header(top_k):
            raise ValueError(f"{out}: its columns are not those of --top-k {top_k} ({len(header)} columns); "
                             "use the same --top-k or another --out")
        for cells in reader:
            if cells:
                done[cells[0]] = cells[-1] or None
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                done[obj["path"]] = obj.get("error")
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{out}: line {n} is not a prediction row; use another --out") from None
    return done


def _meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def _check_meta(out: Path, meta: dict) -> None:
    side = _meta_path(out)
    if out.exists() and out.stat().st_size and side.exists():
        old = read_json(side, "predictions side file")
        if old.get("top_k") != meta["top_k"]:
            raise ValueError(f"{out}: was written with --top-k {old.get('top_k')}, not {meta['top_k']}; use the "
                             "same --top-k, another --out, or delete it")
        if old.get("model") != meta["model"]:
            def said(m: dict) -> str:
                return f"{m.get('source') or 'a model not recorded'} ({m.get('backend')}, {m.get('precision')})"

            raise ValueError(f"{out}: holds predictions of another model, {said(old)}, not {said(meta)}; rows of "
                             "two models are never mixed in one file: use another --out, or delete it (and "
                             f"{side.name}) to start again")
    atomic_write_json(side, meta)


def predict_to_file(predictor: Predictor, paths: Sequence[str], out: str | os.PathLike, *, top_k: int = 5,
                    batch_size: int = 32, progress: bool = True, max_pixels: int | None = None) -> Summary:
    """Append one row per path to ``out`` (CSV or JSON lines), skipping paths it already holds a
    prediction for; images whose earlier row is an error are tried again (their old row is dropped)."""
    out = Path(out)
    fmt = output_format(out)
    k = min(top_k, len(predictor.class_names))
    meta = {"model": predictor.info.key(), "top_k": k, "source": predictor.info.source,
            "precision": predictor.info.precision, "backend": predictor.info.backend}
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_meta(out, meta)
    done = read_done(out, fmt, k) if out.exists() and out.stat().st_size else {}
    wanted = {str(p) for p in paths}
    retry = {p for p, e in done.items() if e and p in wanted}
    if retry:  # images that failed before are tried again (the file may have been fixed): drop their rows
        _drop_rows(out, fmt, retry)
        done = {p: e for p, e in done.items() if p not in retry}
    todo = [str(p) for p in paths if str(p) not in done]
    summary = Summary(total=len(paths), skipped=len(paths) - len(todo), out=str(out),
                      errors=[(p, e) for p, e in done.items() if e], retried=len(retry))
    start = time.perf_counter()
    bar = progress_bar(total=len(todo), desc="predict", unit="img", enabled=progress and bool(todo))
    try:
        with open(out, "a", encoding="utf-8", newline="") as f:
            if fmt == "csv" and f.tell() == 0:
                f.write(",".join(csv_header(k)) + "\n")
            for rows in iter_predictions(predictor, todo, top_k=k, batch_size=batch_size, max_pixels=max_pixels):
                text = "".join(_csv_line(r, k) if fmt == "csv" else json.dumps(r.to_json()) + "\n" for r in rows)
                f.write(text)
                f.flush()
                _count(summary, rows)
                bar.update(len(rows))
            os.fsync(f.fileno())
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _drop_rows(out: Path, fmt: str, paths: set[str]) -> None:
    """Rewrite ``out`` (atomically) without the rows of ``paths``."""
    text = out.read_text(encoding="utf-8")
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(text)))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerows([rows[0], *(r for r in rows[1:] if r and r[0] not in paths)])
        kept = buf.getvalue()
    else:
        kept = "".join(line + "\n" for line in text.splitlines()
                       if line.strip() and json.loads(line).get("path") not in paths)
    atomic_write(out, kept)


def _count(summary: Summary, rows: list[Row]) -> None:
    for r in rows:
        if r.error:
            summary.errors.append((r.path, r.error))
        else:
            summary.predicted += 1


def predict_rows(predictor: Predictor, paths: Sequence[str], *, top_k: int = 5, batch_size: int = 32,
                 progress: bool = False, max_pixels: int | None = None) -> tuple[list[Row], Summary]:
    """All rows in memory (for printing), with the same summary as :func:`predict_to_file`."""
    summary = Summary(total=len(paths))
    rows: list[Row] = []
    start = time.perf_counter()
    bar = progress_bar(total=len(paths), desc="predict", unit="img", enabled=progress and bool(paths))
    try:
        for batch in iter_predictions(predictor, [str(p) for p in paths], top_k=top_k, batch_size=batch_size,
                                      max_pixels=max_pixels):
            rows.extend(batch)
            _count(summary, batch)
            bar.update(len(batch))
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - start
    return rows, summary


def format_rows(rows: Sequence[Row]) -> str:
    """The terminal table: each image, then its classes with percentages (or why it was not read)."""
    lines = []
    for row in rows:
        if row.error:
            lines.append(f"{row.path}\n  unreadable: {row.error}")
            continue
        lines.append(row.path)
        width = max(len(n) for _, n, _ in row.top)
        lines.extend(f"  {r + 1}. {n:<{width}}  {100 * p:6.2f}%" for r, (_, n, p) in enumerate(row.top))
    return "\n".join(lines)
