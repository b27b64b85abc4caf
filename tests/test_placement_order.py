"""Communicator.to_placement_order / from_placement_order (issue 20, item 2)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxep
from conftest import make_mesh

R, E, K, H = 4, 8, 2, 8


def table(seed=0):
    rng = np.random.default_rng(seed)
    cells = rng.permutation(E)
    return tuple((int(c) // (E // R), int(c) % (E // R)) for c in cells)


def make(placement):
    cfg = jaxep.EPConfig(num_experts=E, num_topk=K, hidden=H, max_tokens_per_rank=8,
                         placement=placement)
    return jaxep.Communicator(make_mesh(R), cfg, backend="xla")


@pytest.mark.parametrize("placement", ["linear", "round_robin", "table"])
def test_round_trip_and_rows(placement):
    comm = make(table() if placement == "table" else placement)
    tree = {"w": np.arange(E * 3, dtype=np.float32).reshape(E, 3),
            "scale": jnp.arange(E, dtype=jnp.int32)}
    out = comm.to_placement_order(tree)
    assert isinstance(out["w"], np.ndarray) and isinstance(out["scale"], jax.Array)
    for r in range(R):
        ids = comm.local_expert_ids(r)
        np.testing.assert_array_equal(out["scale"][r * (E // R):(r + 1) * (E // R)], ids)
    back = comm.from_placement_order(out)
    np.testing.assert_array_equal(back["w"], tree["w"])
    np.testing.assert_array_equal(back["scale"], tree["scale"])
    sharded = comm.to_placement_order(tree, sharded=True)
    assert sharded["w"].sharding.spec == P("ep")
    np.testing.assert_array_equal(sharded["w"], out["w"])


@pytest.mark.parametrize("placement", ["round_robin", "table"])
def test_permuted_weights_reproduce_dense_reference(placement):
    """The example's expert computation (grouped rows -> ragged_dot) with permuted weights
    equals a dense reference."""
    comm = make(table(1) if placement == "table" else placement)
    rng = np.random.default_rng(0)
    t = 8
    x = rng.standard_normal((R * t, H)).astype(np.float32)
    idx = np.stack([rng.choice(E, K, replace=False) for _ in range(R * t)]).astype(np.int32)
    w = rng.random((R * t, K)).astype(np.float32)
    w_in = rng.standard_normal((E, H, 2 * H)).astype(np.float32) / np.sqrt(H)
    w_out = rng.standard_normal((E, 2 * H, H)).astype(np.float32) / np.sqrt(2 * H)
    p = comm.to_placement_order({"w_in": w_in, "w_out": w_out}, sharded=True)

    def per_rank(p, x, idx, w):
        g = jaxep.dispatch_grouped(comm, x, idx, w)
        hid = jax.nn.gelu(jax.lax.ragged_dot(g.x, p["w_in"], g.group_sizes))
        y = jax.lax.ragged_dot(hid, p["w_out"], g.group_sizes)
        return jaxep.combine_grouped(comm, y, g.handle)

    out = jax.jit(jax.shard_map(per_rank, mesh=comm.mesh, in_specs=P("ep"),
                                out_specs=P("ep")))(p, x, idx, w)
    hid = jax.nn.gelu(jnp.einsum("th,tkhf->tkf", x, w_in[idx]))
    ref = jnp.einsum("tk,tkf,tkfh->th", w, hid, w_out[idx])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_leading_dim_not_e_is_an_error():
    comm = make("round_robin")
    with pytest.raises(ValueError, match=r"\['b'\] has shape \(3, 2\).*num_experts=8"):
        comm.to_placement_order({"a": np.zeros((E, 2)), "b": np.zeros((3, 2))})
    with pytest.raises(ValueError, match="from_placement_order"):
        comm.from_placement_order(np.zeros(()))
