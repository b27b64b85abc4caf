"""GPU tests of the normal-mode CUDA kernels (``dispatch`` / ``combine``) against the pure-JAX
backend running on the same GPUs in the same process.

Every test builds two Communicators on one mesh, ``backend="cuda"`` and ``backend="xla"``, and
compares them: dispatch outputs (rows, fp8 payload bytes and scales, routing metadata, the
handle) bit for bit; combine and gradients within bf16 tolerance (float32 where sums must be
exact). A test is skipped until ``comm.implementation("dispatch") == "cuda"``.

Compile cost is what dominates: each jitted function is built once per (R, EPConfig, backend)
and reused across routings (routing arrays are inputs, shapes fixed per configuration).

Marked ``gpu``; skipped without CUDA devices (conftest.py) or without the CUDA build.
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import jaxep
import oracle
from conftest import ep_call, make_mesh
from jaxep import _cuda

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cuda.available(), reason="jaxep extension built without CUDA"),
]

RANKS = [1, 2, 4]  # R=1: one GPU, one process (runs on single-GPU machines)
BACKENDS = ("cuda", "xla")
F32 = np.float32

# ------------------------------------------------------------------------------------------
# communicators and compiled functions (cached; closed at the end of the module)
# ------------------------------------------------------------------------------------------

_OPEN = []


@pytest.fixture(scope="module", autouse=True)
def _close_communicators():
    yield
    for c in _OPEN:
        c.close()
    _OPEN.clear()
    for f in (_comms, _normal_fn, _grad_fn, _jit_fn, _loop_fn, _calls_fn):
        f.cache_clear()


@functools.lru_cache(maxsize=None)
def _comms(num_ranks, cfg):
    mesh = make_mesh(num_ranks, "gpu")  # skips when fewer GPUs (not cached: it raises)
    out = {b: jaxep.Communicator(mesh, cfg, backend=b) for b in BACKENDS}
    _OPEN.extend(out.values())
    return out


def comms(num_ranks, cfg):
    """``{"cuda": comm, "xla": comm}`` on the first ``num_ranks`` GPUs; skips the test while
    the CUDA dispatch kernel has not landed."""
    c = _comms(num_ranks, cfg)
    impl = c["cuda"].implementation("dispatch")
    if impl != "cuda":
        pytest.skip(f"normal-mode dispatch has no CUDA kernel yet (implementation: {impl})")
    assert c["xla"].implementation("dispatch") == "xla"
    return c


def check_errors(*comm_dicts):
    """Raise the failure a CUDA kernel recorded (a barrier timeout names rank, peer, phase)."""
    for c in comm_dicts:
        check = getattr(c["cuda"], "check", None)
        if check is not None:
            check()


def smap(comm, fn, in_specs, out_specs):
    return jax.jit(jax.shard_map(fn, mesh=comm.mesh, in_specs=in_specs, out_specs=out_specs))


def seed_of(*parts):
    return zlib.crc32("/".join(map(str, parts)).encode())


# ------------------------------------------------------------------------------------------
# routings
# ------------------------------------------------------------------------------------------

KINDS = ("random", "minus_one", "invalid", "zipf", "one_expert", "one_rank", "empty_rank",
         "silent_rank", "duplicates", "nowhere", "mixed")


def make_routing(kind, rng, R, T, E, K, expert_rank):
    """Global ``(topk_idx [R*T, K] int32, topk_weights [R*T, K] float32)``.

    Kinds of ``oracle.make_routing`` (random top-k of |N(0,1)|+1, -1 slots, invalid ids E / 999 /
    -5, one expert for all, an empty receiving rank, a silent sending rank, duplicates) plus:
    zipf (skewed expert popularity, hot experts first), one_rank (every token's experts all on
    the last rank: that rank receives R*T rows), nowhere (all -1), mixed (-1, invalid ids
    including INT32_MIN/MAX, duplicates together).
    """
    N = R * T
    expert_rank = np.asarray(expert_rank)
    if kind in oracle.ROUTINGS:
        return oracle.make_routing(kind, rng, R, T, E, K, expert_rank)
    w = rng.uniform(0.1, 1.0, (N, K)).astype(F32)
    if kind == "zipf":
        p = 1.0 / np.arange(1, E + 1) ** 1.2
        g = np.log(p)[None, :] + rng.gumbel(size=(N, E))  # Gumbel top-k: sampling w/o replacement
        idx = np.argsort(-g, axis=1)[:, :K]
    elif kind == "one_rank":
        experts = np.flatnonzero(expert_rank == R - 1)
        assert len(experts) >= K
        idx = experts[np.argsort(rng.random((N, len(experts))), axis=1)[:, :K]]
    elif kind == "nowhere":
        idx = np.full((N, K), -1)
    elif kind == "mixed":
        idx, w = oracle.make_routing("random", rng, R, T, E, K, expert_rank)
        idx[rng.random((N, K)) < 0.15] = -1
        bad = rng.random((N, K)) < 0.1
        idx[bad] = rng.choice(np.array([E, 999, -5, -(2 ** 31), 2 ** 31 - 1], np.int64),
                              size=int(bad.sum()))
        dup = rng.random(N) < 0.3
        idx[dup, K - 1] = idx[dup, 0]
    else:
        raise ValueError(kind)
    return idx.astype(np.int32), w


def kept_mask(idx, expert_rank, R, T, capacity=None):
    """``[R*T, R]`` bool: global token g has a row on rank d that was not dropped (rows are
    ordered by (source rank, source token) = ascending g, the first C are kept)."""
    E = len(expert_rank)
    idx = np.asarray(idx)
    valid = (idx >= 0) & (idx < E)
    dest = np.where(valid, np.asarray(expert_rank)[np.clip(idx, 0, E - 1)], -1)
    in_rank = (dest[:, :, None] == np.arange(R)[None, None, :]).any(1)
    C = capacity or R * T
    return in_rank & (np.cumsum(in_rank, axis=0) <= C)


# ------------------------------------------------------------------------------------------
# comparisons
# ------------------------------------------------------------------------------------------


def _bits(a):
    a = np.asarray(a)
    if a.dtype == np.bool_ or a.dtype.kind in "iu":
        return a
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_same(name, got, want, R, ctx):
    """Bit-exact equality (floats compared as their bits), with a per-rank report."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{ctx}: {name} dtype cuda {got.dtype} xla {want.dtype}"
    assert got.shape == want.shape, f"{ctx}: {name} shape cuda {got.shape} xla {want.shape}"
    g, w = _bits(got), _bits(want)
    if np.array_equal(g, w):
        return
    gr, wr = g.reshape(R, -1), w.reshape(R, -1)
    lines = []
    for r in range(R):
        bad = np.flatnonzero(gr[r] != wr[r])
        if bad.size:
            i = bad[0]
            per_row = int(np.prod(got.shape[1:], dtype=np.int64)) if got.ndim > 1 else 1
            lines.append(f"rank {r}: {bad.size} elements differ; first at local row {i // per_row}"
                         f" col {i % per_row}: cuda {got.reshape(R, -1)[r, i]!r} "
                         f"xla {want.reshape(R, -1)[r, i]!r}")
    raise AssertionError(f"{ctx}: {name} differs between cuda and xla\n  " + "\n  ".join(lines))


def assert_close(name, got, want, ctx, rtol, atol_rel):
    """``|got - want| <= rtol * max(|got|, |want|) + atol_rel * max(1, max|want|)`` elementwise
    (in float32); dtypes and shapes must agree."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{ctx}: {name} dtype cuda {got.dtype} xla {want.dtype}"
    assert got.shape == want.shape, f"{ctx}: {name} shape cuda {got.shape} xla {want.shape}"
    g, w = got.astype(F32), want.astype(F32)
    assert np.all(np.isfinite(g)), f"{ctx}: {name} (cuda) has non-finite values"
    scale = max(1.0, float(np.abs(w).max(initial=0.0)))
    tol = rtol * np.maximum(np.abs(g), np.abs(w)) + atol_rel * scale
    err = np.abs(g - w)
    if np.all(err <= tol):
        return
    i = np.unravel_index(np.argmax(err - tol), err.shape)
    raise AssertionError(f"{ctx}: {name} cuda vs xla: {int((err > tol).sum())} elements out of "
                         f"tolerance; worst at {i}: cuda {g[i]} xla {w[i]} (|diff| {err[i]}, "
                         f"tol {tol[i]})")


# bf16 outputs summed in float32 then rounded: at most 1 bf16 ulp (2^-7 relative) apart, plus
# float32 reassociation noise.
BF16_TOL = dict(rtol=2.0 ** -7, atol_rel=1e-5)
F32_TOL = dict(rtol=1e-6, atol_rel=1e-6)


# ------------------------------------------------------------------------------------------
# 1-3: dispatch (+ combine) against the xla backend
# ------------------------------------------------------------------------------------------

DISPATCH_FIELDS = ("x", "topk_idx", "topk_weights", "num_tokens", "tokens_per_expert",
                   "num_dropped", "num_invalid", "src_index", "send_slot")


@functools.lru_cache(maxsize=None)
def _normal_fn(num_ranks, cfg, backend):
    comm = _comms(num_ranks, cfg)[backend]

    def fn(x, idx, w, y):
        d = jaxep.dispatch(comm, x, idx, w)
        res = dict(x=d.x, topk_idx=d.topk_idx, topk_weights=d.topk_weights,
                   num_tokens=d.num_tokens[None], tokens_per_expert=d.tokens_per_expert,
                   num_dropped=d.num_dropped[None], num_invalid=d.num_invalid[None],
                   src_index=d.handle.src_index, send_slot=d.handle.send_slot)
        if y is not None:
            res["out"] = jaxep.combine(comm, y, d.handle)      # random y, padding rows too
        if not isinstance(x, tuple):
            res["rt"] = jaxep.combine(comm, d.x, d.handle)     # round trip: x * (kept copies)
        return res

    return ep_call(comm, fn)


def run_both(num_ranks, cfg, x, idx, w, y):
    c = comms(num_ranks, cfg)
    res = {b: jax.device_get(_normal_fn(num_ranks, cfg, b)(x, idx, w, y)) for b in BACKENDS}
    check_errors(c)
    return res


def make_inputs(cfg, R, T, kind, seed, fp8=None):
    """``(x, idx, w, y, expert_rank)``; x bf16 ``[R*T, H]`` (or the fp8 tuple), y bf16
    ``[R*C, H]`` random (None for fp8 without combine)."""
    rng = np.random.default_rng(seed)
    expert_rank = _comms(R, cfg)["xla"].expert_rank
    idx, w = make_routing(kind, rng, R, T, cfg.num_experts, cfg.num_topk, expert_rank)
    x = np.asarray(jnp.asarray(rng.standard_normal((R * T, cfg.hidden)), jnp.bfloat16))
    C = cfg.recv_capacity or R * T
    y = np.asarray(jnp.asarray(rng.standard_normal((R * C, cfg.hidden)) * 2, jnp.bfloat16))
    if fp8 is not None:
        ue8m0 = fp8 == "ue8m0"
        x = tuple(np.asarray(a) for a in jaxep.quantize_fp8(jnp.asarray(x), round_scale=ue8m0,
                                                            ue8m0=ue8m0))
    return x, idx, w, y, expert_rank


def check_dispatch(R, cfg, got, want, ctx):
    for name in DISPATCH_FIELDS:
        g, w = got[name], want[name]
        if name == "x" and isinstance(w, tuple):
            assert isinstance(g, tuple) and len(g) == 2, f"{ctx}: fp8 x must come back a tuple"
            assert_same("x payload", g[0], w[0], R, ctx)
            assert_same("x scales", g[1], w[1], R, ctx)
        else:
            assert_same(name, g, w, R, ctx)


def check_combine(R, T, got, want, x, idx, expert_rank, capacity, ctx):
    """Combine outputs (random y, and the round trip of the received rows)."""
    kept = kept_mask(idx, expert_rank, R, T, capacity)
    nowhere = ~kept.any(1)   # sent nowhere, or every copy dropped
    for name in ("out", "rt"):
        if name not in want:
            continue
        assert_close(name, got[name], want[name], ctx, **BF16_TOL)
        assert not np.any(np.asarray(got[name], F32)[nowhere]), \
            f"{ctx}: {name}: tokens sent nowhere / all copies dropped must combine to exactly 0"
    if "rt" in want:   # independent check: sum of the kept copies of x
        exp = np.asarray(x, F32) * kept.sum(1, keepdims=True)
        np.testing.assert_allclose(np.asarray(got["rt"], F32), exp, rtol=2.0 ** -7, atol=0,
                                   err_msg=f"{ctx}: rt != x * kept copies")


def run_case(R, cfg, T, kind, seed, fp8=None, with_combine=True, check_comb=True):
    x, idx, w, y, er = make_inputs(cfg, R, T, kind, seed, fp8)
    res = run_both(R, cfg, x, idx, w, y if with_combine else None)
    ctx = f"R={R} {cfg.placement} T={T} H={cfg.hidden} C={cfg.recv_capacity} {kind} fp8={fp8}"
    check_dispatch(R, cfg, res["cuda"], res["xla"], ctx)
    if with_combine and check_comb:
        check_combine(R, T, res["cuda"], res["xla"], x, idx, er, cfg.recv_capacity, ctx)
    return res


def cfg_a(placement):
    return jaxep.EPConfig(num_experts=64, num_topk=8, hidden=512, max_tokens_per_rank=256,
                          placement=placement)


CFG_WIDE = jaxep.EPConfig(num_experts=64, num_topk=8, hidden=7168, max_tokens_per_rank=128)
CFG_FEWER = jaxep.EPConfig(num_experts=32, num_topk=4, hidden=512, max_tokens_per_rank=256)
CFG_OVERFLOW = jaxep.EPConfig(num_experts=32, num_topk=4, hidden=512, max_tokens_per_rank=256,
                              recv_capacity=128, placement="round_robin")
CFG_FP8 = jaxep.EPConfig(num_experts=32, num_topk=4, hidden=640, max_tokens_per_rank=128,
                         recv_capacity=200)   # H/128 = 5 blocks: a partial packed ue8m0 word


@pytest.mark.parametrize("num_ranks", RANKS)
def test_dispatch_matches_xla_linear(num_ranks):
    """22 fresh routings of every kind (T=256, H=512, E=64, K=8): every Dispatched field
    bit-equal."""
    cfg = cfg_a("linear")
    for trial in range(22):
        kind = KINDS[trial % len(KINDS)]
        run_case(num_ranks, cfg, 256, kind, seed_of("lin", num_ranks, trial), check_comb=False)


@pytest.mark.parametrize("num_ranks", RANKS)
def test_dispatch_matches_xla_round_robin(num_ranks):
    cfg = cfg_a("round_robin")
    for trial, kind in enumerate(KINDS):
        run_case(num_ranks, cfg, 256, kind, seed_of("rr", num_ranks, trial), check_comb=False)


@pytest.mark.parametrize("num_ranks", RANKS)
def test_dispatch_real_width(num_ranks):
    """H=7168 (DeepSeek width), T=128, bf16 and fp8 (float32 scales)."""
    for trial, kind in enumerate(("random", "zipf", "one_rank", "mixed", "silent_rank")):
        run_case(num_ranks, CFG_WIDE, 128, kind, seed_of("wide", num_ranks, trial))
    for trial, kind in enumerate(("random", "invalid")):
        run_case(num_ranks, CFG_WIDE, 128, kind, seed_of("wide8", num_ranks, trial), fp8="f32",
                 with_combine=False)


@pytest.mark.parametrize("num_ranks", RANKS)
def test_dispatch_fewer_tokens_than_max(num_ranks):
    """T=100 < max_tokens_per_rank=256: C = R*100, send_slot [100, R], src_index over R*100."""
    for trial, kind in enumerate(("random", "mixed", "silent_rank", "one_rank", "duplicates")):
        run_case(num_ranks, CFG_FEWER, 100, kind, seed_of("fewer", num_ranks, trial))


@pytest.mark.parametrize("num_ranks", RANKS)
def test_dispatch_overflow(num_ranks):
    """recv_capacity = T/2 = 128: the first C rows (source rank, token order) kept, the rest
    dropped and counted; send_slot -1 for dropped copies."""
    dropped = 0
    for trial, kind in enumerate(("random", "one_expert", "zipf", "one_rank", "duplicates",
                                  "mixed")):
        res = run_case(num_ranks, CFG_OVERFLOW, 256, kind, seed_of("ovf", num_ranks, trial),
                       check_comb=False)
        nd = np.asarray(res["xla"]["num_dropped"])
        nt = np.asarray(res["xla"]["num_tokens"])
        assert np.all(nt <= 128)
        dropped += int(nd.sum())
    assert dropped > 0


@pytest.mark.parametrize("fp8", ["f32", "ue8m0"])
@pytest.mark.parametrize("num_ranks", RANKS)
def test_dispatch_fp8(num_ranks, fp8):
    """FP8 tuple (payload e4m3, scales float32 or packed UE8M0 int32): payload bytes and scales
    bit-equal to the xla backend (C=200 < R*T, so some routings drop)."""
    for trial, kind in enumerate(("random", "invalid", "one_expert", "duplicates", "zipf")):
        run_case(num_ranks, CFG_FP8, 128, kind, seed_of("fp8", fp8, num_ranks, trial), fp8=fp8,
                 with_combine=False)


@pytest.mark.parametrize("num_ranks", RANKS)
def test_combine_matches_xla(num_ranks):
    """combine(y) for random bf16 y (padding rows non-zero, must be ignored) and combine of the
    received rows, within 1 bf16 ulp of the xla backend; tokens sent nowhere give exact 0."""
    for placement in ("linear", "round_robin"):
        cfg = cfg_a(placement)
        for trial, kind in enumerate(("random", "nowhere", "silent_rank", "minus_one", "mixed",
                                      "one_rank", "empty_rank")):
            run_case(num_ranks, cfg, 256, kind, seed_of("comb", placement, num_ranks, trial))


@pytest.mark.parametrize("num_ranks", RANKS)
def test_combine_overflow_and_fewer_tokens(num_ranks):
    """Dropped copies contribute 0; tokens whose copies were all dropped combine to 0."""
    for trial, kind in enumerate(("random", "one_expert", "zipf", "mixed")):
        run_case(num_ranks, CFG_OVERFLOW, 256, kind, seed_of("comb-ovf", num_ranks, trial))
    for trial, kind in enumerate(("random", "minus_one")):
        run_case(num_ranks, CFG_FEWER, 100, kind, seed_of("comb-few", num_ranks, trial))


# ------------------------------------------------------------------------------------------
# 4: gradients
# ------------------------------------------------------------------------------------------

GRAD_H, GRAD_T = 256, 128


def _grad_cfg(capacity):
    return jaxep.EPConfig(num_experts=32, num_topk=4, hidden=GRAD_H, max_tokens_per_rank=GRAD_T,
                          recv_capacity=capacity, placement="round_robin")


@functools.lru_cache(maxsize=None)
def _grad_fn(num_ranks, cfg, backend):
    comm = _comms(num_ranks, cfg)[backend]
    ax = P(cfg.axis_name)

    def local_loss(x, idx, w, proj, pout):
        d = jaxep.dispatch(comm, x, idx, w)
        h = jnp.dot(d.x.astype(jnp.float32), proj, precision=lax.Precision.HIGHEST)
        y = (h * jnp.sum(d.topk_weights, axis=-1, keepdims=True)).astype(x.dtype)
        out = jaxep.combine(comm, y, d.handle)
        return jnp.sum(out.astype(jnp.float32) * pout)[None]

    f = jax.shard_map(local_loss, mesh=comm.mesh, in_specs=(ax, ax, ax, P(), ax), out_specs=ax)
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 2)))


@pytest.mark.parametrize("dtype,capacity", [("float32", None), ("bfloat16", None),
                                            ("float32", 96), ("bfloat16", 96)])
@pytest.mark.parametrize("num_ranks", RANKS)
def test_grads_match_xla(num_ranks, dtype, capacity):
    """jax.grad through dispatch -> rows @ proj * (sum of received weights) -> combine, w.r.t.
    x and topk_weights: cuda VJPs (combine of row cotangents, dispatch of the output cotangent,
    combine of the [C, K] weight cotangents) equal the xla backend's."""
    cfg = _grad_cfg(capacity)
    comms(num_ranks, cfg)
    R, T, H = num_ranks, GRAD_T, GRAD_H
    tol = (dict(rtol=1e-5, atol_rel=1e-5) if dtype == "float32"
           else dict(rtol=2e-2, atol_rel=1e-2))
    for trial, kind in enumerate(("mixed", "random", "one_rank")):
        rng = np.random.default_rng(seed_of("grad", R, dtype, capacity, trial))
        idx, w = make_routing(kind, rng, R, T, cfg.num_experts, cfg.num_topk,
                              _comms(R, cfg)["xla"].expert_rank)
        idx[3] = -1   # a token sent nowhere
        x = np.asarray(jnp.asarray(rng.standard_normal((R * T, H)), dtype))
        proj = (rng.standard_normal((H, H)) / np.sqrt(H)).astype(F32)
        pout = rng.standard_normal((R * T, H)).astype(F32)
        res = {b: jax.device_get(_grad_fn(R, cfg, b)(x, idx, w, proj, pout)) for b in BACKENDS}
        check_errors(_comms(R, cfg))
        ctx = f"R={R} {dtype} C={capacity} {kind}"
        (lc, (gxc, gwc)), (lx, (gxx, gwx)) = res["cuda"], res["xla"]
        assert gxc.dtype == np.dtype(x.dtype) and gwc.dtype == np.float32
        assert np.any(np.asarray(gxx, F32)) and np.any(gwx), f"{ctx}: reference grads all 0"
        assert_close("loss", np.asarray(lc)[None], np.asarray(lx)[None], ctx, **tol)
        assert_close("grad x", gxc, gxx, ctx, **tol)
        assert_close("grad topk_weights", gwc, gwx, ctx, **tol)
        # tokens sent nowhere (or whose copies were all dropped) get exactly zero gradient
        nowhere = ~kept_mask(idx, _comms(R, cfg)["xla"].expert_rank, R, T, capacity).any(1)
        assert nowhere[3]
        assert not np.any(np.asarray(gxc, F32)[nowhere]), f"{ctx}: grad x of unsent tokens"
        assert not np.any(gwc[nowhere]), f"{ctx}: grad w of unsent tokens"
        if capacity is not None and kind == "random":   # the capacity really drops copies
            full = kept_mask(idx, _comms(R, cfg)["xla"].expert_rank, R, T, None)
            assert np.any(full & ~kept_mask(idx, _comms(R, cfg)["xla"].expert_rank, R, T,
                                            capacity)), f"{ctx}: nothing dropped"


# ------------------------------------------------------------------------------------------
# 5: inside jax.jit with other ops around it (two MoE layers in one program)
# ------------------------------------------------------------------------------------------

JIT_CFG = jaxep.EPConfig(num_experts=32, num_topk=4, hidden=256, max_tokens_per_rank=128)


@functools.lru_cache(maxsize=None)
def _jit_fn(num_ranks, cfg, backend):
    comm = _comms(num_ranks, cfg)[backend]
    ax = P(cfg.axis_name)
    K = cfg.num_topk

    def layer(x, scores, w1, w2):
        top, idx = lax.top_k(scores, K)             # routing computed in the program
        w = jax.nn.softmax(top, axis=-1)
        h = jnp.dot(x, w1, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
        d = jaxep.dispatch(comm, h, idx.astype(jnp.int32), w)
        e = jax.nn.gelu(jnp.dot(d.x, w2, preferred_element_type=jnp.float32))
        y = (e * jnp.sum(d.topk_weights, axis=-1, keepdims=True)).astype(jnp.bfloat16)
        out = jaxep.combine(comm, y, d.handle)
        return (x.astype(jnp.float32) + jnp.tanh(out.astype(jnp.float32))).astype(jnp.bfloat16), \
            d.num_tokens

    def fn(x, s1, s2, w1, w2, w3, w4):
        x1, n1 = layer(x, s1, w1, w2)
        x2, n2 = layer(x1, s2, w3, w4)
        return x1, x2, jnp.stack([n1, n2])[None]

    return smap(comm, fn, (ax, ax, ax, P(), P(), P(), P()), ax)


@pytest.mark.parametrize("num_ranks", RANKS)
def test_inside_jit_with_other_ops(num_ranks):
    """matmul -> dispatch -> matmul + gelu -> combine -> tanh, twice in one jitted program
    (routing from lax.top_k in the program): equals the xla backend's program."""
    cfg = JIT_CFG
    comms(num_ranks, cfg)
    R, T, H, E = num_ranks, cfg.max_tokens_per_rank, cfg.hidden, cfg.num_experts
    for trial in range(3):
        rng = np.random.default_rng(seed_of("jit", R, trial))
        bf = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16))  # noqa: E731
        x = bf(rng.standard_normal((R * T, H)))
        s1, s2 = (rng.standard_normal((R * T, E)).astype(F32) for _ in range(2))
        ws = [bf(rng.standard_normal((H, H)) / np.sqrt(H)) for _ in range(4)]
        res = {b: jax.device_get(_jit_fn(R, cfg, b)(x, s1, s2, *ws)) for b in BACKENDS}
        check_errors(_comms(R, cfg))
        ctx = f"R={R} trial {trial}"
        np.testing.assert_array_equal(res["cuda"][2], res["xla"][2], err_msg=f"{ctx}: num_tokens")
        assert_close("layer 1", res["cuda"][0], res["xla"][0], ctx, rtol=2e-2, atol_rel=2e-2)
        assert_close("layer 2", res["cuda"][1], res["xla"][1], ctx, rtol=2e-2, atol_rel=2e-2)


# ------------------------------------------------------------------------------------------
# 6: many consecutive calls (buffer reuse, device-side sequence numbers)
# ------------------------------------------------------------------------------------------

LOOP_CFG = jaxep.EPConfig(num_experts=32, num_topk=4, hidden=256, max_tokens_per_rank=64)
LOOP_ITERS = 1000
NOWHERE_PERIOD = 37


def _loop_routing(global_expert, g, t, i, R, K):
    """Token (global row g, local index t) at iteration i: K experts, all on rank (g + i) % R
    (so it is sent to exactly one rank), or nowhere when (g + i) % NOWHERE_PERIOD == 0."""
    el = global_expert.shape[1]
    dest = (g + i) % R
    slots = (t[:, None] + np.arange(K)[None, :]) % el
    idx = global_expert[dest[:, None], slots]
    nowhere = (g + i) % NOWHERE_PERIOD == 0
    return idx, nowhere


@functools.lru_cache(maxsize=None)
def _loop_fn(num_ranks, cfg, backend):
    comm = _comms(num_ranks, cfg)[backend]
    ax = P(cfg.axis_name)
    R, K = num_ranks, cfg.num_topk
    ge = jnp.asarray(comm.global_expert)

    def fn(x0, w):
        T = x0.shape[0]
        t = jnp.arange(T, dtype=jnp.int32)
        g = lax.axis_index(cfg.axis_name) * T + t   # varying over the EP axis

        def body(i, carry):
            x, ntok = carry
            idx, nowhere = _loop_routing(ge, g, t, i, R, K)
            idx = jnp.where(nowhere[:, None], -1, idx).astype(jnp.int32)
            d = jaxep.dispatch(comm, x, idx, w)
            y = d.x + (i + 1).astype(jnp.float32)       # padding rows get it too: ignored
            return jaxep.combine(comm, y, d.handle), ntok + d.num_tokens

        x, ntok = lax.fori_loop(0, LOOP_ITERS, body, (x0, jnp.zeros_like(g[0])))
        return x, ntok[None]

    return smap(comm, fn, ax, ax)


@pytest.mark.parametrize("num_ranks", RANKS)
def test_1000_iterations_in_fori_loop(num_ranks):
    """x <- combine(dispatch(x).x + (i+1)) for 1000 iterations inside one program, routing
    changing every iteration (each token to exactly one rank, or nowhere -> 0): float32 integers,
    so the result is exact."""
    cfg = LOOP_CFG
    c = comms(num_ranks, cfg)
    R, T, H, K = num_ranks, cfg.max_tokens_per_rank, cfg.hidden, cfg.num_topk
    rng = np.random.default_rng(seed_of("loop", R))
    x0 = rng.integers(-1000, 1001, (R * T, H)).astype(F32)
    # numpy model of the loop
    g = np.arange(R * T)
    exp = x0.copy()
    exp_ntok = np.zeros(R, np.int64)
    for i in range(LOOP_ITERS):
        nowhere = (g + i) % NOWHERE_PERIOD == 0
        exp = np.where(nowhere[:, None], F32(0), exp + F32(i + 1))
        exp_ntok += np.bincount(((g + i) % R)[~nowhere], minlength=R)
    assert np.abs(exp).max() < 2 ** 24
    # the routing helper agrees with "exactly one rank": check once on the host
    idx, _ = _loop_routing(c["xla"].global_expert, g, g % T, 5, R, K)
    assert np.all(c["xla"].expert_rank[idx] == ((g + 5) % R)[:, None])
    for b in ("xla", "cuda"):
        x, ntok = jax.device_get(_loop_fn(R, cfg, b)(x0, np.ones((R * T, K), F32)))
        check_errors(c)
        np.testing.assert_array_equal(ntok, exp_ntok, err_msg=f"{b}: total num_tokens")
        np.testing.assert_array_equal(x, exp, err_msg=f"{b}: x after {LOOP_ITERS} iterations")


CALLS_CFG = jaxep.EPConfig(num_experts=32, num_topk=4, hidden=256, max_tokens_per_rank=64)
CALLS_CFG_B = jaxep.EPConfig(num_experts=16, num_topk=2, hidden=128, max_tokens_per_rank=32,
                             recv_capacity=32, placement="round_robin")


@functools.lru_cache(maxsize=None)
def _calls_fn(num_ranks, cfg, backend):
    comm = _comms(num_ranks, cfg)[backend]

    def fn(x, idx, w):
        d = jaxep.dispatch(comm, x, idx, w)
        out = jaxep.combine(comm, d.x + 1.0, d.handle)
        return out, d.num_tokens[None], d.num_dropped[None]

    return ep_call(comm, fn)


def _calls_case(R, cfg, expert_rank, rng, kind):
    T = cfg.max_tokens_per_rank
    idx, w = make_routing(kind, rng, R, T, cfg.num_experts, cfg.num_topk, expert_rank)
    x = rng.integers(-1000, 1001, (R * T, cfg.hidden)).astype(F32)
    kept = kept_mask(idx, expert_rank, R, T, cfg.recv_capacity)
    full = kept_mask(idx, expert_rank, R, T, None)
    exp = dict(out=(x + 1) * kept.sum(1, keepdims=True).astype(F32),
               num_tokens=kept.sum(0), num_dropped=full.sum(0) - kept.sum(0))
    return (x, idx, w), exp


def _check_call(got, exp, ctx):
    out, nt, nd = got
    np.testing.assert_array_equal(np.asarray(nt), exp["num_tokens"], err_msg=f"{ctx}: num_tokens")
    np.testing.assert_array_equal(np.asarray(nd), exp["num_dropped"],
                                  err_msg=f"{ctx}: num_dropped")
    np.testing.assert_array_equal(np.asarray(out), exp["out"], err_msg=f"{ctx}: out")


@pytest.mark.parametrize("num_ranks", RANKS)
def test_200_separate_calls(num_ranks):
    """200 calls of one jitted dispatch -> combine, a fresh routing and x each time: the first
    100 waited on one by one, the next 100 enqueued back to back and checked afterwards."""
    cfg = CALLS_CFG
    c = comms(num_ranks, cfg)
    f = _calls_fn(num_ranks, cfg, "cuda")
    rng = np.random.default_rng(seed_of("calls", num_ranks))
    er = c["cuda"].expert_rank
    for i in range(100):
        args, exp = _calls_case(num_ranks, cfg, er, rng, KINDS[i % len(KINDS)])
        got = jax.device_get(f(*args))
        check_errors(c)
        _check_call(got, exp, f"R={num_ranks} call {i} (synchronous)")
    cases = [_calls_case(num_ranks, cfg, er, rng, KINDS[i % len(KINDS)]) for i in range(100)]
    pending = [f(*args) for args, _ in cases]
    pending = jax.device_get(pending)
    check_errors(c)
    for i, (got, (_, exp)) in enumerate(zip(pending, cases)):
        _check_call(got, exp, f"R={num_ranks} call {100 + i} (back to back)")


@pytest.mark.parametrize("num_ranks", RANKS)
def test_two_cuda_communicators_interleaved(num_ranks):
    """Two CUDA communicators (different H, E, capacity with drops, placement) on one mesh,
    their calls interleaved back to back (30 each), then the xla backend on the same mesh:
    every result exact."""
    ca, cb = comms(num_ranks, CALLS_CFG), comms(num_ranks, CALLS_CFG_B)
    rng = np.random.default_rng(seed_of("two", num_ranks))
    fa, fb = _calls_fn(num_ranks, CALLS_CFG, "cuda"), _calls_fn(num_ranks, CALLS_CFG_B, "cuda")
    jobs = []
    for i in range(30):
        for name, f, cfg, c in (("A", fa, CALLS_CFG, ca), ("B", fb, CALLS_CFG_B, cb)):
            args, exp = _calls_case(num_ranks, cfg, c["cuda"].expert_rank, rng,
                                    KINDS[(i + len(name)) % len(KINDS)])
            jobs.append((f"R={num_ranks} comm {name} call {i}", f(*args), exp, args, cfg))
    results = jax.device_get([j[1] for j in jobs])
    check_errors(ca, cb)
    for (ctx, _, exp, _, _), got in zip(jobs, results):
        _check_call(got, exp, ctx)
    # B's capacity (32 rows) drops rows once several ranks send; one rank sends at most T=32
    assert num_ranks == 1 or any(int(np.asarray(e["num_dropped"]).sum())
                                 for _, _, e, _, cfg in jobs if cfg is CALLS_CFG_B)
    # the xla backend in the same process, same mesh, after the cuda calls
    ctx, _, exp, args, cfg = jobs[-1]
    _check_call(jax.device_get(_calls_fn(num_ranks, cfg, "xla")(*args)), exp, ctx + " (xla)")


# ------------------------------------------------------------------------------------------
# 7: no tokens (T = 0), with and without recv_capacity (issue 19, item 3)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [None, 24])
@pytest.mark.parametrize("num_ranks", RANKS)
def test_no_tokens(num_ranks, capacity):
    """dispatch + combine and their gradients with T=0 (allowed: ``x.shape[0] <=
    max_tokens_per_rank``): C rows of zero padding, zero counts, an empty output, as the xla
    backend gives (before: with a capacity the handler refused recv_x's row size, which it
    divided out of 0 rows of x)."""
    cfg = jaxep.EPConfig(num_experts=16, num_topk=4, hidden=256, max_tokens_per_rank=32,
                         recv_capacity=capacity)
    c = comms(num_ranks, cfg)
    k, h = cfg.num_topk, cfg.hidden
    args = (jnp.zeros((0, h), jnp.bfloat16), jnp.zeros((0, k), jnp.int32),
            jnp.zeros((0, k), jnp.float32))
    results = {}
    for backend, comm in c.items():
        def fn(x, idx, w, comm=comm):
            d = jaxep.dispatch(comm, x, idx, w)

            def loss(x, w):
                e = jaxep.dispatch(comm, x, idx, w)
                return jnp.sum(jaxep.combine(comm, e.x * e.topk_weights[:, :1], e.handle)
                               .astype(jnp.float32))

            gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
            return dict(x=d.x, topk_idx=d.topk_idx, topk_weights=d.topk_weights,
                        num_tokens=d.num_tokens[None], num_dropped=d.num_dropped[None],
                        num_invalid=d.num_invalid[None], tpe=d.tokens_per_expert,
                        src_index=d.handle.src_index, send_slot=d.handle.send_slot,
                        out=jaxep.combine(comm, d.x, d.handle), gx=gx, gw=gw)

        keys = jax.eval_shape(jax.shard_map(fn, mesh=comm.mesh, in_specs=P("ep"),
                                            out_specs=P("ep")), *args)
        # one output per call: XLA fails to compile a shard_map with zero-size inputs that
        # returns an empty array and a reduction of one (see tests/test_edge_inputs.py)
        results[backend] = {key: jax.device_get(ep_call(comm, lambda *a, key=key, fn=fn:
                                                        fn(*a)[key])(*args)) for key in keys}
    check_errors(c)
    C = capacity or 0
    assert results["cuda"]["x"].shape == (num_ranks * C, h)
    assert results["cuda"]["out"].shape == (0, h)
    for key, want in results["xla"].items():
        got = results["cuda"][key]
        assert got.shape == want.shape and got.dtype == want.dtype, key
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                      err_msg=key)
