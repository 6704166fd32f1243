// qm_int8_linear with HadamardQuant in front, one row, k > 2048 (1.4b: 4096 = 2^12, 2.8b: 5120 = 20 x 2^8; sm_90+):
// out_proj of a decode step without a HadamardQuant kernel before it. Each block copies its slab of weight rows
// into shared memory by one bulk copy (TMA) before its dependency wait, so the weight stream runs while the state
// update before it computes, then computes HadamardQuant of the whole row itself (hadamard8_row with d / 8 threads,
// the code path of qm_hadamard_quant: the same bits) and its columns from shared memory. About one block per SM:
// every block repeats the row's transform, in parallel, instead of one block doing it in a kernel of its own whose
// boundary cost 2-3 us per 2.8b layer (trt_plugins/bench/NOTES.md, sessions 13-15).
#include <algorithm>

#include "hadamard_row.cuh"
#include "slab_gemv.cuh"

namespace {
constexpr int kSlabMaxThreads = 768;  // d / 8 threads for the row transform: k <= 6144
constexpr int kSlabMaxCols = 128;

// Dynamic shared memory: the slab [cols, k] int8, the codes [k], the transform's scratch (k floats then k bytes).
template <int HM>
__global__ void __launch_bounds__(kSlabMaxThreads, 1)
    hadamard_slab_kernel(qm_linear_args o, HadamardConsts hq, int cols) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900  // bulk copies; the host checks the device
  extern __shared__ int4 smem4[];
  __shared__ float m_s[kSlabMaxCols], res_s[kSlabMaxCols];
  __shared__ __align__(8) uint64_t w_bar;
  const int k = o.k, n0 = static_cast<int>(blockIdx.x) * cols, ncols = max(0, min(cols, o.n - n0));
  int8_t* const w_s = reinterpret_cast<int8_t*>(smem4);
  int8_t* const codes = w_s + static_cast<int64_t>(cols) * k;
  float4* const scratch = reinterpret_cast<float4*>(codes + k);
  // the whole slab before the wait: half of it after the wait measured slower (2.8b B1 1.866-1.878 against
  // 1.839-1.843 ms, NOTES.md session 15)
  const unsigned slab_bytes = static_cast<unsigned>(ncols) * k;
  if (threadIdx.x == 0) start_slab_copy(&w_bar, w_s, o.w + static_cast<int64_t>(n0) * k, slab_bytes);
  stage_columns(o, n0, ncols, m_s, res_s);
  qm::wait_for_inputs();
  qm::allow_dependents();
  if (o.clear)
    for (int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); i < o.clear_n;
         i += static_cast<int>(gridDim.x * blockDim.x))
      o.clear[i] = 0;
  hadamard8_row<float, HM, true, 32, true>(o.had_x, codes, scratch, k, hq.lp, hq.c, o.had_scale, hq.inv_scale, hq.fast);
  if (slab_bytes) qm::mbar_wait(&w_bar, 0);
  __syncthreads();
  slab_gemv_residual(codes, w_s, k, n0, ncols, m_s, o.early_residual ? res_s : nullptr, o.residual,
                     static_cast<float*>(o.seg_out[0]));
#endif
}
}  // namespace

int qm::launch_hadamard_slab(const qm_linear_args* a, int m, int p, cudaStream_t stream) {
  const int k = a->k;
  int smem_max = 0;
  const int rc = qm::sm90_smem_optin("qm_int8_linear (a fused Hadamard with k > 2048)", &smem_max);
  if (rc != QM_OK) return rc;
  // about one block per SM (each repeats the transform; more blocks would only repeat it more), as many columns
  // as its shared memory holds beside the codes and the scratch (6 k bytes) and the static arrays
  const int64_t room = (static_cast<int64_t>(smem_max) - 6 * static_cast<int64_t>(k) - 2048) / k;
  const int64_t per_sm = (a->n + qm::sm_count() - 1) / qm::sm_count();
  const int cols = static_cast<int>(std::min(std::min(per_sm, room), int64_t{kSlabMaxCols}));
  if (cols < 1) {
    qm::set_error("qm_int8_linear: a fused Hadamard with k=%d > 2048 needs shared memory for a weight row beside "
                  "6 k bytes (%d bytes per block)", k, smem_max);
    return QM_ERR_UNSUPPORTED;
  }
  const HadamardConsts hq = hadamard_consts(k, p, a->had_scale);
  auto kernel = m == 1 ? hadamard_slab_kernel<1> : m == 12 ? hadamard_slab_kernel<12>
              : m == 20 ? hadamard_slab_kernel<20> : hadamard_slab_kernel<28>;
  const size_t smem = static_cast<size_t>(cols) * k + 6 * static_cast<size_t>(k);
  QM_CHECK_LAUNCHED(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
                    "qm_int8_linear: cudaFuncSetAttribute(shared memory)");
  const int threads = std::max(256, (k / 8 + 31) / 32 * 32);
  QM_CHECK_LAUNCHED(qm::launch(kernel, dim3(static_cast<unsigned>((a->n + cols - 1) / cols)), dim3(threads), smem,
                               stream, *a, hq, cols),
                    "qm_int8_linear Hadamard slab launch");
  return QM_OK;
}
