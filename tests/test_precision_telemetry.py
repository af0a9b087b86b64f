"""`--precision auto` (bf16 only where native and agreeing with fp32) and onnxruntime's telemetry kept off."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from promptkd import precision as prec

WITH_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
WITH_AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 amx_tile amx_bf16 amx_int8\n"
WITHOUT = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"


@pytest.fixture
def cpuinfo(tmp_path):
    def write(text: str):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        return path
    return write


def test_native_bf16_reads_the_cpu_flags(cpuinfo, tmp_path):
    assert prec.native_bf16("cpu", cpuinfo(WITH_BF16)) == (True, "the CPU has avx512_bf16")
    assert prec.native_bf16("cpu", cpuinfo(WITH_AMX))[0] is True
    assert prec.native_bf16("cpu", cpuinfo(WITHOUT))[0] is False
    assert prec.native_bf16("cpu", tmp_path / "nope")[0] is False  # unreadable: no claim of native bf16


def _check_with(agree: int, total: int = 200):
    """A check function whose bf16 logits change the top-1 class of total - agree rows."""
    calls = []
    ref = torch.eye(4)[torch.arange(total) % 4] * 5

    def check(p: str) -> torch.Tensor:
        calls.append(p)
        if p == "fp32":
            return ref
        out = ref.clone()
        out[agree:] = out[agree:].roll(1, dims=1)
        return out
    return check, calls


def test_auto_without_native_bf16_is_fp32_and_runs_no_check(cpuinfo):
    check, calls = _check_with(200)
    choice = prec.resolve_precision("auto", check=check, cpuinfo=cpuinfo(WITHOUT))
    assert choice.precision == "fp32" and "no native bf16" in choice.reason and calls == []


@pytest.mark.parametrize("agree, expected", [(200, "bf16"), (199, "bf16"), (198, "fp32"), (150, "fp32")])
def test_auto_with_native_bf16_needs_99_5_percent_agreement(cpuinfo, agree, expected):
    check, calls = _check_with(agree)
    choice = prec.resolve_precision("auto", check=check, cpuinfo=cpuinfo(WITH_BF16))
    assert choice.precision == expected
    assert choice.agreement == pytest.approx(agree / 200)
    assert sorted(calls) == ["bf16", "fp32"]


def test_explicit_choices_and_bad_value(cpuinfo):
    check, calls = _check_with(0)
    assert prec.resolve_precision("bf16", check=check, cpuinfo=cpuinfo(WITHOUT)).precision == "bf16"
    assert prec.resolve_precision("fp32", check=check, cpuinfo=cpuinfo(WITH_BF16)).precision == "fp32"
    assert calls == []
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, bf16"):
        prec.resolve_precision("fp16")


def test_predict_cli_auto_follows_the_cpu(tmp_path, monkeypatch, capsys):
    from deploy_models import colour_image, save_colour_student
    from promptkd.cli import main

    student = save_colour_student(tmp_path / "student")
    image = str(colour_image(tmp_path / "red.png", "red"))
    real = prec.native_bf16
    assert main(["predict", image, "--student", str(student), "--json"]) == 0  # 1 image proves nothing about bf16
    assert "auto -> bf16" not in capsys.readouterr().err
    monkeypatch.setattr(prec, "MIN_CHECK_IMAGES", 1)  # the rule itself, on one image
    for text, expected in ((WITHOUT, "auto -> fp32: the CPU has no native bf16"),
                           (WITH_BF16, "auto -> bf16: the CPU has avx512_bf16; top-1 agreement with fp32 100.0%")):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        monkeypatch.setattr(prec, "native_bf16", lambda device="cpu", cpuinfo=None, _p=path: real(device, _p))
        assert main(["predict", image, "--student", str(student), "--top-k", "1", "--json"]) == 0
        captured = capsys.readouterr()
        assert expected in captured.err
        assert '"class_name": "red"' in captured.out


def test_bf16_predictor_stays_close_to_fp32(tmp_path):
    from deploy_models import save_colour_student
    from promptkd.runtime import load_predictor

    student = save_colour_student(tmp_path / "student")
    x = torch.randn(16, 3, 32, 32)
    p32 = load_predictor(student, precision="fp32").probabilities(x)
    p16 = load_predictor(student, precision="bf16").probabilities(x)
    assert abs(p32 - p16).max() < 0.05 and (p32.argmax(1) == p16.argmax(1)).mean() >= 0.9


# --- onnxruntime telemetry -------------------------------------------------------------------------

_TELEMETRY_STORE = os.path.join(".cache", "Microsoft", "DeveloperTools", ".onnxruntime")


def _run_with_home(home, code: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    env["HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_onnxruntime_telemetry_stays_off_in_promptkd(tmp_path):
    """onnxruntime's telemetry client creates its store under ~/.cache when it starts: with promptkd it never
    starts (export, int8 quantisation and an onnxruntime session all run), without promptkd it does."""
    pytest.importorskip("onnxruntime")
    control = tmp_path / "home_plain"
    _run_with_home(control, "import onnxruntime")
    if not (control / _TELEMETRY_STORE).exists():
        pytest.skip("this onnxruntime build starts no telemetry client, so there is nothing to switch off")
    home = tmp_path / "home_promptkd"
    tests_dir = os.path.dirname(__file__)
    _run_with_home(home, f"""
        import sys
        sys.path.insert(0, {tests_dir!r})
        from pathlib import Path
        from deploy_models import colour_image, save_colour_student
        from promptkd.cli import main
        root = Path({str(tmp_path)!r})
        student = save_colour_student(root / "student")
        (root / "imgs").mkdir()
        image = colour_image(root / "imgs" / "a.png", "blue")
        assert main(["export", "--student", str(student), "--format", "onnx", "--quantize", "int8",
                     "--calibration", str(root / "imgs"), "--out", str(root / "s8.onnx")]) == 0
        assert main(["predict", str(image), "--student", str(root / "s8.onnx")]) == 0
    """)
    assert not (home / _TELEMETRY_STORE).exists() and (tmp_path / "s8.onnx").is_file()


def test_import_onnxruntime_switches_events_off(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    from promptkd.runtime import import_onnxruntime

    calls = []
    monkeypatch.setattr(ort, "disable_telemetry_events", lambda: calls.append(1))
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY", raising=False)
    assert import_onnxruntime() is ort
    assert calls == [1] and os.environ["ORT_DISABLE_TELEMETRY"] == "1"


def test_serving_auto_without_real_check_images_stays_fp32(tmp_path, monkeypatch):
    from deploy_models import save_colour_student
    from promptkd.runtime import load_predictor

    student = save_colour_student(tmp_path / "student")
    path = tmp_path / "cpuinfo"
    path.write_text(WITH_BF16)
    real = prec.native_bf16
    monkeypatch.setattr(prec, "native_bf16", lambda device="cpu", cpuinfo=None, _p=path: real(device, _p))
    served = load_predictor(student, precision="auto", backend="torch")  # a server: no images to check on
    assert served.info.precision == "fp32" and "none were given" in " ".join(served.info.notes)


def test_auto_needs_enough_check_images_to_choose_bf16(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(WITH_BF16)
    logits = torch.randn(prec.MIN_CHECK_IMAGES, 5)
    few = prec.resolve_precision("auto", check=lambda p: logits[:10], cpuinfo=cpuinfo)
    assert few.precision == "fp32" and f"only 10 image(s) to check bf16 against fp32 (it needs {prec.MIN_CHECK_IMAGES})" \
        in few.reason
    enough = prec.resolve_precision("auto", check=lambda p: logits, cpuinfo=cpuinfo)
    assert enough.precision == "bf16" and "100.0%" in enough.reason
