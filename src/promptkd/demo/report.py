"""The demo's table (console + markdown) and plot (PNG) from its summary dict."""

from __future__ import annotations

from pathlib import Path

from promptkd.fileio import atomic_save_with, atomic_write

ROW_ORDER = ("zero-shot teacher", "zero-shot student", "teacher", "student")
ROW_LABELS = {
    "zero-shot teacher": "zero-shot teacher (Lite2 + MiniLM)",
    "zero-shot student": "zero-shot student (Lite0 + MiniLM)",
    "teacher": "teacher, prompts learnt (stage 1)",
    "student": "student, distilled (stage 2)",
}


def table_markdown(summary: dict) -> str:
    rows = summary["rows"]
    c = summary["counts"]
    lines = [
        f"# PromptKD demo: Fashion-MNIST base-to-novel (seed {summary['seed']})",
        "",
        f"Teacher: {c['fewshot']} labelled images of the 5 base classes. Student: {c['unlabelled']} unlabelled "
        f"images of all 10 classes. Test: {c['test_base']} base + {c['test_novel']} novel images.",
        "",
        "| model | Base | Novel | HM |",
        "|---|---:|---:|---:|",
    ]
    for key in ROW_ORDER:
        if key in rows:
            m = rows[key]
            lines.append(f"| {ROW_LABELS[key]} | {m['base']:.2f} | {m['novel']:.2f} | {m['hm']:.2f} |")
    lines += ["", "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["time_s"].items())
              + f"; total {summary['total_time_s']:.0f} on {summary['threads']} thread(s)."]
    cached = [f"{role} trunk {v['computed']} images computed, {v.get('from_file', v['hits'])} read from the cache "
              "file" for role, v in summary["caches"].items() if v.get("cached")]
    if cached:
        lines.append("Frozen-trunk cache: " + "; ".join(cached) + ".")
    return "\n".join(lines) + "\n"


def table_console(summary: dict) -> str:
    rows = summary["rows"]
    width = max(len(ROW_LABELS[k]) for k in ROW_ORDER)
    out = [f"{'model':<{width}}   Base  Novel     HM", "-" * (width + 22)]
    for key in ROW_ORDER:
        if key in rows:
            m = rows[key]
            out.append(f"{ROW_LABELS[key]:<{width}}  {m['base']:5.1f}  {m['novel']:5.1f}  {m['hm']:5.1f}")
    return "\n".join(out)


def plot(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [k for k in ROW_ORDER if k in summary["rows"]]
    metrics = ("base", "novel", "hm")
    fig, ax = plt.subplots(figsize=(7.5, 3.8), dpi=120)
    width = 0.8 / len(rows)
    for i, key in enumerate(rows):
        values = [summary["rows"][key][m] for m in metrics]
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(metrics))]
        bars = ax.bar(xs, values, width, label=ROW_LABELS[key])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(metrics)), ["Base", "Novel", "HM"])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("PromptKD demo on Fashion-MNIST (base-to-novel)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    atomic_save_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def write_outputs(summary: dict, out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    md = atomic_write(out_dir / "results.md", table_markdown(summary))
    png = plot(summary, out_dir / "results.png")
    return {"table": md, "plot": png, "json": out_dir / "results.json"}
