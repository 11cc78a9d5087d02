"""The per-host record of what candidates measured: kept per kind of graph, read back for the
nearest size of the same kind, never trusted from another host or other library versions."""

import json

import torch
from torch import nn

import kiln
from kiln.build.host_record import SIZE_OCTAVES, GraphKind, HostRecord, graph_kind, plan_kind
from kiln.ir import LayerPlan, Scheme

KIND = GraphKind(("addmm", "gelu"), "fp32", 20)


def test_a_stored_selection_reads_back_as_factors_of_the_fastest(tmp_path):
    record = HostRecord.beside(tmp_path)
    record.store(KIND, {"onnxruntime": (2.0, 5.0), "openvino": (3.0, 1.5)})
    again = HostRecord.beside(tmp_path).lookup(KIND)
    assert again["onnxruntime"].factor == 1.0 and again["openvino"].factor == 1.5
    assert again["openvino"].build_seconds == 1.5 and again["openvino"].median_ms == 3.0


def test_a_selection_records_which_candidates_its_timing_put_behind_beyond_the_noise(tmp_path):
    HostRecord.beside(tmp_path).store(KIND, {"onnxruntime": (2.06, 5.0), "openvino": (2.0, 1.5), "inductor": (2.02, 9.0)},
                                      apart=frozenset({"onnxruntime"}))
    again = HostRecord.beside(tmp_path).lookup(KIND)
    assert again["onnxruntime"].apart and not again["inductor"].apart and not again["openvino"].apart


def test_a_single_measurement_is_not_a_comparison_and_is_not_stored(tmp_path):
    HostRecord.beside(tmp_path).store(KIND, {"onnxruntime": (2.0, 5.0)})
    assert HostRecord.beside(tmp_path).lookup(KIND) == {}


def test_the_same_ops_at_a_nearby_size_count_as_the_same_kind_but_not_far_away(tmp_path):
    HostRecord.beside(tmp_path).store(KIND, {"onnxruntime": (2.0, 5.0), "openvino": (3.0, 1.5)})
    near = GraphKind(KIND.ops, KIND.precision, KIND.size + SIZE_OCTAVES)
    far = GraphKind(KIND.ops, KIND.precision, KIND.size + SIZE_OCTAVES + 1)
    other_precision = GraphKind(KIND.ops, "bf16", KIND.size)
    record = HostRecord.beside(tmp_path)
    assert record.lookup(near) and not record.lookup(far) and not record.lookup(other_precision)


def test_a_record_from_another_host_or_other_versions_is_ignored(tmp_path):
    HostRecord.beside(tmp_path).store(KIND, {"onnxruntime": (2.0, 5.0), "openvino": (3.0, 1.5)})
    path = tmp_path / "host-record.json"
    data = json.loads(path.read_text())
    data["identity"]["versions"]["onnxruntime"] = "0.0.1"
    path.write_text(json.dumps(data))
    assert HostRecord.beside(tmp_path).lookup(KIND) == {}
    data["identity"]["versions"] = HostRecord._identity()["versions"]
    data["identity"]["host"]["cpu_flags"] = ["sse2"]
    path.write_text(json.dumps(data))
    assert HostRecord.beside(tmp_path).lookup(KIND) == {}


def test_an_unreadable_record_is_an_empty_one(tmp_path):
    (tmp_path / "host-record.json").write_text("{not json")
    assert HostRecord.beside(tmp_path).lookup(KIND) == {}


def test_a_graph_kind_names_its_ops_precision_and_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    small = graph_kind(kiln.plan(model, "cpu-x86", (torch.randn(2, 16),), precision="fp32").plan.partitions[0].graph)
    large = graph_kind(kiln.plan(model, "cpu-x86", (torch.randn(64, 16),), precision="fp32").plan.partitions[0].graph)
    assert "gelu" in small.ops and small.precision == "fp32"
    assert small.family == large.family and large.size - small.size == 5  # 32x the multiply-adds


def test_a_race_against_fp32_reads_back_for_the_same_plan_only(tmp_path):
    model = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)))
    plans = {"l0": LayerPlan("l0", "linear", "w0", Scheme.BF16), "l1": LayerPlan("l1", "linear", "w1", Scheme.FP32)}
    HostRecord.beside(tmp_path).store_race(plan_kind(model, plans), lowered_ms=2.0, fp32_ms=3.0)
    again = HostRecord.beside(tmp_path)
    race = again.lookup_race(plan_kind(model, plans))
    assert race.fp32_factor == 1.5 and "2.00 ms against fp32's 3.00 ms (1.50x)" in race.describe()
    other_plan = {**plans, "l1": LayerPlan("l1", "linear", "w1", Scheme.BF16)}  # same schemes, one more layer lowered
    assert again.lookup_race(plan_kind(model, other_plan)) is None
    assert again.lookup(plan_kind(model, plans)) == {}  # races and backend selections are kept apart


def test_a_record_written_before_races_were_kept_reads_as_having_none(tmp_path):
    HostRecord.beside(tmp_path).store(KIND, {"onnxruntime": (2.0, 5.0), "openvino": (3.0, 1.5)})
    path = tmp_path / "host-record.json"
    data = json.loads(path.read_text())
    del data["races"]
    path.write_text(json.dumps(data))
    record = HostRecord.beside(tmp_path)
    assert record.lookup(KIND) and record.lookup_race(KIND) is None
    record.store_race(KIND, 1.0, 2.0)
    assert HostRecord.beside(tmp_path).lookup_race(KIND).fp32_factor == 2.0


def test_two_records_of_one_file_keep_each_other_s_measurements(tmp_path):
    # a compile's selections and its races, or two compiles at once, each hold the file open
    selections, races = HostRecord.beside(tmp_path), HostRecord.beside(tmp_path)
    selections.store(KIND, {"onnxruntime": (2.0, 5.0), "openvino": (3.0, 1.5)})
    races.store_race(KIND, 1.0, 2.0)
    selections.store(GraphKind(KIND.ops, "bf16", KIND.size), {"onnxruntime": (1.0, 5.0), "openvino": (3.0, 1.5)})
    again = HostRecord.beside(tmp_path)
    assert again.lookup(KIND) and again.lookup(GraphKind(KIND.ops, "bf16", KIND.size)) and again.lookup_race(KIND)
