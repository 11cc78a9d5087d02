#!/usr/bin/env bash
# kiln's GPU checks in one run, for a machine with an NVIDIA GPU: the CUDA tests (Inductor on
# CUDA, with 2:4 semi-structured sparse weights too; TensorRT when installed, with Polygraphy's
# layer-by-layer report on a mismatch), the TensorRT API check against the installed tensorrt,
# and bench/gpu_peers.py. Everything lands in one folder: the date, nvidia-smi, the Python
# stack, a log and JUnit XML per step, the benchmark's table, and summary.md (one row per step
# with its exit code and seconds).
#
#   scripts/gpu_check.sh [FOLDER] [--quick] [--install] [--bench-args "ARGS"]
#
# FOLDER defaults to $OUT when set, else ./gpu-results. --quick runs the benchmark on one model
# at batch 1 (minutes, not tens of minutes). --install first pip-installs tensorrt and
# polygraphy into the Python used (needs the network). PYTHON picks the interpreter (default
# .venv/bin/python, else python3); it needs a CUDA build of torch, or every test skips.
# Every step runs even when one before it failed; the exit code is 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

folder="${OUT:-./gpu-results}"
quick=0
install=0
bench_args=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --install) install=1 ;;
        --bench-args) shift; bench_args="${1:-}" ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) folder="$1" ;;
    esac
    shift
done
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$folder"
folder="$(cd "$folder" && pwd)"
summary="$folder/summary.md"
failed=0
device=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | paste -sd ';' -)
[ -n "$device" ] || device="no NVIDIA GPU found (nvidia-smi missing or failing)"

{
    echo "# kiln GPU check"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "- device: $device"
    echo "- python: $PYTHON"
    echo
    echo "| step | exit | seconds | log |"
    echo "| --- | --- | --- | --- |"
} > "$summary"
date -u '+%Y-%m-%dT%H:%M:%SZ' > "$folder/date.txt"
nvidia-smi > "$folder/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed or is missing" >> "$folder/nvidia-smi.txt"

step() {  # step NAME COMMAND...: run it, log it, add its row
    local name="$1"
    shift
    local log="$folder/$name.log"
    local start end code
    start=$(date +%s)
    echo "== $name: $*" | tee "$log"
    "$@" >> "$log" 2>&1
    code=$?
    end=$(date +%s)
    echo "| $name | $code | $((end - start)) | $name.log |" >> "$summary"
    echo "== $name: exit $code after $((end - start)) s"
    [ "$code" -eq 0 ] || failed=1
    return 0
}

if [ "$install" -eq 1 ]; then
    step install "$PYTHON" -m pip install tensorrt polygraphy
fi
step environment "$PYTHON" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "compute capability", torch.cuda.get_device_capability())
for name in ("tensorrt", "polygraphy", "onnx", "onnxruntime"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError as exc:
        print(name, "missing:", exc)
EOF
# kiln's TensorRT calls against the tensorrt installed here (skipped without one)
if "$PYTHON" -c "import tensorrt" >/dev/null 2>&1; then
    step tensorrt-api "$PYTHON" kiln/backends/tensorrt_api.py
fi
step tests "$PYTHON" -m pytest -p no:cacheprovider -rs -v --junitxml="$folder/tests.xml" \
    tests/backends/test_inductor_cuda.py tests/backends/test_tensorrt.py tests/backends/test_tensorrt_precision.py \
    tests/backends/test_tensorrt_conformance.py tests/backends/test_inductor_cuda_sparsity.py tests/backends/test_sparse_lowerings.py
if [ "$quick" -eq 1 ] && [ -z "$bench_args" ]; then
    bench_args="--models minilm --batches 1 --rounds 1 --iters 5"
fi
# shellcheck disable=SC2086  # the benchmark's own arguments, split as given
step gpu-peers "$PYTHON" bench/gpu_peers.py $bench_args --out "$folder/gpu_peers.md"

echo >> "$summary"
echo "Skipped tests and their reasons are in tests.log (pytest -rs); the benchmark's table is gpu_peers.md." >> "$summary"
cat "$summary"
exit "$failed"
