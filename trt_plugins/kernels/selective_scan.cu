// Selective scan (spec 4.4, 4.5) and the decode state update.
// Prefill: v4, a single-pass chunked scan, parallel along time within a warp (description below).
// Decode: one thread per 4 states of a (b, d), coalesced 16-byte state traffic.
// Earlier versions (v1-v3, sequential in time) and their measurements: trt_plugins/bench/NOTES.md.
#include "common.cuh"

namespace {
constexpr int kMaxN = 64;

// v4 (prefill, int8 or float inputs): parallel along time inside a warp. A block owns W channels of one
// batch row (one warp per channel) and walks time in chunks of CH = 32*T steps staged in shared memory;
// lane j owns the T consecutive steps [j*T, j*T + T) of the chunk. For each state n the lane computes
// dA = exp2(delta*A*log2 e) and dBu = delta*u*B once (kept in registers), composes them into its
// segment's affine map h -> P*h + S, a warp scan over the 32 maps gives each lane its starting state,
// and a second pass over the registers produces h and y += h*C. The chunk's carry per n is the warp's
// total map applied to the previous carry. One exp per (b, t, d, n), no global round trip, no
// __syncthreads inside the recurrence. Fast float32 math: y feeds no quantizer directly (spec 4.4,
// "Exactness"), outputs are compared with a tolerance.
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kWarps = 8;  // channels per block

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1]; log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3,
// by its series to s^13 (truncation < 2e-8 relative): ~15 instructions instead of log1pf's ~40.
__device__ __forceinline__ float softplus_fast(float x) {
  if (x > 20.f) return x;
  const float e = __expf(-fabsf(x));
  const float s = __fdividef(e, 2.f + e), s2 = s * s;
  float p = __fmaf_rn(s2, 1.f / 13.f, 1.f / 11.f);
  p = __fmaf_rn(p, s2, 1.f / 9.f);
  p = __fmaf_rn(p, s2, 1.f / 7.f);
  p = __fmaf_rn(p, s2, 1.f / 5.f);
  p = __fmaf_rn(p, s2, 1.f / 3.f);
  p = __fmaf_rn(p, s2, 1.f);
  return fmaxf(x, 0.f) + 2.f * s * p;
}
__device__ __forceinline__ float silu_fast(float z) { return __fdividef(z, 1.f + __expf(-z)); }

// steps per lane: as many as registers allow (the warp scan's cost is shared by T steps)
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

template <int N, bool kInt8>
constexpr int v4_default_steps() { return kInt8 ? (N <= 16 ? 16 : 256 / N) : (N <= 32 ? 8 : 4); }

// states advanced together per iteration: independent chains for the scheduler to interleave
template <int N, bool kInt8>
constexpr int v4_default_interleave() { return 1; }  // 2 and 4 measured slower (spills): NOTES.md

template <int N, bool kInt8, int T_>
struct V4 {
  static constexpr int T = T_;
  static constexpr int CH = 32 * T;                                                // steps per chunk
  static constexpr int LS = T == 4 ? 4 : T + 4;  // words per lane in a B/C row: an odd multiple of 4 words
  static constexpr int ROW = 32 * LS;            //   makes the lanes' 16-byte reads bank-conflict free
  static constexpr int ESZ = kInt8 ? 1 : 4;      // bytes per staged u/dt/z element
  static constexpr int IN_BYTES = (kInt8 ? 4 : 3) * CH * ESZ;  // u, dt, z (+ mask) of one channel
  // one channel's region; reused for its y (CH floats) after the recurrence. +16 bytes: rows of different
  // warps start 4 banks apart, so the y write-out reads are conflict free.
  static constexpr int WARP_BYTES = (IN_BYTES > 4 * CH ? IN_BYTES : 4 * CH) + 16;
  static constexpr size_t SMEM = 2ull * N * ROW * 4 + kWarps * WARP_BYTES + 2ull * kWarps * N * 4;
  static constexpr int MIN_BLOCKS = T <= 8 ? 3 : 2;  // blocks per SM the register budget is sized for
};


// Stages the chunk's B and C (dequantized) as [n][lane][T] rows, zero beyond the sequence so idle lanes
// compose identity maps. vec: the chunk is 16-byte aligned (int8: 16 B = one t's 16 states or 16 values),
// so every thread issues its loads back to back before the first use.
template <int N, bool kInt8, int T_>
__device__ __forceinline__ void stage_bc(const qm_scan_args& a, float* sB, float* sC, int b, int t0, int nt,
                                         bool vec) {
  using C = V4<N, kInt8, T_>;
  constexpr int T = C::T, CH = C::CH;
  const int64_t base = (static_cast<int64_t>(b) * a.seqlen + t0) * N;
  const int total = CH * N;  // elements of one matrix in this chunk (zero-padded)
  auto put = [&](float* dst, int i, float v) {
    const int t = i / N, n = i % N;
    dst[n * C::ROW + (t / T) * C::LS + t % T] = v;
  };
  if constexpr (kInt8) {
    if (vec) {  // 16 int8 per load
      constexpr int kPer = CH * N / 16 / (kWarps * 32);  // loads per thread per matrix (exact: CH*N % 4096 == 0)
      int4 rb[kPer], rc[kPer];
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int i = (j * kWarps * 32 + threadIdx.x) * 16;
        rb[j] = i < nt * N ? *reinterpret_cast<const int4*>(static_cast<const int8_t*>(a.B) + base + i) : int4{};
        rc[j] = i < nt * N ? *reinterpret_cast<const int4*>(static_cast<const int8_t*>(a.C) + base + i) : int4{};
      }
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int i = (j * kWarps * 32 + threadIdx.x) * 16;
        const int8_t* pb = reinterpret_cast<const int8_t*>(&rb[j]);
        const int8_t* pc = reinterpret_cast<const int8_t*>(&rc[j]);
#pragma unroll
        for (int k = 0; k < 16; ++k) {
          put(sB, i + k, static_cast<float>(pb[k]) * a.B_scale);
          put(sC, i + k, static_cast<float>(pc[k]) * a.C_scale);
        }
      }
      return;
    }
  }
  for (int i0 = threadIdx.x; i0 < total; i0 += 4 * kWarps * 32) {  // scalar: 4 loads in flight per matrix
    float vb[4], vc[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int i = i0 + j * kWarps * 32;
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
      const int i = i0 + j * kWarps * 32;
      if (i < total) {
        put(sB, i, vb[j]);
        put(sC, i, vc[j]);
      }
    }
  }
}

// Stages u, dt, z (and the mask) of the block's W channels as [channel][array][t]. vec (int8, D % 8 == 0,
// aligned): one 8-byte load per (array, t) row of the W channels, all of a thread's loads issued first.
template <int N, bool kInt8, int T_>
__device__ __forceinline__ void stage_channels(const qm_scan_args& a, unsigned char* sIn, int b, int t0, int nt,
                                               int d0, bool vec) {
  using C = V4<N, kInt8, T_>;
  constexpr int CH = C::CH;
  const int D = a.dim;
  const void* src[4] = {a.u, a.dt, a.z, a.u_mask};
  constexpr int narr = kInt8 ? 4 : 3;
  if constexpr (kInt8) {
    static_assert(kWarps == 8, "the vector path moves 8 channels per load");
    if (vec) {
      constexpr int kRows = (CH + kWarps * 32 - 1) / (kWarps * 32);
      uint2 r[4][kRows];
#pragma unroll
      for (int k = 0; k < 4; ++k)
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
          const int t = j * kWarps * 32 + threadIdx.x;
          const bool ok = t < nt && src[k] && (k != 3 || a.dual_scale);
          r[k][j] = ok ? *reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(src[k]) +
                                                        (static_cast<int64_t>(b) * a.seqlen + t0 + t) * D + d0)
                       : uint2{0u, 0u};
        }
#pragma unroll
      for (int k = 0; k < 4; ++k)
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
          const int t = j * kWarps * 32 + threadIdx.x;
          if (t >= nt) continue;
          const uint8_t* v = reinterpret_cast<const uint8_t*>(&r[k][j]);
#pragma unroll
          for (int w = 0; w < kWarps; ++w) sIn[w * C::WARP_BYTES + k * CH + t] = v[w];
        }
      return;
    }
  }
  for (int i = threadIdx.x; i < nt * kWarps; i += blockDim.x) {
    const int t = i / kWarps, w = i % kWarps;
    if (d0 + w >= D) continue;
    const int64_t e = (static_cast<int64_t>(b) * a.seqlen + t0 + t) * D + d0 + w;
    unsigned char* r = sIn + w * C::WARP_BYTES;
#pragma unroll
    for (int k = 0; k < narr; ++k) {
      const bool ok = src[k] && (k != 3 || a.dual_scale);
      if constexpr (kInt8)
        r[k * CH + t] = ok ? static_cast<const uint8_t*>(src[k])[e] : 0;
      else
        reinterpret_cast<float*>(r)[k * CH + t] = ok ? static_cast<const float*>(src[k])[e] : 0.f;
    }
  }
}

template <int N, bool kInt8, int T_, int NI>
__global__ void __launch_bounds__(kWarps * 32, (V4<N, kInt8, T_>::MIN_BLOCKS)) scan_v4_kernel(qm_scan_args a, bool vec_bc, bool vec_ch,
                                                                                 bool vec_y) {
  using C = V4<N, kInt8, T_>;
  constexpr int T = C::T, CH = C::CH;
  extern __shared__ __align__(16) unsigned char smem[];
  float* sB = reinterpret_cast<float*>(smem);
  float* sC = sB + N * C::ROW;
  unsigned char* sIn = reinterpret_cast<unsigned char*>(sC + N * C::ROW);
  float* sA2 = reinterpret_cast<float*>(sIn + kWarps * C::WARP_BYTES);  // [W][N] A * log2 e
  float* sCarry = sA2 + kWarps * N;                                     // [W][N] state entering the chunk
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int D = a.dim, L = a.seqlen, b = blockIdx.y, d0 = blockIdx.x * kWarps, d = d0 + warp;
  const bool active = d < D;
  for (int i = threadIdx.x; i < kWarps * N; i += blockDim.x) {
    const int dd = d0 + i / N, n = i % N;
    sA2[i] = dd < D ? a.A[static_cast<int64_t>(dd) * N + n] * kLog2e : 0.f;
    sCarry[i] = (dd < D && a.initial_state) ? a.initial_state[(static_cast<int64_t>(b) * D + dd) * N + n] : 0.f;
  }
  const float dskip = (active && a.Dskip) ? a.Dskip[d] : 0.f;
  const float bias = (active && a.dt_bias) ? a.dt_bias[d] : 0.f;
  unsigned char* mine = sIn + warp * C::WARP_BYTES;

  for (int t0 = 0; t0 < L; t0 += CH) {
    const int nt = min(CH, L - t0);
    __syncthreads();  // the previous chunk's shared memory is no longer read
    stage_bc<N, kInt8, T_>(a, sB, sC, b, t0, nt, vec_bc);
    stage_channels<N, kInt8, T_>(a, sIn, b, t0, nt, d0, vec_ch);
    __syncthreads();
    if (active) {  // warp-uniform
      const int tb = lane * T;
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
          const bool ok = tb + i < nt;  // beyond the sequence: delta = 0, u = 0 make the identity map
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
#pragma unroll 1
      for (int n0 = 0; n0 < N; n0 += NI) {
        float dA[NI][T], dBu[NI][T], pa[NI], pb[NI], carry[NI];
#pragma unroll
        for (int k = 0; k < NI; ++k) {
          const float A2 = sA2[warp * N + n0 + k];
          const float* brow = sB + (n0 + k) * C::ROW + lane * C::LS;
#pragma unroll
          for (int i = 0; i < T; i += 4) {
            const float4 bv = *reinterpret_cast<const float4*>(brow + i);
            const float bb[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              dA[k][i + j] = ex2(delta[i + j] * A2);
              dBu[k][i + j] = dlu[i + j] * bb[j];
            }
          }
          // this lane's segment as an affine map h -> pa*h + pb
          pa[k] = ex2(sumdelta * A2);
          pb[k] = 0.f;
#pragma unroll
          for (int i = 0; i < T; ++i) pb[k] = __fmaf_rn(dA[k][i], pb[k], dBu[k][i]);
          carry[k] = sCarry[warp * N + n0 + k];
        }
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {  // inclusive scan of the maps over lanes (no divergence:
#pragma unroll                                   //  lanes below off compose with the identity)
          for (int k = 0; k < NI; ++k) {
            float qa = __shfl_up_sync(0xffffffffu, pa[k], off), qb = __shfl_up_sync(0xffffffffu, pb[k], off);
            qa = lane >= off ? qa : 1.f;
            qb = lane >= off ? qb : 0.f;
            pb[k] = __fmaf_rn(pa[k], qb, pb[k]);
            pa[k] *= qa;
          }
        }
        float h[NI];
#pragma unroll
        for (int k = 0; k < NI; ++k) {
          const float ea = __shfl_up_sync(0xffffffffu, pa[k], 1), eb = __shfl_up_sync(0xffffffffu, pb[k], 1);
          const float la = __shfl_sync(0xffffffffu, pa[k], 31), lb = __shfl_sync(0xffffffffu, pb[k], 31);
          h[k] = lane == 0 ? carry[k] : __fmaf_rn(ea, carry[k], eb);
          carry[k] = __fmaf_rn(la, carry[k], lb);  // the state after this chunk, the same in every lane
        }
#pragma unroll
        for (int k = 0; k < NI; ++k) {
          const float* crow = sC + (n0 + k) * C::ROW + lane * C::LS;
#pragma unroll
          for (int i = 0; i < T; i += 4) {
            const float4 cv = *reinterpret_cast<const float4*>(crow + i);
            const float cc[4] = {cv.x, cv.y, cv.z, cv.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              h[k] = __fmaf_rn(dA[k][i + j], h[k], dBu[k][i + j]);
              y[i + j] = __fmaf_rn(h[k], cc[j], y[i + j]);
            }
          }
        }
        __syncwarp();  // every lane has read the carries
        if (lane == 0)
#pragma unroll
          for (int k = 0; k < NI; ++k) sCarry[warp * N + n0 + k] = carry[k];
      }
      if (a.z) {
        float g[T];
#pragma unroll
        for (int i = 0; i < T; ++i) {
          const int t = tb + i;
          const float zv = t < nt ? (kInt8 ? static_cast<float>(reinterpret_cast<const int8_t*>(mine)[2 * CH + t]) *
                                                 a.z_scale
                                           : reinterpret_cast<const float*>(mine)[2 * CH + t])
                                  : 0.f;
          g[i] = silu_fast(zv);
        }
        __syncwarp();  // z is read before y overwrites the region
#pragma unroll
        for (int i = 0; i < T; ++i) y[i] *= g[i];
      }
      __syncwarp();
      float* sy = reinterpret_cast<float*>(mine);
#pragma unroll
      for (int i = 0; i < T; ++i) sy[tb + i] = y[i];
    }
    __syncthreads();
    if (vec_y) {  // one row (W channels of one t) per thread: 16 (fp16) or 2 x 16 (fp32) bytes
      for (int t = threadIdx.x; t < nt; t += blockDim.x) {
        float v[kWarps];
#pragma unroll
        for (int w = 0; w < kWarps; ++w) v[w] = reinterpret_cast<const float*>(sIn + w * C::WARP_BYTES)[t];
        const int64_t e = (static_cast<int64_t>(b) * L + t0 + t) * D + d0;
        if (a.y_dtype == QM_DTYPE_FLOAT16) {
          __half2 hv[kWarps / 2];
#pragma unroll
          for (int w = 0; w < kWarps / 2; ++w) hv[w] = __floats2half2_rn(v[2 * w], v[2 * w + 1]);
          *reinterpret_cast<int4*>(static_cast<__half*>(a.y) + e) = *reinterpret_cast<const int4*>(hv);
        } else {
          reinterpret_cast<float4*>(static_cast<float*>(a.y) + e)[0] = make_float4(v[0], v[1], v[2], v[3]);
          reinterpret_cast<float4*>(static_cast<float*>(a.y) + e)[1] = make_float4(v[4], v[5], v[6], v[7]);
        }
      }
    } else {
      for (int i = threadIdx.x; i < nt * kWarps; i += blockDim.x) {  // element by element
        const int t = i / kWarps, w = i % kWarps;
        if (d0 + w >= D) continue;
        const float v = reinterpret_cast<const float*>(sIn + w * C::WARP_BYTES)[t];
        const int64_t e = (static_cast<int64_t>(b) * L + t0 + t) * D + d0 + w;
        if (a.y_dtype == QM_DTYPE_FLOAT16)
          static_cast<__half*>(a.y)[e] = __float2half_rn(v);
        else
          static_cast<float*>(a.y)[e] = v;
      }
    }
  }
  __syncthreads();
  if (a.final_state)
    for (int i = threadIdx.x; i < kWarps * N; i += blockDim.x) {
      const int dd = d0 + i / N;
      if (dd < D) a.final_state[(static_cast<int64_t>(b) * D + dd) * N + i % N] = sCarry[i];
    }
}

// Decode (L = 1): G = N/4 threads per (b, d), each owning 4 consecutive states, so state reads and writes
// are coalesced 16-byte accesses; y is reduced over the G threads with shuffles. In place is safe: every
// thread reads its own states before writing them.
template <int N, bool kInt8>
__global__ void state_update_kernel(qm_scan_args a, bool vec) {
  constexpr int G = N / 4;
  qm::wait_for_inputs();
  qm::allow_dependents();
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = gid / G;
  const int q = static_cast<int>(gid % G);
  const int D = a.dim;
  const bool active = row < static_cast<int64_t>(a.batch) * D;
  const int64_t r = active ? row : 0;
  const int d = static_cast<int>(r % D), b = static_cast<int>(r / D);
  float u, x, zv = 0.f;
  if constexpr (kInt8) {
    const float s = (a.dual_scale && a.u_mask[r]) ? a.u_outlier_scale : a.u_scale;
    u = static_cast<float>(static_cast<const int8_t*>(a.u)[r]) * s;
    if (a.dt_w) {  // dt_proj fused in: the G lanes of this (b, d) split the rank, int32 sum, then the epilogue
      const int8_t* lr = a.dt_lowrank + static_cast<int64_t>(b) * a.dt_rank;
      const int8_t* wr = a.dt_w + static_cast<int64_t>(d) * a.dt_rank;
      int acc = 0;
      for (int j = q; j < a.dt_rank; j += G) acc += static_cast<int>(lr[j]) * static_cast<int>(wr[j]);
#pragma unroll
      for (int off = G / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off, G);
      const int8_t code = qm::quantize(__fmul_rn(static_cast<float>(acc), a.dt_m[d]), a.dt_scale);
      x = static_cast<float>(code) * a.dt_scale;
    } else {
      x = static_cast<float>(static_cast<const int8_t*>(a.dt)[r]) * a.dt_scale;
    }
    if (a.z) zv = static_cast<float>(static_cast<const int8_t*>(a.z)[r]) * a.z_scale;
  } else {
    u = static_cast<const float*>(a.u)[r];
    x = static_cast<const float*>(a.dt)[r];
    if (a.z) zv = static_cast<const float*>(a.z)[r];
  }
  if (a.dt_bias) x += a.dt_bias[d];
  const float delta = softplus_fast(x), dlu = delta * u;
  float h[4], A[4], Bv[4], Cv[4];
  const int64_t s0 = r * N + 4 * q, a0 = static_cast<int64_t>(d) * N + 4 * q, b0 = static_cast<int64_t>(b) * N + 4 * q;
  if (vec) {
    const float4 hv = a.initial_state ? reinterpret_cast<const float4*>(a.initial_state)[s0 / 4] : float4{};
    const float4 av = reinterpret_cast<const float4*>(a.A)[a0 / 4];
    h[0] = hv.x, h[1] = hv.y, h[2] = hv.z, h[3] = hv.w;
    A[0] = av.x, A[1] = av.y, A[2] = av.z, A[3] = av.w;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) h[j] = a.initial_state ? a.initial_state[s0 + j] : 0.f, A[j] = a.A[a0 + j];
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (kInt8) {
      Bv[j] = static_cast<float>(static_cast<const int8_t*>(a.B)[b0 + j]) * a.B_scale;
      Cv[j] = static_cast<float>(static_cast<const int8_t*>(a.C)[b0 + j]) * a.C_scale;
    } else {
      Bv[j] = static_cast<const float*>(a.B)[b0 + j];
      Cv[j] = static_cast<const float*>(a.C)[b0 + j];
    }
  }
  float y = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    h[j] = __fmaf_rn(ex2(delta * A[j] * kLog2e), h[j], dlu * Bv[j]);
    y = __fmaf_rn(h[j], Cv[j], y);
  }
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) y += __shfl_xor_sync(0xffffffffu, y, off, G);
  if (!active) return;
  if (a.final_state && vec)
    reinterpret_cast<float4*>(a.final_state)[s0 / 4] = make_float4(h[0], h[1], h[2], h[3]);
  else if (a.final_state)
#pragma unroll
    for (int j = 0; j < 4; ++j) a.final_state[s0 + j] = h[j];
  if (q == 0) {
    if (a.Dskip) y += a.Dskip[d] * u;
    if (a.z) y *= silu_fast(zv);
    if (a.y_dtype == QM_DTYPE_FLOAT16)
      static_cast<__half*>(a.y)[r] = __float2half_rn(y);
    else
      static_cast<float*>(a.y)[r] = y;
  }
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
  return QM_OK;
}

template <int N, bool kInt8, int T_ = v4_default_steps<N, kInt8>(), int NI = v4_default_interleave<N, kInt8>()>
int launch_v4(const qm_scan_args* a, cudaStream_t stream, const char* fn) {
  using C = V4<N, kInt8, T_>;
  // opt in to > 48 KB of dynamic shared memory, and ask for the largest carveout so MIN_BLOCKS blocks fit
  cudaError_t e = cudaFuncSetAttribute(scan_v4_kernel<N, kInt8, T_, NI>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(C::SMEM));
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(scan_v4_kernel<N, kInt8, T_, NI>, cudaFuncAttributePreferredSharedMemoryCarveout,
                             cudaSharedmemCarveoutMaxShared);
  if (e != cudaSuccess) return qm::fail_cuda("cudaFuncSetAttribute(scan shared memory)", e);
  dim3 grid(static_cast<unsigned>((a->dim + kWarps - 1) / kWarps), static_cast<unsigned>(a->batch));
  auto aligned = [](const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; };
  const bool vec_bc = aligned(a->B, 16) && aligned(a->C, 16) && (static_cast<int64_t>(a->seqlen) * N) % 16 == 0;
  const bool vec_ch = a->dim % kWarps == 0 && aligned(a->u, 8) && aligned(a->dt, 8) && (!a->z || aligned(a->z, 8)) &&
                      (!a->dual_scale || aligned(a->u_mask, 8));
  const bool vec_y = a->dim % kWarps == 0 && aligned(a->y, 16);
  scan_v4_kernel<N, kInt8, T_, NI><<<grid, kWarps * 32, C::SMEM, stream>>>(*a, vec_bc, vec_ch, vec_y);
  QM_CHECK_LAUNCH(fn);
  return QM_OK;
}

template <bool kInt8>
int launch_scan(const qm_scan_args* a, cudaStream_t stream, const char* fn) {
  // int8, N = 16: T = 16 while the grid is small (latency hidden by longer per-lane chains), T = 8 (3 blocks
  // per SM instead of 2) when there are many blocks; measured on the H100, trt_plugins/bench/NOTES.md
  const int64_t blocks = static_cast<int64_t>((a->dim + kWarps - 1) / kWarps) * a->batch;
  switch (a->dstate) {
    case 8: return launch_v4<8, kInt8>(a, stream, fn);
    case 16:
      if (kInt8 && blocks > 1024) return launch_v4<16, kInt8, 8>(a, stream, fn);
      return launch_v4<16, kInt8>(a, stream, fn);
    case 32: return launch_v4<32, kInt8>(a, stream, fn);
    default: return launch_v4<64, kInt8>(a, stream, fn);
  }
}

template <int N, bool kInt8>
int launch_update_n(const qm_scan_args* a, cudaStream_t stream, const char* fn) {
  constexpr int G = N / 4, threads = 256;
  const int64_t total = static_cast<int64_t>(a->batch) * a->dim * G;
  const bool vec = reinterpret_cast<uintptr_t>(a->initial_state) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(a->final_state) % 16 == 0 && reinterpret_cast<uintptr_t>(a->A) % 16 == 0;
  QM_CHECK_LAUNCHED(qm::launch(state_update_kernel<N, kInt8>, dim3(static_cast<unsigned>((total + threads - 1) / threads)),
                               dim3(threads), 0, stream, *a, vec),
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
