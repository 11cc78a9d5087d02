"""The prunable structures kiln recognises in an nn.Module, each a `UnitGroup`: a set of
interchangeable units (attention heads, FFN neurons, expanded conv channels) in one layer,
with the weights each unit owns, a magnitude score per unit, and a rewrite that keeps a
subset of units by slicing every tensor they touch into smaller dense ones.

Recognition is by module layout and tensor shapes, never by class name:

- heads: a module with Linear children `query`, `key`, `value` (equal out features, a
  multiple of its `attention_head_size`) whose parent has `output.dense`, a Linear reading
  those features (transformers' BERT family: BERT, RoBERTa, MiniLM, ELECTRA...). A head owns
  its rows of Q/K/V (and their biases) and its columns of the output projection.
- neurons: a module with `intermediate.dense` (Linear hidden -> I) and `output.dense`
  (Linear I -> hidden). A neuron owns one row of the first and one column of the second.
- channels: an inverted-residual (MBConv) block whose children are a 1x1 expand conv (C out),
  its BatchNorm, a depthwise conv over C, its BatchNorm and a 1x1 project conv (C in), as
  EfficientNet's `_expand_conv, _bn0, _depthwise_conv, _bn1, _project_conv`. A channel owns
  its expand row, both BatchNorm entries, its depthwise kernel and its project column.

A unit's score is the L2 norm of the weights it owns, with each BatchNorm's scale
gamma / sqrt(var + eps) folded into the conv before it (what the unit actually multiplies
by at inference); biases are not scored, only removed with their unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

KINDS = ("heads", "neurons", "channels")

# What each kind looks for, for the error that says nothing was found.
LOOKS_FOR = {
    "heads": "self-attention with Linear query/key/value and an attention_head_size attribute, "
             "whose parent has output.dense (the BERT family's layout)",
    "neurons": "a feed-forward pair intermediate.dense (Linear hidden->I) and output.dense (Linear I->hidden)",
    "channels": "an MBConv block: 1x1 expand conv, BatchNorm, depthwise conv, BatchNorm, 1x1 project conv "
                "(_expand_conv, _bn0, _depthwise_conv, _bn1, _project_conv)",
}


@dataclass
class UnitGroup:
    """One layer's interchangeable units. `score(root)` and `keep(root, indices)` look the
    modules up from the root by path, so a group found on one copy applies to another."""

    path: str
    kind: str
    units: int
    params_per_unit: int
    score: Callable[[nn.Module], torch.Tensor]
    keep: Callable[[nn.Module, torch.Tensor], None]


@dataclass
class Found:
    groups: list[UnitGroup] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why it was not pruned)


def find_units(model: nn.Module, kinds: tuple[str, ...]) -> Found:
    """Every prunable group of the requested kinds in `model`, in module order."""
    found = Found()
    for path, module in model.named_modules():
        if "heads" in kinds:
            _attention_heads(model, path, module, found)
        if "neurons" in kinds:
            _ffn_neurons(path, module, found)
        if "channels" in kinds:
            _mbconv_channels(path, module, found)
    return found


def _child(module: nn.Module, dotted: str) -> nn.Module | None:
    for name in dotted.split("."):
        module = getattr(module, name, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# ------------------------------------------------------------------------------ attention heads

def _attention_heads(root: nn.Module, path: str, module: nn.Module, found: Found) -> None:
    q, k, v = (_child(module, n) for n in ("query", "key", "value"))
    if not all(isinstance(m, nn.Linear) for m in (q, k, v)):
        return
    head_size = getattr(module, "attention_head_size", None)
    if not isinstance(head_size, int) or head_size <= 0:
        found.skipped.append((path, "query/key/value without an integer attention_head_size: heads unknown"))
        return
    if not q.out_features == k.out_features == v.out_features or q.out_features % head_size:
        found.skipped.append((path, "query/key/value widths differ or are not a multiple of the head size"))
        return
    parent_path = path.rsplit(".", 1)[0] if "." in path else ""
    out_path = _join(parent_path, "output.dense")
    out = _child(root, out_path) if path else None
    if not isinstance(out, nn.Linear) or out.in_features != q.out_features:
        found.skipped.append((path, f"no output projection {out_path} (Linear reading {q.out_features} features)"))
        return
    heads = q.out_features // head_size
    per_head = head_size * (sum(m.in_features + (m.bias is not None) for m in (q, k, v)) + out.out_features)

    def score(r: nn.Module) -> torch.Tensor:
        qkv = [_child(r, _join(path, n)).weight for n in ("query", "key", "value")]
        qkv = [w.reshape(-1, head_size, w.shape[1]) for w in qkv]
        o = _child(r, out_path).weight.reshape(out.out_features, -1, head_size).transpose(0, 1)
        squares = sum(w.pow(2).sum((1, 2)) for w in qkv) + o.pow(2).sum((1, 2))
        return squares.sqrt()

    def keep(r: nn.Module, heads_kept: torch.Tensor) -> None:
        features = (heads_kept[:, None] * head_size + torch.arange(head_size)).reshape(-1)
        attn = _child(r, path)
        for n in ("query", "key", "value"):
            _keep_outputs(_child(attn, n), features)
        _keep_inputs(_child(r, out_path), features)
        # The forward reshapes to (-1, head_size); these attributes are read by some
        # attention implementations and by anyone inspecting the layer.
        attn.num_attention_heads = len(heads_kept)
        attn.all_head_size = len(features)

    found.groups.append(UnitGroup(path, "heads", heads, per_head, score, keep))


# ---------------------------------------------------------------------------------- FFN neurons

def _ffn_neurons(path: str, module: nn.Module, found: Found) -> None:
    up, down = _child(module, "intermediate.dense"), _child(module, "output.dense")
    if not isinstance(up, nn.Linear) or not isinstance(down, nn.Linear):
        return
    if down.in_features != up.out_features or down.out_features != up.in_features:
        found.skipped.append((path, f"intermediate.dense {tuple(up.weight.shape)} and output.dense "
                                    f"{tuple(down.weight.shape)} are not a hidden->I->hidden pair"))
        return
    per_neuron = up.in_features + (1 if up.bias is not None else 0) + down.out_features
    up_path, down_path = _join(path, "intermediate.dense"), _join(path, "output.dense")

    def score(r: nn.Module) -> torch.Tensor:
        return (_child(r, up_path).weight.pow(2).sum(1) + _child(r, down_path).weight.pow(2).sum(0)).sqrt()

    def keep(r: nn.Module, neurons: torch.Tensor) -> None:
        _keep_outputs(_child(r, up_path), neurons)
        _keep_inputs(_child(r, down_path), neurons)

    found.groups.append(UnitGroup(path, "neurons", up.out_features, per_neuron, score, keep))


# ------------------------------------------------------------------------------- conv channels

MBCONV = ("_expand_conv", "_bn0", "_depthwise_conv", "_bn1", "_project_conv")


def _mbconv_channels(path: str, module: nn.Module, found: Found) -> None:
    parts = [_child(module, n) for n in MBCONV]
    if any(p is None for p in parts):
        return
    expand, bn0, dw, bn1, project = parts
    width = getattr(expand, "out_channels", None)
    why = _mbconv_mismatch(parts, width)
    if why is None and any(_child(module, n) is not None for n in ("_se_reduce", "_se_expand")):
        why = "squeeze-and-excitation convs also read the expanded channels (not rewritten by kiln yet)"
    if why:
        found.skipped.append((path, why))
        return
    per_channel = sum(p[0].numel() for p in (expand.weight, dw.weight)) + project.weight[:, 0].numel()
    per_channel += sum(1 for p in (expand.bias, dw.bias) if p is not None)
    per_channel += sum(1 for bn in (bn0, bn1) for p in (bn.weight, bn.bias) if p is not None)
    names = [_join(path, n) for n in MBCONV]

    def score(r: nn.Module) -> torch.Tensor:
        e, b0, d, b1, p = (_child(r, n) for n in names)
        e_w = e.weight.flatten(1) * _bn_scale(b0)[:, None]
        d_w = d.weight.flatten(1) * _bn_scale(b1)[:, None]
        return (e_w.pow(2).sum(1) + d_w.pow(2).sum(1) + p.weight.transpose(0, 1).flatten(1).pow(2).sum(1)).sqrt()

    def keep(r: nn.Module, channels: torch.Tensor) -> None:
        e, b0, d, b1, p = (_child(r, n) for n in names)
        _keep_outputs(e, channels)
        _keep_batchnorm(b0, channels)
        _keep_outputs(d, channels)
        d.in_channels = d.groups = len(channels)
        _keep_batchnorm(b1, channels)
        _keep_inputs(p, channels)

    found.groups.append(UnitGroup(path, "channels", width, per_channel, score, keep))


def _mbconv_mismatch(parts: list, width) -> str | None:
    expand, bn0, dw, bn1, project = parts
    if not all(isinstance(c, nn.Conv2d) for c in (expand, dw, project)):
        return "expand/depthwise/project are not all Conv2d"
    if not all(isinstance(b, nn.BatchNorm2d) for b in (bn0, bn1)):
        return "the norms after expand and depthwise are not BatchNorm2d"
    if expand.groups != 1 or project.groups != 1 or expand.kernel_size != (1, 1) or project.kernel_size != (1, 1):
        return "expand and project are not plain 1x1 convs"
    if not (dw.groups == dw.in_channels == dw.out_channels == width == project.in_channels
            == bn0.num_features == bn1.num_features):
        return f"channel counts do not line up around a depthwise conv over {width} channels"
    return None


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    return gamma / (bn.running_var + bn.eps).sqrt()


# ---------------------------------------------------------------------------------- rewrites

def _param(old: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.clone().contiguous(), requires_grad=old.requires_grad)


# nn.Linear and nn.Conv2d keep their output units on the weight's axis 0 and their inputs on axis 1;
# only the attributes that count them are named differently
def _counts(layer: nn.Linear | nn.Conv2d) -> tuple[str, str]:
    return ("out_channels", "in_channels") if isinstance(layer, nn.Conv2d) else ("out_features", "in_features")


def _keep_outputs(layer: nn.Linear | nn.Conv2d, kept: torch.Tensor) -> None:
    layer.weight = _param(layer.weight, layer.weight[kept])
    if layer.bias is not None:
        layer.bias = _param(layer.bias, layer.bias[kept])
    setattr(layer, _counts(layer)[0], len(kept))


def _keep_inputs(layer: nn.Linear | nn.Conv2d, kept: torch.Tensor) -> None:
    layer.weight = _param(layer.weight, layer.weight[:, kept])
    setattr(layer, _counts(layer)[1], len(kept))


def _keep_batchnorm(bn: nn.BatchNorm2d, channels: torch.Tensor) -> None:
    if bn.weight is not None:
        bn.weight = _param(bn.weight, bn.weight[channels])
        bn.bias = _param(bn.bias, bn.bias[channels])
    if bn.running_mean is not None:
        bn.running_mean = bn.running_mean[channels].clone()
        bn.running_var = bn.running_var[channels].clone()
    bn.num_features = len(channels)
