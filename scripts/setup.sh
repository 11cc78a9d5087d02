#!/usr/bin/env bash
# Create .venv and install kiln with its examples, test tools and serving extra. torch is pinned first to the
# CPU build (2.13.0); an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[examples,test,pt2e,serve]"
python -c "import kiln, torch, onnxruntime; print(f'kiln {kiln.__version__} ready: torch {torch.__version__}, onnxruntime {onnxruntime.__version__}')"
