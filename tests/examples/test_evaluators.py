"""The bundled real data as sweep metrics: shaped like the model's calls (a short last batch
padded), a score that is exact for the reference and falls for a damaged model, and calibration
samples drawn from data the metric does not evaluate."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("skimage")

from kiln.examples import accuracy, evaluators  # noqa: E402


class MeanColourClassifier(torch.nn.Module):
    """Ten classes from the mean colour of an image: a stand-in reference model, fast at any size."""

    def forward(self, pixels):
        return pixels.mean((2, 3)) @ torch.randn(3, 10, generator=torch.Generator().manual_seed(0))


def test_photos_score_one_for_the_reference_and_less_for_a_model_that_guesses():
    evaluation = evaluators.photos(MeanColourClassifier(), batch=4, size=32)
    assert len(evaluation.dataset) == 26 and all(call[0].shape == (4, 3, 32, 32) for call in evaluation.dataset)
    assert evaluation.metric(MeanColourClassifier(), evaluation.dataset) == 1.0
    guesses = torch.Generator().manual_seed(1)
    assert evaluation.metric(lambda x: torch.randn(x.shape[0], 10, generator=guesses), evaluation.dataset) < 0.5
    assert len(evaluation.calibration) == evaluators.CALIBRATION_SAMPLES


def test_sentence_pairs_rank_pairs_by_the_embeddings_and_calibrate_on_held_out_groups():
    evaluation = evaluators.sentence_pairs(batch=4, seq=16, calibration_samples=2)
    sentences = accuracy.distinct_sentences(accuracy.load_pairs(accuracy.EVAL_GROUPS))
    assert len(evaluation.dataset) == -(-len(sentences) // 4) and evaluation.dataset[-1][0].shape == (4, 16)
    embed = torch.nn.Embedding(30522, 8)

    def bag_of_words(ids, mask):
        return {"last_hidden_state": embed(ids).detach()}

    score = evaluation.metric(bag_of_words, evaluation.dataset)
    assert -1 <= score <= 1 and evaluation.metric(bag_of_words, evaluation.dataset) == score
    assert evaluation.metric(lambda ids, mask: torch.zeros(ids.shape[0], 16, 8), evaluation.dataset) != score
    held_out = accuracy.sentence_calibration(batch=4, seq=16, count=8)
    assert len(evaluation.calibration) == 2 and torch.equal(evaluation.calibration[0][0], held_out[0][0])
