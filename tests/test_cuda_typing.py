"""Typing of the CUDA ops inside shard_map, checked on CPU with ``jax.eval_shape`` (abstract
evaluation only: nothing is lowered, so no GPU is needed).

ffi_call outputs carry no varying manual axes; ``jaxep._cuda._ffi`` must type them as varying
over the EP axes *and* every axis its inputs vary over (e.g. a data-parallel axis), or
``out_specs`` would silently keep one shard and gradients would lose their psum.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from jaxep import _cuda


def _layout_types(idx, axes):
    r, e = 4, 16
    out = (jax.ShapeDtypeStruct((r,), jnp.int32), jax.ShapeDtypeStruct((e,), jnp.int32),
           jax.ShapeDtypeStruct((idx.shape[0], r), jnp.bool_))
    return _cuda._ffi("jaxep_dispatch_layout_ffi", out, (idx, jnp.zeros((e,), jnp.int32)),
                      axes, num_ranks=np.int32(r), num_experts=np.int32(e))


def test_outputs_vary_over_ep_and_input_axes():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "ep"))
    seen = {}

    def f(idx):
        outs = _layout_types(idx, ("ep",))
        seen["in"] = _cuda._varying_axes(idx)
        seen["out"] = [_cuda._varying_axes(o) for o in outs]
        return outs[2]

    spec = P(("dp", "ep"))
    jax.eval_shape(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec),
                   jax.ShapeDtypeStruct((8 * 16, 2), jnp.int32))
    assert seen["in"] == {"dp", "ep"}
    assert all(v == {"dp", "ep"} for v in seen["out"]), seen


def test_outputs_vary_over_ep_even_for_replicated_inputs():
    mesh = Mesh(np.array(jax.devices()[:4]), ("ep",))
    seen = {}

    def f(idx):
        outs = _layout_types(idx, ("ep",))
        seen["out"] = [_cuda._varying_axes(o) for o in outs]
        return outs[0]

    jax.eval_shape(jax.shard_map(f, mesh=mesh, in_specs=P(), out_specs=P("ep")),
                   jax.ShapeDtypeStruct((16, 2), jnp.int32))
    assert all(v == {"ep"} for v in seen["out"]), seen


def test_invariant_output_spec_is_rejected():
    """A per-rank result cannot be returned as replicated (out_specs=P())."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("ep",))
    with pytest.raises(Exception, match="(?i)vary|replicat|invariant"):
        jax.eval_shape(jax.shard_map(lambda idx: _layout_types(idx, ("ep",))[0], mesh=mesh,
                                     in_specs=P("ep"), out_specs=P()),
                       jax.ShapeDtypeStruct((64, 2), jnp.int32))


def test_plain_call_outside_shard_map():
    idx = jax.ShapeDtypeStruct((16, 2), jnp.int32)
    outs = jax.eval_shape(lambda i: _layout_types(i, ("ep",)), idx)
    assert [o.shape for o in outs] == [(4,), (16,), (16, 4)]
