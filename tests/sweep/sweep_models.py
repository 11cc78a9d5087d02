"""A tiny model, its data and a metric for the sweep's command-line tests (importable as
`sweep_models` once this folder is on sys.path)."""

import torch
from torch import nn


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    return model, (torch.randn(2, 16),)


def inputs():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 16, generator=gen),) for _ in range(4)]


def mean_output(predict, dataset) -> float:
    """A stand-in score: higher when the model's outputs are larger."""
    return float(sum(predict(*item).mean() for item in dataset))
