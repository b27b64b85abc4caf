// Low-latency dispatch / combine kernels (see low_latency.h for the design and the protocol).
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
//   combine send:  each valid row of y goes to its source's [token][k] slot in 4 KB bulk (TMA)
//                  copies, global -> the warp's shared buffer -> the slot (lane 0 drives them).
//                  Pre-reduced: every block pushes a share of the top-k weights to every
//                  rank (words tagged with the call), then the weighted float32 sum of a
//                  token's local rows goes to its source's [token][rank] slot, once its
//                  weights have arrived (in y's dtype or float32; a single row as it is).
//   combine recv:  wait, weighted float32 sum over k per (token, chunk) (pre-reduced: the sum
//                  of the token's per-rank rows, a single row weighted); acknowledge.
//   one kernel:    a send's body, then its recv's, in every block (LLDispatchKernel,
//                  LLCombineKernel, LLCombineReducedKernel): the bodies are device functions.
// Received data is read with ld.global.cg (L2; buffers are rewritten by later calls, so L1
// must never serve them), completion counters with acquire/release at system scope (one
// release per block and peer, side by side: SignalPeers); waits are bounded.
#include "low_latency.h"

#include <cstddef>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "device_guard.h"
#include "sync.cuh"

namespace jaxep {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kPerLane = kLLChunk / 32;  // 16 channels per lane
constexpr unsigned kFull = 0xffffffffu;

// ---- workspace addressing (identical layout on every device) -------------------------------

__device__ __forceinline__ char* Region(LLWorkspace* w, int64_t off) {
  return reinterpret_cast<char*>(w) + off;
}

// Dispatch bundle `src` of `buffer` in the inbox of `w` (this device's or a peer's: same
// layout), and bundle `dest` of `buffer` in this device's outbox.
__device__ __forceinline__ char* InboxBundle(const LLWorkspace* ws, LLWorkspace* w, int buffer,
                                             int src) {
  return Region(w, LLInboxOffset(ws->layout, ws->num_ranks, buffer, src));
}
__device__ __forceinline__ char* OutboxBundle(LLWorkspace* ws, int buffer, int dest) {
  return Region(ws, LLOutboxOffset(ws->layout, ws->num_ranks, buffer, dest));
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

// Combine slot `k` (a top-k entry, or an expert rank with pre-reduction) of token t, parity p,
// in `w` (this device's or a peer's), addressed with this device's header `ws` (the layout is
// the same everywhere; reading the peer's header would cost NVLink round trips).
__device__ __forceinline__ char* CombineSlot(const LLWorkspace* ws, LLWorkspace* w, int p, int t,
                                             int k) {
  const int64_t idx =
      (static_cast<int64_t>(p) * ws->max_tokens + t) * ws->layout.combine_slots + k;
  return Region(w, ws->layout.combine_off) + idx * ws->layout.slot_bytes;
}

// Pre-reduction weights [T_max][K] that source `src` pushed to `w` for parity p (addressed as
// CombineSlot). Each is one 8-byte word, the weight's bits with the low 32 bits of the call
// number above them, so that a reader knows from the word itself that it has arrived (an
// aligned 8-byte store is seen whole or not at all): no fence and flag after the pushes.
__device__ __forceinline__ unsigned long long* CombineWeights(const LLWorkspace* ws,
                                                              LLWorkspace* w, int p, int src) {
  const int64_t idx = (static_cast<int64_t>(p) * ws->num_ranks + src) * ws->max_tokens;
  return reinterpret_cast<unsigned long long*>(Region(w, ws->layout.weights_off)) +
         idx * ws->num_topk;
}
__device__ __forceinline__ unsigned long long TaggedWeight(float w, unsigned long long seq) {
  return (seq << 32) | __float_as_uint(w);
}
// Waits (bounded) until the word at p carries call `seq`'s tag; returns its weight.
__device__ __forceinline__ float WaitTaggedWeight(const unsigned long long* p,
                                                  unsigned long long seq, const LLWorkspace* ws,
                                                  int src, unsigned long long timeout_ns) {
  unsigned long long v;
  WaitFor([&] {
    asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return static_cast<unsigned>(v >> 32) == static_cast<unsigned>(seq);
  }, ws->error, ws->rank, src, kLLCombineWeights, seq, timeout_ns);
  return __uint_as_float(static_cast<unsigned>(v));
}

// ---- 16-channel lane vectors --------------------------------------------------------------

// Loads 16 elements of type T (bf16 or f32) as floats.
template <typename T>
__device__ __forceinline__ void Load16(const T* src, float* v, bool cache_global) {
  constexpr int kVec = sizeof(T);  // int4s per 16 elements
  int4 raw[kVec];
  const int4* s = reinterpret_cast<const int4*>(src);
#pragma unroll
  for (int i = 0; i < kVec; ++i) raw[i] = cache_global ? __ldcg(s + i) : s[i];
  if constexpr (sizeof(T) == 2) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  } else {
    const float* f = reinterpret_cast<const float*>(raw);
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = f[i];
  }
}

// Packs 16 floats as 16 elements of type T (bf16 or f32) in sizeof(T) int4s.
template <typename T>
__device__ __forceinline__ void Pack16(const float* v, int4* raw) {
  if constexpr (sizeof(T) == 2) {
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  } else {
    float* f = reinterpret_cast<float*>(raw);
#pragma unroll
    for (int i = 0; i < 16; ++i) f[i] = v[i];
  }
}

template <typename T>
__device__ __forceinline__ void Store16(T* dst, const float* v) {
  constexpr int kVec = sizeof(T);
  int4 raw[kVec];
  Pack16<T>(v, raw);
  int4* d = reinterpret_cast<int4*>(dst);
#pragma unroll
  for (int i = 0; i < kVec; ++i) d[i] = raw[i];
}

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

// ---- call completion: counters (see low_latency.h) --------------------------------------------

// This block's share of its grid's kLLCallTotal at a counter.
__device__ __forceinline__ unsigned long long BlockShare() {
  return blockIdx.x == 0 ? kLLCallTotal - (gridDim.x - 1) : 1;
}

// Every thread of a block, once the block's part of the call is done (its writes issued, its
// reads of a peer's data consumed): thread d < R adds the block's share to counter(d), at peer
// d, with release semantics (the __syncthreads brings in the other threads' operations). The
// R releases of a block, and those of all blocks, run side by side.
template <typename Counter>
__device__ __forceinline__ void SignalPeers(const LLWorkspace* ws, Counter counter) {
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < ws->num_ranks) AddRelease(counter(threadIdx.x), BlockShare());
}

// Every thread of a block that has read peers' data into a buffer of its own, once it is done
// with it: thread d < R adds the block's share to counter(d), at peer d, telling the peer
// that it may rewrite the buffer. An acknowledgement orders reads only, and after the
// __syncthreads every read whose value the block uses has returned it (the values feed stores,
// shuffles or branches before it; a speculative load whose value is never used, such as the
// row of a token that was not sent, cannot matter), so a plain relaxed add does: no
// system-scope fence, which would make the block wait for its output writes first.
template <typename Counter>
__device__ __forceinline__ void AcknowledgePeers(const LLWorkspace* ws, Counter counter) {
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < ws->num_ranks) AddRelaxed(counter(threadIdx.x), BlockShare());
}

// Every thread of a send, after SignalPeers (or a __syncthreads): true in one thread (not a
// signalling one) of the last block to get here, which then advances the call numbers: every
// block has read them, at its start (the ticket's acquire and release order those reads first).
__device__ __forceinline__ bool LastToFinish(LLWorkspace* ws, int ticket_index) {
  if (threadIdx.x != blockDim.x - 1) return false;
  if (AddAcqRelGpu(&ws->ticket[ticket_index], 1u) != gridDim.x - 1) return false;
  ws->ticket[ticket_index] = 0;  // for the next launch (stream-ordered after this one)
  return true;
}

// Threads s < R: wait until flags[s] >= want (bounded; `call` names the call in a timeout
// report: a dispatch's number at its buffer, a combine's sequence number); then the whole
// block continues.
__device__ __forceinline__ void WaitPeers(LLWorkspace* ws, const unsigned long long* flags,
                                          unsigned long long want, unsigned long long call,
                                          int phase, unsigned long long timeout_ns) {
  if (static_cast<int>(threadIdx.x) < ws->num_ranks) {
    const unsigned long long* f = flags + threadIdx.x;
    WaitFor([&] { return LoadAcquire(f) >= want; }, ws->error, ws->rank, threadIdx.x, phase,
            call, timeout_ns);
  }
  __syncthreads();
}

__device__ __forceinline__ unsigned long long CallNumber(const int32_t* lo_hi) {
  return static_cast<unsigned long long>(static_cast<uint32_t>(lo_hi[0])) |
         (static_cast<unsigned long long>(static_cast<uint32_t>(lo_hi[1])) << 32);
}

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

// Every lane of the warp: the lowest lane of `group` whose `e` is valid and equal to this
// lane's (the first listing of an expert among a token's top-k entries, with the entries in
// increasing lanes of `group`); an invalid lane's own lane if it is in `group`, else -1.
__device__ __forceinline__ int FirstLane(int e, bool valid, unsigned group) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  return __ffs(__match_any_sync(kFull, valid ? e : -2 - lane) & group) - 1;
}

// Every lane of the warp: true in the first listing of a valid expert (see FirstLane).
__device__ __forceinline__ bool FirstListing(int e, bool valid, unsigned group) {
  const int first = FirstLane(e, valid, group);  // every lane: the match is warp-wide
  return valid && first == static_cast<int>(threadIdx.x & 31);
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
  // Where the bundle for destination d goes.
  auto bundle = [&](int d) {
    char* base = outbox && d != me ? OutboxBundle(ws, p, d) : InboxBundle(ws, ws->peers[d], p, me);
    return BundleParts(ws, base, T, elem);
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
    for (unsigned todo = active ? ranks : 0u; todo; todo &= todo - 1) {
      char* slot = bundle(__ffs(todo) - 1).Row(t);
      if (a.fp8) {
        *reinterpret_cast<int4*>(slot + h0) = q;
        if ((lane & 7) == 0) reinterpret_cast<float*>(slot + H)[h0 / 128] = scale;
      } else {
        int4* dst = reinterpret_cast<int4*>(slot + static_cast<size_t>(h0) * sizeof(TIn));
#pragma unroll
        for (int j = 0; j < kVec; ++j) dst[j] = raw[j];
      }
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
      int32_t* meta = bundle(d).Meta(ws, t);
      if (!((ranks >> d) & 1u)) {  // warp-uniform
        if (lane == 0) meta[0] = -1;
        continue;
      }
      if (lane == 0) meta[0] = t;
      if (lane < K) {
        const bool here = first && s_rank[e] == d;
        meta[1 + lane] = here ? entry : -1;
        meta[1 + K + lane] = __float_as_int(here ? entry_w : 0.f);
      }
    }
  }

  // 3. The last block: per-(destination, local expert) counts (at T=128 the launcher gives it
  //    no rows: it does this while the others move them), and the invalid ids.
  if (blockIdx.x == gridDim.x - 1) {
    for (int e = tid; e < E; e += kThreads) {
      bundle(s_rank[e]).counts[s_slot[e]] = PopcAll(s_emask + static_cast<size_t>(e) * W, W);
    }
    if (tid == 0 && a.info) a.info[0] = s_invalid;
  }

  // 4. Each block signals its part to every destination (a copy-engine send: nothing; its copy
  //    graph raises the flags after the bundles); the last to finish advances the call numbers.
  if (!outbox) {
    SignalPeers(ws, [&](int d) { return &ws->peers[d]->dispatch_arrived[p][me]; });
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
  extern __shared__ int32_t smem[];
  DispatchSend<TIn>(a, smem);
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
  WaitPeers(ws, ws->dispatch_arrived[p], p < kLLFirstCopyBuffer ? call * kLLCallTotal : call,
            call, kLLDispatchRecv, a.timeout_ns);

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
  AcknowledgePeers(ws, [&](int src) { return &ws->peers[src]->dispatch_read[p][me]; });
}

template <int kElem>
__global__ void __launch_bounds__(kThreads) LLDispatchRecvKernel(LLDispatchRecvArgs a) {
  extern __shared__ int32_t smem[];
  // The send's call and buffer, not a counter: XLA may order the recvs of two sends either way.
  DispatchRecv<kElem>(a, DispatchCall{CallNumber(a.info + 1), a.info[3], a.info[0]}, smem);
}

// ---- dispatch in one kernel -----------------------------------------------------------------

// Send, then receive, in each block: the block's receive starts as soon as every source's
// blocks have signalled, without a second launch. Every block must be resident at once (the
// launcher keeps the grid at most one block per SM), since a block waits for all the others.
template <typename TIn, int kElem>
__global__ void __launch_bounds__(kThreads) LLDispatchKernel(LLDispatchSendArgs s,
                                                             LLDispatchRecvArgs r) {
  extern __shared__ int32_t smem[];
  const DispatchCall d = DispatchSend<TIn>(s, smem);  // ends after a __syncthreads: smem is free
  DispatchRecv<kElem>(r, d, smem);
}

// ---- bulk copies (TMA): global -> shared -> global, one lane drives them ---------------------

constexpr int kBulkPart = 4096;  // bytes per bulk copy (a multiple of 16)
constexpr int kBulkStages = 2;   // shared-memory buffers per warp

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void BulkBarrierInit(unsigned long long* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(SmemAddr(bar)) : "memory");
}

// Loads `bytes` from global `src` into shared `dst`; completes phase `parity` of `bar`, which
// this waits for. (A local copy: it always completes, so the wait needs no bound.)
__device__ __forceinline__ void BulkLoad(void* dst, const void* src, int bytes,
                                         unsigned long long* bar, unsigned parity) {
  const uint32_t b = SmemAddr(bar);
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(bytes)
               : "memory");
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
      ::"r"(SmemAddr(dst)), "l"(src), "r"(bytes), "r"(b) : "memory");
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; "
        "selp.u32 %0, 1, 0, p; }" : "=r"(done) : "r"(b), "r"(parity) : "memory");
  }
}

// Stores `bytes` of shared `src` to global `dst` (a peer's memory too), as one bulk group.
__device__ __forceinline__ void BulkStore(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
               ::"l"(dst), "r"(SmemAddr(src)), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

// Waits until at most kBulkStages - 1 bulk stores still read their shared source.
__device__ __forceinline__ void BulkWaitStageFree() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kBulkStages - 1) : "memory");
}

// Waits until every bulk store of this thread has completed, and orders them (async proxy)
// before its later generic-proxy operations (the block's barrier and then SignalPeers'
// release, which publishes them to the peer).
__device__ __forceinline__ void BulkStoresDone() {
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  asm volatile("fence.proxy.async.global;" ::: "memory");
}

// ---- combine send ----------------------------------------------------------------------------

// Combine call `seq` uses parity seq & 1; it is that parity's CombineUse(seq)-th call.
__device__ __forceinline__ unsigned long long CombineUse(unsigned long long seq) {
  return (seq + 1) >> 1;
}

// Every thread of a combine send, at its start: waits until every destination has read the
// parity's previous call (the call two back).
__device__ __forceinline__ void WaitCombineRead(LLWorkspace* ws, unsigned long long seq,
                                                unsigned long long timeout_ns) {
  WaitPeers(ws, ws->combine_read[seq & 1], (CombineUse(seq) - 1) * kLLCallTotal, seq,
            kLLCombineSend, timeout_ns);
}

// Every thread of a combine send, at its end: each block signals its part to every destination;
// the last to finish records the call.
__device__ __forceinline__ void FinishCombineSend(LLWorkspace* ws, unsigned long long seq,
                                                  int32_t* info) {
  const int me = ws->rank, p = static_cast<int>(seq & 1);
  SignalPeers(ws, [&](int d) { return &ws->peers[d]->combine_arrived[p][me]; });
  if (LastToFinish(ws, kCombineSendTicket)) {
    ws->combine_sends = seq;
    if (info) {
      info[0] = static_cast<int32_t>(seq & 0xffffffffu);
      info[1] = static_cast<int32_t>(seq >> 32);
    }
  }
}

// Each valid row goes back to its source's [token][k] slot. The row is moved in kBulkPart
// pieces by the TMA unit (global -> this warp's shared buffer -> the peer's slot), driven by
// lane 0 of a warp per piece: over NVLink this writes faster than SM stores
// (benchmarks/RESULTS.md).
// Every thread of a block (LLCombineSendKernel, LLCombineKernel); returns the call's sequence
// number. smem: LLCombineSendSharedBytes, 128-byte aligned.
template <typename T>
__device__ __forceinline__ unsigned long long CombineSend(const LLCombineSendArgs& a,
                                                          int32_t* smem) {
  LLWorkspace* ws = a.ws;
  const int R = ws->num_ranks, El = ws->num_local_experts, H = ws->hidden;
  const int Tn = a.num_tokens, RT = R * Tn;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const unsigned long long seq = ws->combine_sends + 1;
  const int p = static_cast<int>(seq & 1);
  char* s_stage = reinterpret_cast<char*>(smem);  // [kWarps][kBulkStages][kBulkPart]
  __shared__ __align__(8) unsigned long long s_bar[kWarps][kBulkStages];
  int32_t* s_base = reinterpret_cast<int32_t*>(s_stage + kWarps * kBulkStages * kBulkPart);

  for (int l = tid; l < El; l += kThreads) s_base[l + 1] = min(max(a.counts[l], 0), RT);
  if (lane == 0) {
    for (int st = 0; st < kBulkStages; ++st) BulkBarrierInit(&s_bar[warp][st]);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (warp == 0) {
    int carry = 0;
    for (int i0 = 1; i0 <= El; i0 += 32) {
      const int i = i0 + lane;
      int v = i <= El ? s_base[i] : 0;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int n = __shfl_up_sync(kFull, v, o);
        if (lane >= o) v += n;
      }
      if (i <= El) s_base[i] = v + carry;
      carry += __shfl_sync(kFull, v, 31);
    }
    if (lane == 0) s_base[0] = 0;
  }
  WaitCombineRead(ws, seq, a.timeout_ns);

  const int row_bytes = H * static_cast<int>(sizeof(T));
  const int parts = (row_bytes + kBulkPart - 1) / kBulkPart;
  const int items = s_base[El] * parts;
  if (lane == 0) {
    int j = 0;  // this warp's copies so far
    for (int item = blockIdx.x * kWarps + warp; item < items; item += gridDim.x * kWarps, ++j) {
      const int q = item / parts, part = item - q * parts;
      int lo = 0, hi = El - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (s_base[mid] <= q) lo = mid; else hi = mid - 1;
      }
      const size_t r = static_cast<size_t>(lo) * RT + (q - s_base[lo]);
      const int si = a.src_index[r], k = a.src_topk[r];
      if (si < 0 || k < 0 || (a.skip_local && si / Tn == ws->rank)) { --j; continue; }
      const int s = si / Tn, t = si - s * Tn;
      const int off = part * kBulkPart, bytes = min(kBulkPart, row_bytes - off);
      const int st = j % kBulkStages;
      char* buf = s_stage + (warp * kBulkStages + st) * kBulkPart;
      BulkWaitStageFree();  // the stage's previous store has read it
      BulkLoad(buf, reinterpret_cast<const char*>(static_cast<const T*>(a.y) + r * H) + off,
               bytes, &s_bar[warp][st], (j / kBulkStages) & 1u);
      BulkStore(CombineSlot(ws, ws->peers[s], p, t, k) + off, buf, bytes);
    }
    BulkStoresDone();
  }
  __syncwarp();

  FinishCombineSend(ws, seq, a.info);
  return seq;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) LLCombineSendKernel(LLCombineSendArgs a) {
  extern __shared__ __align__(128) int32_t smem[];
  CombineSend<T>(a, smem);
}

// ---- combine send with pre-reduction ---------------------------------------------------------

// Lanes of a warp, for chunks c = g, g + G, ... of a row: the float32 sum of w * row over the
// `entries` lanes (each holding a row of y and its weight), stored as O at dst. A lane's 16
// elements of a chunk are kPieces pieces of one int4 of O each, kPieceStride apart, so that
// each store instruction of the warp writes 512 contiguous bytes to the peer (whole sectors);
// the rows of up to kBatch entries are loaded at once.
template <typename T, typename O>
__device__ __forceinline__ void SumRowsTo(const T* y, int H, int row, float w, unsigned entries,
                                          int g, int G, O* dst) {
  constexpr int kPieceElems = 16 / sizeof(O);     // elements per int4 of O: 8 (bf16), 4 (f32)
  constexpr int kPieces = kPerLane / kPieceElems;  // 2 or 4
  constexpr int kPieceStride = 32 * kPieceElems;  // elements between a lane's pieces
  constexpr int kRawBytes = kPieceElems * sizeof(T);  // 16, or 8 (bf16 rows into f32 pieces)
  using Raw = std::conditional_t<kRawBytes == 16, int4, int2>;
  constexpr int kBatch = 4;
  const int lane = threadIdx.x & 31;
  const int chunks = (H + kLLChunk - 1) / kLLChunk;
  for (int c = g; c < chunks; c += G) {
    const int base = c * kLLChunk + lane * kPieceElems;
    float acc[kPerLane] = {};
    unsigned todo = entries;
    while (todo) {  // warp-uniform
      int rows[kBatch];
      float wts[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int k = todo ? __ffs(todo) - 1 : 0;
        const int rk = __shfl_sync(kFull, row, k);
        wts[j] = __shfl_sync(kFull, w, k);
        rows[j] = todo ? rk : -1;
        todo &= todo - 1;
      }
      int4 raw[kBatch][sizeof(T)];  // 16 elements of T per entry, piece after piece
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const T* src = y + static_cast<size_t>(max(rows[j], 0)) * H;
        Raw* r = reinterpret_cast<Raw*>(raw[j]);
#pragma unroll
        for (int v = 0; v < kPieces; ++v) {
          const int e = base + v * kPieceStride;
          r[v] = rows[j] >= 0 && e < H ? *reinterpret_cast<const Raw*>(src + e) : Raw{};
        }
      }
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        float f[kPerLane];
        Load16(reinterpret_cast<const T*>(raw[j]), f, false);
#pragma unroll
        for (int v = 0; v < kPerLane; ++v) acc[v] += wts[j] * f[v];
      }
    }
    int4 out[kPieces];
    Pack16<O>(acc, out);
#pragma unroll
    for (int v = 0; v < kPieces; ++v) {
      const int e = base + v * kPieceStride;
      if (e < H) *reinterpret_cast<int4*>(dst + e) = out[v];
    }
  }
}

// (See LaunchLLCombineSendReduced.) Per source token held here, to the source's slot
// [token][this rank]: the row itself, unweighted, when exactly one (distinct) expert of the
// token is here; else the float32 sum of weight * row over them, stored in y's dtype, or in
// float32 with a.float32_partials.
// Every thread of a block (LLCombineSendReducedKernel, LLCombineReducedKernel); returns the
// call's sequence number.
template <typename T>
__device__ __forceinline__ unsigned long long CombineSendReduced(
    const LLCombineSendReducedArgs& a) {
  LLWorkspace* ws = a.ws;
  const int R = ws->num_ranks, me = ws->rank, H = ws->hidden, K = ws->num_topk;
  const int Tn = a.num_tokens, E = a.num_experts;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const unsigned long long seq = ws->combine_sends + 1;
  const int p = static_cast<int>(seq & 1);

  WaitCombineRead(ws, seq, a.timeout_ns);
  // 1. Every block pushes its share of this rank's weights to every rank, tagged with the call
  //    (see CombineWeights): a repeated expert's weights summed into its first listing (whose
  //    row the dispatch recv recorded), in top-k order; 0 for invalid entries and repeats.
  for (int i = blockIdx.x * kThreads + tid; i < Tn * K; i += gridDim.x * kThreads) {
    const int t = i / K, k = i - t * K;
    const int32_t* idx = a.topk_idx + static_cast<size_t>(t) * K;
    const float* wt = a.weights + static_cast<size_t>(t) * K;
    const int e = idx[k];
    bool first = true;
    float w = 0.f;
    for (int j = 0; j < K; ++j) {  // no early exit: the loads can be in flight together
      const int ej = idx[j];
      const float wj = wt[j];
      if (ej == e) {
        if (j < k) first = false;
        else w += wj;
      }
    }
    const unsigned long long v = TaggedWeight(first && e >= 0 && e < E ? w : 0.f, seq);
    for (int d = 0; d < R; ++d) CombineWeights(ws, ws->peers[d], p, me)[i] = v;
  }

  // 2. Warp per (source token, group of chunks c = g, g + G, ...; G spreads the tokens over
  //    every warp). A token with one expert here needs no weight: its row goes as it is.
  const int chunks = (H + kLLChunk - 1) / kLLChunk;
  const int pairs = R * Tn;
  const int G = max(1, min(chunks, static_cast<int>(gridDim.x) * kWarps / pairs));
  const int items = pairs * G;
  const T* y = static_cast<const T*>(a.y);
  for (int item = blockIdx.x * kWarps + warp; item < items; item += gridDim.x * kWarps) {
    const int pair = item / G, g = item - pair * G;
    const int s = pair / Tn, t = pair - s * Tn;
    int row = lane < K ? a.recv_rows[static_cast<size_t>(pair) * K + lane] : -1;
    if (row >= ws->num_local_experts * R * Tn) row = -1;  // not from this dispatch's recv
    const unsigned entries = __ballot_sync(kFull, row >= 0);
    if (!entries) continue;
    char* slot = CombineSlot(ws, ws->peers[s], p, t, me);
    if (__popc(entries) == 1) {
      SumRowsTo<T, T>(y, H, row, 1.f, entries, g, G, reinterpret_cast<T*>(slot));
      continue;
    }
    const float w = row >= 0 ? WaitTaggedWeight(CombineWeights(ws, ws, p, s) + t * K + lane,
                                                seq, ws, s, a.timeout_ns) : 0.f;
    if (a.float32_partials) {
      SumRowsTo<T, float>(y, H, row, w, entries, g, G, reinterpret_cast<float*>(slot));
    } else {
      SumRowsTo<T, T>(y, H, row, w, entries, g, G, reinterpret_cast<T*>(slot));
    }
  }

  FinishCombineSend(ws, seq, a.info);
  return seq;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) LLCombineSendReducedKernel(LLCombineSendReducedArgs a) {
  CombineSendReduced<T>(a);
}

// ---- combine recv ----------------------------------------------------------------------------

// The recv of combine call `seq` (from its send's info, or the same kernel's send part), as
// every thread of a block runs it (LLCombineRecvKernel, LLCombineKernel, LLCombineReducedKernel).
template <typename T>
__device__ __forceinline__ void CombineRecv(const LLCombineRecvArgs& a, unsigned long long seq) {
  LLWorkspace* ws = a.ws;
  const int me = ws->rank, H = ws->hidden;
  const int Tn = a.num_tokens, K = a.num_topk, E = a.num_experts;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int p = static_cast<int>(seq & 1);

  WaitPeers(ws, ws->combine_arrived[p], CombineUse(seq) * kLLCallTotal, seq, kLLCombineRecv,
            a.timeout_ns);

  const int chunks = (H + kLLChunk - 1) / kLLChunk;
  const int items = Tn * chunks;
  for (int item = blockIdx.x * kWarps + warp; item < items; item += gridDim.x * kWarps) {
    const int t = item / chunks, c = item - t * chunks;
    // Lane k < K: the entry's id, the lane of its first listing, its weight.
    int e = lane < K ? a.topk_idx[static_cast<size_t>(t) * K + lane] : -1;
    const bool valid = lane < K && e >= 0 && e < E;
    const float wk = valid ? a.weights[static_cast<size_t>(t) * K + lane] : 0.f;
    const int first = FirstLane(e, valid, kFull);
    // The entry's row of y when its expert is here and the send left it in place, else -1.
    const int local = a.local_rows && lane < K
                          ? a.local_rows[(static_cast<size_t>(me) * Tn + t) * K + lane] : -1;
    const int h0 = c * kLLChunk + lane * kPerLane;
    const bool active = h0 < H;
    float acc[kPerLane] = {};
    if (a.reduced) {  // one row per expert rank of the token's entries, in rank order
      const int at = valid ? a.expert_rank[e] : -1;
      unsigned ranks = __reduce_or_sync(kFull, valid ? 1u << at : 0u);
      while (ranks) {  // warp-uniform
        const int r = __ffs(ranks) - 1;
        ranks &= ranks - 1;
        const unsigned listed = __ballot_sync(kFull, at == r);
        const bool single = __popc(__ballot_sync(kFull, at == r && first == lane)) == 1;
        float w = 1.f;  // a single expert's row came as it is: weigh it by its listings
        if (single) {
          w = 0.f;
          for (unsigned m = listed; m; m &= m - 1) w += __shfl_sync(kFull, wk, __ffs(m) - 1);
        }
        if (!active) continue;
        const char* slot = CombineSlot(ws, ws, p, t, r);
        float v[kPerLane];
        if (a.float32_partials && !single) {
          Load16(reinterpret_cast<const float*>(slot) + h0, v, true);
        } else {
          Load16(reinterpret_cast<const T*>(slot) + h0, v, true);
        }
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) acc[j] += w * v[j];
      }
      if (active) Store16(static_cast<T*>(a.out) + static_cast<size_t>(t) * H + h0, acc);
      continue;
    }
    for (int k = 0; k < K; ++k) {
      const bool vk = __shfl_sync(kFull, valid, k);
      const int fk = __shfl_sync(kFull, first, k);
      const float w = __shfl_sync(kFull, wk, k);
      const int lk = __shfl_sync(kFull, local, fk);
      if (!active) continue;
      float v[kPerLane];
      if (vk) {
        const T* src = lk >= 0 ? static_cast<const T*>(a.y) + static_cast<size_t>(lk) * H
                               : reinterpret_cast<const T*>(CombineSlot(ws, ws, p, t, fk));
        Load16(src + h0, v, lk < 0);
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) acc[j] += w * v[j];
      } else {
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) v[j] = 0.f;
      }
      if (a.rows) {
        Store16(static_cast<T*>(a.rows) + (static_cast<size_t>(t) * K + k) * H + h0, v);
      }
    }
    if (active) Store16(static_cast<T*>(a.out) + static_cast<size_t>(t) * H + h0, acc);
  }

  AcknowledgePeers(ws, [&](int src) { return &ws->peers[src]->combine_read[p][me]; });
}

template <typename T>
__global__ void __launch_bounds__(kThreads) LLCombineRecvKernel(LLCombineRecvArgs a) {
  CombineRecv<T>(a, CallNumber(a.info));  // the send's call, not a counter
}

// ---- combine in one kernel (as LLDispatchKernel: every block resident, one per SM) ----------

template <typename T>
__global__ void __launch_bounds__(kThreads) LLCombineKernel(LLCombineSendArgs s,
                                                            LLCombineRecvArgs r) {
  extern __shared__ __align__(128) int32_t smem[];
  CombineRecv<T>(r, CombineSend<T>(s, smem));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) LLCombineReducedKernel(LLCombineSendReducedArgs s,
                                                                   LLCombineRecvArgs r) {
  CombineRecv<T>(r, CombineSendReduced<T>(s));
}

int DefaultBlocks(int requested, int items_per_block_hint) {
  if (requested > 0) return min(requested, kLLMaxBlocks);  // a block's share must stay positive
  return max(1, min(DeviceSmCount(), items_per_block_hint));
}

// Launches a kernel whose blocks wait for one another (through the peers: the one-kernel ops,
// the pre-reduced combine send) cooperatively: the driver places every block at once or fails
// the launch, so no block spins for one that is kept off the GPU by other work (the caller
// keeps the grid at one block per SM, which fits).
template <typename... Params, typename... Args>
cudaError_t LaunchAllResident(void (*kernel)(Params...), int blocks, size_t smem,
                              cudaStream_t stream, const Args&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

int Chunks(int hidden) { return (hidden + kLLChunk - 1) / kLLChunk; }

template <typename K>
const void* Fn(K* k) {
  return reinterpret_cast<const void*>(k);
}

cudaError_t LoadLLModule() {  // touch every kernel now (no lazy loading while a peer spins)
  const void* kernels[] = {
      Fn(&LLDispatchSendKernel<__nv_bfloat16>), Fn(&LLDispatchSendKernel<float>),
      Fn(&LLDispatchRecvKernel<1>), Fn(&LLDispatchRecvKernel<2>), Fn(&LLDispatchRecvKernel<4>),
      Fn(&LLDispatchKernel<__nv_bfloat16, 1>), Fn(&LLDispatchKernel<float, 1>),
      Fn(&LLDispatchKernel<__nv_bfloat16, 2>), Fn(&LLDispatchKernel<float, 4>),
      Fn(&LLCombineSendKernel<__nv_bfloat16>), Fn(&LLCombineSendKernel<float>),
      Fn(&LLCombineSendReducedKernel<__nv_bfloat16>), Fn(&LLCombineSendReducedKernel<float>),
      Fn(&LLCombineRecvKernel<__nv_bfloat16>), Fn(&LLCombineRecvKernel<float>),
      Fn(&LLCombineKernel<__nv_bfloat16>), Fn(&LLCombineKernel<float>),
      Fn(&LLCombineReducedKernel<__nv_bfloat16>), Fn(&LLCombineReducedKernel<float>),
  };
  for (const void* k : kernels) {
    cudaError_t e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kLLMaxSharedBytes));
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace

LLLayout ComputeLLLayout(int num_ranks, int max_tokens, int num_topk, int num_local_experts,
                         int hidden, bool copy_engine) {
  auto up = [](int64_t n) { return (n + 255) & ~int64_t{255}; };
  LLLayout l{};
  l.slot_bytes = 4 * hidden;
  l.meta_ints = 1 + 2 * num_topk;
  l.counts_bytes = static_cast<int32_t>(LLAlign16(4 * int64_t{num_local_experts}));
  l.copy_engine = copy_engine ? 1 : 0;
  l.bundle_bytes = up(LLRowsOffset(l.counts_bytes, max_tokens, l.meta_ints) +
                      int64_t{max_tokens} * l.slot_bytes);
  const int64_t bundles = int64_t{num_ranks} * l.bundle_bytes;  // one buffer's
  const int inboxes = copy_engine ? kLLDispatchBuffers : kLLFirstCopyBuffer;
  const int outboxes = copy_engine ? kLLDispatchBuffers - kLLFirstCopyBuffer : 0;
  l.inbox_off = up(sizeof(LLWorkspace));
  l.outbox_off = l.inbox_off + inboxes * bundles;
  l.combine_slots = num_topk > num_ranks ? num_topk : num_ranks;
  l.combine_off = l.outbox_off + outboxes * bundles;
  l.weights_off = l.combine_off + up(2 * int64_t{max_tokens} * l.combine_slots * l.slot_bytes);
  l.total_bytes = l.weights_off + up(2 * int64_t{num_ranks} * max_tokens * num_topk * 8);
  return l;
}

size_t LLWorkspaceBytes(int num_ranks, int max_tokens, int num_topk, int num_local_experts,
                        int hidden, bool copy_engine) {
  return static_cast<size_t>(ComputeLLLayout(num_ranks, max_tokens, num_topk, num_local_experts,
                                             hidden, copy_engine).total_bytes);
}

size_t LLSendSharedBytes(int num_tokens, int num_topk, int num_experts) {
  const size_t words = (static_cast<size_t>(num_tokens) + 31) / 32;
  return 4 * (2 * static_cast<size_t>(num_experts) + static_cast<size_t>(num_tokens) * num_topk +
              static_cast<size_t>(num_experts) * words);
}

size_t LLCombineSendSharedBytes(int num_local_experts) {
  return static_cast<size_t>(kWarps) * kBulkStages * kBulkPart +
         4 * (static_cast<size_t>(num_local_experts) + 1);
}

size_t LLRecvSharedBytes(int num_ranks, int num_local_experts) {
  return 4 * (static_cast<size_t>(num_local_experts) * num_ranks + num_local_experts);
}

namespace {

// The constant header of rank `rank`'s workspace: sizes, layout and the peers' addresses as
// this rank sees them.
LLWorkspace LLHeader(int rank, int num_ranks, int max_tokens, int num_topk, int num_local_experts,
                     int hidden, const LLLayout& layout, ErrorRecord* error,
                     LLWorkspace* const* peers) {
  LLWorkspace h{};
  for (int p = 0; p < num_ranks; ++p) h.peers[p] = peers[p];
  h.error = error;
  h.rank = rank;
  h.num_ranks = num_ranks;
  h.max_tokens = max_tokens;
  h.num_topk = num_topk;
  h.num_local_experts = num_local_experts;
  h.hidden = hidden;
  h.layout = layout;
  return h;
}

bool LLSizesValid(int num_ranks, int max_tokens, int num_topk, int hidden) {
  return num_ranks >= 1 && num_ranks <= kMaxRanks && max_tokens >= 1 && num_topk >= 1 &&
         num_topk <= kLLMaxTopk && hidden % 16 == 0;
}

}  // namespace

cudaError_t CreateLLWorkspaces(int num_ranks, const int* devices, int max_tokens, int num_topk,
                               int num_local_experts, int hidden, bool copy_engine,
                               ErrorRecord* const* errors, LLWorkspace** workspaces) {
  if (!LLSizesValid(num_ranks, max_tokens, num_topk, hidden)) return cudaErrorInvalidValue;
  const DeviceGuard restore_device;
  for (int r = 0; r < num_ranks; ++r) workspaces[r] = nullptr;
  const LLLayout l =
      ComputeLLLayout(num_ranks, max_tokens, num_topk, num_local_experts, hidden, copy_engine);
  const size_t bytes = static_cast<size_t>(l.total_bytes);
  cudaError_t err = cudaSuccess;
  for (int r = 0; r < num_ranks && err == cudaSuccess; ++r) {
    if ((err = cudaSetDevice(devices[r])) != cudaSuccess) break;
    if ((err = cudaMalloc(&workspaces[r], bytes)) != cudaSuccess) break;
    if ((err = cudaMemset(workspaces[r], 0, bytes)) != cudaSuccess) break;
    err = LoadLLModule();
  }
  for (int r = 0; r < num_ranks && err == cudaSuccess; ++r) {
    const LLWorkspace h = LLHeader(r, num_ranks, max_tokens, num_topk, num_local_experts, hidden,
                                   l, errors[r], workspaces);
    if ((err = cudaSetDevice(devices[r])) == cudaSuccess) {
      err = cudaMemcpy(workspaces[r], &h, sizeof(h), cudaMemcpyHostToDevice);
    }
  }
  if (err != cudaSuccess) DestroyLLWorkspaces(num_ranks, devices, workspaces);
  return err;
}

cudaError_t InitProcessLLWorkspace(int device, int rank, int num_ranks, int max_tokens,
                                   int num_topk, int num_local_experts, int hidden,
                                   ErrorRecord* error, LLWorkspace* const* peers) {
  if (!LLSizesValid(num_ranks, max_tokens, num_topk, hidden) || rank < 0 || rank >= num_ranks) {
    return cudaErrorInvalidValue;
  }
  const DeviceGuard restore_device;
  const LLLayout l =
      ComputeLLLayout(num_ranks, max_tokens, num_topk, num_local_experts, hidden, false);
  cudaError_t err = cudaSetDevice(device);
  if (err == cudaSuccess) err = cudaMemset(peers[rank], 0, static_cast<size_t>(l.total_bytes));
  if (err == cudaSuccess) err = LoadLLModule();
  if (err == cudaSuccess) {
    const LLWorkspace h = LLHeader(rank, num_ranks, max_tokens, num_topk, num_local_experts,
                                   hidden, l, error, peers);
    err = cudaMemcpy(peers[rank], &h, sizeof(h), cudaMemcpyHostToDevice);
  }
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  return err;
}

cudaError_t DestroyLLWorkspaces(int num_ranks, const int* devices, LLWorkspace** workspaces) {
  const DeviceGuard restore_device;
  cudaError_t first = cudaSuccess;
  for (int r = 0; r < num_ranks; ++r) {
    if (!workspaces[r] || cudaSetDevice(devices[r]) != cudaSuccess) continue;
    cudaError_t e = cudaDeviceSynchronize();
    e = e != cudaSuccess ? e : cudaFree(workspaces[r]);
    workspaces[r] = nullptr;
    if (first == cudaSuccess) first = e;
  }
  return first;
}

cudaError_t CreateLLCopyEngines(int num_ranks, const int* devices, LLWorkspace* const* workspaces,
                                const LLLayout& layout, LLCopyEngines* engines) {
  if (!layout.copy_engine) return cudaErrorInvalidValue;
  const DeviceGuard restore_device;
  cudaError_t err = cudaSuccess;
  for (int r = 0; r < num_ranks && err == cudaSuccess; ++r) {
    LLCopyEngines& c = engines[r];
    c.rank = r;
    c.num_ranks = num_ranks;
    c.layout = layout;
    for (int d = 0; d < num_ranks; ++d) c.peers[d] = workspaces[d];
    if ((err = cudaSetDevice(devices[r])) != cudaSuccess) break;
    if ((err = cudaEventCreateWithFlags(&c.packed, cudaEventDisableTiming)) != cudaSuccess) break;
    err = cudaStreamCreateWithFlags(&c.stream, cudaStreamNonBlocking);
  }
  if (err != cudaSuccess) DestroyLLCopyEngines(num_ranks, devices, engines);
  return err;
}

void DestroyLLCopyEngines(int num_ranks, const int* devices, LLCopyEngines* engines) {
  const DeviceGuard restore_device;
  for (int r = 0; r < num_ranks; ++r) {
    LLCopyEngines& c = engines[r];
    std::lock_guard<std::mutex> lock(c.mutex);
    if (cudaSetDevice(devices[r]) != cudaSuccess) continue;
    if (c.stream) cudaStreamSynchronize(c.stream);
    for (auto& per_buffer : c.graphs) {
      for (LLCopyGraph& g : per_buffer) {
        if (g.exec) cudaGraphExecDestroy(g.exec);
        g = LLCopyGraph{};
      }
    }
    if (c.stream) cudaStreamDestroy(c.stream);
    if (c.packed) cudaEventDestroy(c.packed);
    c.stream = nullptr;
    c.packed = nullptr;
  }
}

unsigned long long LLCopyEngineSends(LLCopyEngines& engines) {
  std::lock_guard<std::mutex> lock(engines.mutex);
  return engines.calls;
}

namespace {

// Instantiates the copy graph of `buffer` (2 or 3) for bundles of `bytes` (see LLCopyEngines).
cudaError_t BuildCopyGraph(const LLCopyEngines& c, int buffer, size_t bytes,
                           cudaGraphExec_t* exec) {
  const int me = c.rank, R = c.num_ranks;
  auto at = [](LLWorkspace* w, int64_t off) { return reinterpret_cast<char*>(w) + off; };
  cudaGraph_t graph = nullptr;
  cudaError_t err = cudaGraphCreate(&graph, 0);
  for (int d = 0; d < R && err == cudaSuccess; ++d) {
    if (d == me) continue;
    cudaGraphNode_t data = nullptr, signal = nullptr;
    err = cudaGraphAddMemcpyNode1D(&data, graph, nullptr, 0,
                                   at(c.peers[d], LLInboxOffset(c.layout, R, buffer, me)),
                                   at(c.peers[me], LLOutboxOffset(c.layout, R, buffer, d)), bytes,
                                   cudaMemcpyDeviceToDevice);
    if (err != cudaSuccess) break;
    err = cudaGraphAddMemcpyNode1D(
        &signal, graph, &data, 1,
        &c.peers[d]->dispatch_arrived[buffer][me], &c.peers[me]->dispatch_uses[buffer],
        sizeof(unsigned long long), cudaMemcpyDeviceToDevice);
  }
  if (err == cudaSuccess) err = cudaGraphInstantiate(exec, graph, 0);
  if (graph) cudaGraphDestroy(graph);
  return err;
}

// The cached copy graph of `buffer` for `bytes`, instantiated on first use (replacing the
// oldest of that buffer's; a replaced graph still running is freed when it completes).
cudaError_t CopyGraph(LLCopyEngines& c, int buffer, size_t bytes, cudaGraphExec_t* exec) {
  const int set = buffer - kLLFirstCopyBuffer;
  for (const LLCopyGraph& g : c.graphs[set]) {
    if (g.exec && g.bytes == bytes) {
      *exec = g.exec;
      return cudaSuccess;
    }
  }
  cudaGraphExec_t made = nullptr;
  if (cudaError_t err = BuildCopyGraph(c, buffer, bytes, &made); err != cudaSuccess) return err;
  LLCopyGraph& slot = c.graphs[set][c.next_slot[set]];
  c.next_slot[set] = (c.next_slot[set] + 1) % kLLCopyGraphsPerBuffer;
  if (slot.exec) cudaGraphExecDestroy(slot.exec);
  slot = LLCopyGraph{bytes, made};
  *exec = made;
  return cudaSuccess;
}

}  // namespace

cudaError_t LaunchLLDispatchSend(const LLDispatchSendArgs& args, cudaStream_t stream,
                                 LLCopyEngines* engines) {
  LLDispatchSendArgs a = args;
  std::unique_lock<std::mutex> lock;
  cudaGraphExec_t copies = nullptr;
  cudaError_t err = cudaSuccess;
  a.buffer = -1;
  if (engines) {  // everything that may fail comes before the kernel, which claims the call
    lock = std::unique_lock<std::mutex>(engines->mutex);
    a.buffer = kLLFirstCopyBuffer + static_cast<int>(engines->calls & 1);
    const int elem = static_cast<int>(LLElemBytes(a.fp8, a.x_dtype == 0 ? 2 : 4));
    const size_t bytes = static_cast<size_t>(LLBundleUsedBytes(
        engines->layout.counts_bytes, a.num_tokens, engines->layout.meta_ints, elem,
        a.shape.hidden));
    if ((err = CopyGraph(*engines, a.buffer, bytes, &copies)) != cudaSuccess) return err;
  }
  const size_t smem =
      LLSendSharedBytes(a.num_tokens, a.num_topk, a.num_experts);
  const int items = a.num_tokens * Chunks(a.shape.hidden);
  // One block more than the rows need: the last one writes the counts (see the kernel).
  const int blocks = DefaultBlocks(a.num_sms, (items + kWarps - 1) / kWarps + 1);
  if (a.x_dtype == 0) {
    LLDispatchSendKernel<__nv_bfloat16><<<blocks, kThreads, smem, stream>>>(a);
  } else {
    LLDispatchSendKernel<float><<<blocks, kThreads, smem, stream>>>(a);
  }
  if ((err = cudaGetLastError()) != cudaSuccess || !engines) return err;

  // Copy-engine send: the copy graph on jaxep's stream, after the kernel.
  LLCopyEngines& c = *engines;
  ++c.calls;  // the kernel has claimed the buffer: the next send takes the other one
  if ((err = cudaEventRecord(c.packed, stream)) != cudaSuccess) return err;
  if ((err = cudaStreamWaitEvent(c.stream, c.packed, 0)) != cudaSuccess) return err;
  return cudaGraphLaunch(copies, c.stream);
}

cudaError_t LaunchLLDispatchRecv(const LLDispatchRecvArgs& a, cudaStream_t stream) {
  const size_t smem = LLRecvSharedBytes(a.shape.num_ranks, a.shape.num_local_experts);
  const int blocks = DefaultBlocks(a.num_sms, 1 << 20);
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
  const bool bf16 = s.x_dtype == 0;
  switch (r.elem_bytes) {
    case 1:
      return bf16 ? LaunchAllResident(LLDispatchKernel<__nv_bfloat16, 1>, blocks, smem, stream, sa, r)
                  : LaunchAllResident(LLDispatchKernel<float, 1>, blocks, smem, stream, sa, r);
    case 2: return LaunchAllResident(LLDispatchKernel<__nv_bfloat16, 2>, blocks, smem, stream, sa, r);
    case 4: return LaunchAllResident(LLDispatchKernel<float, 4>, blocks, smem, stream, sa, r);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t LaunchLLCombineSend(const LLCombineSendArgs& a, cudaStream_t stream) {
  const size_t smem = LLCombineSendSharedBytes(a.shape.num_local_experts);
  const int blocks = DefaultBlocks(a.num_sms, 1 << 20);
  if (a.elem_bytes == 2) {
    LLCombineSendKernel<__nv_bfloat16><<<blocks, kThreads, smem, stream>>>(a);
  } else {
    LLCombineSendKernel<float><<<blocks, kThreads, smem, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t LaunchLLCombineSendReduced(const LLCombineSendReducedArgs& a, cudaStream_t stream) {
  const int items = a.shape.num_ranks * a.num_tokens * Chunks(a.shape.hidden);
  // At most one block per SM: a block waits for weights that the other blocks push (see
  // low_latency.h).
  const int blocks =
      min(DefaultBlocks(a.num_sms, (items + kWarps - 1) / kWarps), DeviceSmCount());
  return a.elem_bytes == 2
             ? LaunchAllResident(LLCombineSendReducedKernel<__nv_bfloat16>, blocks, 0, stream, a)
             : LaunchAllResident(LLCombineSendReducedKernel<float>, blocks, 0, stream, a);
}

cudaError_t LaunchLLCombine(const LLCombineSendArgs& s, const LLCombineRecvArgs& r,
                            cudaStream_t stream) {
  const size_t smem = LLCombineSendSharedBytes(s.shape.num_local_experts);
  const int blocks = min(DefaultBlocks(s.num_sms, 1 << 20), DeviceSmCount());  // all resident
  return s.elem_bytes == 2
             ? LaunchAllResident(LLCombineKernel<__nv_bfloat16>, blocks, smem, stream, s, r)
             : LaunchAllResident(LLCombineKernel<float>, blocks, smem, stream, s, r);
}

cudaError_t LaunchLLCombineReduced(const LLCombineSendReducedArgs& s, const LLCombineRecvArgs& r,
                                   cudaStream_t stream) {
  const int blocks = min(DefaultBlocks(s.num_sms, 1 << 20), DeviceSmCount());  // all resident
  return s.elem_bytes == 2
             ? LaunchAllResident(LLCombineReducedKernel<__nv_bfloat16>, blocks, 0, stream, s, r)
             : LaunchAllResident(LLCombineReducedKernel<float>, blocks, 0, stream, s, r);
}

cudaError_t LaunchLLCombineRecv(const LLCombineRecvArgs& a, cudaStream_t stream) {
  const int items = a.num_tokens * Chunks(a.shape.hidden);
  const int blocks = DefaultBlocks(a.num_sms, (items + kWarps - 1) / kWarps);
  if (a.elem_bytes == 2) {
    LLCombineRecvKernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(a);
  } else {
    LLCombineRecvKernel<float><<<blocks, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace jaxep
