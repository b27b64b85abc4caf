"""The implementation registry (``jaxep._backends``) without GPUs: every public op has both
backends, called the same way, and the CUDA branch of every op (forward and VJP) traces to the
extension's targets (a CPU communicator whose ``implementation`` says ``"cuda"``: ``ffi_call``
needs only abstract evaluation to trace)."""

import inspect
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import jaxep
from jaxep import _backends, _cuda
from conftest import make_mesh

# op -> the parameters its public op passes (jaxep/normal.py, jaxep/low_latency.py)
CALLS = {
    "dispatch_layout": ["comm", "topk_idx"],
    "dispatch": ["comm", "x", "topk_idx", "topk_weights", "capacity"],
    "combine": ["comm", "y", "handle"],
    "ll_dispatch": ["comm", "x", "topk_idx", "*fp8", "*round_scale", "*ue8m0", "*zero_padding"],
    "ll_dispatch_send": ["comm", "x", "topk_idx", "*fp8", "*round_scale", "*ue8m0",
                         "*copy_engine"],
    "ll_dispatch_recv": ["comm", "pending", "*zero_padding"],
    "ll_combine": ["comm", "y", "topk_idx", "topk_weights", "handle", "*prereduce"],
    "ll_combine_send": ["comm", "y", "topk_idx", "topk_weights", "handle", "*prereduce"],
    "ll_combine_recv": ["comm", "pending"],
    "dispatch_grouped": ["comm", "x", "topk_idx", "topk_weights", "rows", "*zero_padding"],
    "combine_grouped": ["comm", "y", "handle", "*weighted"],
}
# ops without a CUDA kernel yet: only the pure-JAX implementation, whatever the backend
XLA_ONLY: set = set()  # ops without a CUDA implementation (none today)


def _params(fn):
    return [("*" if p.kind is p.KEYWORD_ONLY else "") + p.name
            for p in inspect.signature(fn).parameters.values()]


def test_registry_covers_every_op_on_both_backends():
    assert set(_backends.IMPLEMENTATIONS) == set(CALLS)
    for op, impls in _backends.IMPLEMENTATIONS.items():
        assert set(impls) == ({"xla"} if op in XLA_ONLY else {"cuda", "xla"}), op
        for backend, fn in impls.items():
            assert _params(fn) == CALLS[op], (op, backend, _params(fn))
        assert _backends.FAMILY[op] in jaxep.communicator.ALL_OPS


def test_rule():
    comm = jaxep.Communicator(make_mesh(2), jaxep.EPConfig(num_experts=4, num_topk=2, hidden=16,
                                                           max_tokens_per_rank=4), backend="xla")
    for op in CALLS:
        assert _backends.lookup(comm, op) is _backends.IMPLEMENTATIONS[op]["xla"]
    comm.implementation = lambda op: "xla" if op in XLA_ONLY else "cuda"
    for op in CALLS:
        want = "xla" if op in XLA_ONLY else "cuda"
        assert _backends.lookup(comm, op) is _backends.IMPLEMENTATIONS[op][want]

    class Pending:
        info = None
    # a receive follows its sender
    assert _backends.backend(comm, "ll_dispatch_recv", Pending()) == "xla"
    Pending.info = jnp.zeros((4,), jnp.int32)
    assert _backends.backend(comm, "ll_combine_recv", Pending()) == "cuda"


R, E, K, H, T = 2, 8, 4, 256, 4


def _trace(comm, f, *args):
    g = jax.shard_map(f, mesh=comm.mesh, in_specs=P("ep"), out_specs=P("ep"))
    return str(jax.make_jaxpr(g)(*args))


def _grad(f, n):
    def run(*args):
        out, vjp = jax.vjp(lambda *d: f(*d, *args[n:]), *args[:n])
        return vjp(jax.tree.map(jnp.ones_like, out))
    return run


@pytest.mark.skipif(not _cuda.available(), reason="extension built without CUDA")
def test_cuda_branch_traces_every_target():
    cfg = jaxep.EPConfig(num_experts=E, num_topk=K, hidden=H, max_tokens_per_rank=T,
                         ll_copy_engine=True)
    comm = jaxep.Communicator(make_mesh(R), cfg, backend="xla")
    comm.implementation = lambda op: "cuda"
    comm.comm_id = 1
    S = jax.ShapeDtypeStruct
    x, idx = S((R * T, H), jnp.bfloat16), S((R * T, K), jnp.int32)
    w, y = S((R * T, K), jnp.float32), S((E, R * T, H), jnp.bfloat16)
    texts = [_trace(comm, lambda i: jaxep.dispatch_layout(comm, i), idx)]

    def normal(x, w, i):
        d = jaxep.dispatch(comm, x, i, w)
        return jaxep.combine(comm, d.x, d.handle), d.topk_weights

    def normal_fp8(x, w, i):
        return jaxep.dispatch(comm, jaxep.quantize_fp8(x), i, w).topk_weights

    def grouped(x, w, i):
        g = jaxep.dispatch_grouped(comm, x, i, w)
        return jaxep.combine_grouped(comm, g.x * g.weights[:, None].astype(g.x.dtype), g.handle)

    texts += [_trace(comm, _grad(normal, 2), x, w, idx),
              _trace(comm, _grad(normal_fp8, 2), x, w, idx),
              _trace(comm, _grad(grouped, 2), x, w, idx)]
    for fp8, ue8m0 in ((False, False), (True, True)):
        kw = dict(fp8=fp8, round_scale=fp8, ue8m0=ue8m0)

        def lld(x, i, kw=kw):
            return jax.tree.leaves(jaxep.ll_dispatch(comm, x, i, **kw).x)[0]

        def lld2(x, i, kw=kw):
            p = jaxep.ll_dispatch_send(comm, x, i, copy_engine=True, **kw)
            q = jaxep.ll_dispatch_send(comm, x, i, **kw)
            return (jax.tree.leaves(jaxep.ll_dispatch_recv(comm, p).x)[0],
                    jax.tree.leaves(jaxep.ll_dispatch_recv(comm, q).x)[0])

        texts += [_trace(comm, _grad(lld, 1), x, idx), _trace(comm, _grad(lld2, 1), x, idx)]
    for pre in (False, True, "float32"):
        def llc(y, w, x, i, pre=pre):
            h = jaxep.ll_dispatch(comm, x, i).handle
            p = jaxep.ll_combine_send(comm, y, i, w, h, prereduce=pre)
            return jaxep.ll_combine(comm, y, i, w, h, prereduce=pre), jaxep.ll_combine_recv(comm, p)

        texts.append(_trace(comm, _grad(llc, 2), y, w, x, idx))
    used = set(re.findall(r"target_name=(jaxep_\w+_ffi)", "\n".join(texts)))
    assert used == set(_cuda._ext.registrations()), sorted(used ^ set(_cuda._ext.registrations()))
