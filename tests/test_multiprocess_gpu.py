"""One process per GPU (``jax.distributed`` + the NVSHMEM transport): N worker processes, each
running ``tests/mp_gpu_worker.py``, which checks its own shards against the NumPy oracle.

On a machine with fewer GPUs than processes, all processes share GPU 0
(``CUDA_VISIBLE_DEVICES=0``): XLA collectives do not work there (NCCL: "Duplicate GPU
detected"), so the workers use none. With at least N GPUs, process i gets GPU i.

* ``ops`` (N = 2, 4): every op, bit-exact or within bf16 rounding of the oracle, gradients too.
* ``loop`` (N = 2, 4): 1000-iteration ``lax.fori_loop``s of dispatch -> combine and of
  ll_dispatch -> ll_combine, and 50 replays of a jitted step, with XLA command buffers on.
* ``absent`` / ``absent_ll`` / ``kill``: the last process never calls the op, or SIGKILLs itself
  mid-run; every other process must fail within ``timeout_s`` with ``comm.check()`` naming its
  rank, the missing peer and the phase, exit non-zero, and leave nothing running.
* ``ops`` with ``backend="xla"`` on CPU (2 processes, gloo collectives, small sizes): the same
  harness and oracle comparisons without a GPU (the one test here that CI runs).

The helper starts the workers in their own sessions, bounds their time, ends only its own
children (by pid, and their process groups), and shows every worker's output on failure.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, _gpus, subprocess_env
from jaxep import _cuda
from jaxep.communicator import FAILURE_EXIT_CODE

WORKER = Path(__file__).resolve().parent / "mp_gpu_worker.py"

# every worker, GPU or not
BASE_ENV = dict(XLA_PYTHON_CLIENT_PREALLOCATE="false", NVSHMEM_DISABLE_NVLS="1",
                NCCL_NVLS_ENABLE="0", CUDA_MODULE_LOADING="EAGER", PYTHONUNBUFFERED="1",
                PYTHONFAULTHANDLER="1")
# XLA command buffers (CUDA graphs) for custom calls, as tests/test_gpu_ll.py forces them
CMD_BUFFER_FLAGS = ("--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL "
                    "--xla_gpu_graph_min_graph_size=1")
FAIL_TIMEOUT_S = 10.0     # EPConfig.timeout_s of the absent / kill scenarios
FAIL_MARGIN_S = 60.0      # a survivor must have left within timeout_s + this of its call
# the harness's bound per scenario (s); pytest-timeout gets a minute more, so that the harness
# itself ends its workers and reports
OPS_S, LOOP_S, FAIL_S, CPU_S = 420, 420, 200, 240
LOG_TAIL = 20000          # characters of each stream shown on failure


# ------------------------------------------------------------------------------------------
# the harness
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Worker:
    index: int
    pid: int
    returncode: int | None
    exited_at: float | None      # time.time() when the harness saw it exit
    stdout: str
    stderr: str
    group_left: bool = False     # members of its process group were still alive at the end


@dataclasses.dataclass
class Run:
    scenario: str
    backend: str
    workers: list[Worker]
    timed_out: bool
    wall_s: float

    def report(self) -> str:
        parts = [f"scenario {self.scenario!r}, backend {self.backend!r}, "
                 f"{len(self.workers)} processes, {self.wall_s:.1f} s"
                 + (" (TIMED OUT: killed by the harness)" if self.timed_out else "")]
        for w in self.workers:
            out, err = w.stdout[-LOG_TAIL:], w.stderr[-LOG_TAIL:]
            parts.append(f"===== worker {w.index} (pid {w.pid}): exit code {w.returncode}"
                         + (" [process group left behind]" if w.group_left else "")
                         + f" =====\n--- stdout ---\n{out}\n--- stderr ---\n{err}")
        return "\n".join(parts)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _strip_device_count(flags: str) -> str:
    """conftest.py sets ``--xla_force_host_platform_device_count=8`` for this process: the
    workers get one device each, so drop it (keeping any other flag the user set)."""
    return " ".join(f for f in flags.split()
                    if not f.startswith("--xla_force_host_platform_device_count"))


def _visible_gpus() -> list[str]:
    """The GPU ids this process may hand out (``CUDA_VISIBLE_DEVICES`` if set)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [d.strip() for d in env.split(",") if d.strip()]
    return [str(i) for i in range(len(_gpus()))]


def worker_env(index: int, num: int, backend: str, sync_dir: Path, timeout_s: float,
               extra: dict | None) -> dict:
    env = subprocess_env(**BASE_ENV, MP_GPU_SYNC_DIR=str(sync_dir))
    flags = _strip_device_count(env.get("XLA_FLAGS", ""))
    if backend == "xla":   # CPU: one device per process, gloo collectives (the worker sets it)
        env["JAX_PLATFORMS"] = "cpu"
        flags = (flags + " --xla_force_host_platform_device_count=1").strip()
    else:
        gpus = _visible_gpus()
        env["CUDA_VISIBLE_DEVICES"] = gpus[index] if len(gpus) >= num else gpus[0]
    env["XLA_FLAGS"] = flags
    env["MP_GPU_WATCHDOG_S"] = str(int(timeout_s) - 20)  # stacks dumped before the harness kills
    for k, v in (extra or {}).items():
        if k == "XLA_FLAGS":
            env[k] = (flags + " " + v).strip()
        else:
            env[k] = v
    return env


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # not ours any more
        return False
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Terminated(Exception):
    """SIGTERM while workers run (e.g. a `timeout` around pytest): raised so that the
    workers, which live in their own sessions, are still ended."""


def _on_sigterm(signum, frame):
    raise Terminated(f"signal {signum} while the workers ran")


def run_workers(tmp_path: Path, num: int, scenario: str, backend: str, timeout_s: float,
                extra_env: dict | None = None) -> Run:
    """Start ``num`` workers of ``scenario``, wait at most ``timeout_s`` for all of them, then
    end whatever is left (only these children: by pid, and the process group each one leads,
    since they start in new sessions) and collect every worker's output."""
    port = _free_port()
    sync = tmp_path / "sync"
    sync.mkdir(exist_ok=True)
    procs, files = [], []
    start = time.monotonic()
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        previous = None
    try:
        for i in range(num):
            out = open(tmp_path / f"worker{i}.out", "w+")
            err = open(tmp_path / f"worker{i}.err", "w+")
            files.append((out, err))
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), str(i), str(num), str(port), scenario, backend],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=str(REPO),
                env=worker_env(i, num, backend, sync, timeout_s, extra_env),
                start_new_session=True))
        exited_at: dict[int, float] = {}
        deadline = start + timeout_s
        while len(exited_at) < num and time.monotonic() < deadline:
            for i, p in enumerate(procs):
                if i not in exited_at and p.poll() is not None:
                    exited_at[i] = time.time()
            time.sleep(0.1)
        timed_out = len(exited_at) < num
    finally:
        group_left = {}
        for i, p in enumerate(procs):
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            group_left[i] = _group_alive(p.pid)   # a grandchild still in its session
            if group_left[i]:
                _kill_group(p.pid)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        outputs = []
        for out, err in files:
            out.seek(0), err.seek(0)
            outputs.append((out.read(), err.read()))
            out.close(), err.close()
    wall = time.monotonic() - start
    workers = [Worker(i, p.pid, p.returncode, exited_at.get(i), o, e, group_left[i])
               for i, (p, (o, e)) in enumerate(zip(procs, outputs))]
    return Run(scenario, backend, workers, timed_out, wall)


def assert_all_ok(run: Run) -> None:
    if run.timed_out:
        pytest.fail("workers did not finish in time\n" + run.report())
    bad = [w.index for w in run.workers
           if w.returncode != 0 or f"[worker {w.index}] OK" not in w.stdout]
    if bad:
        pytest.fail(f"workers {bad} failed\n" + run.report())
    left = [w.index for w in run.workers if w.group_left]
    assert not left, f"workers {left} left processes behind\n" + run.report()


CHECK_RE = re.compile(r"rank (\d+)(?: \(node (\d+)\))? timed out waiting for peer (\d+)"
                      r"(?: \(node (\d+)\))?(?: via rank (\d+)(?: \(node \d+\))?)? in (.+)")


def assert_survivors_report(run: Run, victim: int, victim_rc, phase_word: str,
                            ranks_per_node: int | None = None) -> None:
    """Every process but ``victim`` failed its call within timeout_s + margin, printed
    ``comm.check()``'s message naming its rank, the victim and a phase (and with
    ``ranks_per_node`` both their nodes), and exited non-zero; the victim exited with one of
    ``victim_rc``; nothing is left running."""
    if run.timed_out:
        pytest.fail("a worker had to be killed by the harness (a hang?)\n" + run.report())
    problems = []
    for w in run.workers:
        if w.index == victim:
            if w.returncode not in victim_rc:
                problems.append(f"worker {w.index} (the victim): exit code {w.returncode}, "
                                f"want {victim_rc}")
            continue
        tag = f"worker {w.index}"
        # 3: the worker saw the error (JAX raised, comm.check() named it); FAILURE_EXIT_CODE:
        # JAX stayed blocked on the lost work and jaxep's failure watch ended the process;
        # SIGABRT after comm.check() named it: JAX's coordination service aborted the worker
        # while it waited for the others' reports, because process 0 (which hosts the service)
        # had been ended by the failure watch.
        reported = any("CHECK: " in line for line in w.stdout.splitlines())
        handled = w.returncode == 3 or (w.returncode == -signal.SIGABRT and reported)
        if not handled and w.returncode != FAILURE_EXIT_CODE:
            problems.append(f"{tag}: exit code {w.returncode}, want 3 (comm.check() raised), "
                            f"{FAILURE_EXIT_CODE} (jaxep ended the process) or SIGABRT after "
                            "comm.check() named the peer")
        if "MISMATCH" in w.stdout:
            problems.append(f"{tag}: wrong results before the failure")
        checks = [line for line in w.stdout.splitlines() if "CHECK: " in line]
        if not handled:  # the failure watch's line on stderr
            checks = [line for line in w.stderr.splitlines() if "timed out waiting" in line]
        m = CHECK_RE.search(checks[-1]) if checks else None
        if not m:
            problems.append(f"{tag}: no 'rank R timed out waiting for peer P in <phase>' in the "
                            f"message of comm.check() or jaxep's failure watch: "
                            f"{checks[-1:] or 'none printed'}")
        else:
            rank, peer, phase = int(m.group(1)), int(m.group(3)), m.group(6)
            # layered dispatch: another node's rows come through a forwarder ("via rank F"),
            # which is the missing process when the source is alive
            via = int(m.group(5)) if m.group(5) is not None else None
            if ranks_per_node:
                nodes = (m.group(2), m.group(4))
                want = (str(rank // ranks_per_node), str(peer // ranks_per_node))
                if nodes != want:
                    problems.append(f"{tag}: message names nodes {nodes}, want {want}")
            if rank != w.index:
                problems.append(f"{tag}: message names rank {rank}, want {w.index}")
            if victim not in (peer, via):
                problems.append(f"{tag}: message names peer {peer}"
                                + (f" via rank {via}" if via is not None else "")
                                + f", want {victim}")
            if phase_word not in phase:
                problems.append(f"{tag}: phase {phase!r} does not name {phase_word!r}")
        elapsed = re.findall(r"ELAPSED ([0-9.]+) s", w.stdout)
        if handled and not elapsed:
            problems.append(f"{tag}: no ELAPSED line")
        elif elapsed:
            e = float(elapsed[-1])
            if e > FAIL_TIMEOUT_S + FAIL_MARGIN_S:
                problems.append(f"{tag}: the error came {e:.1f} s after the call, more than "
                                f"timeout_s + {FAIL_MARGIN_S:.0f} s")
            if e < 0.5 * FAIL_TIMEOUT_S:
                problems.append(f"{tag}: the error came {e:.1f} s after the call, long before "
                                f"timeout_s={FAIL_TIMEOUT_S}")
        calls = re.findall(r"CALL_AT ([0-9.]+)", w.stdout)
        if calls and w.exited_at is not None:
            took = w.exited_at - float(calls[-1])
            if took > FAIL_TIMEOUT_S + FAIL_MARGIN_S:
                problems.append(f"{tag}: exited {took:.1f} s after its last call started, more "
                                f"than timeout_s + {FAIL_MARGIN_S:.0f} s")
    left = [w.index for w in run.workers if w.group_left]
    if left:
        problems.append(f"workers {left} left processes behind")
    if problems:
        pytest.fail("\n".join(problems) + "\n" + run.report())


# ------------------------------------------------------------------------------------------
# GPU tests (the NVSHMEM transport)
# ------------------------------------------------------------------------------------------


@functools.cache
def _nvshmem_import_error() -> str | None:
    """Why ``import nvshmem.core`` fails in a worker's environment (None if it works); in a
    child process, so that this one loads nothing of it."""
    env = subprocess_env(**BASE_ENV)
    try:
        proc = subprocess.run([sys.executable, "-c", "import nvshmem.core"], env=env,
                              capture_output=True, text=True, timeout=180, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return "`import nvshmem.core` did not finish in 180 s"
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"`import nvshmem.core` failed: {last}"
    return None


@pytest.fixture
def gpu_workers():
    """Skips unless the process-per-GPU transport can run here."""
    if not _gpus():
        pytest.skip("needs a CUDA GPU")
    if not _cuda.available():
        pytest.skip(f"jaxep extension built without CUDA: {_cuda.unavailable_reason()}")
    why = _nvshmem_import_error()
    if why:
        pytest.skip(f"nvshmem4py missing ({why}); pip install 'jaxep[cuda]'")
    return len(_visible_gpus())




@pytest.mark.parametrize("num", [2, 4])
@pytest.mark.gpu
@pytest.mark.multiprocess
@pytest.mark.timeout(OPS_S + 60)
def test_ops_match_oracle(tmp_path, gpu_workers, num):
    """Every op (normal, FP8, low-latency, two-phase, gradients) in N processes against the
    NumPy oracle."""
    assert_all_ok(run_workers(tmp_path, num, "ops", "cuda", timeout_s=OPS_S))


@pytest.mark.parametrize("num", [2, 4])
@pytest.mark.gpu
@pytest.mark.multiprocess
@pytest.mark.timeout(LOOP_S + 60)
def test_thousand_iterations_with_command_buffers(tmp_path, gpu_workers, num):
    """1000-iteration loops of dispatch -> combine and ll_dispatch -> ll_combine inside one
    program, and 50 replays of a jitted step, with XLA command buffers on: exact."""
    assert_all_ok(run_workers(tmp_path, num, "loop", "cuda", timeout_s=LOOP_S,
                              extra_env={"XLA_FLAGS": CMD_BUFFER_FLAGS}))


@pytest.mark.parametrize("scenario,num,phase_word", [("absent", 2, "dispatch"),
                                                     ("absent", 4, "dispatch"),
                                                     ("absent_ll", 2, "ll_dispatch")])
@pytest.mark.gpu
@pytest.mark.multiprocess
@pytest.mark.timeout(FAIL_S + 60)
def test_absent_peer_times_out(tmp_path, gpu_workers, scenario, num, phase_word):
    """The last process creates the communicator but never calls the op: every other process
    fails within timeout_s, comm.check() names its rank, the absent peer and the phase."""
    run = run_workers(tmp_path, num, scenario, "cuda", timeout_s=FAIL_S,
                      extra_env={"MP_GPU_TIMEOUT_S": str(FAIL_TIMEOUT_S)})
    # The absent process exits 0 after process 0's report, or is aborted by JAX's coordination
    # service (SIGABRT) when process 0 -- which hosts it -- is ended by jaxep's failure watch.
    assert_survivors_report(run, victim=num - 1, victim_rc=(0, -signal.SIGABRT),
                            phase_word=phase_word)


@pytest.mark.parametrize("num", [2, 4])
@pytest.mark.gpu
@pytest.mark.multiprocess
@pytest.mark.timeout(FAIL_S + 60)
def test_killed_peer_times_out(tmp_path, gpu_workers, num):
    """The last process SIGKILLs itself between calls: the others fail within timeout_s and
    comm.check() names the dead peer."""
    run = run_workers(tmp_path, num, "kill", "cuda", timeout_s=FAIL_S,
                      extra_env={"MP_GPU_TIMEOUT_S": str(FAIL_TIMEOUT_S)})
    assert_survivors_report(run, victim=num - 1, victim_rc=(-signal.SIGKILL,), phase_word="")


# ------------------------------------------------------------------------------------------
# GPU tests across (virtual) nodes: EPConfig.ranks_per_node on one host or one GPU
# ------------------------------------------------------------------------------------------

# (processes, ranks per node): 2 nodes x 1, 2 nodes x 2, 4 nodes x 1
INTERNODE_SHAPES = [(2, 1), (4, 2), (4, 1)]


@pytest.mark.parametrize("num,rpn", INTERNODE_SHAPES,
                         ids=[f"{n // r}x{r}" for n, r in INTERNODE_SHAPES])
@pytest.mark.gpu
@pytest.mark.multiprocess
@pytest.mark.timeout(OPS_S + 60)
def test_internode_ops_match_oracle(tmp_path, gpu_workers, num, rpn):
    """Virtual nodes, peers in other nodes reached by NVSHMEM puts, against the NumPy oracle
    over >= 20 routings per form (an empty node among them): the hierarchical normal mode
    (dispatch bf16 and FP8, combine, capacity overflow, gradients; 1000 dispatch -> combine
    rounds) and every low-latency op (one kernel and two-phase, bf16, float32 and FP8, the
    four combines, gradients), the dispatch flat and (nodes of 2+ ranks) layered; 1000
    ll_dispatch -> ll_combine rounds. The rule keeps the grouped ops on the pure-JAX path."""
    if not _cuda.nvshmem_device_linked():
        pytest.skip("jaxep built without NVSHMEM's device library (no internode kernels)")
    run = run_workers(tmp_path, num, "internode", "cuda", timeout_s=OPS_S,
                      extra_env={"MP_GPU_RANKS_PER_NODE": str(rpn)})
    assert_all_ok(run)
    for w in run.workers:  # shown with pytest -rP: each process's case count and time
        print(*(line for line in w.stdout.splitlines() if "] OK (" in line or "cases in" in line),
              sep="\n")


@pytest.mark.parametrize("scenario,num,rpn,phase_word", [("absent_ll", 4, 2, "ll_dispatch"),
                                                         ("kill_ll", 4, 2, ""),
                                                         ("absent", 4, 2, "dispatch"),
                                                         ("kill", 4, 2, "")])
@pytest.mark.gpu
@pytest.mark.multiprocess
@pytest.mark.timeout(FAIL_S + 60)
def test_internode_peer_failure_names_nodes(tmp_path, gpu_workers, scenario, num, rpn,
                                            phase_word):
    """Virtual nodes, the last process absent or killed: every other process fails within
    timeout_s, and comm.check() names its rank and node, the peer and its node, the phase."""
    if not _cuda.nvshmem_device_linked():
        pytest.skip("jaxep built without NVSHMEM's device library (no internode kernels)")
    run = run_workers(tmp_path, num, scenario, "cuda", timeout_s=FAIL_S,
                      extra_env={"MP_GPU_TIMEOUT_S": str(FAIL_TIMEOUT_S),
                                 "MP_GPU_RANKS_PER_NODE": str(rpn)})
    absent = scenario.startswith("absent")
    victim_rc = (0, -signal.SIGABRT) if absent else (-signal.SIGKILL,)
    assert_survivors_report(run, victim=num - 1, victim_rc=victim_rc, phase_word=phase_word,
                            ranks_per_node=rpn)


# ------------------------------------------------------------------------------------------
# CPU: the harness and the oracle comparisons, without a GPU
# ------------------------------------------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.timeout(CPU_S + 60)
def test_ops_xla_backend_on_cpu(tmp_path):
    """The ``ops`` scenario with ``backend="xla"``: 2 processes, one CPU device each (gloo),
    small sizes. Exercises this harness and every comparison the GPU runs make."""
    run = run_workers(tmp_path, 2, "ops", "xla", timeout_s=CPU_S,
                      extra_env={"MP_GPU_SIZE": "small"})
    assert_all_ok(run)
    assert all("FAIL" not in w.stdout for w in run.workers), run.report()
