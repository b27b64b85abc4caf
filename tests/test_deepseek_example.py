"""Smoke test of ``examples/deepseek_moe.py``: on CPU, its prefill and decode outputs and its
gradients must match the dense single-device computation (exit 0, errors printed)."""

import re
import sys

import pytest

from conftest import REPO
from test_example import run_example

EXAMPLE = REPO / "examples" / "deepseek_moe.py"
TIMEOUT_S = 120
NAMES = ("prefill output", "decode output", "grad x", "grad router", "grad w_gate", "grad w_up",
         "grad w_down", "grad s_gate", "grad s_up", "grad s_down")


@pytest.mark.parametrize("extra", [[], ["--devices", "4", "--placement", "round_robin"]],
                         ids=["linear-8", "round_robin-4"])
def test_deepseek_moe_matches_dense(extra):
    cmd = [sys.executable, str(EXAMPLE), "--platform", "cpu", *extra]
    returncode, out, report = run_example(cmd, TIMEOUT_S)
    assert returncode == 0, report
    assert "all within tol" in out, report
    for name in NAMES:
        m = re.search(rf"^\s*{name}\s+max rel err (\S+)$", out, re.M)
        assert m, f"no error printed for {name}\n{report}"
        assert float(m.group(1)) <= 1e-5, f"{name}: {m.group(1)}\n{report}"
