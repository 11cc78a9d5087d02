"""Put a Python number in a commutative binary op second.

    mul(0.5, x)   becomes   mul(x, 0.5)        (likewise add)

`torch.mul(0.5, x)` captures as aten.mul.Tensor with the number first, which the ONNX exporter
cannot convert; every backend handles the tensor-first form, and the value is the same.
"""

from __future__ import annotations

import numbers

import torch
from torch.fx import GraphModule, Node

from kiln.passes.context import PassContext
from kiln.passes.result import PassResult

aten = torch.ops.aten
COMMUTATIVE = (aten.mul.Tensor, aten.add.Tensor)


def put_scalar_operands_last(gm: GraphModule, ctx: PassContext) -> PassResult:
    swapped = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in COMMUTATIVE or len(node.args) != 2 or node.kwargs:
            continue  # add with alpha= is not commutative in its arguments
        first, second = node.args
        if isinstance(first, numbers.Number) and isinstance(second, Node):
            node.args = (second, first)
            swapped += 1
    return PassResult(changed=swapped > 0, counts={"swapped": swapped})
