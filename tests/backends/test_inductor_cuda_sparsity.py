"""2:4 sparsity through Inductor on a CUDA GPU: PyTorch's semi-structured sparse weights, end to
end for the h100 profile. Skipped (with the reason) without CUDA; scripts/gpu_check.sh runs it."""

import pytest
import torch
from torch import nn

import kiln
from kiln.backends.inductor import lower_for
from kiln.backends.inductor_sparsity import to_semi_structured
from kiln.frontend.capture import capture
from kiln.fx_helpers import attr_value
from kiln.precision.sparsity import prune_2_4
from kiln.types import Precision
from kiln.verify import TOLERANCE

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False on this machine", allow_module_level=True)
if torch.cuda.get_device_capability()[0] < 8:
    pytest.skip("needs sparse tensor cores (compute capability 8.0 or later)", allow_module_level=True)

FP16 = TOLERANCE[Precision.FP16]


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 8)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_a_pruned_fp16_linear_weight_becomes_semi_structured_and_multiplies_like_the_dense_one():
    torch.manual_seed(0)
    layer = nn.Linear(256, 128).eval()
    with torch.no_grad():
        layer.weight.copy_(prune_2_4(layer.weight))
    captured = capture(nn.Sequential(layer), (torch.randn(64, 256),))
    gm = lower_for(captured.gm, torch.device("cuda"), torch.float16)  # as the Inductor backend moves a partition
    linear = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    x = torch.randn(64, 256, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        want = gm(x)[0]
    converted, refused = to_semi_structured(gm, {linear.name: str(linear.args[1].target)})
    assert converted == [linear.name] and refused == []
    assert type(attr_value(gm, linear.args[1])).__name__.startswith("SparseSemiStructuredTensor")
    with torch.no_grad():
        torch.testing.assert_close(gm(x)[0], want, rtol=FP16.rtol, atol=FP16.atol)


def test_h100_inductor_build_with_2_4_layers_matches_eager_within_the_budget():
    torch.manual_seed(0)
    model = Mlp().eval()
    compiled = kiln.optimize(model, "h100", torch.randn(16, 256), backend="inductor", precision="fp16", sparsity="2:4",
                             accuracy_budget=kiln.Budget(min_cosine=0.9), cache=False)  # verification runs inside
    sparse = [row["node"] for row in compiled.report.precision if row.get("sparsity") == "2:4"]
    assert len(sparse) == 2  # fc1 and fc2; the head is too small to pay
    detail = next(c.detail for c in compiled.report.candidates if c.status == "chosen")
    print("engine:", detail)  # which path ran: semi-structured weights, or dense with export's refusal named
    assert "2:4" in detail
    x = torch.randn(16, 256)
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(compiled(x).float(), model(x), dim=-1).min()
    assert cosine >= 0.9
