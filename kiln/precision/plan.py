"""The precision plan: which weighted layer runs in which numeric scheme, and what it cost.

`assign_precision` writes one LayerPlan per weighted layer into the node's meta; the partition
step gathers them into a PrecisionPlan per partition; backends lower the plan (ONNX Runtime
quantization tools, PT2E, casts) and the report prints it as the per-layer table. Plain JSON
data, so it crosses into isolated build processes and into the artifact's report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from kiln.types import Precision

LAYER_META = "kiln_layer"  # node.meta key holding a LayerPlan


class Scheme:
    """How a layer is computed at its precision (names as the report and backends use them)."""

    FP32 = "fp32"
    BF16 = "bf16"  # weights and activations bf16, fp32 accumulation
    FP16 = "fp16"  # weights and activations fp16, fp32 accumulation
    FP8 = "fp8-e4m3"  # per-tensor scaled e4m3 weights and activations
    INT8_STATIC = "int8-static"  # per-channel int8 weights, calibrated per-tensor uint8 activations
    INT8_DYNAMIC = "int8-dynamic"  # per-channel int8 weights, activations quantised per call
    INT4_WEIGHT = "int4-weight"  # group-wise uint4 weights with zero points, float activations


SCHEME_PRECISION = {Scheme.FP32: Precision.FP32, Scheme.BF16: Precision.BF16, Scheme.FP16: Precision.FP16,
                    Scheme.FP8: Precision.FP8, Scheme.INT8_STATIC: Precision.INT8, Scheme.INT8_DYNAMIC: Precision.INT8,
                    Scheme.INT4_WEIGHT: Precision.INT4}


@dataclass(frozen=True)
class LayerPlan:
    node: str  # fx node name in the captured graph (ONNX nodes record it as their fx_node)
    op: str  # "linear" | "conv"
    weight: str  # the weight's attribute name: stable through re-export, the ONNX initializer name
    scheme: str = Scheme.FP32
    error: float = 0.0  # relative L2 error of the model output with only this layer lowered
    reason: str = ""
    input_range: tuple[float, float] | None = None  # calibrated activation range (static int8)
    group_size: int | None = None  # int4 weight-only
    # static int8: per output channel, the mean shift the rounding put on the layer's output over
    # the calibration samples; the lowering subtracts it from the bias (bias correction)
    bias_shift: tuple[float, ...] | None = None

    @property
    def precision(self) -> Precision:
        return SCHEME_PRECISION[self.scheme]

    def at_fp32(self, reason: str, **changes) -> "LayerPlan":
        """This layer kept at fp32 for `reason`, with nothing of a lowering left on it."""
        return replace(self, scheme=Scheme.FP32, reason=reason, input_range=None, group_size=None, bias_shift=None, **changes)

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("input_range", "bias_shift"):
            data[key] = None if data[key] is None else list(data[key])  # as JSON reads it back
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LayerPlan":
        data = dict(data)
        for key in ("input_range", "bias_shift"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


@dataclass
class PrecisionPlan:
    """The layers of one partition with their schemes; `lowered` are those not at fp32."""

    layers: list[LayerPlan] = field(default_factory=list)
    observer: str = "minmax"

    @property
    def lowered(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.scheme != Scheme.FP32]

    def schemes(self) -> set[str]:
        return {layer.scheme for layer in self.lowered}

    def by_scheme(self, scheme: str) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.scheme == scheme]

    def lowest(self) -> Precision:
        """The least precise precision used, for the tolerance of element-wise checks."""
        order = [Precision.INT4, Precision.FP8, Precision.INT8, Precision.BF16, Precision.FP16, Precision.FP32]
        used = {layer.precision for layer in self.layers} | {Precision.FP32}
        return next(p for p in order if p in used)

    def to_dict(self) -> dict:
        return {"layers": [layer.to_dict() for layer in self.layers], "observer": self.observer}

    @classmethod
    def from_dict(cls, data: dict | None) -> "PrecisionPlan":
        if not data:
            return cls()
        return cls([LayerPlan.from_dict(d) for d in data["layers"]], data.get("observer", "minmax"))
