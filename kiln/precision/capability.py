"""Which precisions a device runs: its profile's `peak_tflops` keys. kiln never assigns a
precision the device has no throughput figure for. Weight-only int4 is the exception that
proves the rule: it stores weights in 4 bits but computes in the device's float type, so it
needs a backend kernel (ONNX Runtime's MatMulNBits, PyTorch's int4pack matmul), not int4 math
units. Which precisions each backend lowers well on a device kind is the backend's own
capability table (kiln.backends.base.CapabilityTable), asked through kiln.backends.registry.
"""

from __future__ import annotations

from kiln.hardware_profiles.schema import DeviceSpec
from kiln.types import Precision

FLOATS_BELOW_FP32 = (Precision.BF16, Precision.FP16, Precision.FP8)


def device_runs(device: DeviceSpec, precision: Precision) -> bool:
    if precision is Precision.INT4:  # weight-only: dequantised into the device's float math
        return bool(device.precisions & {Precision.FP32, Precision.BF16, Precision.FP16}) or precision in device.precisions
    return precision in device.precisions
