"""Which precisions a target can run, and which ones kiln's backends lower well there.

The device's own list is its profile's `peak_tflops` keys: kiln never assigns a precision the
device has no throughput figure for. Weight-only int4 is the exception that proves the rule:
it stores weights in 4 bits but computes in the device's float type, so it needs a backend
kernel (ONNX Runtime's MatMulNBits, PyTorch's int4pack matmul), not int4 math units.

Backend figures (what runs *fast*, not merely correctly), per device kind:
- ONNX Runtime on CPU: fp32; int8 (QDQ static, dynamic; VNNI kernels); int4 weight-only
  (MatMulNBits). Its CPU provider has no bf16 kernels and few fp16 ones (fp16 graphs fall
  back to casts around fp32 kernels), so neither is offered there. On GPU, fp16 as well.
- Inductor on CPU: fp32, bf16 (oneDNN, fp32 accumulation), int8 (PT2E X86InductorQuantizer),
  int4 weight-only (PyTorch's packed int4 CPU matmul, the kernel torchao uses there).
- OpenVINO: fp32, bf16, fp16 through its INFERENCE_PRECISION_HINT (see `openvino_hint`); static
  int8 from QDQ nodes in an ONNX model (its low-precision transformations, VNNI kernels on CPU).
"""

from __future__ import annotations

from pathlib import Path

from kiln.errors import OptionsError
from kiln.hardware_profiles.schema import DeviceSpec, Profile
from kiln.types import DeviceKind, Precision

FLOATS_BELOW_FP32 = (Precision.BF16, Precision.FP16, Precision.FP8)
BACKEND_PRECISIONS: dict[str, dict[DeviceKind, frozenset[Precision]]] = {
    "onnxruntime": {DeviceKind.CPU: frozenset({Precision.FP32, Precision.INT8, Precision.INT4}),
                    DeviceKind.GPU: frozenset({Precision.FP32, Precision.FP16, Precision.INT8, Precision.INT4})},
    "inductor": {DeviceKind.CPU: frozenset({Precision.FP32, Precision.BF16, Precision.INT8, Precision.INT4}),
                 DeviceKind.GPU: frozenset({Precision.FP32, Precision.BF16, Precision.FP16})},
    "openvino": {kind: frozenset({Precision.FP32, Precision.BF16, Precision.FP16, Precision.INT8}) for kind in DeviceKind},
    "tensorrt": {DeviceKind.GPU: frozenset({Precision.FP32, Precision.FP16, Precision.BF16, Precision.INT8, Precision.FP8})},
}


def device_runs(device: DeviceSpec, precision: Precision) -> bool:
    if precision is Precision.INT4:  # weight-only: dequantised into the device's float math
        return bool(device.precisions & {Precision.FP32, Precision.BF16, Precision.FP16}) or precision in device.precisions
    return precision in device.precisions


def backend_runs(backend: str, device: DeviceSpec, precision: Precision) -> bool:
    return precision in BACKEND_PRECISIONS.get(backend, {}).get(device.kind, frozenset())


def check_requested(profile: Profile, precision: Precision, backend: str | None) -> None:
    """Refuse a precision the profile's primary device (or the named backend there) cannot run."""
    device = profile.primary
    runs = sorted(p.value for p in device.precisions)
    if not device_runs(device, precision):
        raise OptionsError(f"profile {profile.name}'s device {device.name} ({device.model}) does not run "
                           f"{precision.value}; it runs {', '.join(runs)}",
                           where=f"{Path(profile.source_file).name}: devices.{device.name}.peak_tflops",
                           fix=f"choose one of {', '.join(runs)}, or precision='auto'")
    names = (backend,) if backend else device.backends
    if precision is not Precision.FP32 and not any(backend_runs(b, device, precision) for b in names):
        able = sorted({b for b in BACKEND_PRECISIONS if backend_runs(b, device, precision)})
        raise OptionsError(f"no backend tried for device {device.name} ({', '.join(names)}) runs {precision.value} "
                           f"on a {device.kind.value}",
                           where="options.backend" if backend else f"{Path(profile.source_file).name}: devices.{device.name}.backends",
                           fix=(f"use backend={able[0]!r}" if able else "choose another precision") + ", or precision='auto'")


def auto_candidates(device: DeviceSpec, backends: tuple[str, ...], calibrated: bool) -> list[Precision]:
    """Precisions "auto" may assign, fastest first by the device's peak figures: those the device
    and at least one tried backend run, integer types only with calibration data. Weight-only
    int4 is left to explicit requests: it pays on memory-bound decoding, not on math."""
    found = []
    for precision in (Precision.INT8, *FLOATS_BELOW_FP32):
        if precision.is_integer and not calibrated:
            continue
        if device_runs(device, precision) and any(backend_runs(b, device, precision) for b in backends):
            found.append(precision)
    return sorted(found, key=lambda p: -device.peak_tflops.get(p, 0.0))


def openvino_hint(precision: Precision) -> str | None:
    """The value of OpenVINO's INFERENCE_PRECISION_HINT for a float precision kiln assigned.
    None for integer types: OpenVINO runs those from the model's own quantisation (QDQ nodes),
    not from a hint; and for fp8, which its CPU and GPU plugins do not take as a hint."""
    return {Precision.FP32: "f32", Precision.BF16: "bf16", Precision.FP16: "f16"}.get(precision)
