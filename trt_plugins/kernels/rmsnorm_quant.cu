// RMSNormQuant (spec 4.1): one block per token; float64 sum of float32 squares; correctly rounded sqrt.
#include "common.cuh"

namespace {
constexpr int kThreads = 256;

__global__ void rmsnorm_quant_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                     int8_t* __restrict__ y, int d, float eps, float scale) {
  qm::wait_for_inputs();
  qm::allow_dependents();
  const float* row = x + static_cast<int64_t>(blockIdx.x) * d;
  double acc = 0.0;
  for (int i = threadIdx.x; i < d; i += kThreads) {
    float v = row[i];
    acc += static_cast<double>(__fmul_rn(v, v));
  }
  __shared__ double part[kThreads];
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
    __syncthreads();
  }
  __shared__ float rr;
  if (threadIdx.x == 0) rr = qm::rms_reciprocal(part[0], d, eps);
  __syncthreads();
  int8_t* out = y + static_cast<int64_t>(blockIdx.x) * d;
  for (int i = threadIdx.x; i < d; i += kThreads) out[i] = qm::rms_code(row[i], rr, w[i], scale);
}
}  // namespace

extern "C" int qm_rmsnorm_quant(const float* x, const float* weight, int8_t* y, int64_t tokens, int d_model,
                                float eps, float scale, cudaStream_t stream) {
  QM_CHECK_ARG(x && weight && y, "qm_rmsnorm_quant: x, weight and y must be non-null");
  QM_CHECK_ARG(tokens >= 0 && tokens <= 0x7fffffff, "qm_rmsnorm_quant: tokens=%lld out of range", (long long)tokens);
  QM_CHECK_ARG(d_model > 0, "qm_rmsnorm_quant: d_model=%d must be positive", d_model);
  QM_CHECK_ARG(isfinite(eps) && eps > 0.f, "qm_rmsnorm_quant: eps must be positive and finite");
  QM_CHECK_ARG(QM_VALID_SCALE(scale), "qm_rmsnorm_quant: scale must be positive and finite");
  if (tokens == 0) return QM_OK;
  QM_CHECK_LAUNCHED(qm::launch(rmsnorm_quant_kernel, dim3(static_cast<unsigned>(tokens)), dim3(kThreads), 0, stream,
                               x, weight, y, d_model, eps, scale),
                    "qm_rmsnorm_quant launch");
  return QM_OK;
}
