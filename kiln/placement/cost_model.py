"""kiln's cost model: how long one graph node takes on one device, and one tensor to cross a link.

Per node, a roofline: time = max(FLOPs / peak at the node's precision, bytes moved / memory
bandwidth) + the device's launch overhead (one kernel per node; views are free). FLOPs come
from the node's shapes (`node.meta["val"]`): the op runs once on meta tensors under
torch.utils.flop_counter, which counts matmuls and convolutions; scaled-dot-product attention
is counted here because the counter misses the CPU kernel; every other op is charged one
FLOP per output element. Bytes are the node's tensor inputs (weights included) plus its
outputs, at the node's precision. Per edge between devices: bytes / link bandwidth + link
latency; devices with no direct link route through the host.

Figures are estimates for ranking placements, not predictions of wall time: fused kernels
run fewer launches and move fewer bytes than the sum of their nodes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from kiln.hardware_profiles.schema import DeviceSpec, Profile
from kiln.types import DeviceKind, Precision

PRECISION_BYTES = {Precision.FP32: 4, Precision.TF32: 4, Precision.BF16: 2, Precision.FP16: 2, Precision.FP8: 1,
                   Precision.INT8: 1, Precision.INT4: 0.5}

_VIEW_NAMES = ("view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze",
               "slice", "select", "alias", "detach", "flatten", "unflatten", "split", "split_with_sizes", "chunk",
               "unbind", "as_strided", "_assert_tensor_metadata", "_assert_scalar", "sym_size", "sym_numel",
               "sym_constrain_range_for_size", "lift_fresh_copy")
_SDPA_NAMES = ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
               "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
               "_scaled_dot_product_cudnn_attention")


@dataclass(frozen=True)
class NodeCost:
    """What a node asks of any device: work, traffic, and the weights it keeps resident."""

    flops: float
    bytes: float  # read + written, at the node's precision
    weight_bytes: dict  # get_attr target -> bytes (shared weights count once per device)
    free: bool = False  # a view or assertion: no kernel, no traffic


def is_view(node: Node) -> bool:
    packet = getattr(node.target, "__name__", "").split(".")[0]
    return node.op == "call_function" and (packet in _VIEW_NAMES or not isinstance(node.target, torch._ops.OpOverload))


def hint(size) -> int:
    """A concrete size for a possibly symbolic one: its example value."""
    if isinstance(size, int):
        return size
    try:
        value = size.node.hint
        return int(value if value is not None else size.node.shape_env.size_hint(size.node.expr))
    except Exception:  # unbacked sizes have no example value; 1 keeps the estimate finite
        return 1


def shape_of(val) -> tuple[int, ...]:
    return tuple(hint(s) for s in val.shape)


def tensor_bytes(val, precision: Precision = Precision.FP32) -> float:
    """Bytes of a tensor (or tuple of tensors); floating tensors at `precision`'s width."""
    if isinstance(val, (tuple, list)):
        return sum(tensor_bytes(v, precision) for v in val)
    if not isinstance(val, torch.Tensor):
        return 0.0
    width = val.element_size()
    if val.dtype.is_floating_point and precision is not Precision.FP32:
        width = PRECISION_BYTES[precision]
    return float(math.prod(shape_of(val))) * width


def value_of(gm: GraphModule, node: Node):
    """A node's value as fake/meta data: its `val` meta, or the tensor a get_attr reads."""
    if node.op == "get_attr":
        target = gm
        for part in str(node.target).split("."):
            target = getattr(target, part, None)
        return target
    return node.meta.get("val")


def node_cost(gm: GraphModule, node: Node, precision: Precision = Precision.FP32) -> NodeCost:
    if is_view(node):
        return NodeCost(0.0, 0.0, {}, free=True)
    read, weights = 0.0, {}
    for arg in node.all_input_nodes:
        size = tensor_bytes(value_of(gm, arg), precision)
        read += size
        if arg.op == "get_attr":
            weights[str(arg.target)] = size
    out = node.meta.get("val")
    written = tensor_bytes(out, precision)
    return NodeCost(count_flops(gm, node), read + written, weights)


def count_flops(gm: GraphModule, node: Node) -> float:
    out = node.meta.get("val")
    elements = sum(math.prod(shape_of(v)) for v in (out if isinstance(out, (tuple, list)) else (out,))
                   if isinstance(v, torch.Tensor))
    name = getattr(node.target, "__name__", "").split(".")[0]
    if name in _SDPA_NAMES:
        return float(_attention_flops(gm, node))
    counted = _counted_flops(gm, node) if isinstance(node.target, torch._ops.OpOverload) else 0
    return float(max(counted, elements))


def _attention_flops(gm: GraphModule, node: Node) -> int:
    # QK^T: 2*B*Lq*Lk*E, then P@V: 2*B*Lq*Lk*Ev (softmax is lower order)
    q, k, v = (shape_of(value_of(gm, a)) for a in node.args[:3])
    batch = math.prod(q[:-2])
    return 2 * batch * q[-2] * k[-2] * q[-1] + 2 * batch * q[-2] * k[-2] * v[-1]


def _counted_flops(gm: GraphModule, node: Node) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    def meta(arg):
        value = value_of(gm, arg)
        if isinstance(value, torch.Tensor):
            return torch.empty(shape_of(value), dtype=value.dtype, device="meta")
        return value

    args = torch.fx.node.map_arg(node.args, meta)
    kwargs = torch.fx.node.map_arg(node.kwargs, meta)
    args, kwargs = torch.utils._pytree.tree_map(lambda x: hint(x) if isinstance(x, torch.SymInt) else x, (args, kwargs))
    try:
        with FlopCounterMode(display=False) as counter:
            node.target(*args, **kwargs)
        return counter.get_total_flops()
    except Exception:  # ops without a meta kernel: the per-element charge stands
        return 0


def node_seconds(cost: NodeCost, device: DeviceSpec, precision: Precision) -> float | None:
    """Roofline time of the node on `device`, or None when the device has no such precision."""
    peak = device.peak_tflops.get(precision)
    if peak is None and precision is Precision.INT4:
        # weight-only int4 dequantises into the device's float math: the fastest float rate,
        # while its weights move at a quarter of fp32's bytes (a bound, not a measurement)
        floats = [device.peak_tflops[p] for p in (Precision.FP16, Precision.BF16, Precision.FP32) if p in device.peak_tflops]
        peak = max(floats) if floats else None
    if peak is None:
        return None
    if cost.free:
        return 0.0
    compute = cost.flops / (peak * 1e12)
    traffic = cost.bytes / (device.memory_bandwidth_gbs * 1e9)
    return max(compute, traffic) + device.launch_overhead_s


def host_device(profile: Profile) -> str:
    """Where the caller's tensors live: the first CPU device (the primary if there is none)."""
    return next((name for name, d in profile.devices.items() if d.kind is DeviceKind.CPU), profile.primary_device)


def transfer_seconds(num_bytes: float, source: str, target: str, profile: Profile) -> float:
    """Time to move `num_bytes` from device `source` to `target` (0 on the same device)."""
    if source == target:
        return 0.0
    links = _links(profile)
    if (source, target) in links:
        bandwidth, latency = links[(source, target)]
        return num_bytes / (bandwidth * 1e9) + latency * 1e-6
    host = host_device(profile)
    if host not in (source, target) and (source, host) in links and (host, target) in links:
        return transfer_seconds(num_bytes, source, host, profile) + transfer_seconds(num_bytes, host, target, profile)
    return math.inf


@functools.lru_cache(maxsize=64)
def _links_cached(links: tuple) -> dict:
    return {(link.source, link.target): (link.bandwidth_gbs, link.latency_us) for link in links}


def _links(profile: Profile) -> dict:
    return _links_cached(profile.links)
