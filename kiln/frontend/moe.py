"""Mixture-of-experts blocks in a static form, for capture only.

transformers (5.x) writes an MoE block as a router (a linear to E logits, softmax, top-k) and an
experts module that holds every expert's weights as 3-D parameters, gate_up_proj [E, 2I, H] (or
up_proj [E, I, H]) and down_proj [E, H, I], and whose forward takes (hidden [T, H], top_k_index
[T, k], top_k_weights [T, k]). Its reference forward loops over the experts the routing hit and
gathers each one's tokens: the loop count and the token lists depend on the values, which
torch.export refuses (a data-dependent guard). Its "grouped_mm" form exports, but through a
transformers custom op that only PyTorch itself can run, and that needs transformers imported
wherever the artifact loads.

For the export only, kiln swaps the experts module's forward for one of three forms whose
output shape does not depend on the routing; each computes the same sums as the loop, every token
through its k experts, none dropped:

  dispatch one kiln::moe_experts node (kiln.frontend.moe_op): the loop's own work, each expert on
           its own tokens, in PyTorch. The node runs in kiln's eager partition on the host CPU
           between the compiled partitions, at fp32 or, when the precision plan lowers it, with
           bf16 weights. Taken by "auto" where the profile's primary device is the host CPU and
           eager fallback is allowed: on a GPU or NPU profile it would pull the experts off the
           device.

  blocked  the T*k (token, expert) pairs grouped by expert (each pair's row from a cumulative
           count, no sort), each expert's run padded to whole blocks of b rows, so that a fixed
           number of blocks, ceil((T*k + E*(b-1)) / b), holds any routing; every block is
           multiplied by its expert's weights (gathered per block) in one batched matmul, and
           the rows are weighted and summed back per token over its k pairs. Within (T*k + E*(b-1))/(T*k)
           of the loop's FLOPs (b is chosen from T: 1.25x at 1024 tokens, 8 experts, top-2).
           aten._grouped_mm would do it without padding, but its export (meta) kernel takes
           bf16 only, and the ONNX and OpenVINO converters do not know it.
  dense    every expert on every token as two batched matmuls over E, summed with a dense
           routing matrix [T, E] that is zero off each token's top-k. E/k times the expert FLOPs,
           but plain matmuls that every backend runs (ONNX Runtime, OpenVINO).

Recognised by structure (those parameters, an act_fn, a three-tensor forward), not by a class
name, and confirmed by numerics: before the swap each block runs its own forward and the static
form on a seeded routing of a few tokens, and a block whose answers differ (custom gating, a
post-expert norm, an interleaved layout) is left alone with the reason. The user's module gets
its own forward back when the export ends, so kiln's verification compares against the loop.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from kiln.frontend.moe_op import ACTIVATIONS, activation_name


@dataclass(frozen=True)
class ExpertsLayout:
    """What the static forms read off an experts module."""

    num_experts: int
    gated: bool  # gate_up_proj (act(gate) * up) rather than up_proj (act(up))
    transposed: bool  # weights stored [E, in, out] rather than [E, out, in]
    biased: bool
    activation: str | None = None  # act_fn's name in moe_op.ACTIVATIONS, None when it is none of them


@dataclass
class MoeBlock:
    """One experts module kiln found, and what it did with it."""

    name: str  # the experts module's path in the model
    router: str | None  # its sibling that routes (a top_k attribute and an [E, H] weight), if found
    num_experts: int
    top_k: int | None = None  # read from the routing the example inputs produced
    form: str | None = None  # the static form captured, or None where the block was left alone
    refusal: str = ""  # why it was left alone, or why "auto" passed over the blocked form
    load: list[int] = field(default_factory=list)  # tokens routed to each expert on the example inputs

    def to_dict(self) -> dict:
        return {"block": self.name, "router": self.router, "experts": self.num_experts, "top_k": self.top_k,
                "form": self.form, "refusal": self.refusal, "load": list(self.load), "tokens": self.tokens}

    @property
    def tokens(self) -> int:
        return sum(self.load) // self.top_k if self.top_k else 0


def experts_layout(module: torch.nn.Module) -> ExpertsLayout | None:
    """The layout of a transformers-style experts module, or None when `module` is not one."""
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", None)
    gated = up is not None
    up = up if gated else getattr(module, "up_proj", None)
    if not (isinstance(down, torch.Tensor) and isinstance(up, torch.Tensor) and down.dim() == 3 and up.dim() == 3):
        return None
    if not callable(getattr(module, "act_fn", None)) or up.shape[0] != down.shape[0]:
        return None
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return None
    if len(params) != 3 and not (len(params) == 0 and _wrapped_arity(module) == 3):
        return None
    biased = bool(getattr(module, "has_bias", False))
    return ExpertsLayout(int(up.shape[0]), gated, bool(getattr(module, "is_transposed", False)), biased,
                         activation_name(module.act_fn))


def _wrapped_arity(module: torch.nn.Module) -> int:
    """transformers' use_experts_implementation wraps forward as (*args, **kwargs); the class's
    own forward (functools.wraps keeps it as __wrapped__) states the real arguments."""
    inner = getattr(type(module).forward, "__wrapped__", None)
    if inner is None:
        return -1
    params = list(inspect.signature(inner).parameters.values())[1:]
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def find_moe_blocks(model: torch.nn.Module) -> list[tuple[MoeBlock, torch.nn.Module, ExpertsLayout]]:
    found = []
    parents = {id(child): module for module in model.modules() for child in module.children()}
    for name, module in model.named_modules():
        layout = experts_layout(module)
        if layout is None:
            continue
        block = MoeBlock(name, _router_of(model, parents.get(id(module)), layout.num_experts), layout.num_experts)
        found.append((block, module, layout))
    return found


def _router_of(model: torch.nn.Module, parent: torch.nn.Module | None, num_experts: int) -> str | None:
    if parent is None:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    for child in parent.children():
        weight = getattr(child, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == num_experts:
            return names.get(id(child))
    return None


def _weights(module: torch.nn.Module, layout: ExpertsLayout, experts: torch.Tensor | None = None):
    """(up [E', H, 2I or I], down [E', I, H]) as [E', in, out] views, ready for x @ w: every
    expert, or the ones `experts` picks (gathered in the stored layout, whose rows are
    contiguous, and only then viewed transposed: a gather through the transposed view reads
    strided memory and cost more than the matmuls)."""
    up = module.gate_up_proj if layout.gated else module.up_proj
    down = module.down_proj
    if experts is not None:
        up, down = up[experts], down[experts]
    if layout.transposed:
        return up, down
    return up.transpose(1, 2), down.transpose(1, 2)


def _activate(module: torch.nn.Module, layout: ExpertsLayout, projected: torch.Tensor) -> torch.Tensor:
    if not layout.gated:
        return module.act_fn(projected)
    gate, up = projected.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def block_rows(pairs: int, num_experts: int) -> int:
    """Rows per block: about half an expert's average share of the (token, expert) pairs, a power
    of two in [8, 64]; padding costs at most num_experts * (rows - 1) rows."""
    share = max(pairs // (2 * num_experts), 1)
    return max(8, min(64, 1 << (share.bit_length() - 1)))


def blocked_forward(module: torch.nn.Module, layout: ExpertsLayout, hidden: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """Each (token, expert) pair once, grouped by expert, each expert's run padded to whole blocks
    of `rows` rows, every block multiplied by its expert's weights in one batched matmul."""
    tokens, top_k = top_k_index.shape
    pairs, experts = tokens * top_k, layout.num_experts
    rows = block_rows(pairs, experts)
    blocks = (pairs + experts * (rows - 1)) // rows  # enough for any routing: each run wastes < rows
    # comparisons and cumsum rather than sort or bincount: static sizes, and every converter knows them
    chosen = (top_k_index.reshape(-1, 1) == torch.arange(experts, device=hidden.device)).to(torch.int64)  # [pairs, E]
    counts = chosen.sum(0)
    rank = (torch.cumsum(chosen, 0) * chosen).sum(1) - 1  # the pair's place in its expert's run, in token order
    # rounded up in float (exact below 2**24 pairs): OpenVINO 2026.4 computed the integer
    # floor_divide form of this wrongly inside the whole block (slots past their runs)
    padded = torch.ceil(counts.to(torch.float32) / rows).to(torch.int64) * rows
    padded_start = torch.cumsum(padded, 0) - padded
    slot = (padded_start.unsqueeze(0) * chosen).sum(1) + rank  # the pair's row in the padded layout
    pair_rows = hidden.unsqueeze(1).expand(tokens, top_k, hidden.shape[1]).reshape(pairs, hidden.shape[1])
    padded_rows = hidden.new_zeros(blocks * rows, hidden.shape[1]).index_put((slot,), pair_rows)
    # a block's expert: how many experts' padded runs end at or before the block's first row
    padded_end = (padded_start + padded).unsqueeze(0)
    first_row = (torch.arange(blocks, device=hidden.device) * rows).unsqueeze(1)
    block_expert = (padded_end <= first_row).sum(1).clamp(max=experts - 1)  # unused tail blocks: zero rows
    up, down = _weights(module, layout, block_expert)
    projected = torch.bmm(padded_rows.view(blocks, rows, hidden.shape[1]), up)
    if layout.biased:
        projected = projected + (module.gate_up_proj_bias if layout.gated else module.up_proj_bias)[block_expert].unsqueeze(1)
    out = torch.bmm(_activate(module, layout, projected), down)
    if layout.biased:
        out = out + module.down_proj_bias[block_expert].unsqueeze(1)
    out = out.reshape(blocks * rows, out.shape[-1])[slot] * top_k_weights.reshape(-1, 1).to(out.dtype)
    return out.view(tokens, top_k, out.shape[-1]).sum(1).to(hidden.dtype)


def dense_forward(module: torch.nn.Module, layout: ExpertsLayout, hidden: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by a routing matrix that is zero off the top-k."""
    chosen = top_k_index.unsqueeze(-1) == torch.arange(layout.num_experts, device=hidden.device)  # [T, k, E]
    routing = (chosen.to(top_k_weights.dtype) * top_k_weights.unsqueeze(-1)).sum(1)  # [T, E]
    up, down = _weights(module, layout)
    projected = torch.matmul(hidden.unsqueeze(0), up)  # [E, T, 2I]
    if layout.biased:
        projected = projected + (module.gate_up_proj_bias if layout.gated else module.up_proj_bias).unsqueeze(1)
    out = torch.matmul(_activate(module, layout, projected), down)  # [E, T, H]
    if layout.biased:
        out = out + module.down_proj_bias.unsqueeze(1)
    # where() rather than a product alone: an unselected expert's inf or nan must not reach a token
    weights = routing.t().unsqueeze(-1).to(out.dtype)
    out = torch.where(weights != 0, out * weights, torch.zeros((), dtype=out.dtype))
    return out.sum(0).to(hidden.dtype)


def dispatch_forward(module: torch.nn.Module, layout: ExpertsLayout, hidden: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """The loop's own work in one kiln::moe_experts node, run in PyTorch."""
    if layout.activation is None:
        raise ValueError(f"its act_fn is none of the activations kiln::moe_experts names ({', '.join(ACTIVATIONS)})")
    up = module.gate_up_proj if layout.gated else module.up_proj
    up_bias = (module.gate_up_proj_bias if layout.gated else module.up_proj_bias) if layout.biased else None
    down_bias = module.down_proj_bias if layout.biased else None
    return torch.ops.kiln.moe_experts(hidden, top_k_index, top_k_weights, up, module.down_proj, up_bias, down_bias,
                                      layout.gated, layout.transposed, layout.activation)


FORMS = {"dispatch": dispatch_forward, "blocked": blocked_forward, "dense": dense_forward}


def _trial_routing(module: torch.nn.Module, layout: ExpertsLayout, tokens: int = 12, top_k: int = 2):
    """A seeded routing of a few tokens that hits several experts, some twice, one not at all."""
    generator = torch.Generator().manual_seed(0)
    weight = module.down_proj
    hidden_size = weight.shape[1] if not layout.transposed else weight.shape[2]
    hidden = torch.randn(tokens, hidden_size, generator=generator).to(weight.dtype)
    top_k = min(top_k, layout.num_experts)
    scores = torch.rand(tokens, max(layout.num_experts - 1, 1), generator=generator)
    index = scores.topk(top_k, dim=-1).indices  # never the last expert: an expert with no tokens
    weights = torch.rand(tokens, top_k, generator=generator).softmax(-1).to(weight.dtype)
    return hidden, index, weights


def check_form(module: torch.nn.Module, layout: ExpertsLayout, form: str) -> str:
    """'' when `form` computes what the module's own forward does on a seeded trial routing; else why not."""
    hidden, index, weights = _trial_routing(module, layout)
    try:
        with torch.no_grad():
            expected = module(hidden, index, weights)
            got = FORMS[form](module, layout, hidden, index, weights)
    except Exception as exc:  # a form the module's weights or this torch cannot run: the block keeps its forward
        return f"the {form} form does not run on it ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
        return "its forward returns something other than one [tokens, hidden] tensor"
    tolerance = 1e-5 if expected.dtype == torch.float32 else 1e-2
    if not torch.allclose(got.float(), expected.float(), rtol=tolerance, atol=tolerance):
        error = (got.float() - expected.float()).abs().max().item()
        return (f"its forward computes something else than kiln's {form} form (max abs difference {error:.3g} on a "
                "trial routing): custom gating, a post-expert norm or an interleaved layout")
    return ""


def choose_form(module: torch.nn.Module, layout: ExpertsLayout, requested: str, dynamic_tokens: bool = False,
                no_dispatch: str = "") -> tuple[str | None, str]:
    """(the form to capture, or None; why the others were not taken). "auto" takes, of those that
    run and agree: dispatch (the loop's own work, any token count) unless `no_dispatch` says why
    not; then blocked (about the loop's FLOPs), unless the token count is dynamic (its block count
    follows it, and torch.export 2.13 could not prove that graph's reshapes for every size);
    then dense."""
    if requested != "auto":
        reason = check_form(module, layout, requested)
        return (None, reason) if reason else (requested, "")
    candidates, reasons = ["dispatch", "blocked", "dense"], []
    if no_dispatch:
        candidates.remove("dispatch")
        reasons.append(f"dispatch not taken: {no_dispatch}")
    if dynamic_tokens:
        candidates.remove("blocked")
        reasons.append("the blocked form needs a fixed token count, and dims are marked dynamic")
    for form in candidates:
        reason = check_form(module, layout, form)
        if not reason:
            return form, "; ".join(reasons)
        reasons.append(reason)
    return None, "; ".join(reasons)


@contextlib.contextmanager
def static_moe_forms(model: torch.nn.Module, form: str = "auto", dynamic_tokens: bool = False,
                     no_dispatch: str = "") -> Iterator[list[MoeBlock]]:
    """Inside: every recognised experts module runs a form whose output shape does not depend on
    the routing; on exit each has its own forward back. Yields the blocks found, each with the
    form taken and why the others were not (`no_dispatch`: why "auto" may not take dispatch)."""
    blocks, swapped = [], []
    try:
        for block, module, layout in find_moe_blocks(model):
            block.form, block.refusal = choose_form(module, layout, form, dynamic_tokens, no_dispatch)
            blocks.append(block)
            if block.form is None:
                continue
            swapped.append((module, module.__dict__.get("forward")))
            static = FORMS[block.form]
            module.forward = lambda hidden, index, weights, _m=module, _l=layout, _f=static: _f(_m, _l, hidden, index, weights)
        yield blocks
    finally:
        for module, own in swapped:
            del module.forward
            if own is not None:
                module.forward = own


@contextlib.contextmanager
def recording_expert_load(model: torch.nn.Module, blocks: list[MoeBlock]) -> Iterator[None]:
    """Count the tokens each expert receives (top_k_index, the experts module's second
    argument) over the calls made inside; written into each block's `load`."""
    modules = dict(model.named_modules())
    handles = []

    def hook(block: MoeBlock):
        def count(_module, args, kwargs):
            index = args[1] if len(args) > 1 else kwargs.get("top_k_index")
            if isinstance(index, torch.Tensor):
                block.top_k = int(index.shape[-1])
                counts = torch.bincount(index.reshape(-1).long().cpu(), minlength=block.num_experts).tolist()
                block.load = [a + b for a, b in zip(block.load or [0] * len(counts), counts)]
        return count

    try:
        for block in blocks:
            handles.append(modules[block.name].register_forward_pre_hook(hook(block), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def looks_like_moe(model: torch.nn.Module, recognised: set[str] = frozenset()) -> list[str]:
    """Modules that route tokens to experts in a form kiln does not rewrite (a child `experts`
    that is a list of modules, or beside top_k/num_experts attributes), for a capture error that
    names them; `recognised`: experts modules' paths already found."""
    named = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        routed = any(hasattr(module, a) for a in ("top_k", "num_experts_per_tok", "num_experts"))
        path = f"{name}.experts" if name else "experts"
        if isinstance(experts, torch.nn.Module) and (routed or isinstance(experts, torch.nn.ModuleList)) \
                and path not in recognised and experts_layout(experts) is None:
            named.append(f"{name or '<model>'} ({type(module).__name__})")
    return named


def load_note(block: MoeBlock) -> str:
    shares = ", ".join(str(n) for n in block.load)
    return (f"{block.name}: {block.num_experts} experts, top-{block.top_k}, {block.tokens} tokens on the example "
            f"inputs routed as [{shares}] (tokens per expert, sum {sum(block.load)} = tokens x top_k)")
