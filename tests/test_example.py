"""Smoke test of ``examples/train_moe.py``: a short run on CPU must exit 0 with a falling loss."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env

EXAMPLE = REPO / "examples" / "train_moe.py"
TIMEOUT_S = 300


def _env() -> dict:
    # Let the script ask for its own number of virtual devices (--devices); keep other flags.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    return subprocess_env(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def run_example(cmd, timeout_s=TIMEOUT_S, env=None):
    """Runs an example (or a benchmark) on CPU, bounded: ``(exit code, stdout, a report of both
    streams)``. ``env``: the child's environment (default: the CPU one, no device count)."""
    try:
        proc = subprocess.run(cmd, env=env or _env(), cwd=str(REPO), capture_output=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout_s} s\n"
                    f"--- stdout ---\n{_text(e.stdout)}\n--- stderr ---\n{_text(e.stderr)}")
    out, err = _text(proc.stdout), _text(proc.stderr)
    report = f"exit code {proc.returncode}\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
    return proc.returncode, out, report


def test_train_moe_loss_falls():
    cmd = [sys.executable, str(EXAMPLE), "--platform", "cpu", "--devices", "4", "--steps", "20",
           "--tokens-per-rank", "64", "--hidden", "32", "--experts", "8", "--topk", "3",
           "--placement", "round_robin"]
    returncode, out, report = run_example(cmd)
    assert returncode == 0, report
    assert "loss fell" in out, report


@pytest.mark.multiprocess
def test_train_moe_two_processes():
    """The example launched as two ``jax.distributed`` processes (the plain-launcher flags), one
    CPU device each: the same script runs one process per device."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(EXAMPLE), "--platform", "cpu", "--steps", "20",
           "--tokens-per-rank", "64", "--hidden", "32", "--experts", "8", "--topk", "3",
           "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], env=_env(), cwd=str(REPO),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(cmd)} did not finish within {TIMEOUT_S} s")
    finally:
        for p in procs:  # only the processes this test started
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, (out, err)) in enumerate(zip(procs, outputs)):
        report = (f"process {i}: exit code {p.returncode}\n--- stdout ---\n{_text(out)}\n"
                  f"--- stderr ---\n{_text(err)}")
        assert p.returncode == 0, report
        assert "of 2 process(es)" in _text(out) and "loss fell" in _text(out), report
