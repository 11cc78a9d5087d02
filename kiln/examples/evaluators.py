"""The bundled real data as `metric(predict, dataset) -> float` evaluations (higher is better),
the form kiln.sweep and kiln.Budget(metric=, dataset=) take, for the example models.

- sentence pairs (all-MiniLM-L6-v2): Spearman's rank correlation between each labelled pair's
  embedding similarity and its label (paraphrase 2 > related 1 > unrelated 0), over the pairs of
  groups 1..EVAL_GROUPS: how well the embeddings still rank meaning, as STS benchmarks score it.
- photos (EfficientNet-Lite0): the fraction of the 102 photo views whose top-1 ImageNet class is
  the fp32 eager model's (the photos carry no labels of their own, so fp32's answer is the key).

Each comes with calibration samples from data the metric does not evaluate (accuracy.py's
held-out sentence groups and calibration views), for the integer precisions a sweep tries: 12
by default, since precision="auto" measures every layer on each sample, once per point (48
EfficientNet-Lite0 samples took minutes per point on two cores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from kiln.examples import accuracy, models


@dataclass(frozen=True)
class Evaluation:
    metric: Callable[[Callable, Any], float]
    dataset: list  # model inputs, each shaped like the example inputs
    calibration: list
    description: str


def _batches(tensors: tuple[torch.Tensor, ...], batch: int) -> list[tuple[torch.Tensor, ...]]:
    """Rows in calls of exactly `batch` (engines compiled for a fixed batch): the last one padded
    by repeating its last row."""
    calls = []
    for start in range(0, tensors[0].shape[0], batch):
        chunk = [t[start:start + batch] for t in tensors]
        missing = batch - chunk[0].shape[0]
        if missing:
            chunk = [torch.cat([c, c[-1:].expand(missing, *c.shape[1:])]) for c in chunk]
        calls.append(tuple(chunk))
    return calls


CALIBRATION_SAMPLES = 12


def sentence_pairs(batch: int = 1, seq: int = 128, calibration_samples: int = CALIBRATION_SAMPLES) -> Evaluation:
    """MiniLM called as model(input_ids, attention_mask) with `batch` sentences of `seq` tokens."""
    pairs = accuracy.load_pairs(accuracy.EVAL_GROUPS)
    sentences = accuracy.distinct_sentences(pairs)
    ids, mask = models.sentence_tokens(sentences, seq=seq)
    index = {s: i for i, s in enumerate(sentences)}
    a = torch.tensor([index[p.a] for p in pairs])
    b = torch.tensor([index[p.b] for p in pairs])
    labels = torch.tensor([float(p.label) for p in pairs])

    def pair_spearman_vs_labels(predict: Callable, dataset: list) -> float:
        hidden = torch.cat([accuracy._last_hidden_state(predict(*call)).float() for call in dataset])[:len(sentences)]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1).clamp(min=1), dim=-1)
        return accuracy.spearman((pooled[a] * pooled[b]).sum(-1), labels)

    return Evaluation(pair_spearman_vs_labels, _batches((ids, mask), batch),
                      accuracy.sentence_calibration(batch=batch, seq=seq, count=calibration_samples * batch),
                      f"{len(pairs)} labelled sentence pairs ({len(sentences)} sentences, groups 1-{accuracy.EVAL_GROUPS}); "
                      f"calibration on the held-out groups")


def photos(reference_model: Callable, batch: int = 1, size: int = 224,
           calibration_samples: int = CALIBRATION_SAMPLES) -> Evaluation:
    """EfficientNet-Lite0 called as model(pixels) with `batch` images of size x size; the fp32
    `reference_model` gives each view's class."""
    images = accuracy.load_images(size=size)
    dataset = _batches((images.pixels,), batch)
    count = len(images.names)
    with torch.no_grad():
        reference = torch.cat([accuracy._logits(reference_model(*call)) for call in dataset])[:count].argmax(-1)

    def top1_agreement_with_fp32(predict: Callable, calls: list) -> float:
        got = torch.cat([accuracy._logits(predict(*call)).float() for call in calls])[:count].argmax(-1)
        return float((got == reference).double().mean())

    # the calibration views come view by view, so the first 12 are two views of each of the six photos
    calibration = accuracy.photo_calibration(batch=batch, size=size)[:calibration_samples]
    return Evaluation(top1_agreement_with_fp32, dataset, calibration,
                      f"{count} photo views ({len(accuracy.PHOTOS)} photos x {len(accuracy.VIEWS)} views); "
                      "calibration on other views")
