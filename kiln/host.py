"""Facts about the machine kiln runs on: the cores this process may use and a fingerprint of
the CPU features that change which kernels (and precisions) win. Manifests, the compile cache
and host profiling all read them here."""

from __future__ import annotations

import os
import platform
from pathlib import Path

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
