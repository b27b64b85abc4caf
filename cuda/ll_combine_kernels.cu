// Low-latency combine kernels and their launchers (see low_latency.h for the design and the
// protocol; ll_common.cuh for the helpers they share with the dispatch kernels).
//
// One launch per phase on the caller's stream:
//   combine send:  each valid row of y goes to its source's [token][k] slot in 4 KB bulk (TMA)
//                  copies, global -> the warp's shared buffer -> the slot (lane 0 drives them).
//                  Pre-reduced: every block pushes a share of the top-k weights to every
//                  rank (words tagged with the call), then the weighted float32 sum of a
//                  token's local rows goes to its source's [token][rank] slot, once its
//                  weights have arrived (in y's dtype or float32; a single row as it is).
//   combine recv:  wait, weighted float32 sum over k per (token, chunk) (pre-reduced: the sum
//                  of the token's per-rank rows, a single row weighted); acknowledge.
//   one kernel:    the send's body, then the recv's, in every block (LLCombineKernel,
//                  LLCombineReducedKernel): the bodies are device functions.
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>

#include "ll_common.cuh"
#include "ll_kernels.h"
#include "low_latency.h"

namespace jaxep {
namespace {

// ---- combine slots and weights (identical layout on every device) --------------------------

// Combine slot `k` (a top-k entry, or an expert rank with pre-reduction) of token t, parity p,
// in `w` (this device's or a peer's), addressed with this device's header `ws` (the layout is
// the same everywhere; reading the peer's header would cost NVLink round trips).
__device__ __forceinline__ char* CombineSlot(const LLWorkspace* ws, LLWorkspace* w, int p, int t,
                                             int k) {
  const int64_t idx =
      (static_cast<int64_t>(p) * ws->max_tokens + t) * ws->layout.combine_slots + k;
  return Region(w, ws->layout.combine_off) + idx * ws->layout.slot_bytes;
}

// The staging copy (rdma.cuh) of slot k of token t of rank s, as this rank puts it there
// (another node): one per destination slot, whatever the parity.
__device__ __forceinline__ char* StagingSlot(LLWorkspace* ws, int s, int t, int k) {
  const int64_t i = (static_cast<int64_t>(s) * ws->max_tokens + t) * ws->layout.combine_slots + k;
  return Region(ws, LLStagingSlotOffset(ws->layout, ws->num_ranks, i));
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
  SignalPeers(ws, [&](LLWorkspace* w) { return &w->combine_arrived[p][me]; });
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
      if (!Remote(ws, s)) {
        BulkStore(CombineSlot(ws, ws->peers[s], p, t, k) + off, buf, bytes);
        continue;
      }
      // Another node: staged, then put once the bulk store has landed.
      char* staged = StagingSlot(ws, s, t, k) + off;
      BulkStore(staged, buf, bytes);
      BulkStoresDone();
      PutThread(ws, s, CombineSlot(ws, ws, p, t, k) + off, staged, bytes);
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
        if (rows[j] < 0) continue;  // past the entries (warp-uniform): adds nothing, not w * 0
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
    for (int d = 0; d < R; ++d) {
      if (Remote(ws, d)) {
        PutWord(ws, d, CombineWeights(ws, ws, p, me) + i, v);
      } else {
        CombineWeights(ws, ws->peers[d], p, me)[i] = v;
      }
    }
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
    // Another node: the sum is staged in the pair's slot, then put chunk by chunk.
    const bool remote = Remote(ws, s);
    char* slot = remote ? StagingSlot(ws, s, t, me) : CombineSlot(ws, ws->peers[s], p, t, me);
    int out_bytes = static_cast<int>(sizeof(T));
    if (__popc(entries) == 1) {
      SumRowsTo<T, T>(y, H, row, 1.f, entries, g, G, reinterpret_cast<T*>(slot));
    } else {
      const float w = row >= 0 ? WaitTaggedWeight(CombineWeights(ws, ws, p, s) + t * K + lane,
                                                  seq, ws, s, a.timeout_ns) : 0.f;
      if (a.float32_partials) {
        SumRowsTo<T, float>(y, H, row, w, entries, g, G, reinterpret_cast<float*>(slot));
        out_bytes = 4;
      } else {
        SumRowsTo<T, T>(y, H, row, w, entries, g, G, reinterpret_cast<T*>(slot));
      }
    }
    if (remote) {  // warp-uniform
      __syncwarp();
      char* dst = CombineSlot(ws, ws, p, t, me);
      for (int c = g; c < chunks; c += G) {
        const size_t off = static_cast<size_t>(c) * kLLChunk * out_bytes;
        PutWarp(ws, s, dst + off, slot + off,
                static_cast<size_t>(min(kLLChunk, H - c * kLLChunk)) * out_bytes);
      }
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

  AcknowledgePeers(ws, [&](LLWorkspace* w) { return &w->combine_read[p][me]; });
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

}  // namespace

size_t LLCombineSendSharedBytes(int num_local_experts) {
  return static_cast<size_t>(kWarps) * kBulkStages * kBulkPart +
         4 * (static_cast<size_t>(num_local_experts) + 1);
}

cudaError_t LoadLLCombineKernels() {
  const void* kernels[] = {
      Fn(&LLCombineSendKernel<__nv_bfloat16>), Fn(&LLCombineSendKernel<float>),
      Fn(&LLCombineSendReducedKernel<__nv_bfloat16>), Fn(&LLCombineSendReducedKernel<float>),
      Fn(&LLCombineRecvKernel<__nv_bfloat16>), Fn(&LLCombineRecvKernel<float>),
      Fn(&LLCombineKernel<__nv_bfloat16>), Fn(&LLCombineKernel<float>),
      Fn(&LLCombineReducedKernel<__nv_bfloat16>), Fn(&LLCombineReducedKernel<float>),
  };
  return LoadKernels(kernels);
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
