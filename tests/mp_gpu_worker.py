"""One process of the process-per-GPU tests (started by ``tests/test_multiprocess_gpu.py``).

Usage::

    python tests/mp_gpu_worker.py PROCESS_ID NUM_PROCESSES PORT SCENARIO BACKEND

with the repository on ``PYTHONPATH``. BACKEND is ``cuda`` (one GPU per process, or N processes
sharing GPU 0: the NVSHMEM transport) or ``xla`` (the pure-JAX backend; on CPU with
``JAX_PLATFORMS=cpu`` and one CPU device per process, collectives through gloo). The process joins
a ``jax.distributed`` job on 127.0.0.1:PORT, builds ``Mesh(np.array(jax.devices()), ("ep",))``
(one device per process: rank = process index) and runs SCENARIO:

* ``ops``: every op against the NumPy oracle (``tests/oracle.py``) on inputs every process
  regenerates from a seed: normal-mode dispatch (every ``Dispatched`` field bit for bit, FP8
  tuples too), combine (within bf16 rounding), the gradients of dispatch -> expert -> combine;
  ``ll_dispatch`` (bf16 and fp8), ``ll_combine`` (``prereduce`` False / True / ``"float32"``), the
  two-phase forms and the low-latency gradients. Each case prints one line; mismatches are
  collected: exit 1 if any, 2 on an exception, 0 with ``[worker i] OK``.
* ``loop``: 1000 ``dispatch -> +(i+1) -> combine`` rounds inside one ``lax.fori_loop`` (routing
  from the loop index), 50 replays of a jitted 4-round step, and 1000 iterations of
  ``ll_dispatch -> ll_combine`` (twice: prereduce False and True), all exact (float32 integers)
  against a NumPy replay. The harness runs it with XLA command buffers on.
* ``absent`` / ``absent_ll``: every process creates the communicator; the last one never calls
  the op (it waits for the others, then exits 0); the others call ``dispatch`` (``ll_dispatch``)
  with ``timeout_s`` = ``MP_GPU_TIMEOUT_S`` (10), print the message of ``comm.check()``
  (``CHECK: ...``) and the seconds from the call to the error (``ELAPSED ...``), and exit 3.
* ``kill``: every process runs short jitted ``dispatch -> combine`` calls (each checked); the last
  process SIGKILLs itself after ``KILL_AFTER`` calls; the others report as in ``absent``.

No XLA collective and no reduction over a global array is used anywhere (they fail between
processes sharing one GPU): inputs are made with ``jax.make_array_from_callback``, gradients are
taken inside the ``shard_map`` of a per-rank loss, results are read from
``arr.addressable_shards``. The ``cuda`` and ``xla`` paths differ only in the backend string (and
in the contract checks on ``comm.transport`` / ``comm.implementation``).

Environment: ``MP_GPU_SIZE`` (``full``, default, or ``small``: the CPU smoke test's sizes),
``MP_GPU_LOOP_ITERS`` (1000), ``MP_GPU_TIMEOUT_S`` (10), ``MP_GPU_SYNC_DIR`` (where the processes
leave ``done.<i>`` files so that none exits before the others have reported: process 0 hosts
jax's coordination service), ``MP_GPU_WATCHDOG_S`` (1200: dump every thread's stack and exit 1).
Processes leave with ``os._exit`` after that file handshake, never through
``jax.distributed.shutdown()`` (a dead or absent peer would make it hang).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import tempfile
import time
import traceback

import numpy as np


PID, N, PORT = (int(a) for a in sys.argv[1:4]) if len(sys.argv) > 3 else (0, 1, 0)
SCENARIO = sys.argv[4] if len(sys.argv) > 4 else "ops"
BACKEND = sys.argv[5] if len(sys.argv) > 5 else "cuda"
SIZE = os.environ.get("MP_GPU_SIZE", "full")
LOOP_ITERS = int(os.environ.get("MP_GPU_LOOP_ITERS", "1000"))
FAIL_TIMEOUT_S = float(os.environ.get("MP_GPU_TIMEOUT_S", "10"))
WATCHDOG_S = float(os.environ.get("MP_GPU_WATCHDOG_S", "1200"))
KILL_AFTER = 5           # kill: the victim's completed calls before it SIGKILLs itself
# EPConfig.ranks_per_node of every communicator of the internode, absent, absent_ll, kill and
# kill_ll scenarios (virtual nodes; None: the hardware's, one node here)
RANKS_PER_NODE = int(os.environ.get("MP_GPU_RANKS_PER_NODE", "0")) or None
START = time.time()
F32, F64 = np.float32, np.float64


def log(msg: str) -> None:
    print(f"[worker {PID}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------
# leaving: a file handshake instead of jax.distributed.shutdown()
# ------------------------------------------------------------------------------------------


def _sync_dir() -> str:
    d = os.environ.get("MP_GPU_SYNC_DIR") or os.path.join(tempfile.gettempdir(),
                                                          f"jaxep_mp_gpu_sync_{PORT}")
    os.makedirs(d, exist_ok=True)
    return d


def _mark_path(kind: str, j: int) -> str:
    return os.path.join(_sync_dir(), f"{kind}.{j}")


def _mark(kind: str) -> None:
    with open(_mark_path(kind, PID), "w") as f:
        f.write(f"{os.getpid()}\n")


def _has(kind: str, j: int) -> bool:
    try:  # a file left by an earlier run with the same port is older than this run
        return os.path.getmtime(_mark_path(kind, j)) >= START - 120
    except OSError:
        return False


def _clear_own_marks() -> None:
    for kind in ("done", "bye"):
        try:
            os.remove(_mark_path(kind, PID))
        except FileNotFoundError:
            pass


def finish(code: int, wait_for, bound_s: float = 60.0):
    """Exit with ``code`` once the processes ``wait_for`` have finished too (bounded).

    Every process writes ``done.<i>`` and waits for the others' ``done`` files; then the others
    write ``bye.<i>`` and leave, and process 0 (jax's coordination service) leaves last, so no
    process sees the service vanish while it still reports. ``os._exit``: no atexit hooks, no
    ``jax.distributed.shutdown()`` (which would wait for an absent or dead peer).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    _mark("done")
    others = [j for j in wait_for if j != PID]
    deadline = time.monotonic() + bound_s
    while not all(_has("done", j) for j in others):
        if time.monotonic() > deadline:
            missing = [j for j in others if not _has("done", j)]
            log(f"leaving without the done files of processes {missing} ({bound_s:.0f} s)")
            break
        time.sleep(0.05)
    if PID == 0:
        deadline = time.monotonic() + 10
        while (not all(_has("bye", j) for j in others if _has("done", j))
               and time.monotonic() < deadline):
            time.sleep(0.05)
        time.sleep(0.5)
    else:
        _mark("bye")
    log(f"exit {code} ({time.time() - START:.1f} s after start)")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ------------------------------------------------------------------------------------------
# jax setup
# ------------------------------------------------------------------------------------------

jax = jnp = lax = jaxep = Mesh = NamedSharding = P = None  # bound by setup()


def setup():
    """jax.distributed + the mesh; returns (mesh, rank of this process's device)."""
    global jax, jnp, lax, jaxep, Mesh, NamedSharding, P
    import jax as _jax

    if BACKEND == "xla":
        try:  # the CPU cross-process collectives (the default in recent jax)
            _jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except (AttributeError, KeyError, ValueError) as e:
            log(f"note: could not select gloo collectives: {e}")
    _jax.distributed.initialize(coordinator_address=f"127.0.0.1:{PORT}", num_processes=N,
                                process_id=PID, initialization_timeout=60)
    import jax.numpy as _jnp
    from jax import lax as _lax
    from jax.sharding import Mesh as _Mesh, NamedSharding as _NS, PartitionSpec as _P

    import jaxep as _jaxep

    jax, jnp, lax, jaxep, Mesh, NamedSharding, P = _jax, _jnp, _lax, _jaxep, _Mesh, _NS, _P
    devices, local = jax.devices(), jax.local_devices()
    log(f"jax {jax.__version__}, backend={BACKEND}, scenario={SCENARIO}, size={SIZE}, "
        f"pid {os.getpid()}, local devices {local}, {len(devices)} in all; "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if jax.process_count() != N or len(devices) != N or len(local) != 1:
        raise RuntimeError(f"want {N} processes with one device each, got "
                           f"{jax.process_count()} processes, {len(devices)} devices, "
                           f"{len(local)} local")
    if BACKEND == "cuda" and local[0].platform != "gpu":
        raise RuntimeError(f"backend cuda needs a GPU, this process has {local[0]}")
    mesh = Mesh(np.array(devices), ("ep",))
    return mesh, list(mesh.devices.flat).index(local[0])


class Fatal(RuntimeError):
    """The contract does not hold in a way that makes going on pointless (every process
    raises it at the same point: the same check on the same configuration)."""


class W:
    """This process's view: the mesh, its rank, compiled functions, collected failures."""

    def __init__(self):
        self.mesh, self.rank = setup()
        self.R = N
        self.failures: list[str] = []
        self.cases = 0
        self._fns = {}

    # -- communicators: the same ones, in the same order, in every process ------------------
    def comm(self, cfg, ops):
        t0 = time.monotonic()
        comm = jaxep.Communicator(self.mesh, cfg, backend=BACKEND)
        transport = getattr(comm, "transport", "<no transport attribute>")
        impl = {op: comm.implementation(op) for op in ops}
        log(f"communicator {comm!r} in {time.monotonic() - t0:.1f} s: transport={transport!r}, "
            f"implementation {impl}")
        want = "cuda" if BACKEND == "cuda" else "xla"
        if BACKEND == "cuda" and transport != "nvshmem":
            raise Fatal(f"backend='cuda' with one process per device: comm.transport should be "
                        f"'nvshmem', is {transport!r} "
                        f"({getattr(comm, 'transport_reason', '')})")
        if BACKEND == "xla" and transport is not None:
            raise Fatal(f"backend='xla': comm.transport should be None, is {transport!r}")
        wrong = {op: i for op, i in impl.items() if i != want}
        if wrong:  # the pure-JAX path on GPUs shared by processes would hit NCCL: stop here
            raise Fatal(f"comm.implementation should be {want!r} for {ops}, got {impl}")
        return comm

    # -- compiled functions ------------------------------------------------------------------
    def fn(self, key, build):
        if key not in self._fns:
            self._fns[key] = build()
        return self._fns[key]

    def ep_call(self, body):
        """jit(shard_map(body)): every argument and result split on its leading dim."""
        spec = P("ep")
        return jax.jit(jax.shard_map(body, mesh=self.mesh, in_specs=spec, out_specs=spec))

    # -- data in and out ---------------------------------------------------------------------
    def put(self, a):
        """A global NumPy array (identical in every process) -> jax.Array split over "ep"."""
        if isinstance(a, tuple):
            return tuple(self.put(b) for b in a)
        a = np.asarray(a)
        sharding = NamedSharding(self.mesh, P("ep"))
        return jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])

    def mine(self, arr):
        """This process's shard of a result split over "ep", as NumPy."""
        shards = arr.addressable_shards
        assert len(shards) == 1, f"{len(shards)} addressable shards"
        s = shards[0]
        rows = arr.shape[0] // self.R
        start = s.index[0].start or 0
        assert start == self.rank * rows, (s.index, self.rank, arr.shape)
        return np.asarray(s.data)

    def call(self, f, *args):
        out = f(*[self.put(a) for a in args])
        return jax.tree.map(self.mine, out)

    def rows(self, a, rank=None):
        """Rank ``rank``'s (default: this process's) block of a global array."""
        r = self.rank if rank is None else rank
        n = a.shape[0] // self.R
        return a[r * n:(r + 1) * n]

    def local_device_array(self, a):
        return jax.device_put(a, jax.local_devices()[0])


# ------------------------------------------------------------------------------------------
# scenarios
# ------------------------------------------------------------------------------------------


def _cases():
    """The op checks (tests/mp_gpu_cases.py), imported once jax.distributed is initialised."""
    import mp_gpu_cases

    mp_gpu_cases.log = log
    return mp_gpu_cases


def scenario_ops():
    w = W()
    cases = _cases()
    normal_section, ll_section = cases.normal_section, cases.ll_section
    t0 = time.monotonic()
    log("normal mode")
    normal_section(w)
    t1 = time.monotonic()
    log(f"normal mode: {w.cases} cases in {t1 - t0:.1f} s")
    import mp_gpu_grouped

    n = w.cases
    log("grouped normal mode")
    mp_gpu_grouped.grouped_section(w)
    log(f"grouped normal mode: {w.cases - n} cases in {time.monotonic() - t1:.1f} s")
    t1, n = time.monotonic(), w.cases
    log("low-latency mode")
    ll_section(w)
    log(f"low-latency mode: {w.cases - n} cases in {time.monotonic() - t1:.1f} s")
    return report(w)


def report(w: W):
    if w.failures:
        log(f"MISMATCH: {len(w.failures)} of {w.cases} cases failed:\n  "
            + "\n  ".join(w.failures))
        return 1, range(N)
    log(f"OK ({w.cases} cases, {time.time() - START:.1f} s, pid {os.getpid()})")
    return 0, range(N)


NOWHERE_PERIOD = 37
UNROLL, REPLAYS = 4, 50


def _loop_round(comm, ge, g, t, i, x, w8):
    """One round of the loop: token g (local index t) goes, at iteration i, to K experts all on
    rank (g + i) % R (so to exactly one rank), or nowhere when (g + i) % 37 == 0."""
    R, K = comm.num_ranks, comm.cfg.num_topk
    el = comm.num_local_experts
    dest = (g + i) % R
    slots = (t[:, None] + jnp.arange(K)[None, :]) % el
    idx = ge[dest[:, None], slots]
    idx = jnp.where(((g + i) % NOWHERE_PERIOD == 0)[:, None], -1, idx).astype(jnp.int32)
    d = jaxep.dispatch(comm, x, idx, w8)
    y = d.x + (i + 1).astype(jnp.float32)               # padding rows get it too: ignored
    return jaxep.combine(comm, y, d.handle), d.num_tokens


def _loop_replay(x0, g, R, start, stop, ntok=None):
    x = x0.copy()
    for i in range(start, stop):
        nowhere = (g + i) % NOWHERE_PERIOD == 0
        x = np.where(nowhere[:, None], F32(0), x + F32(i + 1))
        if ntok is not None:
            ntok += np.bincount(((g + i) % R)[~nowhere], minlength=R)
    return x


def scenario_loop():
    w = W()
    _normal_loop(w, _cases())
    _ll_loop(w, _cases())
    return report(w)


def _normal_loop(w, c, **extra):
    """LOOP_ITERS dispatch -> combine rounds in one lax.fori_loop, then REPLAYS calls of an
    unrolled step, exact (``extra``: more EPConfig fields)."""
    Case, seed_of, NORMAL = c.Case, c.seed_of, c.NORMAL
    R = w.R
    S = NORMAL
    E, K, H, T = S["E"], S["K"], S["H"], S["T"]
    Cfg = jaxep.EPConfig
    comm = w.comm(Cfg(num_experts=E, num_topk=K, hidden=H, max_tokens_per_rank=T, **extra),
                  ("dispatch", "combine"))
    iters = LOOP_ITERS

    def loop_body(x0, w8, g):
        ge = jnp.asarray(comm.global_expert)   # a constant of the program
        t = jnp.arange(x0.shape[0], dtype=jnp.int32)

        def body(i, carry):
            x, ntok = carry
            x, n = _loop_round(comm, ge, g, t, i, x, w8)
            return x, ntok + n

        x, ntok = lax.fori_loop(0, iters, body, (x0, jnp.zeros_like(g[0])))
        return x, ntok[None]

    def step_body(x, w8, g, i0):
        ge = jnp.asarray(comm.global_expert)
        t = jnp.arange(x.shape[0], dtype=jnp.int32)
        for j in range(UNROLL):
            x, _ = _loop_round(comm, ge, g, t, i0[0] + j, x, w8)
        return x

    rng = np.random.default_rng(seed_of("loop", R))
    x0 = rng.integers(-1000, 1001, (R * T, H)).astype(F32)
    g = np.arange(R * T, dtype=np.int32)
    w8 = np.ones((R * T, K), F32)
    ntok_want = np.zeros(R, np.int64)
    x_want = _loop_replay(x0, g, R, 0, iters, ntok_want)
    assert np.abs(x_want).max() < 2 ** 24
    # the routing puts every token on exactly one rank: check it once on the host
    idx5 = comm.global_expert[((g + 5) % R)[:, None],
                              ((g % T)[:, None] + np.arange(K)[None, :]) % comm.num_local_experts]
    assert np.all(comm.expert_rank[idx5] == ((g + 5) % R)[:, None])

    log(f"starting {iters} dispatch -> combine rounds in a fori_loop")
    t0 = time.monotonic()
    loop = w.ep_call(loop_body)
    x, ntok = loop(w.put(x0), w.put(w8), w.put(g))
    x, ntok = w.mine(x), w.mine(ntok)
    dt = time.monotonic() - t0
    case = Case(w, f"{iters} x (dispatch -> +(i+1) -> combine) in one lax.fori_loop "
                   f"({dt:.1f} s with compilation)")
    case.bits("x", x, w.rows(x_want))
    case.scalar("total num_tokens", ntok, ntok_want[w.rank])
    case.done()

    log(f"starting {REPLAYS} calls of a {UNROLL}-round step")
    t0 = time.monotonic()
    step = w.ep_call(step_body)
    xs, wd, gd = w.put(x_want), w.put(w8), w.put(g)
    for c in range(REPLAYS):
        xs = step(xs, wd, gd, w.put(np.full(R, iters + UNROLL * c, np.int32)))
    xs = w.mine(xs)
    dt = time.monotonic() - t0
    want = _loop_replay(x_want, g, R, iters, iters + UNROLL * REPLAYS)
    case = Case(w, f"{REPLAYS} calls of a jitted {UNROLL}-round step ({dt:.1f} s)")
    case.bits("x", xs, w.rows(want))
    case.done()


def _ll_loop(w, c, **extra):
    """LOOP_ITERS x 2 rounds of ll_dispatch -> ll_combine in one lax.fori_loop, exact."""
    Case, seed_of, LL = c.Case, c.seed_of, c.LL
    R, Cfg, iters = w.R, jaxep.EPConfig, LOOP_ITERS
    S = LL
    E, K, H, T = S["E"], S["K"], S["H"], S["T"]
    ll = w.comm(Cfg(num_experts=E, num_topk=K, hidden=H, max_tokens_per_rank=T,
                    low_latency=True, **extra), ("ll_dispatch", "ll_combine"))
    el = ll.num_local_experts

    def ll_loop_body(x0, idx0, w4):
        def body(i, carry):
            x, total = carry
            idx = (idx0 + i) % E                 # K distinct experts, moving every iteration
            for prereduce in (False, True):
                d = jaxep.ll_dispatch(ll, x, idx)
                x = jaxep.ll_combine(ll, d.x, idx, w4, d.handle, prereduce=prereduce) + 1.0
                total = total + d.counts
            return x, total

        zero = jnp.zeros((el,), jnp.int32) + idx0[0, 0] * 0   # varying over the EP axis
        return lax.fori_loop(0, iters, body, (x0, zero))

    rng = np.random.default_rng(seed_of("llloop", R))
    idx0 = np.stack([rng.choice(E, K, replace=False) for _ in range(R * T)]).astype(np.int32)
    w4 = np.full((R * T, K), 1.0 / K, F32)            # K a power of two: exact
    x0 = rng.integers(-64, 64, (R * T, H)).astype(F32)
    counts = np.zeros(E, np.int64)
    for i in range(iters):
        counts += np.bincount(((idx0 + i) % E).ravel(), minlength=E)
    want_counts = 2 * counts[ll.global_expert[w.rank]]
    log(f"starting {iters} x 2 ll_dispatch -> ll_combine rounds in a fori_loop")
    t0 = time.monotonic()
    x, total = w.ep_call(ll_loop_body)(w.put(x0), w.put(idx0), w.put(w4))
    x, total = w.mine(x), w.mine(total)
    dt = time.monotonic() - t0
    case = Case(w, f"{iters} x (ll_dispatch -> ll_combine, prereduce False then True) in one "
                   f"lax.fori_loop ({dt:.1f} s with compilation)")
    case.bits("x", x, w.rows(x0) + F32(2 * iters))
    case.bits("counts summed", total.astype(np.int64), want_counts)
    case.done()


# How long a survivor waits for the others' reports: long enough for one that JAX left blocked
# to be ended by jaxep's failure watch (failure_exit_s after its kernel's timeout).
SURVIVOR_WAIT_S = 25.0


def _fail_cfg(ll: bool):
    return jaxep.EPConfig(num_experts=16, num_topk=2, hidden=128, max_tokens_per_rank=16,
                          timeout_s=FAIL_TIMEOUT_S, low_latency=True if ll else None,
                          ranks_per_node=RANKS_PER_NODE)


def _report_failure(comm, t_call: float, err) -> int:
    """Print what a survivor saw (the XLA error, comm.check()'s message, the time from the call
    to the error); returns the exit code: 3 when check() raised, 4 when it did not."""
    elapsed = time.monotonic() - t_call
    if err is None:
        log("NO ERROR FROM XLA (the call returned)")
    else:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        log(f"XLA error: {type(err).__name__}: {first}")
    code = 4
    try:
        comm.check()
        log("CHECK: comm.check() raised nothing")
    except RuntimeError as e:
        log(f"CHECK: {e}")
        code = 3
    except Exception as e:  # noqa: BLE001 -- the contract says RuntimeError: show what it was
        log(f"CHECK: comm.check() raised {type(e).__name__}, not RuntimeError: {e}")
    log(f"ELAPSED {elapsed:.2f} s from the call to the error (timeout_s={FAIL_TIMEOUT_S})")
    return code


def _absent(ll: bool):
    w = W()
    bf16 = _cases().bf16
    victim = N - 1
    op = "ll_dispatch" if ll else "dispatch"
    comm = w.comm(_fail_cfg(ll), ("ll_dispatch", "ll_combine") if ll else ("dispatch", "combine"))
    if PID == victim:
        log(f"absent: created the communicator, never calling {op}; waiting for process 0")
        # Only process 0's report: a survivor stuck in JAX is ended by jaxep's failure watch
        # (EPConfig.failure_exit_s) and never writes its done file.
        finish(0, [0], bound_s=FAIL_TIMEOUT_S + 240)
    R, T, K, H = w.R, 16, 2, 128
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 16, (R * T, K)).astype(np.int32)
    idx[:, 0] = 15          # every token has an expert on the last rank
    x = bf16(rng.standard_normal((R * T, H)))
    wts = np.ones((R * T, K), F32)
    if ll:
        body = lambda x, idx, wts: jaxep.ll_dispatch(comm, x, idx).x  # noqa: E731
    else:
        body = lambda x, idx, wts: jaxep.dispatch(comm, x, idx, wts).x  # noqa: E731
    args = [w.put(a) for a in (x, idx, wts)]
    compiled = w.ep_call(body).lower(*args).compile()
    log(f"calling {op}; process {victim} never will (timeout_s={FAIL_TIMEOUT_S})")
    log(f"CALL_AT {time.time():.3f}")
    t_call = time.monotonic()
    err = None
    try:
        jax.block_until_ready(compiled(*args))
    except Exception as e:  # noqa: BLE001 -- whatever XLA raises for the trapped kernel
        err = e
    code = _report_failure(comm, t_call, err)
    finish(code, range(N), bound_s=SURVIVOR_WAIT_S)


def scenario_absent():
    _absent(ll=False)


def scenario_absent_ll():
    _absent(ll=True)


def _kill(ll: bool):
    w = W()
    victim = N - 1
    if victim == 0:
        raise RuntimeError("kill needs at least 2 processes (process 0 is never killed)")
    ops = ("ll_dispatch", "ll_combine") if ll else ("dispatch", "combine")
    comm = w.comm(_fail_cfg(ll), ops)
    R, T, K, H = w.R, 16, 2, 128
    ge = comm.global_expert
    el = comm.num_local_experts
    g = np.arange(R * T)

    def body(x, idx, wts):
        if ll:  # K distinct experts of one rank, weights 1/K: the sum is x + 1 exactly
            d = jaxep.ll_dispatch(comm, x, idx)
            return jaxep.ll_combine(comm, d.x + 1.0, idx, wts / K, d.handle)
        d = jaxep.dispatch(comm, x, idx, wts)
        return jaxep.combine(comm, d.x + 1.0, d.handle)

    f = w.ep_call(body)
    survivors = [j for j in range(N) if j != victim]
    rng = np.random.default_rng(1)
    for it in range(200):
        dest = (g + it) % R                     # every token to exactly one rank
        idx = ge[dest[:, None], ((g % T)[:, None] + np.arange(K)[None, :]) % el]
        idx = idx.astype(np.int32)
        x = rng.integers(-100, 101, (R * T, H)).astype(F32)
        wts = np.ones((R * T, K), F32)
        args = [w.put(a) for a in (x, idx, wts)]
        if it == 0:
            f = f.lower(*args).compile()
        log(f"CALL_AT {time.time():.3f} (call {it})")
        t_call = time.monotonic()
        try:
            out = w.mine(f(*args))             # waits for the result
        except Exception as e:  # noqa: BLE001
            code = _report_failure(comm, t_call, e)
            if PID == victim:
                log("the victim itself failed before killing itself")
            finish(code, survivors, bound_s=SURVIVOR_WAIT_S)
        if not np.array_equal(out, w.rows(x) + 1):
            msg = f"MISMATCH in call {it}: combine(dispatch(x).x + 1) != x + 1"
            w.failures.append(msg)
            log(msg)
        if PID == victim and it + 1 == KILL_AFTER:
            time.sleep(1.0)   # the others are inside their next call by now
            log(f"killing myself (SIGKILL) after {KILL_AFTER} calls")
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    log("NO ERROR after 200 calls")
    finish(4, survivors)


def scenario_kill():
    _kill(ll=False)


def scenario_kill_ll():
    _kill(ll=True)


def scenario_internode():
    """Virtual nodes (EPConfig.ranks_per_node = MP_GPU_RANKS_PER_NODE): every normal-mode and
    low-latency op over the internode kernels against the oracle (>= 20 routings per op form,
    one of them an empty node), the rule for the grouped ops, and the 1000-iteration loops."""
    w = W()
    c = _cases()
    rpn = RANKS_PER_NODE
    if not rpn or w.R % rpn or rpn >= w.R:
        raise Fatal(f"internode needs MP_GPU_RANKS_PER_NODE dividing N={w.R} and below it, "
                    f"got {rpn}")
    LL = c.LL
    comm = w.comm(jaxep.EPConfig(num_experts=LL["E"], num_topk=LL["K"], hidden=LL["H"],
                                 max_tokens_per_rank=LL["T"], low_latency=True,
                                 ranks_per_node=rpn), ("ll_dispatch", "ll_combine"))
    case = c.Case(w, f"communicator of {w.R // rpn} virtual nodes x {rpn} ranks")
    case.scalar("num_nodes", np.array(comm.num_nodes), np.array(w.R // rpn))
    case.scalar("ranks_per_node", np.array(comm.ranks_per_node), np.array(rpn))
    for op, want in (("dispatch", "cuda"), ("combine", "cuda"), ("dispatch_grouped", "xla"),
                     ("combine_grouped", "xla")):
        if comm.implementation(op) != want:
            case.bad.append(f"implementation({op!r}) = {comm.implementation(op)!r}, want "
                            f"{want!r}")
    if "nodes" not in comm.transport_reason:
        case.bad.append(f"transport_reason does not mention the nodes: {comm.transport_reason!r}")
    if comm.ll_layered != (rpn > 1):  # the default: layered where a node has 2+ ranks
        case.bad.append(f"ll_layered = {comm.ll_layered}, want {rpn > 1} by default")
    case.done()
    # normal mode, hierarchical: each op form over >= 20 routings (an empty node among them)
    c.NORMAL_KINDS = c.NORMAL_KINDS + ("empty_node",)
    c.KINDS = c.KINDS + ("empty_node",)
    c.TRIALS = dict(c.TRIALS, rr=20, fp8=10, grad=10)
    t0, n = time.monotonic(), w.cases
    c.normal_section(w, ranks_per_node=rpn)
    log(f"normal mode over {w.R // rpn} nodes: {w.cases - n} cases in "
        f"{time.monotonic() - t0:.1f} s")
    _normal_loop(w, c, ranks_per_node=rpn)
    c.TRIALS = dict(c.TRIALS, ll=20, ll_fp8=20, ll_two=20, ll_two_fp8=20)
    c.LL_KINDS = c.LL_KINDS + ("empty_node",)
    # flat, then (nodes of 2+ ranks) layered: each bit-exact against the oracle
    for layered in (False, True) if rpn > 1 else (False,):
        t0, n = time.monotonic(), w.cases
        c.ll_section(w, ranks_per_node=rpn, ll_layered=layered)
        log(f"low-latency mode over {w.R // rpn} nodes, {'layered' if layered else 'flat'}: "
            f"{w.cases - n} cases in {time.monotonic() - t0:.1f} s")
    _ll_loop(w, c, ranks_per_node=rpn)  # the default (layered with 2+ ranks per node)
    return report(w)


SCENARIOS = dict(ops=scenario_ops, loop=scenario_loop, absent=scenario_absent,
                 absent_ll=scenario_absent_ll, kill=scenario_kill, kill_ll=scenario_kill_ll,
                 internode=scenario_internode)


def main():
    if len(sys.argv) != 6 or SCENARIO not in SCENARIOS or BACKEND not in ("cuda", "xla"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        print(f"scenarios: {sorted(SCENARIOS)}; backends: cuda, xla", file=sys.stderr)
        return 64
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    _clear_own_marks()
    code, wait_for = 2, range(N)
    try:
        code, wait_for = SCENARIOS[SCENARIO]()
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        log("FAILED with an exception")
        code = 2
    finish(code, wait_for)


if __name__ == "__main__":
    sys.exit(main())
