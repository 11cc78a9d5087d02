"""The command line: compile | run | bench | inspect | profiles, exit codes and error lines.

Most tests call `kiln.cli.main([...])` in-process and read stdout/stderr with capsys; a few run
`python -m kiln.cli` in a subprocess, where exit codes and tracebacks are what a shell sees.
One artifact is compiled for the module from tests/cli/tiny_models.py (importable as
`tiny_models` once this folder is on sys.path / PYTHONPATH).

Exit codes (kiln/cli.py): 0 ok, 2 usage error, 1 any other error, as one line on stderr that
starts with "kiln: error:" (the traceback only with --debug).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import kiln
from kiln import hardware_profiles
from kiln.cli import main
from kiln.verify import TOLERANCE

CLI_DIR = Path(__file__).resolve().parent
FP32 = TOLERANCE[kiln.Precision.FP32]
ORT = ["--backend", "onnxruntime"]


def run_main(argv: list[str]) -> SimpleNamespace:
    """main(argv) with stdout/stderr captured by redirection (usable outside capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return SimpleNamespace(rc=rc, out=out.getvalue(), err=err.getvalue())


@pytest.fixture
def cli(capsys, monkeypatch):
    """Call main(argv) in-process; returns (exit code, stdout, stderr). tiny_models is importable."""
    monkeypatch.syspath_prepend(str(CLI_DIR))  # also undoes the cwd kiln.cli puts on sys.path

    def call(*argv: str) -> SimpleNamespace:
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return SimpleNamespace(rc=rc, out=captured.out, err=captured.err)

    return call


def shell(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CLI_DIR), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "kiln.cli", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def one_error_line(err: str, prefix: str = "kiln: error:") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith(prefix), lines[0]
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> SimpleNamespace:
    """`kiln compile tiny_models:tiny --factory-arg out_features=3 --input x=2x8:float32` once."""
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(CLI_DIR))
        mp.chdir(root)
        result = run_main(["compile", "tiny_models:tiny", "--factory-arg", "out_features=3", "--input-spec", "x=2x8:float32",
                           *ORT, "-o", "out.kiln"])
    result.path = root / "out.kiln"
    return result


def eager(x: torch.Tensor) -> torch.Tensor:
    sys.path.insert(0, str(CLI_DIR))
    try:
        import tiny_models
    finally:
        sys.path.remove(str(CLI_DIR))
    with torch.no_grad():
        return tiny_models.tiny(out_features=3)(x)


# ---------------------------------------------------------------- profiles

def test_profiles_list_names_every_shipped_profile(cli):
    result = cli("profiles", "list")
    assert result.rc == 0
    names = [line.split()[0] for line in result.out.splitlines() if line.strip()]
    assert {"cpu-x86", "a100", "h100"} <= set(names)
    assert names == hardware_profiles.available()


def test_profiles_list_json_is_a_list_of_names(cli):
    result = cli("profiles", "list", "--json")
    assert result.rc == 0
    assert json.loads(result.out) == hardware_profiles.available()


def test_profiles_show_prints_the_profile_summary(cli):
    result = cli("profiles", "show", "cpu-x86")
    assert result.rc == 0
    assert result.out.startswith("cpu-x86:")
    assert "onnxruntime" in result.out


def test_profiles_show_json_has_name_digest_and_devices(cli):
    result = cli("profiles", "show", "cpu-x86", "--json")
    assert result.rc == 0
    data = json.loads(result.out)
    profile = hardware_profiles.load("cpu-x86")
    assert data["name"] == "cpu-x86"
    assert data["digest"] == profile.digest
    assert data["primary_device"] == profile.primary_device
    assert data["devices"]["cpu"]["kind"] == "cpu"
    assert "onnxruntime" in data["devices"]["cpu"]["backends"]


def test_profiles_show_unknown_name_exits_1_with_one_line_naming_it(cli):
    result = cli("profiles", "show", "nosuch")
    assert result.rc == 1
    assert "'nosuch'" in one_error_line(result.err)
    assert result.out == ""


def test_profiles_show_without_a_name_is_a_usage_error(cli):
    result = cli("profiles", "show")
    assert result.rc == 2
    one_error_line(result.err, "kiln: usage error:")


# ---------------------------------------------------------------- compile

def test_compile_writes_an_artifact_and_prints_the_report(built):
    assert built.rc == 0, built.err
    assert zipfile.is_zipfile(built.path)
    assert "kiln report: Tiny for profile cpu-x86" in built.out
    assert built.out.rstrip().endswith(f"wrote {built.path.name}") or f"wrote {built.path}" in built.out


def test_compile_passes_factory_args_to_the_factory(built):
    compiled = kiln.load(built.path)
    assert compiled.input_spec.describe() == "x: float32[2x8]"
    assert compiled.run_flat([torch.randn(2, 8)])[0].shape == (2, 3)  # out_features=3 reached tiny()


def test_compile_uses_the_inputs_a_factory_returns_and_writes_a_directory_with_json(cli, tmp_path):
    target = str(tmp_path / "art") + "/"
    result = cli("compile", "tiny_models:tiny_with_inputs", *ORT, "-o", target, "--json")
    assert result.rc == 0, result.err
    data = json.loads(result.out)
    assert Path(data["artifact"]) == tmp_path / "art"
    assert data["backends"] == {"p0": "onnxruntime"}
    assert data["report"]["inputs"] == "x: float32[2x8]"
    assert (tmp_path / "art" / "manifest.json").is_file()
    assert cli("run", target).rc == 0


def test_compile_from_a_torch_export_pt2_file(cli, tmp_path):
    import tiny_models

    model, example = tiny_models.tiny_with_inputs()
    torch.export.save(torch.export.export(model, example), tmp_path / "tiny.pt2")
    result = cli("compile", tmp_path / "tiny.pt2", *ORT, "-o", tmp_path / "from_pt2.kiln")
    assert result.rc == 0, result.err
    loaded = kiln.load(tmp_path / "from_pt2.kiln")
    with torch.no_grad():
        want = model(*example)
    torch.testing.assert_close(loaded(*example), want, rtol=FP32.rtol, atol=FP32.atol)


def test_compile_of_a_model_whose_output_is_all_zeros_succeeds(cli, tmp_path):
    # Regression: verify.compare used Tensor.max(initial=0) (no such argument in torch) for
    # all-zero outputs, so this build failed as "backend onnxruntime failed: TypeError".
    result = cli("compile", "tiny_models:all_zero", "--input-spec", "x=2x8:float32", *ORT, "-o", tmp_path / "zero.kiln")
    assert result.rc == 0, result.err
    [row] = json.loads(cli("run", tmp_path / "zero.kiln", "--json").out)["outputs"]
    assert row["sum"] == 0.0


def test_compile_to_the_working_folder_exits_1_with_one_line_and_leaves_its_files(cli, tmp_path, monkeypatch):
    # Regression: `-o .` once removed the working folder's files, then failed.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("print('mine')\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "values.csv").write_text("1,2,3\n")
    for extra in ([], ["--overwrite"]):
        result = cli("compile", "tiny_models:tiny", "--input-spec", "x=2x8:float32", "-o", ".", *extra)
        assert result.rc == 1
        line = one_error_line(result.err)
        assert str(tmp_path) in line and "not a kiln artifact" in line
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["data", "data/values.csv", "train.py"]
    assert (tmp_path / "train.py").read_text() == "print('mine')\n"


def test_compile_replaces_an_existing_artifact_only_with_overwrite(cli, built, tmp_path):
    target = tmp_path / "out.kiln"
    target.write_bytes(built.path.read_bytes())  # built with out_features=3
    argv = ["compile", "tiny_models:tiny", "--input-spec", "x=2x8:float32", *ORT, "-o", target]
    refused = cli(*argv)
    assert refused.rc == 1
    assert "--overwrite" in one_error_line(refused.err)
    assert target.read_bytes() == built.path.read_bytes()
    result = cli(*argv, "--overwrite")
    assert result.rc == 0, result.err
    assert kiln.load(target)(torch.randn(2, 8)).shape == (2, 4)  # the new model (out_features=4)


def test_compile_with_unknown_profile_exits_1_with_one_line(cli, tmp_path):
    result = cli("compile", "tiny_models:tiny", "--input-spec", "x=2x8:float32", "--profile", "nosuch", "-o", tmp_path / "o.kiln")
    assert result.rc == 1
    assert "'nosuch'" in one_error_line(result.err)
    assert not (tmp_path / "o.kiln").exists()


def test_compile_with_unknown_backend_exits_1_with_one_line(cli, tmp_path):
    result = cli("compile", "tiny_models:tiny", "--input-spec", "x=2x8:float32", "--backend", "nosuch", "-o", tmp_path / "o.kiln")
    assert result.rc == 1
    assert "'nosuch'" in one_error_line(result.err)


@pytest.mark.parametrize("spec", [
    "x=2x8", "x2x8:float32", "x=2xa:float32", "x=2x8:float99", "x=2x8:int64:a:b",
    "x=2x8:int64:0",
])
def test_compile_refuses_bad_input_syntax_as_usage_error(cli, tmp_path, spec):
    result = cli("compile", "tiny_models:tiny", "--input-spec", spec, *ORT, "-o", tmp_path / "o.kiln")
    assert result.rc == 2
    assert repr(spec) in one_error_line(result.err, "kiln: usage error:")


@pytest.mark.parametrize("spec", ["x=-2x8:float32", "x=2x8:int64:5:1"])
def test_compile_refuses_impossible_input_values_as_usage_error(cli, tmp_path, spec):
    result = cli("compile", "tiny_models:tiny", "--input-spec", spec, *ORT, "-o", tmp_path / "o.kiln")
    assert result.rc == 2
    one_error_line(result.err, "kiln: usage error:")


@pytest.mark.parametrize("target, words", [
    ("no_such_module_for_kiln:tiny", "cannot import"),
    ("tiny_models:nosuch", "no callable 'nosuch'"),
    ("tiny_models:not_a_model", "returned int"),
    ("tiny_models", "neither MODULE:FACTORY"),
])
def test_compile_refuses_a_bad_model_target_as_usage_error(cli, tmp_path, target, words):
    result = cli("compile", target, "--input-spec", "x=2x8:float32", "-o", tmp_path / "o.kiln")
    assert result.rc == 2
    assert words in one_error_line(result.err, "kiln: usage error:")


def test_compile_without_any_example_inputs_is_a_usage_error(cli, tmp_path):
    result = cli("compile", "tiny_models:tiny", "-o", tmp_path / "o.kiln")
    assert result.rc == 2
    assert "--input-spec" in one_error_line(result.err, "kiln: usage error:")


def test_compile_refuses_a_factory_arg_without_equals_as_usage_error(cli, tmp_path):
    result = cli("compile", "tiny_models:tiny", "--factory-arg", "width", "-o", tmp_path / "o.kiln")
    assert result.rc == 2
    assert "KEY=VALUE" in one_error_line(result.err, "kiln: usage error:")


@pytest.mark.parametrize("argv", [
    ["compile", "tiny_models:tiny", "--input-spec", "x=2x8:float32"],  # missing -o
    ["nosuchcommand"],
    ["profiles", "frobnicate"],
    ["--debug", "profiles", "list"],  # options belong after the subcommand
])
def test_argparse_usage_errors_exit_2(cli, argv):
    with pytest.raises(SystemExit) as info:
        cli(*argv)
    assert info.value.code == 2


def test_no_subcommand_prints_help_and_exits_2(cli):
    result = cli()
    assert result.rc == 2
    assert "usage: kiln" in result.err


# ---------------------------------------------------------------- run

RUN_LINE = re.compile(r"^output: float32\[2, 3\] sum=(\S+) sha256=([0-9a-f]{16})$")


def test_run_prints_each_output_shape_and_a_checksum(cli, built):
    result = cli("run", built.path)
    assert result.rc == 0, result.err
    lines = result.out.strip().splitlines()
    assert len(lines) == 1 and RUN_LINE.match(lines[0]), result.out


def test_run_is_deterministic_for_a_seed_and_changes_with_it(cli, built):
    first, again, other = (cli("run", built.path, "--seed", seed).out for seed in (0, 0, 1))
    assert first == again
    assert first != other


def test_run_json_lists_outputs_with_shape_dtype_sum_and_checksum(cli, built):
    result = cli("run", built.path, "--json")
    assert result.rc == 0
    [row] = json.loads(result.out)["outputs"]
    assert row["name"] == "output" and row["shape"] == [2, 3] and row["dtype"] == "float32"
    assert re.fullmatch(r"[0-9a-f]{16}", row["sha256"]) and isinstance(row["sum"], float)
    text_sum, text_sha = RUN_LINE.match(cli("run", built.path).out.strip()).groups()
    assert row["sha256"] == text_sha and float(text_sum) == pytest.approx(row["sum"], rel=1e-5)


def test_run_out_writes_each_output_as_npy(cli, built, tmp_path):
    result = cli("run", built.path, "--json", "--out", tmp_path / "outs")
    assert result.rc == 0
    [row] = json.loads(result.out)["outputs"]
    saved = np.load(tmp_path / "outs" / "output.npy")
    assert saved.shape == (2, 3) and saved.dtype == np.float32
    assert hashlib.sha256(saved.tobytes()).hexdigest()[:16] == row["sha256"]


def test_run_input_from_npy_matches_eager_within_fp32_tolerance(cli, built, tmp_path):
    x = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = cli("run", built.path, "--input-file", f"x={tmp_path / 'x.npy'}", "--out", tmp_path / "outs")
    assert result.rc == 0, result.err
    got = torch.from_numpy(np.load(tmp_path / "outs" / "output.npy"))
    torch.testing.assert_close(got, eager(torch.from_numpy(x)), rtol=FP32.rtol, atol=FP32.atol)


def test_the_old_input_spellings_still_work_for_a_release_with_a_note_naming_the_new_ones(cli, built, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 8), np.float32))
    ran = cli("run", built.path, "--input", f"x={tmp_path / 'x.npy'}")
    assert ran.rc == 0 and "`kiln run --input` is now `--input-file`" in ran.err
    compiled = cli("compile", "tiny_models:tiny", "--input", "x=2x8:float32", "--plan-only")
    assert compiled.rc == 0 and "`kiln compile --input` is now `--input-spec`" in compiled.err


def test_run_refuses_an_input_name_the_artifact_lacks(cli, built, tmp_path):
    np.save(tmp_path / "y.npy", np.zeros((2, 8), np.float32))
    result = cli("run", built.path, "--input-file", f"y={tmp_path / 'y.npy'}")
    assert result.rc == 2
    line = one_error_line(result.err, "kiln: usage error:")
    assert "'y'" in line and "x" in line


def test_run_refuses_an_unreadable_npy_file(cli, built, tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    result = cli("run", built.path, "--input-file", f"x={tmp_path / 'bad.npy'}")
    assert result.rc == 2
    assert "bad.npy" in one_error_line(result.err, "kiln: usage error:")


def test_run_with_an_input_of_the_wrong_shape_exits_1_with_one_line(cli, built, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 9), np.float32))
    result = cli("run", built.path, "--input-file", f"x={tmp_path / 'x.npy'}")
    assert result.rc == 1
    assert "'x'" in one_error_line(result.err)


def test_run_of_a_missing_artifact_exits_1_with_one_line_and_no_traceback(cli, tmp_path):
    result = cli("run", tmp_path / "nowhere.kiln")
    assert result.rc == 1
    line = one_error_line(result.err)
    assert "nowhere.kiln" in line and "no such file" in line
    assert result.out == ""


def test_run_with_the_expected_digest_runs_and_with_another_refuses_the_artifact(cli, built):
    digest = json.loads(cli("inspect", built.path, "--json").out)["digest"]
    assert cli("run", built.path, "--expected-digest", digest).rc == 0
    result = cli("run", built.path, "--expected-digest", "0" * len(digest))
    assert result.rc == 1 and "digest" in one_error_line(result.err)


def test_run_pin_with_a_placement_is_a_usage_error_pointing_at_compile(cli, built):
    result = cli("run", built.path, "--pin", "fc=cpu")
    line = one_error_line(result.err, "kiln: usage error:")
    assert result.rc == 2 and "kiln compile" in line and "--expected-digest" in line


def test_run_pin_with_a_digest_still_checks_it_and_names_the_new_flag(cli, built):
    digest = json.loads(cli("inspect", built.path, "--json").out)["digest"]
    result = cli("run", built.path, "--pin", digest)
    assert result.rc == 0 and "--expected-digest" in result.err


def test_run_of_a_corrupt_artifact_exits_1_with_one_line(cli, tmp_path):
    (tmp_path / "junk.kiln").write_bytes(os.urandom(2048))
    result = cli("run", tmp_path / "junk.kiln")
    assert result.rc == 1
    assert "not a zip archive" in one_error_line(result.err)


def test_debug_lets_the_error_propagate_with_its_traceback(cli, tmp_path):
    with pytest.raises(kiln.ArtifactError, match="no such file"):
        cli("run", tmp_path / "nowhere.kiln", "--debug")


# ---------------------------------------------------------------- inspect / bench

def test_inspect_prints_the_report(cli, built):
    result = cli("inspect", built.path)
    assert result.rc == 0
    for text in ("kiln report: Tiny for profile cpu-x86", "x: float32[2x8]", "p0: onnxruntime", "Verification"):
        assert text in result.out


def test_inspect_json_has_profile_plan_and_report(cli, built):
    result = cli("inspect", built.path, "--json")
    assert result.rc == 0
    data = json.loads(result.out)
    assert data["profile"] == {"name": "cpu-x86", "digest": hardware_profiles.load("cpu-x86").digest}
    assert [(p["name"], p["backend"]) for p in data["plan"]["partitions"]] == [("p0", "onnxruntime")]
    assert data["report"]["model"] == "Tiny"
    assert all(check["ok"] for check in data["report"]["verification"])


def with_engine_that_would_not_load(source: Path, target: Path) -> Path:
    """A copy of a zip artifact whose engine is garbage, its manifest checksum updated to match:
    every check passes and only loading the engine would fail."""
    with zipfile.ZipFile(source) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    manifest = json.loads(files["manifest.json"])
    item = manifest["engines"][0]["files"][0]
    files[item["path"]] = b"not an onnx model"
    item.update(sha256=hashlib.sha256(b"not an onnx model").hexdigest(), size=len(b"not an onnx model"))
    files["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return target


def test_inspect_reads_only_the_manifest_so_an_engine_that_would_not_load_still_shows_its_report(cli, built, tmp_path):
    path = with_engine_that_would_not_load(built.path, tmp_path / "broken.kiln")
    assert cli("run", path).rc == 1  # loading it fails...
    result = cli("inspect", path)
    assert result.rc == 0, result.err  # ...inspecting it does not load it
    assert "kiln report: Tiny for profile cpu-x86" in result.out
    assert json.loads(cli("inspect", path, "--json").out)["engines_loaded"] is False


def test_inspect_with_a_wrong_expected_digest_exits_1_naming_the_mismatch(cli, built):
    digest = json.loads(cli("inspect", built.path, "--json").out)["digest"]
    assert cli("inspect", built.path, "--expected-digest", digest).rc == 0
    result = cli("inspect", built.path, "--expected-digest", "0" * 64)
    assert result.rc == 1 and result.out == ""
    line = one_error_line(result.err)
    assert "differs from the pinned 0000000000000000" in line and digest[:16] in line


def test_inspect_load_engines_loads_them(cli, built, tmp_path):
    result = cli("inspect", built.path, "--load-engines")
    assert result.rc == 0, result.err
    assert "Engines loaded: p0 (onnxruntime)" in result.out
    assert "Load: kiln.load" in result.out and "first call" in result.out
    described = json.loads(cli("inspect", built.path, "--load-engines", "--json").out)
    assert described["engines_loaded"] is True
    assert described["load_seconds"] > 0 and described["first_call_seconds"] > 0
    broken = cli("inspect", with_engine_that_would_not_load(built.path, tmp_path / "broken.kiln"), "--load-engines")
    assert broken.rc == 1
    assert "p0" in one_error_line(broken.err)


def test_bench_reports_median_and_p99_over_the_iterations(cli, built):
    result = cli("bench", built.path, "--iters", "3", "--warmup", "1")
    assert result.rc == 0
    assert re.fullmatch(r"median \S+ ms, p99 \S+ ms over 3 calls \(p0: onnxruntime\)\n", result.out), result.out


def test_bench_json(cli, built):
    result = cli("bench", built.path, "--iters", "3", "--json")
    assert result.rc == 0
    data = json.loads(result.out)
    assert data["iters"] == 3 and data["backends"] == {"p0": "onnxruntime"}
    assert 0 <= data["median_ms"] <= data["p99_ms"]


@pytest.mark.parametrize("argv", [["--iters", "0"], ["--warmup", "-1"]])
def test_bench_refuses_nonsense_counts_as_usage_error(cli, built, argv):
    result = cli("bench", built.path, *argv)
    assert result.rc == 2
    one_error_line(result.err, "kiln: usage error:")


# ---------------------------------------------------------------- as a shell sees it

@pytest.mark.parametrize("argv, code", [
    (["profiles", "list"], 0),
    (["profiles", "show", "nosuch"], 1),
    (["nosuchcommand"], 2),
    (["compile", "tiny_models:tiny", "--input-spec", "x=2x8:float32"], 2),  # missing -o
    (["compile", "tiny_models:tiny", "--input-spec", "x=2x8", "-o", "o.kiln"], 2),  # bad --input
    (["run", "nowhere.kiln"], 1),
])
def test_python_m_kiln_cli_exit_codes(tmp_path, argv, code):
    result = shell(*argv, cwd=tmp_path)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    if code == 1:
        one_error_line(result.stderr)


def test_python_m_kiln_cli_run_succeeds_on_a_compiled_artifact(built, tmp_path):
    result = shell("run", built.path, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outputs"][0]["shape"] == [2, 3]


def test_python_m_kiln_cli_debug_prints_the_traceback(tmp_path):
    result = shell("run", "nowhere.kiln", "--debug", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert "kiln.errors.ArtifactError" in result.stderr and "no such file" in result.stderr


# ---------------------------------------------------------------- precision

def test_compile_lowers_to_int8_with_calibration_from_a_factory_and_a_budget(cli, tmp_path):
    # the model factory takes out_features, the calibration factory only what it names (batch)
    result = cli("compile", "tiny_models:tiny", "--input-spec", "x=2x8:float32", *ORT, "--factory-arg", "out_features=4",
                 "--precision", "int8", "--calibration", "tiny_models:calibration",
                 "--min-cosine", "0.99", "--json", "-o", tmp_path / "int8.kiln")
    assert result.rc == 0, result.err
    summary = json.loads(result.out)["report"]["precision_summary"]
    assert summary.startswith("precision=int8: int8-static for 1 of 1 layers") and "cosine >= 0.99" in summary


def test_compile_keep_fp32_holds_the_named_module_and_a_typo_is_one_error_line(cli, tmp_path):
    common = ("compile", "tiny_models:tiny", "--input-spec", "x=2x8:float32", *ORT, "--precision", "int8",
              "--calibration", "tiny_models:calibration", "--min-cosine", "0.99")
    result = cli(*common, "--keep-fp32", "fc", "--json", "-o", tmp_path / "kept.kiln")
    assert result.rc == 0, result.err
    (row,) = json.loads(result.out)["report"]["precision"]
    assert row["scheme"] == "fp32" and row["reason"] == "kept fp32 by keep_fp32='fc'"
    result = cli(*common, "--keep-fp32", "fcc", "-o", tmp_path / "typo.kiln")
    assert result.rc == 1
    assert "keep_fp32 'fcc' matches no node" in one_error_line(result.err) and "fc" in result.err


def test_compile_takes_calibration_samples_from_a_torch_save_file(cli, tmp_path):
    torch.save([torch.randn(2, 8) for _ in range(3)], tmp_path / "samples.pt")
    result = cli("compile", "tiny_models:tiny", "--input-spec", "x=2x8:float32", *ORT, "--precision", "int8",
                 "--calibration", tmp_path / "samples.pt", "--max-rel-error", "0.05", "--json", "-o", tmp_path / "o.kiln")
    assert result.rc == 0, result.err
    assert "int8-static for 1 of 1 layers" in json.loads(result.out)["report"]["precision_summary"]


def test_compile_with_an_unknown_precision_exits_1_naming_it(cli, tmp_path):
    result = cli("compile", "tiny_models:tiny", "--input-spec", "x=2x8:float32", *ORT, "--precision", "int7", "-o", tmp_path / "o.kiln")
    assert result.rc == 1
    assert "'int7'" in one_error_line(result.err)


def test_compile_refuses_a_precision_the_backend_cannot_run_with_one_line(cli, tmp_path):
    result = cli("compile", "tiny_models:tiny", "--input-spec", "x=2x8:float32", *ORT, "--precision", "bf16", "-o", tmp_path / "o.kiln")
    assert result.rc == 1
    line = one_error_line(result.err)
    assert "bf16" in line and "onnxruntime" in line


@pytest.mark.parametrize("source, words", [
    ("tiny_models:not_samples", "gave int, not an iterable of samples"),
    ("tiny_models:nosuch", "no callable 'nosuch'"),
    ("nocolon", "neither MODULE:FACTORY nor a .pt file"),
])
def test_compile_refuses_bad_calibration_sources_as_usage_errors(cli, tmp_path, source, words):
    result = cli("compile", "tiny_models:tiny", "--input-spec", "x=2x8:float32", *ORT, "--precision", "int8",
                 "--calibration", source, "-o", tmp_path / "o.kiln")
    assert result.rc == 2
    assert words in one_error_line(result.err, "kiln: usage error:")


def test_compile_refuses_an_unreadable_calibration_file_as_a_usage_error(cli, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    result = cli("compile", "tiny_models:tiny", "--input-spec", "x=2x8:float32", *ORT, "--precision", "int8",
                 "--calibration", tmp_path / "junk.pt", "-o", tmp_path / "o.kiln")
    assert result.rc == 2
    assert "cannot read calibration samples" in one_error_line(result.err, "kiln: usage error:")


def test_compile_refuses_a_factory_arg_the_factory_does_not_take_as_a_usage_error(cli, tmp_path):
    result = cli("compile", "tiny_models:tiny", "--input-spec", "x=2x8:float32", *ORT, "--factory-arg", "batch=2", "-o", tmp_path / "o.kiln")
    assert result.rc == 2
    assert "tiny_models:tiny does not take batch=" in one_error_line(result.err, "kiln: usage error:")
