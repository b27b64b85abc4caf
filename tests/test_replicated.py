"""Replicated tokens (issue 20, item 1): inputs that do not vary over the EP axis are split
over the ranks inside jaxep, and the output comes back replicated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxep
from conftest import make_mesh

R, E, K, H = 8, 16, 4, 8


def make(t_max=2, placement="round_robin"):
    cfg = jaxep.EPConfig(num_experts=E, num_topk=K, hidden=H, max_tokens_per_rank=t_max,
                         placement=placement)
    return jaxep.Communicator(make_mesh(R), cfg, backend="xla")


def inputs(t, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, H)).astype(np.float32)
    idx = np.stack([rng.choice(E, K, replace=False) for _ in range(t)]).astype(np.int32)
    idx[rng.random((t, K)) < 0.2] = -1
    w = rng.random((t, K)).astype(np.float32)
    wexp = rng.standard_normal((E, H, H)).astype(np.float32) / np.sqrt(H)
    return x, idx, w, wexp


def dense(x, idx, w, wexp):
    """The replicated computation on one device: sum_k w * x @ W[expert_k]."""
    rows = jnp.einsum("th,tkhg->tkg", x, wexp[jnp.maximum(idx, 0)])
    return jnp.sum(jnp.where(idx[..., None] >= 0, w[..., None] * rows, 0), axis=1)


def moe(comm, mode):
    def normal(x, idx, w, wl):
        d = jaxep.dispatch(comm, x, idx, w)
        rows = jnp.einsum("ch,ckhg->ckg", d.x, wl[jnp.maximum(d.topk_idx, 0)])
        y = jnp.sum(jnp.where(d.topk_idx[..., None] >= 0, d.topk_weights[..., None] * rows, 0),
                    axis=1)
        return jaxep.combine(comm, y, d.handle)

    def low_latency(x, idx, w, wl):
        ld = jaxep.ll_dispatch(comm, x, idx)
        y = jnp.einsum("erh,ehg->erg", ld.x, wl)
        return jaxep.ll_combine(comm, y, idx, w, ld.handle)

    return normal if mode == "normal" else low_latency


def run(comm, mode, check_vma=True):
    fn = jax.shard_map(moe(comm, mode), mesh=comm.mesh, in_specs=(P(), P(), P(), P("ep")),
                       out_specs=P(), check_vma=check_vma)
    return jax.jit(fn)


@pytest.mark.parametrize("mode,t", [("normal", 16), ("normal", 13), ("low_latency", 13),
                                    ("low_latency", 5)])  # T divisible by R, not, T < R
def test_replicated_matches_replicated_computation(mode, t):
    comm = make()
    x, idx, w, wexp = inputs(t, seed=t)
    wl = comm.to_placement_order(wexp)
    f = run(comm, mode)
    np.testing.assert_allclose(f(x, idx, w, wl), dense(x, idx, w, wexp), rtol=1e-5, atol=1e-5)
    probe = np.random.default_rng(1).standard_normal((t, H)).astype(np.float32)
    gx, gw = jax.grad(lambda x, w: jnp.sum(f(x, idx, w, wl) * probe), (0, 1))(x, w)
    ex, ew = jax.grad(lambda x, w: jnp.sum(dense(x, idx, w, wexp) * probe), (0, 1))(x, w)
    np.testing.assert_allclose(gx, ex, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, ew, rtol=1e-5, atol=1e-5)


def test_check_vma_false_is_correct_without_splitting():
    """Not detectable: every rank dispatches every token (R x the rows), same result."""
    comm = make(t_max=16)
    x, idx, w, wexp = inputs(13)
    out = run(comm, "normal", check_vma=False)(x, idx, w, comm.to_placement_order(wexp))
    np.testing.assert_allclose(out, dense(x, idx, w, wexp), rtol=1e-5, atol=1e-5)


def test_each_token_dispatched_once():
    comm = make(t_max=16)
    x, idx, w, _ = inputs(16, seed=3)

    def rows(x, idx, w):
        return jaxep.dispatch(comm, x, idx, w).num_tokens[None]

    def total(spec, check_vma=True):
        f = jax.shard_map(rows, mesh=comm.mesh, in_specs=spec, out_specs=P("ep"),
                          check_vma=check_vma)
        return int(jnp.sum(jax.jit(f)(x, idx, w)))

    sharded = total(P("ep"))
    assert total(P()) == sharded > 0
    assert total(P(), check_vma=False) == R * sharded


def test_replicated_handle_and_errors():
    comm = make()
    x, idx, w, _ = inputs(13)

    def f(x, idx, w):
        ld = jaxep.ll_dispatch(comm, x, idx)
        assert isinstance(ld.handle, jaxep.ReplicatedHandle) and ld.handle.num_tokens == 13
        assert ld.x.shape == (E // R, R * 2, H)
        y = jnp.zeros(ld.x.shape, jnp.float32)
        with pytest.raises(ValueError, match="replicated ll_dispatch's tokens"):
            jaxep.ll_combine(comm, y, idx[:8], w[:8], ld.handle)
        return jaxep.ll_combine(comm, y, idx, w, ld.handle)

    out = jax.jit(jax.shard_map(f, mesh=comm.mesh, in_specs=P(), out_specs=P()))(x, idx, w)
    assert out.shape == (13, H)
