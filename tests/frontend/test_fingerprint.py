"""A model's fingerprint without capture (the compile cache's quick key): it changes with the
model's code, state, weights and call, and says "cannot tell" rather than guess."""

import importlib.util
import sys

import torch
from torch import nn

from kiln.frontend.fingerprint import model_fingerprint


class Scaled(nn.Module):
    def __init__(self, scale=2.0):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("offset", torch.zeros(4))
        self.scale = scale

    def forward(self, x):
        return self.linear(x) * self.scale + self.offset


def _fp(model, x=None, dynamic=None):
    return model_fingerprint(model, (torch.randn(2, 4) if x is None else x,), None, dynamic)


def test_the_same_model_and_call_give_the_same_fingerprint():
    torch.manual_seed(0)
    a = Scaled()
    torch.manual_seed(0)
    b = Scaled()
    assert _fp(a) == _fp(b) is not None
    assert _fp(a, torch.zeros(2, 4)) == _fp(a, torch.ones(2, 4))  # input values do not shape the build


def test_weights_buffers_state_mode_and_call_each_change_it():
    torch.manual_seed(0)
    model = Scaled()
    base = _fp(model)
    with torch.no_grad():
        model.linear.weight[0, 0] += 1e-6
    assert _fp(model) != base
    torch.manual_seed(0)
    model = Scaled()
    model.offset += 1
    assert _fp(model) != base
    torch.manual_seed(0)
    assert _fp(Scaled(scale=3.0)) != base
    torch.manual_seed(0)
    assert _fp(Scaled().eval()) != base  # a new module trains until told otherwise
    torch.manual_seed(0)
    model = Scaled()
    assert _fp(model, torch.randn(3, 4)) != base
    assert _fp(model, torch.randn(2, 4, dtype=torch.float64)) != base
    assert _fp(model, dynamic={"x": {0: "batch"}}) != base


def test_weights_hashed_on_several_threads_change_it_wherever_a_byte_changes(monkeypatch):
    from kiln.frontend import fingerprint

    monkeypatch.setattr(fingerprint, "PARALLEL_BYTES", 1)  # a small model hashed in one run per core
    monkeypatch.setattr(fingerprint.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
    base = _fp(model, torch.randn(2, 8))
    assert base is not None and _fp(model, torch.randn(2, 8)) == base
    for layer in (model[0], model[3], model[5]):  # one in each thread's run
        with torch.no_grad():
            layer.bias[-1] += 1e-6
        assert _fp(model, torch.randn(2, 8)) != base
        with torch.no_grad():
            layer.bias[-1] -= 1e-6
        assert _fp(model, torch.randn(2, 8)) == base
    # the same bytes moved from one tensor to the next (the runs' borders) still change it
    with torch.no_grad():
        first, second = model[2].bias.clone(), model[3].bias.clone()
        model[2].bias.copy_(second)
        model[3].bias.copy_(first)
    assert _fp(model, torch.randn(2, 8)) != base


def test_a_change_to_the_model_s_source_file_changes_it(tmp_path):
    source = tmp_path / "fingerprinted_model.py"

    def load(body):
        source.write_text("import torch\n\nclass M(torch.nn.Module):\n    def forward(self, x):\n        return " + body + "\n")
        spec = importlib.util.spec_from_file_location("fingerprinted_model", source)
        module = importlib.util.module_from_spec(spec)
        sys.modules["fingerprinted_model"] = module
        spec.loader.exec_module(module)
        return module.M()

    try:
        first = _fp(load("x * 2"))
        assert _fp(load("x * 3")) != first
    finally:
        sys.modules.pop("fingerprinted_model", None)


def test_code_reached_through_a_helper_in_another_file_counts(tmp_path):
    helper = tmp_path / "fingerprint_helper.py"
    user = tmp_path / "fingerprint_user.py"
    user.write_text("import torch\nfrom fingerprint_helper import act\n\nclass M(torch.nn.Module):\n"
                    "    def forward(self, x):\n        return act(x)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        prints = []
        for body in ("x.relu()", "x.tanh()"):
            helper.write_text(f"def act(x):\n    return {body}\n")
            for name in ("fingerprint_helper", "fingerprint_user"):
                sys.modules.pop(name, None)
            prints.append(_fp(importlib.import_module("fingerprint_user").M()))
        assert prints[0] != prints[1]
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("fingerprint_helper", "fingerprint_user"):
            sys.modules.pop(name, None)


def test_it_cannot_tell_for_hooks_or_state_it_cannot_read():
    model = Scaled()
    model.register_forward_hook(lambda module, args, out: out * 2)
    assert _fp(model) is None
    model = Scaled()
    model.helper = object()
    assert _fp(model) is None
