#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with the CPU torch wheel,
# promptkd and its test/demo extras, and the Fashion-MNIST files the demo reads (Debian package).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first and pinned: this version is a local CPU wheel here; an unpinned torch pulls a CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "warning: could not install dataset-fashion-mnist (the demo needs it)" >&2
  else
    echo "note: the demo needs Fashion-MNIST: sudo apt-get install dataset-fashion-mnist" >&2
  fi
fi
# headless Chromium + its driver for the served page's browser test (tests/test_server.py)
if ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null \
      || echo "warning: could not install chromium/chromium-driver (the browser test will be skipped)" >&2
  else
    echo "note: the browser test needs headless Chromium: sudo apt-get install chromium chromium-driver" >&2
  fi
fi
echo "promptkd set up in .venv"
