"""The backends kiln knows, as one explicit table. Nothing registers itself at import."""

from __future__ import annotations

import difflib

from kiln.errors import BackendUnavailable

# name -> "module:Class"; classes are imported on first use so `import kiln` needs no runtime.
BACKENDS: dict[str, str] = {
    "onnxruntime": "kiln.backends.onnxruntime:OnnxRuntimeBackend",
    "inductor": "kiln.backends.inductor:InductorBackend",
    "openvino": "kiln.backends.openvino:OpenVinoBackend",
}

# Names profiles may already prefer, with why kiln cannot use them yet; selection records the
# reason and moves on to the next preferred backend.
PLANNED_BACKENDS: dict[str, str] = {
    "tensorrt": "kiln has no TensorRT backend yet",
}

KNOWN_NAMES: tuple[str, ...] = (*BACKENDS, *PLANNED_BACKENDS)


def get(name: str):
    """The backend object for `name`; an unknown name lists the known ones."""
    if name in PLANNED_BACKENDS:
        raise BackendUnavailable(f"backend {name!r} is not available: {PLANNED_BACKENDS[name]}",
                                 fix=f"use one of {', '.join(BACKENDS)}")
    if name not in BACKENDS:
        close = difflib.get_close_matches(name, list(KNOWN_NAMES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise BackendUnavailable(f"unknown backend {name!r}", fix=f"{hint}known backends: {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[name].split(":")
    import importlib

    return getattr(importlib.import_module(module_name), class_name)()
