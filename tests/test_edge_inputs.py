"""Inputs at the edge of what the ops accept, against the documented semantics (issue 19):
expert ids of every integer width, calls with no tokens, non-finite expert outputs.

Like ``test_ops.py``, on virtual CPU devices inside ``jax.shard_map`` (pure-JAX backend), against
the NumPy oracle where one applies.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxep
from conftest import ep_call, make_mesh

R = 2
SMALL = dict(num_experts=8, num_topk=3, hidden=16, max_tokens_per_rank=4)


def comm_of(num_ranks=R, **cfg):
    return jaxep.Communicator(make_mesh(num_ranks), jaxep.EPConfig(**{**SMALL, **cfg}),
                              backend="xla")


def per_rank(a, num_ranks=R):
    a = np.asarray(a)
    return a.reshape((num_ranks, -1) + a.shape[1:])


# ------------------------------------------------------------------------------------------
# T = 0: no token on any rank (allowed: x.shape[0] <= max_tokens_per_rank)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [None, 5])
def test_no_tokens(capacity):
    """dispatch + combine (and their gradients), dispatch_layout and the low-latency ops with
    T=0, with and without ``recv_capacity`` (before: with a capacity, dispatch raised
    "Cannot do a non-empty jnp.take() from an empty axis")."""
    comm = comm_of(recv_capacity=capacity)
    cfg = comm.cfg
    k, h, el = cfg.num_topk, cfg.hidden, comm.num_local_experts
    c = capacity or 0

    def fn(x, idx, w):
        d = jaxep.dispatch(comm, x, idx, w)
        out = jaxep.combine(comm, d.x * 2, d.handle)
        lay = jaxep.dispatch_layout(comm, idx)
        ll = jaxep.ll_dispatch(comm, x, idx)
        llo = jaxep.ll_combine(comm, ll.x, idx, w, ll.handle)

        def loss(x, w):
            d = jaxep.dispatch(comm, x, idx, w)
            return jnp.sum(jaxep.combine(comm, d.x * d.topk_weights[:, :1], d.handle))

        gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
        return dict(x=d.x, topk_idx=d.topk_idx, topk_weights=d.topk_weights,
                    num_tokens=d.num_tokens[None], num_dropped=d.num_dropped[None],
                    num_invalid=d.num_invalid[None], tpe=d.tokens_per_expert,
                    src_index=d.handle.src_index, send_slot=d.handle.send_slot, out=out,
                    tpr=lay.tokens_per_rank, ll_x=ll.x, ll_counts=ll.counts, llo=llo,
                    gx=gx, gw=gw)

    args = (jnp.zeros((0, h), jnp.bfloat16), jnp.zeros((0, k), jnp.int32),
            jnp.zeros((0, k), jnp.float32))
    # One output per compiled call: XLA (jax 0.10, Shardy) fails to compile a shard_map with
    # zero-size inputs that returns an empty array together with a reduction of one
    # ("expected at least one operand ... to be produced by a xla.sdy.GlobalToLocalShape"),
    # with or without jaxep.
    got = {key: ep_call(comm, lambda *a, key=key: fn(*a)[key])(*args)
           for key in jax.eval_shape(jax.shard_map(fn, mesh=comm.mesh, in_specs=P("ep"),
                                                   out_specs=P("ep")), *args)}
    shapes = dict(x=(R * c, h), topk_idx=(R * c, k), src_index=(R * c,), send_slot=(0, R),
                  out=(0, h), ll_x=(R * el, 0, h), llo=(0, h), gx=(0, h), gw=(0, k))
    for key, shape in shapes.items():
        assert got[key].shape == shape, (key, got[key].shape)
    assert np.all(np.asarray(got["x"], np.float32) == 0)
    assert np.all(np.asarray(got["topk_idx"]) == -1)
    assert np.all(np.asarray(got["src_index"]) == -1)
    assert np.all(np.asarray(got["topk_weights"]) == 0)
    for key in ("num_tokens", "num_dropped", "num_invalid", "tpe", "tpr", "ll_counts"):
        assert np.all(np.asarray(got[key]) == 0), key


# ------------------------------------------------------------------------------------------
# ll_combine: an invalid entry contributes nothing (not its gathered row times 0)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["one", "two_phase"])
@pytest.mark.parametrize("prereduce", [False, True, "float32"])
def test_ll_combine_invalid_entries_add_nothing(prereduce, form):
    """A token that lists expert 0 (rank 0, slot 0), whose output row is +Inf, and a -1 (or an
    out-of-range id) gets +Inf back, not NaN (before, with ``prereduce=False``, the -1 entry
    gathered that same row and multiplied it by weight 0: inf * 0 = nan). ``ll_combine_send``
    defaults to ``prereduce=False``."""
    comm = comm_of()
    cfg = comm.cfg
    t, h, e = cfg.max_tokens_per_rank, cfg.hidden, cfg.num_experts
    el = comm.num_local_experts
    assert (comm.expert_rank[0], comm.expert_slot[0]) == (0, 0)
    idx = np.tile(np.array([[0, -1, 5]], np.int32), (R * t, 1))
    idx[1::2, 1] = e + 3  # invalid: counted, treated as -1
    w = np.full((R * t, cfg.num_topk), 0.5, np.float32)
    y = np.ones((R * el, R * t, h), np.float32)
    y[0] = np.inf  # every row of expert 0 (rank 0, slot 0)

    def fn(x, idx, w, y):
        d = jaxep.ll_dispatch(comm, x, idx)
        if form == "one":
            return jaxep.ll_combine(comm, y, idx, w, d.handle, prereduce=prereduce)
        kw = {} if prereduce is False else dict(prereduce=prereduce)
        return jaxep.ll_combine_recv(comm, jaxep.ll_combine_send(comm, y, idx, w, d.handle,
                                                                 **kw))

    x = np.ones((R * t, h), np.float32)
    out = np.asarray(ep_call(comm, fn)(x, idx, w, y))
    assert out.shape == (R * t, h)
    assert not np.isnan(out).any(), f"NaN in {np.unique(out)}"
    assert np.all(out == np.inf)
