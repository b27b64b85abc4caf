"""GPU tests: the CUDA backend against the pure-JAX backend on the same GPUs.

Marked ``gpu``; skipped without CUDA devices (see conftest.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxep
from jaxep import _cuda
from conftest import ep_call, make_mesh

pytestmark = pytest.mark.gpu


def _routing(rng, kind, tokens, num_topk, num_experts, num_ranks):
    """Global ``[R*T, K]`` int32 routings of several shapes."""
    n = num_ranks * tokens
    scores = np.abs(rng.standard_normal((n, num_experts))) + 1
    idx = np.argsort(-scores, axis=1)[:, :num_topk].astype(np.int32)
    if kind == "minus_one":
        idx[rng.random(idx.shape) < 0.3] = -1
    elif kind == "invalid":
        bad = rng.random(idx.shape) < 0.1
        idx[bad] = rng.choice([num_experts, 999, -5, -1], size=bad.sum())
    elif kind == "one_expert":
        idx[:] = -1
        idx[:, 0] = 3
    elif kind == "empty_rank":  # no token selects an expert held by rank 0 (linear placement)
        local = num_experts // num_ranks
        idx = np.where(idx < local, -1, idx)
    elif kind == "zipf":
        p = 1.0 / np.arange(1, num_experts + 1) ** 1.2
        for t in range(n):
            idx[t] = rng.choice(num_experts, num_topk, replace=False, p=p / p.sum())
    elif kind == "duplicates":
        idx[:, 1] = idx[:, 0]
    return idx


@pytest.mark.skipif(not _cuda.available(), reason="jaxep extension built without CUDA")
@pytest.mark.parametrize("num_ranks", [2, 4])
@pytest.mark.parametrize("placement", ["linear", "round_robin"])
@pytest.mark.parametrize("num_experts", [64, 256])
def test_dispatch_layout_cuda_equals_xla(num_ranks, placement, num_experts):
    mesh = make_mesh(num_ranks, "gpu")
    rng = np.random.default_rng(1234 + num_ranks)
    fns = {}
    for backend in ("cuda", "xla"):
        comm = jaxep.Communicator(mesh, jaxep.EPConfig(
            num_experts=num_experts, num_topk=8, hidden=128, max_tokens_per_rank=2500,
            placement=placement), backend=backend)
        assert comm.implementation("dispatch_layout") == backend

        def f(idx, comm=comm):
            lay = jaxep.dispatch_layout(comm, idx)
            return lay.tokens_per_rank[None], lay.tokens_per_expert[None], lay.is_token_in_rank

        fns[backend] = ep_call(comm, f)
    kinds = ["random", "minus_one", "invalid", "one_expert", "empty_rank", "zipf", "duplicates"]
    for trial in range(21):
        kind = kinds[trial % len(kinds)]
        tokens = (100, 1024, 2500)[trial % 3]  # below capacity, one round, several rounds
        idx = jnp.asarray(_routing(rng, kind, tokens, 8, num_experts, num_ranks))
        got = jax.device_get(fns["cuda"](idx))
        want = jax.device_get(fns["xla"](idx))
        for name, g, w in zip(("tokens_per_rank", "tokens_per_expert", "is_token_in_rank"),
                              got, want):
            assert g.dtype == w.dtype and g.shape == w.shape, name
            np.testing.assert_array_equal(g, w, err_msg=f"{name} ({kind}, T={tokens})")


@pytest.mark.parametrize("backend", ["cuda", "xla"])
def test_round_trip_on_gpus(backend):
    """Every public op runs on 4 GPUs with each backend (ops without a CUDA kernel run the
    pure-JAX path, as Communicator.implementation reports)."""
    if backend == "cuda" and not _cuda.available():
        pytest.skip("extension built without CUDA")
    mesh = make_mesh(4, "gpu")
    cfg = jaxep.EPConfig(num_experts=32, num_topk=4, hidden=256, max_tokens_per_rank=64)
    comm = jaxep.Communicator(mesh, cfg, backend=backend)
    rng = np.random.default_rng(7)
    idx = jnp.asarray(_routing(rng, "minus_one", 64, 4, 32, 4))
    x = jnp.asarray(rng.standard_normal((4 * 64, 256)), jnp.float32)
    w = jnp.asarray(rng.random((4 * 64, 4)), jnp.float32)

    def f(x, idx, w):
        d = jaxep.dispatch(comm, x, idx, w)
        out = jaxep.combine(comm, d.x, d.handle)
        ld = jaxep.ll_dispatch(comm, x, idx)
        lo = jaxep.ll_combine(comm, ld.x, idx, w, ld.handle)
        return out, lo

    out, lo = jax.device_get(ep_call(comm, f)(x, idx, w))
    idx_np, x_np, w_np = map(np.asarray, (idx, x, w))
    ndest = np.array([len({e // 8 for e in row if e >= 0}) for row in idx_np])
    np.testing.assert_allclose(out, x_np * ndest[:, None], rtol=1e-6)
    np.testing.assert_allclose(lo, x_np * np.where(idx_np >= 0, w_np, 0).sum(1)[:, None],
                               rtol=1e-5, atol=1e-5)
