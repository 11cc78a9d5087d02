"""kiln.sweep and `kiln sweep` as a user calls them: the front, each point built, verified, timed
and measured, the artifacts and their curve, the pruning axis, and the errors that guard them."""

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import kiln
from kiln.cli import main
from kiln.sweep import Setting, SweepResult, pareto_front, parse_settings
from kiln.types import Precision
from kiln.verify import TOLERANCE

FP32 = TOLERANCE[Precision.FP32]
FAST = {"backend": "onnxruntime", "measure_seconds": 0.05, "cache": False, "verify_draws": 1}


def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval(), (torch.randn(2, 16),)


def dataset():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 16, generator=gen),) for _ in range(4)]


def agreement(predict, items) -> float:
    """Top-1 agreement with the tiny model's eager answer (its metric for these tests)."""
    model, _ = tiny_mlp()
    with torch.no_grad():
        return float(torch.stack([(predict(*x).argmax(-1) == model(*x).argmax(-1)).double().mean() for x in items]).mean())


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One sweep of two points, fp32 and int8 on a cosine budget, saved; shared by the tests that read it."""
    folder = tmp_path_factory.mktemp("sweep")
    model, example = tiny_mlp()
    result = kiln.sweep(model, "cpu-x86", example, ["fp32", "int8:0.99"], metric=agreement, dataset=dataset(),
                        output_dir=folder, calibration=dataset(), **FAST)
    return model, example, result, folder


def test_pareto_front_keeps_the_points_no_other_beats_on_both_latency_and_accuracy():
    points = [(1.0, 0.90), (2.0, 0.95), (1.5, 0.92), (2.5, 0.94), (1.0, 0.85), (3.0, 0.95)]
    # (2.5, 0.94) loses to (2.0, 0.95); (1.0, 0.85) to (1.0, 0.90); (3.0, 0.95) to (2.0, 0.95)
    assert pareto_front(points) == [0, 1, 2]
    assert pareto_front([(1.0, 0.9), (1.0, 0.9)]) == [0, 1]  # equal points: both kept
    assert pareto_front([]) == []


def test_settings_read_back_their_text_and_name_their_budget_and_pruning():
    settings = parse_settings("fp32, auto, auto:0.995, int4-weight:0.99, bf16+prune=0.3")
    assert [s.text() for s in settings] == ["fp32", "auto", "auto:0.995", "int4:0.99", "bf16+prune=0.3"]
    assert settings[2].budget.min_cosine == 0.995 and settings[1].budget == kiln.Budget()
    assert settings[2].slug == "auto-cos0.995" and settings[4].prune_level == 0.3
    assert [Setting.parse(s.text()) for s in settings] == list(settings)
    assert len(parse_settings(None)) == 5  # fp32, then auto from the default budget down to 0.99


@pytest.mark.parametrize("settings, message", [
    ([], "at least one setting"),
    (["fp23"], "did you mean 'fp32'"),
    (["fp32", "fp32"], "appears twice"),
    (["auto:1.5"], "min_cosine must be a number in"),
    (["fp32:0.99"], "fp32 spends no accuracy"),
    (["auto+prune=1.2"], "fraction in \\(0, 1\\)"),
    (["auto+trim=0.2"], "is not prune=LEVEL"),
])
def test_sweep_names_a_wrong_setting_before_building_anything(settings, message):
    model, example = tiny_mlp()
    with pytest.raises(kiln.OptionsError, match=message):
        kiln.sweep(model, "cpu-x86", example, settings, **FAST)


def test_sweep_refuses_a_metric_without_its_dataset_and_a_precision_outside_the_settings():
    model, example = tiny_mlp()
    with pytest.raises(kiln.OptionsError, match="metric= was given without dataset="):
        kiln.sweep(model, "cpu-x86", example, ["fp32"], metric=agreement, **FAST)
    with pytest.raises(kiln.OptionsError, match="sets them per point"):
        kiln.sweep(model, "cpu-x86", example, ["fp32"], precision="int8", **FAST)


def test_sweep_builds_verifies_times_and_measures_every_point(swept):
    model, example, result, _ = swept
    assert [p.setting for p in result.points] == ["fp32", "int8:0.99"] and all(p.built for p in result.points)
    for point in result.points:
        compiled = result.pick(point.index)
        assert compiled.report.verification and all(v["ok"] for v in compiled.report.verification)
        assert point.median_ms > 0 and point.p99_ms >= point.median_ms and point.speedup_vs_eager > 0
        assert point.accuracy == point.score and 0 <= point.score <= 1
    fp32, int8 = result.points
    assert fp32.cosine_min > 1 - 1e-6 and fp32.score == 1.0  # fp32 answers as eager does
    assert 0.99 <= int8.cosine_min < 1 - 1e-7  # int8 kept its budget, and lost something measurable
    assert result.reference_score == 1.0 and result.eager_ms > 0
    assert result.evaluated_inputs == 1 + len(dataset())
    assert any(p.on_front for p in result.points)


def test_sweep_json_holds_every_number_setting_and_artifact(swept):
    _, _, result, folder = swept
    data = json.loads(json.dumps(result.to_dict()))
    for key in ("model", "profile", "accuracy_name", "eager_ms", "eager_p99_ms", "reference_score", "front", "points"):
        assert key in data
    assert data["accuracy_name"] == "agreement"
    for point in data["points"]:
        for key in ("index", "setting", "label", "status", "median_ms", "p99_ms", "speedup_vs_eager", "cosine_min",
                    "score", "accuracy", "on_front", "artifact", "backends", "precision_summary", "parameters"):
            assert point[key] is not None, key
    back = SweepResult.from_dict(data)
    assert [p.median_ms for p in back.points] == [p.median_ms for p in result.points]


def test_each_saved_artifact_loads_and_answers_as_its_point(swept):
    _, example, result, _ = swept
    for point in result.points:
        loaded = kiln.load(point.artifact)
        assert Path(point.artifact).name.startswith(f"point-{point.index:02d}-")
        torch.testing.assert_close(loaded(*example), result.pick(point.index)(*example), rtol=0, atol=0)
        assert loaded.report.sweep["this_point"] == point.index
        assert [p["index"] for p in loaded.report.sweep["points"]] == [1, 2]
        assert "Sweep (2 points" in loaded.report.render()


def test_the_plot_is_written_as_a_png(swept, tmp_path):
    pytest.importorskip("matplotlib")
    _, _, result, _ = swept
    path = result.plot(tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_inspect_html_draws_the_sweep_curve_with_this_artifact_ringed(swept, tmp_path, capsys):
    _, _, result, _ = swept
    page = tmp_path / "page.html"
    assert main(["inspect", result.points[1].artifact, "--html", str(page), "--quiet"]) == 0
    text = page.read_text()
    assert 'class="sweep-curve"' in text and text.count('class="sweep-point"') == 2
    assert "This artifact is point #2 (int8 cos&gt;=0.99)" in text and "(this artifact)" in text


@dataclass
class FakePruned:
    model: nn.Module
    level: float
    removed: int
    parameters_before: int
    parameters_after: int

    def describe(self) -> str:
        return f"removed {self.removed} hidden neurons ({self.level:.0%})"


def slice_hidden_neurons(model, example_inputs, level):
    """A stand-in for kiln.prune on the tiny MLP: drops the hidden neurons with the smallest
    weight norms, leaving a smaller dense model."""
    first, last = model[0], model[2]
    keep = first.weight.norm(dim=1).argsort(descending=True)[:round(first.out_features * (1 - level))].sort().values
    smaller = copy.deepcopy(model)
    smaller[0] = nn.Linear(first.in_features, len(keep))
    smaller[2] = nn.Linear(len(keep), last.out_features)
    with torch.no_grad():
        smaller[0].weight.copy_(first.weight[keep]), smaller[0].bias.copy_(first.bias[keep])
        smaller[2].weight.copy_(last.weight[:, keep]), smaller[2].bias.copy_(last.bias)
    count = sum(p.numel() for p in model.parameters())
    return FakePruned(smaller.eval(), level, first.out_features - len(keep), count, sum(p.numel() for p in smaller.parameters()))


def test_pruned_settings_build_the_pruners_smaller_model_and_measure_it_against_the_original():
    model, example = tiny_mlp()
    calls = []

    def pruner(m, inputs, level):
        calls.append(level)
        return slice_hidden_neurons(m, inputs, level)

    result = kiln.sweep(model, "cpu-x86", example, ["fp32", "fp32+prune=0.5"], pruner=pruner, **FAST)
    whole, pruned = result.points
    assert calls == [0.5] and pruned.built and pruned.prune == "removed 16 hidden neurons (50%)"
    assert pruned.parameters < whole.parameters
    assert pruned.cosine_min < whole.cosine_min  # measured against the unpruned model's outputs
    expected = slice_hidden_neurons(model, example, 0.5).model(*example)
    torch.testing.assert_close(result.pick(2)(*example), expected, rtol=FP32.rtol, atol=FP32.atol)


def test_a_pruned_setting_uses_kiln_prune_by_default_and_builds_its_smaller_model():
    from pruning.prunable_models import tiny_bert

    model, example = tiny_bert()
    result = kiln.sweep(model, "cpu-x86", example, ["fp32", "fp32+prune=0.5"], **FAST)
    whole, pruned = result.points
    assert whole.built and pruned.built, (whole.reason, pruned.reason)
    assert pruned.parameters < whole.parameters and "heads" in pruned.prune
    expected = kiln.prune(model, example, level=0.5).model(*example).last_hidden_state
    torch.testing.assert_close(result.pick(2)(*example).last_hidden_state, expected, rtol=FP32.rtol, atol=FP32.atol)


def test_a_point_that_cannot_build_is_recorded_and_the_sweep_goes_on():
    model, example = tiny_mlp()
    result = kiln.sweep(model, "cpu-x86", example, ["fp32", "bf16"], **FAST)  # onnxruntime runs no bf16 on a CPU
    assert result.points[0].built and not result.points[1].built
    assert "bf16" in result.points[1].reason and "failed" in result.table()
    with pytest.raises(kiln.OptionsError, match="has no compiled model"):
        result.pick(2)


def test_cli_sweep_writes_artifacts_json_and_plot_and_copies_the_picked_point(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tmp_path / "swept"
    code = main(["sweep", "sweep_models:mlp", "--settings", "fp32", "--metric", "sweep_models:mean_output",
                 "--dataset", "sweep_models:inputs", "--backend", "onnxruntime", "--measure-seconds", "0.05",
                 "-o", str(out), "--pick", "1", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and "mean_output" in printed and "point-01-fp32.kiln" in printed
    data = json.loads((out / "sweep.json").read_text())
    assert data["points"][0]["on_front"] and (out / "sweep.png").exists()
    assert kiln.load(out / "picked.kiln").report.sweep["this_point"] == 1


def test_cli_sweep_refuses_a_metric_without_a_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    code = main(["sweep", "sweep_models:mlp", "--metric", "sweep_models:mean_output", "-o", str(tmp_path / "x")])
    assert code == 2 and "--metric needs --dataset" in capsys.readouterr().err
    assert "sweep_models" in sys.modules


def test_cli_sweep_refuses_a_bundled_evaluation_that_does_not_fit_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    code = main(["sweep", "sweep_models:mlp", "--evaluate", "sentence-pairs", "-o", str(tmp_path / "x")])
    assert code == 2 and "(input_ids, attention_mask)" in capsys.readouterr().err
