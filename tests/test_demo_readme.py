"""The README's demo table is what `promptkd demo` prints (to 0.3 HM, the spread measured across CPU-kernel
variants by benchmarks/demo_stability.py). The full demo: about 80 s cold on 2 cores, so it runs only with
PROMPTKD_TEST_FULL_DEMO=1 (CI sets it, in a step of its own)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from promptkd.cli import main
from promptkd.cli.demo_cmd import missing_requirements

README = Path(__file__).resolve().parents[1] / "README.md"
README_ROWS = {  # README label -> the demo's row key
    "zero-shot teacher": "zero-shot teacher",
    "zero-shot student": "zero-shot student",
    "teacher, prompts learnt": "teacher",
    "student, distilled": "student",
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_requirements(None)), reason="demo data or packages not installed"),
    pytest.mark.skipif(os.environ.get("PROMPTKD_TEST_FULL_DEMO") != "1",
                       reason="the full demo (~80 s); set PROMPTKD_TEST_FULL_DEMO=1"),
]


def readme_table() -> dict[str, tuple[float, float, float]]:
    section = README.read_text().split("## The offline demo", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| ([^|]+?) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", line)
        if match:
            key = next(v for k, v in README_ROWS.items() if match.group(1).startswith(k))
            rows[key] = tuple(float(match.group(i)) for i in (2, 3, 4))
    return rows


def test_readme_table_is_what_the_demo_prints(tmp_path, demo_cache_dir, capsys):
    expected = readme_table()
    assert set(expected) == set(README_ROWS.values())
    assert main(["demo", "--out", str(tmp_path / "demo"), "--cache-dir", str(demo_cache_dir)]) == 0
    capsys.readouterr()
    rows = json.loads((tmp_path / "demo" / "results.json").read_text())["rows"]
    for key, (base, novel, hm) in expected.items():
        got = rows[key]
        assert abs(got["hm"] - hm) <= 0.3 and abs(got["base"] - base) <= 0.5 and abs(got["novel"] - novel) <= 0.5, \
            (key, got, (base, novel, hm))
