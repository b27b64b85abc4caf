"""The benchmarks one process per device, on CPU: ``benchmarks/launch_local.py`` starts 2
``jax.distributed`` processes with one CPU device each (gloo collectives) running
``bench_normal.py`` / ``bench_ll.py`` with ``--backends xla`` and tiny shapes; process 0 alone
prints the tables and writes the JSON. ``compare_process_models.py`` then matches it against a
single-process run on 2 virtual devices. This is the plumbing of issue 22's process-per-GPU
comparison (``benchmarks/device_multi_gpu.sh``) without a GPU; timings on a shared CPU are noise,
so only their presence is checked."""

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env
from test_example import run_example

LAUNCH = REPO / "benchmarks" / "launch_local.py"
NORMAL = REPO / "benchmarks" / "bench_normal.py"
LL = REPO / "benchmarks" / "bench_ll.py"
COMPARE = REPO / "benchmarks" / "compare_process_models.py"
TIMEOUT_S = 240
TINY = ["--backends", "xla", "--hidden", "256", "--experts", "8", "--topk", "2",
        "--calls", "2", "--repeats", "2", "--unroll", "0"]
NORMAL_ARGS = ["--tokens", "32", "--routing", "random", "--num-sms", "none", *TINY]


def launch(tmp_path, bench_cmd, num=2, extra=()):
    logs = tmp_path / "logs"
    cmd = [sys.executable, str(LAUNCH), "-n", str(num), "--cpu", "--timeout",
           str(TIMEOUT_S - 30), "--log-dir", str(logs), *extra, "--", *bench_cmd]
    returncode, out, report = run_example(cmd, timeout_s=TIMEOUT_S, env=subprocess_env())
    return returncode, out, report, logs


@pytest.mark.multiprocess
def test_bench_normal_two_processes_and_compare(tmp_path):
    multi = tmp_path / "multi.json"
    rc, out, report, logs = launch(tmp_path, [sys.executable, str(NORMAL), *NORMAL_ARGS,
                                              "--json", str(multi)])
    assert rc == 0, report
    assert "launch_local: process 0: exit 0" in out and "process 1: exit 0" in out, report
    assert "R=2 x cpu in 2 processes" in out, report
    # only process 0 reports: process 1's log has its one line, no table
    other = (logs / "proc1.log").read_text()
    assert "process 1 of 2" in other and "stdout silenced" in other, other
    assert "dispatch bf16" not in other, other
    res = json.loads(multi.read_text())
    env = res["environment"]
    assert env["ranks"] == 2 and env["processes"] == 2 and env["platform"] == "cpu", env
    ops = {(r["op"], r["backend"], r["tokens"]) for r in res["results"]}
    assert ops == {(op, "xla", 32) for op in ("dispatch bf16", "dispatch fp8", "combine bf16")}
    assert all(math.isfinite(r["us"]) for r in res["results"])

    single = tmp_path / "single.json"
    cmd = [sys.executable, str(NORMAL), *NORMAL_ARGS, "--json", str(single)]
    rc, out, report = run_example(cmd, timeout_s=TIMEOUT_S, env=subprocess_env(
        JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert rc == 0, report
    s_res = json.loads(single.read_text())
    assert s_res["environment"]["processes"] == 1
    # the same routing in both runs (every process regenerates it from the seed): the received
    # rows per rank agree
    rows = lambda r: {x["op"]: x["recv_rows"] for x in r["results"]}  # noqa: E731
    assert rows(s_res) == rows(res)

    cmp_json = tmp_path / "compare.json"
    rc, out, report = run_example([sys.executable, str(COMPARE), str(single), str(multi),
                                   "--json", str(cmp_json)], timeout_s=60,
                                  env=subprocess_env())
    assert rc == 0, report
    assert "process-per-GPU" in out and "dispatch fp8" in out, report
    cmp = json.loads(cmp_json.read_text())
    assert {r["op"] for r in cmp["rows"]} == {"dispatch bf16", "dispatch fp8", "combine bf16"}
    # a ratio of two host-chained CPU timings (which can come out 0 or negative on a busy 2-core
    # machine) is only checked to be there
    assert all(r["backend"] == "xla" and isinstance(r["ratio"], float) for r in cmp["rows"])


@pytest.mark.multiprocess
def test_bench_ll_two_processes(tmp_path):
    out_json = tmp_path / "ll.json"
    rc, out, report, _ = launch(tmp_path, [
        sys.executable, str(LL), "--tokens", "16", "--no-overlap", "--no-prereduce", *TINY,
        "--json", str(out_json)])
    assert rc == 0, report
    res = json.loads(out_json.read_text())
    assert res["environment"]["processes"] == 2 and res["environment"]["ranks"] == 2
    assert {r["op"] for r in res["results"]} == {"dispatch fp8", "combine bf16"}


def test_launcher_reports_a_failed_process_and_ends_the_others(tmp_path):
    """Process 1 exits 3 at once, process 0 would sleep: the launcher kills process 0 after
    ``--grace``, reports both, and exits with process 1's status."""
    prog = ("import sys, time; i = int(sys.argv[sys.argv.index('--process-id') + 1]); "
            "print('started', i, flush=True); sys.exit(3) if i == 1 else time.sleep(600)")
    rc, out, report, logs = launch(tmp_path, [sys.executable, "-c", prog],
                                   extra=("--grace", "2"))
    assert rc == 3, report
    assert "process 0: killed by the launcher" in out and "process 1: exit 3" in out, report
    assert "started 1" in out, report   # process 1's log tail is shown


def test_device_script_parses():
    proc = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "device_multi_gpu.sh")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
