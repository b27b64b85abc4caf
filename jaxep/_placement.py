"""Stacked expert weights in placement order (issue 20, item 2): see
:meth:`jaxep.Communicator.to_placement_order`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def permute(comm, tree, order, sharded: bool, what: str):
    """Every leaf of ``tree`` (leading dim E) taken along ``order`` on its leading dim; with
    ``sharded`` placed (or constrained, under tracing) as ``P(EP axes)`` on ``comm.mesh``."""
    e = comm.cfg.num_experts
    axes = comm.cfg.axis_names
    spec = P(axes[0] if len(axes) == 1 else tuple(axes))

    def one(path, leaf):
        shape = getattr(leaf, "shape", None)
        if shape is None or len(shape) == 0 or shape[0] != e:
            raise ValueError(f"Communicator.{what}: leaf {jax.tree_util.keystr(path) or '(root)'}"
                             f" has shape {None if shape is None else tuple(shape)}; every leaf "
                             f"needs a leading dim of num_experts={e}")
        if isinstance(leaf, np.ndarray):
            out = np.take(leaf, order, axis=0)
        else:
            out = jnp.take(leaf, jnp.asarray(order), axis=0)
        if not sharded:
            return out
        sharding = NamedSharding(comm.mesh, spec)
        if isinstance(out, jax.core.Tracer):
            return jax.lax.with_sharding_constraint(out, sharding)
        return jax.device_put(out, sharding)

    return jax.tree_util.tree_map_with_path(one, tree)


def forward_order(comm) -> np.ndarray:
    """Row ``r * E_l + s`` of the placement order holds global expert ``order[...]``."""
    return comm.global_expert.reshape(-1)


def inverse_order(comm) -> np.ndarray:
    return np.argsort(forward_order(comm)).astype(np.int32)
