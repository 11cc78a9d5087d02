"""The plan data that flows from the passes to the backends and into the artifact.

Passes annotate graph nodes (node.meta[DECISION_META] holds a NodeDecision, weighted layers
carry a LayerPlan under LAYER_META); partitioning gathers them into a PartitionPlan of
Partitions, each holding a PartitionGraph with its PrecisionPlan; backends compile
PartitionGraphs; the artifact stores the PartitionPlan and each PrecisionPlan as JSON. These
are plain data with no behaviour beyond (de)serialising, so every layer of kiln can read them
and none has to import the code that produces them.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import asdict, dataclass, field, replace

import torch

from kiln.types import Precision

DECISION_META = "kiln"  # node.meta key holding a NodeDecision (precision, device, backend, reasons)
LAYER_META = "kiln_layer"  # node.meta key holding a weighted layer's LayerPlan

# Every backend name kiln knows, in no order of preference (profiles give the order).
BACKEND_NAMES: tuple[str, ...] = ("onnxruntime", "inductor", "openvino", "tensorrt", "eager")
# PyTorch itself: the backend of partitions whose ops no other backend supports.
EAGER = "eager"


class Scheme(str, enum.Enum):
    """How a layer is computed at its precision. The values are the names the report, the
    artifact and the backends use; a Scheme compares and hashes equal to its value."""

    FP32 = "fp32"
    BF16 = "bf16"  # weights and activations bf16, fp32 accumulation
    FP16 = "fp16"  # weights and activations fp16, fp32 accumulation
    FP8 = "fp8-e4m3"  # per-tensor scaled e4m3 weights and activations
    INT8_STATIC = "int8-static"  # per-channel int8 weights, calibrated per-tensor uint8 activations
    INT8_DYNAMIC = "int8-dynamic"  # per-channel int8 weights, activations quantised per call
    INT4_WEIGHT = "int4-weight"  # group-wise uint4 weights with zero points, float activations

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__

    @property
    def precision(self) -> Precision:
        return SCHEME_PRECISION[self]


SCHEME_PRECISION = {Scheme.FP32: Precision.FP32, Scheme.BF16: Precision.BF16, Scheme.FP16: Precision.FP16,
                    Scheme.FP8: Precision.FP8, Scheme.INT8_STATIC: Precision.INT8, Scheme.INT8_DYNAMIC: Precision.INT8,
                    Scheme.INT4_WEIGHT: Precision.INT4}


@dataclass(frozen=True)
class LayerPlan:
    """One weighted layer's scheme and what it cost. Plain JSON data, so it crosses into
    isolated build processes and into the artifact's report."""

    node: str  # fx node name in the captured graph (ONNX nodes record it as their fx_node)
    op: str  # "linear" | "conv"
    weight: str  # the weight's attribute name: stable through re-export, the ONNX initializer name
    scheme: Scheme = Scheme.FP32
    error: float = 0.0  # relative L2 error of the model output with only this layer lowered
    reason: str = ""
    input_range: tuple[float, float] | None = None  # calibrated activation range (static int8)
    group_size: int | None = None  # int4 weight-only
    # static int8: per output channel, the mean shift the rounding put on the layer's output over
    # the calibration samples; the lowering subtracts it from the bias (bias correction)
    bias_shift: tuple[float, ...] | None = None
    # static int8 linear: per input feature, the factor its input is divided by and its weight's
    # column multiplied by before rounding (smoothing an activation's outlier features into the
    # weight, as SmoothQuant does), or None; the lowering inserts the division
    smooth: tuple[float, ...] | None = None
    # structured sparsity (assign_sparsity): the pattern its weight is pruned to ("2:4"), or None;
    # the relative L2 error of the model output with only this layer pruned (on top of its
    # scheme), and why it was or was not pruned
    sparsity: str | None = None
    sparsity_error: float = 0.0
    sparsity_reason: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", Scheme(self.scheme))  # a name read back from JSON

    @property
    def precision(self) -> Precision:
        return SCHEME_PRECISION[self.scheme]

    def at_fp32(self, reason: str, **changes) -> "LayerPlan":
        """This layer kept at fp32 for `reason`, with nothing of a lowering left on it: dense too,
        since sparse tensor cores take 2:4 weights only at lower precisions."""
        if self.sparsity:
            changes = {"sparsity": None, "sparsity_reason": f"kept dense: back at fp32 ({reason})", **changes}
        return replace(self, scheme=Scheme.FP32, reason=reason, input_range=None, group_size=None, bias_shift=None, smooth=None,
                       **changes)

    def at_float(self, scheme: Scheme, reason: str) -> "LayerPlan":
        """This layer at float `scheme` (bf16, fp16), with no integer lowering left on it."""
        return replace(self, scheme=scheme, reason=reason, input_range=None, group_size=None, bias_shift=None, smooth=None)

    def report_row(self) -> dict:
        """to_dict without the per-channel vectors (bias correction, smoothing) the lowering reads:
        the report's precision table says that they were applied, in `reason`."""
        return {k: v for k, v in self.to_dict().items() if k not in ("bias_shift", "smooth")}

    def to_dict(self) -> dict:
        data = asdict(self)
        data["scheme"] = self.scheme.value
        for key in ("input_range", "bias_shift", "smooth"):
            data[key] = None if data[key] is None else list(data[key])  # as JSON reads it back
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LayerPlan":
        data = dict(data)
        for key in ("input_range", "bias_shift", "smooth"):
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

    @property
    def sparse(self) -> list[LayerPlan]:
        """The layers whose weights are pruned to a structured sparsity pattern."""
        return [layer for layer in self.layers if layer.sparsity]

    @property
    def lossy(self) -> bool:
        """Whether the plan changes answers (a lowered precision or pruned weights): verification
        then answers to the accuracy budget."""
        return bool(self.lowered or self.sparse)

    def schemes(self) -> set[Scheme]:
        return {layer.scheme for layer in self.lowered}

    def by_scheme(self, scheme: Scheme) -> list[LayerPlan]:
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


@dataclass
class PartitionGraph:
    """What a backend compiles: an fx graph over named flat tensors, with example values."""

    name: str
    gm: torch.fx.GraphModule
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    example_inputs: tuple[torch.Tensor, ...]
    dynamic_shapes: tuple | None  # torch.export dynamic_shapes for gm's parameters
    precision: PrecisionPlan = field(default_factory=PrecisionPlan)  # per-layer schemes to lower
    calibration: tuple[tuple[torch.Tensor, ...], ...] = ()  # flat samples for static quantisation


@dataclass
class Partition:
    """One run of the graph on one device, with the backend placement chose and the one built."""

    graph: PartitionGraph
    device: str
    backend: str = ""  # filled in by backend selection
    placed_backend: str = ""  # what placement chose (EAGER for the PyTorch fallback)
    device_kind: str = "cpu"
    estimated_ms: float | None = None

    @property
    def name(self) -> str:
        return self.graph.name


@dataclass
class PartitionPlan:
    """The placed graph cut into partitions, in the order they run."""

    partitions: list[Partition]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    notes: list[str] = field(default_factory=list)
    output_sources: tuple[str, ...] = ()  # the value each model output reads; () means output_names
    placement: list[dict] = field(default_factory=list)  # one record per op node, for reports

    def sources(self) -> tuple[str, ...]:
        return self.output_sources or self.output_names

    def to_dict(self) -> dict:
        return {"input_names": list(self.input_names), "output_names": list(self.output_names),
                "output_sources": list(self.sources()),
                "partitions": [{"name": p.name, "device": p.device, "device_kind": p.device_kind, "backend": p.backend,
                                "placed_backend": p.placed_backend, "estimated_ms": p.estimated_ms,
                                "inputs": list(p.graph.input_names), "outputs": list(p.graph.output_names)}
                               for p in self.partitions]}


def op_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    """How many nodes of each ATen op `gm` calls (the report's per-partition op mix)."""
    counts = collections.Counter(str(n.target).replace("aten.", "") for n in gm.graph.nodes if n.op == "call_function")
    return dict(counts)
