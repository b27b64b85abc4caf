"""Gradients of every op against the oracle's analytic gradients (docs/design.md "Semantics contract" and the op docstrings),
finite differences (``jax.test_util.check_grads``) and, for dispatch / combine, plain autodiff
through the raw pure-JAX backend (the reference for the custom VJPs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxep
import oracle
from conftest import ep_call, make_mesh
from jaxep import _xla  # only as the autodiff reference of the custom VJPs

R = 4


def make_comm(**kw):
    cfg = dict(num_experts=16, num_topk=3, hidden=128, max_tokens_per_rank=8)
    cfg.update(kw)
    return jaxep.Communicator(make_mesh(R), jaxep.EPConfig(**cfg), backend="xla")


def per_rank(a):
    a = np.asarray(a)
    return a.reshape((R, -1) + a.shape[1:])


def routing(comm, seed, kind="duplicates", tokens=None):
    """A routing mixing duplicates, -1 and invalid ids."""
    rng = np.random.default_rng(seed)
    T = tokens or comm.cfg.max_tokens_per_rank
    idx, w = oracle.make_routing(kind, rng, R, T, comm.cfg.num_experts, comm.cfg.num_topk,
                                 comm.expert_rank)
    idx[1, -1] = -1
    idx[2, 0] = comm.cfg.num_experts          # invalid
    idx[3] = -1                               # a token sent nowhere
    return rng, idx, w


def total(comm, local_loss):
    """Global scalar: the sum over ranks of ``local_loss`` (shard_map'ed, grad taken outside)."""
    f = ep_call(comm, lambda *a: local_loss(*a)[None])
    return lambda *a: jnp.sum(f(*a))


def close(actual, expected, tol=1e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float32), expected, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------
# normal mode
# ------------------------------------------------------------------------------------------


def dispatch_case(capacity, seed):
    """Round-robin communicator with ``recv_capacity=capacity``, a routing (``routing``), float32
    ``x [R*T, H]`` and cotangents ``px [R*C, H]``, ``pw [R*C, K]`` of the received rows and
    weights: ``(comm, rng, idx, w, x, px, pw, C)``."""
    comm = make_comm(recv_capacity=capacity, placement="round_robin")
    rng, idx, w = routing(comm, seed)
    T, H, K = 8, 128, 3
    C = capacity or R * T
    x = rng.standard_normal((R * T, H)).astype(np.float32)
    px = rng.standard_normal((R * C, H)).astype(np.float32)
    pw = rng.standard_normal((R * C, K)).astype(np.float32)
    return comm, rng, idx, w, x, px, pw, C


def dispatch_loss(comm):
    def loss(x, idx, w, px, pw):
        d = jaxep.dispatch(comm, x, idx, w)
        return jnp.sum(d.x * px) + jnp.sum(d.topk_weights * pw)
    return loss


@pytest.mark.parametrize("capacity", [None, 10])
def test_dispatch_grad_vs_oracle(capacity):
    comm, rng, idx, w, x, px, pw, _ = dispatch_case(capacity, 1)
    T = comm.cfg.max_tokens_per_rank
    ref = oracle.dispatch(x, idx, w, comm.expert_rank, comm.expert_slot, R, capacity)
    exp_gx = np.concatenate(oracle.combine(list(per_rank(px)), [r["src_index"] for r in ref], T))
    exp_gw = oracle.dispatch_weight_grad(per_rank(pw), idx, comm.expert_rank, R,
                                         [r["send_slot"] for r in ref])
    if capacity:
        assert sum(r["num_dropped"] for r in ref) > 0

    # grad outside the shard_map
    gx, gw = jax.jit(jax.grad(total(comm, dispatch_loss(comm)), argnums=(0, 2)))(
        x, idx, w, px, pw)
    close(gx, exp_gx)
    close(gw, exp_gw)

    # grad inside the shard_map (of the local loss: the sum over ranks by SPMD transposition)
    inner = ep_call(comm, jax.grad(dispatch_loss(comm), argnums=(0, 2)))
    gx2, gw2 = inner(x, idx, w, px, pw)
    close(gx2, exp_gx)
    close(gw2, exp_gw)

    # finite differences
    f = ep_call(comm, lambda x, idx, w: (lambda d: (d.x, d.topk_weights))(
        jaxep.dispatch(comm, x, idx, w)))
    check_grads(lambda x, w: f(x, idx, w), (x, w), order=1, modes=["rev"], eps=1e-2,
                atol=1e-2, rtol=1e-2)


def test_combine_grad_vs_oracle():
    comm = make_comm(recv_capacity=12)
    rng, idx, w = routing(comm, 2, kind="invalid")
    T, H = 8, 128
    C = 12
    x = rng.standard_normal((R * T, H)).astype(np.float32)
    y = rng.standard_normal((R * C, H)).astype(np.float32)
    pout = rng.standard_normal((R * T, H)).astype(np.float32)
    ref = oracle.dispatch(x, idx, w, comm.expert_rank, comm.expert_slot, R, C)
    exp_gy = np.concatenate(oracle.dispatch_rows(pout, [r["src_index"] for r in ref]))

    def loss(x, idx, w, y, pout):
        d = jaxep.dispatch(comm, x, idx, w)
        return jnp.sum(jaxep.combine(comm, y, d.handle) * pout)

    gy = jax.jit(jax.grad(total(comm, loss), argnums=3))(x, idx, w, y, pout)
    close(gy, exp_gy)

    f = ep_call(comm, lambda x, idx, w, y: jaxep.combine(
        comm, y, jaxep.dispatch(comm, x, idx, w).handle))
    check_grads(lambda y: f(x, idx, w, y), (y,), order=1, modes=["rev"], eps=1e-2,
                atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("capacity", [None, 9])
def test_custom_vjps_match_autodiff_of_raw_backend(capacity):
    """dispatch/combine custom VJPs == jax.grad through _xla.dispatch / _xla.combine_rows."""
    comm, rng, idx, w, x, px, pw, C = dispatch_case(capacity, 3)
    y = rng.standard_normal((R * C, x.shape[1])).astype(np.float32)
    pout = rng.standard_normal(x.shape).astype(np.float32)

    def public(x, idx, w, y, px, pw, pout):
        d = jaxep.dispatch(comm, x, idx, w)
        out = jaxep.combine(comm, y, d.handle)
        return jnp.sum(d.x * px) + jnp.sum(d.topk_weights * pw) + jnp.sum(out * pout)

    def raw(x, idx, w, y, px, pw, pout):
        d = _xla.dispatch(comm, x, idx, w, C)
        out = _xla.combine_rows(comm, y, d["src_index"], d["send_slot"])
        return jnp.sum(d["x"] * px) + jnp.sum(d["topk_weights"] * pw) + jnp.sum(out * pout)

    args = (x, idx, w, y, px, pw, pout)
    g_pub = jax.jit(jax.grad(total(comm, public), argnums=(0, 2, 3)))(*args)
    g_raw = jax.jit(jax.grad(total(comm, raw), argnums=(0, 2, 3)))(*args)
    for a, b in zip(g_pub, g_raw):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_dispatch_fp8_input_gets_zero_grad():
    comm = make_comm()
    rng, idx, w = routing(comm, 4, kind="random")
    x = rng.standard_normal((R * 8, 128)).astype(np.float32)

    def loss(x, idx, w):
        d = jaxep.dispatch(comm, jaxep.quantize_fp8(x), idx, w)
        return jnp.sum(d.topk_weights) + jnp.sum(jaxep.dequantize_fp8(*d.x))

    gx, gw = jax.jit(jax.grad(total(comm, loss), argnums=(0, 2)))(x, idx, w)
    assert not np.any(np.asarray(gx))
    ref = oracle.dispatch(x, idx, w, comm.expert_rank, comm.expert_slot, R)
    exp_gw = oracle.dispatch_weight_grad([np.ones((R * 8, 3))] * R, idx, comm.expert_rank, R,
                                         [r["send_slot"] for r in ref])
    close(gw, exp_gw)


# ------------------------------------------------------------------------------------------
# low-latency mode
# ------------------------------------------------------------------------------------------

LL_T = 4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ll_dispatch_grad(dtype):
    comm = make_comm(max_tokens_per_rank=LL_T)
    rng, idx, w = routing(comm, 5)
    H, el = 128, comm.num_local_experts
    x = np.asarray(jnp.asarray(rng.standard_normal((R * LL_T, H)), dtype))
    p = rng.standard_normal((R * el, R * LL_T, H)).astype(np.float32)
    if dtype == jnp.bfloat16:
        p = np.asarray(jnp.asarray(p, jnp.bfloat16).astype(jnp.float32))
    ref = oracle.ll_dispatch(x, idx, comm.expert_rank, comm.expert_slot, R)
    exp = oracle.ll_dispatch_grad(list(per_rank(p)), [r["src_index"] for r in ref], R * LL_T)

    def loss(x, idx, p):
        d = jaxep.ll_dispatch(comm, x, idx)
        return jnp.sum(d.x.astype(jnp.float32) * p)

    gx = jax.jit(jax.grad(total(comm, loss)))(x, idx, p)
    assert gx.dtype == dtype
    close(gx, exp, tol=1e-5 if dtype == jnp.float32 else 3e-2)
    if dtype == jnp.float32:
        f = ep_call(comm, lambda x, idx: jaxep.ll_dispatch(comm, x, idx).x)
        check_grads(lambda x: f(x, idx), (x,), order=1, modes=["rev"], eps=1e-2,
                    atol=1e-2, rtol=1e-2)


def test_ll_dispatch_two_phase_grad_equals_one_phase():
    comm = make_comm(max_tokens_per_rank=LL_T)
    rng, idx, w = routing(comm, 6)
    x = rng.standard_normal((R * LL_T, 128)).astype(np.float32)
    p = rng.standard_normal((R * comm.num_local_experts, R * LL_T, 128)).astype(np.float32)

    def one(x, idx, p):
        return jnp.sum(jaxep.ll_dispatch(comm, x, idx).x * p)

    def two(x, idx, p):
        d = jaxep.ll_dispatch_recv(comm, jaxep.ll_dispatch_send(comm, x, idx))
        return jnp.sum(d.x * p)

    g1 = jax.jit(jax.grad(total(comm, one)))(x, idx, p)
    g2 = jax.jit(jax.grad(total(comm, two)))(x, idx, p)
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))


def test_ll_dispatch_fp8_grad_is_straight_through():
    """fp8 on the wire: grad of x = sum over copies of the upstream cotangent, up to the e4m3
    precision of the payload's cotangent (the cotangent of an e4m3 array is e4m3)."""
    comm = make_comm(max_tokens_per_rank=LL_T)
    rng, idx, w = routing(comm, 7)
    H, el = 128, comm.num_local_experts
    # magnitudes chosen so that cotangent * scale lies in e4m3's normal range
    x = (rng.standard_normal((R * LL_T, H)) * 100).astype(np.float32)
    p = (rng.standard_normal((R * el, R * LL_T, H)) * 10).astype(np.float32)
    ref = oracle.ll_dispatch(x, idx, comm.expert_rank, comm.expert_slot, R)
    exp = oracle.ll_dispatch_grad(list(per_rank(p)), [r["src_index"] for r in ref], R * LL_T)

    def loss(x, idx, p):
        d = jaxep.ll_dispatch(comm, x, idx, fp8=True)
        return jnp.sum(jaxep.dequantize_fp8(*d.x) * p)

    gx = np.asarray(jax.jit(jax.grad(total(comm, loss)))(x, idx, p), np.float64)
    assert np.linalg.norm(gx - exp) <= 0.1 * np.linalg.norm(exp)
    big = np.abs(exp) > 0.1 * np.abs(exp).max()
    assert big.sum() > 100
    assert np.all(np.sign(gx[big]) == np.sign(exp[big]))
    assert not np.any(gx[np.all(exp == 0, axis=1)])   # tokens sent nowhere: zero


@pytest.mark.parametrize("prereduce", [False, True, "float32"])
def test_ll_combine_grads(prereduce):
    comm = make_comm(max_tokens_per_rank=LL_T, placement="round_robin")
    rng, idx, w = routing(comm, 8)
    H, el = 128, comm.num_local_experts
    x = rng.standard_normal((R * LL_T, H)).astype(np.float32)
    y = rng.standard_normal((R * el, R * LL_T, H)).astype(np.float32)
    pout = rng.standard_normal((R * LL_T, H)).astype(np.float32)
    ref = oracle.ll_dispatch(x, idx, comm.expert_rank, comm.expert_slot, R)
    slots = [r["slot"] for r in ref]
    exp_gy, exp_gw = oracle.ll_combine_grads(pout, list(per_rank(y)), idx, w,
                                             comm.expert_rank, comm.expert_slot, slots)

    def loss(x, idx, w, y, pout):
        d = jaxep.ll_dispatch(comm, x, idx)
        return jnp.sum(jaxep.ll_combine(comm, y, idx, w, d.handle, prereduce=prereduce) * pout)

    gw, gy = jax.jit(jax.grad(total(comm, loss), argnums=(2, 3)))(x, idx, w, y, pout)
    close(gy, np.concatenate(exp_gy), tol=1e-4)
    close(gw, exp_gw, tol=1e-4)

    f = ep_call(comm, lambda x, idx, w, y: jaxep.ll_combine(
        comm, y, idx, w, jaxep.ll_dispatch(comm, x, idx).handle, prereduce=prereduce))
    check_grads(lambda w, y: f(x, idx, w, y), (w, y), order=1, modes=["rev"], eps=1e-2,
                atol=1e-2, rtol=1e-2)
