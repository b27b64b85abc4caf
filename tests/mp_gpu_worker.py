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
import zlib

import numpy as np

import oracle  # tests/ is sys.path[0] when this file runs as a script

PID, N, PORT = (int(a) for a in sys.argv[1:4]) if len(sys.argv) > 3 else (0, 1, 0)
SCENARIO = sys.argv[4] if len(sys.argv) > 4 else "ops"
BACKEND = sys.argv[5] if len(sys.argv) > 5 else "cuda"
SIZE = os.environ.get("MP_GPU_SIZE", "full")
LOOP_ITERS = int(os.environ.get("MP_GPU_LOOP_ITERS", "1000"))
FAIL_TIMEOUT_S = float(os.environ.get("MP_GPU_TIMEOUT_S", "10"))
WATCHDOG_S = float(os.environ.get("MP_GPU_WATCHDOG_S", "1200"))
KILL_AFTER = 5           # kill: the victim's completed calls before it SIGKILLs itself
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
# comparisons (never raise: record and go on, so every process issues the same calls)
# ------------------------------------------------------------------------------------------


def _bits(a):
    a = np.asarray(a)
    if a.dtype == np.bool_ or a.dtype.kind in "iu":
        return a
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


class Case:
    """One checked case: collects its comparisons, prints one line."""

    def __init__(self, w: W, name: str):
        self.w, self.name, self.bad, self.notes, self.n = w, name, [], [], 0

    def _shape(self, what, got, want) -> bool:
        if got.dtype != want.dtype or got.shape != want.shape:
            self.bad.append(f"{what}: got {got.dtype}{list(got.shape)}, "
                            f"want {want.dtype}{list(want.shape)}")
            return False
        return True

    def bits(self, what, got, want, mask=None):
        """Bit-exact (floats as their bits); ``mask`` (broadcast over trailing dims) limits
        the comparison to the rows the semantics define."""
        self.n += 1
        got, want = np.asarray(got), np.asarray(want)
        if not self._shape(what, got, want):
            return
        g, w = _bits(got), _bits(want)
        if mask is not None:
            g, w, got, want = g[mask], w[mask], got[mask], want[mask]
        diff = g != w
        if np.any(diff):
            i = tuple(int(v) for v in np.argwhere(diff)[0])
            self.bad.append(f"{what}: {int(diff.sum())} of {diff.size} elements differ, first "
                            f"at {i}: got {got[i].item()!r}, want {want[i].item()!r}")

    def scalar(self, what, got, want):
        self.n += 1
        got = np.asarray(got).reshape(-1)
        if got.shape != (1,) or int(got[0]) != int(want):
            self.bad.append(f"{what}: got {got.tolist()}, want {int(want)}")

    def close(self, what, got, want, tol):
        """``|got - want| <= tol`` elementwise (``tol`` an array or a number); ``want``
        float64 from the oracle."""
        self.n += 1
        got = np.asarray(got)
        g = got.astype(F64)
        want = np.asarray(want, F64)
        if g.shape != want.shape:
            self.bad.append(f"{what}: got shape {g.shape}, want {want.shape}")
            return
        if not np.all(np.isfinite(g)):
            self.bad.append(f"{what}: {int((~np.isfinite(g)).sum())} non-finite values")
            return
        tol = np.broadcast_to(np.asarray(tol, F64), g.shape)
        err = np.abs(g - want)
        ratio = err / np.maximum(tol, 1e-300)
        worst = float(ratio.max(initial=0.0))
        if np.any(err > tol):
            i = np.unravel_index(np.argmax(ratio), ratio.shape)
            self.bad.append(f"{what}: {int((err > tol).sum())} of {err.size} out of tolerance, "
                            f"worst at {tuple(int(v) for v in i)}: got {g[i].item()!r}, "
                            f"want {want[i].item()!r}, |diff| {err[i]:.3g} > tol {tol[i]:.3g}")
        else:
            self.notes.append(f"{what} {worst:.2f}")

    def zero(self, what, got, mask):
        """Rows ``mask`` of ``got`` are exactly 0 (tokens sent nowhere / all copies dropped)."""
        self.n += 1
        sel = np.asarray(got).astype(F64)[mask]
        if np.any(sel != 0):
            self.bad.append(f"{what}: {int(np.any(sel != 0, axis=-1).sum())} rows that must be "
                            f"exactly 0 are not")

    def done(self):
        self.w.cases += 1
        if self.bad:
            msg = f"FAIL {self.name}: " + " | ".join(self.bad)
            self.w.failures.append(msg)
            log(msg)
        else:
            extra = f" (worst err/tol: {', '.join(self.notes)})" if self.notes else ""
            log(f"ok   {self.name}: {self.n} checks{extra}")


def bf16(a):
    return np.asarray(a, F32).astype(jnp.bfloat16)


def seed_of(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


# ------------------------------------------------------------------------------------------
# routings (tests/test_gpu_normal.py's kinds: oracle.make_routing's plus a few)
# ------------------------------------------------------------------------------------------

KINDS = ("random", "minus_one", "invalid", "zipf", "one_expert", "one_rank", "empty_rank",
         "silent_rank", "duplicates", "nowhere", "mixed")


def make_routing(kind, rng, R, T, E, K, expert_rank):
    """Global ``(topk_idx [R*T, K] int32, topk_weights [R*T, K] float32)``: oracle kinds
    (random top-k, -1 slots, invalid ids, one expert for all, an empty receiving rank, a silent
    sending rank, duplicates) plus zipf (skewed popularity), one_rank (every expert of every
    token on the last rank), nowhere (all -1), mixed (-1, invalid ids incl. INT32_MIN/MAX and
    duplicates together)."""
    Ntok = R * T
    expert_rank = np.asarray(expert_rank)
    if kind in oracle.ROUTINGS:
        return oracle.make_routing(kind, rng, R, T, E, K, expert_rank)
    w = rng.uniform(0.1, 1.0, (Ntok, K)).astype(F32)
    if kind == "zipf":
        p = 1.0 / np.arange(1, E + 1) ** 1.2
        g = np.log(p)[None, :] + rng.gumbel(size=(Ntok, E))
        idx = np.argsort(-g, axis=1)[:, :K]
    elif kind == "one_rank":
        experts = np.flatnonzero(expert_rank == R - 1)
        assert len(experts) >= K
        idx = experts[np.argsort(rng.random((Ntok, len(experts))), axis=1)[:, :K]]
    elif kind == "nowhere":
        idx = np.full((Ntok, K), -1)
    elif kind == "mixed":
        idx, w = oracle.make_routing("random", rng, R, T, E, K, expert_rank)
        idx = idx.astype(np.int64)
        idx[rng.random((Ntok, K)) < 0.15] = -1
        bad = rng.random((Ntok, K)) < 0.1
        idx[bad] = rng.choice(np.array([E, 999, -5, -(2 ** 31), 2 ** 31 - 1], np.int64),
                              size=int(bad.sum()))
        dup = rng.random(Ntok) < 0.3
        idx[dup, K - 1] = idx[dup, 0]
    else:
        raise ValueError(kind)
    return idx.astype(np.int32), w


# ------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------

if SIZE == "small":   # the CPU smoke test: every code path, small shapes, few routings
    NORMAL = dict(E=16, K=4, H=128, T=8, T_FEW=5)
    FP8 = dict(E=16, K=4, H=384, T=8)          # H/128 = 3: a partial packed UE8M0 word
    LL = dict(E=16, K=4, H=128, T=8, T_FEW=5)
    NORMAL_KINDS = KINDS
    TRIALS = dict(rr=3, ovf=2, few=1, fp8=1, grad=1, ll=4, ll_few=1, ll_fp8=1, ll_two=2,
                  ll_two_fp8=1, ll_rr=1, ll_grad=1)
else:
    NORMAL = dict(E=32, K=4, H=256, T=64, T_FEW=40)
    FP8 = dict(E=32, K=4, H=640, T=128)        # H/128 = 5: a partial packed UE8M0 word
    LL = dict(E=32, K=4, H=256, T=32, T_FEW=13)
    NORMAL_KINDS = KINDS + ("random", "zipf")
    TRIALS = dict(rr=len(KINDS), ovf=4, few=3, fp8=3, grad=3, ll=7, ll_few=4, ll_fp8=3,
                  ll_two=4, ll_two_fp8=2, ll_rr=3, ll_grad=2)

OVF_KINDS = ("random", "one_expert", "zipf", "mixed")
FEW_KINDS = ("random", "minus_one", "duplicates")
LL_KINDS = ("random", "minus_one", "invalid", "one_expert", "empty_rank", "zipf", "duplicates",
            "mixed", "silent_rank", "one_rank")
GRAD_KINDS = ("mixed", "random", "one_rank")


def kinds(seq, n):
    return [seq[i % len(seq)] for i in range(n)]


# tolerances, elementwise: bf16 outputs are float32 sums rounded once (half an ulp, 2^-8
# relative), plus float32 reassociation (bounded by the sum of magnitudes, ``mag``)
def tol_bf16(want, mag):
    return 2.0 ** -7 * np.abs(want) + 2.0 ** -18 * mag + 1e-30


def tol_f32(want, mag):
    return 2.0 ** -21 * np.abs(want) + 2.0 ** -18 * mag + 1e-30


def tol_grad(want, dtype, mag=0.0):
    """Gradients: relative to the largest magnitude (bf16 rounds intermediate rows), and to
    ``mag``, the sum of the magnitudes of the terms where a gradient is a long sum."""
    rel = 1e-5 if dtype == np.float32 else 2e-2
    want = np.asarray(want, F64)
    return (rel * np.abs(want) + rel * max(1.0, float(np.abs(want).max(initial=0.0)))
            + rel * np.asarray(mag, F64))


# ------------------------------------------------------------------------------------------
# normal mode
# ------------------------------------------------------------------------------------------

DISPATCH_FIELDS = ("topk_idx", "topk_weights", "tokens_per_expert", "src_index", "send_slot")


def normal_body(comm, fp8):
    def body(x, idx, w, y):
        lay = jaxep.dispatch_layout(comm, idx)
        d = jaxep.dispatch(comm, x, idx, w)
        res = dict(x=d.x, topk_idx=d.topk_idx, topk_weights=d.topk_weights,
                   num_tokens=d.num_tokens[None], tokens_per_expert=d.tokens_per_expert,
                   num_dropped=d.num_dropped[None], num_invalid=d.num_invalid[None],
                   src_index=d.handle.src_index, send_slot=d.handle.send_slot,
                   tokens_per_rank=lay.tokens_per_rank,
                   layout_tpe=lay.tokens_per_expert, is_token_in_rank=lay.is_token_in_rank)
        if not fp8:
            res["out"] = jaxep.combine(comm, y, d.handle)      # random y: padding ignored
            res["rt"] = jaxep.combine(comm, d.x, d.handle)     # x * kept copies
        return res
    return body


def quantize(w: W, x, round_scale=False, ue8m0=False):
    """``jaxep.quantize_fp8`` of a global NumPy array, on this process's device."""
    f = w.fn(("quantize", round_scale, ue8m0), lambda: jax.jit(
        lambda a: jaxep.quantize_fp8(a, round_scale=round_scale, ue8m0=ue8m0)))
    return tuple(np.asarray(a) for a in f(w.local_device_array(x)))


def normal_case(w: W, comm, T, kind, seed, tag, fp8=None):
    R, cfg = w.R, comm.cfg
    E, K, H = cfg.num_experts, cfg.num_topk, cfg.hidden
    rng = np.random.default_rng(seed)
    idx, wts = make_routing(kind, rng, R, T, E, K, comm.expert_rank)
    x = bf16(rng.standard_normal((R * T, H)))
    C = cfg.recv_capacity or R * T
    y = bf16(rng.standard_normal((R * C, H)) * 2)
    if fp8:
        x = quantize(w, x, round_scale=fp8 == "ue8m0", ue8m0=fp8 == "ue8m0")
    f = w.fn(("normal", id(comm), T, fp8), lambda: w.ep_call(normal_body(comm, fp8)))
    got = w.call(f, x, idx, wts, y)

    ref = oracle.dispatch(x, idx, wts, comm.expert_rank, comm.expert_slot, R,
                          cfg.recv_capacity)
    lay = oracle.dispatch_layout(idx, comm.expert_rank, R)[w.rank]
    me = ref[w.rank]
    case = Case(w, f"dispatch {tag} T={T} C={C} {kind}" + (f" fp8={fp8}" if fp8 else ""))
    if fp8:
        if not (isinstance(got["x"], tuple) and len(got["x"]) == 2):
            case.bad.append(f"x: an FP8 dispatch must return a (payload, scales) tuple, got "
                            f"{type(got['x']).__name__}")
        else:
            case.bits("x payload", got["x"][0], me["x"][0])
            case.bits("x scales", got["x"][1], me["x"][1])
    else:
        case.bits("x", got["x"], me["x"])
    for name in DISPATCH_FIELDS:
        case.bits(name, got[name], me[name])
    for name in ("num_tokens", "num_dropped", "num_invalid"):
        case.scalar(name, got[name], me[name])
    case.bits("layout tokens_per_rank", got["tokens_per_rank"], lay["tokens_per_rank"])
    case.bits("layout tokens_per_expert", got["layout_tpe"], lay["tokens_per_expert"])
    case.bits("layout is_token_in_rank", got["is_token_in_rank"], lay["is_token_in_rank"])
    if not fp8:
        srcs = [r["src_index"] for r in ref]
        ys = [w.rows(y, d) for d in range(R)]
        want = oracle.combine(ys, srcs, T)[w.rank]
        mag = oracle.combine([np.abs(a.astype(F64)) for a in ys], srcs, T)[w.rank]
        case.close("combine", got["out"], want, tol_bf16(want, mag))
        want_rt = oracle.combine([r["x"] for r in ref], srcs, T)[w.rank]
        case.close("combine(d.x)", got["rt"], want_rt, tol_bf16(want_rt, np.abs(want_rt)))
        nowhere = np.all(me["send_slot"] < 0, axis=1)   # sent nowhere, or every copy dropped
        case.zero("combine of unsent tokens", got["out"], nowhere)
        case.zero("combine(d.x) of unsent tokens", got["rt"], nowhere)
        if got["out"].dtype != x.dtype:
            case.bad.append(f"combine dtype {got['out'].dtype}, want {x.dtype}")
    case.done()
    return ref


GRAD_C0 = 0.5


def normal_grad_body(comm):
    def body(x, idx, wts, pout):
        def local_loss(x, wts):
            d = jaxep.dispatch(comm, x, idx, wts)
            s = GRAD_C0 + jnp.sum(d.topk_weights, axis=1, keepdims=True)
            y = (d.x.astype(jnp.float32) * s).astype(x.dtype)
            out = jaxep.combine(comm, y, d.handle)
            return jnp.sum(out.astype(jnp.float32) * pout)

        loss, (gx, gw) = jax.value_and_grad(local_loss, argnums=(0, 1))(x, wts)
        return loss[None], gx, gw
    return body


def normal_grad_case(w: W, comm, T, kind, seed, dtype, tag):
    """jax.grad (inside the shard_map, of each rank's loss) of
    ``sum(combine((d.x * (c + sum_k d.topk_weights))) * pout)`` w.r.t. x and topk_weights,
    against the oracle's analytic gradients."""
    R, cfg = w.R, comm.cfg
    E, K, H = cfg.num_experts, cfg.num_topk, cfg.hidden
    rng = np.random.default_rng(seed)
    idx, wts = make_routing(kind, rng, R, T, E, K, comm.expert_rank)
    idx[3] = -1                                     # a token sent nowhere
    xf = rng.standard_normal((R * T, H))
    x = bf16(xf) if dtype == "bfloat16" else xf.astype(F32)
    pout = rng.standard_normal((R * T, H)).astype(F32)
    f = w.fn(("ngrad", id(comm), T, dtype), lambda: w.ep_call(normal_grad_body(comm)))
    loss, gx, gw = w.call(f, x, idx, wts, pout)

    cap = cfg.recv_capacity
    ref = oracle.dispatch(x, idx, wts, comm.expert_rank, comm.expert_slot, R, cap)
    srcs = [r["src_index"] for r in ref]
    dx = [r["x"].astype(F64) for r in ref]
    s = [GRAD_C0 + r["topk_weights"].astype(F64).sum(1, keepdims=True) for r in ref]
    out = np.concatenate(oracle.combine([dx[d] * s[d] for d in range(R)], srcs, T))
    want_loss = float(np.sum(w.rows(out) * w.rows(pout)))
    g_y = oracle.dispatch_rows(pout, srcs)
    want_gx = np.concatenate(oracle.combine([g_y[d] * s[d] for d in range(R)], srcs, T))
    g_s = [np.sum(g_y[d] * dx[d], axis=1) for d in range(R)]
    want_gw = oracle.dispatch_weight_grad([np.repeat(g[:, None], K, axis=1) for g in g_s], idx,
                                          comm.expert_rank, R, [r["send_slot"] for r in ref])
    np_dtype = F32 if dtype == "float32" else None
    case = Case(w, f"grad dispatch->combine {tag} {dtype} T={T} C={cap or R * T} {kind}")
    mag_loss = float(np.sum(np.abs(w.rows(out) * w.rows(pout))))
    case.close("loss", loss, np.array([want_loss]),
               (1e-5 if np_dtype else 2e-2) * mag_loss + 1e-6)
    case.close("grad x", gx, w.rows(want_gx), tol_grad(w.rows(want_gx), np_dtype))
    case.close("grad topk_weights", gw, w.rows(want_gw), tol_grad(w.rows(want_gw), np_dtype))
    if gx.dtype != np.asarray(x).dtype or gw.dtype != F32:
        case.bad.append(f"grad dtypes x {gx.dtype} (want {np.asarray(x).dtype}), w {gw.dtype}")
    unsent = np.all(ref[w.rank]["send_slot"] < 0, axis=1)
    case.zero("grad x of unsent tokens", gx, unsent)
    case.zero("grad w of unsent tokens", gw, unsent)
    case.done()


def normal_section(w: W):
    S = NORMAL
    R = w.R
    E, K, H, T = S["E"], S["K"], S["H"], S["T"]
    ops = ("dispatch", "combine")
    Cfg = jaxep.EPConfig
    lin = w.comm(Cfg(num_experts=E, num_topk=K, hidden=H, max_tokens_per_rank=T), ops)
    rr = w.comm(Cfg(num_experts=E, num_topk=K, hidden=H, max_tokens_per_rank=T,
                    placement="round_robin"), ops)
    ovf = w.comm(Cfg(num_experts=E, num_topk=K, hidden=H, max_tokens_per_rank=T,
                     recv_capacity=R * T * 3 // 8, placement="round_robin"), ops)
    F = FP8
    fp8c = w.comm(Cfg(num_experts=F["E"], num_topk=F["K"], hidden=F["H"],
                      max_tokens_per_rank=F["T"], recv_capacity=R * F["T"] * 3 // 4), ops)
    dropped = 0
    for trial, kind in enumerate(NORMAL_KINDS):
        normal_case(w, lin, T, kind, seed_of("lin", R, trial), "linear")
    for trial, kind in enumerate(kinds(KINDS, TRIALS["rr"])):
        normal_case(w, rr, T, kind, seed_of("rr", R, trial), "round_robin")
    for trial, kind in enumerate(kinds(OVF_KINDS, TRIALS["ovf"])):
        ref = normal_case(w, ovf, T, kind, seed_of("ovf", R, trial), "round_robin overflow")
        dropped += sum(r["num_dropped"] for r in ref)
    if not dropped:
        w.failures.append("test setup: the overflow cases dropped nothing")
    for trial, kind in enumerate(kinds(FEW_KINDS, TRIALS["few"])):
        normal_case(w, lin, S["T_FEW"], kind, seed_of("few", R, trial), "linear fewer tokens")
    for fp8 in ("f32", "ue8m0"):
        for trial, kind in enumerate(kinds(("random", "invalid", "duplicates"), TRIALS["fp8"])):
            normal_case(w, fp8c, F["T"], kind, seed_of("fp8", fp8, R, trial), "linear", fp8=fp8)
    for dtype, comm, tag in (("float32", lin, "linear"), ("bfloat16", ovf, "round_robin ovf")):
        for trial, kind in enumerate(kinds(GRAD_KINDS, TRIALS["grad"])):
            normal_grad_case(w, comm, T, kind, seed_of("grad", dtype, R, trial), dtype, tag)


# ------------------------------------------------------------------------------------------
# low-latency mode
# ------------------------------------------------------------------------------------------

LL_FIELDS = ("counts", "hcounts", "src_index", "src_topk", "recv_rows")


def ll_body(comm, fp8, round_scale, ue8m0, zero_padding, two_phase):
    """tests/test_gpu_ll.py's ``ll_fn``: the dispatch (one kernel or send/recv), and for bf16
    the four combines (prereduce False / True / "float32" / default), chained through
    optimization barriers in the two-phase form (at most two sends outstanding)."""
    kw = dict(fp8=fp8, round_scale=round_scale, ue8m0=ue8m0)

    def body(x, idx, wts, y):
        if two_phase:
            d = jaxep.ll_dispatch_recv(comm, jaxep.ll_dispatch_send(comm, x, idx, **kw),
                                       zero_padding=zero_padding)
        else:
            d = jaxep.ll_dispatch(comm, x, idx, zero_padding=zero_padding, **kw)
        out = dict(x=d.x, counts=d.counts, num_invalid=d.num_invalid[None],
                   src_index=d.handle.src_index, src_topk=d.handle.src_topk,
                   hcounts=d.handle.counts, recv_rows=d.handle.recv_rows)
        if not fp8:
            if two_phase:
                done = []

                def combine(**kw):
                    yy = lax.optimization_barrier((y, done[-1]))[0] if done else y
                    done.append(jaxep.ll_combine_recv(
                        comm, jaxep.ll_combine_send(comm, yy, idx, wts, d.handle, **kw)))
                    return done[-1]
            else:
                def combine(**kw):
                    return jaxep.ll_combine(comm, y, idx, wts, d.handle, **kw)
            out["out"] = combine(prereduce=False)
            out["out_pre"] = combine(prereduce=True)
            out["out_pre32"] = combine(prereduce="float32")
            out["out_default"] = combine()  # ll_combine: "float32"; ll_combine_send: False
        return out
    return body


def expected_recv_rows(src_index, src_topk, K):
    el, rt = src_index.shape
    want = np.full((rt, K), -1, np.int32)
    for l in range(el):
        for j in range(rt):
            if src_index[l, j] >= 0:
                want[src_index[l, j], src_topk[l, j]] = l * rt + j
    return want


def ll_case(w: W, comm, T, kind, seed, tag, dtype="bfloat16", fp8=False, round_scale=False,
            ue8m0=False, zero_padding=True, two_phase=False):
    R, cfg = w.R, comm.cfg
    E, K, H, El = cfg.num_experts, cfg.num_topk, cfg.hidden, comm.num_local_experts
    rng = np.random.default_rng(seed)
    idx, wts = make_routing(kind, rng, R, T, E, K, comm.expert_rank)
    cast = bf16 if dtype == "bfloat16" else (lambda a: np.asarray(a, F32))
    x = cast(rng.standard_normal((R * T, H)) * 3)
    y = cast(rng.standard_normal((R * El, R * T, H)))
    key = ("ll", id(comm), T, dtype, fp8, round_scale, ue8m0, zero_padding, two_phase)
    f = w.fn(key, lambda: w.ep_call(ll_body(comm, fp8, round_scale, ue8m0, zero_padding,
                                            two_phase)))
    got = w.call(f, x, idx, wts, y)

    src = quantize(w, x, round_scale, ue8m0) if fp8 else x
    ref = oracle.ll_dispatch(src, idx, comm.expert_rank, comm.expert_slot, R)
    me = ref[w.rank]
    name = (f"{'ll_dispatch_send/recv' if two_phase else 'll_dispatch'} {tag} {dtype} T={T} "
            f"{kind}" + (f" fp8 round_scale={round_scale} ue8m0={ue8m0}" if fp8 else "")
            + ("" if zero_padding else " zero_padding=False"))
    case = Case(w, name)
    case.bits("counts", got["counts"], me["counts"])
    case.bits("handle.counts", got["hcounts"], me["counts"])
    case.bits("src_index", got["src_index"], me["src_index"])
    case.bits("src_topk", got["src_topk"], me["src_topk"])
    case.bits("recv_rows", got["recv_rows"],
              expected_recv_rows(me["src_index"], me["src_topk"], K))
    case.scalar("num_invalid", got["num_invalid"], me["num_invalid"])
    valid = np.arange(R * T)[None, :] < me["counts"][:, None]     # [E_l, R*T]
    mask = None if zero_padding else valid   # padding unspecified without zero padding
    if fp8:
        if not (isinstance(got["x"], tuple) and len(got["x"]) == 2):
            case.bad.append(f"x: fp8 must give a (payload, scales) tuple, got "
                            f"{type(got['x']).__name__}")
        else:
            case.bits("x payload", got["x"][0], me["x"][0], mask)
            case.bits("x scales", got["x"][1], me["x"][1], mask)
    else:
        case.bits("x", got["x"], me["x"], mask)
        slots = [r["slot"] for r in ref]
        ys = [w.rows(y, d) for d in range(R)]
        args = (idx, wts, comm.expert_rank, comm.expert_slot, slots)
        want = w.rows(oracle.ll_combine(ys, *args))
        mag = w.rows(oracle.ll_combine([np.abs(a.astype(F64)) for a in ys], idx,
                                       np.abs(wts.astype(F64)), *args[2:]))
        tol = tol_bf16 if dtype == "bfloat16" else tol_f32
        case.close("ll_combine prereduce=False", got["out"], want, tol(want, mag))
        case.close("ll_combine prereduce='float32'", got["out_pre32"], want, tol(want, mag))
        # True: each rank's partial of two or more rows rounded to the dtype first
        pre_tol = (2.0 ** -7 * (np.abs(want) + mag) + 1e-30 if dtype == "bfloat16"
                   else tol_f32(want, mag))
        case.close("ll_combine prereduce=True", got["out_pre"], want, pre_tol)
        case.bits("ll_combine default (== " + ("False" if two_phase else "'float32'") + ")",
                  got["out_default"], got["out" if two_phase else "out_pre32"])
        nowhere = np.all(me["slot"] < 0, axis=1)
        case.zero("ll_combine of tokens sent nowhere", got["out"], nowhere)
        if got["out"].dtype != np.asarray(x).dtype:
            case.bad.append(f"ll_combine dtype {got['out'].dtype}, want {np.asarray(x).dtype}")
    case.done()


def ll_grad_body(comm, prereduce):
    def body(x, idx, wts, ysc, pout):
        def local_loss(x, wts, ysc):
            d = jaxep.ll_dispatch(comm, x, idx)
            out = jaxep.ll_combine(comm, d.x * ysc, idx, wts, d.handle, prereduce=prereduce)
            return jnp.sum(out.astype(jnp.float32) * pout)

        loss, grads = jax.value_and_grad(local_loss, argnums=(0, 1, 2))(x, wts, ysc)
        return (loss[None],) + grads
    return body


def ll_grad_case(w: W, comm, T, kind, seed, dtype, prereduce):
    """jax.grad (inside the shard_map, of each rank's loss) of
    ``sum(ll_combine(ll_dispatch(x).x * ysc[expert]) * pout)`` w.r.t. x, topk_weights and the
    per-expert scales, against the oracle's analytic gradients."""
    R, cfg = w.R, comm.cfg
    E, K, H, El = cfg.num_experts, cfg.num_topk, cfg.hidden, comm.num_local_experts
    rng = np.random.default_rng(seed)
    idx, wts = make_routing(kind, rng, R, T, E, K, comm.expert_rank)
    cast = bf16 if dtype == "bfloat16" else (lambda a: np.asarray(a, F32))
    x = cast(rng.standard_normal((R * T, H)))
    ysc = cast(rng.standard_normal((R * El, 1, 1)))
    pout = rng.standard_normal((R * T, H)).astype(F32)
    f = w.fn(("llgrad", id(comm), T, dtype, prereduce),
             lambda: w.ep_call(ll_grad_body(comm, prereduce)))
    loss, gx, gw, gs = w.call(f, x, idx, wts, ysc, pout)

    ref = oracle.ll_dispatch(x, idx, comm.expert_rank, comm.expert_slot, R)
    slots = [r["slot"] for r in ref]
    dx = [r["x"].astype(F64) for r in ref]
    sc = [w.rows(ysc, d).astype(F64) for d in range(R)]
    ys = [dx[d] * sc[d] for d in range(R)]
    out = oracle.ll_combine(ys, idx, wts, comm.expert_rank, comm.expert_slot, slots)
    want_loss = float(np.sum(w.rows(out) * w.rows(pout)))
    mag_loss = float(np.sum(np.abs(w.rows(out) * w.rows(pout))))
    g_y, want_gw = oracle.ll_combine_grads(pout, ys, idx, wts, comm.expert_rank,
                                           comm.expert_slot, slots)
    want_gx = oracle.ll_dispatch_grad([g_y[d] * sc[d] for d in range(R)],
                                      [r["src_index"] for r in ref], R * T)
    want_gs = np.sum(g_y[w.rank] * dx[w.rank], axis=(1, 2), keepdims=True)
    mag_gs = np.sum(np.abs(g_y[w.rank] * dx[w.rank]), axis=(1, 2), keepdims=True)
    np_dtype = F32 if dtype == "float32" else None
    case = Case(w, f"grad ll_dispatch->ll_combine {dtype} prereduce={prereduce!r} T={T} {kind}")
    case.close("loss", loss, np.array([want_loss]),
               (1e-5 if np_dtype else 2e-2) * mag_loss + 1e-6)
    case.close("grad x", gx, w.rows(want_gx), tol_grad(w.rows(want_gx), np_dtype))
    case.close("grad topk_weights", gw, w.rows(want_gw), tol_grad(w.rows(want_gw), np_dtype))
    case.close("grad expert scale", gs, want_gs, tol_grad(want_gs, np_dtype, mag_gs))
    case.done()


def ll_section(w: W):
    S = LL
    R = w.R
    E, K, H, T = S["E"], S["K"], S["H"], S["T"]
    ops = ("ll_dispatch", "ll_combine")
    Cfg = jaxep.EPConfig
    ll = w.comm(Cfg(num_experts=E, num_topk=K, hidden=H, max_tokens_per_rank=T,
                    low_latency=True), ops)
    ll_rr = w.comm(Cfg(num_experts=E, num_topk=K, hidden=H, max_tokens_per_rank=T,
                       low_latency=True, placement="round_robin"), ops)
    for trial, kind in enumerate(kinds(LL_KINDS, TRIALS["ll"])):
        ll_case(w, ll, T, kind, seed_of("ll", R, trial), "linear")
    for trial, kind in enumerate(kinds(LL_KINDS[::-1], TRIALS["ll_few"])):
        ll_case(w, ll, S["T_FEW"], kind, seed_of("llfew", R, trial), "linear fewer tokens")
    for trial, kind in enumerate(kinds(LL_KINDS, TRIALS["ll_fp8"])):
        ll_case(w, ll, T, kind, seed_of("llfp8", R, trial), "linear", fp8=True)
    for trial, kind in enumerate(kinds(LL_KINDS[2:], TRIALS["ll_two"])):
        ll_case(w, ll, T, kind, seed_of("lltwo", R, trial), "linear", two_phase=True)
    for trial, kind in enumerate(kinds(("random", "duplicates"), TRIALS["ll_two_fp8"])):
        ll_case(w, ll, T, kind, seed_of("lltwo8", R, trial), "linear", fp8=True,
                round_scale=True, ue8m0=True, zero_padding=False, two_phase=True)
    for trial, kind in enumerate(kinds(("duplicates", "random", "invalid"), TRIALS["ll_rr"])):
        ll_case(w, ll_rr, T, kind, seed_of("llrr", R, trial), "round_robin", dtype="float32")
    for dtype, prereduce in (("float32", False), ("float32", True), ("float32", "float32"),
                             ("bfloat16", False)):
        for trial, kind in enumerate(kinds(("random", "duplicates", "invalid"),
                                           TRIALS["ll_grad"])):
            ll_grad_case(w, ll, T, kind, seed_of("llgrad", dtype, prereduce, R, trial), dtype,
                         prereduce)


# ------------------------------------------------------------------------------------------
# scenarios
# ------------------------------------------------------------------------------------------


def scenario_ops():
    w = W()
    t0 = time.monotonic()
    log("normal mode")
    normal_section(w)
    t1 = time.monotonic()
    log(f"normal mode: {w.cases} cases in {t1 - t0:.1f} s")
    n = w.cases
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
    R = w.R
    S = NORMAL
    E, K, H, T = S["E"], S["K"], S["H"], S["T"]
    Cfg = jaxep.EPConfig
    comm = w.comm(Cfg(num_experts=E, num_topk=K, hidden=H, max_tokens_per_rank=T),
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

    S = LL
    E, K, H, T = S["E"], S["K"], S["H"], S["T"]
    ll = w.comm(Cfg(num_experts=E, num_topk=K, hidden=H, max_tokens_per_rank=T,
                    low_latency=True), ("ll_dispatch", "ll_combine"))
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
    return report(w)


# How long a survivor waits for the others' reports: long enough for one that JAX left blocked
# to be ended by jaxep's failure watch (failure_exit_s after its kernel's timeout).
SURVIVOR_WAIT_S = 25.0


def _fail_cfg(ll: bool):
    return jaxep.EPConfig(num_experts=16, num_topk=2, hidden=128, max_tokens_per_rank=16,
                          timeout_s=FAIL_TIMEOUT_S, low_latency=True if ll else None)


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


def scenario_kill():
    w = W()
    victim = N - 1
    if victim == 0:
        raise RuntimeError("kill needs at least 2 processes (process 0 is never killed)")
    comm = w.comm(_fail_cfg(False), ("dispatch", "combine"))
    R, T, K, H = w.R, 16, 2, 128
    ge = comm.global_expert
    el = comm.num_local_experts
    g = np.arange(R * T)

    def body(x, idx, wts):
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


SCENARIOS = dict(ops=scenario_ops, loop=scenario_loop, absent=scenario_absent,
                 absent_ll=scenario_absent_ll, kill=scenario_kill)


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
