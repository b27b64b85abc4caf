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
import oracle
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
# expert ids wider than int32 (or unsigned): invalid whatever the width, never narrowed into
# a valid id or into -1
# ------------------------------------------------------------------------------------------


def _all_ops(comm):
    def fn(x, idx, w, y):
        lay = jaxep.dispatch_layout(comm, idx)
        d = jaxep.dispatch(comm, x, idx, w)
        ll = jaxep.ll_dispatch(comm, x, idx)
        lls = jaxep.ll_dispatch_recv(comm, jaxep.ll_dispatch_send(comm, x, idx))
        return dict(
            layout_tpe=lay.tokens_per_expert, in_rank=lay.is_token_in_rank,
            num_invalid=d.num_invalid[None], tokens_per_expert=d.tokens_per_expert,
            src_index=d.handle.src_index, topk_idx=d.topk_idx, x=d.x,
            ll_invalid=ll.num_invalid[None], ll_counts=ll.counts, ll_x=ll.x,
            ll2_invalid=lls.num_invalid[None], ll2_counts=lls.counts,
            out=jaxep.ll_combine(comm, y, idx, w, ll.handle, prereduce=False),
            out_pre=jaxep.ll_combine(comm, y, idx, w, ll.handle))

    return ep_call(comm, fn)


def _wide_ids_case(idx, comm):
    """Every op on ``idx`` (any integer dtype) against the oracle, which reads the ids as
    Python ints: ids outside ``[-1, E)`` count as invalid and route nowhere."""
    cfg = comm.cfg
    t, e, h = cfg.max_tokens_per_rank, cfg.num_experts, cfg.hidden
    rng = np.random.default_rng(0)
    x = np.asarray(jnp.asarray(rng.standard_normal((R * t, h)), jnp.float32))
    w = rng.random((R * t, cfg.num_topk)).astype(np.float32)
    y = rng.standard_normal((R * comm.num_local_experts, R * t, h)).astype(np.float32)
    got = _all_ops(comm)(x, jnp.asarray(idx), w, y)
    ids = np.asarray(idx).tolist()  # exact Python ints
    lay = oracle.dispatch_layout(ids, comm.expert_rank, R)
    ref = oracle.dispatch(x, ids, w, comm.expert_rank, comm.expert_slot, R)
    ll = oracle.ll_dispatch(x, ids, comm.expert_rank, comm.expert_slot, R)
    _, bad = oracle.sanitize(ids, e)
    assert sum(bad) > 0
    for r in range(R):
        invalid = sum(bad[r * t:(r + 1) * t])
        assert ref[r]["num_invalid"] == invalid
        for key in ("num_invalid", "ll_invalid", "ll2_invalid"):
            assert int(per_rank(got[key])[r, 0]) == invalid, (key, r)
        np.testing.assert_array_equal(per_rank(got["layout_tpe"])[r], lay[r]["tokens_per_expert"])
        np.testing.assert_array_equal(per_rank(got["in_rank"])[r], lay[r]["is_token_in_rank"])
        for key in ("tokens_per_expert", "src_index", "topk_idx", "x"):
            np.testing.assert_array_equal(per_rank(got[key])[r], ref[r][key], err_msg=key)
        for key in ("ll_counts", "ll2_counts"):
            np.testing.assert_array_equal(per_rank(got[key])[r], ll[r]["counts"], err_msg=key)
        np.testing.assert_array_equal(per_rank(got["ll_x"])[r], ll[r]["x"])
    want = oracle.ll_combine(list(per_rank(y)), ids, w, comm.expert_rank, comm.expert_slot,
                             [ll[r]["slot"] for r in range(R)])
    for key in ("out", "out_pre"):
        np.testing.assert_allclose(np.asarray(got[key]), want, rtol=1e-5, atol=1e-5,
                                   err_msg=key)


def test_int64_ids_are_not_narrowed():
    """With x64 on, an int64 id of 2**32 + 1 must stay invalid (before: it became expert 1 and
    num_invalid stayed 0); so must -(2**32) - 1 (narrowed: -1) and 2**31 + 3."""
    comm = comm_of()
    e, k, t = comm.cfg.num_experts, comm.cfg.num_topk, comm.cfg.max_tokens_per_rank
    rng = np.random.default_rng(1)
    idx = rng.integers(-1, e, (R * t, k)).astype(np.int64)
    idx[0, 0] = 2 ** 32 + 1
    idx[1, 1] = -(2 ** 32) - 1
    idx[t, 2] = 2 ** 31 + 3
    idx[t + 1, 0] = 2 ** 40 + e - 1
    with jax.enable_x64(True):
        assert jnp.asarray(idx).dtype == jnp.int64
        _wide_ids_case(idx, comm)


def test_uint32_ids_are_not_narrowed():
    """uint32 ids (no x64 needed): 2**32 - 1 is not -1 ("no expert") but invalid, and 2**31 + 1
    does not wrap to a negative id."""
    comm = comm_of()
    e, k, t = comm.cfg.num_experts, comm.cfg.num_topk, comm.cfg.max_tokens_per_rank
    rng = np.random.default_rng(2)
    idx = rng.integers(0, e, (R * t, k)).astype(np.uint32)
    idx[0, 0] = 2 ** 32 - 1
    idx[t, 1] = 2 ** 31 + 1
    _wide_ids_case(idx, comm)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint8, np.uint16])
def test_narrow_integer_ids(dtype):
    """Narrower ids convert exactly: -1 stays "no expert", out-of-range ids stay invalid."""
    comm = comm_of()
    e, k, t = comm.cfg.num_experts, comm.cfg.num_topk, comm.cfg.max_tokens_per_rank
    rng = np.random.default_rng(3)
    idx = rng.integers(0, e, (R * t, k)).astype(dtype)
    idx[0, 0] = 100
    if np.issubdtype(dtype, np.signedinteger):
        idx[1, 1] = -1
        idx[t, 0] = -100
    _wide_ids_case(idx, comm)


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
