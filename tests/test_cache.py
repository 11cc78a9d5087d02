"""The compile cache: a hit skips the build and is still verified; every input of the build
is in the key; writes are atomic; corrupt entries are rebuilt; size is capped (LRU)."""

import importlib.metadata
import importlib.util
import sys
import time
from pathlib import Path
from dataclasses import replace

import pytest
import torch
from torch import nn

import kiln
import kiln.cache
from kiln.cache import CompileCache, cache_key
from kiln.frontend.capture import capture
from kiln.verify import TOLERANCE
from kiln.types import Precision

FP32 = TOLERANCE[Precision.FP32]  # compiled fp32 engines against eager


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3)).eval()


def _optimize(model, x, cache_dir, **options):
    return kiln.optimize(model, "cpu-x86", (x,), backend="onnxruntime", cache_dir=str(cache_dir), **options)


def _hit(compiled) -> bool:
    return any("loaded from the compile cache" in note for note in compiled.report.notes)


def test_a_second_identical_compile_is_a_verified_cache_hit(tmp_path):
    model, x = _model(), torch.randn(2, 8)
    first = _optimize(model, x, tmp_path)
    assert not _hit(first)
    second = _optimize(model, x, tmp_path)
    assert _hit(second)
    assert second.report.verification and all(v["ok"] for v in second.report.verification)
    assert second.report.candidates == first.report.candidates  # the original decisions travel with the entry
    torch.testing.assert_close(second(x), model(x), rtol=FP32.rtol, atol=FP32.atol)


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(8, 3)
        self.register_buffer("shift", torch.zeros(3))
        self.scale = 2.0

    def forward(self, x):
        return self.linear(x) * self.scale + self.shift


@pytest.mark.parametrize("change", ["shape", "dtype", "weight", "buffer", "attribute", "option", "profile", "kiln version",
                                    "torch version", "backend version"])
def test_anything_that_shapes_the_build_changes_the_key(change, tmp_path, monkeypatch):
    model, x = WithBuffer().eval(), torch.randn(2, 8)
    first = _optimize(model, x, tmp_path)
    assert _hit(_optimize(model, x, tmp_path))
    options = {}
    profile = "cpu-x86"
    if change == "shape":
        x = torch.randn(3, 8)
    elif change == "dtype":
        model, x = model.double(), x.double()
    elif change == "weight":
        with torch.no_grad():
            model.linear.weight[0, 0] += 1e-3
    elif change == "buffer":
        model.shift += 1e-3
    elif change == "attribute":
        model.scale = 3.0
    elif change == "option":
        options = {"disabled_passes": ("fold_constants",)}
    elif change == "profile":
        base = kiln.hardware_profiles.load("cpu-x86")
        profile = replace(base, digest=base.digest[::-1])
    elif change == "kiln version":
        monkeypatch.setattr(kiln.version, "__version__", "99.0")
    elif change == "torch version":
        monkeypatch.setattr(torch, "__version__", "99.0+cpu")
    elif change == "backend version":
        real = importlib.metadata.version
        monkeypatch.setattr(importlib.metadata, "version", lambda name: "99.0" if name == "onnxruntime" else real(name))
    again = kiln.optimize(model, profile, (x,), backend="onnxruntime", cache_dir=str(tmp_path), **options)
    assert not _hit(again)
    if change in ("weight", "buffer", "attribute"):  # a stale engine would have answered like the first model
        torch.testing.assert_close(again(x), model(x), rtol=FP32.rtol, atol=FP32.atol)
        assert not torch.allclose(first(x), model(x))


def test_a_change_to_forward_s_code_misses(tmp_path):
    source = tmp_path / "code" / "cached_model.py"
    source.parent.mkdir()

    def load(body):
        source.write_text("import torch\n\nclass M(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                          "        torch.manual_seed(0)\n        self.linear = torch.nn.Linear(8, 3)\n\n"
                          f"    def forward(self, x):\n        return {body}\n")
        spec = importlib.util.spec_from_file_location("cached_model", source)
        module = importlib.util.module_from_spec(spec)
        sys.modules["cached_model"] = module
        spec.loader.exec_module(module)
        return module.M().eval()

    x = torch.randn(2, 8)
    try:
        _optimize(load("self.linear(x) * 2"), x, tmp_path / "cache")
        changed = load("self.linear(x) * 3")
        again = _optimize(changed, x, tmp_path / "cache")
        assert not _hit(again)
        torch.testing.assert_close(again(x), changed(x), rtol=FP32.rtol, atol=FP32.atol)
    finally:
        sys.modules.pop("cached_model", None)


def test_a_repeat_compile_is_found_by_the_fingerprint_without_capture(tmp_path):
    model, x = _model(), torch.randn(2, 8)
    _optimize(model, x, tmp_path)
    again = _optimize(model, x, tmp_path)
    assert _hit(again) and "capture" not in again.report.timings
    assert any("by the model's fingerprint" in note for note in again.report.notes)
    assert again.report.verification and all(v["ok"] for v in again.report.verification)


def test_a_fingerprint_hit_calls_the_model_on_one_row_of_a_batched_example(tmp_path):
    model, x = _model(), torch.randn(4, 8)
    _optimize(model, x, tmp_path)
    again = _optimize(model, x, tmp_path)
    assert _hit(again) and any("on the first of the example's 4 rows" in note for note in again.report.notes)


class MixesRows(nn.Module):
    """Each output row depends on the whole batch: one row alone answers differently."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(8, 3)

    def forward(self, x):
        return self.linear(x - x.mean(0))


class FixedBatch(MixesRows):
    def forward(self, x):
        return self.linear(x).reshape(4, 3)  # fails on one row


@pytest.mark.parametrize("model", [MixesRows(), FixedBatch()], ids=["mixes rows", "fixed batch"])
def test_a_fingerprint_hit_whose_model_cannot_be_checked_on_one_row_checks_the_whole_example(model, tmp_path):
    x = torch.randn(4, 8)
    _optimize(model.eval(), x, tmp_path)
    again = _optimize(model, x, tmp_path)
    assert _hit(again) and any("against the model on the example inputs" in note for note in again.report.notes)
    torch.testing.assert_close(again(x), model(x), rtol=FP32.rtol, atol=FP32.atol)


def test_a_fingerprint_leading_to_another_model_s_build_is_caught_and_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setattr(kiln.api, "model_fingerprint", lambda *args: "the same for every model")
    x = torch.randn(2, 8)
    _optimize(_model(0), x, tmp_path)
    other = _model(1)
    compiled = _optimize(other, x, tmp_path)
    assert not _hit(compiled)  # the alias led to model 0's engine; it disagreed with model 1 on the example
    torch.testing.assert_close(compiled(x), other(x), rtol=FP32.rtol, atol=FP32.atol)


def test_a_model_the_fingerprint_cannot_read_uses_the_full_key(tmp_path):
    model, x = _model(), torch.randn(2, 8)
    model.opaque = object()  # state the fingerprint cannot read as plain data
    _optimize(model, x, tmp_path)
    again = _optimize(model, x, tmp_path)
    assert _hit(again) and "capture" in again.report.timings


def test_the_key_is_stable_across_captures_of_the_same_model():
    model, x = _model(), torch.randn(2, 8)
    keys = set()
    for _ in range(2):
        captured = capture(model, (x,))
        keys.add(cache_key(captured.gm, captured.input_spec.to_dict(), captured.output_structure, "p", {}))
    assert len(keys) == 1


def test_a_corrupt_entry_is_dropped_and_rebuilt(tmp_path):
    model, x = _model(), torch.randn(2, 8)
    _optimize(model, x, tmp_path)
    (engine,) = tmp_path.glob("*/*/engines/p0.onnx")
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    rebuilt = _optimize(model, x, tmp_path)
    assert not _hit(rebuilt) and any("stored in the compile cache" in n for n in rebuilt.report.notes)
    assert _hit(_optimize(model, x, tmp_path))


def test_a_crash_while_storing_leaves_no_half_entry(tmp_path, monkeypatch):
    model, x = _model(), torch.randn(2, 8)

    def save_then_crash(self, path):
        (tmp_path / "partial-marker").write_text("")
        raise OSError("disk vanished mid-write")

    monkeypatch.setattr(kiln.CompiledModel, "save", save_then_crash)
    compiled = _optimize(model, x, tmp_path)  # the build itself still succeeds
    torch.testing.assert_close(compiled(x), model(x), rtol=FP32.rtol, atol=FP32.atol)
    assert not list(tmp_path.glob("*/*/manifest.json")) and not list(tmp_path.glob("*/.tmp-*"))
    monkeypatch.undo()
    assert not _hit(_optimize(model, x, tmp_path))


def test_the_cache_evicts_least_recently_used_entries_past_its_cap(tmp_path):
    x = torch.randn(2, 8)
    models = [_model(seed) for seed in range(3)]
    for model in models:
        _optimize(model, x, tmp_path)
        time.sleep(0.05)
    _optimize(models[0], x, tmp_path)  # touch the oldest: now the most recently used
    entries = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    one_entry = max(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in entries)
    cache = CompileCache(tmp_path, max_bytes=int(one_entry * 1.5))
    removed = cache.evict()
    assert len(removed) == 2
    assert _hit(_optimize(models[0], x, tmp_path))
    assert not _hit(_optimize(models[1], x, tmp_path))


def test_cache_false_neither_reads_nor_writes(tmp_path):
    model, x = _model(), torch.randn(2, 8)
    _optimize(model, x, tmp_path, cache=False)
    assert not list(tmp_path.iterdir())


def test_an_unverified_build_is_not_stored(tmp_path):
    model, x = _model(), torch.randn(2, 8)
    _optimize(model, x, tmp_path, verify=False)
    assert not list(tmp_path.glob("*/*/manifest.json"))


def _optimize_openvino(model, x, cache_dir):
    return kiln.optimize(model, "cpu-x86", (x,), backend="openvino", cache_dir=str(cache_dir))


def _entries(root):
    return [p for p in root.glob("*/*") if p.is_dir() and not p.name.endswith(kiln.cache.RUNTIME_SUFFIX)]


def test_an_openvino_entry_is_stored_with_its_compiled_blob_so_the_first_hit_reads_it(tmp_path):
    pytest.importorskip("openvino")
    model, x = _model(), torch.randn(2, 8)
    _optimize_openvino(model, x, tmp_path)
    (entry,) = _entries(tmp_path)
    kept = Path(str(entry) + kiln.cache.RUNTIME_SUFFIX)
    assert list(kept.glob("openvino-*/*.blob"))
    hit = _optimize_openvino(model, x, tmp_path)
    assert _hit(hit) and hit.engines["p0"].compiled.get_property("LOADED_FROM_CACHE")
    torch.testing.assert_close(hit(x), model(x), rtol=FP32.rtol, atol=FP32.atol)


def test_an_entry_s_kept_blobs_are_evicted_and_dropped_with_it(tmp_path):
    pytest.importorskip("openvino")
    x = torch.randn(2, 8)
    for seed in range(2):
        _optimize_openvino(_model(seed), x, tmp_path)
    assert len(list(tmp_path.glob(f"*/*{kiln.cache.RUNTIME_SUFFIX}"))) == 2
    removed = CompileCache(tmp_path, max_bytes=0).evict()
    assert len(removed) == 2  # the entries; their kept blobs are not entries of their own
    assert not list(tmp_path.glob("*/*/manifest.json")) and not list(tmp_path.glob(f"*/*{kiln.cache.RUNTIME_SUFFIX}"))

    model = _model()
    _optimize_openvino(model, x, tmp_path)
    (engine,) = tmp_path.glob("*/*/engines/p0.bin")
    engine.write_bytes(engine.read_bytes()[:-4] + b"\0\0\0\0")
    rebuilt = _optimize_openvino(model, x, tmp_path)
    assert not _hit(rebuilt)
    (entry,) = _entries(tmp_path)
    assert len(list(Path(str(entry) + kiln.cache.RUNTIME_SUFFIX).iterdir())) == 1  # one kept folder, for the rebuilt files
    hit = _optimize_openvino(model, x, tmp_path)
    assert _hit(hit) and hit.engines["p0"].compiled.get_property("LOADED_FROM_CACHE")
