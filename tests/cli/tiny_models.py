"""Model factories for the CLI tests, named on the command line as `tiny_models:FACTORY`.

The CLI imports this module by name, so the tests put this folder on sys.path (in-process)
or PYTHONPATH (subprocess). Weights are seeded so eager references are reproducible.
"""

from __future__ import annotations

import torch


class Tiny(torch.nn.Module):
    """One Linear and a tanh: an output that is never all zeros (see all_zero below)."""

    def __init__(self, out_features: int = 4):
        super().__init__()
        self.fc = torch.nn.Linear(8, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class AllZero(torch.nn.Module):
    """relu of a Linear with zero weights and negative bias: every output element is 0."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.fill_(-1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


def tiny(out_features: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return Tiny(out_features).eval()


def tiny_with_inputs():
    model = tiny()
    return model, (torch.randn(2, 8, generator=torch.Generator().manual_seed(1)),)


def all_zero() -> torch.nn.Module:
    return AllZero().eval()


def not_a_model():
    return 42


def calibration(batch: int = 2) -> list[torch.Tensor]:
    """Calibration samples for `tiny`: `batch` rows each, as its example inputs have."""
    generator = torch.Generator().manual_seed(2)
    return [torch.randn(batch, 8, generator=generator) for _ in range(4)]


def not_samples():
    return 42


class SparseMlp(torch.nn.Module):
    """Two 256-wide linears (large enough for 2:4 sparsity to pay) and a small head (too small)."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(256, 256)
        self.fc2 = torch.nn.Linear(256, 256)
        self.head = torch.nn.Linear(256, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def sparse_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return SparseMlp().eval()
