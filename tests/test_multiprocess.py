"""dispatch/combine across processes: 2 ``jax.distributed`` processes x 4 CPU devices each.

Each process runs ``tests/mp_worker.py``, which checks its own shards against NumPy; this test
only starts them, bounds the time they take, and reports both processes' output on failure.
"""

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env

WORKER = Path(__file__).resolve().parent / "mp_worker.py"
NUM_PROCESSES = 2
LOCAL_DEVICES = 4
TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env() -> dict:
    return subprocess_env(JAX_PLATFORMS="cpu",
                          XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}")


def _report(procs, outputs) -> str:
    parts = []
    for i, (p, (out, err)) in enumerate(zip(procs, outputs)):
        parts.append(f"===== worker {i}: exit code {p.returncode} =====\n"
                     f"--- stdout ---\n{out}\n--- stderr ---\n{err}")
    return "\n".join(parts)


@pytest.mark.multiprocess
def test_dispatch_combine_two_processes(tmp_path):
    port = _free_port()
    env = _worker_env()
    procs, logs = [], []
    for i in range(NUM_PROCESSES):
        out = open(tmp_path / f"worker{i}.out", "w+")
        err = open(tmp_path / f"worker{i}.err", "w+")
        logs.append((out, err))
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(NUM_PROCESSES), str(port)],
            stdout=out, stderr=err, env=env, cwd=str(REPO)))
    deadline = time.monotonic() + TIMEOUT_S
    timed_out = False
    try:
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for p in procs:  # only the processes this test started
            if p.poll() is None:
                p.kill()
                p.wait()
        outputs = []
        for out, err in logs:
            out.seek(0), err.seek(0)
            outputs.append((out.read(), err.read()))
            out.close(), err.close()
    if timed_out:
        pytest.fail(f"workers did not finish within {TIMEOUT_S} s\n" + _report(procs, outputs))
    if any(p.returncode != 0 for p in procs):
        pytest.fail("a worker failed\n" + _report(procs, outputs))
