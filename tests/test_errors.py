"""Trace-time errors (the docstrings; docs/design.md): ValueError / TypeError naming what was
expected and what was given. Everything is traced with ``jax.eval_shape``; nothing compiles."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxep
from conftest import make_mesh

R, T, H, E, K = 2, 4, 128, 8, 2
BF16, F32, I32, F8 = jnp.bfloat16, jnp.float32, jnp.int32, jnp.float8_e4m3fn


def S(shape, dtype):
    """A *per-rank* abstract array; the global shape stacks R of them on axis 0."""
    return jax.ShapeDtypeStruct((R * shape[0],) + tuple(shape[1:]), dtype)


def cfg(**kw):
    base = dict(num_experts=E, num_topk=K, hidden=H, max_tokens_per_rank=T)
    base.update(kw)
    return jaxep.EPConfig(**base)


@pytest.fixture(scope="module")
def comm():
    return jaxep.Communicator(make_mesh(R), cfg(), backend="xla")


def trace(comm, fn, *args):
    """Trace ``fn`` per rank inside shard_map over the communicator's mesh (no compile)."""
    f = jax.shard_map(fn, mesh=comm.mesh, in_specs=P(comm.cfg.axis_name),
                      out_specs=P(comm.cfg.axis_name))
    return jax.eval_shape(f, *args)


X = S((T, H), BF16)
IDX = S((T, K), I32)
W = S((T, K), F32)


def test_valid_calls_trace(comm):
    """Sanity: the well-formed calls used as baselines below trace fine."""
    trace(comm, lambda x, i, w: jaxep.dispatch(comm, x, i, w).x, X, IDX, W)
    trace(comm, lambda i: jaxep.dispatch_layout(comm, i).is_token_in_rank, IDX)
    trace(comm, lambda x, i: jaxep.ll_dispatch(comm, x, i, fp8=True).x[0], X, IDX)


# ------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------


def _dispatch(comm):
    return lambda x, i, w: jaxep.dispatch(comm, x, i, w).x


@pytest.mark.parametrize("x,idx,w,exc,match", [
    (S((T, H, 1), BF16), IDX, W, ValueError, r"x must have rank 2, got shape \(4, 128, 1\)"),
    (S((T, H), jnp.int32), IDX, W, TypeError,
     r"x must have dtype in \(bfloat16, float32\), got int32"),
    (S((T, H), jnp.float16), IDX, W, TypeError, r"bfloat16, float32.*got float16"),
    (S((T, 256), BF16), IDX, W, ValueError, r"hidden\).* must be 128, got 256"),
    (S((T + 4, H), BF16), S((T + 4, K), I32), S((T + 4, K), F32), ValueError,
     r"8 tokens per rank exceed EPConfig.max_tokens_per_rank=4"),
    (X, S((T,), I32), W, ValueError, r"topk_idx must have rank 2, got shape \(4,\)"),
    (X, S((T, K), F32), W, TypeError, r"topk_idx must be an integer.*got float32"),
    (X, S((T, K + 1), I32), S((T, K + 1), F32), ValueError,
     r"num_topk\) must be 2, got 3"),
    (X, S((2, K), I32), W, ValueError, r"tokens\) must be 4, got 2"),
    (X, IDX, S((T, K + 1), F32), ValueError,
     r"topk_weights shape \(4, 3\) must equal topk_idx shape \(4, 2\)"),
    (X, IDX, S((T,), F32), ValueError, r"topk_weights must have rank 2, got shape \(4,\)"),
    (X, IDX, S((T, K), I32), TypeError, r"topk_weights must be floating.*got int32"),
])
def test_dispatch_bad_input(comm, x, idx, w, exc, match):
    with pytest.raises(exc, match=match):
        trace(comm, _dispatch(comm), x, idx, w)


def test_topk_weights_none(comm):
    """``topk_weights=None`` is a TypeError naming the argument (before: "'NoneType' object is
    not subscriptable" from inside the xla backend, "where requires ndarray" in ll_combine)."""
    match = r"topk_weights must be a float32 array shaped like topk_idx \(4, 2\), got None"
    with pytest.raises(TypeError, match=rf"jaxep.dispatch: {match}"):
        trace(comm, lambda x, i: jaxep.dispatch(comm, x, i, None).x, X, IDX)

    def ll(op):
        def f(x, i, y):
            h = jaxep.ll_dispatch(comm, x, i).handle
            if op == "ll_combine":
                return jaxep.ll_combine(comm, y, i, None, h)
            return jaxep.ll_combine_send(comm, y, i, None, h).topk_idx
        return f

    for op in ("ll_combine", "ll_combine_send"):
        with pytest.raises(TypeError, match=rf"jaxep.{op}: {match}"):
            trace(comm, ll(op), X, IDX, Y)


@pytest.mark.parametrize("x,exc,match", [
    ((S((T, H), BF16), S((T, 1), F32)), TypeError,
     r"x payload must have dtype in \(float8_e4m3fn\), got bfloat16"),
    ((S((T, H), F8), S((T, 2), F32)), ValueError, r"scales shape must be \(4, 1\), got \(4, 2\)"),
    ((S((T, H), F8), S((T, 2), I32)), ValueError, r"scales shape must be \(4, 1\), got \(4, 2\)"),
    ((S((T, H), F8), S((T, 1), BF16)), TypeError, r"x scales must have dtype in.*got bfloat16"),
    ((S((T, H), F8), S((T,), F32)), ValueError, r"x scales must have rank 2"),
    ((S((T, H), F8), S((T, 1), F32), S((T, 1), F32)), TypeError,
     r"tuple \(payload, scales\), got 3 elements"),
])
def test_dispatch_bad_fp8_tuple(comm, x, exc, match):
    with pytest.raises(exc, match=match):
        trace(comm, _dispatch(comm), x, IDX, W)


def test_dispatch_fp8_hidden_not_multiple_of_128():
    c = jaxep.Communicator(make_mesh(R), cfg(hidden=192), backend="xla")
    with pytest.raises(ValueError, match=r"multiple of 128, got 192"):
        trace(c, _dispatch(c), (S((T, 192), F8), S((T, 1), F32)), IDX, W)


# ------------------------------------------------------------------------------------------
# combine
# ------------------------------------------------------------------------------------------


def _combine(comm):
    return lambda x, i, w, y: jaxep.combine(comm, y, jaxep.dispatch(comm, x, i, w).handle)


@pytest.mark.parametrize("y,exc,match", [
    (S((R * T, H, 1), BF16), ValueError, r"y must have rank 2, got shape \(8, 128, 1\)"),
    (S((R * T, H), jnp.int8), TypeError, r"y must have dtype in \(bfloat16, float32\), got int8"),
    (S((R * T + 1, H), BF16), ValueError, r"rows of the dispatch, C\) must be 8, got 9"),
    (S((R * T, 256), BF16), ValueError, r"hidden\) must be 128, got 256"),
])
def test_combine_bad_y(comm, y, exc, match):
    with pytest.raises(exc, match=match):
        trace(comm, _combine(comm), X, IDX, W, y)


def test_combine_bad_handle(comm):
    def bad_tuple(x, i, w, y):
        h = jaxep.dispatch(comm, x, i, w).handle
        return jaxep.combine(comm, y, (h.src_index, h.send_slot))

    def whole_dispatched(x, i, w, y):
        return jaxep.combine(comm, y, jaxep.dispatch(comm, x, i, w))

    def ll_handle(x, i, w, y):
        return jaxep.combine(comm, y, jaxep.ll_dispatch(comm, x, i).handle)

    for fn, name in [(bad_tuple, "tuple"), (whole_dispatched, "Dispatched"),
                     (ll_handle, "LLHandle")]:
        with pytest.raises(TypeError, match=rf"handle must be a DispatchHandle.*got {name}"):
            trace(comm, fn, X, IDX, W, S((R * T, H), BF16))


# ------------------------------------------------------------------------------------------
# dispatch_layout
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("idx,exc,match", [
    (S((T, K, 1), I32), ValueError, r"topk_idx must have rank 2, got shape \(4, 2, 1\)"),
    (S((T, K), F32), TypeError, r"integer.*got float32"),
    (S((T, 3), I32), ValueError, r"num_topk\) must be 2, got 3"),
    (S((T + 1, K), I32), ValueError, r"5 tokens per rank exceed EPConfig.max_tokens_per_rank=4"),
])
def test_dispatch_layout_bad_input(comm, idx, exc, match):
    with pytest.raises(exc, match=match):
        trace(comm, lambda i: jaxep.dispatch_layout(comm, i).tokens_per_rank, idx)


# ------------------------------------------------------------------------------------------
# low-latency mode
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x,idx,kw,exc,match", [
    (S((T, H, 1), BF16), IDX, {}, ValueError, r"x must have rank 2, got shape \(4, 128, 1\)"),
    (S((T, H), jnp.int32), IDX, {}, TypeError, r"bfloat16, float32\), got int32"),
    (S((T, H), F8), IDX, {}, TypeError, r"bfloat16, float32\), got float8_e4m3fn"),
    (S((T, 256), BF16), IDX, {}, ValueError, r"hidden\) must be 128, got 256"),
    (S((T + 1, H), BF16), S((T + 1, K), I32), {}, ValueError,
     r"5 tokens per rank exceed EPConfig.max_tokens_per_rank=4"),
    (X, S((T, 3), I32), {}, ValueError, r"num_topk\) must be 2, got 3"),
    (X, S((T, K), F32), {}, TypeError, r"integer.*got float32"),
    (X, S((T - 1, K), I32), {}, ValueError, r"tokens\) must be 4, got 3"),
    (X, IDX, dict(round_scale=True), ValueError, r"round_scale/ue8m0 need fp8=True"),
    (X, IDX, dict(ue8m0=True), ValueError, r"need fp8=True"),
    (X, IDX, dict(fp8=True, ue8m0=True), ValueError, r"ue8m0=True needs round_scale=True"),
])
def test_ll_dispatch_bad_input(comm, x, idx, kw, exc, match):
    with pytest.raises(exc, match=match):
        trace(comm, lambda x, i: jaxep.ll_dispatch(comm, x, i, **kw).counts, x, idx)
    with pytest.raises(exc, match=match):
        trace(comm, lambda x, i: jaxep.ll_dispatch_send(comm, x, i, **kw).recv_topk, x, idx)


def test_ll_errors_name_the_op_called(comm):
    """On the xla backend ``ll_dispatch`` / ``ll_combine`` run their two phases, but an error
    names the op the user called (before: ``ll_dispatch_send`` / ``ll_combine_send``)."""
    bad_x = S((T, 256), BF16)
    with pytest.raises(ValueError, match=r"^jaxep.ll_dispatch: x.shape\[-1\]"):
        trace(comm, lambda x, i: jaxep.ll_dispatch(comm, x, i).counts, bad_x, IDX)
    with pytest.raises(ValueError, match=r"^jaxep.ll_dispatch_send: x.shape\[-1\]"):
        trace(comm, lambda x, i: jaxep.ll_dispatch_send(comm, x, i).recv_topk, bad_x, IDX)
    bad_w = S((T, K + 1), F32)
    with pytest.raises(ValueError, match=r"^jaxep.ll_combine: topk_weights shape"):
        trace(comm, _ll_combine(comm), X, IDX, bad_w, Y)

    def send(x, i, w, y):
        return jaxep.ll_combine_send(comm, y, i, w, jaxep.ll_dispatch(comm, x, i).handle).rows

    with pytest.raises(ValueError, match=r"^jaxep.ll_combine_send: topk_weights shape"):
        trace(comm, send, X, IDX, bad_w, Y)


def test_ll_dispatch_fp8_hidden_not_multiple_of_128():
    c = jaxep.Communicator(make_mesh(R), cfg(hidden=192), backend="xla")
    with pytest.raises(ValueError, match=r"multiple of 128, got 192"):
        trace(c, lambda x, i: jaxep.ll_dispatch(c, x, i, fp8=True).counts,
              S((T, 192), BF16), IDX)
    # without fp8 any hidden size is fine
    trace(c, lambda x, i: jaxep.ll_dispatch(c, x, i).counts, S((T, 192), BF16), IDX)


EL = E // R
Y = S((EL, R * T, H), BF16)


def _ll_combine(comm):
    return lambda x, i, w, y: jaxep.ll_combine(comm, y, i, w, jaxep.ll_dispatch(comm, x, i).handle)


@pytest.mark.parametrize("y,w,exc,match", [
    (S((EL, R * T), BF16), W, ValueError, r"y must have rank 3, got shape \(4, 8\)"),
    (S((EL, R * T, H), jnp.int32), W, TypeError, r"y must have dtype in.*got int32"),
    (S((EL, R * T + 1, H), BF16), W, ValueError,
     r"y shape \[E_l, R\*T, H\] must be \(4, 8, 128\), got \(4, 9, 128\)"),
    (S((EL + 1, R * T, H), BF16), W, ValueError, r"must be \(4, 8, 128\), got \(5, 8, 128\)"),
    (S((EL, R * T, 256), BF16), W, ValueError, r"must be \(4, 8, 128\), got \(4, 8, 256\)"),
    (Y, S((T, K + 1), F32), ValueError, r"topk_weights shape \(4, 3\) must equal"),
    (Y, S((T, K), I32), TypeError, r"topk_weights must be floating.*got int32"),
])
def test_ll_combine_bad_input(comm, y, w, exc, match):
    with pytest.raises(exc, match=match):
        trace(comm, _ll_combine(comm), X, IDX, w, y)


def test_ll_bad_handle_and_pending(comm):
    def normal_handle(x, i, w, y):
        return jaxep.ll_combine(comm, y, i, w, jaxep.dispatch(comm, x, i, w).handle)

    with pytest.raises(TypeError, match=r"handle must be an LLHandle.*got DispatchHandle"):
        trace(comm, normal_handle, X, IDX, W, Y)

    def bad_recv(x, i):
        return jaxep.ll_dispatch_recv(comm, jaxep.ll_dispatch(comm, x, i)).counts

    with pytest.raises(TypeError, match=r"expected the LLDispatchPending.*got LLDispatched"):
        trace(comm, bad_recv, X, IDX)

    def bad_combine_recv(x, i, w, y):
        return jaxep.ll_combine_recv(comm, y)

    with pytest.raises(TypeError, match=r"expected the LLCombinePending.*got "):
        trace(comm, bad_combine_recv, X, IDX, W, Y)

    def tokens_mismatch(x, i, w, y):   # topk_idx for another T than the dispatch's
        h = jaxep.ll_dispatch(comm, x, i).handle
        return jaxep.ll_combine(comm, y, i[:2], w[:2], h)

    with pytest.raises(ValueError, match=r"tokens\) must be 4, got 2"):
        trace(comm, tokens_mismatch, X, IDX, W, Y)

    def bad_prereduce(x, i, w, y):
        return jaxep.ll_combine(comm, y, i, w, jaxep.ll_dispatch(comm, x, i).handle,
                                prereduce="bfloat16")

    with pytest.raises(ValueError, match=r"prereduce must be False, True or 'float32', "
                                         r"got 'bfloat16'"):
        trace(comm, bad_prereduce, X, IDX, W, Y)


def test_pending_and_handle_of_another_communicator(comm):
    """A pending transfer or handle made by a communicator of other shapes (E, K, H, T, or the
    capacity) is a ValueError naming the field and both shapes (before: ll_dispatch_recv took
    a pending of another E and returned counts of the wrong shape)."""
    mesh = comm.mesh
    other = {name: jaxep.Communicator(mesh, cfg(**kw), backend="xla") for name, kw in [
        ("E", dict(num_experts=16)), ("K", dict(num_topk=3)), ("H", dict(hidden=256)),
        ("C", dict(recv_capacity=3))]}
    belongs = r"does not belong to this Communicator \(R=2, E=8, K=2, H=128, "

    def dispatch_recv(o):
        return lambda x, i: jaxep.ll_dispatch_recv(comm, jaxep.ll_dispatch_send(o, x, i)).counts

    def combine_recv(o):
        def f(x, i, w, y):
            pend = jaxep.ll_combine_send(o, y, i, w, jaxep.ll_dispatch(o, x, i).handle)
            return jaxep.ll_combine_recv(comm, pend)
        return f

    def ll_handle(o):
        return lambda x, i, w, y: jaxep.ll_combine(comm, y, i, w, jaxep.ll_dispatch(o, x, i).handle)

    def normal_handle(o):
        return lambda x, i, w, y: jaxep.combine(comm, y, jaxep.dispatch(o, x, i, w).handle)

    o = other["E"]
    with pytest.raises(ValueError, match=rf"ll_dispatch_recv: this LLDispatchPending {belongs}"
                                         r".*pending.recv_topk has shape \(2, 8, 4\), "
                                         r"expected \(2, 4, 4\)"):
        trace(comm, dispatch_recv(o), X, IDX)
    o = other["K"]
    with pytest.raises(ValueError, match=r"pending.topk_idx has shape \(4, 3\), expected "
                                         r"\(4, 2\)"):
        trace(comm, dispatch_recv(o), X, S((T, 3), I32))
    o = other["H"]
    with pytest.raises(ValueError, match=r"pending.rows has shape \(2, 4, 4, 256\), expected "
                                         r"\(2, 4, 4, 128\)"):
        trace(comm, dispatch_recv(o), S((T, 256), BF16), IDX)
    with pytest.raises(ValueError, match=rf"ll_combine_recv: this LLCombinePending {belongs}"
                                         r".*pending.rows has shape \(2, 4, 4, 256\)"):
        trace(comm, combine_recv(o), S((T, 256), BF16), IDX, W, S((EL, R * T, 256), BF16))
    o = other["E"]
    with pytest.raises(ValueError, match=rf"ll_combine: this LLHandle {belongs}"
                                         r".*handle.src_index has shape \(8, 8\), expected "
                                         r"\(4, 8\)"):
        trace(comm, ll_handle(o), X, IDX, W, Y)
    o = other["K"]
    with pytest.raises(ValueError, match=r"handle.recv_rows has shape \(8, 3\), expected "
                                         r"\(8, 2\)"):
        trace(comm, ll_handle(o), X, S((T, 3), I32), S((T, 3), F32), Y)
    o = other["C"]
    with pytest.raises(ValueError, match=rf"combine: this DispatchHandle {belongs}"
                                         r".*handle.src_index has shape \(3,\), expected "
                                         r"\(8,\)"):
        trace(comm, normal_handle(o), X, IDX, W, S((3, H), BF16))


# ------------------------------------------------------------------------------------------
# group binding: outside shard_map, wrong axis size, closed communicator, bad first argument
# ------------------------------------------------------------------------------------------


def test_outside_shard_map(comm):
    x = jnp.zeros((T, H), BF16)
    i = jnp.zeros((T, K), I32)
    w = jnp.zeros((T, K), F32)
    calls = [lambda: jaxep.dispatch(comm, x, i, w), lambda: jaxep.dispatch_layout(comm, i),
             lambda: jaxep.ll_dispatch(comm, x, i), lambda: jaxep.ll_dispatch_send(comm, x, i)]
    for call in calls:
        with pytest.raises(ValueError, match=r"inside jax.shard_map.*'ep'.*R=2"):
            jax.jit(call)()
        with pytest.raises(ValueError, match=r"inside jax.shard_map"):
            call()   # eager


def test_axis_size_differs_from_communicator():
    comm8 = jaxep.Communicator(make_mesh(8), cfg(), backend="xla")
    mesh4 = make_mesh(4)
    f = jax.shard_map(lambda x, i, w: jaxep.dispatch(comm8, x, i, w).x, mesh=mesh4,
                      in_specs=P("ep"), out_specs=P("ep"))
    args = [jax.ShapeDtypeStruct((4 * s.shape[0] // R,) + s.shape[1:], s.dtype)
            for s in (X, IDX, W)]
    with pytest.raises(ValueError, match=r"'ep' has size 4 here, but the Communicator was built "
                                         r"for R=8"):
        jax.eval_shape(f, *args)


def test_other_axis_name_bound():
    c = jaxep.Communicator(make_mesh(R), cfg(axis_name="ep"), backend="xla")
    f = jax.shard_map(lambda i: jaxep.dispatch_layout(c, i).tokens_per_rank,
                      mesh=make_mesh(R, axis="data"), in_specs=P("data"), out_specs=P("data"))
    with pytest.raises(ValueError, match=r"EP axis 'ep'"):
        jax.eval_shape(f, IDX)


def test_ep_axis_not_manual_in_shard_map():
    """A shard_map over a mesh that has the EP axis but leaves it out of ``axis_names`` (partial
    manual) says so (before: "no such axis is bound here")."""
    mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:4]).reshape(2, 2), ("ep", "dp"))
    c = jaxep.Communicator(mesh, cfg(), backend="xla")
    f = jax.shard_map(lambda i: jaxep.dispatch_layout(c, i).tokens_per_rank, mesh=mesh,
                      in_specs=P("dp"), out_specs=P("dp"), axis_names={"dp"})
    with pytest.raises(ValueError, match=r"inside jax.shard_map.*'ep'.*R=2\); the current mesh "
                                         r"has 'ep', but not as a manual axis here.*axis_names"):
        jax.eval_shape(f, IDX)


def test_closed_communicator():
    c = jaxep.Communicator(make_mesh(R), cfg(), backend="xla")
    c.close()
    c.close()   # idempotent
    with pytest.raises(ValueError, match="closed"):
        trace(c, lambda i: jaxep.dispatch_layout(c, i).tokens_per_rank, IDX)


def test_first_argument_not_communicator(comm):
    with pytest.raises(TypeError, match=r"must be a jaxep.Communicator, got EPConfig"):
        trace(comm, lambda i: jaxep.dispatch_layout(comm.cfg, i).tokens_per_rank, IDX)


# ------------------------------------------------------------------------------------------
# Communicator
# ------------------------------------------------------------------------------------------


def test_communicator_errors():
    mesh = make_mesh(4)
    with pytest.raises(ValueError, match=r"num_experts \(6\) must be divisible by the EP group "
                                         r"size R=4"):
        jaxep.Communicator(mesh, cfg(num_experts=6))
    with pytest.raises(TypeError, match=r"cfg must be a jaxep.EPConfig, got dict"):
        jaxep.Communicator(mesh, dict(num_experts=8))
    with pytest.raises(ValueError, match=r"axis \['tp'\] not in the mesh axes \('ep',\)"):
        jaxep.Communicator(mesh, cfg(axis_name="tp"))
    for bad in ("gpu", "XLA", "", "nccl"):
        with pytest.raises(ValueError, match=rf"backend must be one of .*got {bad!r}"):
            jaxep.Communicator(mesh, cfg(), backend=bad)
    with pytest.raises(ValueError, match=r"backend='cuda'"):
        jaxep.Communicator(mesh, cfg(), backend="cuda")   # CPU mesh (or no CUDA build)
    c = jaxep.Communicator(mesh, cfg(), backend="xla")
    with pytest.raises(ValueError, match=r"op must be one of .*got 'foo'"):
        c.implementation("foo")
    with pytest.raises(ValueError, match=r"rank must be in \[0, 4\), got -1"):
        c.local_expert_ids(-1)


def test_communicator_argument_types():
    """Wrong argument types are a TypeError saying what was expected (before: a list of devices
    or None as the mesh gave AttributeError; ``local_expert_ids(True)`` returned shape
    (1, R, E_l) and ``local_expert_ids(1.5)`` raised numpy's IndexError)."""
    for mesh, name in [(jax.devices(), "list"), (None, "NoneType"),
                       (np.array(jax.devices()), "ndarray")]:
        with pytest.raises(TypeError, match=rf"mesh must be a jax.sharding.Mesh, got {name}"):
            jaxep.Communicator(mesh, cfg())
    c = jaxep.Communicator(make_mesh(4), cfg(), backend="xla")
    for bad, name in [(True, "bool"), (1.5, "float"), ("1", "str"), (None, "NoneType"),
                      (np.float32(1), "float32")]:
        with pytest.raises(TypeError, match=rf"rank must be an int in \[0, 4\), got {name}"):
            c.local_expert_ids(bad)
    np.testing.assert_array_equal(c.local_expert_ids(np.int64(1)), [2, 3])


@pytest.mark.parametrize("table,match", [
    # E=8 over R=4 ranks: E_l = 2; rank 4 and slot 2 do not exist
    ([(r % 4, r // 4) for r in range(7)] + [(4, 1)], r"entry 7 = \(4, 1\) is outside .*R=4"),
    ([(r % 4, r // 4) for r in range(7)] + [(3, 2)], r"entry 7 = \(3, 2\) is outside .*E_l=2"),
])
def test_communicator_table_out_of_range(table, match):
    """The entry is printed as plain ints (before: ``(np.int64(4), np.int64(1))``)."""
    with pytest.raises(ValueError, match=match):
        jaxep.Communicator(make_mesh(4), cfg(placement=table), backend="xla")


# ------------------------------------------------------------------------------------------
# EPConfig
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["num_experts", "num_topk", "hidden", "max_tokens_per_rank"])
@pytest.mark.parametrize("value,exc,match", [
    ("8", TypeError, r"must be an int, got str '8'"),
    (8.0, TypeError, r"must be an int, got float 8.0"),
    (True, TypeError, r"must be an int, got bool True"),
    (None, TypeError, r"must be an int, got NoneType"),
    (0, ValueError, r"must be positive, got 0"),
    (-3, ValueError, r"must be positive, got -3"),
])
def test_epconfig_required_ints(field, value, exc, match):
    with pytest.raises(exc, match=rf"EPConfig.{field} {match}"):
        cfg(**{field: value})


@pytest.mark.parametrize("kw,exc,match", [
    (dict(num_topk=9), ValueError, r"num_topk \(9\) must be <= num_experts \(8\)"),
    (dict(axis_name=3), TypeError, r"axis_name must be a str or a tuple of str, got 3"),
    (dict(axis_name=()), TypeError, r"non-empty tuple of str, got \(\)"),
    (dict(axis_name=("a", 1)), TypeError, r"got \('a', 1\)"),
    (dict(placement="random"), ValueError,
     r"placement must be one of \('linear', 'round_robin'\).*got 'random'"),
    (dict(placement="Linear"), ValueError, r"got 'Linear'"),
    (dict(placement=[(0, 0)] * 3), ValueError, r"must have num_experts=8 entries, got 3"),
    (dict(placement=[(e % 2, 0) for e in range(8)]), ValueError,
     r"maps experts 0 and 2 to the same \(rank, slot\) \(0, 0\)"),
    (dict(placement=[(e % 4, e // 4) for e in range(7)] + [(-1, 1)]), ValueError,
     r"negative rank or slot: entry 7 is \(-1, 1\)"),
    # no silent truncation of floats (before: 0.9 became rank 0), nor bools or strings
    (dict(placement=[(0.9, 0)] + [(e % 4, e // 4) for e in range(1, 8)]), TypeError,
     r"\(rank, slot\) int pairs, but entry 0 is \(0.9, 0\)"),
    (dict(placement=[(e % 4, e // 4) for e in range(7)] + [(3, 1.0)]), TypeError,
     r"entry 7 is \(3, 1.0\)"),
    (dict(placement=np.array([(e % 4, e // 4) for e in range(8)], np.float32) + 0.5), TypeError,
     r"entry 0 is \(0.5, 0.5\)"),
    (dict(placement=[(True, 0)] + [(e % 4, e // 4) for e in range(1, 8)]), TypeError,
     r"entry 0 is \(True, 0\)"),
    (dict(placement=[("1", "0")] + [(e % 4, e // 4) for e in range(1, 8)]), TypeError,
     r"entry 0 is \('1', '0'\)"),
    (dict(placement=[(0, 0, 0)] * 8), TypeError, r"entry 0 is \(0, 0, 0\)"),
    (dict(placement=[1, 2, 3, 4, 5, 6, 7, 8]), TypeError, r"\(rank, slot\) int pairs"),
    (dict(placement=[("a", 0)] * 8), TypeError, r"\(rank, slot\) int pairs"),
    (dict(placement=np.zeros((8, 3), np.int32)), (TypeError, ValueError), r"placement"),
    (dict(placement=5), TypeError, r"placement"),
    (dict(recv_capacity=0), ValueError, r"recv_capacity must be positive, got 0"),
    (dict(recv_capacity=2.5), TypeError, r"recv_capacity must be an int, got float"),
    (dict(num_sms=-1), ValueError, r"num_sms must be positive, got -1"),
    (dict(num_sms="24"), TypeError, r"num_sms must be an int, got str"),
    (dict(timeout_s="1"), TypeError, r"timeout_s must be a number, got '1'"),
    (dict(timeout_s=True), TypeError, r"timeout_s must be a number, got True"),
    (dict(timeout_s=0), ValueError, r"timeout_s must be positive, got 0"),
    (dict(timeout_s=-1.5), ValueError, r"timeout_s must be positive, got -1.5"),
    (dict(timeout_s=float("nan")), ValueError, r"timeout_s must be positive, got nan"),
    # finite: the kernels take int64 nanoseconds (before: inf was accepted, then overflowed
    # np.int64(int(timeout_s * 1e9)) when a CUDA op was traced)
    (dict(timeout_s=float("inf")), ValueError,
     r"timeout_s must be finite, at most 1e\+09 s \(the kernels take it as int64 "
     r"nanoseconds\), got inf"),
    (dict(timeout_s=9.3e9), ValueError, r"timeout_s must be finite, at most 1e\+09 s"),
    (dict(failure_exit_s=float("inf")), ValueError,
     r"failure_exit_s must be None or finite, >= 0 and at most 1e\+09 s, got inf"),
    (dict(failure_exit_s=1e19), ValueError, r"failure_exit_s .* at most 1e\+09 s, got 1e\+19"),
    (dict(failure_exit_s=-1), ValueError, r"failure_exit_s .* >= 0 .*got -1"),
    (dict(failure_exit_s="1"), TypeError, r"failure_exit_s must be None or a number"),
])
def test_epconfig_validation(kw, exc, match):
    with pytest.raises(exc, match=match):
        cfg(**kw)


def test_epconfig_largest_waits_fit_their_uses():
    """The largest accepted ``timeout_s`` converts to the kernels' int64 nanoseconds as
    ``jaxep._cuda`` does, and the largest ``failure_exit_s`` is a valid ``time.sleep``."""
    from jaxep.config import MAX_WAIT_S

    c = cfg(timeout_s=MAX_WAIT_S, failure_exit_s=MAX_WAIT_S)
    assert np.int64(int(c.timeout_s * 1e9)) == 10 ** 18
    import threading
    import time
    errors = []

    def sleep():
        try:
            time.sleep(c.failure_exit_s)
        except (OverflowError, ValueError) as e:  # raised before sleeping when out of range
            errors.append(e)

    threading.Thread(target=sleep, daemon=True).start()
    time.sleep(0.2)
    assert not errors
    assert cfg(failure_exit_s=None).failure_exit_s is None
    assert cfg(failure_exit_s=0).failure_exit_s == 0


def test_epconfig_frozen_and_hashable():
    a = cfg(placement=[(e % 2, e // 2) for e in range(8)], axis_name=["ep"])
    b = cfg(placement=np.array([(e % 2, e // 2) for e in range(8)]), axis_name=("ep",))
    assert a == b and hash(a) == hash(b)
    assert a.axis_names == ("ep",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.num_experts = 16
    assert cfg(axis_name="ep").axis_names == ("ep",)


# ------------------------------------------------------------------------------------------
# fp8 helpers
# ------------------------------------------------------------------------------------------


def test_fp8_helper_errors():
    x = jnp.zeros((2, 128), F32)
    with pytest.raises(ValueError, match=r"ue8m0=True needs round_scale=True"):
        jaxep.quantize_fp8(x, ue8m0=True)
    with pytest.raises(ValueError, match=r"multiple of 128.*got 100"):
        jaxep.quantize_fp8(jnp.zeros((2, 100)))
    p, s = jaxep.quantize_fp8(x)
    with pytest.raises(TypeError, match=r"scales must be float32 or packed int32, got bfloat16"):
        jaxep.dequantize_fp8(p, s.astype(BF16))
    with pytest.raises(ValueError, match=r"H/128=1, got \(2, 2\)"):
        jaxep.dequantize_fp8(p, jnp.zeros((2, 2), F32))
    with pytest.raises(ValueError, match=r"multiple of 128.*got 64"):
        jaxep.dequantize_fp8(jnp.zeros((2, 64), F8), jnp.zeros((2, 1), F32))


def test_low_latency_flag_is_validated():
    with pytest.raises(TypeError, match=r"low_latency must be None, True or False"):
        jaxep.EPConfig(num_experts=8, num_topk=2, hidden=128, max_tokens_per_rank=4,
                       low_latency="yes")
    c = jaxep.EPConfig(num_experts=8, num_topk=2, hidden=128, max_tokens_per_rank=4,
                       low_latency=True)
    comm = jaxep.Communicator(make_mesh(2), c, backend="xla")
    assert comm.implementation("ll_dispatch") == "xla"  # flag only matters on the CUDA backend
    with pytest.raises(TypeError, match=r"ll_copy_engine must be True or False, got 1"):
        jaxep.EPConfig(num_experts=8, num_topk=2, hidden=128, max_tokens_per_rank=4,
                       ll_copy_engine=1)
