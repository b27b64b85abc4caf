"""A DeepSeek-style MoE block through jaxep, checked against a dense single-device computation.

The block (as in DeepSeek-V3):

- Router: sigmoid scores ``s = sigmoid(x @ W_r)`` [T, E]. A learned bias ``b`` [E] is added for
  expert *selection* only: with ``s + b``, each of the G groups of E/G experts scores the sum of
  its top-2 experts, the top ``topk_groups`` groups are kept, and the top-K experts within them
  are chosen. The routing weights are the *unbiased* scores of the chosen experts, normalised to
  sum 1 and times ``routed_scale``.
- Routed experts: SwiGLU MLPs (``silu(x W_gate) * (x W_up)) W_down``).
- A shared expert: a dense SwiGLU MLP every token goes through, added to the routed output.

Prefill (normal mode): ``jaxep.dispatch_grouped`` lands each (token, expert) row in its local
expert's group, ``jax.lax.ragged_dot`` runs gate/up and down, ``jaxep.combine_grouped`` sums the
weighted rows back. Decode (low-latency mode): ``jaxep.ll_dispatch`` gives expert-major rows
``[E_l, R*T, H]``, each local expert's weights are applied to its block with a batched matmul
(einsum over E_l), and ``jaxep.ll_combine`` applies the routing weights. Expert weights are
stacked in global expert order and placed with ``comm.to_placement_order``.

Both paths are compared with a dense computation of the same block on one device (plain jnp, no
jaxep: every token times each of its selected experts), and so are the gradients of a scalar
loss w.r.t. x, the router weights, the expert weights and the shared expert's weights (the
jaxep-side loss is summed over the EP axis inside the shard_map, so ``jax.grad`` outside it is
right for sharded and replicated weights alike).

    python examples/deepseek_moe.py                       # 8 virtual CPU devices
    python examples/deepseek_moe.py --experts 32 --groups 8 --topk-groups 3 --topk 6 \\
        --placement round_robin
    python examples/deepseek_moe.py --backend cuda        # every GPU of this host

Prints the max relative error (max |ours - dense| / max |dense|) of each output and gradient,
and exits non-zero if any exceeds ``--tol``.
"""

import argparse
import math
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=None,
                   help="EP group size (default: 8 virtual devices on CPU, every GPU otherwise)")
    p.add_argument("--platform", default=None, help="cpu, gpu, ... (default: jax's default)")
    p.add_argument("--backend", default="auto", choices=["auto", "xla", "cuda"])
    p.add_argument("--experts", type=int, default=16, help="routed experts E")
    p.add_argument("--groups", type=int, default=4, help="expert groups G (E %% G == 0)")
    p.add_argument("--topk-groups", type=int, default=2, help="groups kept per token")
    p.add_argument("--topk", type=int, default=4, help="experts per token K")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--ffn", type=int, default=32, help="routed expert intermediate size")
    p.add_argument("--shared-ffn", type=int, default=64, help="shared expert intermediate size")
    p.add_argument("--routed-scale", type=float, default=2.5, help="routed scaling factor")
    p.add_argument("--tokens-per-rank", type=int, default=32, help="prefill tokens per rank")
    p.add_argument("--decode-tokens-per-rank", type=int, default=4)
    p.add_argument("--placement", default="linear", choices=["linear", "round_robin"])
    p.add_argument("--tol", type=float, default=1e-5, help="max relative error allowed")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()
    # Virtual CPU devices must be requested before jax is imported; the flag only affects the
    # CPU platform, so it is harmless where jax picks GPUs.
    flags = os.environ.get("XLA_FLAGS", "")
    if ARGS.platform in (None, "cpu") and "xla_force_host_platform_device_count" not in flags:
        count = f"--xla_force_host_platform_device_count={ARGS.devices or 8}"
        os.environ["XLA_FLAGS"] = f"{flags} {count}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jaxep  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # f32 matmuls on GPUs too

EXPERT_KEYS = ("w_gate", "w_up", "w_down")


# ----------------------------------------------------------------------------------- the block
def route(p, x, args):
    """DeepSeek routing of ``x [T, H]``: (topk_idx [T, K] int32, topk_weights [T, K])."""
    t, e, g = x.shape[0], args.experts, args.groups
    scores = jax.nn.sigmoid(x @ p["router"])                               # [T, E]
    biased = jax.lax.stop_gradient(scores) + p["bias"]                     # selection only
    group_score = jax.lax.top_k(biased.reshape(t, g, e // g), 2)[0].sum(-1)  # [T, G]
    _, groups = jax.lax.top_k(group_score, args.topk_groups)               # [T, topk_groups]
    keep = jnp.zeros((t, g), bool).at[jnp.arange(t)[:, None], groups].set(True)
    keep = jnp.repeat(keep, e // g, axis=1)                                # [T, E]
    _, idx = jax.lax.top_k(jnp.where(keep, biased, -jnp.inf), args.topk)   # [T, K]
    w = jnp.take_along_axis(scores, idx, axis=1)                           # unbiased scores
    w = w / jnp.sum(w, axis=-1, keepdims=True) * args.routed_scale
    return idx.astype(jnp.int32), w


def swiglu(x, w_gate, w_up, w_down):
    return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


def shared_expert(p, x):
    return swiglu(x, p["s_gate"], p["s_up"], p["s_down"])


def block_prefill(comm, p, x, args):
    """Per rank, inside shard_map: x [T, H] -> [T, H] (normal mode, grouped)."""
    idx, w = route(p, x, args)
    g = jaxep.dispatch_grouped(comm, x, idx, w)            # g.x [M, H] grouped by local expert
    gs = g.group_sizes
    h = jax.nn.silu(jax.lax.ragged_dot(g.x, p["w_gate"], gs)) * jax.lax.ragged_dot(
        g.x, p["w_up"], gs)
    y = jax.lax.ragged_dot(h, p["w_down"], gs)             # rows past sum(gs): 0
    return shared_expert(p, x) + jaxep.combine_grouped(comm, y, g.handle)  # weighted


def block_decode(comm, p, x, args):
    """Per rank, inside shard_map: x [T, H] -> [T, H] (low-latency mode)."""
    idx, w = route(p, x, args)
    ld = jaxep.ll_dispatch(comm, x, idx)                   # ld.x [E_l, R*T, H], expert-major
    h = jax.nn.silu(jnp.einsum("erh,ehf->erf", ld.x, p["w_gate"])) * jnp.einsum(
        "erh,ehf->erf", ld.x, p["w_up"])
    y = jnp.einsum("erf,efh->erh", h, p["w_down"])         # padding rows are ignored
    return shared_expert(p, x) + jaxep.ll_combine(comm, y, idx, w, ld.handle)


def block_dense(p, x, args):
    """The same block on one device, plain jnp (expert weights in global expert order):
    every token through each of its selected experts, weighted and summed."""
    idx, w = route(p, x, args)
    out = shared_expert(p, x)
    for k in range(args.topk):
        e = idx[:, k]
        gate = jnp.einsum("th,thf->tf", x, p["w_gate"][e])
        up = jnp.einsum("th,thf->tf", x, p["w_up"][e])
        y = jnp.einsum("tf,tfh->th", jax.nn.silu(gate) * up, p["w_down"][e])
        out = out + w[:, k:k + 1] * y
    return out


# ----------------------------------------------------------------------------------- the check
def init_params(key, args):
    """Parameters with expert weights [E, ...] in global expert order."""
    h, e, f, fs = args.hidden, args.experts, args.ffn, args.shared_ffn
    ks = jax.random.split(key, 8)
    normal = lambda k, shape, fan_in: jax.random.normal(k, shape) / math.sqrt(fan_in)  # noqa
    return {
        "router": normal(ks[0], (h, e), h),
        "bias": 0.1 * jax.random.normal(ks[1], (e,)),
        "w_gate": normal(ks[2], (e, h, f), h),
        "w_up": normal(ks[3], (e, h, f), h),
        "w_down": normal(ks[4], (e, f, h), f),
        "s_gate": normal(ks[5], (h, fs), h),
        "s_up": normal(ks[6], (h, fs), h),
        "s_down": normal(ks[7], (fs, h), fs),
    }


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def main(args):
    if args.experts % args.groups:
        sys.exit(f"--experts ({args.experts}) must be a multiple of --groups ({args.groups})")
    if not (1 <= args.topk_groups <= args.groups):
        sys.exit("--topk-groups must be in [1, --groups]")
    if args.topk > args.topk_groups * (args.experts // args.groups):
        sys.exit("--topk exceeds the experts of the kept groups")
    if args.experts // args.groups < 2:
        sys.exit("each group needs at least 2 experts (group score: sum of its top 2)")
    platform = args.platform or jax.default_backend()
    devices = jax.devices(platform)
    n = args.devices or (8 if platform == "cpu" else len(devices))
    if n > len(devices):
        sys.exit(f"asked for {n} devices, {platform} has {len(devices)}")
    mesh = Mesh(np.array(devices[:n]), ("ep",))
    max_tokens = max(args.tokens_per_rank, args.decode_tokens_per_rank)
    cfg = jaxep.EPConfig(num_experts=args.experts, num_topk=args.topk, hidden=args.hidden,
                         max_tokens_per_rank=max_tokens, placement=args.placement)
    comm = jaxep.Communicator(mesh, cfg, backend=args.backend)
    print(f"{comm} on {n} {platform} devices: E={args.experts} in G={args.groups} groups, "
          f"top-{args.topk_groups} groups, K={args.topk}, H={args.hidden}, "
          f"{comm.num_local_experts} experts per rank")

    k_p, k_x, k_d, k_c = jax.random.split(jax.random.key(args.seed), 4)
    params = init_params(k_p, args)                                   # global expert order
    x = jax.random.normal(k_x, (n * args.tokens_per_rank, args.hidden))
    x_dec = jax.random.normal(k_d, (n * args.decode_tokens_per_rank, args.hidden))
    cot = jax.random.normal(k_c, x.shape)                             # loss = sum(out * cot)

    # The jaxep side: expert weights in (rank, slot) order, split over "ep"; the rest replicated.
    placed = dict(params, **comm.to_placement_order({k: params[k] for k in EXPERT_KEYS}))
    specs = {k: P("ep") if k in EXPERT_KEYS else P() for k in params}
    placed = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in placed.items()}
    tok = NamedSharding(mesh, P("ep"))
    x_s, x_dec_s, cot_s = (jax.device_put(a, tok) for a in (x, x_dec, cot))

    def ep(fn, out_specs=P("ep")):
        return jax.shard_map(fn, mesh=mesh, in_specs=(specs, P("ep"), P("ep")),
                             out_specs=out_specs)

    prefill = jax.jit(ep(lambda p, x, c: block_prefill(comm, p, x, args)))
    decode = jax.jit(ep(lambda p, x, c: block_decode(comm, p, x, args)))

    def per_rank_loss(p, x, c):
        return jax.lax.psum(jnp.sum(block_prefill(comm, p, x, args) * c), "ep")

    ep_loss = ep(per_rank_loss, out_specs=P())
    ep_grads = jax.jit(jax.grad(ep_loss, argnums=(0, 1)))

    dense = jax.jit(lambda p, x: block_dense(p, x, args))
    dense_grads = jax.jit(jax.grad(lambda p, x, c: jnp.sum(block_dense(p, x, args) * c),
                                   argnums=(0, 1)))

    errs = {
        "prefill output": rel_err(prefill(placed, x_s, cot_s), dense(params, x)),
        "decode output": rel_err(decode(placed, x_dec_s, x_dec_s), dense(params, x_dec)),
    }
    (gp, gx), (gp_ref, gx_ref) = ep_grads(placed, x_s, cot_s), dense_grads(params, x, cot)
    gp = dict(gp, **comm.from_placement_order({k: gp[k] for k in EXPERT_KEYS}))
    errs["grad x"] = rel_err(gx, gx_ref)
    for k in ("router", *EXPERT_KEYS, "s_gate", "s_up", "s_down"):
        errs[f"grad {k}"] = rel_err(gp[k], gp_ref[k])

    width = max(map(len, errs))
    for name, err in errs.items():
        print(f"  {name:<{width}}  max rel err {err:.3e}")
    worst = max(errs, key=errs.get)
    if not errs[worst] <= args.tol:
        print(f"FAILED: {worst} max rel err {errs[worst]:.3e} > tol {args.tol:g}")
        return 1
    print(f"all within tol {args.tol:g} (worst: {worst}, {errs[worst]:.3e})")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
