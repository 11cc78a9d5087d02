"""A model calling the user's torch.library ops builds with default settings: each isolated
candidate build imports the module defining the ops, or, where no child process can import
them, the partition builds in-process and the report says so."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn

import kiln
from kiln.build.isolate import op_libraries
from kiln.frontend.capture import capture

from build import op_library  # noqa: F401  (registers kiln_build_test::scaled_tanh and ::bump)


class UsesLibraryOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.ops.kiln_build_test.bump(torch.ops.kiln_build_test.scaled_tanh(self.fc(x)))


def test_the_modules_defining_a_graphs_library_ops_are_found():
    gm = capture(UsesLibraryOps().eval(), (torch.randn(2, 8),)).gm
    assert op_libraries(gm).modules == (op_library.__name__,) and op_libraries(gm).unimportable == ()


def test_a_model_with_library_ops_builds_in_child_processes_that_import_them():
    model, x = UsesLibraryOps().eval(), torch.randn(2, 8)
    compiled = kiln.optimize(model, "cpu-x86", x, cache=False)  # cpu-x86 measures: candidates build in child processes
    assert compiled.backends == {"p0": "inductor"}
    assert not any("built in this process" in n for n in compiled.report.notes)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_ops_defined_in_a_script_build_in_process_and_the_report_says_why(tmp_path: Path):
    script = textwrap.dedent("""
        import torch, kiln
        @torch.library.custom_op("kiln_script_test::bump", mutates_args=())
        def bump(x: torch.Tensor) -> torch.Tensor:
            return x + 1.0
        @bump.register_fake
        def _(x):
            return torch.empty_like(x)
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(8, 8)
            def forward(self, x):
                return torch.ops.kiln_script_test.bump(self.fc(x))
        compiled = kiln.optimize(M().eval(), "cpu-x86", torch.randn(2, 8), cache=False, backend="inductor", isolate=True)
        print([n for n in compiled.report.notes if "built in this process" in n][0])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kiln_script_test.bump.default are defined where a child cannot import them (__main__)" in done.stdout
