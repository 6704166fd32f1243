// HadamardQuant (spec 4.6): FWHT stages over p in the spec order, then left-to-right mixing across m with H_m from
// the generated table, then * c and quantize. Every butterfly of a stage is independent, so any assignment of pairs
// to threads gives the same bits as long as the stages run in order h = 1, 2, 4, ...
#include <algorithm>

#include "common.cuh"
#include "hadamard_row.cuh"
#include "hadamard_tables.h"
#include "hadamard_wide.cuh"

namespace {
constexpr int kThreads = 256;
#ifndef QM_HADAMARD_WIDE  // 0: measure the 8-element rows where the wide ones apply
#define QM_HADAMARD_WIDE 1
#endif
// resident 256-thread blocks per SM (or twice as many of 128) the wide kernel's registers are sized for: 5 (48
// registers) measured 4-7% faster than 4 (62) at D 3072 / 4096 / 5120, 6 (40, spilling) 5-15% slower (NOTES.md,
// session 17)
#ifndef QM_HADAMARD_WIDE_MIN_BLOCKS
#define QM_HADAMARD_WIDE_MIN_BLOCKS 5
#endif
#ifndef QM_HADAMARD20_MAXNREG
#define QM_HADAMARD20_MAXNREG 48
#endif

template <typename T>
__device__ __forceinline__ float load(const T* p, int64_t i);
template <>
__device__ __forceinline__ float load<float>(const float* p, int64_t i) { return p[i]; }
template <>
__device__ __forceinline__ float load<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }

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

// m = 20 (d_inner 5120): 640 threads x 56 registers let one block per SM run (31% occupancy, 42% of the cycles
// stalled at block barriers, ncu 2026-11-25); a 48-register cap lets two blocks share each SM.
// ahead > 0 (more rows than resident blocks): thread 0 first asks L2 for row blockIdx.x + ahead, the row of a block
// that runs QM_HADAMARD_L2_AHEAD waves of resident blocks later, so that HBM streams rows while the resident blocks
// run their transforms' shuffles and barriers with nothing else in flight (32-50% of the HBM floor at B8 L2048
// before, NOTES.md session 12). A hint: no registers held, no shared memory.
#ifndef QM_HADAMARD_L2_AHEAD  // waves of resident blocks ahead (0: no prefetch)
#define QM_HADAMARD_L2_AHEAD 1
#endif
// A row kernel's start: the PDL wait, and thread 0 asking L2 for the row `ahead` blocks on (see above).
template <typename T>
__device__ __forceinline__ void row_prologue(const T* x, int d, int64_t rows, int ahead) {
  qm::wait_for_inputs();
  qm::allow_dependents();
#if QM_HADAMARD_L2_AHEAD && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (threadIdx.x == 0 && ahead > 0 && blockIdx.x + ahead < rows)
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(x + (blockIdx.x + ahead) * static_cast<int64_t>(d)),
                 "r"(static_cast<unsigned>(d * sizeof(T))) : "memory");
#endif
}

// EM (M = 1): the most values per thread of the p > 256 stages (p / 256), so that p = 4096 holds 16, not 32.
template <typename T, int M, bool kSplit, int EM = 32>
__global__ void __maxnreg__(M == 20 ? QM_HADAMARD20_MAXNREG : 255)
    hadamard8_kernel(const T* __restrict__ x, int8_t* __restrict__ y, int d, int lp, float c, float scale,
                     float inv_scale, bool fast_quant, int64_t rows, int ahead) {
  extern __shared__ float4 row4[];  // d floats (m > 1 or p > 256), then d int8 codes
  row_prologue(x, d, rows, ahead);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * d;
  hadamard8_row<T, M, kSplit, EM>(x + base, y + base, row4, d, lp, c, scale, inv_scale, fast_quant);
}

// Many rows (hadamard_wide.cuh: d = M * E * P, 32 elements per thread, blocks of P threads); ahead as above.
template <typename T, int M, int E, int P>
__global__ void __launch_bounds__(P, QM_HADAMARD_WIDE_MIN_BLOCKS * 256 / P)
    hadamard_wide_kernel(const T* __restrict__ x, int8_t* __restrict__ y, float c, float k, float scale, bool fast,
                         int64_t rows, int ahead) {
  constexpr int d = M * E * P;
  extern __shared__ float4 row4[];  // d floats, then d int8 codes
  row_prologue(x, d, rows, ahead);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * d;
  hadamard_wide_row<T, M, E, P>(x + base, y + base, row4, c, k, scale, fast);
}

// A row kernel's launch setup: the opt-in above 48 KB of shared memory, and the L2 look-ahead in rows
// (QM_HADAMARD_L2_AHEAD waves of resident blocks, when there are more rows than one wave).
template <typename K>
int prepare_rows(K kernel, int threads, size_t smem, int64_t rows, int* ahead) {
  cudaError_t e = cudaSuccess;
  if (smem > 48 * 1024) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return qm::fail_cuda("qm_hadamard_quant: shared memory", e);
  }
  *ahead = 0;
  if (QM_HADAMARD_L2_AHEAD > 0 && rows > qm::sm_count()) {
    int per_sm = 0;
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
    if (e != cudaSuccess) return qm::fail_cuda("qm_hadamard_quant: occupancy", e);
    *ahead = QM_HADAMARD_L2_AHEAD * std::max(per_sm, 1) * qm::sm_count();
  }
  return QM_OK;
}

template <typename T, int M, int E, int P>
int launch_wide_m(const T* x, int8_t* y, int64_t rows, float c, float k, float scale, bool fast, cudaStream_t stream) {
  const size_t smem = (sizeof(float) + 1) * static_cast<size_t>(M * E * P);  // row, codes
  auto kernel = hadamard_wide_kernel<T, M, E, P>;
  int ahead = 0;
  const int rc = prepare_rows(kernel, P, smem, rows, &ahead);
  if (rc != QM_OK) return rc;
  QM_CHECK_LAUNCHED(qm::launch(kernel, dim3(static_cast<unsigned>(rows)), dim3(P), smem, stream, x, y, c, k,
                               scale, fast, rows, ahead),
                    "qm_hadamard_quant launch");
  return QM_OK;
}

template <typename T>
int launch_wide(const T* x, int8_t* y, int64_t rows, int dim, int m, int block, float c, float scale, bool fast,
                cudaStream_t stream) {
  // k = fl(c / s): one rounding of the exact quotient (hadamard_wide.cuh's bound counts it)
  const float k = fast ? static_cast<float>(static_cast<double>(c) / static_cast<double>(scale)) : 0.f;
  const bool p256 = block == 256;
  switch (m) {
    case 1:  // p = dim, 4096 or 8192: p / 256 values per column of the shared-memory stages
      return dim == 4096 ? launch_wide_m<T, 1, 16, 256>(x, y, rows, c, k, scale, fast, stream)
                         : launch_wide_m<T, 1, 32, 256>(x, y, rows, c, k, scale, fast, stream);
    case 12:
      return p256 ? launch_wide_m<T, 12, 1, 256>(x, y, rows, c, k, scale, fast, stream)
                  : launch_wide_m<T, 12, 1, 128>(x, y, rows, c, k, scale, fast, stream);
    case 20:
      return p256 ? launch_wide_m<T, 20, 1, 256>(x, y, rows, c, k, scale, fast, stream)
                  : launch_wide_m<T, 20, 1, 128>(x, y, rows, c, k, scale, fast, stream);
    default:
      return p256 ? launch_wide_m<T, 28, 1, 256>(x, y, rows, c, k, scale, fast, stream)
                  : launch_wide_m<T, 28, 1, 128>(x, y, rows, c, k, scale, fast, stream);
  }
}

template <typename T, int M, int EM = 32>
int launch_hadamard8_m(const T* x, int8_t* y, int64_t rows, int dim, int lp, float c, float scale, float inv,
                       bool fast_quant, cudaStream_t stream) {
  const int threads = ((dim / 8 + 31) / 32) * 32;
  const size_t smem = (M > 1 || dim > 256 ? sizeof(float) + 1 : 0) * static_cast<size_t>(dim);  // row, codes
  // fewer rows than SMs (decode): nothing else shares an SM with a row, so the mixing spreads over every thread
  auto kernel = M > 1 && rows < qm::sm_count() ? hadamard8_kernel<T, M, true, EM> : hadamard8_kernel<T, M, false, EM>;
  int ahead = 0;
  const int rc = prepare_rows(kernel, threads, smem, rows, &ahead);
  if (rc != QM_OK) return rc;
  QM_CHECK_LAUNCHED(qm::launch(kernel, dim3(static_cast<unsigned>(rows)), dim3(threads), smem, stream, x, y, dim, lp, c,
                               scale, inv, fast_quant, static_cast<int64_t>(rows), ahead),
                    "qm_hadamard_quant launch");
  return QM_OK;
}

template <typename T>
int launch_hadamard8(const T* x, int8_t* y, int64_t rows, int dim, int m, int lp, float c, float scale, float inv,
                     bool fast_quant, cudaStream_t stream) {
  switch (m) {
    case 1:  // p / 256 values per thread in the p > 256 stages
      switch (lp <= 9 ? 9 : lp) {
        case 9: return launch_hadamard8_m<T, 1, 2>(x, y, rows, dim, lp, c, scale, inv, fast_quant, stream);
        case 10: return launch_hadamard8_m<T, 1, 4>(x, y, rows, dim, lp, c, scale, inv, fast_quant, stream);
        case 11: return launch_hadamard8_m<T, 1, 8>(x, y, rows, dim, lp, c, scale, inv, fast_quant, stream);
        case 12: return launch_hadamard8_m<T, 1, 16>(x, y, rows, dim, lp, c, scale, inv, fast_quant, stream);
        default: return launch_hadamard8_m<T, 1, 32>(x, y, rows, dim, lp, c, scale, inv, fast_quant, stream);
      }
    case 12: return launch_hadamard8_m<T, 12>(x, y, rows, dim, lp, c, scale, inv, fast_quant, stream);
    case 20: return launch_hadamard8_m<T, 20>(x, y, rows, dim, lp, c, scale, inv, fast_quant, stream);
    default: return launch_hadamard8_m<T, 28>(x, y, rows, dim, lp, c, scale, inv, fast_quant, stream);
  }
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
    // the row kernel holds a row in shared memory: refuse, with the limit, a dim this GPU cannot hold
    int dev = 0, optin = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (e != cudaSuccess) return qm::fail_cuda("qm_hadamard_quant: device attributes", e);
    if (smem > static_cast<size_t>(optin)) {
      qm::set_error("qm_hadamard_quant: dim=%d needs %zu bytes of shared memory per block and this GPU allows %d: "
                    "dim <= %d here", dim, smem, optin, optin / static_cast<int>(2 * sizeof(float)));
      return QM_ERR_UNSUPPORTED;
    }
    e = x_dtype == QM_DTYPE_FLOAT32
        ? cudaFuncSetAttribute(hadamard_kernel<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem)
        : cudaFuncSetAttribute(hadamard_kernel<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return qm::fail_cuda("qm_hadamard_quant: shared memory", e);
  }
  if (rows == 0) return QM_OK;
  const HadamardConsts hc = hadamard_consts(dim, p, scale);
  const int lp = hc.lp;
  const float c = hc.c;
  const int wide = QM_HADAMARD_WIDE && rows >= qm::sm_count() && qm::aligned(x) ? wide_block(dim, m, p, y) : 0;
  if (wide)
    return x_dtype == QM_DTYPE_FLOAT32 ? launch_wide<float>(static_cast<const float*>(x), y, rows, dim, m, wide, c,
                                                            scale, hc.fast, stream)
                                       : launch_wide<__half>(static_cast<const __half*>(x), y, rows, dim, m, wide, c,
                                                             scale, hc.fast, stream);
  if (p >= 8 && dim <= 8192 && qm::aligned(x) && qm::aligned(y, 8)) {
    int e = x_dtype == QM_DTYPE_FLOAT32 ? launch_hadamard8<float>(static_cast<const float*>(x), y, rows, dim, m, lp, c,
                                                                  scale, hc.inv_scale, hc.fast, stream)
                                        : launch_hadamard8<__half>(static_cast<const __half*>(x), y, rows, dim, m, lp,
                                                                   c, scale, hc.inv_scale, hc.fast, stream);
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
