"""A custom op no exporter converts, for the eager-fallback tests. Importing this module
registers it (a CPU kernel and a fake implementation); a process loading an artifact that
uses it must import this module first."""

import torch


@torch.library.custom_op("kiln_test::shifted_swish", mutates_args=())
def shifted_swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x) + 0.25


@shifted_swish.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)
