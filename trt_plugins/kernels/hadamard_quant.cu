// HadamardQuant (spec 4.6): one block per row; the row in shared memory; FWHT stages over p in the spec
// order, then left-to-right mixing across m with H_m from the generated table, then * c and quantize.
#include "common.cuh"
#include "hadamard_tables.h"

namespace {
constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float load(const T* p, int64_t i);
template <>
__device__ __forceinline__ float load<float>(const float* p, int64_t i) { return p[i]; }
template <>
__device__ __forceinline__ float load<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }

// p and every stage width h are powers of two: indices by shifts and masks (runtime integer division costs
// ~20 instructions each, and the butterfly stages needed four per pair).
template <typename T>
__global__ void hadamard_kernel(const T* __restrict__ x, int8_t* __restrict__ y, int d, int m, int lp, float c,
                                float scale) {
  extern __shared__ float buf[];  // 2 * d floats
  float* t = buf;
  float* o = buf + d;
  const int p = 1 << lp, half = p >> 1;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * d;
  for (int i = threadIdx.x; i < d; i += kThreads) t[i] = load<T>(x, base + i);
  __syncthreads();
  for (int lh = 0; (1 << lh) < p; ++lh) {
    const int h = 1 << lh;
    for (int k = threadIdx.x; k < d / 2; k += kThreads) {
      const int a = k >> (lp - 1);   // row of the [m, p] view
      const int r = k & (half - 1);  // pair index within the row
      const int i = a * p + ((r >> lh) << (lh + 1)) + (r & (h - 1));
      const float lo = t[i], hi = t[i + h];
      t[i] = __fadd_rn(lo, hi);
      t[i + h] = __fsub_rn(lo, hi);
    }
    __syncthreads();
  }
  const signed char* hm = m == 12 ? kHadamard12 : m == 20 ? kHadamard20 : kHadamard28;
  for (int idx = threadIdx.x; idx < d; idx += kThreads) {
    const int a = idx >> lp, i = idx & (p - 1);
    float acc;
    if (m == 1) {
      acc = t[i];
    } else {
      acc = __fmul_rn(static_cast<float>(hm[a * m]), t[i]);
      for (int b = 1; b < m; ++b) acc = __fadd_rn(acc, __fmul_rn(static_cast<float>(hm[a * m + b]), t[b * p + i]));
    }
    o[idx] = acc;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < d; idx += kThreads) y[base + idx] = qm::quantize(__fmul_rn(o[idx], c), scale);
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
  if (x_dtype == QM_DTYPE_FLOAT32)
    hadamard_kernel<float><<<(unsigned)rows, kThreads, smem, stream>>>(static_cast<const float*>(x), y, dim, m, lp, c,
                                                                     scale);
  else
    hadamard_kernel<__half><<<(unsigned)rows, kThreads, smem, stream>>>(static_cast<const __half*>(x), y, dim, m, lp,
                                                                      c, scale);
  QM_CHECK_LAUNCH("qm_hadamard_quant launch");
  return QM_OK;
}
