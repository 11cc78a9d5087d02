"""Mixture-of-experts capture: kiln finds transformers-style experts modules by structure and
exports them in a form whose shapes do not follow the routing (one kiln::moe_experts node run in
PyTorch, or a static form in plain matmuls) that computes what their own forward computes."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from kiln.errors import CaptureError
from kiln.frontend.capture import capture
from kiln.frontend.moe import (blocked_forward, check_form, dense_forward, dispatch_forward, experts_layout,
                               find_moe_blocks, static_moe_forms)
from kiln.frontend.moe_op import MOE_EXPERTS
from kiln.types import Precision
from kiln.verify import TOLERANCE

FP32 = TOLERANCE[Precision.FP32]


def tiny_mixtral() -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64, use_cache=False)
    model = MixtralForCausalLM(config).eval()
    model.set_experts_implementation("eager")  # transformers' loop over data-dependent token lists
    return model


def tiny_qwen2_moe() -> Qwen2MoeForCausalLM:
    torch.manual_seed(0)
    config = Qwen2MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                            shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, max_position_embeddings=64,
                            use_cache=False)
    model = Qwen2MoeForCausalLM(config).eval()
    model.set_experts_implementation("eager")
    return model


def token_ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


class PlainExperts(torch.nn.Module):
    """Not from transformers: the same structure under another name, ungated (act(up))."""

    def __init__(self, experts: int = 3, hidden: int = 8, inner: int = 16, scale: float = 1.0):
        super().__init__()
        generator = torch.Generator().manual_seed(2)
        self.up_proj = torch.nn.Parameter(torch.randn(experts, inner, hidden, generator=generator) * 0.3)
        self.down_proj = torch.nn.Parameter(torch.randn(experts, hidden, inner, generator=generator) * 0.3)
        self.act_fn = torch.nn.GELU()
        self.scale = scale  # 1.0: plain experts; otherwise a twist kiln's forms do not compute

    def forward(self, hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for expert in range(self.up_proj.shape[0]):
            token, slot = torch.where(top_k_index == expert)
            if token.numel() == 0:
                continue
            y = self.act_fn(hidden[token] @ self.up_proj[expert].T) @ self.down_proj[expert].T
            out.index_add_(0, token, y * top_k_weights[token, slot, None] * self.scale)
        return out


class RoutedBlock(torch.nn.Module):
    def __init__(self, experts: torch.nn.Module, hidden: int = 8, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        count = experts.up_proj.shape[0] if hasattr(experts, "up_proj") else len(experts)
        self.router = torch.nn.Linear(hidden, count, bias=False)
        self.experts = experts

    def forward(self, x):
        weights, index = self.router(x).softmax(-1).topk(self.top_k, dim=-1)
        if isinstance(self.experts, torch.nn.ModuleList):
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                token, slot = torch.where(index == e)
                if token.numel() == 0:  # a branch on the routing: what torch.export cannot capture
                    continue
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
            return out
        return self.experts(x, index, weights)


def test_recognises_mixtral_and_qwen2_moe_experts_and_their_routers():
    for model, experts in ((tiny_mixtral(), 4), (tiny_qwen2_moe(), 6)):
        found = find_moe_blocks(model)
        assert [b.name for b, _, _ in found] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
        assert all(b.router == b.name.replace(".experts", ".gate") for b, _, _ in found)
        assert all(layout.num_experts == experts and layout.gated for _, _, layout in found)


def test_recognises_experts_by_structure_not_by_class_name():
    layout = experts_layout(PlainExperts())
    assert layout is not None and not layout.gated and layout.num_experts == 3
    assert experts_layout(torch.nn.Linear(4, 4)) is None
    assert find_moe_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())) == []


@pytest.mark.parametrize("form", ["dispatch", "blocked", "dense"])
@pytest.mark.parametrize("build", [tiny_mixtral, tiny_qwen2_moe])
def test_static_form_gives_the_models_own_outputs(build, form):
    model, ids = build(), token_ids()
    with torch.no_grad():
        want = model(ids).logits
        with static_moe_forms(model, form) as blocks:
            got = model(ids).logits
    assert [b.form for b in blocks] == [form, form]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("forward", [dispatch_forward, blocked_forward, dense_forward])
def test_static_form_keeps_every_token_when_all_go_to_one_expert(forward):
    """The worst case for the blocked form's padding: one expert takes every pair but one."""
    model = tiny_mixtral()
    experts = model.model.layers[0].mlp.experts
    layout = experts_layout(experts)
    hidden = torch.randn(40, 32, generator=torch.Generator().manual_seed(3))
    index = torch.zeros(40, 2, dtype=torch.long)
    index[:, 1] = 3
    index[7, 0] = 2
    weights = torch.rand(40, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(forward(experts, layout, hidden, index, weights), experts(hidden, index, weights),
                                   rtol=1e-5, atol=1e-6)


def test_capture_exports_the_loop_and_leaves_the_model_as_it_was():
    model, ids = tiny_mixtral(), token_ids()
    with torch.no_grad():
        before = model(ids).logits
    captured = capture(model, (ids,))
    assert [b["form"] for b in captured.moe_blocks] == ["dispatch", "dispatch"]
    assert sum(n.target is MOE_EXPERTS for n in captured.gm.graph.nodes) == 2  # one node per block, no loop
    experts = [model.model.layers[i].mlp.experts for i in range(2)]
    assert all("forward" not in e.__dict__ for e in experts)  # its own forward back
    assert model.config._experts_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(captured.gm(ids)[0], before, rtol=FP32.rtol, atol=FP32.atol)
        assert torch.equal(model(ids).logits, before)


def test_expert_load_counts_every_routed_token_once_per_choice():
    model, ids = tiny_qwen2_moe(), token_ids(batch=3, seq=10)
    captured = capture(model, (ids,))
    for block in captured.moe_blocks:
        assert block["top_k"] == 2 and block["tokens"] == 30
        assert len(block["load"]) == 6 and sum(block["load"]) == 30 * 2
    assert any(note.startswith("expert load: model.layers.0.mlp.experts") for note in captured.notes)


def test_experts_computing_something_else_are_left_alone_with_the_reason():
    odd = PlainExperts(scale=2.0)
    layout = experts_layout(odd)
    assert "computes something else" in check_form(odd, layout, "blocked")
    with static_moe_forms(RoutedBlock(odd), "auto") as blocks:
        assert blocks[0].form is None and "computes something else" in blocks[0].refusal
        assert "forward" not in odd.__dict__


def test_unrewritten_moe_block_fails_capture_naming_the_block():
    model = RoutedBlock(PlainExperts(scale=2.0))
    with pytest.raises(CaptureError, match=r"did not rewrite into a static form: experts \(.*computes something else"):
        capture(model, (torch.randn(6, 8),))
    module_list = RoutedBlock(torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3)))
    with pytest.raises(CaptureError, match=r"<model> \(RoutedBlock\)") as error:
        capture(module_list, (torch.randn(6, 8),))
    assert "forward(hidden, top_k_index, top_k_weights)" in error.value.fix


def test_plain_experts_outside_transformers_capture_and_match():
    model, x = RoutedBlock(PlainExperts()).eval(), torch.randn(6, 8, generator=torch.Generator().manual_seed(5))
    captured = capture(model, (x,))
    assert captured.moe_blocks[0]["form"] == "dispatch"  # its GELU is one the op names
    with torch.no_grad():
        torch.testing.assert_close(captured.gm(x)[0], model(x), rtol=FP32.rtol, atol=FP32.atol)


def test_unknown_moe_form_is_refused_with_the_known_ones():
    from kiln import CompileOptions
    from kiln.errors import OptionsError

    with pytest.raises(OptionsError, match="auto, dispatch, blocked, dense"):
        CompileOptions(moe_form="sparse")


@pytest.mark.parametrize("no_dispatch, form", [("", "dispatch"), ("a GPU profile", "dense")])
def test_dynamic_token_count_takes_a_form_that_holds_at_other_sizes(no_dispatch, form):
    model = tiny_mixtral()
    captured = capture(model, {"input_ids": token_ids()}, dynamic={"input_ids": {0: "batch"}}, no_moe_dispatch=no_dispatch)
    assert [b["form"] for b in captured.moe_blocks] == [form, form]
    if form == "dense":
        assert "fixed token count" in captured.moe_blocks[0]["refusal"]
    other = token_ids(batch=5)
    with torch.no_grad():
        torch.testing.assert_close(captured.gm(other)[0], model(other).logits, rtol=FP32.rtol, atol=FP32.atol)


def test_auto_passes_over_dispatch_where_told_why_and_says_so():
    model = tiny_mixtral()
    captured = capture(model, (token_ids(),), no_moe_dispatch="the profile's primary device is a gpu")
    assert [b["form"] for b in captured.moe_blocks] == ["blocked", "blocked"]
    assert "dispatch not taken: the profile's primary device is a gpu" in captured.moe_blocks[0]["refusal"]


def test_an_activation_the_op_cannot_name_leaves_dispatch_to_the_static_forms():
    experts = PlainExperts()
    experts.act_fn = torch.nn.Tanh()  # none of silu, gelu, gelu_tanh, relu, quick_gelu
    layout = experts_layout(experts)
    assert layout.activation is None
    assert "none of the activations" in check_form(experts, layout, "dispatch")
    with static_moe_forms(RoutedBlock(experts), "auto") as blocks:
        assert blocks[0].form == "blocked" and "none of the activations" in blocks[0].refusal


def test_blocked_form_runs_on_openvino_with_the_models_own_outputs():
    # OpenVINO 2026.4 computed an integer floor_divide inside this form wrongly (slots past their
    # runs, outputs off by 0.03); the form rounds the padded run lengths up in float instead
    ov = pytest.importorskip("openvino")
    experts = PlainExperts(experts=8, hidden=16, inner=32)
    layout = experts_layout(experts)

    class Blocked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = experts

        def forward(self, hidden, top_k_index, top_k_weights):
            return blocked_forward(self.experts, layout, hidden, top_k_index, top_k_weights)

    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(256, 16, generator=generator)
    weights, index = torch.topk(torch.randn(256, 8, generator=generator).softmax(-1), 2, dim=-1)
    with torch.no_grad():
        expected = experts(hidden, index, weights)
        program = torch.export.export(Blocked().eval(), (hidden, index, weights))
    engine = ov.Core().compile_model(ov.convert_model(program), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = torch.from_numpy(engine([hidden.numpy(), index.numpy(), weights.numpy()])[0])
    torch.testing.assert_close(got, expected, rtol=FP32.rtol, atol=FP32.atol)


def test_a_gpu_profile_captures_a_static_form_where_a_cpu_profile_dispatches():
    import kiln

    model, ids = tiny_mixtral(), token_ids()
    gpu = kiln.plan(model, "a100", ids)
    assert [b["form"] for b in gpu.report.experts] == ["blocked", "blocked"]
    assert "primary device is a gpu" in gpu.report.experts[0]["refusal"]
    cpu = kiln.plan(model, "cpu-x86", ids)
    assert [b["form"] for b in cpu.report.experts] == ["dispatch", "dispatch"]
    no_eager = kiln.plan(model, "cpu-x86", ids, eager_fallback=False)
    assert "eager_fallback is off" in no_eager.report.experts[0]["refusal"]


def test_experts_are_one_precision_layer_that_kiln_lowers_to_bf16_only():
    import kiln

    model, ids = tiny_mixtral(), token_ids()
    options = kiln.CompileOptions(precision="int8", calibration=[(token_ids(seed=s),) for s in (5, 6)])
    planned = kiln.plan(model, "cpu-x86", ids, options=options)
    experts = [row for row in planned.report.precision if row["op"] == "experts"]
    assert len(experts) == 2 and all(row["scheme"] == "fp32" for row in experts)
    assert all("experts run in PyTorch, which kiln lowers to bf16 only" in row["reason"] for row in experts)
