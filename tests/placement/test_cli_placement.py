"""The command line's placement surface: `compile --plan-only` (with --pin and --html) for a
profile whose devices this machine lacks, and `profile-host`."""

from __future__ import annotations

from pathlib import Path

from kiln.cli import main
from kiln.hardware_profiles import load

CLI_DIR = Path(__file__).parent.parent / "cli"


def test_compile_plan_only_places_on_devices_absent_here_and_draws_the_graph(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(CLI_DIR))
    page = tmp_path / "plan.html"
    rc = main(["compile", "tiny_models:tiny", "--input-spec", "x=2x8:float32", "--profile", "jetson-orin", "--plan-only",
               "--pin", "fc=cpu", "--html", str(page)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "planned, not built" in out and "Estimated end to end" in out and "pinned to cpu" in out
    assert "<svg" in page.read_text() and "<script" not in page.read_text()


def test_profile_host_writes_a_loadable_profile(tmp_path, capsys):
    target = tmp_path / "here.yaml"
    assert main(["profile-host", "-o", str(target), "--seconds", "0.02"]) == 0
    assert load(target).primary.kind.value == "cpu"
    assert "wrote" in capsys.readouterr().out
