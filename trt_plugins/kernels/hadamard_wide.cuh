// HadamardQuant (spec 4.6) for many rows, 32 consecutive elements per thread: m > 1 with p = 128 or 256 (1536, 2560,
// 3584, 3072, 5120, 7168) or m = 1 with p = 4096 or 8192; one block of P = min(p, 256) threads per row. The
// 8-element rows of hadamard_row.cuh run all stages from h = 8 to 128 by shuffles, at a shuffle and a multiply-add per
// value and stage; here stages h = 1 .. 16 run in registers (one add per value and stage) and only h = 32 .. P / 2 by
// shuffles, which cuts the row's instructions where the kernel is issue-bound (NOTES.md, session 17). m = 1: the
// stages from h = 256 run by columns of shared memory (one load and one add per value and stage); m > 1: the mixing
// reads columns of shared memory, as in hadamard_row.cuh. The quotient by the scale is one multiply by k = fl(c / s)
// where the code is certain (the code by F2I.S8); else the spec's IEEE path decides from hy = fl(acc * c).
#pragma once
#include "common.cuh"
#include "hadamard_row.cuh"
#include "hadamard_tables.h"

namespace {
constexpr int kWideValues = 32;  // per thread

// The row's floats in shared memory, 32 per 128-byte line, 16-byte pieces swizzled by the line's index (piece j of
// line l at j ^ (l & 7)): a thread writing its 32 values (one line) and a warp reading 32 consecutive columns are both
// free of bank conflicts.
__device__ __forceinline__ int wide_swizzle(int e) { return e ^ (((e >> 5) & 7) << 2); }

// Element (row b, column i < P) of the [*, P] view, from base = wide_swizzle(i): with P = 256 the row adds a multiple
// of 8 lines, which the swizzle leaves alone; with P = 128 an odd row adds 4 lines, which flip piece bit 2.
template <int P>
__device__ __forceinline__ int wide_at(int base, int b) {
  static_assert(P == 128 || P == 256, "columns");
  return (P == 128 && (b & 1) ? base ^ 16 : base) + b * P;
}

// Q(hy, s) of 4 values: r = fl(acc * k) with k = fl(c / s) is within 2^-21.9 |r| of the spec's quotient
// fl(fl(acc * c) / s) (four roundings of at most 2^-24 each: k, r, and the spec's two), which is below 2^-14.9 where
// |r| < 128: a code is certain where r lies more than 2^-13 from a half-integer (one compare with a constant, no
// tolerance multiply; about 2.4e-4 of the codes are not). Beyond |r| = 129 a larger error cannot move the code:
// every rounding there saturates alike. The code is one F2I.S8 (round to nearest even, saturating: no clamp) and the
// distance one FRND and one subtraction: 5 instructions per code against 7 by the adder (clamp, +- 1.5 2^23), on
// the conversion pipe, which this issue-bound kernel leaves mostly idle (B8 L2048 D5120 -4%, NOTES.md session 18).
// Where any of the 4 is not certain (inf and NaN are not), all 4 take the IEEE division of hy = fl(acc * c). (One
// such branch per column instead of per 4 codes measured 5-40% slower: the compiler then interleaves fewer of the
// mixing's add chains, NOTES.md session 17.)
__device__ __forceinline__ void wide_codes(const float (&acc)[4], float c, float k, float scale, bool fast,
                                           int8_t (&q)[4]) {
  bool certain = fast;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float r = __fmul_rn(acc[j], k), rr = rintf(r);
    int code;
    asm("cvt.rni.s8.f32 %0, %1;" : "=r"(code) : "f"(r));
    q[j] = static_cast<int8_t>(code);
    certain &= fabsf(__fsub_rn(r, rr)) < 0.5f - 0x1p-13f;  // the difference is exact, so is the constant
  }
  if (!certain) {
#pragma unroll
    for (int j = 0; j < 4; ++j) q[j] = qm::quantize(__fmul_rn(acc[j], c), scale);
  }
}

// Outputs 4 G .. 4 G + 3 of column i of the [M, P] view (t: the column's M values), left to right as the spec sums.
template <int M, int P, int G = 0>
__device__ __forceinline__ void wide_mix(const float (&t)[M], int8_t* codes, int i, float c, float k, float scale,
                                         bool fast) {
  if constexpr (G < M / 4) {
    float acc[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[j] = mix_term<M>(t, 4 * G + j);
    int8_t q[4];
    wide_codes(acc, c, k, scale, fast, q);
#pragma unroll
    for (int j = 0; j < 4; ++j) codes[(4 * G + j) * P + i] = q[j];
    wide_mix<M, P, G + 1>(t, codes, i, c, k, scale, fast);
  }
}

// 32 consecutive elements as floats: four of hadamard_row.cuh's 8-element loads.
template <typename T>
__device__ __forceinline__ void load32(const T* p, float (&v)[32]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) load8<T>(p + 8 * j, v + 8 * j);
}

// HadamardQuant of one row of d = M * E * P (wide_block; E = p / 256 for M = 1, else 1) at x into y (16-byte
// aligned), by a block of P threads, the first d / 32 holding 32 elements each; smem: d floats, then d bytes.
template <typename T, int M, int E, int P>
__device__ __forceinline__ void hadamard_wide_row(const T* __restrict__ x, int8_t* __restrict__ y, float4* smem,
                                                  float c, float k, float scale, bool fast) {
  static_assert(M == 1 ? P == 256 && E >= 4 : E == 1, "m = 1 with p = 256 E, or m > 1 with p = P");
  constexpr int d = M * E * P, kLoaders = d / kWideValues;
  static_assert(kLoaders <= P, "the loading threads fit the block");
  float* row = reinterpret_cast<float*>(smem);
  int8_t* codes = reinterpret_cast<int8_t*>(row + d);
  const int tid = threadIdx.x;
  const bool live = tid < kLoaders;
  if (tid < (kLoaders + 31) / 32 * 32) {  // whole warps: lanes past the row (d = 1536, ...) only feed the shuffles
    float v[kWideValues];
    if (live) {
      load32<T>(x + tid * kWideValues, v);
    } else {
#pragma unroll
      for (int j = 0; j < kWideValues; ++j) v[j] = 0.f;
    }
    register_butterflies(v);  // h = 1 .. 16
#pragma unroll 1  // unrolled, the stages' shuffles are hoisted together and spill
    for (int lanes = 1; lanes < P / kWideValues; lanes <<= 1) {  // h = 32 lanes
      // lower lane: lo + hi = fl(1 * v + other); upper lane: lo - hi = fl(-1 * v + other) (the products are exact)
      const float sign = tid & lanes ? -1.f : 1.f;
#pragma unroll
      for (int j = 0; j < kWideValues; ++j) v[j] = __fmaf_rn(sign, v[j], __shfl_xor_sync(0xffffffffu, v[j], lanes));
    }
    if (live)
#pragma unroll
      for (int j = 0; j < kWideValues / 4; ++j)
        smem[tid * 8 + (j ^ (tid & 7))] = make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
  }
  __syncthreads();
  const int i = tid, base = wide_swizzle(i);  // one column per thread
  if constexpr (M == 1) {
    // h = 256 .. p / 2 combine elements 256 * 2^s apart: the column's E values, in registers (stage order kept)
    float w[E];
#pragma unroll
    for (int j = 0; j < E; ++j) w[j] = row[wide_at<P>(base, j)];
    register_butterflies(w);
#pragma unroll
    for (int j = 0; j < E; j += 4) {
      const float acc[4] = {w[j], w[j + 1], w[j + 2], w[j + 3]};
      int8_t q[4];
      wide_codes(acc, c, k, scale, fast, q);
#pragma unroll
      for (int u = 0; u < 4; ++u) codes[(j + u) * P + i] = q[u];
    }
  } else {
    float t[M];  // mixing across m: the column's M values
#pragma unroll
    for (int b = 0; b < M; ++b) t[b] = row[wide_at<P>(base, b)];
    wide_mix<M, P>(t, codes, i, c, k, scale, fast);
  }
  __syncthreads();
  if (live) {
    const int4* src = reinterpret_cast<const int4*>(codes + tid * kWideValues);
    int4* dst = reinterpret_cast<int4*>(y + tid * kWideValues);
    dst[0] = src[0];
    dst[1] = src[1];
  }
}

// Whether the wide row applies (host), and its block size P: d = m * p <= 8192 with m > 1 and p = 128 or 256, or
// m = 1 and p = 4096 or 8192; y 16-byte aligned (x: the caller's fast-path check). Not m = 1 below 4096: at 2048 two
// of the block's eight warps would load the row, and the 8-element rows were faster (B8 L2048: 0.057 against 0.063
// ms, NOTES.md session 17).
inline int wide_block(int d, int m, int p, const void* y) {
  if (d > 8192 || !qm::aligned(y, 16)) return 0;
  if (m == 1) return p >= 4096 ? 256 : 0;
  return p == 128 || p == 256 ? p : 0;
}
}  // namespace
