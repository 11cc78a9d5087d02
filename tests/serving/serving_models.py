"""Small models and their artifacts for the serving tests.

`Masked` takes a batch of sequences and their mask, like a text encoder: per-token outputs
(batch, seq, 3) and a pooled output (batch, 3), so outputs keep the batch on axis 0 and one of
them also carries the dynamic sequence length. Weights are seeded."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import kiln

DYNAMIC = {"x": {0: kiln.Dim("batch", min=1, max=32), 1: kiln.Dim("seq", min=1, max=16)},
           "mask": {0: kiln.Dim("batch", min=1, max=32), 1: kiln.Dim("seq", min=1, max=16)}}


class Masked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = torch.tanh(self.fc(x)) * mask.unsqueeze(-1)
        return {"tokens": tokens, "pooled": tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)}


def masked_model() -> Masked:
    torch.manual_seed(0)
    return Masked().eval()


def example(rows: int = 2, seq: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, seq, 8, generator=generator)
    lengths = torch.randint(1, seq + 1, (rows,), generator=generator)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).float()
    return x, mask


def compile_masked(path: Path, backend: str, dynamic: dict | None = DYNAMIC) -> Path:
    """Compile `Masked` for `backend` and save it at `path` (a zip artifact)."""
    compiled = kiln.optimize(masked_model(), "cpu-x86", example(), dynamic=dynamic, backend=backend)
    return compiled.save(path)


class SentenceEmbedding(torch.nn.Module):
    """A text encoder's token states mean-pooled over the attention mask, as
    sentence-transformers encodes: one vector per sentence, unchanged by padding."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


SENTENCES = ["A cat sat.", "The weather turned cold overnight, and the river froze at its edges.",
             "Compilers make models fast.", "Batching requests keeps the cores busy while each waits a little."]


def free_port() -> int:
    """A TCP port nothing listens on now (servers in tests never take a fixed one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def concurrently(calls: list) -> list:
    """Run the calls from one thread each, released together (so a server sees them at once)."""
    start = threading.Barrier(len(calls))

    def run(call):
        start.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))
