"""`promptkd serve`: the JSON API, its limits and errors, batching, the CLI on a real port, and the page.

The colour student (tests/deploy_models.py) answers by construction: a red image is "red"."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deploy_models import CLASSES, colour_image, save_colour_student

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from promptkd.runtime import load_predictor  # noqa: E402
from promptkd.server import ServeConfig, create_app  # noqa: E402


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return save_colour_student(tmp_path_factory.mktemp("serve") / "student")


@pytest.fixture(scope="module")
def predictor(student):
    return load_predictor(student, precision="fp32")


def _png(colour: str, tmp_path: Path, seed: int = 0, size=(40, 40), noise: int = 20) -> bytes:
    return colour_image(tmp_path / f"{colour}{seed}.png", colour, size=size, seed=seed, noise=noise).read_bytes()


def test_health_classes_docs_and_page(predictor):
    with TestClient(create_app(predictor)) as client:
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["model"]["name"] == "student"
        assert health["model"]["num_classes"] == 3 and health["model"]["backend"] == "torch"
        assert health["model"]["identity"]["backbone"] == {"kind": "colour"}
        assert '"/' not in json.dumps(health), health  # no folder of this machine leaks to the network
        assert client.get("/classes").json() == {"num_classes": 3, "classes": [
            {"label": i, "class_name": n} for i, n in enumerate(CLASSES)]}
        spec = client.get("/openapi.json").json()
        body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
        assert {"multipart/form-data", "application/json"} <= set(body)
        docs = client.get("/docs")
        assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
        assert "http://" not in docs.text.replace("http://HOST:PORT", "") and "https://" not in docs.text  # offline
        for route in ("GET /health", "GET /classes", "POST /predict", "multipart/form-data", "top_k"):
            assert route in docs.text, route
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        html = page.text
        assert 'type="file"' in html and "predict" in html
        assert "http://" not in html and "https://" not in html and "<script src" not in html  # works offline


def test_multipart_and_base64_give_the_right_classes(predictor, tmp_path):
    with TestClient(create_app(predictor)) as client:
        files = [("files", (f"{c}.png", _png(c, tmp_path), "image/png")) for c in ("blue", "red", "green")]
        r = client.post("/predict", files=files, params={"top_k": 2})
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert [p["image"] for p in preds] == ["blue.png", "red.png", "green.png"]
        assert [p["top"][0]["class_name"] for p in preds] == ["blue", "red", "green"]
        assert all(len(p["top"]) == 2 and p["top"][0]["probability"] > p["top"][1]["probability"] for p in preds)
        # the same probabilities as the library's predictor on the same file
        ref = predictor.probabilities(predictor.preparer()([Image.open(io.BytesIO(_png("blue", tmp_path)))]))[0]
        assert preds[0]["top"][0]["probability"] == pytest.approx(float(ref.max()), abs=1e-6)
        data = base64.b64encode(_png("green", tmp_path, seed=3)).decode()
        r = client.post("/predict", json={"images": [{"name": "g.png", "data": data},
                                                     "data:image/png;base64," + data], "top_k": 1})
        assert r.status_code == 200, r.text
        assert [(p["image"], p["top"][0]["class_name"]) for p in r.json()["predictions"]] == [
            ("g.png", "green"), ("image-2", "green")]
        assert len(r.json()["predictions"][0]["top"]) == 1


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data: Pillow reads the size alone."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_bad_uploads_get_clear_4xx_and_the_server_keeps_serving(predictor, tmp_path):
    cfg = ServeConfig(max_upload_mb=0.05, max_images=2, max_pixels=100 * 100)
    good = [("files", ("red.png", _png("red", tmp_path), "image/png"))]
    with TestClient(create_app(predictor, cfg)) as client:
        def post(**kw):
            return client.post("/predict", **kw)

        cases = [
            (post(files=[("files", ("notes.txt", b"hello, not an image", "text/plain"))]), 400, "notes.txt: not an image"),
            (post(files=[("files", ("half.png", _png("red", tmp_path)[:60], "image/png"))]), 400, "half.png"),
            (post(files=[("files", ("empty.png", b"", "image/png"))]), 400, "empty.png: empty upload"),
            (post(files=[("files", ("big.png", _png("red", tmp_path, size=(200, 120), noise=0), "image/png"))]), 413,
             "big.png: 200x120 = 24,000 pixels; the limit is 10,000 (--max-pixels)"),
            (post(files=[("files", ("bomb.png", _png_header(30_000, 30_000), "image/png"))]), 413,
             "bomb.png: 30000x30000 = 900,000,000 pixels; the limit is 10,000 (--max-pixels)"),  # past Pillow's own
            (post(files=good * 3), 413, "3 images in one request; the limit is 2"),
            (post(content=b"x" * 60_000, headers={"content-type": "application/octet-stream"}), 413,
             "request body too large"),
            (post(content=b"abc", headers={"content-type": "text/plain"}), 415, "multipart/form-data or application/json"),
            (post(json={"images": ["%%% not base64"]}), 422, "image-1: not valid base64"),
            (post(json={"pictures": []}), 422, '"images"'),
            (post(json={"images": []}), 400, "no image in the request"),
            (post(files=good, params={"top_k": 0}), 422, "top_k must be a positive integer"),
        ]
        for response, status, message in cases:
            assert response.status_code == status, (status, response.text)
            assert message in response.json()["detail"], response.text
        r = post(files=good)
        assert r.status_code == 200 and r.json()["predictions"][0]["top"][0]["class_name"] == "red"


class _Recording:
    """A predictor wrapper that records the batch size of every forward pass (and can be slow)."""

    def __init__(self, inner, delay: float = 0.0):
        self.inner, self.delay, self.batches = inner, delay, []
        self.info = inner.info

    def preparer(self):
        return self.inner.preparer()

    def top_k(self, probs, k):
        return self.inner.top_k(probs, k)

    def probabilities(self, batch):
        self.batches.append(batch.shape[0])
        time.sleep(self.delay)
        return self.inner.probabilities(batch)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """uvicorn in a thread on a free localhost port."""

    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_concurrent_requests_are_batched_and_answered_correctly(predictor, tmp_path):
    import httpx

    recording = _Recording(predictor)
    app = create_app(recording, ServeConfig(max_batch=8, max_wait_ms=150))
    colours = ["red", "green", "blue"] * 4
    bodies = [_png(c, tmp_path, seed=i) for i, c in enumerate(colours)]
    with _Server(app) as url, ThreadPoolExecutor(12) as pool:
        def one(i):
            r = httpx.post(f"{url}/predict", files={"files": (f"{i}.png", bodies[i], "image/png")}, timeout=60)
            return r.status_code, r.json()["predictions"][0]["top"][0]["class_name"]

        results = list(pool.map(one, range(len(colours))))
    assert results == [(200, c) for c in colours]
    assert sum(recording.batches) == len(colours)
    assert max(recording.batches) <= 8 and len(recording.batches) < len(colours)  # requests shared passes


def test_a_full_queue_answers_503_and_recovers(predictor, tmp_path):
    import httpx

    slow = _Recording(predictor, delay=0.4)
    app = create_app(slow, ServeConfig(max_batch=1, max_wait_ms=0, max_pending=2))
    body = _png("blue", tmp_path)
    with _Server(app) as url, ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: httpx.post(f"{url}/predict", files={"files": ("b.png", body, "image/png")},
                                                   timeout=60).status_code, range(8)))
        assert set(codes) <= {200, 503} and codes.count(200) >= 2 and codes.count(503) >= 1
        assert max(slow.batches) == 1  # one image per pass, one pass at a time
        r = httpx.post(f"{url}/predict", files={"files": ("b.png", body, "image/png")}, timeout=60)
        assert r.status_code == 200 and r.json()["predictions"][0]["top"][0]["class_name"] == "blue"


def test_serve_command_on_a_real_port(student, tmp_path):
    """`promptkd serve` as a user starts it: a subprocess on a free port, an ONNX export of the student."""
    import httpx

    from promptkd.cli import main

    model = tmp_path / "student.onnx"
    assert main(["export", "--student", str(student), "--format", "onnx", "--out", str(model)]) == 0
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "promptkd", "serve", str(model), "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                health = httpx.get(f"{url}/health", timeout=5).json()
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"serve did not start: {proc.stdout.read() if proc.stdout else ''}") from None
                time.sleep(0.2)
        assert health["model"]["backend"] == "onnxruntime" and health["model"]["name"] == "student"
        r = httpx.post(f"{url}/predict", files={"files": ("r.png", _png("red", tmp_path), "image/png")}, timeout=30)
        assert r.json()["predictions"][0]["top"][0]["class_name"] == "red"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"on http://127.0.0.1:{port}/" in out


def test_serve_rejects_bad_settings(student, capsys):
    from promptkd.cli import main

    assert main(["serve", str(student), "--max-batch", "0"]) == 2
    assert "max_batch must be positive" in capsys.readouterr().err
    assert main(["serve", str(student) + ".missing"]) == 2


# --- the page in a real browser ---------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1000,800"]


def _chromium() -> tuple[str, str] | None:
    import shutil

    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed (Debian: apt-get install "
                                                 "chromium chromium-driver; scripts/setup.sh does it as root)")
def test_page_in_headless_chromium_shows_the_top_class(predictor, tmp_path):
    import os
    import shutil
    import tempfile

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium()
    os.environ.setdefault("SE_AVOID_STATS", "true")  # selenium-manager is not used (explicit driver), but be sure
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    image = colour_image(tmp_path / "a_green_thing.png", "green", size=(120, 90))
    with _Server(create_app(predictor)) as url:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            driver.set_page_load_timeout(60)
            driver.get(url + "/")
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: "3 classes" in d.find_element(By.ID, "model").text)
            assert "student" in driver.find_element(By.ID, "model").text
            driver.find_element(By.ID, "file").send_keys(str(image))
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#bars .row"))
            names = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#bars .class-name")]
            widths = [float(e.value_of_css_property("width").rstrip("px"))
                      for e in driver.find_elements(By.CSS_SELECTOR, "#bars .fill")]
            status = driver.find_element(By.ID, "status").text
            screenshot = tmp_path / "serve_page.png"
            driver.save_screenshot(str(screenshot))
        finally:
            driver.quit()
    assert names[0] == "green" and sorted(names) == sorted(CLASSES)
    assert widths[0] > 5 * max(widths[1:])  # the top bar dominates
    assert "a_green_thing.png: green" in status
    assert screenshot.stat().st_size > 5000 and Image.open(screenshot).size[0] >= 800
    keep = Path(os.environ.get("PROMPTKD_SCREENSHOT_DIR", tempfile.gettempdir())) / "promptkd_serve_page.png"
    shutil.copyfile(screenshot, keep)
    print(f"\nscreenshot of the served page: {keep}")
    assert json.loads(json.dumps(names))  # plain strings only
    assert np.isfinite(widths).all()
