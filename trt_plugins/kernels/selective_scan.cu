// Selective scan (spec 4.4, 4.5) and the decode state update.
// Prefill: v5, a single-pass chunked scan, parallel along time within a channel's lanes (description below; its
// 12-channel configuration stages token-major int8 rows by the TMA, scan_tma.cuh); from 3072 channels (int8, N = 16)
// lanes along the states (scan_lanes.cuh); for many channels one thread per channel (scan_seq_kernel), which spends
// fewer instructions per element.
// Decode: one thread per 4 states of a (b, d), coalesced 16-byte state traffic.
// Earlier versions (v1-v4) and their measurements: trt_plugins/bench/NOTES.md.
#include <type_traits>

#include "common.cuh"
#include "state_update.cuh"
#include "scan_lanes.cuh"
#include "scan_tma.cuh"

namespace {
constexpr int kMaxN = 64;
#ifndef QM_SCAN_L2_PREFETCH
#define QM_SCAN_L2_PREFETCH 1  // the chunked scan asks L2 for its next chunk (0: measure without)
#endif
#ifndef QM_SCAN_TMA
#define QM_SCAN_TMA 1  // token-major int8 staging by the TMA in the 12-channel configuration (scan_tma.cuh; 0: threads)
#endif

using qm::aligned;

// Copies BYTES bytes from shared memory (aligned to min(BYTES, 16)) in 16/8/4-byte pieces.
template <int BYTES, typename Tv>
__device__ __forceinline__ void load_vec(Tv* dst, const unsigned char* src) {
  static_assert(BYTES % 4 == 0 && sizeof(Tv) * (BYTES / sizeof(Tv)) == BYTES, "whole 4-byte words");
  if constexpr (BYTES % 16 == 0) {
#pragma unroll
    for (int i = 0; i < BYTES / 16; ++i) reinterpret_cast<int4*>(dst)[i] = reinterpret_cast<const int4*>(src)[i];
  } else if constexpr (BYTES % 8 == 0) {
#pragma unroll
    for (int i = 0; i < BYTES / 8; ++i) reinterpret_cast<int2*>(dst)[i] = reinterpret_cast<const int2*>(src)[i];
  } else {
#pragma unroll
    for (int i = 0; i < BYTES / 4; ++i) reinterpret_cast<int*>(dst)[i] = reinterpret_cast<const int*>(src)[i];
  }
}

// Prefill (v5, a generalization of v4): a single-pass chunked scan, parallel along time across a channel's lanes. A
// block of W warps owns CPB = W * 32 / LPC channels of one batch row; each channel is served by LPC lanes (32, 16 or
// 8) of one warp and time is walked in chunks of CH = LPC * T steps staged in shared memory. Lane s of a channel
// owns the T consecutive steps [s*T, s*T + T) of the chunk. For each state n the lane computes dA =
// exp2(delta*A*log2 e) and dBu = delta*u*B once (kept in registers), composes them into its segment's affine map h
// -> P*h + S, a scan over the channel's LPC maps (shuffles within the LPC-lane segment) gives each lane its starting
// state, and a second pass over the registers produces h and y += h*C. The chunk's carry per n is the channel's
// total map applied to the previous carry. One exp per (b, t, d, n), no global round trip, no __syncthreads inside
// the recurrence. Fast float32 math: y feeds no quantizer directly (spec 4.4, "Exactness"), outputs are compared
// with a tolerance. LPC, W and T trade parallelism against instructions per element: trt_plugins/bench/NOTES.md.
// K > 1 (LPC = 32): K warps per channel own consecutive pieces of a chunk of K * 32 * T steps; for each state the
// warps' total maps meet in shared memory at a named barrier per channel, and warp k composes those of warps < k
// onto the chunk's carry (more warps per channel where too few channels fill the GPU).
template <int N, bool kInt8, int T_, int LPC_, int W_, int K_ = 1>
struct ScanCfg {
  static_assert(LPC_ == 8 || LPC_ == 16 || LPC_ == 32, "lanes per channel");
  static_assert(T_ % 4 == 0, "steps per lane come in float4 rows");
  static_assert(K_ == 1 || (LPC_ == 32 && W_ % K_ == 0), "several warps per channel: whole warps per channel");
  static constexpr int T = T_, LPC = LPC_, W = W_, K = K_;
  static constexpr int THREADS = 32 * W;
  static constexpr int CPW = 32 / LPC;           // channels per warp (K = 1)
  static constexpr int CPB = W * CPW / K;        // channels per block
  static constexpr int SEG = K * LPC;            // segments (lanes) per channel
  static constexpr int CH = SEG * T;             // steps per chunk
  static constexpr int LS = T == 4 ? 4 : T + 4;  // words per lane in a B/C/y row: an odd multiple of 4 words
  static constexpr int ROW = SEG * LS;           //   makes the lanes' 16-byte accesses bank-conflict free
  // step t of a chunk in a padded row (B, C, y): lane t / T's T words
  static __device__ __forceinline__ int step_at(int t) { return (t / T) * LS + t % T; }
  static constexpr int ESZ = kInt8 ? 1 : 4;      // bytes per staged u/dt/z element
  static constexpr int IN_BYTES = (kInt8 ? 4 : 3) * CH * ESZ;  // u, dt, z (+ mask) of one channel
  // one channel's region; reused for its y (a padded row) after the recurrence. +16 bytes: regions of
  // neighbouring channels start 4 banks apart.
  static constexpr int CH_BYTES = (IN_BYTES > 4 * ROW ? IN_BYTES : 4 * ROW) + 16;
  // B, C rows; the channels' regions; A * log2 e and the carries; with K > 1 the warps' maps (two sets: by state parity)
  static constexpr size_t SMEM =
      2ull * N * ROW * 4 + CPB * CH_BYTES + 2ull * CPB * N * 4 + (K > 1 ? 2ull * CPB * K * 2 * 4 : 0);
  static constexpr int WARPS_PER_SM = T <= 8 ? 24 : 16;  // resident warps per SM the registers are sized for
  static constexpr int MIN_BLOCKS = WARPS_PER_SM / W > 0 ? WARPS_PER_SM / W : 1;
  static constexpr int PB = CPB % 8 == 0 ? 8 : 4;  // channels per vector piece (staging, write-out)
  static_assert(CPB % 4 == 0, "channels per block come in fours");
  static_assert(K == 1 || CPB <= 15, "one named barrier per channel (ids 1..15)");
};

// The K warps of channel ch (K > 1) meet: named barrier 1 + ch. The non-aligned form: bar.sync (.aligned) needs the
// warp converged, which it is not right after a store by one lane (one configuration returned garbage with it).
__device__ __forceinline__ void channel_barrier(int ch, int threads) {
  asm volatile("barrier.sync %0, %1;" ::"r"(1 + ch), "r"(threads) : "memory");
}

// One level of the scan over a channel's maps: lane s composes its map with the one of lane s - off. The
// shuffle reports whether that lane is inside the channel's segment, and the compose runs predicated on it.
template <int LPC>
__device__ __forceinline__ void scan_level(float& pa, float& pb, int off) {
  asm("{\n\t.reg .pred p;\n\t.reg .f32 qa, qb;\n\t"
      "shfl.sync.up.b32 qa|p, %0, %2, %3, 0xffffffff;\n\t"
      "shfl.sync.up.b32 qb, %1, %2, %3, 0xffffffff;\n\t"
      "@p fma.rn.f32 %1, %0, qb, %1;\n\t"
      "@p mul.rn.f32 %0, %0, qa;\n\t}"
      : "+f"(pa), "+f"(pb)
      : "r"(off), "n"((32 - LPC) << 8));
}

// The int8 B and C of a chunk, 16-byte aligned (vec): a thread converts 4 consecutive steps of 8 or 16 states (one
// load per step) and writes one float4 per state, the 4 steps being adjacent in a lane's row. Split in two so that
// the first chunk's loads can be issued before the block's prologue and land while it runs.
template <int N, class C>
struct BcPieces {
  static constexpr int T = C::T, CH = C::CH;
  static_assert(T % 4 == 0, "4 steps stay inside one lane's row");
  // states per item (one load of NB bytes per step): 8 where 16 would leave more than half the threads idle
  static constexpr int NB = N >= 16 && CH * N / 32 >= C::THREADS ? 16 : 8, QUADS = CH / 4;
  static constexpr int ITEMS = 2 * QUADS * (N / NB), ROUNDS = (ITEMS + C::THREADS - 1) / C::THREADS;
  using Piece = std::conditional_t<NB == 16, int4, int2>;
  Piece v[ROUNDS][4];

  __device__ __forceinline__ static bool item(int tid, int r, int& q, int& nb, bool& is_c) {
    const int it = r * C::THREADS + tid;
    q = it % QUADS, nb = it / QUADS % (N / NB) * NB, is_c = it >= QUADS * (N / NB);
    return ITEMS % C::THREADS == 0 || it < ITEMS;
  }
  __device__ __forceinline__ static int opaque_tid() {
    int tid = threadIdx.x;  // opaque: see stage_channels
    asm volatile("" : "+r"(tid));
    return tid;
  }
  // steps [t0, t0 + nt) of batch row b (zeros beyond nt)
  __device__ __forceinline__ void load(const qm_scan_args& a, int b, int t0, int nt) {
    const int64_t base = (static_cast<int64_t>(b) * a.seqlen + t0) * N;
    const int tid = opaque_tid();
#pragma unroll
    for (int r = 0; r < ROUNDS; ++r) {
      int q, nb;
      bool is_c;
      const bool live = item(tid, r, q, nb, is_c);
      const int8_t* src = static_cast<const int8_t*>(is_c ? a.C : a.B) + base + 4 * q * N + nb;
#pragma unroll
      for (int j = 0; j < 4; ++j)
        v[r][j] = live && 4 * q + j < nt ? *reinterpret_cast<const Piece*>(src + j * N) : Piece{};
    }
  }
  __device__ __forceinline__ void store(const qm_scan_args& a, float* sB, float* sC) const {
    const int tid = opaque_tid();
#pragma unroll
    for (int r = 0; r < ROUNDS; ++r) {
      int q, nb;
      bool is_c;
      if (!item(tid, r, q, nb, is_c)) break;
      float* dst = (is_c ? sC : sB) + nb * C::ROW + C::step_at(4 * q);
      const float sc = is_c ? a.C_scale : a.B_scale;
      auto code = [&](int j, int n) { return static_cast<float>(reinterpret_cast<const int8_t*>(&v[r][j])[n]) * sc; };
#pragma unroll
      for (int n = 0; n < NB; ++n)
        *reinterpret_cast<float4*>(dst + n * C::ROW) = make_float4(code(0, n), code(1, n), code(2, n), code(3, n));
    }
  }
};

// Stages the chunk's B and C (dequantized) as [n][segment][LS] rows, zero beyond the sequence so idle lanes compose
// identity maps. vec (int8): the chunk is 16-byte aligned (BcPieces).
template <int N, bool kInt8, class C>
__device__ __forceinline__ void stage_bc(const qm_scan_args& a, float* sB, float* sC, int b, int t0, int nt,
                                         bool vec) {
  constexpr int CH = C::CH;
  const int64_t base = (static_cast<int64_t>(b) * a.seqlen + t0) * N;
  auto at = [&](float* dst, int t, int n) -> float* { return dst + n * C::ROW + C::step_at(t); };
  if constexpr (kInt8) {
    if (vec) {
      BcPieces<N, C> bc;
      bc.load(a, b, t0, nt);
      bc.store(a, sB, sC);
      return;
    }
  }
  for (int i0 = threadIdx.x; i0 < CH * N; i0 += 4 * C::THREADS) {  // scalar: 4 loads in flight per matrix
    float vb[4], vc[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int i = i0 + j * C::THREADS;
      const bool ok = i < nt * N;
      if constexpr (kInt8) {
        vb[j] = ok ? static_cast<float>(static_cast<const int8_t*>(a.B)[base + i]) * a.B_scale : 0.f;
        vc[j] = ok ? static_cast<float>(static_cast<const int8_t*>(a.C)[base + i]) * a.C_scale : 0.f;
      } else {
        vb[j] = ok ? static_cast<const float*>(a.B)[base + i] : 0.f;
        vc[j] = ok ? static_cast<const float*>(a.C)[base + i] : 0.f;
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int i = i0 + j * C::THREADS;
      if (i < CH * N) {
        *at(sB, i / N, i % N) = vb[j];
        *at(sC, i / N, i % N) = vc[j];
      }
    }
  }
}

// The k-th per-channel input of a chunk: u, dt, z (may be null), the outlier mask (null without dual scale). Selects,
// not an indexed array: a runtime index into a local array would put it in local memory.
__device__ __forceinline__ const void* staged_input(const qm_scan_args& a, int k) {
  return k == 0 ? a.u : k == 1 ? a.dt : k == 2 ? a.z : (a.dual_scale ? a.u_mask : nullptr);
}

using qm::byte_of;
__device__ __forceinline__ uint8_t byte_of(uint2 v, int w) { return byte_of(w < 4 ? v.x : v.y, w % 4); }

// Element e of each staged input (u, dt, z, and the mask for int8) into step t of a channel's region r.
template <bool kInt8, int CH>
__device__ __forceinline__ void stage_element(const qm_scan_args& a, unsigned char* r, int t, int64_t e) {
#pragma unroll
  for (int k = 0; k < (kInt8 ? 4 : 3); ++k) {
    const void* s = staged_input(a, k);
    if constexpr (kInt8)
      r[k * CH + t] = s ? static_cast<const uint8_t*>(s)[e] : 0;
    else
      reinterpret_cast<float*>(r)[k * CH + t] = s ? static_cast<const float*>(s)[e] : 0.f;
  }
}

// Stages u, dt, z (and the mask) of the block's CPB channels as [channel][array][t]. vec (int8, D % PB == 0,
// pointers aligned to PB bytes): a thread owns piece p (PB channels) of the steps tq, tq + RPR, ...: one PB-byte load
// per (array, step), the row address computed once per chunk, all loads before the first store.
template <int N, bool kInt8, class C>
__device__ __forceinline__ void stage_channels(const qm_scan_args& a, unsigned char* sIn, int b, int t0, int nt,
                                               int d0, bool vec) {
  constexpr int CH = C::CH;
  const int D = a.dim;
  if constexpr (kInt8) {
    if (vec) {
      constexpr int PB = C::PB, PPR = C::CPB / PB, RPR = C::THREADS / PPR, ROUNDS = (CH + RPR - 1) / RPR;
      static_assert(C::THREADS % PPR == 0, "each thread keeps one piece column");
      using Piece = std::conditional_t<PB == 8, uint2, uint32_t>;
      // an opaque copy of the thread index: keeps the compiler from hoisting the addresses out of the chunk loop
      // (live 64-bit addresses across the recurrence spill)
      int tid = threadIdx.x;
      asm volatile("" : "+r"(tid));
      const int p = tid % PPR, tq = tid / PPR;
      const bool piece = d0 + p * PB < D;
      const int64_t row = (static_cast<int64_t>(b) * a.seqlen + t0 + tq) * D + d0 + p * PB;
      const int64_t step = static_cast<int64_t>(RPR) * D;
      Piece r[4][ROUNDS];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint8_t* src = static_cast<const uint8_t*>(staged_input(a, k));
#pragma unroll
        for (int j = 0; j < ROUNDS; ++j) {
          const int t = tq + j * RPR;
          const bool ok = src && piece && t < nt && (CH % RPR == 0 || t < CH);
          r[k][j] = ok ? *reinterpret_cast<const Piece*>(src + row + j * step) : Piece{};
        }
      }
      unsigned char* dst = sIn + p * PB * C::CH_BYTES + tq;
#pragma unroll
      for (int k = 0; k < 4; ++k)
#pragma unroll
        for (int j = 0; j < ROUNDS; ++j) {
          const int t = tq + j * RPR;
          if (t >= nt || (CH % RPR != 0 && t >= CH)) continue;
#pragma unroll
          for (int w = 0; w < PB; ++w) dst[w * C::CH_BYTES + k * CH + j * RPR] = byte_of(r[k][j], w);
        }
      return;
    }
  }
  for (int i = threadIdx.x; i < nt * C::CPB; i += C::THREADS) {
    const int t = i / C::CPB, w = i % C::CPB;
    if (d0 + w >= D) continue;
    const int64_t e = (static_cast<int64_t>(b) * a.seqlen + t0 + t) * D + d0 + w;
    stage_element<kInt8, CH>(a, sIn + w * C::CH_BYTES, t, e);
  }
}

// The same from channel-major inputs ([B, D, L]: a channel's chunk row of each array is contiguous). vec (int8,
// L % 16 == 0, pointers 16-byte aligned): 16-byte copies, a thread's loads all before its stores; else element by
// element along t.
template <bool kInt8, class C>
__device__ __forceinline__ void stage_channels_cm(const qm_scan_args& a, unsigned char* sIn, int b, int t0, int nt,
                                                  int d0, bool vec) {
  constexpr int CH = C::CH;
  const int D = a.dim, L = a.seqlen;
  if constexpr (kInt8) {
    if (vec) {
      constexpr int PPR = CH / 16, ITEMS = C::CPB * 4 * PPR, ROUNDS = (ITEMS + C::THREADS - 1) / C::THREADS;
      constexpr int G = ROUNDS < 2 ? ROUNDS : 2;  // pieces in flight per thread (G = ROUNDS: the same registers)
      static_assert(CH % 16 == 0, "16-byte pieces of a chunk row");
      int tid = threadIdx.x;  // opaque, as in stage_channels: no addresses hoisted out of the chunk loop
      asm volatile("" : "+r"(tid));
#pragma unroll
      for (int j0 = 0; j0 < ROUNDS; j0 += G) {
        int4 r[G];
#pragma unroll
        for (int j = 0; j < G; ++j) {  // item i: piece p of array k of channel w
          const int i = tid + (j0 + j) * C::THREADS;
          const int p = i % PPR, k = i / PPR % 4, w = i / PPR / 4;
          const uint8_t* src = static_cast<const uint8_t*>(staged_input(a, k));
          const bool ok = j0 + j < ROUNDS && i < ITEMS && src && d0 + w < D && p * 16 < nt;
          r[j] = ok ? *reinterpret_cast<const int4*>(src + (static_cast<int64_t>(b) * D + d0 + w) * L + t0 + p * 16)
                    : make_int4(0, 0, 0, 0);
        }
#pragma unroll
        for (int j = 0; j < G; ++j) {
          const int i = tid + (j0 + j) * C::THREADS;
          const int p = i % PPR, k = i / PPR % 4, w = i / PPR / 4;
          if (j0 + j < ROUNDS && i < ITEMS && p * 16 < nt)
            *reinterpret_cast<int4*>(sIn + w * C::CH_BYTES + k * CH + p * 16) = r[j];
        }
      }
      return;
    }
  }
  for (int i = threadIdx.x; i < nt * C::CPB; i += C::THREADS) {
    const int w = i / nt, t = i % nt;
    if (d0 + w >= D) continue;
    const int64_t e = (static_cast<int64_t>(b) * D + d0 + w) * L + t0 + t;
    stage_element<kInt8, CH>(a, sIn + w * C::CH_BYTES, t, e);
  }
}

// Writes the chunk's y (fp16 or fp32) from the channels' padded rows. vec: D % PB == 0 and y 16-byte aligned;
// one piece of PB channels of one t per item.
template <class C>
__device__ __forceinline__ void write_y(const qm_scan_args& a, const unsigned char* sIn, int b, int t0, int nt,
                                       int d0, bool vec) {
  constexpr int PB = C::PB, PPR = C::CPB / PB;
  const int D = a.dim;
  auto at = [&](int w, int t) {
    return reinterpret_cast<const float*>(sIn + w * C::CH_BYTES)[C::step_at(t)];
  };
  if (vec) {
    for (int it = threadIdx.x; it < nt * PPR; it += C::THREADS) {
      const int t = it / PPR, p = it % PPR;
      if (d0 + p * PB >= D) continue;
      float v[PB];
#pragma unroll
      for (int w = 0; w < PB; ++w) v[w] = at(p * PB + w, t);
      const int64_t e = (static_cast<int64_t>(b) * a.seqlen + t0 + t) * D + d0 + p * PB;
      if (a.y_dtype == QM_DTYPE_FLOAT16) {
        __half2 hv[PB / 2];
#pragma unroll
        for (int w = 0; w < PB / 2; ++w) hv[w] = __floats2half2_rn(v[2 * w], v[2 * w + 1]);
        if constexpr (PB == 8)
          *reinterpret_cast<int4*>(static_cast<__half*>(a.y) + e) = *reinterpret_cast<const int4*>(hv);
        else
          *reinterpret_cast<int2*>(static_cast<__half*>(a.y) + e) = *reinterpret_cast<const int2*>(hv);
      } else {
#pragma unroll
        for (int w = 0; w < PB; w += 4)
          *reinterpret_cast<float4*>(static_cast<float*>(a.y) + e + w) =
              make_float4(v[w], v[w + 1], v[w + 2], v[w + 3]);
      }
    }
    return;
  }
  for (int i = threadIdx.x; i < nt * C::CPB; i += C::THREADS) {  // element by element
    const int t = i / C::CPB, w = i % C::CPB;
    if (d0 + w >= D) continue;
    const int64_t e = (static_cast<int64_t>(b) * a.seqlen + t0 + t) * D + d0 + w;
    if (a.y_dtype == QM_DTYPE_FLOAT16)
      static_cast<__half*>(a.y)[e] = __float2half_rn(at(w, t));
    else
      static_cast<float*>(a.y)[e] = at(w, t);
  }
}

// Asks L2 for the next chunk's inputs while this chunk computes (the staging's loads then wait for L2, not HBM): each
// block of batch row b takes its share of the chunk's u, dt, z, mask rows (contiguous across the row's blocks; channel-
// major inputs: its own channels' rows, one thread each) and of its B and C, by sm_90's bulk prefetch (a hint: no
// registers, no shared memory; 16-byte granules, rounded inward).
// kBcOnly: B and C alone (the TMA staging asks for the channels' rows itself).
template <int N, class C, bool kCM, bool kBcOnly = false>
__device__ __forceinline__ void prefetch_next_chunk(const qm_scan_args& a, int b, int d0, int t_begin, int t_end) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  int k = threadIdx.x + (kBcOnly ? 4 : 0);
  if constexpr (kCM) {  // threads [0, 4 CPB): one row (channel k / 4, array k % 4) each; the next two: B and C
    if (k < 4 * C::CPB) {
      const void* p = staged_input(a, k % 4);
      const int d = d0 + k / 4;
      if (!p || d >= a.dim) return;
      const uintptr_t base = reinterpret_cast<uintptr_t>(p) +
                             ((static_cast<int64_t>(b) * a.dim + d) * a.seqlen + t_begin) * C::ESZ;
      const uintptr_t lo = (base + 15) & ~uintptr_t{15}, hi = (base + (t_end - t_begin) * C::ESZ) & ~uintptr_t{15};
      if (hi > lo)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(lo), "r"(static_cast<unsigned>(hi - lo))
                     : "memory");
      return;
    }
    k += 4 - 4 * C::CPB;  // 4 (B), 5 (C), then >= 6
  }
  if (k >= 6) return;
  const void* p = k < 4 ? staged_input(a, k) : k == 4 ? a.B : a.C;
  if (!p) return;
  const int64_t width = (k < 4 ? a.dim : N) * static_cast<int64_t>(C::ESZ);  // bytes per step
  const int64_t begin = (static_cast<int64_t>(b) * a.seqlen + t_begin) * width;
  const int64_t len = (t_end - t_begin) * width, parts = gridDim.x, i = blockIdx.x;
  const uintptr_t base = reinterpret_cast<uintptr_t>(p) + begin;
  const uintptr_t lo = (base + len * i / parts + 15) & ~uintptr_t{15}, hi = (base + len * (i + 1) / parts) & ~uintptr_t{15};
  if (hi > lo)
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(lo), "r"(static_cast<unsigned>(hi - lo)) : "memory");
#endif
}

// kCM: channel-major u, dt, z, mask (qm_scan_args.channel_major), its own instantiation so that the token-major
// kernels' registers stay as they were (one kernel for both spilled in four configurations). kTma (token-major int8,
// sm_90): u, dt, z, mask rows by the TMA (scan_tma.cuh; maps and present: tma::encode), in raw rows after the
// kernel's regions.
template <int N, bool kInt8, class C, bool kCM, bool kTma = false>
__global__ void __launch_bounds__(C::THREADS, C::MIN_BLOCKS)
    scan_chunked_kernel(qm_scan_args a, bool vec_bc, bool vec_ch, bool vec_y, const __grid_constant__ tma::Maps maps,
                        unsigned present) {
  constexpr int T = C::T, CH = C::CH, LPC = C::LPC;
  extern __shared__ __align__(16) unsigned char smem[];
  float* sB = reinterpret_cast<float*>(smem);
  float* sC = sB + N * C::ROW;
  unsigned char* sIn = reinterpret_cast<unsigned char*>(sC + N * C::ROW);
  float* sA2 = reinterpret_cast<float*>(sIn + C::CPB * C::CH_BYTES);  // [CPB][N] A * log2 e
  float* sCarry = sA2 + C::CPB * N;                                     // [CPB][N] state entering the chunk
  float* sAgg = sCarry + C::CPB * N;  // K > 1: [state parity][CPB][K] (a, b): the total maps of the warps' pieces
  constexpr int K = C::K;
  const int lane = threadIdx.x % 32, kw = K > 1 ? threadIdx.x / 32 % K : 0;  // warp in the channel
  const int s = kw * LPC + lane % LPC;                                          // segment in the channel
  const int ch = K > 1 ? threadIdx.x / 32 / K : threadIdx.x / LPC;  // unsigned divisions: shifts
  const int D = a.dim, L = a.seqlen, b = blockIdx.y, d0 = blockIdx.x * C::CPB, d = d0 + ch;
  const bool active = d < D;  // inactive channels (beyond D) run identity maps: their warp-mates need the shuffles
  // kTma: the raw rows ([array][CH][32 bytes], 128-byte aligned) and their mbarriers after the kernel's regions
  // (tma::extra_smem, which the launcher adds); the boxes start at the 16-byte column below the block's first
  // channel. The first chunk's boxes, and (int8, vec_bc) its B and C, are asked for before anything else, so that
  // they land during the prologue (at one chunk, L <= 512 at B1 D1536, nothing else would hide them; NOTES.md
  // session 18).
  unsigned char* raw = nullptr;
  uint64_t* bar = nullptr;
  const int col = d0 & ~15;
  if constexpr (kTma) {
    unsigned char* end = smem + C::SMEM;
    raw = end + ((128 - static_cast<unsigned>(__cvta_generic_to_shared(end)) % 128) % 128);
    bar = reinterpret_cast<uint64_t*>(raw + tma::kArrays * CH * tma::kBoxBytes);  // one per box of rows
    if (threadIdx.x == 0) tma::issue(maps, present, raw, bar, true, col, b * L, CH);
  }
  const bool early_bc = kInt8 && C::K > 1 && vec_bc;  // the few-channel configurations (where one chunk is common)
  BcPieces<N, C> bc;
  if (early_bc) bc.load(a, b, 0, min(CH, L));
  for (int i = threadIdx.x; i < C::CPB * N; i += C::THREADS) {
    const int dd = d0 + i / N, n = i % N;
    sA2[i] = dd < D ? a.A[static_cast<int64_t>(dd) * N + n] * kLog2e : 0.f;
    sCarry[i] = (dd < D && a.initial_state) ? a.initial_state[(static_cast<int64_t>(b) * D + dd) * N + n] : 0.f;
  }
  const float dskip = (active && a.Dskip) ? a.Dskip[d] : 0.f;
  const float bias = (active && a.dt_bias) ? a.dt_bias[d] : 0.f;
  if (early_bc) bc.store(a, sB, sC);  // after the prologue's loads (ordered before the state loop by its barriers)
  unsigned char* mine = sIn + ch * C::CH_BYTES;
  const int tb = s * T;

  for (int t0 = 0, chunk = 0; t0 < L; t0 += CH, ++chunk) {
    const int nt = min(CH, L - t0), ntl = active ? nt : 0;
    __syncthreads();  // the previous chunk's shared memory is no longer read
    if (!(early_bc && chunk == 0)) stage_bc<N, kInt8, C>(a, sB, sC, b, t0, nt, vec_bc);
    if constexpr (kTma) {
#pragma unroll
      for (int h = 0; h < CH / tma::kBoxRows; ++h) {  // the first rows while the later ones land
        tma::wait_parity(bar + h, chunk & 1);
        tma::unpack<C>(raw, sIn, present, d0 - col, nt, h);
      }
    } else if constexpr (kCM) {
      stage_channels_cm<kInt8, C>(a, sIn, b, t0, nt, d0, vec_ch);
    } else {
      stage_channels<N, kInt8, C>(a, sIn, b, t0, nt, d0, vec_ch);
    }
    __syncthreads();
    if constexpr (kTma)  // raw is free: the next chunk's rows land while this one computes
      if (threadIdx.x == 0 && t0 + CH < L) tma::issue(maps, present, raw, bar, false, col, b * L + t0 + CH, CH);
#if QM_SCAN_L2_PREFETCH
    if (t0 + CH < L) prefetch_next_chunk<N, C, kCM, kTma>(a, b, d0, t0 + CH, min(t0 + 2 * CH, L));
#endif
    float delta[T], dlu[T], y[T];
    float sumdelta = 0.f;
    {
      int8_t uq[T], dq[T];
      uint8_t mq[T];
      float uf[T], df[T];
      if constexpr (kInt8) {  // T consecutive bytes per array: one vector load each
        load_vec<T>(uq, mine + tb);
        load_vec<T>(dq, mine + CH + tb);
        load_vec<T>(mq, mine + 3 * CH + tb);
      } else {
        load_vec<4 * T>(uf, mine + 4 * tb);
        load_vec<4 * T>(df, mine + 4 * (CH + tb));
      }
#pragma unroll
      for (int i = 0; i < T; ++i) {
        const bool ok = tb + i < ntl;  // beyond the sequence: delta = 0, u = 0 make the identity map
        float u, x;
        if constexpr (kInt8) {
          u = static_cast<float>(uq[i]) * (mq[i] ? a.u_outlier_scale : a.u_scale);
          x = static_cast<float>(dq[i]) * a.dt_scale + bias;
        } else {
          u = uf[i];
          x = df[i] + bias;
        }
        u = ok ? u : 0.f;
        delta[i] = ok ? softplus_fast(x) : 0.f;
        dlu[i] = delta[i] * u;
        y[i] = dskip * u;
        sumdelta += delta[i];
      }
    }
    const float* a2row = sA2 + ch * N;
    float* carry_row = sCarry + ch * N;
    const float* brow = sB + s * C::LS;
    const float* crow = sC + s * C::LS;
    // K > 1: this warp's map slot for the channel, [state parity][CPB][K] float2 pairs
    float2* maps = reinterpret_cast<float2*>(sAgg) + ch * K;
    const bool seg_last = lane % LPC == LPC - 1;  // holds its segment's (and with the scan, its piece's) total map
#pragma unroll 1  // by 2 measured no faster (more registers than the 80 it has)
    for (int n = 0; n < N; ++n) {
      float dA[T], dBu[T];
      const float A2 = a2row[n];
#pragma unroll
      for (int i = 0; i < T; i += 4) {
        const float4 bv = *reinterpret_cast<const float4*>(brow + n * C::ROW + i);
        const float bb[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          dA[i + j] = ex2_approx(delta[i + j] * A2);
          dBu[i + j] = dlu[i + j] * bb[j];
        }
      }
      // this lane's segment as an affine map h -> pa*h + pb
      float pa = ex2_approx(sumdelta * A2), pb = dBu[0];
#pragma unroll
      for (int i = 1; i < T; ++i) pb = __fmaf_rn(dA[i], pb, dBu[i]);
      float carry = carry_row[n];
#pragma unroll
      for (int off = 1; off < LPC; off <<= 1) scan_level<LPC>(pa, pb, off);  // inclusive scan of the maps
      if constexpr (K > 1) {  // the maps of the channel's earlier warps, composed onto the chunk's carry
        float2* set = maps + (n & 1) * C::CPB * K;  // by parity: set n is rewritten only after barrier n + 1
        if (lane == 31) set[kw] = make_float2(pa, pb);
        channel_barrier(ch, K * 32);
#pragma unroll
        for (int j = 0; j < K - 1; ++j) {  // unconditional loads: no branch around them
          const float2 m = set[j];
          carry = j < kw ? __fmaf_rn(m.x, carry, m.y) : carry;
        }
      }
      // the state after this lane's steps; the previous lane's is the state entering them
      const float hend = __fmaf_rn(pa, carry, pb);
      const float hprev = __shfl_up_sync(0xffffffffu, hend, 1, LPC);
      float h = lane % LPC == 0 ? carry : hprev;
#pragma unroll
      for (int i = 0; i < T; i += 4) {
        const float4 cv = *reinterpret_cast<const float4*>(crow + n * C::ROW + i);
        const float cc[4] = {cv.x, cv.y, cv.z, cv.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          h = __fmaf_rn(dA[i + j], h, dBu[i + j]);
          y[i + j] = __fmaf_rn(h, cc[j], y[i + j]);
        }
      }
      if constexpr (K == 1) __syncwarp();  // every lane has read the carry (K > 1: the barrier ordered the reads)
      if (seg_last && kw == K - 1) carry_row[n] = hend;  // the chunk's last piece: the state after the chunk
    }
    if (a.z) {
      float zf[T];
      if constexpr (kInt8) {
        int8_t zq[T];
        load_vec<T>(zq, mine + 2 * CH + tb);
#pragma unroll
        for (int i = 0; i < T; ++i) zf[i] = static_cast<float>(zq[i]) * a.z_scale;
      } else {
        load_vec<4 * T>(zf, mine + 4 * (2 * CH + tb));
      }
#pragma unroll
      for (int i = 0; i < T; ++i) y[i] *= silu_fast(tb + i < ntl ? zf[i] : 0.f);
    }
    // the channel's inputs are read before its y overwrites the region (shared by the channel's K warps)
    if constexpr (K > 1)
      channel_barrier(ch, K * 32);
    else
      __syncwarp();
    float* sy = reinterpret_cast<float*>(mine) + s * C::LS;
#pragma unroll
    for (int i = 0; i < T; i += 4)
      *reinterpret_cast<float4*>(sy + i) = make_float4(y[i], y[i + 1], y[i + 2], y[i + 3]);
    __syncthreads();
    write_y<C>(a, sIn, b, t0, nt, d0, vec_y);
  }
  __syncthreads();
  if (a.final_state)
    for (int i = threadIdx.x; i < C::CPB * N; i += C::THREADS) {
      const int dd = d0 + i / N;
      if (dd < D) a.final_state[(static_cast<int64_t>(b) * D + dd) * N + i % N] = sCarry[i];
    }
}


// Prefill for many channels (int8 inputs, N = 16, D % 16 == 0, 16-byte aligned inputs and final state): one thread per
// channel walks time with its N states in registers, so there is no scan across lanes and no second pass: per (t, d, n)
// one exp and three multiply-adds. A block of 128 channels of one batch row stages chunks of kSeqChunk steps (u, dt, z,
// mask bytes; B and C dequantized) in shared memory; the next chunk's bytes are loaded into registers while the current
// one is computed. It needs many channels to fill the GPU (1 warp per 32 channels): its time goes by the blocks per SM
// (H100, L2048: one 0.260 ms, two 0.420, three 0.610) where the lanes kernel's grows with the channels (0.237 ms at B8
// D1536, 0.373 at B13 D1024), so the launcher picks it from kSeqMinChannels (13312; session 20). kZ: z present, and Y:
// y's type, template arguments so that the step loop has no branch (a branch splits its schedule) and one store per
// step (both stores, predicated, with their addresses took ~11 instructions of ~141 per step: -3.5%, NOTES.md, session
// 21). Blocks of 64 channels, which balance the SMs better at B8 D5120, measured no faster (session 20).
constexpr int kSeqThreads = 128, kSeqChunk = 32;
#ifndef QM_SCAN_SEQ_MIN_CHANNELS
#define QM_SCAN_SEQ_MIN_CHANNELS 13312
#endif
constexpr int64_t kSeqMinChannels = QM_SCAN_SEQ_MIN_CHANNELS;

template <int N, bool kZ, class Y>
__global__ void __launch_bounds__(kSeqThreads) scan_seq_kernel(qm_scan_args a) {
  static_assert(N % 16 == 0, "B and C rows of a chunk come in 16-byte pieces");
  constexpr int KC = kSeqChunk, PIECES = 4 * KC * (kSeqThreads / 16), PER = PIECES / kSeqThreads;
  static_assert(PER == 8 && KC == 32, "the piece mapping below: 2 pieces per array and thread");
  constexpr int BC_PIECES = 2 * KC * N / 16;
  static_assert(PIECES % kSeqThreads == 0 && BC_PIECES <= kSeqThreads, "one round of loads per thread");
  __shared__ __align__(16) uint8_t sIn[4][KC][kSeqThreads];  // u, dt, z, mask bytes of the chunk
  __shared__ __align__(16) float sBC[2][KC][N];               // B, C dequantized
  const int tid = threadIdx.x, D = a.dim, L = a.seqlen, b = blockIdx.y, d0 = blockIdx.x * kSeqThreads;
  const int d = d0 + tid;
  const bool active = d < D;
  // pieces of 16 channels: a thread loads the pieces (t, c) and (t + 16, c) of each of the 4 arrays
  const int pt = tid / 8, pc = (tid % 8) * 16;
  const int bm = tid / (BC_PIECES / 2), bi = (tid % (BC_PIECES / 2)) * 16;  // B/C piece: matrix, byte in the chunk
  auto load = [&](int t0, int4 (&r)[PER], int4& rbc) {
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int k = j / 2, t = pt + (j % 2) * (KC / 2);
      const void* src = staged_input(a, k);
      const bool ok = src && t0 + t < L && d0 + pc < D;
      r[j] = ok ? *reinterpret_cast<const int4*>(static_cast<const uint8_t*>(src) +
                                                 (static_cast<int64_t>(b) * L + t0 + t) * D + d0 + pc)
                : int4{};
    }
    const bool ok = tid < BC_PIECES && t0 * N + bi < L * N;
    rbc = ok ? *reinterpret_cast<const int4*>(static_cast<const int8_t*>(bm == 0 ? a.B : a.C) +
                                              (static_cast<int64_t>(b) * L + t0) * N + bi)
             : int4{};
  };
  auto store = [&](const int4 (&r)[PER], const int4& rbc) {
#pragma unroll
    for (int j = 0; j < PER; ++j) *reinterpret_cast<int4*>(&sIn[j / 2][pt + (j % 2) * (KC / 2)][pc]) = r[j];
    if (tid < BC_PIECES) {
      const float sc = bm == 0 ? a.B_scale : a.C_scale;
      const uint32_t w[4] = {static_cast<uint32_t>(rbc.x), static_cast<uint32_t>(rbc.y), static_cast<uint32_t>(rbc.z),
                             static_cast<uint32_t>(rbc.w)};
#pragma unroll
      for (int q = 0; q < 16; ++q) (&sBC[bm][0][0])[bi + q] = qm::code_float(w[q / 4], q % 4) * sc;
    }
  };
  float h[N], A2[N];
  const int64_t sbase = (static_cast<int64_t>(b) * D + (active ? d : 0)) * N;
#pragma unroll
  for (int n = 0; n < N; ++n) {
    h[n] = active && a.initial_state ? a.initial_state[sbase + n] : 0.f;
    A2[n] = active ? a.A[static_cast<int64_t>(d) * N + n] * kLog2e : 0.f;
  }
  const float dskip = active && a.Dskip ? a.Dskip[d] : 0.f;
  const float bias = active && a.dt_bias ? a.dt_bias[d] : 0.f;
  const float s_in = a.u_scale, s_out = a.dual_scale ? a.u_outlier_scale : a.u_scale;
  int4 r[PER], rbc;
  load(0, r, rbc);
  for (int t0 = 0; t0 < L; t0 += KC) {
    __syncthreads();  // the previous chunk is no longer read
    store(r, rbc);
    __syncthreads();
    if (t0 + KC < L) load(t0 + KC, r, rbc);  // in flight while this chunk is computed
    const int nt = min(KC, L - t0);
    if (!active) continue;
    Y* yp = static_cast<Y*>(a.y) + (static_cast<int64_t>(b) * L + t0) * D + d;  // y of step t0
    // 8 branch-free steps in one schedule (B8 D4096 L2048 against 2: -23%; 3 +23%, 4 +1%, 6 +45%; one block per SM:
    // 8 against 4 -4%; NOTES.md, session 20)
#pragma unroll 8
    for (int t = 0; t < nt; ++t) {
      const float u = qm::code_float(sIn[0][t][tid]) * (sIn[3][t][tid] ? s_out : s_in);
      const float delta = softplus_fast(qm::code_float(sIn[1][t][tid]) * a.dt_scale + bias);
      const float dlu = delta * u;
      float y[4] = {dskip * u, 0.f, 0.f, 0.f};
#pragma unroll
      for (int n = 0; n < N; n += 4) {
        const float4 bv = *reinterpret_cast<const float4*>(&sBC[0][t][n]);
        const float4 cv = *reinterpret_cast<const float4*>(&sBC[1][t][n]);
        const float bb[4] = {bv.x, bv.y, bv.z, bv.w}, cc[4] = {cv.x, cv.y, cv.z, cv.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          h[n + j] = __fmaf_rn(ex2_approx(delta * A2[n + j]), h[n + j], dlu * bb[j]);
          y[j] = __fmaf_rn(h[n + j], cc[j], y[j]);
        }
      }
      float yv = (y[0] + y[1]) + (y[2] + y[3]);
      if constexpr (kZ) yv *= silu_fast(qm::code_float(sIn[2][t][tid]) * a.z_scale);
      *yp = qm::out_value<Y>(yv);
      yp += D;
    }
  }
  // The final state crosses shared memory in 16-byte pieces, so that a warp writes 512 contiguous bytes: written
  // from registers, each store instruction hit 32 rows 64 bytes apart with partial-sector writes, ~5 us per call
  // (B8 D4096 L32 0.0152 -> 0.0102 ms; A and the initial state the same way changed the step loop's schedule and lost
  // more than they saved: NOTES.md, session 21). The XOR spreads a quarter warp's accesses to 8 rows over all banks.
  if (a.final_state) {
    constexpr int RP = N / 4;  // 16-byte pieces per row
    static_assert(sizeof(sIn) >= sizeof(float) * kSeqThreads * N, "the rows fit in the staging buffer");
    float* const rows = reinterpret_cast<float*>(&sIn[0][0][0]);
    const auto slot = [](int row, int q) { return row * N + 4 * (q ^ ((row >> 1) & 3)); };
    __syncthreads();  // the last chunk's codes are read
#pragma unroll
    for (int q = 0; q < RP; ++q)
      *reinterpret_cast<float4*>(rows + slot(tid, q)) = make_float4(h[4 * q], h[4 * q + 1], h[4 * q + 2], h[4 * q + 3]);
    __syncthreads();
    float4* dst = reinterpret_cast<float4*>(a.final_state + (static_cast<int64_t>(b) * D + d0) * N);
#pragma unroll
    for (int k = 0; k < RP; ++k) {
      const int i = tid + k * kSeqThreads;
      if (d0 + i / RP < D) dst[i] = *reinterpret_cast<const float4*>(rows + slot(i / RP, i % RP));
    }
  }
}

template <int N>
bool seq_applies(const qm_scan_args* a) {  // it reads u, dt, z, mask as [B, L, D] only
  return !a->channel_major && static_cast<int64_t>(a->batch) * a->dim >= kSeqMinChannels && a->dim % 16 == 0 &&
         aligned(a->u) && aligned(a->dt) && (!a->z || aligned(a->z)) && (!a->dual_scale || aligned(a->u_mask)) &&
         aligned(a->B) && aligned(a->C) && aligned(a->final_state);
}

// Decode (L = 1): one thread per 4 states of a (b, d); the body is state_update_row (state_update.cuh), shared with
// the cluster kernel that runs the update and out_proj together (update_out_proj.cu).
template <int N, bool kInt8, bool kDtW, bool kXp = false>
__global__ void state_update_kernel(qm_scan_args a, bool vec, bool vec_dt) {
  state_update_row<N, kInt8, kDtW, kXp>(a, vec, vec_dt, [&](int64_t r, float y) {
    if (a.y_dtype == QM_DTYPE_FLOAT16)
      static_cast<__half*>(a.y)[r] = __float2half_rn(y);
    else
      static_cast<float*>(a.y)[r] = y;
  });
}

int validate(const qm_scan_args* a, const char* fn) {
  QM_CHECK_ARG(a, "%s: args must be non-null", fn);
  QM_CHECK_ARG(a->u && (a->dt || a->dt_w) && a->B && a->C && a->A && a->y,
               "%s: u, dt (or dt_w), B, C, A and y must be non-null", fn);
  QM_CHECK_ARG(a->batch > 0 && a->seqlen > 0 && a->dim > 0, "%s: batch=%d seqlen=%d dim=%d must be positive", fn,
               a->batch, a->seqlen, a->dim);
  QM_CHECK_ARG(a->dstate == 16 || a->dstate == 8 || a->dstate == 32 || a->dstate == 64,
               "%s: dstate=%d must be 8, 16, 32 or 64", fn, a->dstate);
  QM_CHECK_ARG(a->input_dtype == QM_DTYPE_INT8 || a->input_dtype == QM_DTYPE_FLOAT32,
               "%s: input_dtype=%d must be int8 or float32", fn, a->input_dtype);
  QM_CHECK_ARG(a->y_dtype == QM_DTYPE_FLOAT32 || a->y_dtype == QM_DTYPE_FLOAT16, "%s: y_dtype=%d must be float32 "
               "or float16", fn, a->y_dtype);
  QM_CHECK_ARG(a->dual_scale == 0 || a->dual_scale == 1, "%s: dual_scale must be 0 or 1", fn);
  QM_CHECK_ARG(a->early_state == 0 || a->early_state == 1, "%s: early_state=%d must be 0 or 1", fn, a->early_state);
  QM_CHECK_ARG(a->channel_major == 0 || a->channel_major == 1, "%s: channel_major=%d must be 0 or 1", fn,
               a->channel_major);
  if (a->input_dtype == QM_DTYPE_INT8) {
    QM_CHECK_ARG(QM_VALID_SCALE(a->u_scale) && QM_VALID_SCALE(a->dt_scale) && QM_VALID_SCALE(a->B_scale) &&
                 QM_VALID_SCALE(a->C_scale) && (!a->z || QM_VALID_SCALE(a->z_scale)),
                 "%s: every scale must be positive and finite", fn);
    QM_CHECK_ARG(!a->dual_scale || (a->u_mask && QM_VALID_SCALE(a->u_outlier_scale)),
                 "%s: dual_scale needs u_mask and a positive finite u_outlier_scale", fn);
  } else {
    QM_CHECK_ARG(!a->dual_scale, "%s: dual_scale needs int8 inputs", fn);
  }
  if (a->dt_w)
    QM_CHECK_ARG(a->input_dtype == QM_DTYPE_INT8 && a->dt_lowrank && a->dt_m && a->dt_rank > 0,
                 "%s: a fused dt_proj (dt_w) needs int8 inputs, dt_lowrank, dt_m and dt_rank > 0 (dt_rank=%d)", fn,
                 a->dt_rank);
  if (a->conv_state)
    QM_CHECK_ARG(a->dt_w && a->conv_x && a->conv_kernel_size == 4 && a->seqlen == 1,
                 "%s: the deferred conv-state shift (conv_state) needs a fused dt_proj (dt_w), one token, conv_x and "
                 "conv_kernel_size == 4 (got %d)", fn, a->conv_kernel_size);
  if (a->xp_acc)
    QM_CHECK_ARG(a->dt_w && a->batch == 1 && a->seqlen == 1 && a->xp_m_in && a->xp_n == a->dt_rank + 2 * a->dstate &&
                     a->xp_n <= kMaxXp && (a->xp_m_out != nullptr) == (a->dual_scale == 1) &&
                     QM_VALID_SCALE(a->dt_lowrank_scale) && aligned(a->xp_acc, 4),
                 "%s: x_proj's epilogue (xp_acc, 4-byte aligned) needs a fused dt_proj (dt_w), batch 1, one token, "
                 "xp_m_in, xp_n == dt_rank + 2 dstate <= %d (got %d), xp_m_out exactly with dual_scale and a positive "
                 "finite dt_lowrank_scale", fn, kMaxXp, a->xp_n);
  return QM_OK;
}

// The configurations the TMA staging is built for: token-major int8, two warps per channel (the 12-channel blocks),
// chunks of two boxes of rows.
template <bool kInt8, class C, bool kCM>
constexpr bool kTmaConfig = QM_SCAN_TMA && kInt8 && !kCM && C::K == 2 && C::CH == 2 * tma::kBoxRows;

// Whether the TMA staging applies (host): such a configuration on sm_90+, D % 16 == 0, the arrays 16-byte aligned,
// and the driver's tensor-map encoder available (maps and present filled).
template <bool kInt8, class C, bool kCM>
bool tma_applies(const qm_scan_args* a, tma::Maps* maps, unsigned* present) {
  if constexpr (!kTmaConfig<kInt8, C, kCM>) {
    return false;
  } else {
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess || major < 9)
      return false;
    if (a->dim % 16 || !aligned(a->u) || !aligned(a->dt) || !aligned(a->z) || (a->dual_scale && !aligned(a->u_mask)))
      return false;
    return tma::encode(a, maps, present);
  }
}

template <int N, bool kInt8, class C, bool kCM>
int launch_chunked_layout(const qm_scan_args* a, cudaStream_t stream, const char* fn) {
  tma::Maps maps{};
  unsigned present = 0;
  const bool use_tma = tma_applies<kInt8, C, kCM>(a, &maps, &present);
  // opt in to > 48 KB of dynamic shared memory, and ask for the largest carveout so MIN_BLOCKS blocks fit
  auto kernel = use_tma ? scan_chunked_kernel<N, kInt8, C, kCM, kTmaConfig<kInt8, C, kCM>>
                        : scan_chunked_kernel<N, kInt8, C, kCM>;
  const size_t smem = C::SMEM + (use_tma ? tma::extra_smem<C::CH>() : 0);
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  if (e != cudaSuccess) return qm::fail_cuda("cudaFuncSetAttribute(scan shared memory)", e);
  dim3 grid(static_cast<unsigned>((a->dim + C::CPB - 1) / C::CPB), static_cast<unsigned>(a->batch));
  const bool vec_bc = aligned(a->B) && aligned(a->C) && (static_cast<int64_t>(a->seqlen) * N) % 16 == 0;
  const int vb = kCM ? 16 : C::PB;  // the staging's vector piece in bytes
  const bool vec_ch = (kCM ? a->seqlen % 16 == 0 : a->dim % C::PB == 0) && aligned(a->u, vb) && aligned(a->dt, vb) &&
                      (!a->z || aligned(a->z, vb)) && (!a->dual_scale || aligned(a->u_mask, vb));
  const bool vec_y = a->dim % C::PB == 0 && aligned(a->y);
  kernel<<<grid, C::THREADS, smem, stream>>>(*a, vec_bc, vec_ch, vec_y, maps, present);
  QM_CHECK_LAUNCH(fn);
  return QM_OK;
}

template <int N, bool kInt8, class C>
int launch_chunked(const qm_scan_args* a, cudaStream_t stream, const char* fn) {
  return a->channel_major ? launch_chunked_layout<N, kInt8, C, true>(a, stream, fn)
                          : launch_chunked_layout<N, kInt8, C, false>(a, stream, fn);
}

// Whether blocks of cpb channels, one per SM, make one wave that fills at least 3/4 of the SMs.
bool fills_one_wave(int64_t channels, int cpb) {
  const int64_t sms = qm::sm_count(), blocks = (channels + cpb - 1) / cpb;
  return blocks <= sms && 4 * blocks >= 3 * sms;
}

// lanes along the states (scan_lanes.cuh) from here up to kSeqMinChannels (channel-major: no upper bound), 2 states
// per lane below QM_SCAN_LANES_S4_CHANNELS, 4 from there
#ifndef QM_SCAN_LANES_MIN_CHANNELS
#define QM_SCAN_LANES_MIN_CHANNELS 3072
#endif
#ifndef QM_SCAN_LANES_S4_CHANNELS
#define QM_SCAN_LANES_S4_CHANNELS 12288
#endif

template <bool kInt8>
int launch_scan(const qm_scan_args* a, cudaStream_t stream, const char* fn) {
  // int8, N = 16 (the Mamba models): from kSeqMinChannels channels (B*D) one thread per channel (scan_seq_kernel);
  // from 3072 channels below that, lanes along the states, 2 or 4 states per lane (scan_lanes.cuh: B8 D1536 L2048
  // 0.237 ms against v5's 0.356 and scan_seq_kernel's 0.268, B2 D4096 0.192 against v5's 0.271; it loses to v5 at
  // 2048 channels and below, and to scan_seq_kernel above: B13 D1024 0.373 against 0.268);
  // up to 2048 channels one warp per channel with 16 steps per lane keeps the most warps resident, except where
  // 12-channel blocks of two warps per channel (K = 2, 8 steps per lane) fill one wave of one block per SM (B1
  // D1536 on 132 SMs: 12-15% faster); above 2048, two channels per warp with 8 steps per lane spends fewer
  // instructions per element (4 scan levels, B/C staging shared by 16 channels). Measured on H200/H100:
  // trt_plugins/bench/NOTES.md.
  const int64_t channels = static_cast<int64_t>(a->dim) * a->batch;
  switch (a->dstate) {
    case 8: return launch_chunked<8, kInt8, ScanCfg<8, kInt8, kInt8 ? 16 : 8, 32, 8>>(a, stream, fn);
    case 16:
      if constexpr (kInt8) {
        if (seq_applies<16>(a)) {
          const dim3 grid(static_cast<unsigned>((a->dim + kSeqThreads - 1) / kSeqThreads),
                          static_cast<unsigned>(a->batch));
          const bool half = a->y_dtype == QM_DTYPE_FLOAT16;
          auto kernel = a->z ? (half ? scan_seq_kernel<16, true, __half> : scan_seq_kernel<16, true, float>)
                             : (half ? scan_seq_kernel<16, false, __half> : scan_seq_kernel<16, false, float>);
          kernel<<<grid, kSeqThreads, 0, stream>>>(*a);
          QM_CHECK_LAUNCH(fn);
          return QM_OK;
        }
        // channel-major inputs above kSeqMinChannels too (scan_seq_kernel reads token-major only)
        if (channels >= QM_SCAN_LANES_MIN_CHANNELS && (channels < kSeqMinChannels || a->channel_major) &&
            lanes::applies(a))
          return channels < QM_SCAN_LANES_S4_CHANNELS ? lanes::launch_two_states(a, stream, fn)
                                                      : lanes::launch<lanes::Cfg<4, 4, 32>>(a, stream, fn);
        if (channels > 2048) return launch_chunked<16, kInt8, ScanCfg<16, kInt8, 8, 16, 8>>(a, stream, fn);
        if (fills_one_wave(channels, ScanCfg<16, kInt8, 8, 32, 24, 2>::CPB))
          return launch_chunked<16, kInt8, ScanCfg<16, kInt8, 8, 32, 24, 2>>(a, stream, fn);
      }
      return launch_chunked<16, kInt8, ScanCfg<16, kInt8, kInt8 ? 16 : 8, 32, 8>>(a, stream, fn);
    case 32: return launch_chunked<32, kInt8, ScanCfg<32, kInt8, 8, 32, 8>>(a, stream, fn);
    default: return launch_chunked<64, kInt8, ScanCfg<64, kInt8, 4, 32, 8>>(a, stream, fn);
  }
}

template <int N, bool kInt8>
int launch_update_n(const qm_scan_args* a, cudaStream_t stream, const char* fn) {
  constexpr int G = N / 4, threads = 128;  // 256 and 512 measured no better (NOTES.md, session 6)
  const int64_t total = static_cast<int64_t>(a->batch) * a->dim * G;
  const bool vec = aligned(a->initial_state) && aligned(a->final_state) && aligned(a->A);
  const bool vec_dt = a->dt_w && a->dt_rank % 16 == 0 && aligned(a->dt_w) && aligned(a->dt_lowrank);
  // kDtW = kInt8: a fused dt_proj comes with int8 inputs only (validate), so float inputs get no kDtW instantiation
  auto kernel = kInt8 && a->xp_acc ? state_update_kernel<N, kInt8, kInt8, kInt8>
               : kInt8 && a->dt_w ? state_update_kernel<N, kInt8, kInt8> : state_update_kernel<N, kInt8, false>;
  QM_CHECK_LAUNCHED(qm::launch(kernel, dim3(static_cast<unsigned>((total + threads - 1) / threads)),
                               dim3(threads), 0, stream, *a, vec, vec_dt),
                    fn);
  return QM_OK;
}

template <bool kInt8>
int launch_update(const qm_scan_args* a, cudaStream_t stream, const char* fn) {
  switch (a->dstate) {
    case 8: return launch_update_n<8, kInt8>(a, stream, fn);
    case 16: return launch_update_n<16, kInt8>(a, stream, fn);
    case 32: return launch_update_n<32, kInt8>(a, stream, fn);
    default: return launch_update_n<64, kInt8>(a, stream, fn);
  }
}
}  // namespace

namespace tma {
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled through the runtime's driver entry point (no libcuda link); null where unavailable.
static EncodeTiled encoder() {
  static const EncodeTiled fn = []() -> EncodeTiled {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();  // not sticky; clear it so that the launch's check does not report it
      return nullptr;
    }
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

bool encode(const qm_scan_args* a, Maps* m, unsigned* present) {
  const EncodeTiled fn = encoder();
  if (!fn) return false;
  const void* arrays[kArrays] = {a->u, a->dt, a->z, a->dual_scale ? a->u_mask : nullptr};
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(a->dim), static_cast<cuuint64_t>(a->batch) * a->seqlen};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(a->dim)};
  const cuuint32_t box[2] = {kBoxBytes, kBoxRows}, elem[2] = {1, 1};
  *present = 0;
  for (int k = 0; k < kArrays; ++k) {
    if (arrays[k]) *present |= 1u << k;
    void* p = const_cast<void*>(arrays[k] ? arrays[k] : a->u);
    if (fn(&m->map[k], CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, p, dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
           CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) !=
        CUDA_SUCCESS)
      return false;
  }
  return true;
}
}  // namespace tma

int qm::validate_scan_args(const qm_scan_args* a, const char* fn) { return validate(a, fn); }

extern "C" int qm_selective_scan_workspace_size(int batch, int seqlen, int dim, int dstate, size_t* bytes) {
  QM_CHECK_ARG(bytes, "qm_selective_scan_workspace_size: bytes must be non-null");
  QM_CHECK_ARG(batch > 0 && seqlen > 0 && dim > 0 && dstate > 0 && dstate <= kMaxN,
               "qm_selective_scan_workspace_size: shapes must be positive (dstate <= %d)", kMaxN);
  *bytes = 0;  // the sequential kernel needs none
  return QM_OK;
}

extern "C" int qm_selective_scan(const qm_scan_args* args, cudaStream_t stream) {
  int rc = validate(args, "qm_selective_scan");
  if (rc != QM_OK) return rc;
  QM_CHECK_ARG(!args->dt_w, "qm_selective_scan: dt_w (a fused dt_proj) is for qm_selective_state_update only");
  const bool i8 = args->input_dtype == QM_DTYPE_INT8;
  if (args->seqlen == 1)  // one step: the decode kernel (a prefill chunk would leave 31 of 32 lanes idle)
    return i8 ? launch_update<true>(args, stream, "qm_selective_scan launch (L = 1)")
              : launch_update<false>(args, stream, "qm_selective_scan launch (L = 1)");
  return i8 ? launch_scan<true>(args, stream, "qm_selective_scan launch")
            : launch_scan<false>(args, stream, "qm_selective_scan launch");
}

extern "C" int qm_selective_state_update(const qm_scan_args* args, cudaStream_t stream) {
  int rc = validate(args, "qm_selective_state_update");
  if (rc != QM_OK) return rc;
  QM_CHECK_ARG(args->seqlen == 1, "qm_selective_state_update: seqlen=%d must be 1", args->seqlen);
  QM_CHECK_ARG(args->initial_state && args->final_state, "qm_selective_state_update: state in and out are required");
  return args->input_dtype == QM_DTYPE_INT8
             ? launch_update<true>(args, stream, "qm_selective_state_update launch")
             : launch_update<false>(args, stream, "qm_selective_state_update launch");
}
