"""CompiledModel: checks a call's inputs against the compiled spec, runs the plan's engines in
order (passing named tensors between partitions) and rebuilds the model's output structure."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from kiln import artifact
from kiln.backends.base import Engine
from kiln.frontend.input_spec import check_call
from kiln.ir import PartitionPlan
from kiln.report import Report
from kiln.types import InputSpec


class Outputs(dict):
    """A dict of outputs that also reads by attribute (`out.last_hidden_state`), as
    transformers' ModelOutput does."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no output named {name!r}; outputs: {', '.join(self)}") from None


# Outputs is a dict to pytree utilities too (tree_leaves, tree_map), not an opaque leaf.
pytree.register_pytree_node(
    Outputs,
    lambda d: (list(d.values()), list(d.keys())),
    lambda values, keys: Outputs(zip(keys, values)),
    serialized_type_name="kiln.runtime.Outputs",
    flatten_with_keys_fn=lambda d: ([(pytree.MappingKey(k), v) for k, v in d.items()], list(d.keys())),
)


class CompiledModel:
    def __init__(self, plan: PartitionPlan, engines: dict[str, Engine], input_spec: InputSpec, output_structure: str,
                 report: Report, profile: dict, output_none_positions: tuple[int, ...] = ()):
        self.plan = plan
        self.engines = engines
        self.input_spec = input_spec
        self.output_structure = output_structure
        self._treespec = pytree.treespec_loads(output_structure)
        self.output_none_positions = tuple(output_none_positions)  # None leaves of the output, put back per call
        self.report = report
        self.profile = profile  # {"name", "digest"} of the profile it was built for

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tensors = check_call(self.input_spec, args, kwargs)
        if self._treespec.is_leaf() and not self.output_none_positions:  # one tensor out: nothing to rebuild
            return self.run_flat(tensors)[0]
        flat = iter(self.run_flat(tensors))
        leaves = [None if i in self.output_none_positions else next(flat) for i in range(self._treespec.num_leaves)]
        return _with_attribute_dicts(pytree.tree_unflatten(leaves, self._treespec))

    def run_flat(self, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Run on flat, already-checked inputs in spec order; flat outputs in plan order."""
        if len(self.plan.partitions) == 1:  # one engine: nothing to route or move
            partition = self.plan.partitions[0]
            return tuple(self.engines[partition.name](*tensors))
        # value name -> {torch device: tensor}: a tensor moved to a device once stays there for
        # every later partition on that device
        values: dict[str, dict[torch.device, torch.Tensor]] = {n: {t.device: t} for n, t in zip(self.plan.input_names, tensors)}
        for partition in self.plan.partitions:
            engine = self.engines[partition.name]
            device = torch.device(getattr(engine, "input_device", "cpu"))
            outs = engine(*(_on(values[n], device) for n in partition.graph.input_names))
            for name, out in zip(partition.graph.output_names, outs):
                values[name] = {out.device: out}
        host = torch.device("cpu")  # outputs come back where eager PyTorch would give them
        return tuple(_on(values[n], host) for n in self.plan.sources())

    @property
    def backends(self) -> dict[str, str]:
        return {p.name: p.backend for p in self.plan.partitions}

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the artifact: a single file (zip, no pickle) or, for a path ending in '/' or an
        existing directory, a directory. An existing path is replaced only when it is a kiln
        artifact and overwrite=True (atomically: a crash leaves the old or the new artifact);
        anything else there is refused with an ArtifactError and left untouched."""
        return artifact.save(self, Path(path), as_directory=str(path).endswith("/") or Path(path).is_dir(),
                             overwrite=overwrite)

    def __repr__(self) -> str:
        parts = ", ".join(f"{p.name}@{p.device}:{p.backend}" for p in self.plan.partitions)
        return f"CompiledModel({self.report.model}, profile={self.profile['name']}, partitions=[{parts}])"


def load(path: str | Path, threads: int | None = None, expected_digest: str | None = None,
         runtime_cache: Path | None = None) -> CompiledModel:
    """Load an artifact written by CompiledModel.save, every check on names, sizes, checksums
    and versions done before any engine loads (kiln.artifact.read says which, and what
    runtime_cache is for)."""
    loaded = artifact.read(path, threads, expected_digest, runtime_cache)
    compiled = CompiledModel(loaded.plan, loaded.engines, loaded.input_spec, loaded.output_structure, loaded.report,
                             loaded.profile, loaded.output_none_positions)
    weakref.finalize(compiled, loaded.close)  # engines may read their files lazily; remove them with the model
    return compiled


def _on(copies: dict[torch.device, torch.Tensor], device: torch.device) -> torch.Tensor:
    if device not in copies:
        copies[device] = next(iter(copies.values())).to(device, non_blocking=False)
    return copies[device]


def _with_attribute_dicts(value: Any) -> Any:
    if isinstance(value, dict):
        return Outputs({k: _with_attribute_dicts(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_with_attribute_dicts(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_with_attribute_dicts(v) for v in value)
    return value
