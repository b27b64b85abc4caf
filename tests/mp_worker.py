"""One process of the multi-process test (started by ``tests/test_multiprocess.py``).

Usage: ``python tests/mp_worker.py PROCESS_ID NUM_PROCESSES PORT``, with
``JAX_PLATFORMS=cpu`` and ``XLA_FLAGS=--xla_force_host_platform_device_count=<local devices>``
set by the caller. Joins a ``jax.distributed`` job on localhost, builds one global mesh over the
devices of every process, runs ``dispatch -> rows * 2 -> combine`` (and a weighted variant) in a
jitted ``shard_map`` together with its gradient, and checks this process's shards against NumPy.
Exits 0 on success; prints the mismatch and exits 1 otherwise.
"""

import os
import sys
import traceback

import numpy as np

E, K, H, T = 16, 4, 32, 8  # experts, top-k, hidden, tokens per rank
SEED = 1234


def global_inputs(num_ranks):
    """Deterministic global inputs, identical in every process; exact in float32."""
    rng = np.random.default_rng(SEED)
    n = num_ranks * T
    x = rng.integers(-8, 9, size=(n, H)).astype(np.float32)
    idx = rng.integers(-1, E, size=(n, K)).astype(np.int32)  # -1 = none; duplicates allowed
    idx[0] = -1                                              # a token sent nowhere
    w = (rng.integers(1, 9, size=(n, K)) / 8).astype(np.float32)
    g1 = rng.integers(-4, 5, size=(n, H)).astype(np.float32)  # output cotangents
    g2 = rng.integers(-4, 5, size=(n, H)).astype(np.float32)
    return x, idx, w, g1, g2


def expected(comm, x, idx, w, g1, g2):
    """NumPy reference of the outputs and gradients (see ``run``)."""
    valid = idx >= 0
    dest = np.where(valid, comm.expert_rank[np.maximum(idx, 0)], -1)
    ndest = np.array([len(set(d[d >= 0].tolist())) for d in dest], np.float32)
    wsum = np.sum(np.where(valid, w, 0), axis=1)
    out1 = 2 * x * ndest[:, None]
    out2 = x * wsum[:, None]
    gx = 2 * ndest[:, None] * g1 + wsum[:, None] * g2
    gw = np.where(valid, np.sum(x * g2, axis=1, keepdims=True), 0).astype(np.float32)
    # valid rows received by each rank: tokens with at least one expert there
    recv = np.array([np.sum(np.any(dest == r, axis=1)) for r in range(comm.num_ranks)], np.int32)
    return dict(out1=out1, out2=out2, gx=gx, gw=gw, num_tokens=recv)


def run(process_id, num_processes, port):
    import jax

    try:  # the CPU cross-process collectives (already the default in recent jax)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError) as e:
        print(f"[worker {process_id}] note: could not select gloo collectives: {e}", flush=True)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=60)
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jaxep

    devices = jax.devices()
    assert jax.process_count() == num_processes, jax.process_count()
    mesh = Mesh(np.array(devices), ("ep",))
    r = mesh.shape["ep"]
    cfg = jaxep.EPConfig(num_experts=E, num_topk=K, hidden=H, max_tokens_per_rank=T)
    comm = jaxep.Communicator(mesh, cfg, backend="xla")

    host = global_inputs(r)
    ref = expected(comm, *host)
    sharding = NamedSharding(mesh, P("ep"))
    x, idx, w, g1, g2 = (jax.make_array_from_callback(a.shape, sharding, lambda i, a=a: a[i])
                         for a in host)

    def per_rank(x, idx, w):
        d = jaxep.dispatch(comm, x, idx, w)
        out1 = jaxep.combine(comm, d.x * 2, d.handle)
        out2 = jaxep.combine(comm, d.x * jnp.sum(d.topk_weights, axis=1, keepdims=True),
                             d.handle)
        return out1, out2, d.num_tokens[None]

    fwd = jax.shard_map(per_rank, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))

    def loss(x, w, idx, g1, g2):
        out1, out2, _ = fwd(x, idx, w)
        return jnp.sum(out1 * g1) + jnp.sum(out2 * g2)

    out1, out2, num_tokens = jax.jit(fwd)(x, idx, w)
    gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w, idx, g1, g2)

    failures = []
    for name, arr in dict(out1=out1, out2=out2, gx=gx, gw=gw, num_tokens=num_tokens).items():
        for shard in arr.addressable_shards:
            got = np.asarray(shard.data)
            want = ref[name][shard.index]
            if got.shape != want.shape or not np.array_equal(got, want):
                bad = np.argwhere(got != want) if got.shape == want.shape else "shape"
                failures.append(f"{name} on {shard.device} (rows {shard.index[0]}): "
                                f"got shape {got.shape}, want {want.shape}; first bad {bad[:3]}\n"
                                f"  got  {got.ravel()[:8]}\n  want {want.ravel()[:8]}")
    jax.distributed.shutdown()
    return failures


def main():
    process_id, num_processes, port = (int(a) for a in sys.argv[1:4])
    try:
        failures = run(process_id, num_processes, port)
    except Exception:
        traceback.print_exc()
        print(f"[worker {process_id}] FAILED with an exception", flush=True)
        return 2
    if failures:
        print(f"[worker {process_id}] MISMATCH:\n" + "\n".join(failures), flush=True)
        return 1
    print(f"[worker {process_id}] OK (pid {os.getpid()})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
