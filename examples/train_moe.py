"""Train a small MoE transformer block with expert parallelism through jaxep.

The task is next-token prediction on sequences drawn from a fixed random second-order Markov
chain (each pair of consecutive tokens has a few possible successors), so the best reachable
loss is known: the chain's entropy. The model is one pre-norm block -- RMSNorm -> causal
token-mixing -> RMSNorm -> MoE FFN -- between an embedding and an unembedding. Predicting from
two tokens needs both: the mixing brings the previous token in, and the experts (the only
nonlinearity) map the pair to its successors.

In the MoE FFN a router picks the top-k experts of each token, ``jaxep.dispatch_grouped`` sends
the token to the ranks holding them, where it lands once per selected local expert in that
expert's group of rows, each rank runs its own experts on those groups with
``jax.lax.ragged_dot``, and ``jaxep.combine_grouped`` brings the outputs back, weighted by the
routing weights (whose gradient reaches the router).

Everything runs in one ``jax.shard_map`` over a mesh axis "ep": tokens are split over it (data
parallel), expert weights are split over it (expert parallel, E/R experts per rank), the dense
weights are replicated. The loss is averaged over ranks inside the shard_map, so ``jax.grad``
taken outside it gives the right gradients for replicated and sharded weights alike.

    python examples/train_moe.py                      # 8 virtual CPU devices, ~1 minute
    python examples/train_moe.py --placement round_robin --experts 32 --topk 4
    python examples/train_moe.py --backend cuda       # every GPU of this host, one process

One process per GPU (how JAX runs on clusters; jaxep then moves data through NVSHMEM):

    srun --ntasks-per-node=8 --gpus-per-task=1 python examples/train_moe.py --distributed
    mpirun -np 8 python examples/train_moe.py --distributed     # (OpenMPI)
    for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i python examples/train_moe.py \
        --coordinator 127.0.0.1:12345 --num-processes 4 --process-id $i & done; wait

``--distributed`` calls ``jax.distributed.initialize()``, which reads SLURM's or OpenMPI's
environment; the three explicit flags serve a plain launcher.

Exits non-zero if the loss did not fall clearly, so it doubles as a smoke test.
"""

import argparse
import math
import os
import sys
import time

from distributed_args import add_distributed_args, init_distributed, wants_distributed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--devices", type=int, default=None,
                   help="EP group size (default: 8 virtual devices on CPU, every GPU otherwise)")
    p.add_argument("--platform", default=None, help="cpu, gpu, ... (default: jax's default)")
    p.add_argument("--backend", default="auto", choices=["auto", "xla", "cuda"])
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--tokens-per-rank", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32)
    p.add_argument("--placement", default="linear", choices=["linear", "round_robin"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the rows sent through dispatch/combine")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--aux-weight", type=float, default=1e-2, help="load-balancing loss weight")
    p.add_argument("--seed", type=int, default=0)
    add_distributed_args(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()
    # Virtual CPU devices must be requested before jax is imported; the flag only affects the
    # CPU platform, so it is harmless where jax picks GPUs.
    flags = os.environ.get("XLA_FLAGS", "")
    multi = wants_distributed(ARGS)
    if (ARGS.platform in (None, "cpu") and not multi
            and "xla_force_host_platform_device_count" not in flags):
        count = f"--xla_force_host_platform_device_count={ARGS.devices or 8}"
        os.environ["XLA_FLAGS"] = f"{flags} {count}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402
from tqdm import tqdm  # noqa: E402

import jaxep  # noqa: E402


def markov_chain(vocab, successors, seed):
    """A second-order Markov chain: log P(next | prev, cur) as [V, V, V], where each pair
    (prev, cur) has `successors` possible next tokens, and the entropy of each pair [V, V]."""
    rng = np.random.default_rng(seed)
    probs = np.zeros((vocab * vocab, vocab))
    for row in probs:
        row[rng.choice(vocab, successors, replace=False)] = rng.dirichlet(np.ones(successors))
    entropy = -np.sum(probs * np.log(np.where(probs > 0, probs, 1)), axis=1)
    with np.errstate(divide="ignore"):
        log_probs = np.log(probs).reshape(vocab, vocab, vocab)
    return jnp.asarray(log_probs, jnp.float32), jnp.asarray(entropy.reshape(vocab, vocab))


def sample_sequences(key, log_probs, batch, length):
    """[batch, length] token ids: two uniform random tokens, then walks of the chain."""
    k0, key = jax.random.split(key)
    first = jax.random.randint(k0, (2, batch), 0, log_probs.shape[0])

    def step(pair, k):
        nxt = jax.random.categorical(k, log_probs[pair[0], pair[1]])
        return (pair[1], nxt), nxt

    _, rest = jax.lax.scan(step, (first[0], first[1]), jax.random.split(key, length - 2))
    return jnp.concatenate([first.T, rest.T], axis=1)


def rms_norm(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def init_params(key, comm, args):
    """Dense weights (replicated) and expert weights [E, ...] in the communicator's rank-major
    (rank, local slot) order, so row r * E_l + s holds expert ``comm.local_expert_ids(r)[s]``."""
    v, h, e, f = args.vocab, args.hidden, args.experts, 2 * args.hidden
    ks = jax.random.split(key, 5)
    normal = lambda k, shape, fan_in: jax.random.normal(k, shape) / math.sqrt(fan_in)  # noqa
    # Expert weights indexed by global expert id, put in (rank, slot) order.
    expert_w = comm.to_placement_order({"w_in": normal(ks[2], (e, h, f), h),
                                       "w_out": normal(ks[3], (e, f, h), f)})
    return {
        "embed": jax.random.normal(ks[0], (v, h)),
        "mix": jnp.zeros((args.seq_len, args.seq_len)),  # causal token mixing, starts off
        "norm1": jnp.ones((h,)), "norm2": jnp.ones((h,)), "norm_f": jnp.ones((h,)),
        "router": normal(ks[1], (h, e), h),
        **expert_w,
        "unembed": normal(ks[4], (h, v), h),
    }


def param_specs(params):
    return {k: P("ep") if k in ("w_in", "w_out") else P() for k in params}


def moe_ffn(comm, p, x, dtype):
    """Top-k routed expert MLP of local tokens ``x [T, H]``: (output [T, H], aux loss)."""
    probs = jax.nn.softmax(x @ p["router"], axis=-1)
    weights, idx = jax.lax.top_k(probs, comm.cfg.num_topk)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    # Rows arrive grouped by local expert, one per (token, expert): no sort, no gather here.
    g = jaxep.dispatch_grouped(comm, x.astype(dtype), idx, weights)
    hid = jax.nn.gelu(jax.lax.ragged_dot(g.x.astype(p["w_in"].dtype), p["w_in"], g.group_sizes))
    y = jax.lax.ragged_dot(hid, p["w_out"], g.group_sizes)  # rows past sum(group_sizes): 0
    out = jaxep.combine_grouped(comm, y.astype(dtype), g.handle).astype(x.dtype)  # weighted
    # Switch-style load balancing over the global batch: share of assignments per expert times
    # its mean router probability (E * sum = 1 when balanced).
    share = jnp.mean(jnp.sum(jax.nn.one_hot(idx, probs.shape[-1]), axis=1), axis=0)
    share, mean_prob = jax.lax.pmean((share / comm.cfg.num_topk, jnp.mean(probs, axis=0)), "ep")
    aux = probs.shape[-1] * jnp.sum(share * mean_prob)
    return out, aux


def make_loss(comm, args, entropy, specs):
    """loss(params, tokens [B, S + 1]) -> (loss, [cross-entropy, aux, entropy floor]), global
    arrays in and out; the per-rank work runs in a shard_map."""
    dtype = jnp.dtype(args.dtype)

    def per_rank(p, tokens):  # tokens: this rank's [B_l, S + 1]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        h = p["embed"][inputs]                                         # [B_l, S, H]
        mix = jnp.tril(p["mix"])                                       # position s sees <= s
        h = h + jnp.einsum("st,btd->bsd", mix, rms_norm(h, p["norm1"]))
        moe, aux = moe_ffn(comm, p, rms_norm(h, p["norm2"]).reshape(-1, h.shape[-1]), dtype)
        h = h + moe.reshape(h.shape)
        logits = rms_norm(h, p["norm_f"]) @ p["unembed"]
        # Score positions 1.. (position 0 has no previous token to condition on).
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, 1:], targets[:, 1:])
        floor = entropy[inputs[:, :-1], inputs[:, 1:]]  # the chain's own entropy there
        ce, floor = jnp.mean(ce), jnp.mean(floor)
        metrics = jax.lax.pmean(jnp.stack([ce, aux, floor]), "ep")
        return metrics[0] + args.aux_weight * metrics[1], metrics

    return jax.shard_map(per_rank, mesh=comm.mesh, in_specs=(specs, P("ep")),
                         out_specs=(P(), P()))


def main(args):
    init_distributed(args)
    platform = args.platform or jax.default_backend()
    devices = jax.devices(platform)
    n = args.devices or (8 if platform == "cpu" and jax.process_count() == 1 else len(devices))
    if n > len(devices):
        sys.exit(f"asked for {n} devices, {platform} has {len(devices)}")
    if args.tokens_per_rank % args.seq_len:
        sys.exit(f"--tokens-per-rank must be a multiple of --seq-len ({args.seq_len})")
    mesh = Mesh(np.array(devices[:n]), ("ep",))
    cfg = jaxep.EPConfig(num_experts=args.experts, num_topk=args.topk, hidden=args.hidden,
                         max_tokens_per_rank=args.tokens_per_rank, placement=args.placement)
    comm = jaxep.Communicator(mesh, cfg, backend=args.backend)
    print(f"{comm} on {n} {platform} devices of {jax.process_count()} process(es): "
          f"{comm.num_local_experts} experts per rank, "
          f"{args.tokens_per_rank} tokens per rank, dispatch_grouped via "
          f"{comm.implementation('dispatch_grouped')}")

    log_probs, entropy = markov_chain(args.vocab, 4, args.seed)
    batch = n * args.tokens_per_rank // args.seq_len
    key_init, key_eval, key_train = jax.random.split(jax.random.key(args.seed), 3)
    # Made by jitted functions with output shardings: that also works when the mesh spans
    # processes (no host array is transferred to another process's devices).
    specs = param_specs(jax.eval_shape(lambda k: init_params(k, comm, args), key_init))
    params = jax.jit(lambda k: init_params(k, comm, args),
                     out_shardings={k: NamedSharding(mesh, s) for k, s in specs.items()})(key_init)
    loss_fn = make_loss(comm, args, entropy, specs)
    opt = optax.adam(args.lr)
    opt_state = opt.init(params)
    data_sharding = NamedSharding(mesh, P("ep"))

    @jax.jit
    def train_step(params, opt_state, step):
        tokens = sample_sequences(jax.random.fold_in(key_train, step), log_probs, batch,
                                  args.seq_len + 1)
        tokens = jax.lax.with_sharding_constraint(tokens, data_sharding)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    eval_tokens = jax.jit(lambda: sample_sequences(key_eval, log_probs, batch, args.seq_len + 1),
                          out_shardings=data_sharding)()
    evaluate = jax.jit(lambda p, tokens: loss_fn(p, tokens)[1])
    first = evaluate(params, eval_tokens)
    print(f"initial eval loss {first[0]:.4f} (uniform guess {math.log(args.vocab):.4f}, "
          f"chain entropy {first[2]:.4f})")

    t0 = time.perf_counter()
    with tqdm(range(args.steps), desc="train", mininterval=0.5) as bar:
        for step in bar:
            params, opt_state, metrics = train_step(params, opt_state, step)
            if step % 10 == 0 or step == args.steps - 1:
                bar.set_postfix(loss=f"{float(metrics[0]):.3f}", aux=f"{float(metrics[1]):.3f}")
    secs = time.perf_counter() - t0
    last = evaluate(params, eval_tokens)
    print(f"{args.steps} steps in {secs:.1f} s (compilation included), "
          f"{args.steps * batch * args.seq_len / secs:,.0f} tokens/s")
    initial, final, floor = float(first[0]), float(last[0]), float(first[2])
    # "Clearly": at least 10% of the way from the start to the chain's entropy.
    if not final < initial - 0.1 * (initial - floor):
        print(f"FAILED: loss did not fall clearly: {initial:.4f} -> {final:.4f} "
              f"(entropy floor {floor:.4f})")
        return 1
    print(f"loss fell from {initial:.4f} to {final:.4f} (entropy floor {floor:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
