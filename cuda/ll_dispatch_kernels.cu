// Low-latency dispatch kernels and their launchers (see low_latency.h for the design and the
// protocol; ll_common.cuh for the helpers they share with the combine kernels).
//
// One launch per phase on the caller's stream:
//   dispatch send: expert routing in shared memory (every block, while x loads), wait for
//                  the buffers' release, per-(token, 512-channel chunk) warps read x once,
//                  quantise (fp8) and write the chunk to each destination rank's bundle (a
//                  copy-engine send: to its own outbox, then the host's copy graph moves it);
//                  a token's first-chunk warp then writes its metadata, one extra block the
//                  counts; each block signals its part to every destination.
//   dispatch recv: wait for every source's signals, fan each received row out to its local
//                  experts' output rows; padding; each block acknowledges its reads.
//   one kernel:    the send's body, then the recv's, in every block (LLDispatchKernel): the
//                  bodies are device functions.
#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "ll_common.cuh"
#include "ll_kernels.h"
#include "low_latency.h"

namespace jaxep {
namespace {

// ---- dispatch bundles (identical layout on every device) -----------------------------------

// Dispatch bundle `src` of `buffer` in the inbox of `w` (this device's or a peer's: same
// layout), and bundle `dest` of `buffer` in this device's outbox.
__device__ __forceinline__ char* InboxBundle(const LLWorkspace* ws, LLWorkspace* w, int buffer,
                                             int src) {
  return Region(w, LLInboxOffset(ws->layout, ws->num_ranks, buffer, src));
}
__device__ __forceinline__ char* OutboxBundle(LLWorkspace* ws, int buffer, int dest) {
  return Region(ws, LLOutboxOffset(ws->layout, ws->num_ranks, buffer, dest));
}
// The bundle of SM buffer `buffer` that this rank puts to `dest` in another node, staged.
__device__ __forceinline__ char* StagingBundle(LLWorkspace* ws, int buffer, int dest) {
  return Region(ws, LLStagingBundleOffset(ws->layout, ws->num_ranks, buffer, dest));
}

// Layered dispatch: the relay this rank received from `src`, and the one it stages for
// forwarder `fwd` (same layout; RelayParts).
__device__ __forceinline__ char* RelayIn(LLWorkspace* ws, int buffer, int src) {
  return Region(ws, LLRelayInOffset(ws->layout, ws->num_ranks, buffer, src));
}
__device__ __forceinline__ char* RelayStage(LLWorkspace* ws, int buffer, int fwd) {
  return Region(ws, LLRelayStageOffset(ws->layout, ws->num_ranks, buffer, fwd));
}

// The parts of one relay of a call with T rows: what a source sends a node once, for the
// node's ranks j = 0 .. ranks_per_node - 1 (destination node * ranks_per_node + j): each
// one's counts and per-token metadata as in its bundle, and the rows of the tokens that go to
// any of them.
struct RelayParts {
  int32_t* counts;  // [rpn][counts_bytes / 4]
  int32_t* meta;    // [T][rpn][meta_ints]
  char* rows;       // [T] rows of `stride` bytes
  int64_t stride;
  int rpn, count_ints, meta_ints;
  __device__ RelayParts(const LLWorkspace* ws, char* base, int T, int elem_bytes)
      : counts(reinterpret_cast<int32_t*>(base)),
        meta(reinterpret_cast<int32_t*>(base + int64_t{ws->layout.relay_ranks} *
                                                   ws->layout.counts_bytes)),
        rows(base + int64_t{ws->layout.relay_ranks} * ws->layout.counts_bytes +
             LLAlign16(int64_t{T} * ws->layout.relay_ranks * ws->layout.meta_ints * 4)),
        stride(LLRowStride(elem_bytes, ws->hidden)),
        rpn(ws->layout.relay_ranks),
        count_ints(ws->layout.counts_bytes / 4),
        meta_ints(ws->layout.meta_ints) {}
  __device__ int32_t* Counts(int j) const { return counts + j * count_ints; }
  __device__ int32_t* Meta(int t, int j) const { return meta + (t * rpn + j) * meta_ints; }
  __device__ char* Row(int t) const { return rows + t * stride; }
};

// The n-th lowest set bit of m.
__device__ __forceinline__ int NthBit(unsigned m, int n) {
  for (int i = 0; i < n; ++i) m &= m - 1;
  return __ffs(m) - 1;
}

// The parts of one bundle of a call with T rows (see LLBundleUsedBytes).
struct BundleParts {
  int32_t* counts;  // [E_l + 1]
  int32_t* meta;    // [T][meta_ints]
  char* rows;       // [T] rows of `stride` bytes
  int64_t stride;
  __device__ BundleParts(const LLWorkspace* ws, char* base, int T, int elem_bytes)
      : counts(reinterpret_cast<int32_t*>(base)),
        meta(reinterpret_cast<int32_t*>(base + ws->layout.counts_bytes)),
        rows(base + LLRowsOffset(ws->layout.counts_bytes, T, ws->layout.meta_ints)),
        stride(LLRowStride(elem_bytes, ws->hidden)) {}
  __device__ int32_t* Meta(const LLWorkspace* ws, int i) const {
    return meta + i * ws->layout.meta_ints;
  }
  __device__ char* Row(int i) const { return rows + i * stride; }
};

// ---- FP8 (bit-equal to jaxep.quantize_fp8) -------------------------------------------------

__device__ __forceinline__ float RoundPow2Up(float s) {
  const unsigned bits = __float_as_uint(s);
  unsigned e = bits & 0x7F800000u;
  if (bits & 0x007FFFFFu) e += 1u << 23;
  return __uint_as_float(e);
}

// Quantises the lane's 16 values; the 8 lanes of a 128-channel group share the scale.
// All 32 lanes must call (the amax reduction shuffles); returns the scale.
__device__ __forceinline__ float Quantize16(const float* v, bool round_scale, int4& out) {
  float m = 0.f;
#pragma unroll
  for (int i = 0; i < 16; ++i) m = fmaxf(m, fabsf(v[i]));
  m = fmaxf(m, __shfl_xor_sync(kFull, m, 1));
  m = fmaxf(m, __shfl_xor_sync(kFull, m, 2));
  m = fmaxf(m, __shfl_xor_sync(kFull, m, 4));
  float scale = fmaxf(m, 1e-4f) * __uint_as_float(0x3b124925u);  // fl32(1/448)
  if (round_scale) scale = RoundPow2Up(scale);
  unsigned words[4];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    unsigned word = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      float q = __fdiv_rn(v[4 * w + b], scale);
      q = fminf(fmaxf(q, -448.f), 448.f);
      const unsigned byte = __nv_cvt_float_to_fp8(q, __NV_SATFINITE, __NV_E4M3);
      word |= (byte & 0xFFu) << (8 * b);
    }
    words[w] = word;
  }
  out = make_int4(static_cast<int>(words[0]), static_cast<int>(words[1]),
                  static_cast<int>(words[2]), static_cast<int>(words[3]));
  return scale;
}

// ---- routing masks (a bit per token) ----------------------------------------------------------

__device__ __forceinline__ int PopcBelow(const uint32_t* mask, int t) {
  int n = 0;
  for (int w = 0; w < (t >> 5); ++w) n += __popc(mask[w]);
  return n + __popc(mask[t >> 5] & ((1u << (t & 31)) - 1u));
}

__device__ __forceinline__ int PopcAll(const uint32_t* mask, int words) {
  int n = 0;
  for (int w = 0; w < words; ++w) n += __popc(mask[w]);
  return n;
}

// ---- dispatch send ---------------------------------------------------------------------------

// Where a dispatch send put its call: buffer p, the call's number there; and the invalid ids
// it counted (every block routes every token, so each block knows them).
struct DispatchCall {
  unsigned long long call;
  int p, num_invalid;
};

// The send of a dispatch, as every thread of a block runs it (LLDispatchSendKernel, LLDispatchKernel).
template <typename TIn>
__device__ __forceinline__ DispatchCall DispatchSend(const LLDispatchSendArgs& a, int32_t* smem) {
  LLWorkspace* ws = a.ws;
  const int R = ws->num_ranks, me = ws->rank, Tmax = ws->max_tokens, H = ws->hidden;
  const int T = a.num_tokens, K = a.num_topk, E = a.num_experts;
  const int W = (T + 31) / 32;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const bool outbox = a.buffer >= 0;  // copy-engine send: remote bundles go to the outbox
  const unsigned long long sm_sends = ws->dispatch_sm_sends + !outbox;
  const int p = outbox ? a.buffer : static_cast<int>(sm_sends & 1);
  const unsigned long long call = ws->dispatch_uses[p] + 1;  // this call's number at buffer p
  const int elem = static_cast<int>(LLElemBytes(a.fp8, sizeof(TIn)));
  // Where the bundle for destination d is written: d's inbox, or the outbox (copy-engine
  // send), or the staging area (d in another node: `own`, this rank's inbox bundle of the
  // same buffer and source, gives the puts' destination addresses).
  auto bundle = [&](int d) {
    char* base = outbox && d != me ? OutboxBundle(ws, p, d)
                 : Remote(ws, d)   ? StagingBundle(ws, p, d)
                                   : InboxBundle(ws, ws->peers[d], p, me);
    return BundleParts(ws, base, T, elem);
  };
  const BundleParts own(ws, InboxBundle(ws, ws, p, me), T, elem);
  // Layered: a rank d in another node gets its bundle through d's node's rank on this rank's
  // rail (its forwarder), from the relay this rank puts there: `own_relay` gives the puts'
  // destination addresses, relay_stage(f) the staged rows.
  const bool layered = ws->layered != 0;
  const int rpn = ws->ranks_per_node;
  auto forwarder = [&](int d) { return d - d % rpn + me % rpn; };
  const RelayParts own_relay(ws, RelayIn(ws, p, me), T, elem);
  auto relay_stage = [&](int f) { return RelayParts(ws, RelayStage(ws, p, f), T, elem); };
  // An int of d's bundle (`field` = its offset in a bundle's metadata or counts, `j`'s field
  // of a relay for a layered remote d).
  auto store_int = [&](int d, int32_t* field_of_d, int32_t* field_of_own, int32_t v) {
    if (!Remote(ws, d)) *field_of_d = v;
    else PutInt(ws, d, field_of_own, v);
  };
  auto store_meta = [&](int d, int t, int i, int32_t v) {
    if (layered && Remote(ws, d)) {
      PutInt(ws, forwarder(d), own_relay.Meta(t, d % rpn) + i, v);
    } else {
      store_int(d, bundle(d).Meta(ws, t) + i, own.Meta(ws, t) + i, v);
    }
  };
  auto store_count = [&](int d, int l, int32_t v) {
    if (layered && Remote(ws, d)) {
      PutInt(ws, forwarder(d), own_relay.Counts(d % rpn) + l, v);
    } else {
      store_int(d, bundle(d).counts + l, own.counts + l, v);
    }
  };

  int32_t* s_rank = smem;                                        // [E]
  int32_t* s_slot = s_rank + E;                                  // [E]
  int32_t* s_idx = s_slot + E;                                   // [T*K] top-k ids as given
  uint32_t* s_emask = reinterpret_cast<uint32_t*>(s_idx + T * K);  // [E][W] tokens per expert
  __shared__ int s_invalid;

  const int chunks = (H + kLLChunk - 1) / kLLChunk;
  const int items = T * chunks;
  const int first_item = blockIdx.x * kWarps + warp;
  constexpr int kVec = sizeof(TIn);  // int4s per lane (16 elements)
  auto load_x = [&](int item, int4* raw) {
    const int t = item / chunks, h0 = (item - t * chunks) * kLLChunk + lane * kPerLane;
    const int4* src = reinterpret_cast<const int4*>(
        static_cast<const TIn*>(a.x) + static_cast<size_t>(t) * H + h0);
#pragma unroll
    for (int j = 0; j < kVec; ++j) raw[j] = h0 < H ? src[j] : make_int4(0, 0, 0, 0);
  };
  auto valid = [&](int e) { return e >= 0 && e < E; };

  // 1. Every load the rows need, issued together: the warp's first chunk of x, the top-k ids
  //    and the expert placement (each block keeps its own copy: T*K is small in this mode); and
  //    the destinations must have read the call that last used this buffer. While x is in
  //    flight, a lane per top-k entry routes the tokens to their experts: the first listing of
  //    each (token, expert) sets the token's bit in the expert's mask; ids outside [0, E)
  //    other than -1 are counted.
  for (int i = tid; i < E * W; i += kThreads) s_emask[i] = 0;
  if (tid == 0) s_invalid = 0;
  __syncthreads();  // the masks are zero before any thread sets a bit
  int4 raw[kVec];
  if (first_item < items) load_x(first_item, raw);
  for (int e = tid; e < E; e += kThreads) {
    s_rank[e] = a.expert_rank[e];
    s_slot[e] = a.expert_slot[e];
  }
  // Lane per top-k entry, each token's entries in one aligned group of Kp lanes of a warp.
  const int Kp = K <= 1 ? 1 : 1 << (32 - __clz(K - 1));  // K rounded up to a power of two
  int invalid = 0;
  for (int n0 = warp * 32; n0 < T * Kp; n0 += kThreads) {  // warp-uniform
    const int n = n0 + lane, t = n / Kp, k = n - t * Kp;
    const bool here = t < T && k < K;
    const int e = here ? a.topk_idx[t * K + k] : -1;
    if (here) s_idx[t * K + k] = e;
    invalid += here && !valid(e) && e != -1;
    const unsigned group = (Kp == 32 ? kFull : (1u << Kp) - 1u) << (lane & ~(Kp - 1));
    if (FirstListing(e, valid(e), group)) {
      atomicOr(&s_emask[static_cast<size_t>(e) * W + (t >> 5)], 1u << (t & 31));
    }
  }
  if (invalid) atomicAdd(&s_invalid, invalid);
  WaitPeers(ws, ws->dispatch_read[p], (call - 1) * kLLCallTotal, call, kLLDispatchSend,
            a.timeout_ns);  // ends with the __syncthreads that publishes the shared arrays

  // 2. Rows: warp per (token, 512-channel chunk); x is read once and written to row t of the
  //    bundle of each rank that holds one of the token's experts (rows are not compacted, so
  //    a warp needs only its own token's routing). The warp of a token's first chunk then
  //    writes the token's metadata at every destination: -1 if the token did not go there;
  //    else the token, then per top-k entry (local expert * T_max + row within it) or -1, then
  //    per entry the weight summed over the entry's duplicates (first listing only).
  for (int item = first_item; item < items; item += gridDim.x * kWarps) {
    const int t = item / chunks, c = item - t * chunks;
    const int h0 = c * kLLChunk + lane * kPerLane;
    const bool active = h0 < H;
    const int e = lane < K ? s_idx[t * K + lane] : -1;
    const unsigned ranks = __reduce_or_sync(kFull, valid(e) ? 1u << s_rank[e] : 0u);
    if (item != first_item) load_x(item, raw);
    int4 q = make_int4(0, 0, 0, 0);
    float scale = 0.f;
    if (a.fp8) {
      float v[kPerLane];
      Load16(reinterpret_cast<const TIn*>(raw), v, false);
      scale = Quantize16(v, a.round_scale, q);
    }
    auto write_chunk = [&](char* slot) {
      if (active && a.fp8) {
        *reinterpret_cast<int4*>(slot + h0) = q;
        if ((lane & 7) == 0) reinterpret_cast<float*>(slot + H)[h0 / 128] = scale;
      } else if (active) {
        int4* dst = reinterpret_cast<int4*>(slot + static_cast<size_t>(h0) * sizeof(TIn));
#pragma unroll
        for (int j = 0; j < kVec; ++j) dst[j] = raw[j];
      }
    };
    // The staged chunk (and its FP8 scales) from row `src` here to row `dst` at rank `to`, by
    // the whole warp.
    auto put_chunk = [&](int to, char* dst, char* src) {
      __syncwarp();
      const int c0 = c * kLLChunk, n = min(kLLChunk, H - c0);
      PutWarp(ws, to, dst + static_cast<size_t>(c0) * elem, src + static_cast<size_t>(c0) * elem,
              static_cast<size_t>(n) * elem);
      if (a.fp8) {
        PutWarp(ws, to, dst + H + c0 / 128 * 4, src + H + c0 / 128 * 4,
                static_cast<size_t>(n / 128) * 4);
      }
    };
    unsigned direct = ranks, relays = 0;  // warp-uniform
    if (layered) {
      direct = ranks & ~ws->remote;
      for (unsigned r = ranks & ws->remote; r; r &= r - 1) relays |= 1u << forwarder(__ffs(r) - 1);
    }
    for (unsigned todo = direct; todo; todo &= todo - 1) {
      const int d = __ffs(todo) - 1;
      char* slot = bundle(d).Row(t);
      write_chunk(slot);
      if (Remote(ws, d)) put_chunk(d, own.Row(t), slot);
    }
    for (unsigned todo = relays; todo; todo &= todo - 1) {  // once per node
      const int f = __ffs(todo) - 1;
      char* slot = relay_stage(f).Row(t);
      write_chunk(slot);
      put_chunk(f, own_relay.Row(t), slot);
    }
    if (c != 0) continue;  // warp-uniform
    const bool first = FirstListing(e, valid(e), kFull);  // lanes < K hold the entries
    int entry = -1;  // local expert * T_max + row within it
    float entry_w = 0.f;
    if (first) {
      entry = s_slot[e] * Tmax + PopcBelow(s_emask + static_cast<size_t>(e) * W, t);
      if (a.weights) {
        for (int j = lane; j < K; ++j) {
          if (s_idx[t * K + j] == e) entry_w += a.weights[static_cast<size_t>(t) * K + j];
        }
      }
    }
    for (int d = 0; d < R; ++d) {
      if (!((ranks >> d) & 1u)) {  // warp-uniform
        if (lane == 0) store_meta(d, t, 0, -1);
        continue;
      }
      if (lane == 0) store_meta(d, t, 0, t);
      if (lane < K) {
        const bool here = first && s_rank[e] == d;
        store_meta(d, t, 1 + lane, here ? entry : -1);
        store_meta(d, t, 1 + K + lane, __float_as_int(here ? entry_w : 0.f));
      }
    }
  }

  // 3. The last block: per-(destination, local expert) counts (at T=128 the launcher gives it
  //    no rows: it does this while the others move them), and the invalid ids.
  if (blockIdx.x == gridDim.x - 1) {
    for (int e = tid; e < E; e += kThreads) {
      store_count(s_rank[e], s_slot[e], PopcAll(s_emask + static_cast<size_t>(e) * W, W));
    }
    if (tid == 0 && a.info) a.info[0] = s_invalid;
  }

  // 4. Each block signals its part to every destination (a copy-engine send: nothing; its copy
  //    graph raises the flags after the bundles); the last to finish advances the call numbers.
  //    A rank in another node gets the signal by a put, after the block's puts are complete;
  //    layered, its forwarder gets one for the relay instead.
  if (!outbox) {
    PutsDone(ws);
    __syncthreads();
    const int d = tid;
    if (d < R) {
      const unsigned long long share = BlockShare();
      if (!Remote(ws, d)) {
        AddRelease(&ws->peers[d]->dispatch_arrived[p][me], share);
      } else if (!layered) {
        SignalAdd(ws, d, &ws->dispatch_arrived[p][me], share);
      } else if (d == forwarder(d)) {
        SignalAdd(ws, d, &ws->relay_arrived[p][me], share);
      }
    }
  } else {
    __syncthreads();
  }
  if (LastToFinish(ws, kDispatchSendTicket)) {
    // A copy-engine send's own bundle needs no signal: its recv runs after it on this device.
    if (outbox) ws->dispatch_arrived[p][me] = call;
    ws->dispatch_uses[p] = call;  // a copy-engine send's flag value (copied by the graph)
    if (!outbox) ws->dispatch_sm_sends = sm_sends;
    if (a.info) {
      a.info[1] = static_cast<int32_t>(call & 0xffffffffu);
      a.info[2] = static_cast<int32_t>(call >> 32);
      a.info[3] = p;
    }
  }
  return DispatchCall{call, p, s_invalid};
}

template <typename TIn>
__global__ void __launch_bounds__(kThreads) LLDispatchSendKernel(LLDispatchSendArgs a) {
  // 128-byte aligned, as in the combine kernels: every LL kernel's dynamic shared memory
  // starts on the same boundary (here after the static s_invalid).
  extern __shared__ __align__(128) int32_t smem[];
  DispatchSend<TIn>(a, smem);
}

// ---- layered dispatch: the forwarders ------------------------------------------------------

// Every thread of a block of every rank, before its recv of call `call` at buffer p (with T
// rows per source): for each source on this rank's rail in another node, the bundles its relay
// carries for this node's ranks are written into their inboxes, as that source would have
// written them (rows of the tokens that go there, metadata, counts), and signalled for it.
// Reads only what the source's relay signal published; the source reuses the relay only after
// every rank has acknowledged the call (which follows these signals).
template <int kElem>
__device__ __forceinline__ void DispatchForward(LLWorkspace* ws, int T, int p,
                                                unsigned long long call,
                                                unsigned long long timeout_ns) {
  if (!ws->layered) return;
  const int R = ws->num_ranks, me = ws->rank, rpn = ws->ranks_per_node;
  const int El = ws->num_local_experts, mi = ws->layout.meta_ints;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int node0 = me - me % rpn;  // this node's first rank
  unsigned srcs = 0;  // sources on this rank's rail in other nodes
  for (int s = me % rpn; s < R; s += rpn) srcs |= (Remote(ws, s) ? 1u : 0u) << s;
  const int nsrc = __popc(srcs);
  if (tid < R && ((srcs >> tid) & 1u)) {
    const unsigned long long* f = &ws->relay_arrived[p][tid];
    WaitFor([&] { return LoadAcquire(f) >= call * kLLCallTotal; }, ws->error, me, tid,
            kLLDispatchForward, call, timeout_ns);
  }
  __syncthreads();

  // Warp per (source, token): to each rank j of the node, the token's metadata, and its row
  // if the token goes there. Received data is read through L2 (ld.global.cg).
  const int n16 = static_cast<int>(LLRowStride(kElem, ws->hidden) / 16);
  for (int item = blockIdx.x * kWarps + warp; item < nsrc * T; item += gridDim.x * kWarps) {
    const int si = item / T, t = item - si * T, s = NthBit(srcs, si);
    const RelayParts in(ws, RelayIn(ws, p, s), T, kElem);
    for (int j = 0; j < rpn; ++j) {
      const BundleParts out(ws, InboxBundle(ws, ws->peers[node0 + j], p, s), T, kElem);
      const int32_t* m = in.Meta(t, j);
      const int tok = __ldcg(m);  // warp-uniform
      for (int i = lane; i < mi; i += 32) out.Meta(ws, t)[i] = __ldcg(m + i);
      if (tok < 0) continue;
      const int4* src = reinterpret_cast<const int4*>(in.Row(t));
      int4* dst = reinterpret_cast<int4*>(out.Row(t));
      for (int i = lane; i < n16; i += 32) dst[i] = __ldcg(src + i);
    }
  }
  // Per (source, rank j, local expert): the count.
  for (int i = blockIdx.x * kThreads + tid; i < nsrc * rpn * El; i += gridDim.x * kThreads) {
    const int si = i / (rpn * El), j = (i / El) % rpn, l = i % El, s = NthBit(srcs, si);
    const RelayParts in(ws, RelayIn(ws, p, s), T, kElem);
    reinterpret_cast<int32_t*>(InboxBundle(ws, ws->peers[node0 + j], p, s))[l] =
        __ldcg(in.Counts(j) + l);
  }
  // The block's share of each (source, rank j) bundle, signalled for the source.
  __syncthreads();
  if (tid < nsrc * rpn) {
    const int s = NthBit(srcs, tid / rpn), d = node0 + tid % rpn;
    AddRelease(&ws->peers[d]->dispatch_arrived[p][s], BlockShare());
  }
}

// ---- dispatch recv ---------------------------------------------------------------------------

// The recv of a dispatch of call `d` (from its send's info, or the same kernel's send part), as
// every thread of a block runs it (LLDispatchRecvKernel, LLDispatchKernel).
template <int kElem>  // payload element bytes: 1 (e4m3), 2 (bf16), 4 (f32)
__device__ __forceinline__ void DispatchRecv(const LLDispatchRecvArgs& a, DispatchCall d,
                                             int32_t* smem) {
  LLWorkspace* ws = a.ws;
  const int R = ws->num_ranks, me = ws->rank, Tmax = ws->max_tokens, El = ws->num_local_experts;
  const int H = ws->hidden, K = ws->num_topk, T = a.num_tokens, RT = R * T;
  const int G = H / 128, GW = (G + 3) / 4;
  const size_t row_bytes = static_cast<size_t>(H) * kElem;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const unsigned long long call = d.call;
  const int p = d.p;
  auto bundle = [&](int s) {
    return BundleParts(ws, InboxBundle(ws, ws, p, s), T, kElem);
  };

  int32_t* s_off = smem;              // [E_l][R]: first output row of source s in expert l
  int32_t* s_total = s_off + El * R;  // [E_l]

  // SM buffers: completion counters; copy-engine buffers: the flags that the copies raise.
  // Layered, another node's rows come through this node's rank on the source's rail: a
  // timeout names it too.
  if (tid < R) {
    const unsigned long long* f = &ws->dispatch_arrived[p][tid];
    const unsigned long long want = p < kLLFirstCopyBuffer ? call * kLLCallTotal : call;
    const int rpn = ws->ranks_per_node;
    const int via = ws->layered && Remote(ws, tid) ? me - me % rpn + tid % rpn : -1;
    WaitFor([&] { return LoadAcquire(f) >= want; }, ws->error, me, tid, kLLDispatchRecv, call,
            a.timeout_ns, via);
  }
  __syncthreads();

  // Work items: warp per (source, token, 512-channel chunk); a token that did not come from
  // that source has metadata -1. A warp's loads of an item are issued together; those of its
  // first item together with the counts below, whose prefix the fan-out needs.
  const int chunks = (H + kLLChunk - 1) / kLLChunk;
  const int items = RT * chunks;
  constexpr int kVec = kElem;  // int4s per lane (16 elements)
  struct Item {
    int t, ent;  // the token (-1: not sent), lane k < K: entry k's (local expert * T_max + row)
    float w, scale;
    int4 v[kVec];
  };
  auto load = [&](int item, Item& it) {
    const int st = item / chunks, c = item - st * chunks, s = st / T, t = st - s * T;
    const BundleParts b = bundle(s);
    const int32_t* meta = b.Meta(ws, t);
    it.t = __ldcg(meta);
    it.ent = lane < K ? __ldcg(meta + 1 + lane) : -1;
    it.w = lane < K ? __int_as_float(__ldcg(meta + 1 + K + lane)) : 0.f;
    const char* slot = b.Row(t);
    const int h0 = c * kLLChunk + lane * kPerLane;
    it.scale = 0.f;
    if (h0 < H) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) it.v[j] = __ldcg(reinterpret_cast<const int4*>(slot + h0 * kElem) + j);
      if (kElem == 1 && (lane & 7) == 0) it.scale = __ldcg(reinterpret_cast<const float*>(slot + H) + h0 / 128);
    }
  };
  const int first_item = blockIdx.x * kWarps + warp;
  Item it;
  if (first_item < items) load(first_item, it);

  // Per (local expert, source) counts: every load issued at once.
  for (int l = tid; l < El; l += kThreads) {
    int n[kMaxRanks];
#pragma unroll
    for (int s = 0; s < kMaxRanks; ++s) n[s] = s < R ? __ldcg(bundle(s).counts + l) : 0;
    int acc = 0;
#pragma unroll
    for (int s = 0; s < kMaxRanks; ++s) {
      if (s >= R) break;
      s_off[l * R + s] = acc;
      acc += n[s];
    }
    s_total[l] = acc;
    if (blockIdx.x == 0) a.counts[l] = acc;
  }
  if (tid == 0 && blockIdx.x == 0) a.num_invalid[0] = d.num_invalid;
  __syncthreads();

  // Each received row fans out to its local experts' rows; recv_rows of every (source, token).
  for (int item = first_item; item < items; item += gridDim.x * kWarps) {
    if (item != first_item) load(item, it);
    const int st = item / chunks, c = item - st * chunks, s = st / T;
    const int h0 = c * kLLChunk + lane * kPerLane;
    const bool active = h0 < H;
    int32_t* rr = a.recv_rows + static_cast<size_t>(st) * K;
    if (it.t < 0) {  // warp-uniform: nothing from this source for this token
      if (c == 0 && lane < K) rr[lane] = -1;
      continue;
    }
    // UE8M0: the chunk's 4 groups are exactly packed word c (groups past G pad with 127).
    unsigned packed = 0;
    if constexpr (kElem == 1) {
      if (a.ue8m0) {
#pragma unroll
        for (int g = 0; g < 4; ++g) {
          const float sg = __shfl_sync(kFull, it.scale, 8 * g);
          const unsigned ex = 4 * c + g < G ? (__float_as_uint(sg) >> 23) & 0xFFu : 127u;
          packed |= ex << (8 * g);
        }
      }
    }
    for (int k = 0; k < K; ++k) {
      const int e = __shfl_sync(kFull, it.ent, k);
      const float wk = __shfl_sync(kFull, it.w, k);
      if (e < 0) continue;
      const int l = e / Tmax, row = s_off[l * R + s] + (e - l * Tmax);
      const size_t out_row = static_cast<size_t>(l) * RT + row;
      char* dst = static_cast<char*>(a.x) + out_row * row_bytes + static_cast<size_t>(h0) * kElem;
      if (active) {
        if constexpr (kElem > 1) {
          if (a.weighted) {
            float f[kPerLane];
            if constexpr (kElem == 2) {
              Load16(reinterpret_cast<const __nv_bfloat16*>(it.v), f, false);
              for (int j = 0; j < kPerLane; ++j) f[j] *= wk;
              Store16(reinterpret_cast<__nv_bfloat16*>(dst), f);
            } else {
              Load16(reinterpret_cast<const float*>(it.v), f, false);
              for (int j = 0; j < kPerLane; ++j) f[j] *= wk;
              Store16(reinterpret_cast<float*>(dst), f);
            }
          } else {
#pragma unroll
            for (int j = 0; j < kVec; ++j) reinterpret_cast<int4*>(dst)[j] = it.v[j];
          }
        } else {
          *reinterpret_cast<int4*>(dst) = it.v[0];
          if (!a.ue8m0 && (lane & 7) == 0) {
            static_cast<float*>(a.scales)[out_row * G + h0 / 128] = it.scale;
          }
        }
      }
      if constexpr (kElem == 1) {
        if (a.ue8m0 && lane == 0) static_cast<int32_t*>(a.scales)[out_row * GW + c] = packed;
      }
      if (c == 0 && lane == 0) {
        a.src_index[out_row] = st;  // s * T + t
        a.src_topk[out_row] = k;
      }
    }
    if (c == 0 && lane < K) {
      int row = -1;
      if (it.ent >= 0) {
        const int l = it.ent / Tmax;
        row = l * RT + s_off[l * R + s] + (it.ent - l * Tmax);
      }
      rr[lane] = row;
    }
  }

  // Padding rows: -1 in the handle; zeros in x (and scales) with zero_padding.
  const int total_rows = El * RT;
  for (int r = blockIdx.x * kThreads + tid; r < total_rows; r += gridDim.x * kThreads) {
    if (r % RT >= s_total[r / RT]) {
      a.src_index[r] = -1;
      a.src_topk[r] = -1;
    }
  }
  if (a.zero_padding) {
    const int n16 = static_cast<int>(row_bytes / 16);
    const int scale_words = kElem == 1 ? (a.ue8m0 ? GW : G) : 0;
    for (int r = blockIdx.x * kWarps + warp; r < total_rows; r += gridDim.x * kWarps) {
      if (r % RT < s_total[r / RT]) continue;
      int4* d = reinterpret_cast<int4*>(static_cast<char*>(a.x) + static_cast<size_t>(r) * row_bytes);
      for (int j = lane; j < n16; j += 32) d[j] = make_int4(0, 0, 0, 0);
      int32_t* sc = static_cast<int32_t*>(a.scales) + static_cast<size_t>(r) * scale_words;
      for (int j = lane; j < scale_words; j += 32) sc[j] = 0;
    }
  }

  // Each block tells every source that it is done reading this buffer.
  AcknowledgePeers(ws, [&](LLWorkspace* w) { return &w->dispatch_read[p][me]; });
}

template <int kElem>
__global__ void __launch_bounds__(kThreads) LLDispatchRecvKernel(LLDispatchRecvArgs a) {
  extern __shared__ __align__(128) int32_t smem[];
  // The send's call and buffer, not a counter: XLA may order the recvs of two sends either way.
  const DispatchCall d{CallNumber(a.info + 1), a.info[3], a.info[0]};
  DispatchForward<kElem>(a.ws, a.num_tokens, d.p, d.call, a.timeout_ns);
  DispatchRecv<kElem>(a, d, smem);
}

// ---- dispatch in one kernel -----------------------------------------------------------------

// Send, then receive, in each block: the block's receive starts as soon as every source's
// blocks have signalled, without a second launch. Every block must be resident at once (the
// launcher keeps the grid at most one block per SM), since a block waits for all the others.
template <typename TIn, int kElem>
__global__ void __launch_bounds__(kThreads) LLDispatchKernel(LLDispatchSendArgs s,
                                                             LLDispatchRecvArgs r) {
  extern __shared__ __align__(128) int32_t smem[];
  const DispatchCall d = DispatchSend<TIn>(s, smem);  // ends after a __syncthreads: smem is free
  DispatchForward<kElem>(r.ws, r.num_tokens, d.p, d.call, r.timeout_ns);
  DispatchRecv<kElem>(r, d, smem);
}

}  // namespace

size_t LLSendSharedBytes(int num_tokens, int num_topk, int num_experts) {
  const size_t words = (static_cast<size_t>(num_tokens) + 31) / 32;
  return 4 * (2 * static_cast<size_t>(num_experts) + static_cast<size_t>(num_tokens) * num_topk +
              static_cast<size_t>(num_experts) * words);
}

size_t LLRecvSharedBytes(int num_ranks, int num_local_experts) {
  return 4 * (static_cast<size_t>(num_local_experts) * num_ranks + num_local_experts);
}

cudaError_t LoadLLDispatchKernels() {
  const void* kernels[] = {
      Fn(&LLDispatchSendKernel<__nv_bfloat16>), Fn(&LLDispatchSendKernel<float>),
      Fn(&LLDispatchRecvKernel<1>), Fn(&LLDispatchRecvKernel<2>), Fn(&LLDispatchRecvKernel<4>),
      Fn(&LLDispatchKernel<__nv_bfloat16, 1>), Fn(&LLDispatchKernel<float, 1>),
      Fn(&LLDispatchKernel<__nv_bfloat16, 2>), Fn(&LLDispatchKernel<float, 4>),
  };
  return LoadKernels(kernels);
}

const void* LLDispatchKernelAddress() { return Fn(&LLDispatchSendKernel<__nv_bfloat16>); }

cudaError_t LaunchLLDispatchSendKernel(const LLDispatchSendArgs& a, cudaStream_t stream) {
  const size_t smem = LLSendSharedBytes(a.num_tokens, a.num_topk, a.num_experts);
  const int items = a.num_tokens * Chunks(a.shape.hidden);
  // One block more than the rows need: the last one writes the counts (see the kernel).
  const int blocks = DefaultBlocks(a.num_sms, (items + kWarps - 1) / kWarps + 1);
  if (a.x_elem_bytes == 2) {
    LLDispatchSendKernel<__nv_bfloat16><<<blocks, kThreads, smem, stream>>>(a);
  } else {
    LLDispatchSendKernel<float><<<blocks, kThreads, smem, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t LaunchLLDispatchRecv(const LLDispatchRecvArgs& a, cudaStream_t stream) {
  const size_t smem = LLRecvSharedBytes(a.shape.num_ranks, a.shape.num_local_experts);
  const int blocks = DefaultBlocks(a.num_sms, 1 << 20);
  if (a.shape.layered) {  // its blocks also forward, and a block's recv waits for other ranks'
    const int b = min(blocks, DeviceSmCount());
    switch (a.elem_bytes) {
      case 1: return LaunchAllResident(LLDispatchRecvKernel<1>, b, smem, stream, a);
      case 2: return LaunchAllResident(LLDispatchRecvKernel<2>, b, smem, stream, a);
      case 4: return LaunchAllResident(LLDispatchRecvKernel<4>, b, smem, stream, a);
      default: return cudaErrorInvalidValue;
    }
  }
  switch (a.elem_bytes) {
    case 1: LLDispatchRecvKernel<1><<<blocks, kThreads, smem, stream>>>(a); break;
    case 2: LLDispatchRecvKernel<2><<<blocks, kThreads, smem, stream>>>(a); break;
    case 4: LLDispatchRecvKernel<4><<<blocks, kThreads, smem, stream>>>(a); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t LaunchLLDispatch(const LLDispatchSendArgs& s, const LLDispatchRecvArgs& r,
                             cudaStream_t stream) {
  const size_t smem = max(LLSendSharedBytes(s.num_tokens, s.num_topk, s.num_experts),
                          LLRecvSharedBytes(r.shape.num_ranks, r.shape.num_local_experts));
  // Every block waits for every other (through the peers), so all must be resident: at most
  // one per SM.
  const int blocks = min(DefaultBlocks(s.num_sms, 1 << 20), DeviceSmCount());
  LLDispatchSendArgs sa = s;
  sa.buffer = -1;  // an SM send
  const bool bf16 = s.x_elem_bytes == 2;
  switch (r.elem_bytes) {
    case 1:
      return bf16 ? LaunchAllResident(LLDispatchKernel<__nv_bfloat16, 1>, blocks, smem, stream, sa, r)
                  : LaunchAllResident(LLDispatchKernel<float, 1>, blocks, smem, stream, sa, r);
    case 2: return LaunchAllResident(LLDispatchKernel<__nv_bfloat16, 2>, blocks, smem, stream, sa, r);
    case 4: return LaunchAllResident(LLDispatchKernel<float, 4>, blocks, smem, stream, sa, r);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace jaxep
