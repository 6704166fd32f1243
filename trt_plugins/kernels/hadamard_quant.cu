// HadamardQuant (spec 4.6): FWHT stages over p in the spec order, then left-to-right mixing across m with H_m from
// the generated table, then * c and quantize. Every butterfly of a stage is independent, so any assignment of pairs
// to threads gives the same bits as long as the stages run in order h = 1, 2, 4, ...
#include "common.cuh"
#include "hadamard_tables.h"

namespace {
constexpr int kThreads = 256;
#ifndef QM_HADAMARD20_MAXNREG
#define QM_HADAMARD20_MAXNREG 48
#endif

template <typename T>
__device__ __forceinline__ float load(const T* p, int64_t i);
template <>
__device__ __forceinline__ float load<float>(const float* p, int64_t i) { return p[i]; }
template <>
__device__ __forceinline__ float load<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }

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

template <typename T>
__global__ void hadamard_kernel(const T* __restrict__ x, int8_t* __restrict__ y, int d, int m, int lp, float c,
                                float scale) {
  extern __shared__ float buf[];  // 2 * d floats
  float* t = buf;
  float* o = buf + d;
  const int p = 1 << lp;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * d;
  for (int i = threadIdx.x; i < d; i += kThreads) t[i] = load<T>(x, base + i);
  __syncthreads();
  shared_butterflies(t, d, lp, 0);
  const float* hm = m == 12 ? kHadamard12 : m == 20 ? kHadamard20 : kHadamard28;
  for (int idx = threadIdx.x; idx < d; idx += kThreads) {
    const int a = idx >> lp, i = idx & (p - 1);
    float acc;
    if (m == 1) {
      acc = t[i];
    } else {
      acc = __fmul_rn(hm[a * m], t[i]);
      for (int b = 1; b < m; ++b) acc = __fadd_rn(acc, __fmul_rn(hm[a * m + b], t[b * p + i]));
    }
    o[idx] = acc;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < d; idx += kThreads) y[base + idx] = qm::quantize(__fmul_rn(o[idx], c), scale);
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

// The same for 4 values with one branch: where any code is not certain (rare), all 4 take the IEEE division.
__device__ __forceinline__ void quantize4_fast(const float (&hy)[4], float scale, float inv_scale, bool fast_quant,
                                               int8_t (&q)[4]) {
  bool certain = fast_quant;
#pragma unroll
  for (int j = 0; j < 4; ++j) certain &= fast_quant_code(hy[j], inv_scale, q[j]);
  if (!certain) {
#pragma unroll
    for (int j = 0; j < 4; ++j) q[j] = qm::quantize(hy[j], scale);
  }
}

// Mixing task (column i, outputs 4g .. 4g + 3) of the [M, p] view: t holds column i's M values; each output sums
// H_M[a, b] * t[b] left to right (the spec order). The signs of H_M are compile-time constants here
// (hadamard_row_signs), so each term is one add or subtract: H_M[a, b] * t[b] = +-t[b] exactly.
template <int M, int G>
__device__ __forceinline__ void mix_group(const float* t, int8_t* codes, int i, int p, float c, float scale,
                                          float inv_scale, bool fast_quant) {
  constexpr int kRow = 4 * G;
  float hy[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const unsigned signs = hadamard_row_signs(M, kRow + j);
    float acc = signs & 1u ? -t[0] : t[0];
#pragma unroll
    for (int b = 1; b < M; ++b) acc = signs >> b & 1u ? __fsub_rn(acc, t[b]) : __fadd_rn(acc, t[b]);
    hy[j] = __fmul_rn(acc, c);
  }
  int8_t q[4];
  quantize4_fast(hy, scale, inv_scale, fast_quant, q);
#pragma unroll
  for (int j = 0; j < 4; ++j) codes[(kRow + j) * p + i] = q[j];
}

// the group g (runtime, warp-uniform while p >= 32) as a compile-time constant
template <int M, int G = 0>
__device__ __forceinline__ void mix_dispatch(int g, const float* t, int8_t* codes, int i, int p, float c, float scale,
                                             float inv_scale, bool fast_quant) {
  if constexpr (G < M / 4) {
    if (g == G)
      mix_group<M, G>(t, codes, i, p, c, scale, inv_scale, fast_quant);
    else
      mix_dispatch<M, G + 1>(g, t, codes, i, p, c, scale, inv_scale, fast_quant);
  }
}

// m = 20 (d_inner 5120): 640 threads x 56 registers let one block per SM run (31% occupancy, 42% of the cycles
// stalled at block barriers, ncu 2026-11-25); a 48-register cap lets two blocks share each SM.
template <typename T, int M, bool kSplit>
__global__ void __maxnreg__(M == 20 ? QM_HADAMARD20_MAXNREG : 255)
    hadamard8_kernel(const T* __restrict__ x, int8_t* __restrict__ y, int d, int lp, float c, float scale,
                     float inv_scale, bool fast_quant) {
  // d floats (m > 1 or p > 256), then d int8 codes
  extern __shared__ float4 row4[];
  float* row = reinterpret_cast<float*>(row4);
  const int p = 1 << lp, tid = threadIdx.x, e0 = tid * 8;
  const bool live = e0 < d;  // the block is rounded up to whole warps; dead lanes only feed shuffles
  qm::wait_for_inputs();
  qm::allow_dependents();
  const int64_t base = static_cast<int64_t>(blockIdx.x) * d;
  float v[8];
  if (live) {
    load8<T>(x + base + e0, v);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = 0.f;
  }
#pragma unroll
  for (int h = 1; h < 8; h <<= 1) {
    if (h >= p) break;
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if ((j & h) == 0) {
        const float lo = v[j], hi = v[j + h];
        v[j] = __fadd_rn(lo, hi);
        v[j + h] = __fsub_rn(lo, hi);
      }
  }
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
        float w[32];
#pragma unroll
        for (int j = 0; j < 32; ++j) w[j] = j < E ? row[j * 256 + i] : 0.f;
#pragma unroll
        for (int h = 1; h < 32; h <<= 1) {
          if (h >= E) break;
#pragma unroll
          for (int j = 0; j < 32; ++j)
            if ((j & h) == 0 && j + h < 32) {
              const float lo = w[j], hi = w[j + h];
              w[j] = __fadd_rn(lo, hi);
              w[j + h] = __fsub_rn(lo, hi);
            }
        }
#pragma unroll
        for (int j = 0; j < 32; ++j)
          if (j < E) codes[j * 256 + i] = quantize_fast(__fmul_rn(w[j], c), scale, inv_scale, fast_quant);
      }
      __syncthreads();
      if (live) *reinterpret_cast<uint2*>(y + base + e0) = *reinterpret_cast<const uint2*>(codes + e0);
      return;
    }
    shared_butterflies(row, d, lp, 8);  // h = 256 ... p / 2 (none when p <= 256)
    if constexpr (M > 1) {
      // mixing, the codes through shared memory so that the global stores stay 8 bytes wide. kSplit (few rows,
      // latency-bound): p * M / 4 tasks (column i, a group of 4 of its M outputs), 2 per thread of the d / 8, so
      // every thread works. Else one column per thread (reads its M values once): with many rows the other
      // resident block fills the idle threads' issue slots, and the split's extra reads cost more (NOTES.md).
      static_assert(M % 4 == 0, "outputs come in groups of 4");
      int8_t* codes = reinterpret_cast<int8_t*>(row + d);
      if constexpr (kSplit) {
        for (int k = tid; k < p * (M / 4); k += blockDim.x) {
          const int i = k & (p - 1), g = k >> lp;
          float t[M];
#pragma unroll
          for (int b = 0; b < M; ++b) t[b] = row[b * p + i];
          mix_dispatch<M>(g, t, codes, i, p, c, scale, inv_scale, fast_quant);
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
      __syncthreads();
      if (live)
        *reinterpret_cast<uint2*>(y + base + e0) = *reinterpret_cast<const uint2*>(codes + e0);
      return;
    }
  }
  if (!live) return;
  int8_t out[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) out[j] = quantize_fast(__fmul_rn(v[j], c), scale, inv_scale, fast_quant);
  *reinterpret_cast<uint2*>(y + base + e0) = *reinterpret_cast<const uint2*>(out);
}

template <typename T, int M>
int launch_hadamard8_m(const T* x, int8_t* y, int64_t rows, int dim, int lp, float c, float scale, float inv,
                       bool fast_quant, cudaStream_t stream) {
  const int threads = ((dim / 8 + 31) / 32) * 32;
  const size_t smem = (M > 1 || dim > 256 ? sizeof(float) + 1 : 0) * static_cast<size_t>(dim);  // row, codes
  // fewer rows than SMs (decode): nothing else shares an SM with a row, so the mixing spreads over every thread
  auto kernel = M > 1 && rows < qm::sm_count() ? hadamard8_kernel<T, M, true> : hadamard8_kernel<T, M, false>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return qm::fail_cuda("qm_hadamard_quant: shared memory", e);
  }
  QM_CHECK_LAUNCHED(qm::launch(kernel, dim3(static_cast<unsigned>(rows)), dim3(threads), smem, stream, x, y, dim, lp, c,
                               scale, inv, fast_quant),
                    "qm_hadamard_quant launch");
  return QM_OK;
}

template <typename T>
int launch_hadamard8(const T* x, int8_t* y, int64_t rows, int dim, int m, int lp, float c, float scale, float inv,
                     bool fast_quant, cudaStream_t stream) {
  switch (m) {
    case 1: return launch_hadamard8_m<T, 1>(x, y, rows, dim, lp, c, scale, inv, fast_quant, stream);
    case 12: return launch_hadamard8_m<T, 12>(x, y, rows, dim, lp, c, scale, inv, fast_quant, stream);
    case 20: return launch_hadamard8_m<T, 20>(x, y, rows, dim, lp, c, scale, inv, fast_quant, stream);
    default: return launch_hadamard8_m<T, 28>(x, y, rows, dim, lp, c, scale, inv, fast_quant, stream);
  }
}

bool factor(int d, int* m, int* p) {
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

extern "C" int qm_hadamard_quant(const void* x, int x_dtype, int8_t* y, int64_t rows, int dim, float scale,
                                 cudaStream_t stream) {
  QM_CHECK_ARG(x && y, "qm_hadamard_quant: x and y must be non-null");
  QM_CHECK_ARG(x_dtype == QM_DTYPE_FLOAT32 || x_dtype == QM_DTYPE_FLOAT16, "qm_hadamard_quant: x_dtype=%d must be "
               "float32 or float16", x_dtype);
  QM_CHECK_ARG(rows >= 0 && rows <= 0x7fffffff, "qm_hadamard_quant: rows out of range");
  QM_CHECK_ARG(dim > 0, "qm_hadamard_quant: dim=%d must be positive", dim);
  QM_CHECK_ARG(QM_VALID_SCALE(scale), "qm_hadamard_quant: scale must be positive and finite");
  int m = 0, p = 0;
  if (!factor(dim, &m, &p)) {
    qm::set_error("qm_hadamard_quant: dim=%d is not m * 2^k with m in {1, 12, 20, 28}", dim);
    return QM_ERR_UNSUPPORTED;
  }
  size_t smem = 2 * sizeof(float) * static_cast<size_t>(dim);
  if (smem > 48 * 1024) {
    cudaError_t e = x_dtype == QM_DTYPE_FLOAT32
        ? cudaFuncSetAttribute(hadamard_kernel<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem)
        : cudaFuncSetAttribute(hadamard_kernel<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return qm::fail_cuda("qm_hadamard_quant: shared memory", e);
  }
  if (rows == 0) return QM_OK;
  float c = static_cast<float>(1.0 / sqrt(static_cast<double>(dim)));
  int lp = 0;
  while ((1 << lp) < p) ++lp;
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(y) % 8 == 0;
  if (p >= 8 && dim <= 8192 && aligned) {
    const bool fast_quant = qm::has_accurate_reciprocal(scale);
    const float inv = fast_quant ? static_cast<float>(1.0 / scale) : 0.f;
    int e = x_dtype == QM_DTYPE_FLOAT32 ? launch_hadamard8<float>(static_cast<const float*>(x), y, rows, dim, m, lp, c,
                                                                  scale, inv, fast_quant, stream)
                                        : launch_hadamard8<__half>(static_cast<const __half*>(x), y, rows, dim, m, lp,
                                                                   c, scale, inv, fast_quant, stream);
    if (e != QM_OK) return e;
  } else if (x_dtype == QM_DTYPE_FLOAT32) {
    hadamard_kernel<float><<<(unsigned)rows, kThreads, smem, stream>>>(static_cast<const float*>(x), y, dim, m, lp, c,
                                                                     scale);
  } else {
    hadamard_kernel<__half><<<(unsigned)rows, kThreads, smem, stream>>>(static_cast<const __half*>(x), y, dim, m, lp,
                                                                      c, scale);
  }
  QM_CHECK_LAUNCH("qm_hadamard_quant launch");
  return QM_OK;
}
