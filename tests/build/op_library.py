"""A user's torch.library ops for the isolated-build tests: one that decomposes (any backend
whose table takes every op may build it) and one with its own kernel."""

import torch

_lib = torch.library.Library("kiln_build_test", "DEF")
_lib.define("scaled_tanh(Tensor x) -> Tensor")
_lib.impl("scaled_tanh", lambda x: torch.tanh(x) * 1.5, "CompositeImplicitAutograd")


@torch.library.custom_op("kiln_build_test::bump", mutates_args=())
def bump(x: torch.Tensor) -> torch.Tensor:
    return x + 1.0


@bump.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)
