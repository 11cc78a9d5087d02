"""Measure this machine's CPU and write a hardware profile a user can start from.

`kiln profile-host -o my-cpu.yaml` times, with the threads this process may use: fp32 GEMM
(and bf16 GEMM and int8 `torch._int_mm` where the CPU runs them), copy bandwidth (bytes read
plus written), and the fixed cost of one tiny op (the launch overhead the cost model adds per
kernel). Each figure is the best of several timed rounds, since this is a ceiling, not a
typical speed. The YAML is checked by kiln's strict profile loader before it is written.
"""

from __future__ import annotations

import datetime
import platform
import time
from pathlib import Path

import torch

from kiln.host import host_fingerprint, usable_cores


def _best_seconds(fn, seconds: float, rounds_min: int = 3) -> float:
    fn()  # warm-up: allocation, thread pool start, kernel selection
    best, deadline, rounds = float("inf"), time.perf_counter() + seconds, 0
    while rounds < rounds_min or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        rounds += 1
    return best


def gemm_tflops(dtype: torch.dtype, size: int, seconds: float) -> float | None:
    """Peak-ish GEMM rate at `dtype` (TOPS for int8), or None when this CPU cannot run it."""
    try:
        if dtype == torch.int8:
            a = torch.randint(-64, 64, (size, size), dtype=torch.int8)
            b = torch.randint(-64, 64, (size, size), dtype=torch.int8)
            fn = lambda: torch._int_mm(a, b)  # noqa: E731
        else:
            a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
            fn = lambda: torch.mm(a, b)  # noqa: E731
        return 2 * size**3 / _best_seconds(fn, seconds) / 1e12
    except RuntimeError:  # no kernel for this dtype here
        return None


def copy_gbs(megabytes: int, seconds: float) -> float:
    source = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32).normal_()
    target = torch.empty_like(source)
    return 2 * source.numel() * 4 / _best_seconds(lambda: target.copy_(source), seconds) / 1e9


def launch_overhead_us(seconds: float) -> float:
    x = torch.ones(1)
    calls = 200

    def many():
        for _ in range(calls):
            torch.add(x, x)

    return _best_seconds(many, seconds) / calls * 1e6


def measure(seconds: float = 0.5, gemm_size: int = 1024, copy_mb: int = 64) -> dict:
    threads = usable_cores()
    torch.set_num_threads(threads)
    peaks = {"fp32": gemm_tflops(torch.float32, gemm_size, seconds)}
    for name, dtype in (("bf16", torch.bfloat16), ("int8", torch.int8)):
        peaks[name] = gemm_tflops(dtype, gemm_size, seconds)
    return {"threads": threads, "peaks": {k: v for k, v in peaks.items() if v}, "copy_gbs": copy_gbs(copy_mb, seconds),
            "launch_overhead_us": launch_overhead_us(seconds)}


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 8.0


def _backends() -> list[str]:
    from kiln.backends import registry

    names = []
    for name in ("onnxruntime", "inductor", "openvino"):
        try:
            if registry.get(name).available().ok:
                names.append(name)
        except Exception:  # a backend kiln does not have yet is simply not listed
            continue
    return names or ["onnxruntime"]


def profile_yaml(name: str, figures: dict) -> str:
    today = datetime.date.today().isoformat()
    peaks = "\n".join(f"      {p}: {v:.4g}" for p, v in figures["peaks"].items())
    features = ", ".join(host_fingerprint()["cpu_flags"])
    return f"""# Measured on this machine by `kiln profile-host` ({today}), {figures['threads']} threads.
# Figures are best-of-rounds ceilings; edit them if this machine was busy while measuring.
name: {name}
description: {cpu_model()} measured by kiln profile-host, {figures['threads']} threads
primary_device: cpu
select: measure
devices:
  cpu:
    kind: cpu
    model: "{cpu_model()}"
    cores: {figures['threads']}
    # source: /proc/meminfo MemTotal
    memory_gb: {_memory_gb()}
    # source: measured, float32 copy (bytes read + written)
    memory_bandwidth_gbs: {figures['copy_gbs']:.4g}
    # source: measured GEMM ({'fp32, bf16 torch.mm; int8 torch._int_mm (TOPS)'})
    peak_tflops:
{peaks}
    # source: measured, one tiny torch op
    launch_overhead_us: {figures['launch_overhead_us']:.3g}
    features: [{features}]
    backends: [{', '.join(_backends())}]
"""


def write_profile(path: Path, name: str | None = None, seconds: float = 0.5, gemm_size: int = 1024, copy_mb: int = 64) -> Path:
    """Measure, render, validate with the strict loader, then write `path`."""
    from kiln.hardware_profiles.schema import load

    path = Path(path)
    text = profile_yaml(name or path.stem, measure(seconds, gemm_size, copy_mb))
    staging = path.with_name(path.name + ".partial.yaml")
    staging.write_text(text)
    try:
        load(staging)
    except Exception:
        staging.unlink(missing_ok=True)
        raise
    staging.replace(path)
    return path
