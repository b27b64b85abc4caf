"""GPU tests of the grouped CUDA kernels (``dispatch_grouped`` / ``combine_grouped`` and their
gradients) against the pure-JAX backend on the same GPUs, one process.

Two Communicators on one mesh, ``backend="cuda"`` and ``backend="xla"``: every field of
``Grouped`` and of its handle bit-exact (padding rows too, and only the rows in the groups with
``zero_padding=False``); combine (with NaN in the padding rows) and gradients within bf16
tolerance. R=1 runs on one GPU. Marked ``gpu``; skipped without CUDA devices or the CUDA build.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxep
from conftest import ep_call, make_mesh
from jaxep import _cuda
from test_gpu_normal import BF16_TOL, assert_close, assert_same, make_routing, seed_of

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cuda.available(), reason="jaxep extension built without CUDA"),
]

RANKS = [1, 2, 4]
BACKENDS = ("cuda", "xla")
KINDS = ("random", "minus_one", "invalid", "zipf", "one_expert", "one_rank", "empty_rank",
         "duplicates", "nowhere", "mixed")
FIELDS = ("x", "group_sizes", "weights", "num_dropped", "num_invalid", "src_index", "dest_row",
          "dest_rank")
_OPEN = []


@pytest.fixture(scope="module", autouse=True)
def _close_communicators():
    yield
    for c in _OPEN:
        c.close()
    _OPEN.clear()
    for f in (_comms, _fwd_fn, _grad_fn):
        f.cache_clear()


@functools.lru_cache(maxsize=None)
def _comms(num_ranks, cfg):
    mesh = make_mesh(num_ranks, "gpu")
    out = {b: jaxep.Communicator(mesh, cfg, backend=b) for b in BACKENDS}
    _OPEN.extend(out.values())
    return out


def comms(num_ranks, cfg):
    c = _comms(num_ranks, cfg)
    impl = c["cuda"].implementation("dispatch_grouped")
    if impl != "cuda":
        pytest.skip(f"grouped dispatch does not run CUDA here (implementation: {impl})")
    return c


@functools.lru_cache(maxsize=None)
def _fwd_fn(num_ranks, cfg, backend, zero_padding, with_combine):
    comm = _comms(num_ranks, cfg)[backend]

    def fn(x, idx, w, y):
        g = jaxep.dispatch_grouped(comm, x, idx, w, zero_padding=zero_padding)
        res = dict(x=g.x, group_sizes=g.group_sizes, weights=g.weights,
                   num_dropped=g.num_dropped[None], num_invalid=g.num_invalid[None],
                   src_index=g.handle.src_index, dest_row=g.handle.dest_row,
                   dest_rank=g.handle.dest_rank)
        if with_combine:
            ym = jnp.where(g.handle.src_index[:, None] >= 0, y, jnp.nan).astype(y.dtype)
            res["out"] = jaxep.combine_grouped(comm, ym, g.handle)
            res["out_unweighted"] = jaxep.combine_grouped(comm, ym, g.handle, weighted=False)
            res["rt"] = jaxep.combine_grouped(comm, g.x, g.handle)
        return res

    return ep_call(comm, fn)


def run_case(R, cfg, T, kind, seed, fp8=None, zero_padding=True):
    c = comms(R, cfg)
    rng = np.random.default_rng(seed)
    idx, w = make_routing(kind, rng, R, T, cfg.num_experts, cfg.num_topk, c["xla"].expert_rank)
    x = np.asarray(jnp.asarray(rng.standard_normal((R * T, cfg.hidden)), jnp.bfloat16))
    if fp8:
        x = tuple(np.asarray(a) for a in jaxep.quantize_fp8(
            jnp.asarray(x), round_scale=fp8 == "ue8m0", ue8m0=fp8 == "ue8m0"))
    M = jaxep.normal._grouped_rows(c["xla"], T)
    y = np.asarray(jnp.asarray(rng.standard_normal((R * M, cfg.hidden)) * 2, jnp.bfloat16))
    res = {b: jax.device_get(_fwd_fn(R, cfg, b, zero_padding if b == "cuda" else True,
                                     not fp8)(x, idx, w, y)) for b in BACKENDS}
    c["cuda"].check()
    got, want = res["cuda"], res["xla"]
    ctx = (f"R={R} {cfg.placement} T={T} M={M} a={cfg.expert_alignment} {kind} fp8={fp8} "
           f"zero_padding={zero_padding}")
    for name in FIELDS:
        g, v = got[name], want[name]
        if name == "x" and not zero_padding:  # only the rows inside the groups are defined
            used = np.concatenate([np.arange(M) < s for s in
                                   np.asarray(want["group_sizes"]).reshape(R, -1).sum(1)])
            g, v = jax.tree.map(lambda a: np.asarray(a)[used], (g, v))
        if isinstance(v, tuple):
            assert_same("x payload", g[0], v[0], R, ctx)
            assert_same("x scales", g[1], v[1], R, ctx)
        else:
            assert_same(name, g, v, R, ctx)
    if not fp8:
        for name in ("out", "out_unweighted", "rt"):
            assert_close(name, got[name], want[name], ctx, **BF16_TOL)
    return want


def cfg_of(**kw):
    base = dict(num_experts=32, num_topk=8, hidden=512, max_tokens_per_rank=128)
    return jaxep.EPConfig(**(base | kw))


@pytest.mark.parametrize("num_ranks", RANKS)
@pytest.mark.parametrize("kind", KINDS)
def test_grouped_matches_xla(num_ranks, kind):
    run_case(num_ranks, cfg_of(), 128, kind, seed_of("g", num_ranks, kind))


@pytest.mark.parametrize("num_ranks", RANKS)
def test_grouped_round_robin_fewer_tokens(num_ranks):
    cfg = cfg_of(placement="round_robin")
    for trial, kind in enumerate(("random", "duplicates", "zipf")):
        run_case(num_ranks, cfg, 100, kind, seed_of("rr", num_ranks, trial))


@pytest.mark.parametrize("num_ranks", RANKS)
def test_grouped_alignment_and_capacity(num_ranks):
    cfg = cfg_of(expert_alignment=8, grouped_capacity=num_ranks * 128 * 8 * 3 // 8)
    dropped = 0
    for trial, kind in enumerate(("random", "zipf", "one_expert", "mixed")):
        want = run_case(num_ranks, cfg, 128, kind, seed_of("cap", num_ranks, trial),
                        zero_padding=trial % 2 == 1)
        dropped += int(np.sum(want["num_dropped"]))
    assert dropped > 0, "test setup: the capacity dropped nothing"


@pytest.mark.parametrize("num_ranks", RANKS)
def test_grouped_many_rounds_wide_tables(num_ranks):
    """R*T > 1024 source tokens: the layout's rounds carry group counts and opened blocks over;
    E_l = 256 // R slots (several bitmap words per lane); a capacity with alignment whose drop
    point falls in a later round."""
    T = 2100 // num_ranks
    wide = cfg_of(num_experts=256, max_tokens_per_rank=T)
    for trial, kind in enumerate(("random", "zipf")):
        run_case(num_ranks, wide, T, kind, seed_of("wide", num_ranks, trial))
    cap = cfg_of(num_experts=256, max_tokens_per_rank=T, expert_alignment=8,
                 grouped_capacity=num_ranks * T * 8 * 5 // 8)
    want = run_case(num_ranks, cap, T, "random", seed_of("widecap", num_ranks))
    assert int(np.sum(want["num_dropped"])) > 0, "test setup: the capacity dropped nothing"


@pytest.mark.parametrize("num_ranks", RANKS)
@pytest.mark.parametrize("fp8", ["f32", "ue8m0"])
def test_grouped_fp8(num_ranks, fp8):
    cfg = cfg_of(hidden=640)
    for trial, kind in enumerate(("random", "duplicates")):
        run_case(num_ranks, cfg, 128, kind, seed_of("fp8", fp8, num_ranks, trial), fp8=fp8)


@functools.lru_cache(maxsize=None)
def _grad_fn(num_ranks, cfg, backend):
    comm = _comms(num_ranks, cfg)[backend]

    def fn(x, idx, w, pout, pw):
        def loss(x, w):
            g = jaxep.dispatch_grouped(comm, x, idx, w)
            y = (g.x.astype(jnp.float32) * (0.5 + g.weights[:, None])).astype(x.dtype)
            out = jaxep.combine_grouped(comm, y, g.handle)
            return (jnp.sum(out.astype(jnp.float32) * pout)
                    + jnp.sum(g.weights * pw[:g.weights.shape[0]]))

        return jax.grad(loss, argnums=(0, 1))(x, w)

    return ep_call(comm, fn)


@pytest.mark.parametrize("num_ranks", RANKS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grouped_grads_match_xla(num_ranks, dtype):
    cfg = cfg_of(expert_alignment=4)
    c = comms(num_ranks, cfg)
    T = 128
    M = jaxep.normal._grouped_rows(c["xla"], T)
    for trial, kind in enumerate(("mixed", "duplicates", "one_rank")):
        rng = np.random.default_rng(seed_of("grad", dtype, num_ranks, trial))
        idx, w = make_routing(kind, rng, num_ranks, T, cfg.num_experts, cfg.num_topk,
                              c["xla"].expert_rank)
        x = np.asarray(jnp.asarray(rng.standard_normal((num_ranks * T, cfg.hidden)), dtype))
        pout = rng.standard_normal((num_ranks * T, cfg.hidden)).astype(np.float32)
        pw = rng.standard_normal((num_ranks * M,)).astype(np.float32)
        res = {b: jax.device_get(_grad_fn(num_ranks, cfg, b)(x, idx, w, pout, pw))
               for b in BACKENDS}
        ctx = f"R={num_ranks} {dtype} {kind}"
        tol = BF16_TOL if dtype == "bfloat16" else dict(rtol=1e-5, atol_rel=1e-5)
        assert_close("grad x", res["cuda"][0], res["xla"][0], ctx, **tol)
        assert_close("grad topk_weights", res["cuda"][1], res["xla"][1], ctx,
                     rtol=tol["rtol"], atol_rel=max(tol["atol_rel"], 1e-4))


def test_grouped_too_many_local_experts_runs_xla():
    """Past the layout's shared-memory tables (512 local experts) the rule picks xla."""
    cfg = jaxep.EPConfig(num_experts=1024, num_topk=8, hidden=128, max_tokens_per_rank=16)
    c = _comms(1, cfg)
    if c["cuda"].implementation("dispatch") != "cuda":
        pytest.skip("normal-mode kernels do not run here")
    assert c["cuda"].implementation("dispatch_grouped") == "xla"
