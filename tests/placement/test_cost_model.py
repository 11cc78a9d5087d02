"""The cost model: FLOPs and bytes per node from shapes, roofline times, link transfers, the
launch-overhead profile field, and `kiln profile-host` writing a profile the loader accepts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kiln.errors import ProfileError
from kiln.frontend.capture import capture
from kiln.hardware_profiles import load
from kiln.placement import cost_model as cm
from kiln.types import Precision
from placement.support import PROFILES, profile


def _node(gm, target):
    return next(n for n in gm.graph.nodes if n.target == target)


def test_linear_flops_are_two_m_n_k_and_bytes_count_weights_inputs_and_output():
    captured = capture(nn.Linear(64, 32).eval(), (torch.randn(8, 64),))
    node = _node(captured.gm, torch.ops.aten.linear.default)
    cost = cm.node_cost(captured.gm, node)
    assert cost.flops == 2 * 8 * 64 * 32
    assert cost.bytes == 4 * (8 * 64 + 32 * 64 + 32 + 8 * 32)
    assert sum(cost.weight_bytes.values()) == 4 * (32 * 64 + 32)


def test_attention_flops_are_counted_although_the_flop_counter_misses_the_cpu_kernel():
    class Attention(nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    q = torch.randn(2, 4, 16, 8)
    captured = capture(Attention().eval(), (q, torch.randn(2, 4, 32, 8), torch.randn(2, 4, 32, 8)))
    node = _node(captured.gm, torch.ops.aten.scaled_dot_product_attention.default)
    assert cm.count_flops(captured.gm, node) == 2 * (2 * 4 * 16 * 32 * 8) * 2


def test_views_are_free_and_elementwise_ops_cost_one_flop_per_element():
    class Model(nn.Module):
        def forward(self, x):
            return torch.relu(x.view(4, 8))

    captured = capture(Model().eval(), (torch.randn(32),))
    assert cm.node_cost(captured.gm, _node(captured.gm, torch.ops.aten.view.default)).free
    relu = cm.node_cost(captured.gm, _node(captured.gm, torch.ops.aten.relu.default))
    assert relu.flops == 32 and relu.bytes == 2 * 32 * 4


def test_node_time_is_the_roofline_plus_the_launch_overhead():
    gpu = profile("gpu-and-host").devices["gpu"]
    compute_bound = cm.NodeCost(flops=1e12, bytes=1e6, weight_bytes={})
    memory_bound = cm.NodeCost(flops=1e3, bytes=1e9, weight_bytes={})
    assert cm.node_seconds(compute_bound, gpu, Precision.FP32) == pytest.approx(1e12 / 50e12 + 5e-6)
    assert cm.node_seconds(memory_bound, gpu, Precision.FP32) == pytest.approx(1e9 / 1000e9 + 5e-6)
    assert cm.node_seconds(compute_bound, gpu, Precision.INT8) is None  # the device has no int8


def test_lower_precision_moves_fewer_bytes():
    captured = capture(nn.Linear(64, 32).eval(), (torch.randn(8, 64),))
    node = _node(captured.gm, torch.ops.aten.linear.default)
    assert cm.node_cost(captured.gm, node, Precision.FP16).bytes == cm.node_cost(captured.gm, node).bytes / 2


def test_transfer_time_is_bytes_over_link_bandwidth_plus_latency_and_zero_on_one_device():
    prof = profile("gpu-and-host")
    assert cm.transfer_seconds(1e9, "cpu", "gpu", prof) == pytest.approx(1e9 / 10e9 + 10e-6)
    assert cm.transfer_seconds(1e9, "gpu", "gpu", prof) == 0.0


def test_devices_without_a_direct_link_route_through_the_host_or_cannot_exchange():
    prof = load("jetson-orin")
    direct = cm.transfer_seconds(1e6, "gpu", "cpu", prof)
    assert direct == pytest.approx(1e6 / 100e9 + 5e-6)
    no_links = profile("cpu-onnxruntime-only")
    assert math.isinf(cm.transfer_seconds(1.0, "cpu", "elsewhere", no_links))


def test_launch_overhead_defaults_by_device_kind_and_rejects_negative_values(tmp_path):
    assert load("a100").devices["gpu"].launch_overhead_s == pytest.approx(5e-6)
    assert profile("gpu-and-host").devices["cpu"].launch_overhead_s == pytest.approx(1e-6)
    text = (PROFILES / "cpu-onnxruntime-only.yaml").read_text().replace("backends: [onnxruntime]",
                                                                        "backends: [onnxruntime]\n    launch_overhead_us: -1")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ProfileError, match="launch_overhead_us"):
        load(bad)


def test_profile_host_writes_a_profile_the_strict_loader_accepts(tmp_path):
    from kiln.profile_host import write_profile

    path = write_profile(tmp_path / "this-host.yaml", seconds=0.02, gemm_size=128, copy_mb=4)
    loaded = load(path)
    cpu = loaded.devices["cpu"]
    assert loaded.name == "this-host" and Precision.FP32 in cpu.peak_tflops
    assert cpu.peak_tflops[Precision.FP32] > 0 and cpu.memory_bandwidth_gbs > 0 and cpu.launch_overhead_us > 0
    assert "source: measured" in path.read_text()
