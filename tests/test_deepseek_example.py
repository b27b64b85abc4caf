"""Smoke test of ``examples/deepseek_moe.py``: on CPU, its prefill and decode outputs and its
gradients must match the dense single-device computation (exit 0, errors printed)."""

import re
import subprocess
import sys

import pytest

from conftest import REPO
from test_example import _env, _text

EXAMPLE = REPO / "examples" / "deepseek_moe.py"
TIMEOUT_S = 120
NAMES = ("prefill output", "decode output", "grad x", "grad router", "grad w_gate", "grad w_up",
         "grad w_down", "grad s_gate", "grad s_up", "grad s_down")


@pytest.mark.parametrize("extra", [[], ["--devices", "4", "--placement", "round_robin"]],
                         ids=["linear-8", "round_robin-4"])
def test_deepseek_moe_matches_dense(extra):
    cmd = [sys.executable, str(EXAMPLE), "--platform", "cpu", *extra]
    try:
        proc = subprocess.run(cmd, env=_env(), cwd=str(REPO), capture_output=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not finish within {TIMEOUT_S} s\n"
                    f"--- stdout ---\n{_text(e.stdout)}\n--- stderr ---\n{_text(e.stderr)}")
    out, err = _text(proc.stdout), _text(proc.stderr)
    report = f"exit code {proc.returncode}\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
    assert proc.returncode == 0, report
    assert "all within tol" in out, report
    for name in NAMES:
        m = re.search(rf"^\s*{name}\s+max rel err (\S+)$", out, re.M)
        assert m, f"no error printed for {name}\n{report}"
        assert float(m.group(1)) <= 1e-5, f"{name}: {m.group(1)}\n{report}"
