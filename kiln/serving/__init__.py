"""Serving compiled artifacts: Triton model repositories and Ray Serve deployments.

    kiln.serving.triton_repository("minilm.kiln", "models/", max_batch=32)   # a Triton model repository
    app = kiln.serving.deployment("minilm.kiln", replicas=2, max_batch=16)    # a Ray Serve application

Ray Serve and tritonclient are optional (`pip install 'kiln[serve]'`): this package imports them
only when a function that needs them runs, and says how to install them when they are missing.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

from kiln.errors import ServingError
from kiln.serving.batching import BatchLayout, batch_layout, run_batched

__all__ = ["BatchLayout", "ServingError", "batch_layout", "run_batched", "triton_repository", "deployment"]

# public name -> module holding it, imported on first use (they need the serve extra)
_LAZY = {"triton_repository": "kiln.serving.triton", "TritonExport": "kiln.serving.triton",
         "deployment": "kiln.serving.ray_serve"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln.serving' has no attribute {name!r}")


def require(module: str, purpose: str) -> Any:
    """Import an optional dependency of serving, or ServingError with the install hint."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ServingError(f"{purpose} needs {module.split('.')[0]}, which is not installed ({exc})", where=module,
                           fix="pip install 'kiln[serve]' (installs ray[serve] and tritonclient)") from None


def artifact_name(path: str | Path) -> str:
    """A model or route name from an artifact's file name: minilm.kiln -> minilm."""
    path = Path(path)
    stem = path.name[:-len(".kiln")] if path.name.endswith(".kiln") else path.stem
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem) or "model"
