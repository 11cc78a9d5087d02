"""A second seeded model family for differential fuzzing: small text encoders fed the way users
feed them, token ids and an attention_mask with padding.

    model, example_inputs, dynamic = masked_model(seed)

Each model embeds `input_ids`, runs one or two attention blocks masked by `attention_mask`
(SDPA with a boolean key mask, or hand-written softmax(QKᵀ)V with the mask added as
finfo.min or filled with -inf, as transformers' eager attention and older code do), and returns
the hidden states and a pooled output (mean over the unmasked tokens, or the first token).
The example mask is all ones, as most users' examples are; the harness then calls the compiled
model with padded masks, fully padded rows included.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from fuzz.generator import InputInfo

MASK_STYLES = ("sdpa_bool", "sdpa_additive", "manual_min", "manual_neg_inf")
POOLS = ("mean", "first", "none")


class MaskedEncoder(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, blocks: int, style: str, pool: str):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(blocks))
        self.out = nn.ModuleList(nn.Linear(dim, dim) for _ in range(blocks))
        self.norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(blocks))
        self.heads, self.style, self.pool = heads, style, pool

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        b, s, d = x.shape
        keep = attention_mask[:, None, None, :]
        for qkv, out, norm in zip(self.qkv, self.out, self.norm):
            q, k, v = (t.reshape(b, s, self.heads, d // self.heads).transpose(1, 2) for t in qkv(x).chunk(3, dim=-1))
            if self.style == "sdpa_bool":
                att = F.scaled_dot_product_attention(q, k, v, attn_mask=keep.bool())
            elif self.style == "sdpa_additive":
                att = F.scaled_dot_product_attention(q, k, v, attn_mask=(1.0 - keep.float()) * torch.finfo(torch.float32).min)
            else:
                scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
                if self.style == "manual_min":
                    scores = scores + (1.0 - keep.float()) * torch.finfo(torch.float32).min
                else:
                    scores = scores.masked_fill(keep == 0, float("-inf"))
                att = scores.softmax(-1) @ v
            x = norm(x + out(att.transpose(1, 2).reshape(b, s, d)))
        if self.pool == "mean":
            weights = attention_mask[..., None].float()
            return x, (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        if self.pool == "first":
            return x, x[:, 0]
        return x


def masked_model(seed: int):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    heads = rng.choice([1, 2, 4])
    dim = heads * rng.choice([4, 8])
    vocab, seq, batch = rng.choice([20, 50, 300]), rng.choice([4, 7, 12]), rng.choice([1, 2, 3])
    style, pool = rng.choice(MASK_STYLES), rng.choice(POOLS)
    model = MaskedEncoder(vocab, dim, heads, rng.choice([1, 2]), style, pool).eval()
    dynamic_batch = rng.random() < 0.5
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, seq, dtype=torch.int64)
    example = {"input_ids": ids, "attention_mask": mask} if rng.random() < 0.5 else (ids, mask)
    dynamic = {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}} if dynamic_batch else None
    model.fuzz_info = {"seed": seed, "attempt": 0, "batch": batch, "dynamic": dynamic_batch,
                       "call": "dict" if isinstance(example, dict) else "tuple", "family": "masked",
                       "inputs": [InputInfo("input_ids", (batch, seq), True, True, vocab),
                                  InputInfo("attention_mask", (batch, seq), True, True, 2)]}
    model.fuzz_label = (f"masked encoder vocab={vocab} dim={dim} heads={heads} blocks={len(model.qkv)} "
                        f"style={style} pool={pool} seq={seq} batch={batch}{' dynamic' if dynamic_batch else ''}")
    return model, example, dynamic


def padded_masks(batch: int, seq: int, seed: int) -> torch.Tensor:
    """Masks as real batches have them: per row ones then padding, a fully padded last row when
    there are two rows or more, and the first row whole."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
    if batch > 1:
        lengths[0], lengths[-1] = seq, 0
    return (torch.arange(seq)[None, :] < lengths[:, None]).to(torch.int64)
