"""Which inputs index tables (checked on every call) and which are masks (drawn with padding in
verification), read from the captured graph."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import kiln
from kiln.errors import InputMismatch, VerificationError
from kiln.frontend.capture import capture
from kiln.frontend.input_spec import random_inputs
from kiln.types import InputSpec


class Lookup(nn.Module):
    def __init__(self, rows=50):
        super().__init__()
        self.table, self.out = nn.Embedding(rows, 8), nn.Linear(8, 4)

    def forward(self, ids):
        return self.out(self.table(ids.reshape(ids.shape[0], -1)))


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def test_an_input_looked_up_in_an_embedding_table_gets_the_tables_rows_as_its_range():
    spec = capture(Lookup(50).eval(), (torch.randint(0, 50, (2, 6)),)).input_spec
    assert spec.tensors[0].index_range == (0, 49) and not spec.tensors[0].mask


def test_indexing_wraps_negative_values_so_their_range_starts_below_zero():
    class Gather(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("values", torch.randn(10, 3))

        def forward(self, i):
            return self.values[i]

    spec = capture(Gather().eval(), (torch.tensor([1, 2]),)).input_spec
    assert spec.tensors[0].index_range == (-10, 9)


def test_bert_ids_index_the_vocabulary_and_its_attention_mask_is_a_mask():
    ids, mask = torch.randint(0, 100, (2, 16)), torch.ones(2, 16, dtype=torch.int64)
    spec = capture(_tiny_bert(), (ids, mask)).input_spec
    by_name = {t.name: t for t in spec.tensors}
    assert by_name["input_ids"].index_range == (0, 99) and not by_name["input_ids"].mask
    assert by_name["attention_mask"].mask and by_name["attention_mask"].index_range is None


def test_a_zero_one_input_that_only_reaches_a_where_condition_is_a_mask_whatever_its_name():
    class Keep(nn.Module):
        def forward(self, x, keep):
            return torch.where(keep.bool(), x, torch.zeros_like(x))

    spec = capture(Keep().eval(), (torch.randn(2, 4), torch.ones(2, 4, dtype=torch.int64))).input_spec
    assert spec.tensors[1].mask


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("bad", [50, 10_000, -1])
def test_an_id_past_the_table_is_refused_naming_the_input_the_value_and_the_range(backend, bad):
    pytest.importorskip(backend)
    compiled = kiln.optimize(Lookup(50).eval(), "cpu-x86", (torch.randint(0, 50, (2, 6)),), backend=backend,
                             precision="fp32", cache=False, isolate=False)
    ids = torch.randint(0, 50, (2, 6))
    ids[1, 3] = bad
    with pytest.raises(InputMismatch) as info:
        compiled(ids)
    assert info.value.where == "input 'ids'" and f"value {bad} is outside 0..49" in info.value.what
    compiled(ids.clamp(0, 49))  # in range: runs


def test_an_inductor_engine_given_an_id_past_its_table_raises_instead_of_aborting_the_process(tmp_path):
    # run in a child process: were the check missing, the engine's C++ bounds check would abort it
    script = textwrap.dedent("""
        import torch, kiln
        from torch import nn
        class Lookup(nn.Module):
            def __init__(self):
                super().__init__()
                self.table, self.out = nn.Embedding(50, 8), nn.Linear(8, 4)
            def forward(self, ids):
                return self.out(self.table(ids))
        compiled = kiln.optimize(Lookup().eval(), "cpu-x86", (torch.randint(0, 50, (2, 6)),), backend="inductor",
                                 precision="fp32", cache=False, isolate=False)
        try:
            compiled(torch.full((2, 6), 5000))
        except kiln.InputMismatch as exc:
            print("refused:", exc.what)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: value 5000 is outside 0..49" in done.stdout


def test_mask_draws_pad_like_real_batches_with_a_fully_padded_row_on_even_seeds():
    spec = capture(_tiny_bert(), (torch.randint(0, 100, (4, 16)), torch.ones(4, 16, dtype=torch.int64))).input_spec
    _, even = random_inputs(spec, 0)
    _, odd = random_inputs(spec, 1)
    for mask in (even, odd):
        assert set(mask.unique().tolist()) <= {0, 1}
        assert torch.equal(mask, mask.sort(dim=-1, descending=True).values)  # ones, then the padding
    assert even[-1].sum() == 0 and even[0].sum() == 16


def test_the_roles_travel_in_the_artifacts_input_spec():
    spec = capture(_tiny_bert(), (torch.randint(0, 100, (2, 16)), torch.ones(2, 16, dtype=torch.int64))).input_spec
    assert InputSpec.from_dict(spec.to_dict()) == spec


def test_verification_draws_padded_masks_and_so_catches_a_backend_wrong_on_a_fully_padded_row():
    pytest.importorskip("openvino")
    model, ids, mask = _tiny_bert(), torch.randint(0, 100, (2, 16)), torch.ones(2, 16, dtype=torch.int64)
    # without kiln's guard OpenVINO answers NaN for a fully padded sequence, which eager does not
    with pytest.raises(VerificationError, match="NaN/Inf positions differ from eager"):
        kiln.optimize(model, "cpu-x86", (ids, mask), backend="openvino", precision="fp32", cache=False, isolate=False,
                      disabled_passes=("guard_fully_masked_attention",))
    compiled = kiln.optimize(model, "cpu-x86", (ids, mask), backend="openvino", precision="fp32", cache=False, isolate=False)
    assert all(check["ok"] for check in compiled.report.verification)
