// Low-latency dispatch / combine kernels (see low_latency.h for the design and the protocol).
//
// One launch per phase on the caller's stream:
//   dispatch send: routing in shared memory (every block), wait for the buffers' release,
//                  per-(token, 512-channel chunk) warps read x once, quantise (fp8) and write
//                  the chunk to each destination rank; the last block raises the flags.
//   dispatch recv: wait for every source's flag, fan each received row out to its local
//                  experts' output rows; padding; the last block acknowledges.
//   combine send:  per-(valid row, chunk) warps write y to the source's [token][k] slot.
//   combine recv:  wait, weighted float32 sum over k per (token, chunk); acknowledge.
// Received data is read with ld.global.cg (L2; a slot is rewritten every second call, so L1
// must never serve it), flags with acquire/release at system scope; waits are bounded.
#include "low_latency.h"

#include <cuda_bf16.h>
#include <cuda_fp8.h>

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

__device__ __forceinline__ char* RowSlot(LLWorkspace* w, int p, int src, int i) {
  const int64_t idx = (static_cast<int64_t>(p) * w->num_ranks + src) * w->max_tokens + i;
  return Region(w, w->rows_off) + idx * w->slot_bytes;
}

__device__ __forceinline__ int32_t* RowMeta(LLWorkspace* w, int p, int src, int i) {
  const int64_t idx = (static_cast<int64_t>(p) * w->num_ranks + src) * w->max_tokens + i;
  return reinterpret_cast<int32_t*>(Region(w, w->meta_off)) + idx * w->meta_ints;
}

__device__ __forceinline__ int32_t* Counts(LLWorkspace* w, int p, int src) {
  const int64_t idx = (static_cast<int64_t>(p) * w->num_ranks + src) * (w->num_local_experts + 1);
  return reinterpret_cast<int32_t*>(Region(w, w->counts_off)) + idx;
}

__device__ __forceinline__ char* CombineSlot(LLWorkspace* w, int p, int t, int k) {
  const int64_t idx = (static_cast<int64_t>(p) * w->max_tokens + t) * w->num_topk + k;
  return Region(w, w->combine_off) + idx * w->slot_bytes;
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

template <typename T>
__device__ __forceinline__ void Store16(T* dst, const float* v) {
  constexpr int kVec = sizeof(T);
  int4 raw[kVec];
  if constexpr (sizeof(T) == 2) {
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  } else {
    float* f = reinterpret_cast<float*>(raw);
#pragma unroll
    for (int i = 0; i < 16; ++i) f[i] = v[i];
  }
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

// ---- last-block completion ------------------------------------------------------------------

// Every thread: make this block's writes (and finished reads) visible system-wide. Returns true
// in thread 0 of the last block of the grid to get here (it then resets the ticket).
__device__ __forceinline__ bool LastBlock(LLWorkspace* ws, int ticket_index) {
  __shared__ bool s_last;
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned ticket = atomicAdd(&ws->ticket[ticket_index], 1u);
    s_last = ticket == gridDim.x - 1;
    if (s_last) {
      ws->ticket[ticket_index] = 0;
      __threadfence_system();
    }
  }
  __syncthreads();
  return s_last && threadIdx.x == 0;
}

// Threads r < R: wait until flags[r] >= want (bounded); then the whole block continues.
__device__ __forceinline__ void WaitPeers(LLWorkspace* ws, const unsigned long long* flags,
                                          unsigned long long want, int phase,
                                          unsigned long long timeout_ns) {
  if (static_cast<int>(threadIdx.x) < ws->num_ranks) {
    WaitAtLeast(flags + threadIdx.x, want, ws->error, ws->rank, threadIdx.x, phase, timeout_ns);
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

// ---- dispatch send ---------------------------------------------------------------------------

template <typename TIn>
__global__ void __launch_bounds__(kThreads) LLDispatchSendKernel(LLDispatchSendArgs a) {
  LLWorkspace* ws = a.ws;
  const int R = ws->num_ranks, me = ws->rank, Tmax = ws->max_tokens, El = ws->num_local_experts;
  const int H = ws->hidden;
  const int T = a.num_tokens, K = a.num_topk, E = a.num_experts;
  const int W = (T + 31) / 32;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const unsigned long long seq = ws->seq[kDispatchSendCtr] + 1;
  const int p = static_cast<int>(seq & 1);

  extern __shared__ int32_t smem[];
  int32_t* s_rank = smem;                                        // [E]
  int32_t* s_slot = s_rank + E;                                  // [E]
  int32_t* s_idx = s_slot + E;                                   // [T*K] sanitised ids
  uint32_t* s_emask = reinterpret_cast<uint32_t*>(s_idx + T * K);  // [E][W] tokens per expert
  uint32_t* s_rmask = s_emask + static_cast<size_t>(E) * W;      // [R][W] tokens per rank
  __shared__ int s_invalid;

  // 1. Routing (each block redundantly: T*K is small in this mode).
  for (int e = tid; e < E; e += kThreads) {
    s_rank[e] = a.expert_rank[e];
    s_slot[e] = a.expert_slot[e];
  }
  for (int i = tid; i < (E + R) * W; i += kThreads) s_emask[i] = 0;
  if (tid == 0) s_invalid = 0;
  int invalid = 0;
  for (int i = tid; i < T * K; i += kThreads) {
    const int e = a.topk_idx[i];
    const bool ok = e >= 0 && e < E;
    invalid += !ok && e != -1;
    s_idx[i] = ok ? e : -1;
  }
  __syncthreads();  // s_invalid = 0 is visible before any thread adds to it
  if (invalid) atomicAdd(&s_invalid, invalid);
  for (int i = tid; i < T * K; i += kThreads) {
    const int e = s_idx[i];
    if (e < 0) continue;
    const int t = i / K, k = i - t * K;
    bool first = true;
    for (int j = 0; j < k; ++j) first &= s_idx[t * K + j] != e;
    if (!first) continue;
    const uint32_t bit = 1u << (t & 31);
    atomicOr(&s_emask[static_cast<size_t>(e) * W + (t >> 5)], bit);
    atomicOr(&s_rmask[s_rank[e] * W + (t >> 5)], bit);
  }
  // 2. The destinations must have read the call that last used this parity (call - 2).
  WaitPeers(ws, ws->dispatch_ack[p], seq > 2 ? seq - 2 : 0, kLLDispatchSend, a.timeout_ns);

  // 3. Block 0: per-(destination, local expert) counts and rows per destination.
  if (blockIdx.x == 0) {
    for (int e = tid; e < E; e += kThreads) {
      Counts(ws->peers[s_rank[e]], p, me)[s_slot[e]] = PopcAll(s_emask + static_cast<size_t>(e) * W, W);
    }
    if (tid < R) Counts(ws->peers[tid], p, me)[El] = PopcAll(s_rmask + tid * W, W);
    if (tid == 0) a.info[0] = s_invalid;
  }

  // 4. Rows: warp per (token, 512-channel chunk); x is read once, written once per rank.
  const int chunks = (H + kLLChunk - 1) / kLLChunk;
  const int items = T * chunks;
  for (int item = blockIdx.x * kWarps + warp; item < items; item += gridDim.x * kWarps) {
    const int t = item / chunks, c = item - t * chunks;
    const int h0 = c * kLLChunk + lane * kPerLane;
    const bool active = h0 < H;
    int my_i = -1;  // lane d < R: index of token t among my tokens sent to rank d
    if (lane < R && (s_rmask[lane * W + (t >> 5)] >> (t & 31)) & 1u) {
      my_i = PopcBelow(s_rmask + lane * W, t);
    }
    constexpr int kVec = sizeof(TIn);  // int4s per lane (16 elements)
    int4 raw[kVec];
    if (active) {
      const int4* src = reinterpret_cast<const int4*>(
          static_cast<const TIn*>(a.x) + static_cast<size_t>(t) * H + h0);
#pragma unroll
      for (int j = 0; j < kVec; ++j) raw[j] = src[j];
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) raw[j] = make_int4(0, 0, 0, 0);
    }
    int4 q = make_int4(0, 0, 0, 0);
    float scale = 0.f;
    if (a.fp8) {
      float v[kPerLane];
      Load16(reinterpret_cast<const TIn*>(raw), v, false);
      scale = Quantize16(v, a.round_scale, q);
    }
    // Row metadata (chunk 0): token, then per top-k entry (local expert * T_max + row within
    // it) or -1, then per entry the weight summed over the entry's duplicates (first only).
    int entry_e = -1, entry_rank = -1, entry_j = -1;
    float entry_w = 0.f;
    if (c == 0 && lane < K) {
      const int e = s_idx[t * K + lane];
      bool first = e >= 0;
      for (int j = 0; j < lane && first; ++j) first = s_idx[t * K + j] != e;
      if (first) {
        entry_e = e;
        entry_rank = s_rank[e];
        entry_j = PopcBelow(s_emask + static_cast<size_t>(e) * W, t);
        if (a.weights) {
          for (int j = lane; j < K; ++j) {
            if (s_idx[t * K + j] == e) entry_w += a.weights[static_cast<size_t>(t) * K + j];
          }
        }
      }
    }
    for (int d = 0; d < R; ++d) {
      const int i = __shfl_sync(kFull, my_i, d);
      if (i < 0) continue;
      LLWorkspace* peer = ws->peers[d];
      char* slot = RowSlot(peer, p, me, i);
      if (active) {
        if (a.fp8) {
          *reinterpret_cast<int4*>(slot + h0) = q;
          if ((lane & 7) == 0) reinterpret_cast<float*>(slot + H)[h0 / 128] = scale;
        } else {
          int4* dst = reinterpret_cast<int4*>(slot + static_cast<size_t>(h0) * sizeof(TIn));
#pragma unroll
          for (int j = 0; j < kVec; ++j) dst[j] = raw[j];
        }
      }
      if (c == 0) {
        int32_t* meta = RowMeta(peer, p, me, i);
        if (lane == 0) meta[0] = t;
        if (lane < K) {
          const bool here = entry_e >= 0 && entry_rank == d;
          meta[1 + lane] = here ? s_slot[entry_e] * Tmax + entry_j : -1;
          meta[1 + K + lane] = __float_as_int(here ? entry_w : 0.f);
        }
      }
    }
  }

  // 5. The last block announces the call to every destination.
  if (LastBlock(ws, kDispatchSendTicket)) {
    for (int d = 0; d < R; ++d) StoreRelease(&ws->peers[d]->dispatch_flag[p][me], seq);
    ws->seq[kDispatchSendCtr] = seq;
    a.info[1] = static_cast<int32_t>(seq & 0xffffffffu);
    a.info[2] = static_cast<int32_t>(seq >> 32);
  }
}

// ---- dispatch recv ---------------------------------------------------------------------------

template <int kElem>  // payload element bytes: 1 (e4m3), 2 (bf16), 4 (f32)
__global__ void __launch_bounds__(kThreads) LLDispatchRecvKernel(LLDispatchRecvArgs a) {
  LLWorkspace* ws = a.ws;
  const int R = ws->num_ranks, me = ws->rank, Tmax = ws->max_tokens, El = ws->num_local_experts;
  const int H = ws->hidden, K = ws->num_topk, T = a.num_tokens, RT = R * T;
  const int G = H / 128, GW = (G + 3) / 4;
  const size_t row_bytes = static_cast<size_t>(H) * kElem;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const unsigned long long seq = CallNumber(a.info + 1);  // the send's, not a counter
  const int p = static_cast<int>(seq & 1);

  extern __shared__ int32_t smem[];
  int32_t* s_off = smem;              // [E_l][R]: first output row of source s in expert l
  int32_t* s_total = s_off + El * R;  // [E_l]
  __shared__ int s_rows[kMaxRanks + 1];  // prefix of rows received per source

  WaitPeers(ws, ws->dispatch_flag[p], seq, kLLDispatchRecv, a.timeout_ns);

  for (int l = tid; l < El; l += kThreads) {
    int acc = 0;
    for (int s = 0; s < R; ++s) {
      s_off[l * R + s] = acc;
      acc += __ldcg(Counts(ws, p, s) + l);
    }
    s_total[l] = acc;
    if (blockIdx.x == 0) a.counts[l] = acc;
  }
  if (tid == 0) {
    int acc = 0;
    for (int s = 0; s < R; ++s) {
      s_rows[s] = acc;
      acc += __ldcg(Counts(ws, p, s) + El);
    }
    s_rows[R] = acc;
    if (blockIdx.x == 0) a.num_invalid[0] = a.info[0];
  }
  __syncthreads();

  // Received rows: warp per (row, chunk); each row fans out to its local experts.
  const int chunks = (H + kLLChunk - 1) / kLLChunk;
  const int items = s_rows[R] * chunks;
  for (int item = blockIdx.x * kWarps + warp; item < items; item += gridDim.x * kWarps) {
    const int q = item / chunks, c = item - q * chunks;
    int s = 0;
    while (q >= s_rows[s + 1]) ++s;
    const int i = q - s_rows[s];
    const int32_t* meta = RowMeta(ws, p, s, i);
    const int t = __ldcg(meta);
    const int ent = lane < K ? __ldcg(meta + 1 + lane) : -1;
    const float w = lane < K ? __int_as_float(__ldcg(meta + 1 + K + lane)) : 0.f;
    const char* slot = RowSlot(ws, p, s, i);
    const int h0 = c * kLLChunk + lane * kPerLane;
    const bool active = h0 < H;
    constexpr int kVec = kElem;  // int4s per lane (16 elements)
    int4 v[kVec];
    if (active) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[j] = __ldcg(reinterpret_cast<const int4*>(slot + h0 * kElem) + j);
    }
    float scale = 0.f;
    if constexpr (kElem == 1) {
      if (active && (lane & 7) == 0) scale = __ldcg(reinterpret_cast<const float*>(slot + H) + h0 / 128);
    }
    // UE8M0: the chunk's 4 groups are exactly packed word c (groups past G pad with 127).
    unsigned packed = 0;
    if constexpr (kElem == 1) {
      if (a.ue8m0) {
#pragma unroll
        for (int g = 0; g < 4; ++g) {
          const float sg = __shfl_sync(kFull, scale, 8 * g);
          const unsigned ex = 4 * c + g < G ? (__float_as_uint(sg) >> 23) & 0xFFu : 127u;
          packed |= ex << (8 * g);
        }
      }
    }
    for (int k = 0; k < K; ++k) {
      const int e = __shfl_sync(kFull, ent, k);
      const float wk = __shfl_sync(kFull, w, k);
      if (e < 0) continue;
      const int l = e / Tmax, row = s_off[l * R + s] + (e - l * Tmax);
      const size_t out_row = static_cast<size_t>(l) * RT + row;
      char* dst = static_cast<char*>(a.x) + out_row * row_bytes + static_cast<size_t>(h0) * kElem;
      if (active) {
        if constexpr (kElem > 1) {
          if (a.weighted) {
            float f[kPerLane];
            if constexpr (kElem == 2) {
              Load16(reinterpret_cast<const __nv_bfloat16*>(v), f, false);
              for (int j = 0; j < kPerLane; ++j) f[j] *= wk;
              Store16(reinterpret_cast<__nv_bfloat16*>(dst), f);
            } else {
              Load16(reinterpret_cast<const float*>(v), f, false);
              for (int j = 0; j < kPerLane; ++j) f[j] *= wk;
              Store16(reinterpret_cast<float*>(dst), f);
            }
          } else {
#pragma unroll
            for (int j = 0; j < kVec; ++j) reinterpret_cast<int4*>(dst)[j] = v[j];
          }
        } else {
          *reinterpret_cast<int4*>(dst) = v[0];
          if (!a.ue8m0 && (lane & 7) == 0) {
            static_cast<float*>(a.scales)[out_row * G + h0 / 128] = scale;
          }
        }
      }
      if constexpr (kElem == 1) {
        if (a.ue8m0 && lane == 0) static_cast<int32_t*>(a.scales)[out_row * GW + c] = packed;
      }
      if (c == 0 && lane == 0) {
        a.src_index[out_row] = s * T + t;
        a.src_topk[out_row] = k;
      }
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

  // The last block tells every source that this parity may be rewritten.
  if (LastBlock(ws, kDispatchRecvTicket)) {
    for (int s = 0; s < R; ++s) StoreRelease(&ws->peers[s]->dispatch_ack[p][me], seq);
  }
}

// ---- combine send ----------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads) LLCombineSendKernel(LLCombineSendArgs a) {
  LLWorkspace* ws = a.ws;
  const int R = ws->num_ranks, me = ws->rank, El = ws->num_local_experts, H = ws->hidden;
  const int Tn = a.num_tokens, RT = R * Tn;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const unsigned long long seq = ws->seq[kCombineSendCtr] + 1;
  const int p = static_cast<int>(seq & 1);
  extern __shared__ int32_t smem[];
  int32_t* s_base = smem;  // [E_l + 1]: first valid-row index of each local expert

  if (tid == 0) {
    int acc = 0;
    for (int l = 0; l < El; ++l) {
      s_base[l] = acc;
      acc += min(max(a.counts[l], 0), RT);
    }
    s_base[El] = acc;
  }
  WaitPeers(ws, ws->combine_ack[p], seq > 2 ? seq - 2 : 0, kLLCombineSend, a.timeout_ns);

  const int chunks = (H + kLLChunk - 1) / kLLChunk;
  const int items = s_base[El] * chunks;
  for (int item = blockIdx.x * kWarps + warp; item < items; item += gridDim.x * kWarps) {
    const int q = item / chunks, c = item - q * chunks;
    int lo = 0, hi = El - 1;  // the expert l with s_base[l] <= q < s_base[l + 1]
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (s_base[mid] <= q) lo = mid; else hi = mid - 1;
    }
    const size_t r = static_cast<size_t>(lo) * RT + (q - s_base[lo]);
    const int si = a.src_index[r], k = a.src_topk[r];
    const int h0 = c * kLLChunk + lane * kPerLane;
    if (si < 0 || k < 0 || h0 >= H) continue;
    const int s = si / Tn, t = si - s * Tn;
    const int4* src = reinterpret_cast<const int4*>(static_cast<const T*>(a.y) + r * H + h0);
    int4* dst = reinterpret_cast<int4*>(CombineSlot(ws->peers[s], p, t, k) + h0 * sizeof(T));
    int4 v[sizeof(T)];
#pragma unroll
    for (int j = 0; j < static_cast<int>(sizeof(T)); ++j) v[j] = src[j];
#pragma unroll
    for (int j = 0; j < static_cast<int>(sizeof(T)); ++j) dst[j] = v[j];
  }

  if (LastBlock(ws, kCombineSendTicket)) {
    for (int s = 0; s < R; ++s) StoreRelease(&ws->peers[s]->combine_flag[p][me], seq);
    ws->seq[kCombineSendCtr] = seq;
    a.info[0] = static_cast<int32_t>(seq & 0xffffffffu);
    a.info[1] = static_cast<int32_t>(seq >> 32);
  }
}

// ---- combine recv ----------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads) LLCombineRecvKernel(LLCombineRecvArgs a) {
  LLWorkspace* ws = a.ws;
  const int R = ws->num_ranks, me = ws->rank, H = ws->hidden;
  const int Tn = a.num_tokens, K = a.num_topk, E = a.num_experts;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const unsigned long long seq = CallNumber(a.info);
  const int p = static_cast<int>(seq & 1);

  WaitPeers(ws, ws->combine_flag[p], seq, kLLCombineRecv, a.timeout_ns);

  const int chunks = (H + kLLChunk - 1) / kLLChunk;
  const int items = Tn * chunks;
  for (int item = blockIdx.x * kWarps + warp; item < items; item += gridDim.x * kWarps) {
    const int t = item / chunks, c = item - t * chunks;
    // Lane k < K: the entry's id, the lane of its first listing, its weight.
    int e = lane < K ? a.topk_idx[static_cast<size_t>(t) * K + lane] : -1;
    const bool valid = lane < K && e >= 0 && e < E;
    const float wk = valid ? a.weights[static_cast<size_t>(t) * K + lane] : 0.f;
    const unsigned same = __match_any_sync(kFull, valid ? e : -2 - lane);
    const int first = __ffs(same) - 1;
    const int h0 = c * kLLChunk + lane * kPerLane;
    const bool active = h0 < H;
    float acc[kPerLane] = {};
    for (int k = 0; k < K; ++k) {
      const bool vk = __shfl_sync(kFull, valid, k);
      const int fk = __shfl_sync(kFull, first, k);
      const float w = __shfl_sync(kFull, wk, k);
      if (!active) continue;
      float v[kPerLane];
      if (vk) {
        Load16(reinterpret_cast<const T*>(CombineSlot(ws, p, t, fk)) + h0, v, true);
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

  if (LastBlock(ws, kCombineRecvTicket)) {
    for (int s = 0; s < R; ++s) StoreRelease(&ws->peers[s]->combine_ack[p][me], seq);
  }
}

int DefaultBlocks(int requested, int items_per_block_hint) {
  if (requested > 0) return requested;
  return max(1, min(DeviceSmCount(), items_per_block_hint));
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
      Fn(&LLCombineSendKernel<__nv_bfloat16>), Fn(&LLCombineSendKernel<float>),
      Fn(&LLCombineRecvKernel<__nv_bfloat16>), Fn(&LLCombineRecvKernel<float>),
  };
  for (const void* k : kernels) {
    cudaError_t e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kLLMaxSharedBytes));
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace

size_t LLWorkspaceBytes(int num_ranks, int max_tokens, int num_topk, int num_local_experts,
                        int hidden) {
  auto up = [](size_t n) { return (n + 255) & ~static_cast<size_t>(255); };
  const size_t slot = static_cast<size_t>(4) * hidden;
  const size_t meta_ints = 1 + 2 * static_cast<size_t>(num_topk);
  size_t n = up(sizeof(LLWorkspace));
  n += up(2 * static_cast<size_t>(num_ranks) * max_tokens * slot);
  n += up(2 * static_cast<size_t>(num_ranks) * max_tokens * meta_ints * 4);
  n += up(2 * static_cast<size_t>(num_ranks) * (num_local_experts + 1) * 4);
  n += up(2 * static_cast<size_t>(max_tokens) * num_topk * slot);
  return n;
}

size_t LLSendSharedBytes(int num_ranks, int num_tokens, int num_topk, int num_experts) {
  const size_t words = (static_cast<size_t>(num_tokens) + 31) / 32;
  return 4 * (2 * static_cast<size_t>(num_experts) + static_cast<size_t>(num_tokens) * num_topk +
              (static_cast<size_t>(num_experts) + num_ranks) * words);
}

size_t LLRecvSharedBytes(int num_ranks, int num_local_experts) {
  return 4 * (static_cast<size_t>(num_local_experts) * num_ranks + num_local_experts + 1);
}

cudaError_t CreateLLWorkspaces(int num_ranks, const int* devices, int max_tokens, int num_topk,
                               int num_local_experts, int hidden, ErrorRecord* const* errors,
                               LLWorkspace** workspaces) {
  if (num_ranks < 1 || num_ranks > kMaxRanks || max_tokens < 1 || num_topk < 1 ||
      num_topk > kLLMaxTopk || hidden % 16) {
    return cudaErrorInvalidValue;
  }
  int previous = 0;
  cudaGetDevice(&previous);
  for (int r = 0; r < num_ranks; ++r) workspaces[r] = nullptr;
  const size_t bytes = LLWorkspaceBytes(num_ranks, max_tokens, num_topk, num_local_experts, hidden);
  cudaError_t err = cudaSuccess;
  for (int r = 0; r < num_ranks && err == cudaSuccess; ++r) {
    if ((err = cudaSetDevice(devices[r])) != cudaSuccess) break;
    if ((err = cudaMalloc(&workspaces[r], bytes)) != cudaSuccess) break;
    if ((err = cudaMemset(workspaces[r], 0, bytes)) != cudaSuccess) break;
    err = LoadLLModule();
  }
  auto up = [](size_t n) { return (n + 255) & ~static_cast<size_t>(255); };
  for (int r = 0; r < num_ranks && err == cudaSuccess; ++r) {
    LLWorkspace h{};
    for (int p = 0; p < num_ranks; ++p) h.peers[p] = workspaces[p];
    h.error = errors[r];
    h.rank = r;
    h.num_ranks = num_ranks;
    h.max_tokens = max_tokens;
    h.num_topk = num_topk;
    h.num_local_experts = num_local_experts;
    h.hidden = hidden;
    h.slot_bytes = 4 * hidden;
    h.meta_ints = 1 + 2 * num_topk;
    size_t off = up(sizeof(LLWorkspace));
    h.rows_off = static_cast<int64_t>(off);
    off += up(2 * static_cast<size_t>(num_ranks) * max_tokens * h.slot_bytes);
    h.meta_off = static_cast<int64_t>(off);
    off += up(2 * static_cast<size_t>(num_ranks) * max_tokens * h.meta_ints * 4);
    h.counts_off = static_cast<int64_t>(off);
    off += up(2 * static_cast<size_t>(num_ranks) * (num_local_experts + 1) * 4);
    h.combine_off = static_cast<int64_t>(off);
    if ((err = cudaSetDevice(devices[r])) == cudaSuccess) {
      err = cudaMemcpy(workspaces[r], &h, sizeof(h), cudaMemcpyHostToDevice);
    }
  }
  if (err != cudaSuccess) DestroyLLWorkspaces(num_ranks, devices, workspaces);
  cudaSetDevice(previous);
  return err;
}

cudaError_t DestroyLLWorkspaces(int num_ranks, const int* devices, LLWorkspace** workspaces) {
  int previous = 0;
  cudaGetDevice(&previous);
  cudaError_t first = cudaSuccess;
  for (int r = 0; r < num_ranks; ++r) {
    if (!workspaces[r] || cudaSetDevice(devices[r]) != cudaSuccess) continue;
    cudaError_t e = cudaDeviceSynchronize();
    e = e != cudaSuccess ? e : cudaFree(workspaces[r]);
    workspaces[r] = nullptr;
    if (first == cudaSuccess) first = e;
  }
  cudaSetDevice(previous);
  return first;
}

cudaError_t LaunchLLDispatchSend(const LLDispatchSendArgs& a, cudaStream_t stream) {
  const size_t smem =
      LLSendSharedBytes(a.shape.num_ranks, a.num_tokens, a.num_topk, a.num_experts);
  const int items = a.num_tokens * Chunks(a.shape.hidden);
  const int blocks = DefaultBlocks(a.num_sms, (items + kWarps - 1) / kWarps);
  if (a.x_dtype == 0) {
    LLDispatchSendKernel<__nv_bfloat16><<<blocks, kThreads, smem, stream>>>(a);
  } else {
    LLDispatchSendKernel<float><<<blocks, kThreads, smem, stream>>>(a);
  }
  return cudaGetLastError();
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

cudaError_t LaunchLLCombineSend(const LLCombineSendArgs& a, cudaStream_t stream) {
  const size_t smem = 4 * (static_cast<size_t>(a.shape.num_local_experts) + 1);
  const int blocks = DefaultBlocks(a.num_sms, 1 << 20);
  if (a.elem_bytes == 2) {
    LLCombineSendKernel<__nv_bfloat16><<<blocks, kThreads, smem, stream>>>(a);
  } else {
    LLCombineSendKernel<float><<<blocks, kThreads, smem, stream>>>(a);
  }
  return cudaGetLastError();
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
