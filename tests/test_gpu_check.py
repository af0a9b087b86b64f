"""benchmarks/gpu_check.py stays runnable: its CPU smoke mode (``--device cpu --tiny``) runs every section
(matmul rate, parity, distill steps online and cached, PromptSRC steps, the torchrun distill smoke) on
tiny random CLIPs, and its table and JSON hold every row with a passing status."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_on_cpu_with_tiny_models(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--steps", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all checks passed" in proc.stdout and "promptkd GPU check on CPU" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    by_section: dict[str, list[dict]] = {}
    for r in rows:
        by_section.setdefault(r["section"], []).append(r)
    assert not [r for r in rows if r["status"] == "FAIL" or "skipped" in r["value"] or "error" == r["setting"]]
    assert by_section["matmul"][0]["tflops"] > 0
    parity = by_section["parity"]
    assert len(parity) == 6 and all(r["status"] == "ok" for r in parity)
    assert [r["error"] for r in parity if "fp32" in r["setting"].split()[3]] == [0.0, 0.0]  # same device: exact
    assert all(0 < r["error"] for r in parity if "fp32" not in r["setting"].split()[3])  # autocast does round
    steps = [r for r in by_section["distill"] if "images_per_s" in r]
    assert {(r["setting"].split()[0], r["setting"].split()[1], r["setting"].split()[3]) for r in steps} == {
        (v, p, b) for v in ("online", "cached") for p in ("bf16", "fp16") for b in ("2", "4", "8")}
    assert all(r["images_per_s"] > 0 and r["flops_per_step"] > 0 for r in steps)
    online = {r["setting"].split()[3]: r["flops_per_step"] for r in steps if r["setting"].startswith("online bf16")}
    cached = {r["setting"].split()[3]: r["flops_per_step"] for r in steps if r["setting"].startswith("cached bf16")}
    assert all(cached[b] < online[b] for b in online)  # the cached step skips the teacher's forward
    assert len(by_section["teacher"]) == 2 and all("s/step" in r["value"] for r in by_section["teacher"])
    assert by_section["torchrun"][0]["status"] == "ok"
