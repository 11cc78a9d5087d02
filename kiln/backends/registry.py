"""The backends kiln knows, as one explicit table. Nothing registers itself at import."""

from __future__ import annotations

import difflib

from kiln.errors import BackendUnavailable
from kiln.hardware_profiles.schema import DeviceSpec
from kiln.ir import BACKEND_NAMES, EAGER
from kiln.types import Precision

# name -> "module:Class"; classes are imported on first use so `import kiln` needs no runtime.
BACKENDS: dict[str, str] = {
    "onnxruntime": "kiln.backends.onnxruntime:OnnxRuntimeBackend",
    "inductor": "kiln.backends.inductor:InductorBackend",
    "openvino": "kiln.backends.openvino:OpenVinoBackend",
    "tensorrt": "kiln.backends.tensorrt:TensorRTBackend",
    # PyTorch itself, for ops no other backend supports; placement uses it only as that fallback
    EAGER: "kiln.backends.eager:EagerBackend",
}


def get(name: str):
    """The backend object for `name`; an unknown name lists the known ones."""
    if name not in BACKENDS:
        close = difflib.get_close_matches(name, list(BACKEND_NAMES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise BackendUnavailable(f"unknown backend {name!r}", fix=f"{hint}known backends: {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[name].split(":")
    import importlib

    return getattr(importlib.import_module(module_name), class_name)()


def lowering(names: tuple[str, ...], device: DeviceSpec, precision: Precision) -> list[str]:
    """Those of backends `names` whose capability table lowers `precision` on `device`'s kind."""
    return [name for name in names if get(name).capabilities.runs(device.kind, precision)]


def mixing(names: tuple[str, ...], device: DeviceSpec, precisions: frozenset[Precision]) -> list[str]:
    """Those of backends `names` that lower a plan combining `precisions` in one partition on
    `device`'s kind."""
    return [name for name in names if get(name).capabilities.runs_mixed(device.kind, precisions)]
