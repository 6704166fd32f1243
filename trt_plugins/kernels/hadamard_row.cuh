// HadamardQuant's fast path for one row (spec 4.6), shared by qm_hadamard_quant and by the GEMV that computes it in
// front of out_proj (int8_linear.cu): one code path, so both give the same bits.
#pragma once
#include "common.cuh"
#include "hadamard_tables.h"

namespace {
// FWHT stages h = 2^lh_first ... p / 2 over a row of d = m * p floats in shared memory, the block's threads sharing
// the d / 2 pairs of each stage. p and every stage width h are powers of two: indices by shifts and masks (runtime
// integer division costs ~20 instructions each, and the stages needed four per pair).
__device__ void shared_butterflies(float* t, int d, int lp, int lh_first) {
  const int p = 1 << lp, half = p >> 1;
  for (int lh = lh_first; (1 << lh) < p; ++lh) {
    const int h = 1 << lh;
    for (int k = threadIdx.x; k < d / 2; k += blockDim.x) {
      const int a = k >> (lp - 1);   // row of the [m, p] view
      const int r = k & (half - 1);  // pair index within the row
      const int i = a * p + ((r >> lh) << (lh + 1)) + (r & (h - 1));
      const float lo = t[i], hi = t[i + h];
      t[i] = __fadd_rn(lo, hi);
      t[i + h] = __fsub_rn(lo, hi);
    }
    __syncthreads();
  }
}

// The FWHT stages h = 1 .. min(V, n) / 2 over V values in registers, in the spec's stage order (n: the transform's
// length where it is below V, a power of two).
template <int V>
__device__ __forceinline__ void register_butterflies(float (&v)[V], int n = V) {
#pragma unroll
  for (int h = 1; h < V; h <<= 1) {
    if (h >= n) break;
#pragma unroll
    for (int j = 0; j < V; ++j)
      if ((j & h) == 0) {
        const float lo = v[j], hi = v[j + h];
        v[j] = __fadd_rn(lo, hi);
        v[j + h] = __fsub_rn(lo, hi);
      }
  }
}

// Fast path: one block per row, 8 consecutive elements per thread. Stages h = 1, 2, 4 in registers, h = 8 .. 128
// by warp shuffles (partner lane = lane ^ (h / 8)), h >= 256 through shared memory; the mixing across m reads the
// row from shared memory and adds or subtracts each term (see mix_group). The quotient by the scale is a reciprocal
// multiply where the code is certain.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float* v);
template <>
__device__ __forceinline__ void load8<float>(const float* p, float* v) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
template <>
__device__ __forceinline__ void load8<__half>(const __half* p, float* v) {
  const uint4 r = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __half22float2(h[j]);
    v[2 * j] = f.x, v[2 * j + 1] = f.y;
  }
}

// Q(hy, scale) by a reciprocal multiply: r = fl(hy fl(1 / scale)) is within 2^-22.4 |r| of the spec's fl(hy / scale)
// (three roundings), so a code is certain with a tolerance of |r| 2^-20 (5x); else the IEEE division decides.
__device__ __forceinline__ bool fast_quant_code(float hy, float inv_scale, int8_t& q) {
  const qm::FastCode code = qm::fast_code(__fmul_rn(hy, inv_scale));
  q = static_cast<int8_t>(code.bits);
  return code.certain(__fmul_rn(fabsf(code.clamped), 0x1p-20f));
}

__device__ __forceinline__ int8_t quantize_fast(float hy, float scale, float inv_scale, bool fast_quant) {
  int8_t q;
  return fast_quant && fast_quant_code(hy, inv_scale, q) ? q : qm::quantize(hy, scale);
}

// The same for W values (W = 4 or 6) with one branch: where any code is not certain (rare), all W take the IEEE
// division.
template <int W>
__device__ __forceinline__ void quantize_w_fast(const float (&hy)[W], float scale, float inv_scale, bool fast_quant,
                                                int8_t (&q)[W]) {
  bool certain = fast_quant;
#pragma unroll
  for (int j = 0; j < W; ++j) certain &= fast_quant_code(hy[j], inv_scale, q[j]);
  if (!certain) {
#pragma unroll
    for (int j = 0; j < W; ++j) q[j] = qm::quantize(hy[j], scale);
  }
}

// Output a of a column of the [M, p] view (t: the column's M values): the sum of H_M[a, b] * t[b] left to right (the
// spec order). The signs of H_M are compile-time constants here (hadamard_row_signs), so each term is one add or
// subtract: H_M[a, b] * t[b] = +-t[b] exactly.
template <int M>
__device__ __forceinline__ float mix_term(const float* t, int a) {
  const unsigned signs = hadamard_row_signs(M, a);
  float acc = signs & 1u ? -t[0] : t[0];
#pragma unroll
  for (int b = 1; b < M; ++b) acc = signs >> b & 1u ? __fsub_rn(acc, t[b]) : __fadd_rn(acc, t[b]);
  return acc;
}

// Mixing task (column i, outputs W g .. W g + W - 1) of the [M, p] view: t holds column i's M values (mix_term).
template <int M, int G, int W = 4>
__device__ __forceinline__ void mix_group(const float* t, int8_t* codes, int i, int p, float c, float scale,
                                          float inv_scale, bool fast_quant) {
  constexpr int kRow = W * G;
  float hy[W];
#pragma unroll
  for (int j = 0; j < W; ++j) hy[j] = __fmul_rn(mix_term<M>(t, kRow + j), c);
  int8_t q[W];
  quantize_w_fast<W>(hy, scale, inv_scale, fast_quant, q);
#pragma unroll
  for (int j = 0; j < W; ++j) codes[(kRow + j) * p + i] = q[j];
}

// the group g (runtime, warp-uniform while p >= 32) as a compile-time constant
template <int M, int W = 4, int G = 0>
__device__ __forceinline__ void mix_dispatch(int g, const float* t, int8_t* codes, int i, int p, float c, float scale,
                                             float inv_scale, bool fast_quant) {
  if constexpr (G < M / W) {
    if (g == G)
      mix_group<M, G, W>(t, codes, i, p, c, scale, inv_scale, fast_quant);
    else
      mix_dispatch<M, W, G + 1>(g, t, codes, i, p, c, scale, inv_scale, fast_quant);
  }
}

// HadamardQuant of one row, d = M * 2^lp floats at x, by the block's first d / 8 threads (8 consecutive elements
// each; the block is whole warps with at least d / 8 threads, every thread calls this). The int8 codes go to out
// (global or shared memory, 8-byte aligned); row4 is shared-memory scratch of d floats then d bytes, used when
// M > 1 or p > 256. A caller that reads out from other threads syncs first (the register path ends without a barrier).
// kFused (out in shared memory, the GEMV's prologue): the mixing writes the codes straight into out (no barrier and
// copy at the end: the caller syncs), in tasks of 6 outputs when M % 6 == 0 (M = 12, p <= 128: one round of the
// GEMV's 256 threads instead of 1.5 of 4-output tasks).
template <typename T, int M, bool kSplit, int EM = 32, bool kFused = false>
__device__ __forceinline__ void hadamard8_row(const T* __restrict__ x, int8_t* out, float4* row4, int d, int lp,
                                              float c, float scale, float inv_scale, bool fast_quant) {
  float* row = reinterpret_cast<float*>(row4);
  const int p = 1 << lp, tid = threadIdx.x, e0 = tid * 8;
  const bool live = e0 < d;  // the block is rounded up to whole warps; dead lanes only feed shuffles
  float v[8];
  if (live) {
    load8<T>(x + e0, v);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = 0.f;
  }
  register_butterflies(v, p);  // h = 1 .. 4
#pragma unroll
  for (int h = 8; h <= 128; h <<= 1) {
    if (h >= p) break;
    const int lanes = h >> 3;
    // lower lane: lo + hi = fl(1 * v + other); upper lane: lo - hi = fl(-1 * v + other) (the products are exact)
    const float sign = tid & lanes ? -1.f : 1.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = __fmaf_rn(sign, v[j], __shfl_xor_sync(0xffffffffu, v[j], lanes));
  }
  if (p > 256 || M > 1) {
    if (live) {
      row4[tid * 2] = make_float4(v[0], v[1], v[2], v[3]);
      row4[tid * 2 + 1] = make_float4(v[4], v[5], v[6], v[7]);
    }
    __syncthreads();
    if constexpr (M == 1) {
      // p > 256: the stages h = 256 .. p / 2 combine elements 256 * 2^k apart, i.e. within a column i < 256 of the
      // [p / 256, 256] view. One thread per column runs them in registers (E = p / 256 <= 32 values, stage order
      // kept), quantizes, and the codes go through shared memory so that the global stores stay 8 bytes wide.
      int8_t* codes = reinterpret_cast<int8_t*>(row + d);
      const int E = p >> 8;
      for (int i = tid; i < 256; i += blockDim.x) {
        float w[EM];
#pragma unroll
        for (int j = 0; j < EM; ++j) w[j] = j < E ? row[j * 256 + i] : 0.f;
        register_butterflies(w, E);
#pragma unroll
        for (int j = 0; j < EM; ++j)
          if (j < E) codes[j * 256 + i] = quantize_fast(__fmul_rn(w[j], c), scale, inv_scale, fast_quant);
      }
      __syncthreads();
      if (live) *reinterpret_cast<uint2*>(out + e0) = *reinterpret_cast<const uint2*>(codes + e0);
      return;
    }
    shared_butterflies(row, d, lp, 8);  // h = 256 ... p / 2 (none when p <= 256)
    if constexpr (M > 1) {
      // mixing, the codes through shared memory so that the global stores stay 8 bytes wide. kSplit (few rows,
      // latency-bound): p * M / 4 tasks (column i, a group of 4 of its M outputs), 2 per thread of the d / 8, so
      // every thread works. Else one column per thread (reads its M values once): with many rows the other
      // resident block fills the idle threads' issue slots, and the split's extra reads cost more (NOTES.md).
      static_assert(M % 4 == 0, "outputs come in groups of 4");
      int8_t* codes = kFused ? out : reinterpret_cast<int8_t*>(row + d);
      if constexpr (kSplit) {
        constexpr int W = kFused && M % 6 == 0 ? 6 : 4;  // outputs per task
        for (int k = tid; k < p * (M / W); k += blockDim.x) {
          const int i = k & (p - 1), g = k >> lp;
          float t[M];
#pragma unroll
          for (int b = 0; b < M; ++b) t[b] = row[b * p + i];
          mix_dispatch<M, W>(g, t, codes, i, p, c, scale, inv_scale, fast_quant);
        }
      } else {
        for (int i = tid; i < p; i += blockDim.x) {
          float t[M];
#pragma unroll
          for (int b = 0; b < M; ++b) t[b] = row[b * p + i];
#pragma unroll
          for (int g = 0; g < M / 4; ++g) mix_dispatch<M>(g, t, codes, i, p, c, scale, inv_scale, fast_quant);
        }
      }
      if constexpr (kFused) return;  // the codes are in out already
      __syncthreads();
      if (live)
        *reinterpret_cast<uint2*>(out + e0) = *reinterpret_cast<const uint2*>(codes + e0);
      return;
    }
  }
  if (!live) return;
  int8_t q[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) q[j] = quantize_fast(__fmul_rn(v[j], c), scale, inv_scale, fast_quant);
  *reinterpret_cast<uint2*>(out + e0) = *reinterpret_cast<const uint2*>(q);
}

// The row transform's host-side constants for d = m * p (p = 2^lp) and a quantizer scale: c = 1 / sqrt(d) (spec
// 4.6), and the scale's reciprocal where it is accurate (fast: the reciprocal-multiply quantizer may decide codes).
struct HadamardConsts {
  int lp;
  float c, inv_scale;
  bool fast;
};

inline HadamardConsts hadamard_consts(int d, int p, float scale) {
  HadamardConsts h{0, static_cast<float>(1.0 / sqrt(static_cast<double>(d))), 0.f, qm::has_accurate_reciprocal(scale)};
  while ((1 << h.lp) < p) ++h.lp;
  if (h.fast) h.inv_scale = static_cast<float>(1.0 / scale);
  return h;
}

// d = m * p with m in {1, 12, 20, 28} and p a power of two (host side)
inline bool factor(int d, int* m, int* p) {
  const int ms[] = {1, 12, 20, 28};
  for (int mm : ms) {
    if (d % mm) continue;
    int pp = d / mm;
    if ((pp & (pp - 1)) == 0) {
      *m = mm;
      *p = pp;
      return true;
    }
  }
  return false;
}
}  // namespace
