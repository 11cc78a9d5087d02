"""What kiln reads from, and sets for, the machine it runs on."""

from __future__ import annotations

import os
import subprocess
import sys

from kiln.host import SHORT_OPENMP_SPIN, openmp_spin_note

SPIN = "import os, sys; {first}; print(os.environ.get('GOMP_SPINCOUNT'))"


def spin_count_after(first: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "KILN_OPENMP_SPIN")}
    done = subprocess.run([sys.executable, "-c", SPIN.format(first=first)], capture_output=True, text=True,
                          env={**clean, **env}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_importing_kiln_before_torch_shortens_openmps_spin_unless_the_user_chose_a_policy():
    assert spin_count_after("import kiln") == SHORT_OPENMP_SPIN
    assert spin_count_after("import kiln", GOMP_SPINCOUNT="5") == "5"
    assert spin_count_after("import kiln", OMP_WAIT_POLICY="ACTIVE") == "None"
    assert spin_count_after("import kiln", KILN_OPENMP_SPIN="keep") == "None"


def test_too_late_once_torch_has_loaded_openmp():
    assert spin_count_after("import torch; import kiln") == "None"


def test_a_model_handing_over_between_pytorch_and_another_runtime_gets_a_note(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    note = openmp_spin_note({"openvino", "eager"})
    assert note is not None and f"GOMP_SPINCOUNT={SHORT_OPENMP_SPIN}" in note
    assert openmp_spin_note({"openvino"}) is None and openmp_spin_note({"eager", "inductor"}) is None
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    assert openmp_spin_note({"openvino", "eager"}) is None
