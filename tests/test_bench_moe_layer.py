"""Smoke test of ``benchmarks/bench_moe_layer.py`` on 4 virtual CPU devices: it runs (its own
correctness checks of the three variants included) and writes the JSON and the PNG."""

import json
import math
import sys

from conftest import REPO, subprocess_env
from test_example import run_example

BENCH = REPO / "benchmarks" / "bench_moe_layer.py"


def test_bench_moe_layer_smoke(tmp_path):
    out = tmp_path / "moe_layer.json"
    cmd = [sys.executable, str(BENCH), "--tokens", "64", "--hidden", "256", "--experts", "8",
           "--ranks", "4", "--ffn", "256", "--iters", "2", "--repeats", "2",
           "--routing", "zipf", "--grouped-capacity-factor", "1.25", "--no-zero-padding",
           "--out", str(out)]
    env = subprocess_env(JAX_PLATFORMS="cpu",
                         XLA_FLAGS="--xla_force_host_platform_device_count=4")
    returncode, stdout, report = run_example(cmd, timeout_s=300, env=env)
    assert returncode == 0, report
    assert "ratios:" in stdout, report
    res = json.loads(out.read_text())
    got = {(r["variant"], r["gemm"]) for r in res["results"]}
    want = {(v, g) for v in ("sort", "grouped", "xla") for g in (False, True)}
    want |= {(v, False) for v in ("copy", "gemm", "dispatch", "dispatch_grouped", "plain")}
    assert want == got, got
    # Timings of 2 chained calls on a shared CPU are noise (a difference of two wall times can
    # even be negative): check they are there, not their values.
    assert all(math.isfinite(r["us"]) for r in res["results"])
    for key in ("sort_over_grouped", "xla_over_grouped", "grouped_over_copy",
                "layer_sort_over_grouped", "comm_share_grouped",
                "dispatch_grouped_over_dispatch", "grouped_over_plain"):
        assert math.isfinite(res["ratios"][key]), res["ratios"]
    shape = res["shape"]
    assert shape["ranks"] == 4 and shape["experts"] == 8 and not shape["zero_padding"]
    # 1.25 x the mean received pairs per rank (all K=8 experts of each token valid: T*K).
    assert shape["grouped_capacity"] == 1.25 * 64 * 8
    assert res["bytes"]["min"] > 0 and set(res["correctness"]) >= {"grouped vs sort +gemm"}
    assert out.with_suffix(".png").stat().st_size > 0
