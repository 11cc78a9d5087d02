"""Small value types shared across kiln: precisions, device kinds, input specs, decisions."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


# Structured sparsity patterns kiln plans (kiln/passes/assign_sparsity.py): "2:4" keeps 2 of every
# 4 weights along a layer's reduction axis. Profiles name the patterns each device runs.
SPARSITY_PATTERNS = ("2:4",)


class Precision(enum.Enum):
    FP32 = "fp32"
    TF32 = "tf32"
    BF16 = "bf16"
    FP16 = "fp16"
    FP8 = "fp8"  # e4m3
    INT8 = "int8"
    INT4 = "int4"

    @classmethod
    def parse(cls, text: str) -> "Precision":
        key = text.lower()
        key = {"int4-weight": "int4", "fp8-e4m3": "fp8", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(key, key)
        try:
            return cls(key)
        except ValueError:
            known = ", ".join(p.value for p in cls)
            raise ValueError(f"unknown precision {text!r}; expected one of {known} (int4 is weight-only, also "
                             "spelled int4-weight), or 'auto'") from None

    @property
    def is_integer(self) -> bool:
        return self in (Precision.INT8, Precision.INT4)


class Auto(enum.Enum):
    """precision="auto": kiln picks each layer's precision within the accuracy budget."""

    AUTO = "auto"


class DeviceKind(enum.Enum):
    CPU = "cpu"
    GPU = "gpu"
    NPU = "npu"


# dtype names used in specs, manifests and the CLI; the only place strings map to dtypes.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_from_name(name: str) -> torch.dtype:
    aliases = {"float": "float32", "fp32": "float32", "half": "float16", "fp16": "float16",
               "bf16": "bfloat16", "long": "int64", "int": "int32", "double": "float64"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[key]


@dataclass(frozen=True)
class Dim:
    """A dynamic dimension: one name shared by every input that carries it, with a range."""

    name: str
    min: int = 1
    max: int = 4096

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"dynamic dim name {self.name!r} must be a Python identifier, e.g. 'batch' or 'seq_len'")
        if not (isinstance(self.min, int) and isinstance(self.max, int) and 0 <= self.min < self.max):
            raise ValueError(f"dynamic dim {self.name!r}: need 0 <= min < max, got min={self.min} max={self.max} "
                             "(for a fixed size, leave the axis out of `dynamic`)")


@dataclass(frozen=True)
class TensorSpec:
    """One flat tensor input: its name, dtype, and per-axis size (int) or dynamic Dim.

    `low`/`high` bound the values of integer inputs (token ids, masks) so that verification
    draws stay in the range the model saw, e.g. ids below the vocabulary size. `index_range`
    is the range of values the model can look up with the input (ids into an embedding table:
    0..rows-1), checked on every call; `mask` marks an input the model masks with (an
    attention_mask), which verification draws with padding, as real traffic has it.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int | Dim, ...]
    low: float | None = None
    high: float | None = None
    index_range: tuple[int, int] | None = None
    mask: bool = False

    def describe(self) -> str:
        dims = "x".join(f"{d.name}[{d.min}..{d.max}]" if isinstance(d, Dim) else str(d) for d in self.shape)
        return f"{self.name}: {DTYPE_NAMES.get(self.dtype, str(self.dtype))}[{dims}]"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "dtype": DTYPE_NAMES[self.dtype],
            "shape": [{"dim": d.name, "min": d.min, "max": d.max} if isinstance(d, Dim) else d for d in self.shape],
            "low": self.low,
            "high": self.high,
            "index_range": None if self.index_range is None else list(self.index_range),
            "mask": self.mask,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "TensorSpec":
        shape = tuple(Dim(d["dim"], d["min"], d["max"]) if isinstance(d, dict) else int(d) for d in data["shape"])
        index_range = data.get("index_range")
        return cls(data["name"], DTYPES[data["dtype"]], shape, data.get("low"), data.get("high"),
                   None if index_range is None else (int(index_range[0]), int(index_range[1])), bool(data.get("mask", False)))


@dataclass(frozen=True)
class InputSpec:
    """The flat tensor inputs of a captured model, in call order, plus how to rebuild the call.

    `call_structure` is the pytree spec (JSON) of the user's `(args, kwargs)`; tensor leaves
    become the flat inputs and non-tensor leaves are `constants`, baked in at capture.
    """

    tensors: tuple[TensorSpec, ...]
    call_structure: str
    constants: tuple = ()
    constant_positions: tuple[int, ...] = ()
    constant_names: tuple[str, ...] = ()
    # forward()'s parameters in order (none when it takes *args or **kwargs): a call that splits
    # its inputs into positional and keyword differently from the compile call is bound by them
    parameters: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def dims(self) -> dict[str, Dim]:
        return {d.name: d for t in self.tensors for d in t.shape if isinstance(d, Dim)}

    def describe(self) -> str:
        return ", ".join(t.describe() for t in self.tensors)

    def to_dict(self) -> dict:
        return {
            "tensors": [t.to_dict() for t in self.tensors],
            "call_structure": self.call_structure,
            "constants": list(self.constants),
            "constant_positions": list(self.constant_positions),
            "constant_names": list(self.constant_names),
            "parameters": list(self.parameters),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "InputSpec":
        return cls(
            tuple(TensorSpec.from_dict(t) for t in data["tensors"]),
            data["call_structure"],
            tuple(data.get("constants", ())),
            tuple(data.get("constant_positions", ())),
            tuple(data.get("constant_names", ())),
            tuple(data.get("parameters", ())),
        )


@dataclass(frozen=True)
class NodeDecision:
    """What kiln decided for one graph node, and why. Written by decide-only passes."""

    precision: Precision = Precision.FP32
    device: str | None = None
    backend: str | None = None
    reasons: tuple[str, ...] = field(default=())
