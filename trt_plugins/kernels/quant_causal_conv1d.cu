// QuantCausalConv1d (spec 4.3, 4.5): one thread per output element (b, t, d); int32 taps, float64 SiLU.
// The new conv state (last K-1 input tokens) is written by a second kernel after the first has read the
// old state, one thread per (b, d) in ascending order, so state_out may alias state_in.
#include "common.cuh"

namespace {
constexpr int kMaxK = 8;

__device__ __forceinline__ int8_t tap(const int8_t* x, const int8_t* state, int b, int t, int d, int L, int D,
                                      int km1) {
  // element t of concat(state, x) along time, t in [0, K-1+L)
  if (t < km1) return state ? state[(static_cast<int64_t>(b) * D + d) * km1 + t] : 0;
  return x[(static_cast<int64_t>(b) * L + (t - km1)) * D + d];
}

__global__ void conv_kernel(const int8_t* __restrict__ x, const int8_t* __restrict__ w, const float* __restrict__ ws,
                            const float* __restrict__ bias, const int8_t* state, int8_t* __restrict__ u,
                            uint8_t* __restrict__ mask, int B, int L, int D, int K, float in_scale, float out_scale,
                            float outlier_scale) {
  int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t total = static_cast<int64_t>(B) * L * D;
  if (idx >= total) return;
  int d = static_cast<int>(idx % D);
  int t = static_cast<int>((idx / D) % L);
  int b = static_cast<int>(idx / (static_cast<int64_t>(D) * L));
  int km1 = K - 1;
  int acc = 0;
  for (int k = 0; k < K; ++k) acc += static_cast<int>(tap(x, state, b, t + k, d, L, D, km1)) * w[d * K + k];
  float m = qm::scale_product(in_scale, ws[d]);
  float v = __fadd_rn(__fmul_rn(static_cast<float>(acc), m), bias[d]);
  float s = qm::silu_r(v);
  if (mask == nullptr) {
    u[idx] = qm::quantize(s, out_scale);
    return;
  }
  float q_in = rintf(__fdiv_rn(s, out_scale));
  bool outlier = q_in < -128.f || q_in > 127.f;
  float q = outlier ? rintf(__fdiv_rn(s, outlier_scale)) : q_in;
  u[idx] = static_cast<int8_t>(fminf(fmaxf(q, -128.f), 127.f));
  mask[idx] = outlier ? 1 : 0;
}

__global__ void state_kernel(const int8_t* __restrict__ x, const int8_t* state_in, int8_t* state_out, int B, int L,
                             int D, int K) {
  int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(B) * D) return;
  int d = static_cast<int>(idx % D);
  int b = static_cast<int>(idx / D);
  int km1 = K - 1;
  int8_t vals[kMaxK];
  for (int j = 0; j < km1; ++j) vals[j] = tap(x, state_in, b, L + j, d, L, D, km1);  // read all first
  for (int j = 0; j < km1; ++j) state_out[(static_cast<int64_t>(b) * D + d) * km1 + j] = vals[j];
}
}  // namespace

extern "C" int qm_quant_causal_conv1d(const int8_t* x, const int8_t* weight, const float* weight_scale,
                                      const float* bias, const int8_t* state_in, int8_t* u, uint8_t* mask,
                                      int8_t* state_out, int batch, int seqlen, int dim, int kernel_size,
                                      float in_scale, float out_scale, float outlier_scale, int dual_scale,
                                      cudaStream_t stream) {
  QM_CHECK_ARG(x && weight && weight_scale && bias && u, "qm_quant_causal_conv1d: x, weight, weight_scale, bias "
               "and u must be non-null");
  QM_CHECK_ARG(batch > 0 && seqlen > 0 && dim > 0, "qm_quant_causal_conv1d: batch=%d seqlen=%d dim=%d must be "
               "positive", batch, seqlen, dim);
  QM_CHECK_ARG(kernel_size >= 2 && kernel_size <= kMaxK, "qm_quant_causal_conv1d: kernel_size=%d not in 2..%d",
               kernel_size, kMaxK);
  QM_CHECK_ARG(dual_scale == 0 || dual_scale == 1, "qm_quant_causal_conv1d: dual_scale=%d must be 0 or 1",
               dual_scale);
  QM_CHECK_ARG((mask != nullptr) == (dual_scale == 1), "qm_quant_causal_conv1d: mask must be non-null exactly "
               "when dual_scale=1");
  QM_CHECK_ARG(QM_VALID_SCALE(in_scale) && QM_VALID_SCALE(out_scale), "qm_quant_causal_conv1d: in_scale and "
               "out_scale must be positive and finite");
  QM_CHECK_ARG(!dual_scale || QM_VALID_SCALE(outlier_scale), "qm_quant_causal_conv1d: outlier_scale must be "
               "positive and finite when dual_scale=1");
  int64_t total = static_cast<int64_t>(batch) * seqlen * dim;
  QM_CHECK_ARG(total < (1ll << 40), "qm_quant_causal_conv1d: tensor too large");
  const int threads = 256;
  conv_kernel<<<static_cast<unsigned>((total + threads - 1) / threads), threads, 0, stream>>>(
      x, weight, weight_scale, bias, state_in, u, mask, batch, seqlen, dim, kernel_size, in_scale, out_scale,
      outlier_scale);
  QM_CHECK_LAUNCH("qm_quant_causal_conv1d conv launch");
  if (state_out) {
    int64_t rows = static_cast<int64_t>(batch) * dim;
    state_kernel<<<static_cast<unsigned>((rows + threads - 1) / threads), threads, 0, stream>>>(
        x, state_in, state_out, batch, seqlen, dim, kernel_size);
    QM_CHECK_LAUNCH("qm_quant_causal_conv1d state launch");
  }
  return QM_OK;
}
