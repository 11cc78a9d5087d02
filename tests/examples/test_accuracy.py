"""Real-data accuracy checks: the bundled sentence pairs and photos load, the metrics are exact
for the fp32 model against itself, they catch a damaged candidate, and the data means something
to the fp32 models (paraphrases score above unrelated pairs, the cat photo is a cat)."""

import copy

import pytest
import torch

import kiln
from kiln.examples import accuracy, models

GROUPS = 8  # sentence groups (3 pairs each) for the model tests: enough to rank, quick to embed
SEQ = 48  # tokens; the longest bundled sentence has 42
IMAGES = 12  # the six centre crops and six flips


def naive_int4(model: torch.nn.Module, kinds: tuple[type, ...]) -> torch.nn.Module:
    """A copy whose weights are rounded to 16 levels with one scale per tensor: the damage a
    careless INT4 build does."""
    damaged = copy.deepcopy(model)
    with torch.no_grad():
        for module in damaged.modules():
            if isinstance(module, kinds):
                scale = module.weight.abs().max() / 7
                module.weight.copy_((module.weight / scale).round().clamp(-8, 7) * scale)
    return damaged


@pytest.fixture(scope="module")
def minilm():
    return models.minilm()[0]


@pytest.fixture(scope="module")
def efficientnet():
    return models.efficientnet_lite0()[0]


@pytest.fixture(scope="module")
def images():
    return accuracy.load_images(IMAGES)


@pytest.fixture(scope="module")
def centre_crops(images):
    return accuracy.ImageSet(images.pixels[:6], images.names[:6])


@pytest.fixture(scope="module")
def minilm_self(minilm):
    return accuracy.embedding_agreement(minilm, minilm, accuracy.load_pairs(GROUPS), batch=8, seq=SEQ)


# ------------------------------------------------------------------------------------------- data

def test_sentence_pairs_are_100_groups_of_paraphrase_related_and_unrelated():
    pairs = accuracy.load_pairs()
    assert len(pairs) == 300
    for group in range(1, 101):
        assert sorted(p.label for p in pairs if p.group == group) == [0, 1, 2]
    sentences = accuracy.distinct_sentences(pairs)
    assert len(sentences) == 400
    assert all(5 <= len(s.split()) <= 40 for s in sentences)
    assert len({p.topic for p in pairs}) > 50


def test_load_pairs_with_groups_keeps_whole_groups():
    pairs = accuracy.load_pairs(4)
    assert len(pairs) == 12 and {p.group for p in pairs} == {1, 2, 3, 4}
    assert len(accuracy.distinct_sentences(pairs)) == 16


def test_every_photo_is_an_rgb_image_in_the_installed_scikit_image():
    for name in accuracy.PHOTOS:
        pixels = accuracy.photo(name)
        assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype.name == "uint8"
        assert min(pixels.shape[:2]) >= 224


def test_a_photo_the_wheel_lacks_is_an_error_not_a_download():
    with pytest.raises(models.MissingExample, match="not bundled"):
        accuracy.photo("not_a_bundled_photo.png")


def test_images_cover_every_photo_before_repeating_and_sit_in_the_lite_range(images):
    assert images.pixels.shape == (IMAGES, 3, 224, 224)
    assert [n.split("/")[1] for n in images.names] == ["center"] * 6 + ["flip"] * 6
    assert {n.split("/")[0] for n in images.names[:6]} == {name.rsplit(".", 1)[0] for name in accuracy.PHOTOS}
    assert images.pixels.min() >= -1 and images.pixels.max() <= 1
    flipped = images.pixels[6:].flip(-1)
    torch.testing.assert_close(flipped, images.pixels[:6], rtol=0, atol=1e-5)


def test_the_full_image_set_holds_about_a_hundred_distinct_views():
    names = [f"{p}/{v}" for v, _ in accuracy.VIEWS for p in accuracy.PHOTOS]
    assert len(names) == len(set(names)) == 102


# ---------------------------------------------------------------------------------------- metrics

def test_spearman_is_one_for_any_increasing_map_and_minus_one_reversed():
    x = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.3])
    assert accuracy.spearman(x, x ** 3) == pytest.approx(1.0)
    assert accuracy.spearman(x, -x) == pytest.approx(-1.0)


def test_spearman_gives_ties_their_average_rank():
    # ranks of x: 0, 1.5, 1.5, 3 -> correlation with 0, 1, 2, 3 is 0.9487 (by hand)
    x, y = torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert accuracy.spearman(x, y) == pytest.approx(0.9486833, abs=1e-6)


def test_order_kept_counts_the_pairs_whose_order_flipped():
    reference = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert accuracy.order_kept(reference, reference) == 1.0
    assert accuracy.order_kept(reference, torch.tensor([0.2, 0.1, 0.3, 0.4])) == pytest.approx(5 / 6)
    assert accuracy.order_kept(reference, -reference) == 0.0


def test_label_separation_is_the_share_of_paraphrases_above_unrelated_pairs():
    similarity = torch.tensor([0.9, 0.5, 0.1, 0.4, 0.6, 0.0])
    labels = [2, 1, 0, 2, 1, 0]
    auc, means = accuracy.label_separation(similarity, labels)
    assert auc == 1.0
    assert means == pytest.approx({"unrelated": 0.05, "related": 0.55, "paraphrase": 0.65})
    auc, _ = accuracy.label_separation(torch.tensor([0.9, 0.3, 0.5, 0.3]), [2, 2, 0, 0])
    assert auc == pytest.approx((1 + 0 + 1 + 0.5) / 4)  # 0.3 vs 0.3 ties count half


def test_fixed_batches_pad_the_last_batch_and_drop_the_padding():
    seen = []

    def fn(x):
        seen.append(x.shape[0])
        return x * 2

    out = accuracy._in_fixed_batches(fn, (torch.arange(10.0).unsqueeze(1),), 4, lambda o: o)
    assert seen == [4, 4, 4]
    torch.testing.assert_close(out, torch.arange(10.0).unsqueeze(1) * 2)


# ---------------------------------------------------------------------------------- MiniLM on pairs

def test_minilm_against_itself_agrees_exactly(minilm_self):
    result = minilm_self
    assert (result.sentences, result.pairs) == (4 * GROUPS, 3 * GROUPS)
    assert result.cosine_min == pytest.approx(1.0, abs=1e-6) and result.cosine_p1 == pytest.approx(1.0, abs=1e-6)
    assert result.pair_spearman == pytest.approx(1.0)
    assert result.pair_order_kept == 1.0 and result.neighbour_agreement == 1.0
    assert result.label_means_candidate == result.label_means_reference


def test_fp32_minilm_ranks_paraphrases_above_related_above_unrelated(minilm_self):
    means = minilm_self.label_means_reference
    assert means["paraphrase"] > means["related"] + 0.2
    assert means["related"] > means["unrelated"] + 0.2
    assert minilm_self.separation_reference > 0.95


def test_minilm_with_naively_rounded_int4_weights_is_caught(minilm):
    damaged = naive_int4(minilm, (torch.nn.Linear,))
    result = accuracy.embedding_agreement(minilm, damaged, accuracy.load_pairs(GROUPS), batch=8, seq=SEQ)
    assert result.cosine_min < 0.9
    assert result.pair_spearman < 0.99 and result.pair_order_kept < 0.95
    assert "cosine vs fp32: min 0." in result.describe()


# ------------------------------------------------------------------------- EfficientNet on photos

def test_efficientnet_sees_a_cat_in_chelsea_and_espresso_in_coffee(efficientnet, images):
    with torch.no_grad():
        top1 = efficientnet(images.pixels).argmax(-1).tolist()
    predicted = dict(zip(images.names, top1))
    assert predicted["chelsea/center"] in accuracy.CAT_CLASSES and predicted["chelsea/flip"] in accuracy.CAT_CLASSES
    assert predicted["coffee/center"] == 967  # ImageNet 'espresso'


def test_lite_normalisation_is_the_one_the_weights_were_trained_with(efficientnet, images):
    # The same photos in ImageNet's per-channel statistics: the model is less sure of its answers.
    raw = images.pixels[:6] * accuracy.LITE_STD + accuracy.LITE_MEAN
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255
    with torch.no_grad():
        lite = efficientnet(images.pixels[:6]).softmax(-1).amax(-1)
        imagenet = efficientnet((raw - mean) / std).softmax(-1).amax(-1)
    assert float(lite.mean()) > float(imagenet.mean()) + 0.05


def test_efficientnet_against_itself_agrees_exactly(efficientnet, centre_crops):
    result = accuracy.classification_agreement(efficientnet, efficientnet, centre_crops, batch=4)
    assert result.images == 6 and len(result.per_image_error) == 6
    assert result.top1 == result.top5 == 1.0
    assert result.logit_error_max == 0.0 and not result.disagreements


def test_efficientnet_with_naively_rounded_int4_weights_is_caught(efficientnet, centre_crops):
    damaged = naive_int4(efficientnet, (torch.nn.Conv2d, torch.nn.Linear))
    result = accuracy.classification_agreement(efficientnet, damaged, centre_crops, batch=6)
    assert result.top1 < 0.5 and result.logit_error_max > 1.0
    assert len(result.disagreements) == round((1 - result.top1) * 6)
    assert "top-1 changed on:" in result.describe()


def test_each_changed_image_is_named_with_the_fp32_margin_it_was_decided_by(efficientnet, centre_crops):
    damaged = naive_int4(efficientnet, (torch.nn.Conv2d, torch.nn.Linear))
    result = accuracy.classification_agreement(efficientnet, damaged, centre_crops, batch=6)
    with torch.no_grad():
        top2 = efficientnet(centre_crops.pixels).topk(2, dim=-1).values
    margins = dict(zip(centre_crops.names, (top2[:, 0] - top2[:, 1]).tolist()))
    assert len(result.disagreement_margins) == len(result.disagreements) > 0
    for name, margin in zip(result.disagreements, result.disagreement_margins):
        assert margin == pytest.approx(margins[name], rel=1e-5, abs=1e-6)
        assert f"{name} (fp32 top-2 margin {margin:.3g})" in result.describe()


# -------------------------------------------------------------------------------------------- CLI

@pytest.mark.slow
def test_cli_prints_the_agreement_of_a_saved_artifact(efficientnet, tmp_path, capsys):
    example = (torch.rand(4, 3, 224, 224) * 2 - 1,)
    compiled = kiln.optimize(efficientnet, "cpu-x86", example, backend="onnxruntime")
    artifact = compiled.save(tmp_path / "effnet.kiln")

    assert accuracy.main(["--model", "efficientnet_lite0", "--artifact", str(artifact), "--limit", "6"]) == 0
    printed = capsys.readouterr().out
    assert "effnet.kiln (efficientnet_lite0) vs fp32 eager, batch 4" in printed
    assert "images 6" in printed and "top-1 agreement 100.00%" in printed

    assert accuracy.main(["--model", "minilm", "--artifact", str(artifact)]) == 1
    assert "the artifact takes 1 inputs" in capsys.readouterr().out
