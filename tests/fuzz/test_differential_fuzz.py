"""Differential fuzzing, CI-sized: random small models (fuzz/generator.py) compiled by kiln on
each backend must match eager PyTorch, on kiln's own verification inputs and on a fresh input
(at another batch size when the batch is dynamic). The seed range is fixed, so a failure names
a seed that reproduces it:

    python bench/fuzz_long.py --start SEED --count 1 --backends onnxruntime --in-process

Seeds whose model a backend refuses on purpose (its capability table says why) are listed with
the text the refusal must contain. Every case also runs the harness's probes (ids at the edges of
their range and past it, a batch of one; padded masks for the masked family). Bugs the fuzzer
found keep a minimal regression test in test_fuzz_found_bugs.py. bench/fuzz_long.py runs the
same cases over many more seeds, NaN/Inf probes included.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.utils._pytree as pytree

from fuzz.generator import call, describe, random_model
from fuzz.harness import run_case

ORT_SEEDS = range(0, 150)  # about 1 s each
INDUCTOR_SEEDS = (0, 1, 5, 7)  # about 10 s each; conv+BN, attention, pooling, norms, dict/tuple outputs

# Seeds whose model a backend refuses on purpose, with the text its reason must contain; any
# other failure of these seeds is a plain failure.
SDPA_3D = "converts scaled_dot_product_attention only with 4-d"
EXPECTED_REFUSALS: dict[tuple[str, int], str] = {("onnxruntime", 3): SDPA_3D, ("onnxruntime", 32): SDPA_3D,
                                                 ("onnxruntime", 105): SDPA_3D}


def _check(seed: int, backend: str) -> None:
    result = run_case(seed, backend)
    if result.outcome == "ok":
        return
    expected = EXPECTED_REFUSALS.get((backend, seed))
    if expected is not None and result.outcome == "kiln_error" and expected in result.error:
        return  # refused with the capability table's reason, before any build
    raise AssertionError(result.summary() + "".join(
        f"\n  {key}: {value}" for key, value in result.details.items() if key in ("root_cause", "traceback", "message")))


@pytest.mark.parametrize("seed", list(ORT_SEEDS))
def test_onnxruntime_matches_eager(seed):
    _check(seed, "onnxruntime")


@pytest.mark.parametrize("seed", list(INDUCTOR_SEEDS))
def test_inductor_matches_eager(seed):
    _check(seed, "inductor")


MASKED_SEEDS = range(0, 12)  # text encoders fed padded masks (fuzz/masked.py); about 1 s each


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("seed", list(MASKED_SEEDS))
def test_masked_encoders_match_eager_on_padded_batches(seed, backend):
    pytest.importorskip(backend)
    result = run_case(seed, backend, family="masked")
    assert result.outcome == "ok", result.summary() + f"\n  {result.details}"


def test_generator_is_deterministic():
    for seed in (0, 3, 11, 42):
        first, second = random_model(seed), random_model(seed)
        assert describe(first[0]) == describe(second[0])
        assert first[2] == second[2]
        for a, b in zip(pytree.tree_leaves(first[1]), pytree.tree_leaves(second[1])):
            assert torch.equal(a, b)
        with torch.no_grad():
            for a, b in zip(pytree.tree_leaves(call(first[0], first[1])), pytree.tree_leaves(call(second[0], second[1]))):
                assert torch.equal(a, b)


def test_generator_covers_the_claimed_ops():
    """The CI seed range must keep exercising every op family (a generator change that starved
    one would otherwise go unnoticed)."""
    seen: collections.Counter = collections.Counter()
    dynamic = dict_inputs = 0
    kinds = collections.Counter()
    for seed in ORT_SEEDS:
        model, example, dyn = random_model(seed)
        dynamic += dyn is not None
        dict_inputs += isinstance(example, dict)
        kinds[model.out_kind] += 1
        for step in model.steps:
            seen[step.label.split("(")[0].lower()] += 1
    families = {
        "conv1d": ["conv1d"], "conv2d": ["conv2d"], "linear": ["linear"], "matmul": ["matmul", "bmm"],
        "batchnorm": ["batchnorm1d", "batchnorm2d"], "layernorm": ["layernorm"], "groupnorm": ["groupnorm"],
        "activations": ["relu", "gelu", "gelu_tanh", "silu", "hardswish", "sigmoid", "tanh", "relu6", "hardtanh"],
        "softmax": ["softmax", "log_softmax"], "attention": ["attention"], "dropout": ["dropout"],
        "reshape": ["reshape", "view", "flatten", "permute", "transpose", "transpose_contig", "unsqueeze", "squeeze"],
        "broadcast": ["add", "sub", "mul", "div"], "residual": ["residual_add"], "reduce": ["sum", "mean", "amax"],
        "concat": ["cat", "stack"], "split": ["split", "chunk"],
        "pool": ["max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                 "adaptiveavgpool1d", "adaptiveavgpool2d"],
        "embedding": ["embedding", "f.embedding"],
    }
    missing = [family for family, labels in families.items() if not any(seen[label] for label in labels)]
    assert not missing, f"no CI seed exercises {missing}; seen: {dict(seen)}"
    assert dynamic >= 20 and dict_inputs >= 20, (dynamic, dict_inputs)
    assert set(kinds) == {"single", "tuple", "list", "dict"}, kinds
