"""Inductor on CUDA with 2:4 sparse weights: PyTorch's semi-structured sparse tensors.

A linear layer whose weight assign_sparsity pruned to 2:4 (and the lowering pruned) gets its
weight replaced by `torch.sparse.to_sparse_semi_structured(weight)`, a tensor subclass that
stores the 2 kept values of every 4 and their indices and runs `aten.linear` on the sparse
tensor cores (cuSPARSELt, or CUTLASS when PyTorch forces it). Convolutions stay dense here:
the subclass multiplies 2-D matrices only.

Constraints (torch/sparse/semi_structured.py, torch 2.13, `_validate_device_dim_dtype_shape`
and each subclass's `_DTYPE_SHAPE_CONSTRAINTS`): a CUDA tensor, 2-D, contiguous, of a dtype the
subclass lists, with rows and columns each a positive multiple of its minimum block. kiln asks
for the larger block of the two subclasses, so the weight converts whichever one PyTorch picks:

    fp16 / bf16: rows % 32, columns % 64    (CUTLASS 32 x 64, cuSPARSELt 16 x 16)
    int8:        rows % 32, columns % 128   (CUTLASS 16 x 128, cuSPARSELt 32 x 32)
    fp8 e4m3:    rows % 32, columns % 32    (cuSPARSELt only)

fp32 is left dense: only CUTLASS takes it, and kiln's fp32 plans must stay within fp32's tolerance.
The dense input side is padded by PyTorch itself. None of this runs without a CUDA GPU; on a
CPU machine `semi_structured_refusal` names why, and the pruned weights run dense (same answers).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.fx import GraphModule

from kiln.fx_helpers import attr_value

# dtype -> (row multiple, column multiple) of a [out, in] weight, the stricter of the two subclasses
SEMI_STRUCTURED_BLOCKS: dict[torch.dtype, tuple[int, int]] = {
    torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.int8: (32, 128), torch.float8_e4m3fn: (32, 32)}


def semi_structured_refusal(shape: Iterable[int], dtype: torch.dtype) -> str | None:
    """Why a linear weight of `shape` computed in `dtype` cannot become a semi-structured sparse
    tensor, or None when it can (on a CUDA device of compute capability 8.0 or later)."""
    shape = tuple(shape)
    if len(shape) != 2:
        return f"semi-structured sparse tensors are 2-D; the weight has shape {shape}"
    if dtype not in SEMI_STRUCTURED_BLOCKS:
        names = ", ".join(str(d).replace("torch.", "") for d in SEMI_STRUCTURED_BLOCKS)
        return f"semi-structured sparse kernels take {names}, not {str(dtype).replace('torch.', '')}"
    rows, cols = SEMI_STRUCTURED_BLOCKS[dtype]
    if shape[0] % rows or shape[1] % cols:
        return (f"weight {list(shape)}: semi-structured {str(dtype).replace('torch.', '')} weights need rows a multiple "
                f"of {rows} and columns a multiple of {cols}")
    return None


def cuda_refusal() -> str | None:
    """Why this machine cannot run semi-structured sparse kernels, or None."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is present (torch.cuda.is_available() is False): the pruned weights run dense"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"the GPU has compute capability {major}.{minor}; sparse tensor cores need 8.0 or later"
    return None


def to_semi_structured(gm: GraphModule, layers: dict[str, str]) -> tuple[list[str], list[str]]:
    """Replace, in place, the weight of each linear node named in `layers` ({node: weight
    attribute}) by its semi-structured sparse form; `gm` must already be on the CUDA device and
    in the dtype it computes in. Returns (nodes converted, one refusal per node left dense)."""
    converted, refused = [], []
    if (why := cuda_refusal()) is not None:
        return [], [f"{name}: {why}" for name in layers]
    nodes = {node.name: node for node in gm.graph.nodes}
    for name, target in layers.items():
        node = nodes.get(name)
        weight = attr_value(gm, node.args[1]) if node is not None and len(node.args) > 1 else None
        if node is None or node.target is not torch.ops.aten.linear.default or weight is None:
            refused.append(f"{name}: not a linear layer with a stored weight in this partition")
            continue
        if (why := semi_structured_refusal(weight.shape, weight.dtype)) is not None:
            refused.append(f"{name}: {why}")
            continue
        owner, _, attr = node.args[1].target.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        sparse = torch.sparse.to_sparse_semi_structured(weight.detach().contiguous())
        module._parameters.pop(attr, None)
        module._buffers.pop(attr, None)
        setattr(module, attr, torch.nn.Parameter(sparse, requires_grad=False))
        converted.append(name)
    return converted, refused
