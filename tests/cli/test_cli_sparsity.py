"""`kiln compile --sparsity 2:4`: planned for a GPU profile here, refused on one without sparse tensor cores."""

import re
from pathlib import Path

import pytest

from kiln.cli import main

CLI_DIR = Path(__file__).parent


@pytest.fixture
def cli(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(CLI_DIR))  # tiny_models is importable, as in test_cli.py

    def call(*argv: str):
        capsys.readouterr()
        rc = main(list(argv))
        out = capsys.readouterr()
        return rc, out.out, out.err
    return call


def test_plan_only_on_a100_prints_each_layers_2_4_decision(cli):
    rc, out, err = cli("compile", "tiny_models:sparse_mlp", "--input-spec", "x=4x256:float32", "--profile", "a100",
                       "--precision", "fp16", "--sparsity", "2:4", "--min-cosine", "0.5", "--plan-only")
    assert rc == 0, err
    assert re.search(r"Sparsity \([12] of 3 weighted layers pruned to 2:4\)", out)  # the budget decides which
    assert "2:4 at fp16" in out and "too small to pay" in out


def test_a_profile_without_sparse_tensor_cores_exits_with_one_line_naming_it(cli):
    rc, _, err = cli("compile", "tiny_models:sparse_mlp", "--input-spec", "x=4x256:float32", "--profile", "t4",
                     "--sparsity", "2:4", "--plan-only")
    assert rc != 0 and "profile t4" in err and "NVIDIA T4" in err and "Traceback" not in err
