"""The model class Triton's python backend runs for a kiln artifact (a generated model.py
imports it): the artifact is loaded once per instance, and each list of requests Triton hands
`execute` runs as few engine calls as their shapes allow (kiln.serving.batching).

`triton_python_backend_utils` exists only inside Triton's python stub, so it is imported in
`initialize`, not at module level."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kiln.errors import KilnError
from kiln.serving.batching import batch_layout, flat_output_names, run_batched


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        from kiln.runtime import load

        self._pb = pb_utils
        config = json.loads(args["model_config"])
        threads = config.get("parameters", {}).get("kiln_threads", {}).get("string_value")
        version = Path(args["model_repository"]) / args["model_version"]
        self.compiled = load(version / "model.kiln", threads=int(threads) if threads else None)
        batch_layout(self.compiled.input_spec, where=str(version / "model.kiln"))
        self.max_rows = int(config["max_batch_size"])
        self.input_names = self.compiled.input_spec.names
        self.output_names = flat_output_names(self.compiled.plan)
        # a batch-only input is declared with dims [1] reshaped to []: give it back its rank
        self.ranks = {t.name: len(t.shape) for t in self.compiled.input_spec.tensors}

    def execute(self, requests: list) -> list:
        pb = self._pb
        flat: list[list[torch.Tensor]] = []
        for request in requests:
            tensors = []
            for name in self.input_names:
                found = pb.get_input_tensor_by_name(request, name)
                array = np.array(found.as_numpy()) if found is not None else None  # a copy: Triton's buffer is read-only
                tensors.append(None if array is None else torch.from_numpy(array).reshape(
                    array.shape[:self.ranks[name]] if array.ndim > self.ranks[name] else array.shape))
            flat.append(tensors)
        results = run_batched(self.compiled, flat, self.max_rows)
        responses = []
        for result in results:
            if isinstance(result, KilnError):
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(result).replace("\n", " "))))
            else:
                responses.append(pb.InferenceResponse(output_tensors=[
                    pb.Tensor(name, np.ascontiguousarray(out.numpy())) for name, out in zip(self.output_names, result)]))
        return responses

    def finalize(self) -> None:
        self.compiled = None
