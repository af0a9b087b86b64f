"""Gather every ``results.json`` under a runs folder into the paper's tables, with its numbers alongside.

Conventions (the paper's, see :mod:`promptkd.paper`):

* per dataset: Base and Novel are means over seeds; HM is ``HM(mean Base, mean Novel)``; the ``±``
  after each is the sample standard deviation over seeds (``ddof=1``; none with a single seed), for HM
  the std of the per-seed HMs;
* the Average row averages Base and Novel over the datasets present and takes the HM of those means;
  the paper's average next to it is recomputed over the SAME datasets (its published 11-dataset
  average when all 11 are present).

Nothing is silently averaged: a cell over fewer seeds than the table's seeds is marked and listed, a
model missing datasets that other models have is listed and its Average row says how many datasets
it covers, duplicate runs and unreadable files are listed, and different model-selection rules in
one table are flagged.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from promptkd import paper
from promptkd.evaluate import MODELS, PROTOCOLS, RESULTS_FILE
from promptkd.fileio import atomic_save_with, atomic_write, atomic_writer

MODEL_ORDER = {m: i for i, m in enumerate(MODELS)}
DATASET_ORDER = {d: i for i, d in enumerate(paper.BASE_TO_NOVEL_DATASETS + paper.DG_TARGETS)}
PARTIAL_SEEDS = "†"
MIXED_SELECTION = "‡"
NO_SELECTION = ("none", "unspecified")  # zero-shot rows choose nothing: never "mixed" with trained ones


@dataclass(frozen=True)
class Record:
    protocol: str
    dataset: str
    seed: int
    model: str
    selection: str
    metrics: dict
    path: str
    created: str = ""
    name: str = ""  # optional "name" in results.json: tells apart two models of one kind (e.g. two zero-shot)
    teacher_rule: str = ""  # how the teacher behind this row was chosen (gpa, authors_best_on_test, ...), if known

    @property
    def label(self) -> str:
        """The model's row name in the tables: its ``name`` if it has one, else its kind."""
        return self.name or self.model


@dataclass
class Stat:
    """Mean and sample std (ddof=1) of per-seed values; std is None with fewer than 2 seeds."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def std(self) -> float | None:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else None

    def fmt(self) -> str:
        if not self.values:
            return "—"
        return f"{self.mean:.2f}" + (f" ± {self.std:.2f}" if self.std is not None else "")


@dataclass
class Cell:
    """One (protocol, model, dataset): the runs of every seed found."""

    protocol: str
    model: str
    dataset: str
    records: list[Record]
    expected_seeds: list[int] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """zeroshot, teacher or student (``model`` is the row's label, which may be a name)."""
        return self.records[0].model if self.records else self.model

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.records)

    @property
    def missing_seeds(self) -> list[int]:
        return sorted(set(self.expected_seeds) - set(self.seeds))

    @property
    def selections(self) -> list[str]:
        return sorted({r.selection for r in self.records})

    def stat(self, key: str) -> Stat:
        """Per-seed values of a metric; ``hm`` is recomputed from each seed's base and novel."""
        recs = sorted(self.records, key=lambda r: r.seed)
        if key == "hm":
            return Stat([paper.harmonic_mean(float(r.metrics["base"]), float(r.metrics["novel"])) for r in recs])
        return Stat([float(r.metrics[key]) for r in recs])

    def hm(self) -> float:
        """HM of the mean Base and mean Novel (the paper's per-dataset HM)."""
        return paper.harmonic_mean(self.stat("base").mean, self.stat("novel").mean)

    def marks(self) -> str:
        return (PARTIAL_SEEDS if self.missing_seeds else "") + (MIXED_SELECTION if len(self.selections) > 1 else "")


# --------------------------------------------------------------------------------------------------
# collecting


DEMO_SUMMARY_KIND = "promptkd-demo-summary"


def is_demo_summary(data: object) -> bool:
    """The summary `promptkd demo` writes at the top of its folder: its rows are also written, one
    results.json each, in the sub-folders (the summary itself is not a row)."""
    if not isinstance(data, dict):
        return False
    if data.get("kind") == DEMO_SUMMARY_KIND:
        return True
    return isinstance(data.get("rows"), dict) and "model" not in data and "metrics" not in data  # older demos


def _validate(data: object, path: Path) -> Record:
    if not isinstance(data, dict):
        raise ValueError("top level is not an object")
    missing = [k for k in ("protocol", "dataset", "seed", "model", "metrics") if k not in data]
    if missing:
        raise ValueError(f"missing key(s) {missing}")
    if data["protocol"] not in PROTOCOLS:
        raise ValueError(f"unknown protocol {data['protocol']!r}")
    if data["model"] not in MODELS:
        raise ValueError(f"unknown model {data['model']!r}")
    need = ("base", "novel") if data["protocol"] == "base2novel" else ("accuracy",)
    metrics = data["metrics"]
    if not isinstance(metrics, dict) or any(not isinstance(metrics.get(k), (int, float)) for k in need):
        raise ValueError(f"metrics must hold numbers for {list(need)}")
    name = data.get("name") or ""
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, got {name!r}")
    source = data.get("source") if isinstance(data.get("source"), dict) else {}
    teacher = source.get("teacher") if isinstance(source.get("teacher"), dict) else {}
    teacher_rule = str(source.get("teacher_selection") or teacher.get("selection") or "")
    return Record(str(data["protocol"]), str(data["dataset"]), int(data["seed"]), str(data["model"]),
                  str(data.get("selection") or "unspecified"), dict(metrics), str(path), str(data.get("created", "")),
                  name, teacher_rule)


def collect(runs_dir: str | Path) -> tuple[list[Record], list[str]]:
    """Every valid results.json under ``runs_dir`` and a list of problems (bad files, duplicates).

    Two files for the same (protocol, dataset, model, seed) are a problem; the newer (``created``,
    then path) is kept and both are named. Models of one kind with different ``name`` s are different
    rows. The demo's own summary file is not a row and is passed over."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"runs folder not found: {root}")
    problems: list[str] = []
    found: dict[tuple, Record] = {}
    for path in sorted(root.rglob(RESULTS_FILE)):
        try:
            data = json.loads(path.read_text())
            if is_demo_summary(data):
                continue
            record = _validate(data, path)
        except (json.JSONDecodeError, ValueError, TypeError) as exc:
            problems.append(f"{path}: skipped, not a valid results file ({exc})")
            continue
        key = (record.protocol, record.dataset, record.label, record.seed)
        if key in found:
            old = found[key]
            keep, drop = sorted([old, record], key=lambda r: (r.created, r.path))[::-1]
            problems.append(f"duplicate {record.label} {record.dataset} seed {record.seed} ({record.protocol}): "
                            f"{drop.path} and {keep.path}; using {keep.path}")
            found[key] = keep
        else:
            found[key] = record
    return list(found.values()), problems


def build_cells(records: Iterable[Record], protocol: str, seeds: Sequence[int] | None = None
                ) -> dict[tuple[str, str], Cell]:
    """(model, dataset) -> Cell for one protocol; expected seeds: ``seeds`` or every seed seen in it."""
    recs = [r for r in records if r.protocol == protocol]
    expected = sorted(seeds) if seeds else sorted({r.seed for r in recs})
    grouped: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for r in recs:
        grouped[(r.label, r.dataset)].append(r)
    cells = {k: Cell(protocol, k[0], k[1], v, expected) for k, v in grouped.items()}
    teachers = [c for c in cells.values() if c.kind == "teacher"]
    if teachers and all(len(c.records) == 1 for c in teachers) and len(expected) > 1:
        for c in teachers:  # one teacher per dataset, reused by every seed's student (the authors' protocol)
            c.expected_seeds = c.seeds
    return cells


def _sorted_datasets(names: Iterable[str]) -> list[str]:
    return sorted(set(names), key=lambda d: (DATASET_ORDER.get(d, len(DATASET_ORDER)), d))


def _sorted_models(cells: dict[tuple[str, str], Cell]) -> list[str]:
    """Row labels in the order zero-shot, teacher, student (by kind), then by name."""
    kinds = {label: cell.kind for (label, _), cell in cells.items()}
    return sorted(kinds, key=lambda m: (MODEL_ORDER.get(kinds[m], len(MODEL_ORDER)), m))


def _paper_row(cells: dict[tuple[str, str], Cell], label: str) -> str:
    kind = next(c.kind for (m, _), c in cells.items() if m == label)
    return paper.PAPER_ROW_FOR_MODEL.get(kind, paper.PROMPTKD)


# --------------------------------------------------------------------------------------------------
# tables


@dataclass
class Table:
    """One protocol's summary: rows for CSV, markdown text, notes, and values for the plot."""

    protocol: str
    markdown: str
    rows: list[dict]
    notes: list[str]
    plot_values: dict[str, dict[str, tuple[float, float | None]]]  # series -> dataset -> (value, std)


def _average_b2n(cells: list[Cell]) -> dict:
    base = float(np.mean([c.stat("base").mean for c in cells]))
    novel = float(np.mean([c.stat("novel").mean for c in cells]))
    # per-seed averages over datasets, only for seeds every dataset has
    common = set.intersection(*(set(c.seeds) for c in cells)) if cells else set()
    per_seed_hm = []
    for s in sorted(common):
        b = np.mean([next(float(r.metrics["base"]) for r in c.records if r.seed == s) for c in cells])
        n = np.mean([next(float(r.metrics["novel"]) for r in c.records if r.seed == s) for c in cells])
        per_seed_hm.append(paper.harmonic_mean(float(b), float(n)))
    hm_std = float(np.std(per_seed_hm, ddof=1)) if len(per_seed_hm) > 1 else None
    return {"base": base, "novel": novel, "hm": paper.harmonic_mean(base, novel), "hm_std": hm_std}


def uses_test_labels(selection: str) -> bool:
    """Whether a selection rule picks the model with test-set labels (the authors' "best on base test")."""
    return "test" in selection.lower()


def _rule_counts(cells: Iterable[Cell], rule_of: Callable[[Record], str]) -> dict[str, dict[str, int]]:
    """{row label: {rule: runs}} over the cells' records (records whose rule is "" are not counted)."""
    by_model: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for c in cells:
        for r in c.records:
            if rule := rule_of(r):
                by_model[c.model][rule] += 1
    return by_model


def _selection_notes(cells: Iterable[Cell], protocol: str) -> list[str]:
    """Flag (a) one model kind whose runs were selected by different rules (they are averaged together),
    (b) a table where some models were selected on test labels and others not. Different label-free
    rules of different model kinds (teacher: GPA aggregate, student: last epoch) are the normal pipeline:
    each section header names its rule."""
    by_model = _rule_counts(cells, lambda r: r.selection if r.selection not in NO_SELECTION else "")
    within = sorted(m for m, v in by_model.items() if len(v) > 1)
    kinds = {uses_test_labels(sel) for v in by_model.values() for sel in v}
    if not within and len(kinds) <= 1:
        return []
    parts = "; ".join(f"{m}: " + ", ".join(f"{s} ({n} run{'s' * (n > 1)})" for s, n in sorted(v.items()))
                      for m, v in sorted(by_model.items()))
    why = []
    if within:
        why.append(f"runs of the same model kind ({', '.join(within)}) were selected by different rules and are "
                   "averaged together")
    if len(kinds) > 1:
        why.append("some models were selected with test-set labels and others were not")
    return [f"**Mixed model-selection rules in this {protocol} table** ({parts}): {'; '.join(why)}. "
            "Such numbers are not directly comparable."]


def _teacher_notes(cells: Iterable[Cell], protocol: str) -> list[str]:
    """Flag one model kind whose runs come from teachers chosen by different rules (e.g. our GPA teacher
    and the authors' test-selected model-best.pth.tar): they are averaged together."""
    by_model = _rule_counts(cells, lambda r: r.teacher_rule)
    mixed = {m: v for m, v in by_model.items() if len(v) > 1}
    return [f"**{m} rows of this {protocol} table come from teachers chosen by different rules** ("
            + ", ".join(f"{rule}: {n} run{'s' * (n > 1)}" for rule, n in sorted(v.items()))
            + "); they are averaged together and are not directly comparable." for m, v in sorted(mixed.items())]


def _coverage_notes(cells: dict[tuple[str, str], Cell], models: list[str], datasets: list[str]) -> list[str]:
    notes = []
    single = sorted({c.seeds[0] for c in cells.values()
                     if c.kind == "teacher" and len(c.seeds) == 1 and not c.missing_seeds})
    all_seeds = sorted({s for c in cells.values() for s in c.expected_seeds})
    if single and len(all_seeds) > 1:
        notes.append(f"teacher: one teacher per dataset (seed {', '.join(map(str, single))}), reused by the students "
                     "of every seed, as in the authors' protocol: its row is that one teacher, not a mean over seeds")
    for m in models:
        absent = [d for d in datasets if (m, d) not in cells]
        if absent:
            notes.append(f"{m}: no results for {', '.join(absent)} (its Average covers the other datasets only)")
        for d in datasets:
            c = cells.get((m, d))
            if c is not None and c.missing_seeds:
                notes.append(f"{PARTIAL_SEEDS} {m} {d}: seed(s) {', '.join(map(str, c.missing_seeds))} missing; "
                             f"mean over seed(s) {', '.join(map(str, c.seeds))}")
            if c is not None and len(c.selections) > 1:
                notes.append(f"{MIXED_SELECTION} {m} {d}: seeds selected by different rules ({', '.join(c.selections)})")
    return notes


def _fmt(v: float | None, std: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def base_to_novel_table(records: Iterable[Record], seeds: Sequence[int] | None = None) -> Table | None:
    cells = build_cells(records, "base2novel", seeds)
    if not cells:
        return None
    models = _sorted_models(cells)
    datasets = _sorted_datasets(d for _, d in cells)
    expected = next(iter(cells.values())).expected_seeds
    notes = (_selection_notes(cells.values(), "base2novel") + _teacher_notes(cells.values(), "base2novel")
             + _coverage_notes(cells, models, datasets))
    rows: list[dict] = []
    plot: dict[str, dict[str, tuple[float, float | None]]] = {}
    out = io.StringIO()
    out.write(f"## Base-to-novel (seeds {', '.join(map(str, expected))}; mean ± std over seeds)\n\n")
    out.write("Base and Novel: mean accuracy (%) over seeds, ± the sample std of the per-seed values. HM: the "
              "harmonic mean of the mean Base and mean Novel (as the paper), ± the std of the per-seed HMs. "
              "Average rows: mean Base and mean Novel over the datasets, their HM; the paper's Average over "
              "fewer than its 11 datasets is recomputed from its per-dataset numbers.\n\n")

    # overview: HM per dataset for every model kind, and the paper's PromptKD
    header = ["Dataset"] + [f"{m} HM" for m in models] + ["paper PromptKD HM"]
    out.write("| " + " | ".join(header) + " |\n|" + "---|" + "---:|" * (len(header) - 1) + "\n")
    for d in datasets:
        cells_d = [cells.get((m, d)) for m in models]
        ref = paper.base_to_novel(paper.PROMPTKD, d)
        out.write(f"| {d} | " + " | ".join(
            (_fmt(c.hm(), c.stat("hm").std) + c.marks()) if c else "—" for c in cells_d)
            + f" | {_fmt(ref.hm if ref else None)} |\n")
    if len(datasets) > 1:
        avgs = []
        for m in models:
            mc = [cells[(m, d)] for d in datasets if (m, d) in cells]
            a = _average_b2n(mc)
            avgs.append(_fmt(a["hm"], a["hm_std"]) + ("" if len(mc) == len(datasets) else f" ({len(mc)} datasets)"))
        ref = paper.base_to_novel_average(paper.PROMPTKD, datasets)
        out.write("| **Average** | " + " | ".join(avgs) + f" | {_fmt(ref.hm if ref else None)} |\n")
    out.write("\n")

    for m in models:
        mcells = [cells[(m, d)] for d in datasets if (m, d) in cells]
        ref_method = _paper_row(cells, m)
        sel = ", ".join(sorted({s for c in mcells for s in c.selections}))
        out.write(f"### {m} (selection: {sel}; paper row: {ref_method})\n\n")
        out.write("| Dataset | Base | Novel | HM | seeds | paper Base | paper Novel | paper HM | Δ HM |\n")
        out.write("|---|---:|---:|---:|---|---:|---:|---:|---:|\n")
        series = plot.setdefault(m, {})
        for c in mcells:
            ref = paper.base_to_novel(ref_method, c.dataset)
            b, n, h = c.stat("base"), c.stat("novel"), c.stat("hm")
            hm = c.hm()
            out.write(f"| {c.dataset}{c.marks()} | {b.fmt()} | {n.fmt()} | {_fmt(hm, h.std)} | "
                      f"{','.join(map(str, c.seeds))} | {_fmt(ref.base if ref else None)} | "
                      f"{_fmt(ref.novel if ref else None)} | {_fmt(ref.hm if ref else None)} | "
                      f"{_fmt(hm - ref.hm) if ref else '—'} |\n")
            series[c.dataset] = (hm, h.std)
            rows.append(_b2n_row(c, ref_method, ref))
        if mcells:
            avg = _average_b2n(mcells)
            names = [c.dataset for c in mcells]
            ref = paper.base_to_novel_average(ref_method, names)
            label = f"Average ({len(names)} dataset{'s' * (len(names) > 1)})"
            out.write(f"| **{label}** | {_fmt(avg['base'])} | {_fmt(avg['novel'])} | "
                      f"**{_fmt(avg['hm'], avg['hm_std'])}** | | {_fmt(ref.base if ref else None)} | "
                      f"{_fmt(ref.novel if ref else None)} | {_fmt(ref.hm if ref else None)} | "
                      f"{_fmt(avg['hm'] - ref.hm) if ref else '—'} |\n")
            series["Average"] = (avg["hm"], avg["hm_std"])
            rows.append({"protocol": "base2novel", "model": m, "dataset": "Average", "n_datasets": len(names),
                         "base_mean": avg["base"], "novel_mean": avg["novel"], "hm": avg["hm"],
                         "hm_std": avg["hm_std"], "paper_method": ref_method,
                         "paper_base": ref.base if ref else None, "paper_novel": ref.novel if ref else None,
                         "paper_hm": ref.hm if ref else None, "selection": sel})
        out.write("\n")
    ref_series = {}
    for d in datasets:
        ref = paper.base_to_novel(paper.PROMPTKD, d)
        if ref:
            ref_series[d] = (ref.hm, None)
    avg_ref = paper.base_to_novel_average(paper.PROMPTKD, datasets)
    if avg_ref:
        ref_series["Average"] = (avg_ref.hm, None)
    plot["paper PromptKD"] = ref_series
    return Table("base2novel", _with_notes(out.getvalue(), notes), rows, notes, plot)


def _b2n_row(c: Cell, ref_method: str, ref: paper.B2N | None) -> dict:
    b, n, h = c.stat("base"), c.stat("novel"), c.stat("hm")
    return {"protocol": "base2novel", "model": c.model, "kind": c.kind, "dataset": c.dataset, "n_seeds": b.n,
            "seeds": " ".join(map(str, c.seeds)), "missing_seeds": " ".join(map(str, c.missing_seeds)),
            "base_mean": b.mean, "base_std": b.std, "novel_mean": n.mean, "novel_std": n.std,
            "hm": c.hm(), "hm_std": h.std, "paper_method": ref_method,
            "paper_base": ref.base if ref else None, "paper_novel": ref.novel if ref else None,
            "paper_hm": ref.hm if ref else None, "selection": " ".join(c.selections)}


def accuracy_table(records: Iterable[Record], protocol: str, seeds: Sequence[int] | None = None) -> Table | None:
    """Cross-dataset or domain-generalisation: accuracy per target and model kind, paper PromptKD alongside."""
    cells = build_cells(records, protocol, seeds)
    if not cells:
        return None
    models = _sorted_models(cells)
    datasets = _sorted_datasets(d for _, d in cells)
    expected = next(iter(cells.values())).expected_seeds
    notes = (_selection_notes(cells.values(), protocol) + _teacher_notes(cells.values(), protocol)
             + _coverage_notes(cells, models, datasets))
    title = {"cross_dataset": "Cross-dataset", "domain_generalization": "Domain generalisation"}[protocol]
    out = io.StringIO()
    out.write(f"## {title} (seeds {', '.join(map(str, expected))}; accuracy %, mean ± std over seeds)\n\n")
    rules = [f"{m}: " + ", ".join(sorted({s for (mm, _), c in cells.items() if mm == m for s in c.selections}))
             for m in models]
    out.write(f"Model selection: {'; '.join(rules)}.\n\n")
    header = ["Target"] + models + ["paper PromptKD"]
    out.write("| " + " | ".join(header) + " |\n|" + "---|" + "---:|" * (len(header) - 1) + "\n")
    rows, plot = [], {m: {} for m in models}
    for d in datasets:
        line = [d]
        for m in models:
            c = cells.get((m, d))
            if c is None:
                line.append("—")
                continue
            s = c.stat("accuracy")
            line.append(s.fmt() + c.marks())
            plot[m][d] = (s.mean, s.std)
            rows.append({"protocol": protocol, "model": m, "dataset": d, "n_seeds": s.n,
                         "seeds": " ".join(map(str, c.seeds)), "missing_seeds": " ".join(map(str, c.missing_seeds)),
                         "accuracy_mean": s.mean, "accuracy_std": s.std,
                         "paper_promptkd": paper.accuracy(protocol, paper.PROMPTKD, d),
                         "selection": " ".join(c.selections)})
        line.append(_fmt(paper.accuracy(protocol, paper.PROMPTKD, d)))
        out.write("| " + " | ".join(line) + " |\n")
    paper_targets = paper.CROSS_DATASET_TARGETS if protocol == "cross_dataset" else paper.DG_TARGETS
    # the Average is over the paper's targets when any are here (the source, ImageNet, is shown but is not a
    # target); over every row for your own data
    targets = [d for d in datasets if d in paper_targets] or datasets
    outside = [d for d in datasets if d not in targets]
    avg_line = ["**Average**"]
    for m in models:
        present = [cells[(m, d)].stat("accuracy").mean for d in targets if (m, d) in cells]
        if not present:
            avg_line.append("—")
            continue
        avg = float(np.mean(present))
        avg_line.append(f"{avg:.2f} ({len(present)} target{'s' * (len(present) > 1)})")
        plot[m]["Average"] = (avg, None)
        rows.append({"protocol": protocol, "model": m, "dataset": "Average", "n_datasets": len(present),
                     "accuracy_mean": avg})
    full = set(targets) >= set(paper_targets)
    ref_avg = paper.accuracy_average(protocol, paper.PROMPTKD)
    own_data_only = not set(datasets) & set(paper_targets)  # e.g. `--dataset folder:PATH` runs only
    avg_line.append("—" if own_data_only else _fmt(ref_avg) + ("" if full else f" (all {len(paper_targets)} targets)"))
    out.write("| " + " | ".join(avg_line) + " |\n\n")
    if own_data_only:
        notes.append(f"{', '.join(datasets)}: not among the paper's targets (your own data): no paper numbers.")
    elif not full:
        notes.append(f"The paper's average covers all {len(paper_targets)} targets; this run has "
                     f"{len(targets)}: not directly comparable.")
    if outside and not own_data_only:
        notes.append(f"{', '.join(outside)}: not a target of this protocol (the source dataset): shown, not "
                     "counted in the Average.")
    plot["paper PromptKD"] = {d: (v, None) for d in datasets
                              if (v := paper.accuracy(protocol, paper.PROMPTKD, d)) is not None}
    if full and ref_avg is not None:
        plot["paper PromptKD"]["Average"] = (ref_avg, None)
    return Table(protocol, _with_notes(out.getvalue(), notes), rows, notes, plot)


def _with_notes(text: str, notes: list[str]) -> str:
    if not notes:
        return text
    return text + "Notes:\n\n" + "".join(f"- {n}\n" for n in notes) + "\n"


# --------------------------------------------------------------------------------------------------
# outputs


def write_csv(tables: Sequence[Table], path: str | Path) -> Path:
    """All tables' rows in one long CSV (one row per protocol x model x dataset, plus averages)."""
    keys: list[str] = []
    for t in tables:
        for r in t.rows:
            keys.extend(k for k in r if k not in keys)
    path = Path(path)
    with atomic_writer(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for t in tables:
            for r in t.rows:
                writer.writerow({k: ("" if v is None else round(v, 4) if isinstance(v, float) else v)
                                 for k, v in r.items()})
    return path


def plot_table(table: Table, path: str | Path) -> Path:
    """Grouped bars per dataset (HM for base-to-novel, accuracy otherwise) with std error bars."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    series = {k: v for k, v in table.plot_values.items() if v}
    order = _sorted_datasets(d for v in series.values() for d in v if d != "Average")
    if any("Average" in v for v in series.values()):
        order.append("Average")
    colours = {"zeroshot": "#9e9e9e", "teacher": "#1f77b4", "student": "#d62728", "paper PromptKD": "#f4a582"}
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(order) + 2), 4.2), dpi=120)
    x = np.arange(len(order))
    for i, (name, values) in enumerate(series.items()):
        ys = [values.get(d, (np.nan, None))[0] for d in order]
        errs = [values.get(d, (np.nan, None))[1] or np.nan for d in order]
        hatch = "//" if name.startswith("paper") else None
        ax.bar(x + (i - (len(series) - 1) / 2) * width, ys, width, yerr=errs if not np.all(np.isnan(errs)) else None,
               capsize=2, label=name,
               color=colours.get(name), hatch=hatch, edgecolor="white" if hatch else None, linewidth=0)
    if order and order[-1] == "Average" and len(order) > 1:
        ax.axvline(len(order) - 1.5, color="black", linewidth=0.8, linestyle=":")
    metric = "HM (%)" if table.protocol == "base2novel" else "accuracy (%)"
    titles = {"base2novel": "Base-to-novel harmonic mean", "cross_dataset": "Cross-dataset accuracy",
              "domain_generalization": "Domain-generalisation accuracy"}
    ax.set_title(titles[table.protocol] + " (error bars: std over seeds)")
    ax.set_ylabel(metric)
    ax.set_xticks(x, order, rotation=30, ha="right")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(ncol=len(series), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28), frameon=False)
    fig.tight_layout()
    path = Path(path)
    atomic_save_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


@dataclass
class Report:
    markdown: str
    tables: list[Table]
    problems: list[str]
    files: dict[str, Path] = field(default_factory=dict)


def make_report(runs_dir: str | Path, out_dir: str | Path | None = None, *, seeds: Sequence[int] | None = None,
                plot: bool = True) -> Report:
    """Collect results under ``runs_dir``; write report.md, report.csv and one PNG per protocol."""
    records, problems = collect(runs_dir)
    if not records:
        raise ValueError(f"{runs_dir}: no valid {RESULTS_FILE} found" + (f" ({len(problems)} invalid)" if problems else ""))
    tables = [t for t in (base_to_novel_table(records, seeds),
                          accuracy_table(records, "cross_dataset", seeds),
                          accuracy_table(records, "domain_generalization", seeds)) if t is not None]
    text = f"# Results under {runs_dir}\n\n{len(records)} result file(s).\n\n" + "\n".join(t.markdown for t in tables)
    if problems:
        text += "\n## Problems\n\n" + "".join(f"- {p}\n" for p in problems)
    out = Path(out_dir) if out_dir is not None else Path(runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "report.md", "csv": out / "report.csv"}
    atomic_write(files["markdown"], text)
    write_csv(tables, files["csv"])
    if plot:
        for t in tables:
            files[f"plot_{t.protocol}"] = plot_table(t, out / f"report_{t.protocol}.png")
    return Report(text, tables, problems, files)
