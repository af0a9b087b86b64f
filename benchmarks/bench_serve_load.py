"""A bounded load test of `promptkd serve` on localhost: N requests at concurrency C.

Starts `promptkd serve MODEL` as a subprocess on a free 127.0.0.1 port (the command a user runs), waits
for /health, then sends exactly --requests POST /predict requests (multipart, --images-per-request PNGs
each) from --concurrency client threads, and stops the server. Reports errors (non-200 answers or
failed connections), latency p50/p90/p99 and images/s over the whole run. Nothing but 127.0.0.1 is
contacted; the run stops after --requests requests or --max-seconds, whichever comes first.

    .venv/bin/python benchmarks/bench_serve_load.py /tmp/demo_run/student --requests 400 --concurrency 8
"""

from __future__ import annotations

import argparse
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_images(n: int, size: int, seed: int = 0) -> list[bytes]:
    """Smooth random RGB PNGs (distinct contents, realistic compressed size)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def main() -> None:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="student folder, bundle or .onnx file")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=256, help="side of the PNGs sent (pixels)")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop sending after this long")
    parser.add_argument("--serve-args", default="", help="extra arguments for promptkd serve (one string)")
    parser.add_argument("--out", help="write the figures as JSON")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "promptkd", "serve", args.model, "--port", str(port), "--log-level", "warning",
           *args.serve_args.split()]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while True:
            try:
                health = httpx.get(f"{url}/health", timeout=5).json()
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the server did not start:\n{server.stdout.read() if server.stdout else ''}") from None
                time.sleep(0.25)
        images = test_images(32, args.image_size)
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        stop_at = time.time() + args.max_seconds
        client = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=args.concurrency))

        def one(i: int) -> None:
            if time.time() > stop_at:
                return
            files = [("files", (f"img{i}_{j}.png", images[(i + j) % len(images)], "image/png"))
                     for j in range(args.images_per_request)]
            t = time.perf_counter()
            try:
                r = client.post(f"{url}/predict", files=files)
                ok = r.status_code == 200 and len(r.json()["predictions"]) == args.images_per_request
                problem = None if ok else f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            dt = time.perf_counter() - t
            with lock:
                if problem:
                    errors.append(problem)
                else:
                    latencies.append(dt)

        one(-1)  # warm-up request, not counted
        latencies.clear()
        errors.clear()
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - start
        served = httpx.get(f"{url}/health", timeout=10).json()["served"]
        client.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    lat = np.array(latencies) * 1000
    done = len(latencies)
    report = {
        "model": health["model"]["name"], "backend": health["model"]["backend"],
        "precision": health["model"]["precision"], "requests": args.requests, "completed": done,
        "errors": len(errors), "concurrency": args.concurrency, "images_per_request": args.images_per_request,
        "image_size": args.image_size, "wall_s": round(wall, 2),
        "requests_per_s": round(done / wall, 2), "images_per_s": round(done * args.images_per_request / wall, 2),
        "latency_ms": {p: round(float(np.percentile(lat, q)), 1) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))}
        if done else {},
        "server_forward_passes": served["forward_passes"], "server_images": served["images"],
        "mean_images_per_pass": round(served["images"] / max(served["forward_passes"], 1), 2),
        "first_errors": errors[:5],
    }
    print(f"{done}/{args.requests} requests OK, {len(errors)} errors, concurrency {args.concurrency}: "
          f"{report['images_per_s']} images/s, latency p50 {report['latency_ms'].get('p50')} ms, "
          f"p99 {report['latency_ms'].get('p99')} ms ({report['mean_images_per_pass']} images per forward pass)")
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
