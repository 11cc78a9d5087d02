"""Facts about the machine kiln runs on: the cores this process may use and a fingerprint of
the CPU features that change which kernels (and precisions) win. Manifests, the compile cache
and host profiling all read them here."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# PyTorch's OpenMP runtime (libgomp) keeps its idle worker threads spinning for GOMP_SPINCOUNT
# pauses after each parallel op (300,000 by default: about 6 ms on the 2-core EPYC kiln is
# measured on) before they sleep. In a compiled model where a partition PyTorch runs (the eager
# partition, Inductor) hands over to OpenVINO or ONNX Runtime, those spinning threads hold the
# cores the next runtime's threads need: an OpenVINO partition ran 7.6 ms after an eager one and
# 3.8 ms alone, and 4.7 ms after it with GOMP_SPINCOUNT=10000 (about 0.2 ms of spinning).
# libgomp reads the variable once, when it loads; kiln sets it on import when nothing has loaded
# libgomp yet and the user has not chosen a wait policy (KILN_OPENMP_SPIN=keep leaves it alone).
SHORT_OPENMP_SPIN = "10000"
OPENMP_POLICY_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def shorten_openmp_spin() -> bool:
    """Set GOMP_SPINCOUNT to SHORT_OPENMP_SPIN for libgomp to read when it loads; True when set."""
    if os.environ.get("KILN_OPENMP_SPIN") == "keep" or any(v in os.environ for v in OPENMP_POLICY_VARIABLES):
        return False
    if openmp_loaded():
        return False
    os.environ["GOMP_SPINCOUNT"] = SHORT_OPENMP_SPIN
    return True


def openmp_loaded() -> bool:
    """Whether libgomp is already mapped into this process (its settings then fixed)."""
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return True  # unknown: assume too late


def openmp_spin_note(backends: set[str]) -> str | None:
    """A note for a compiled model whose partitions alternate between PyTorch and another CPU
    runtime while libgomp spins its default long while; None where that does not apply."""
    torch_run = backends & {"eager", "inductor"}
    others = backends & {"openvino", "onnxruntime"}
    if not (torch_run and others) or any(v in os.environ for v in OPENMP_POLICY_VARIABLES):
        return None
    return (f"partitions run by PyTorch ({', '.join(sorted(torch_run))}) hand over to {', '.join(sorted(others))}, and "
            "PyTorch's OpenMP threads spin for milliseconds after each of its ops, holding the cores the next runtime "
            f"needs: set GOMP_SPINCOUNT={SHORT_OPENMP_SPIN} (or import kiln before torch, which sets it) before "
            "PyTorch loads")


# CPU features that decide which kernels a runtime picks: recorded in artifacts and cache keys.
FINGERPRINT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "fma", "sve", "asimd")


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the whole machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def cpu_flags() -> list[str]:
    """The FINGERPRINT_FLAGS this CPU reports in /proc/cpuinfo (none where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(set(line.split(":", 1)[1].split()) & set(FINGERPRINT_FLAGS))
    except OSError:
        pass
    return []


def host_fingerprint() -> dict:
    return {"machine": platform.machine(), "system": platform.system(), "cpu_flags": cpu_flags()}
