#!/usr/bin/env bash
# Build, once, the virtual environment the real-Triton test runs in: nvidia-pytriton 0.7.0
# bundles a tritonserver 2.51 binary with its python backend, and needs numpy<2, so it cannot
# share kiln's own .venv. kiln is installed into it (editable, from this checkout) because the
# python backend's model.py runs in this environment's interpreter and imports kiln.
#
#   bash scripts/pytriton_env.sh        # prints the environment's python on the last line
#
# The environment lives under ~/.cache/kiln-test (KILN_PYTRITON_ENV overrides it).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
ENV=${KILN_PYTRITON_ENV:-$HOME/.cache/kiln-test/pytriton-venv}
PYTHON=${PYTHON:-python3}
if [ ! -f "$ENV/.base-ready" ]; then
  rm -rf "$ENV"
  mkdir -p "$(dirname "$ENV")"
  "$PYTHON" -m venv "$ENV"
  "$ENV/bin/python" -m pip install --quiet --upgrade pip
  # torch pinned to the CPU build first: an unpinned torch would pull a multi-GB CUDA build
  "$ENV/bin/python" -m pip install --quiet "torch==2.13.0"
  "$ENV/bin/python" -m pip install --quiet "nvidia-pytriton==0.7.0" "numpy<2"
  touch "$ENV/.base-ready"
fi
# kiln from this checkout; reinstalled when the environment points at another checkout
if [ "$("$ENV/bin/python" -c 'import kiln, pathlib; print(pathlib.Path(kiln.__file__).resolve().parent.parent)' 2>/dev/null)" != "$REPO" ]; then
  "$ENV/bin/python" -m pip install --quiet -e "$REPO" "numpy<2" "torch==2.13.0"
fi
"$ENV/bin/python" -c 'import kiln, torch, numpy, onnxruntime, pytriton' >&2
echo "$ENV/bin/python"
