// HadamardQuant (spec 4.6) for many rows of d in 3072 .. 8192 with p = 256 (m = 12, 20, 28) or m = 1: one block of
// 256 threads per row, 32 consecutive elements per thread. The 8-element rows of hadamard_row.cuh run 5 of the 8
// stages of 256 by shuffles, at a shuffle and a multiply-add per value and stage; here stages h = 1 .. 16 run in
// registers (one add per value and stage) and h = 32, 64, 128 by shuffles, which cuts the row's instructions where
// the kernel is issue-bound (NOTES.md, session 17). m = 1: the stages from h = 256 run by columns of shared memory (one
// load and one add per value and stage); m > 1: the mixing reads columns of shared memory, as in hadamard_row.cuh.
// The quotient by the scale is one multiply by k = fl(c / s) where the code is certain; else the spec's IEEE path
// decides from hy = fl(acc * c).
#pragma once
#include "common.cuh"
#include "hadamard_tables.h"

namespace {
// columns: the extent of the register and shuffle stages (8 lanes x 32 values)
constexpr int kWideThreads = 256, kWideValues = 32, kWideColumns = 256;

// The row's floats in shared memory, 32 per 128-byte line, 16-byte pieces swizzled by the line's index (piece j of
// line l at j ^ (l & 7)): a thread writing its 32 values (one line) and a warp reading 32 consecutive columns are both
// free of bank conflicts.
__device__ __forceinline__ int wide_swizzle(int e) { return e ^ (((e >> 5) & 7) << 2); }

// Q(hy, s) of W values: r = fl(acc * k) with k = fl(c / s) is within 2^-21.9 |r| of the spec's fl(fl(acc * c) / s)
// (four roundings of at most 2^-24 each: k, r, and the spec's two), which is below 2^-14.9 where the code is not
// clamped (|r| < 128): a code is certain where the clamped r lies more than 2^-13 from a half-integer (one compare
// with a constant, no tolerance multiply; about 2.4e-4 of the codes fall back). Where any of the W is not certain, all
// W take the IEEE division of hy = fl(acc * c).
template <int W>
__device__ __forceinline__ void wide_codes(const float (&acc)[W], float c, float k, float scale, bool fast,
                                           int8_t (&q)[W]) {
  bool certain = fast;
#pragma unroll
  for (int j = 0; j < W; ++j) {
    const qm::FastCode code = qm::fast_code(__fmul_rn(acc[j], k));
    q[j] = static_cast<int8_t>(code.bits);
    certain &= code.dist < 0.5f - 0x1p-13f;  // dist is exact (Sterbenz), so is the constant
  }
  if (!certain) {
#pragma unroll
    for (int j = 0; j < W; ++j) q[j] = qm::quantize(__fmul_rn(acc[j], c), scale);
  }
}

// Outputs 4 G .. 4 G + 3 of column i of the [M, 256] view (t: the column's M values), left to right as the spec sums.
template <int M, int G>
__device__ __forceinline__ void wide_mix_group(const float (&t)[M], int8_t* codes, int i, float c, float k,
                                               float scale, bool fast) {
  float acc[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const unsigned signs = hadamard_row_signs(M, 4 * G + j);
    float a = signs & 1u ? -t[0] : t[0];
#pragma unroll
    for (int b = 1; b < M; ++b) a = signs >> b & 1u ? __fsub_rn(a, t[b]) : __fadd_rn(a, t[b]);
    acc[j] = a;
  }
  int8_t q[4];
  wide_codes<4>(acc, c, k, scale, fast, q);
#pragma unroll
  for (int j = 0; j < 4; ++j) codes[(4 * G + j) * kWideColumns + i] = q[j];
}

template <int M, int G = 0>
__device__ __forceinline__ void wide_mix(const float (&t)[M], int8_t* codes, int i, float c, float k, float scale,
                                         bool fast) {
  if constexpr (G < M / 4) {
    wide_mix_group<M, G>(t, codes, i, c, k, scale, fast);
    wide_mix<M, G + 1>(t, codes, i, c, k, scale, fast);
  }
}

template <typename T>
__device__ __forceinline__ void load32(const T* p, float (&v)[32]);
template <>
__device__ __forceinline__ void load32<float>(const float* p, float (&v)[32]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float4 a = reinterpret_cast<const float4*>(p)[j];
    v[4 * j] = a.x, v[4 * j + 1] = a.y, v[4 * j + 2] = a.z, v[4 * j + 3] = a.w;
  }
}
template <>
__device__ __forceinline__ void load32<__half>(const __half* p, float (&v)[32]) {
  uint4 r[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) r[j] = reinterpret_cast<const uint4*>(p)[j];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const __half2* h = reinterpret_cast<const __half2*>(&r[j]);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      v[8 * j + 2 * i] = f.x, v[8 * j + 2 * i + 1] = f.y;
    }
  }
}

// HadamardQuant of one row of d = M * E * 256 (wide_applies; E = 1 for M > 1, M = 1 for E > 1) at x into y (16-byte
// aligned), by a block of kWideThreads threads, the first d / 32 (whole warps) holding 32 elements each; smem: d
// floats, then d bytes.
template <typename T, int M, int E>
__device__ __forceinline__ void hadamard_wide_row(const T* __restrict__ x, int8_t* __restrict__ y, float4* smem,
                                                  float c, float k, float scale, bool fast) {
  static_assert((M == 1) != (E == 1), "m = 1 with p = 256 E, or m > 1 with p = 256");
  constexpr int d = M * E * kWideColumns;
  float* row = reinterpret_cast<float*>(smem);
  int8_t* codes = reinterpret_cast<int8_t*>(row + d);
  const int tid = threadIdx.x;
  const bool live = tid < d / kWideValues;
  if (live) {
    float v[kWideValues];
    load32<T>(x + tid * kWideValues, v);
#pragma unroll
    for (int h = 1; h < kWideValues; h <<= 1)
#pragma unroll
      for (int j = 0; j < kWideValues; ++j)
        if ((j & h) == 0) {
          const float lo = v[j], hi = v[j + h];
          v[j] = __fadd_rn(lo, hi);
          v[j + h] = __fsub_rn(lo, hi);
        }
#pragma unroll 1  // unrolled, the three stages' shuffles are hoisted together and spill at 64 registers
    for (int lanes = 1; lanes < kWideColumns / kWideValues; lanes <<= 1) {  // h = 32 lanes
      // lower lane: lo + hi = fl(1 * v + other); upper lane: lo - hi = fl(-1 * v + other) (the products are exact)
      const float sign = tid & lanes ? -1.f : 1.f;
#pragma unroll
      for (int j = 0; j < kWideValues; ++j) v[j] = __fmaf_rn(sign, v[j], __shfl_xor_sync(0xffffffffu, v[j], lanes));
    }
#pragma unroll
    for (int j = 0; j < kWideValues / 4; ++j)
      smem[tid * 8 + (j ^ (tid & 7))] = make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
  }
  __syncthreads();
  // column i < 256 of the [M * E, 256] view: element e = i + 256 s sits at wide_swizzle(i) + 256 s
  const int i = tid, base = wide_swizzle(i);
  static_assert(kWideThreads == kWideColumns, "one column per thread");
  if constexpr (M == 1) {
    // h = 256 .. p / 2 combine elements 256 * 2^s apart: the column's E values, in registers (stage order kept)
    float w[E];
#pragma unroll
    for (int j = 0; j < E; ++j) w[j] = row[base + j * kWideColumns];
#pragma unroll
    for (int h = 1; h < E; h <<= 1)
#pragma unroll
      for (int j = 0; j < E; ++j)
        if ((j & h) == 0) {
          const float lo = w[j], hi = w[j + h];
          w[j] = __fadd_rn(lo, hi);
          w[j + h] = __fsub_rn(lo, hi);
        }
    static_assert(E % 4 == 0, "codes in fours");
#pragma unroll
    for (int j = 0; j < E; j += 4) {
      const float acc[4] = {w[j], w[j + 1], w[j + 2], w[j + 3]};
      int8_t q[4];
      wide_codes<4>(acc, c, k, scale, fast, q);
#pragma unroll
      for (int u = 0; u < 4; ++u) codes[(j + u) * kWideColumns + i] = q[u];
    }
  } else {
    float t[M];  // mixing across m: the column's M values
#pragma unroll
    for (int b = 0; b < M; ++b) t[b] = row[base + b * kWideColumns];
    wide_mix<M>(t, codes, i, c, k, scale, fast);
  }
  __syncthreads();
  if (live) {
    const int4* src = reinterpret_cast<const int4*>(codes + tid * kWideValues);
    int4* dst = reinterpret_cast<int4*>(y + tid * kWideValues);
    dst[0] = src[0];
    dst[1] = src[1];
  }
}

// Whether the wide row applies (host): d = m * p in 3072 .. 8192 with p = 256 (m = 12, 20, 28) or m = 1, y 16-byte
// aligned (x: the caller's fast-path check). Not d = 2048: 2 of the block's 8 warps would load it, and the 8-element
// rows were faster there (B8 L2048: 0.057 against 0.063 ms, NOTES.md session 17).
inline bool wide_applies(int d, int m, int p, const void* y) {
  return d >= 3072 && d <= 8192 && (m == 1 || p == kWideColumns) && qm::aligned(y, 16);
}
}  // namespace
