"""Accuracy on real data: how far a candidate (a kiln artifact, a reduced-precision build) moves
from the fp32 eager model on inputs that mean something, where random tensors would not tell.

Sentences (all-MiniLM-L6-v2): `data/sentence_pairs.jsonl` holds 300 English sentence pairs in
100 groups; each anchor sentence is paired with a paraphrase (label 2), a sentence on the same
topic that says something else (1) and an unrelated sentence (0). 400 distinct sentences of 5-36
words. Embeddings are mean-pooled over the attention mask and normalised, as
sentence-transformers' `encode` does.

Images (EfficientNet-Lite0): the RGB photographs scikit-image ships inside its wheel (read from
`skimage.data.data_dir`, never fetched), each in 17 deterministic views (crops, flips, zooms,
small rotations, brightness and contrast) -> 102 inputs. Lite models were trained on
(pixel - 127) / 128, not ImageNet's per-channel mean and std: with it the bundled cat, coffee and
motorcycle photos get their ImageNet classes at higher confidence than with the ImageNet
normalisation.

    python -m kiln.examples.accuracy --model minilm|efficientnet_lite0 --artifact model.kiln
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from kiln.errors import KilnError
from kiln.examples import models
from kiln.examples.models import MissingExample

LABELS = {0: "unrelated", 1: "related", 2: "paraphrase"}
EVAL_GROUPS = 90  # sentence groups 1-90 are evaluated; the sentences of the rest calibrate
PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png")
CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
LITE_MEAN, LITE_STD = 127.0, 128.0


# ---------------------------------------------------------------------------------------- sentences

@dataclass(frozen=True)
class SentencePair:
    group: int
    topic: str
    a: str
    b: str
    label: int  # 2 paraphrase, 1 related, 0 unrelated


def load_pairs(groups: int | None = None) -> list[SentencePair]:
    """The bundled sentence pairs; `groups` keeps the first n anchors with their three pairs each."""
    text = resources.files("kiln.examples").joinpath("data/sentence_pairs.jsonl").read_text(encoding="utf-8")
    pairs = [SentencePair(**json.loads(line)) for line in text.splitlines() if line.strip()]
    return pairs if groups is None else [p for p in pairs if p.group <= groups]


def distinct_sentences(pairs: Sequence[SentencePair]) -> list[str]:
    """Every sentence of `pairs` once, in first-seen order."""
    return list(dict.fromkeys(s for p in pairs for s in (p.a, p.b)))


def sentence_calibration(batch: int = 1, seq: int = 128, count: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Calibration samples for MiniLM: (input_ids, attention_mask) batches of `batch` sentences
    from the groups after EVAL_GROUPS, which the sentence agreement does not evaluate.
    `kiln compile kiln.examples.models:minilm --calibration kiln.examples.accuracy:sentence_calibration`"""
    held_out = distinct_sentences([p for p in load_pairs() if p.group > EVAL_GROUPS])[:count]
    ids, mask = models.sentence_tokens(held_out, seq=seq)
    return [(ids[i:i + batch], mask[i:i + batch]) for i in range(0, len(held_out) - batch + 1, batch)]


def _last_hidden_state(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) or hasattr(out, "last_hidden_state"):
        return out["last_hidden_state"]
    return out[0]  # a tuple of outputs: transformers puts the hidden states first


def _logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _in_fixed_batches(fn: Callable, tensors: Sequence[torch.Tensor], batch: int, pick: Callable) -> torch.Tensor:
    """Run `fn` over the rows of `tensors` `batch` rows at a time; the last batch is padded by
    repeating its last row so that engines compiled for a fixed batch size can run it."""
    outs = []
    with torch.no_grad():
        for start in range(0, tensors[0].shape[0], batch):
            chunk = [t[start:start + batch] for t in tensors]
            rows = chunk[0].shape[0]
            if rows < batch:
                chunk = [torch.cat([c, c[-1:].expand(batch - rows, *c.shape[1:])]) for c in chunk]
            outs.append(pick(fn(*chunk))[:rows].float())
    return torch.cat(outs)


def sentence_embeddings(fn: Callable, ids: torch.Tensor, mask: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Unit-length sentence embeddings: the last hidden state mean-pooled over the attention mask."""
    hidden = _in_fixed_batches(fn, (ids, mask), batch, _last_hidden_state)
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks starting at 0, ties sharing their average rank (as Spearman's rho needs)."""
    order = torch.argsort(values, stable=True)
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = torch.arange(len(values), dtype=torch.float64)
    unique, inverse = torch.unique(values, return_inverse=True)
    if len(unique) < len(values):
        sums = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks)
        counts = torch.bincount(inverse, minlength=len(unique)).to(torch.float64)
        ranks = (sums / counts)[inverse]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-d tensors."""
    rx, ry = _ranks(x.flatten()), _ranks(y.flatten())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum()) / denominator if denominator > 0 else float("nan")


def order_kept(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Fraction of all (i, j) with i < j whose order (<, =, >) is the same in both."""
    r, c = reference.flatten().double(), candidate.flatten().double()
    upper = torch.triu(torch.ones(len(r), len(r), dtype=torch.bool), diagonal=1)
    same = torch.sign(r[:, None] - r[None, :]) == torch.sign(c[:, None] - c[None, :])
    return float(same[upper].double().mean()) if len(r) > 1 else 1.0


def label_separation(similarity: torch.Tensor, labels: Sequence[int]) -> tuple[float, dict[str, float]]:
    """How well pair similarities separate paraphrases from unrelated pairs: the fraction of
    (paraphrase, unrelated) combinations where the paraphrase scores higher (ROC AUC), and the
    mean similarity per label."""
    labels_t = torch.tensor(list(labels))
    means = {LABELS[k]: float(similarity[labels_t == k].mean()) for k in sorted(LABELS) if (labels_t == k).any()}
    para, unrelated = similarity[labels_t == 2], similarity[labels_t == 0]
    if not len(para) or not len(unrelated):
        return float("nan"), means
    diff = para[:, None] - unrelated[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean()), means


@dataclass(frozen=True)
class EmbeddingAgreement:
    sentences: int
    pairs: int
    cosine_min: float  # per sentence: cosine between candidate and reference embedding
    cosine_mean: float
    cosine_p1: float  # 1st percentile
    pair_spearman: float  # rank correlation of the labelled pairs' similarities
    pair_order_kept: float  # fraction of pair-vs-pair similarity orderings kept
    neighbour_agreement: float  # fraction of sentences whose nearest other sentence is unchanged
    separation_reference: float  # paraphrase-vs-unrelated ROC AUC of the reference
    separation_candidate: float
    label_means_reference: dict[str, float] = field(default_factory=dict)
    label_means_candidate: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        def means(m: dict[str, float]) -> str:
            return ", ".join(f"{k} {v:.3f}" for k, v in m.items())

        return "\n".join([
            f"sentences {self.sentences}, pairs {self.pairs}",
            f"embedding cosine vs fp32: min {self.cosine_min:.6f} (1 - min = {1 - self.cosine_min:.2g})  "
            f"p1 {self.cosine_p1:.6f}  mean {self.cosine_mean:.6f}",
            f"pair similarity ranking: spearman {self.pair_spearman:.6f}  order kept {self.pair_order_kept:.2%}",
            f"nearest neighbour unchanged: {self.neighbour_agreement:.2%}",
            f"paraphrase vs unrelated AUC: reference {self.separation_reference:.3f}  candidate {self.separation_candidate:.3f}",
            f"mean pair similarity: reference ({means(self.label_means_reference)}); "
            f"candidate ({means(self.label_means_candidate)})",
        ])


def embedding_agreement(reference_model: Callable, candidate_fn: Callable, pairs: Sequence[SentencePair] | None = None,
                        batch: int = 16, seq: int = 64) -> EmbeddingAgreement:
    """Compare `candidate_fn(ids, mask)` with the fp32 `reference_model` on the sentence pairs.

    Both are called with `batch` rows of `seq` tokens (MiniLM's tokenizer, padded); outputs may be
    a tensor (the last hidden state), a dict/ModelOutput with `last_hidden_state`, or a tuple."""
    pairs = list(load_pairs() if pairs is None else pairs)
    sentences = distinct_sentences(pairs)
    ids, mask = models.sentence_tokens(sentences, seq=seq)
    ref = sentence_embeddings(reference_model, ids, mask, batch)
    got = sentence_embeddings(candidate_fn, ids, mask, batch)
    cosine = (ref * got).sum(-1)
    index = {s: i for i, s in enumerate(sentences)}
    a = torch.tensor([index[p.a] for p in pairs])
    b = torch.tensor([index[p.b] for p in pairs])
    ref_pairs, got_pairs = (ref[a] * ref[b]).sum(-1), (got[a] * got[b]).sum(-1)
    labels = [p.label for p in pairs]
    sep_ref, means_ref = label_separation(ref_pairs, labels)
    sep_got, means_got = label_separation(got_pairs, labels)
    return EmbeddingAgreement(
        sentences=len(sentences), pairs=len(pairs),
        cosine_min=float(cosine.min()), cosine_mean=float(cosine.mean()),
        cosine_p1=float(torch.quantile(cosine.double(), 0.01)),
        pair_spearman=spearman(ref_pairs, got_pairs), pair_order_kept=order_kept(ref_pairs, got_pairs),
        neighbour_agreement=_neighbour_agreement(ref, got),
        separation_reference=sep_ref, separation_candidate=sep_got,
        label_means_reference=means_ref, label_means_candidate=means_got,
    )


def _neighbour_agreement(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Top-1 retrieval agreement: is each sentence's nearest other sentence the same?"""
    def nearest(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(-1)
    return float((nearest(ref) == nearest(got)).double().mean()) if len(ref) > 1 else 1.0


# ------------------------------------------------------------------------------------------ images

@dataclass(frozen=True)
class ImageSet:
    pixels: torch.Tensor  # N x 3 x size x size, float32, (pixel - 127) / 128
    names: tuple[str, ...]  # "chelsea/center", "coffee/rot+8", ...


def photo(name: str) -> np.ndarray:
    """One of scikit-image's bundled photographs as H x W x 3 uint8, read from the installed
    package; a photo that the installed wheel does not hold is an error, never a download."""
    try:
        import skimage.data
        import skimage.io
    except ImportError:
        raise MissingExample("scikit-image is not installed", where="kiln.examples.accuracy.photo",
                             fix="pip install 'kiln[examples]' (or: pip install scikit-image)") from None
    path = Path(skimage.data.data_dir) / name
    if not path.is_file():
        raise MissingExample(f"{name} is not bundled with the installed scikit-image", where=str(path),
                             fix=f"use one of {', '.join(PHOTOS)} (scikit-image >= 0.19 ships them in its wheel)")
    return np.ascontiguousarray(skimage.io.imread(path)[..., :3])


def _crop(img: np.ndarray, frac: float, y: float, x: float) -> np.ndarray:
    """A square crop of side `frac` x the short side, placed at (y, x) in [0, 1] of the slack."""
    h, w = img.shape[:2]
    side = max(1, int(round(frac * min(h, w))))
    top, left = int(round(y * (h - side))), int(round(x * (w - side)))
    return img[top:top + side, left:left + side]


def _rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    from skimage.transform import rotate

    turned = rotate(img.astype(np.float32), degrees, mode="reflect", preserve_range=True, order=1)
    return _crop(turned, 0.8, 0.5, 0.5)  # drops the reflected corners


def _scaled(img: np.ndarray, gain: float = 1.0, contrast: float = 1.0) -> np.ndarray:
    x = img.astype(np.float32)
    x = (x - x.mean()) * contrast + x.mean()
    return np.clip(x * gain, 0, 255)


# Each view: (name, function of the H x W x 3 photo -> square-ish float or uint8 array).
VIEWS: tuple[tuple[str, Callable[[np.ndarray], np.ndarray]], ...] = (
    ("center", lambda im: _crop(im, 1.0, 0.5, 0.5)),
    ("flip", lambda im: _crop(im, 1.0, 0.5, 0.5)[:, ::-1]),
    ("zoom85", lambda im: _crop(im, 0.85, 0.5, 0.5)),
    ("zoom70", lambda im: _crop(im, 0.7, 0.5, 0.5)),
    ("zoom60", lambda im: _crop(im, 0.6, 0.5, 0.5)),
    ("top-left", lambda im: _crop(im, 0.75, 0.0, 0.0)),
    ("top-right", lambda im: _crop(im, 0.75, 0.0, 1.0)),
    ("bottom-left", lambda im: _crop(im, 0.75, 1.0, 0.0)),
    ("bottom-right", lambda im: _crop(im, 0.75, 1.0, 1.0)),
    ("squash", lambda im: im),  # the whole photo, aspect ratio not kept
    ("shift", lambda im: _crop(im, 0.9, 0.3, 0.7)),
    ("rot+8", lambda im: _rotate(_crop(im, 1.0, 0.5, 0.5), 8)),
    ("rot-8", lambda im: _rotate(_crop(im, 1.0, 0.5, 0.5), -8)),
    ("dark", lambda im: _scaled(_crop(im, 1.0, 0.5, 0.5), gain=0.7)),
    ("bright", lambda im: _scaled(_crop(im, 1.0, 0.5, 0.5), gain=1.3)),
    ("low-contrast", lambda im: _scaled(_crop(im, 1.0, 0.5, 0.5), contrast=0.6)),
    ("flip-zoom", lambda im: _crop(im, 0.7, 0.4, 0.5)[:, ::-1]),
)

# Views for calibrating quantised builds, none of them among VIEWS: calibration data must not be
# the data the accuracy is measured on, but should span the same conditions (framing, mirroring,
# rotation, lighting, contrast, aspect) with other settings, as a user's calibration set spans
# what their model will see. A calibration set of well-lit crops alone left the dark and
# low-contrast views outside the activation ranges it measured. 8 views x 6 photos -> 48 samples.
CALIBRATION_VIEWS: tuple[tuple[str, Callable[[np.ndarray], np.ndarray]], ...] = (
    ("zoom80-left", lambda im: _crop(im, 0.8, 0.5, 0.2)),
    ("zoom80-right-flip", lambda im: _crop(im, 0.8, 0.5, 0.8)[:, ::-1]),
    ("rot+4", lambda im: _rotate(_crop(im, 0.95, 0.5, 0.5), 4)),
    ("dim", lambda im: _scaled(_crop(im, 0.9, 0.6, 0.4), gain=0.85, contrast=0.9)),
    ("darker", lambda im: _scaled(_crop(im, 0.85, 0.4, 0.6), gain=0.6)),
    ("brighter-flip", lambda im: _scaled(_crop(im, 0.9, 0.5, 0.5)[:, ::-1], gain=1.2)),
    ("flat", lambda im: _scaled(_crop(im, 0.8, 0.3, 0.3), contrast=0.5)),
    ("half-rows", lambda im: _crop(im, 1.0, 0.5, 0.5)[::2]),  # squashed to half height
)


def load_images(limit: int | None = None, size: int = 224, photos: Sequence[str] = PHOTOS,
                views: Sequence[tuple[str, Callable]] = VIEWS) -> ImageSet:
    """Every view of every photo, view by view (the first len(photos) are the centre crops), so a
    small `limit` still covers each photo; resized to size x size and normalised for Lite models.
    `views=CALIBRATION_VIEWS` gives calibration samples that are none of the evaluated views."""
    from skimage.transform import resize

    count = len(views) * len(photos) if limit is None else min(limit, len(views) * len(photos))
    originals = {name: photo(name) for name in photos[:count]}
    arrays, names = [], []
    for i in range(count):
        (view, make), name = views[i // len(photos)], photos[i % len(photos)]
        square = resize(np.asarray(make(originals[name]), dtype=np.float32), (size, size),
                        anti_aliasing=True, preserve_range=True, order=1)
        arrays.append(square)
        names.append(f"{Path(name).stem}/{view}")
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(((pixels - LITE_MEAN) / LITE_STD).float(), tuple(names))


def photo_calibration(batch: int = 1, size: int = 224) -> list[tuple[torch.Tensor]]:
    """Calibration samples for EfficientNet-Lite0: batches of the CALIBRATION_VIEWS of the photos,
    none of which the image agreement evaluates.
    `kiln compile kiln.examples.models:efficientnet_lite0 --calibration kiln.examples.accuracy:photo_calibration`"""
    pixels = load_images(size=size, views=CALIBRATION_VIEWS).pixels
    return [(pixels[i:i + batch],) for i in range(0, len(pixels) - batch + 1, batch)]


@dataclass(frozen=True)
class ClassificationAgreement:
    images: int
    top1: float  # candidate's top-1 class equals the reference's
    top5: float  # the reference's top-1 class is in the candidate's top 5
    logit_error_max: float  # largest |candidate - reference| logit over all images
    cosine_min: float  # per image: cosine between candidate and reference logits, the worst image
    logit_error_mean: float  # mean over images of each image's largest logit error
    worst_image: str
    per_image_error: tuple[float, ...]
    disagreements: tuple[str, ...]  # images whose top-1 class changed
    disagreement_margins: tuple[float, ...] = ()  # for each: the reference's top-1 minus top-2 logit

    def describe(self) -> str:
        lines = [f"images {self.images}",
                 f"top-1 agreement {self.top1:.2%}  top-5 agreement {self.top5:.2%}  logit cosine min {self.cosine_min:.5f}",
                 f"worst logit error per image: max {self.logit_error_max:.4g} ({self.worst_image}), "
                 f"mean {self.logit_error_mean:.4g}"]
        if self.disagreements:
            lines.append("top-1 changed on: " + self.changed_text())
        return "\n".join(lines)

    def changed_text(self) -> str:
        """The changed images with the fp32 margin each was decided by: a class that wins by a
        few thousandths of a logit changes under any rounding, bf16 included."""
        return ", ".join(f"{name} (fp32 top-2 margin {margin:.3g})"
                         for name, margin in zip(self.disagreements, self.disagreement_margins))


def classification_agreement(reference_model: Callable, candidate_fn: Callable, images: ImageSet | None = None,
                             batch: int = 8) -> ClassificationAgreement:
    """Compare `candidate_fn(pixels)` logits with the fp32 `reference_model` on the photo views,
    `batch` images per call."""
    images = load_images() if images is None else images
    ref = _in_fixed_batches(reference_model, (images.pixels,), batch, _logits)
    got = _in_fixed_batches(candidate_fn, (images.pixels,), batch, _logits)
    ref_top1 = ref.argmax(-1)
    same_top1 = got.argmax(-1) == ref_top1
    in_top5 = (got.topk(min(5, got.shape[-1]), dim=-1).indices == ref_top1[:, None]).any(-1)
    error = (got - ref).abs().amax(-1)
    worst = int(error.argmax())
    top2 = ref.topk(min(2, ref.shape[-1]), dim=-1).values
    margin = top2[:, 0] - top2[:, -1]
    return ClassificationAgreement(
        images=len(images.names), top1=float(same_top1.double().mean()), top5=float(in_top5.double().mean()),
        logit_error_max=float(error.max()), logit_error_mean=float(error.mean()), worst_image=images.names[worst],
        cosine_min=float(torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=-1).min()),
        per_image_error=tuple(float(e) for e in error),
        disagreements=tuple(n for n, same in zip(images.names, same_top1.tolist()) if not same),
        disagreement_margins=tuple(float(m) for m, same in zip(margin, same_top1.tolist()) if not same),
    )


# --------------------------------------------------------------------------------------------- CLI

def _axis(spec_axis: Any, wanted: int) -> int:
    """The size to run an artifact's axis at: its fixed size, or `wanted` clamped into its range."""
    if isinstance(spec_axis, int):
        return spec_axis
    return min(max(wanted, spec_axis.min, 1), spec_axis.max)


def _check_inputs(compiled: Any, count: int, model: str, artifact: Path) -> None:
    tensors = compiled.input_spec.tensors
    if len(tensors) != count:
        raise KilnError(f"the artifact takes {len(tensors)} inputs ({compiled.input_spec.describe()}); "
                        f"the {model} check calls it with {count}", where=str(artifact),
                        fix="compile the model with " + ("(input_ids, attention_mask)" if model == "minilm" else "(pixels,)")
                        + " as its example inputs")


def run_check(model: str, artifact: Path, limit: int | None, batch: int, seq: int) -> str:
    """Load `artifact`, compare it with the fp32 eager model on the real data, return the report."""
    import kiln

    compiled = kiln.load(artifact)
    shape = compiled.input_spec.tensors[0].shape
    if model == "minilm":
        _check_inputs(compiled, 2, model, artifact)
        reference, _ = models.minilm()
        batch, seq = _axis(shape[0], batch), _axis(shape[1], seq)
        result = embedding_agreement(reference, compiled, load_pairs(limit), batch=batch, seq=seq)
    else:
        _check_inputs(compiled, 1, model, artifact)
        reference, _ = models.efficientnet_lite0()
        batch, size = _axis(shape[0], batch), _axis(shape[2], 224)
        if _axis(shape[3], size) != size:
            raise KilnError(f"the artifact takes {compiled.input_spec.describe()}; the image check needs square images",
                            where=str(artifact), fix="compile with square example images, e.g. 1x3x224x224")
        result = classification_agreement(reference, compiled, load_images(limit, size=size), batch=batch)
    return f"{artifact.name} ({model}) vs fp32 eager, batch {batch}:\n{result.describe()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Agreement of a saved kiln artifact with the fp32 eager model on real data.")
    parser.add_argument("--model", choices=["minilm", "efficientnet_lite0"], required=True)
    parser.add_argument("--artifact", type=Path, required=True, help="a file or directory written by CompiledModel.save")
    parser.add_argument("--limit", type=int, default=None,
                        help="minilm: first N sentence groups (3 pairs each); efficientnet_lite0: first N images")
    parser.add_argument("--batch", type=int, default=16, help="rows per call where the artifact's batch axis is dynamic")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sentence where the sequence axis is dynamic")
    args = parser.parse_args(argv)
    try:
        print(run_check(args.model, args.artifact, args.limit, args.batch, args.seq))
    except KilnError as exc:
        print(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
