"""Start N copies of a program as one ``jax.distributed`` job on this host: one process per GPU
(or N processes sharing GPU 0, or one CPU device each), bounded in time; every exit status is
collected and reported.

    python benchmarks/launch_local.py -n 4 --log-dir out/mp -- \\
        python benchmarks/bench_normal.py --tokens 4096 --json out/normal_mp.json
    python benchmarks/launch_local.py -n 2 --cpu -- python benchmarks/bench_normal.py \\
        --backends xla --tokens 32 --hidden 256 --experts 8      # no GPU: gloo collectives

Process i runs ``CMD --coordinator 127.0.0.1:PORT --num-processes N --process-id i`` (the flags
of ``examples/distributed_args.py``) in its own session, with:

* ``--gpus each`` (the default where there are at least N GPUs): ``CUDA_VISIBLE_DEVICES`` = the
  i-th visible GPU (``CUDA_VISIBLE_DEVICES`` of this process, else ``nvidia-smi -L``);
* ``--gpus shared`` (the default with fewer GPUs): every process on the first one, with
  ``XLA_PYTHON_CLIENT_PREALLOCATE=false``. XLA collectives fail there (NCCL: "Duplicate GPU
  detected", DESIGN §3): run only what needs none (the benchmarks' ``--backends cuda``);
* ``--cpu``: ``JAX_PLATFORMS=cpu``, one CPU device per process, gloo collectives;

and, unless already set, ``NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 CUDA_MODULE_LOADING=EAGER
PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1`` (as ``tests/test_multiprocess_gpu.py``'s workers).

Process 0's output (stdout and stderr) is shown as it comes and kept in ``LOG_DIR/proc0.log``;
the others' only in ``LOG_DIR/proc<i>.log`` (their tails are shown if they fail). The launcher
waits for all of them at most ``--timeout`` seconds, and once one has failed, the others at
most ``--grace`` seconds more (a peer blocked on the dead one fails within jaxep's
``timeout_s``); then it kills what is left -- only its own children and their sessions. Exit
status: 0 if every process exited 0, 124 on a timeout, else the first non-zero status (a
signal -s as 128 + s). SIGTERM / SIGINT (e.g. an outer ``timeout``) end the children too.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

BASE_ENV = dict(NVSHMEM_DISABLE_NVLS="1", NCCL_NVLS_ENABLE="0", CUDA_MODULE_LOADING="EAGER",
                PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
TAIL_LINES = 40


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visible_gpus() -> list[str]:
    """The GPU ids this process may hand out: ``CUDA_VISIBLE_DEVICES`` if set, else those
    ``nvidia-smi -L`` lists (jax is not imported here: it would hold the GPUs)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines()
                                            if l.startswith("GPU "))]


def process_env(i: int, num: int, mode: str, gpus: list[str]) -> dict:
    env = dict(os.environ)
    for k, v in BASE_ENV.items():
        env.setdefault(k, v)
    if mode == "cpu":
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=1"])
        env["JAX_PLATFORMS"] = "cpu"
        env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    elif mode == "each":
        env["CUDA_VISIBLE_DEVICES"] = gpus[i]
    else:  # shared
        env["CUDA_VISIBLE_DEVICES"] = gpus[0]
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


def _tail(path: str, lines: int = TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"(cannot read {path}: {e})"


def _kill(p: subprocess.Popen) -> None:
    """SIGKILL ``p`` and its session (it leads one: ``start_new_session``)."""
    for fn in (lambda: os.killpg(p.pid, signal.SIGKILL), p.kill):
        try:
            fn()
        except (ProcessLookupError, PermissionError, OSError):
            pass


class Interrupted(Exception):
    pass


def _on_signal(signum, frame):
    raise Interrupted(f"signal {signum}")


def launch(cmd: list[str], num: int, mode: str, timeout_s: float, grace_s: float,
           log_dir: str, port: int | None = None, echo=sys.stdout) -> tuple[int, list]:
    """Runs the job; returns (exit status, [(process, returncode or None, log path)])."""
    gpus = [] if mode == "cpu" else visible_gpus()
    if mode != "cpu" and not gpus:
        raise SystemExit("launch_local: no GPU visible (use --cpu)")
    if mode == "each" and len(gpus) < num:
        raise SystemExit(f"launch_local: --gpus each needs {num} GPUs, {len(gpus)} visible")
    port = port or free_port()
    os.makedirs(log_dir, exist_ok=True)
    where = {"cpu": "one CPU device each", "each": f"GPUs {gpus[:num]}",
             "shared": f"all on GPU {gpus[0] if gpus else '?'}"}[mode]
    print(f"launch_local: {num} processes ({where}), coordinator 127.0.0.1:{port}, "
          f"timeout {timeout_s:.0f} s, logs in {log_dir}", file=echo, flush=True)
    procs, logs, threads = [], [], []
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread
            pass
    start = time.monotonic()
    timed_out = interrupted = False
    try:
        for i in range(num):
            path = os.path.join(log_dir, f"proc{i}.log")
            logs.append(path)
            argv = [*cmd, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(num),
                    "--process-id", str(i)]
            log = open(path, "w")
            if i == 0:  # shown as it comes, and kept
                p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=process_env(i, num, mode, gpus),
                                     start_new_session=True)

                def pump(src=p.stdout, dst=log):
                    for line in iter(src.readline, b""):
                        text = line.decode(errors="replace")
                        dst.write(text)
                        dst.flush()
                        echo.write(text)
                        echo.flush()
                    dst.close()
                threads.append(threading.Thread(target=pump, daemon=True))
                threads[-1].start()
            else:
                p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=process_env(i, num, mode, gpus),
                                     start_new_session=True)
                log.close()
            procs.append(p)
        deadline = start + timeout_s
        failed_at = None
        while True:
            codes = [p.poll() for p in procs]   # every one (no short-circuit: poll sets it)
            if all(c is not None for c in codes):
                break
            now = time.monotonic()
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = now
            if failed_at is not None and now > failed_at + grace_s:
                break       # the failure is the status, not a timeout
            if now > deadline:
                timed_out = True
                break
            time.sleep(0.2)
    except Interrupted as e:
        interrupted = True
        print(f"launch_local: {e}: ending the processes", file=echo, flush=True)
    finally:
        left = [i for i, p in enumerate(procs) if p.poll() is None]
        for p in procs:  # also those that exited: a grandchild may live on in the session
            _kill(p)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for t in threads:
            t.join(timeout=10)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    wall = time.monotonic() - start
    results = []
    status = 0
    for i, p in enumerate(procs):
        rc = None if i in left else p.returncode
        results.append((i, rc, logs[i]))
        how = ("killed by the launcher (still running)" if i in left
               else f"exit {rc}" if rc is not None and rc >= 0 else f"signal {-rc}")
        print(f"launch_local: process {i}: {how}", file=echo, flush=True)
        if status == 0 and rc not in (0, None):
            status = rc if rc > 0 else 128 - rc
    if timed_out or interrupted:
        status = 124
    for i, rc, path in results:
        if rc != 0 and i != 0:
            print(f"----- process {i}: last {TAIL_LINES} lines of {path} -----\n{_tail(path)}",
                  file=echo, flush=True)
    print(f"launch_local: {'TIMED OUT after' if timed_out else 'done in'} {wall:.1f} s, "
          f"status {status}", file=echo, flush=True)
    return status, results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                usage="%(prog)s -n N [options] -- CMD [ARGS...]")
    p.add_argument("-n", "--num-processes", type=int, required=True)
    p.add_argument("--gpus", choices=["auto", "each", "shared"], default="auto",
                   help="auto: each if there are at least N GPUs, else shared")
    p.add_argument("--cpu", action="store_true", help="one CPU device per process (gloo)")
    p.add_argument("--timeout", type=float, default=540.0, help="seconds for the whole job")
    p.add_argument("--grace", type=float, default=90.0,
                   help="seconds the others get once one process has failed")
    p.add_argument("--log-dir", default=None, help="per-process logs (default: a temp dir)")
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        p.error("no command given (after --)")
    mode = "cpu" if a.cpu else a.gpus
    if mode == "auto":
        mode = "each" if len(visible_gpus()) >= a.num_processes else "shared"
    log_dir = a.log_dir or tempfile.mkdtemp(prefix="launch_local_")
    status, _ = launch(cmd, a.num_processes, mode, a.timeout, a.grace, log_dir, a.port)
    return status


if __name__ == "__main__":
    sys.exit(main())
