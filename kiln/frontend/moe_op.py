"""kiln::moe_experts: a mixture-of-experts block's experts, dispatched in PyTorch.

One operator for what transformers' experts loop does: each (token, expert) pair of the routing
gathered by expert (a stable sort), each expert's rows multiplied by that expert's own weights
(no padding, no gathered weights, no expert run for nothing), the results weighted and added back
per token. Its output has the shape of its input whatever the routing, so torch.export captures
it as one node (the fake kernel below) and the data-dependent token lists stay inside it; the
compiled partitions around it run on their backends, and this op runs in kiln's eager partition.

The experts compute in their weights' dtype: fp32 weights give the loop's sums, bf16 weights
(a precision plan's lowering, kiln.backends.eager) run oneDNN's bf16 GEMMs. Hidden states come
in and go out in their own dtype; the routing weights and the per-token sum stay in it too.

Registered when kiln is imported: an artifact holding the op loads wherever kiln does.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from kiln.ir import Scheme

# Activations the op knows by name (the op's schema takes a string, not a callable); an
# experts module's act_fn is matched by its values (activation_name), not its class.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def activation_name(act_fn: Callable) -> str | None:
    """The name in ACTIVATIONS whose values `act_fn` reproduces on a probe, or None."""
    probe = torch.linspace(-6.0, 6.0, 97)
    try:
        with torch.no_grad():
            got = act_fn(probe)
    except Exception:  # an activation that cannot take a plain tensor: not one the op can name
        return None
    if not isinstance(got, torch.Tensor) or got.shape != probe.shape:
        return None
    for name, fn in ACTIVATIONS.items():
        if torch.allclose(got.float(), fn(probe), rtol=1e-5, atol=1e-6):
            return name
    return None


@torch.library.custom_op("kiln::moe_experts", mutates_args=())
def moe_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, up: torch.Tensor,
                down: torch.Tensor, up_bias: Optional[torch.Tensor], down_bias: Optional[torch.Tensor], gated: bool,
                transposed: bool, activation: str) -> torch.Tensor:
    """hidden [T, H]; top_k_index, top_k_weights [T, k]; up [E, 2I or I, H] and down [E, H, I]
    ([E, in, out] when `transposed`); biases [E, out] or None; `gated`: act(gate) * up over the
    two halves of up's output. Returns [T, H]."""
    act = ACTIVATIONS[activation]
    compute = up.dtype
    top_k = top_k_index.shape[1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert, in token order within each
    counts = torch.bincount(flat, minlength=up.shape[0]).tolist()
    token = order // top_k
    rows = hidden.index_select(0, token).to(compute)
    pieces, start = [], 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        x = rows[start:start + count]
        start += count
        projected = x @ (up[expert] if transposed else up[expert].t())
        if up_bias is not None:
            projected = projected + up_bias[expert].to(compute)
        if gated:
            gate, lin = projected.chunk(2, dim=-1)
            activated = act(gate) * lin
        else:
            activated = act(projected)
        out = activated @ (down[expert] if transposed else down[expert].t())
        if down_bias is not None:
            out = out + down_bias[expert].to(compute)
        pieces.append(out)
    result = torch.zeros_like(hidden)
    if not pieces:
        return result
    weighted = torch.cat(pieces).to(hidden.dtype) * top_k_weights.reshape(-1)[order].unsqueeze(1).to(hidden.dtype)
    return result.index_add_(0, token, weighted)


@moe_experts.register_fake
def _moe_experts_shape(hidden, top_k_index, top_k_weights, up, down, up_bias, down_bias, gated, transposed, activation):
    return torch.empty_like(hidden)


@register_flop_formula(torch.ops.kiln.moe_experts)
def _moe_experts_flops(hidden, top_k_index, top_k_weights, up, down, *rest, out_shape=None, **kwargs) -> int:
    """What kiln's cost model (FlopCounterMode) counts for the op: every (token, expert) pair
    through one expert's up and down projections, two FLOPs per multiply-add."""
    pairs = top_k_index[0] * top_k_index[1]
    return 2 * pairs * (up[1] * up[2] + down[1] * down[2])


MOE_EXPERTS = torch.ops.kiln.moe_experts.default
# The precisions kiln lowers an experts node to, and the weight type each computes in: PyTorch's
# CPU matmuls are fast at bf16 (oneDNN); kiln does not quantise experts.
EXPERT_TYPES = {Scheme.BF16: torch.bfloat16}
UP_ARG, DOWN_ARG, UP_BIAS_ARG, DOWN_BIAS_ARG = 3, 4, 5, 6  # the weight arguments' positions
WEIGHT_ARGS = slice(UP_ARG, DOWN_BIAS_ARG + 1)  # up, down and their biases: what a lowering casts

