// Decode of one sequence, small models (130m: d_inner 1536, d_model 768): the state update (spec 4.4 at L = 1, with
// the fused dt_proj / conv shift / x_proj epilogue of qm_scan_args), HadamardQuant (4.6) and out_proj (4.2, plus the
// residual) in one kernel of one 16-block thread-block cluster (sm_90+), instead of the update kernel and the out_proj
// GEMV (which computes the Hadamard itself) behind it.
// Why: a 130m decode step is a chain of small kernels whose boundaries cost more than their work. Here y reaches
// out_proj through distributed shared memory instead of a kernel boundary (every block of the next kernel waiting
// for every block of the update, then y again from L2). 130m B1 decode 0.297-0.310 -> 0.280-0.285 ms per step on an
// H100 (trt_plugins/bench/NOTES.md, session 15).
// Layout: block c runs the update of channels [c D / 16, (c + 1) D / 16) with the update kernel's own code
// (state_update_row: the same bits) and sends each y value to all 16 blocks' shared memory (st.async, counted on
// each block's mbarrier); every block then computes HadamardQuant of the whole row (hadamard8_row, as each out_proj
// GEMV block does) and out_proj's columns [c cols, (c + 1) cols) from its slab of the weights, which one bulk copy
// (TMA) brought into shared memory before the dependency wait (all slabs together: out_proj, 1.2 MB at 130m).
#include "common.cuh"
#include "hadamard_row.cuh"
#include "slab_gemv.cuh"
#include "state_update.cuh"

namespace {
constexpr int kCluster = 16;     // blocks (one per SM); non-portable on sm_90, queried before the launch
constexpr int kMaxThreads = 512;  // the update's 4 threads per channel: d_inner <= 2048
constexpr int kMaxCols = 128;     // out_proj columns per block: d_model <= 2048
constexpr int kN = 16;            // d_state

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// v into block `rank`'s copy of *local (shared memory), counted as 4 bytes on that block's copy of *bar
__device__ __forceinline__ void send_to(float* local, uint64_t* bar, int rank, float v) {
  unsigned raddr, rbar;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(raddr) : "r"(qm::smem_addr(local)), "r"(rank));
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(rbar) : "r"(qm::smem_addr(bar)), "r"(rank));
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];" ::"r"(raddr),
               "r"(__float_as_uint(v)), "r"(rbar) : "memory");
}

__device__ __forceinline__ int block_rank() {
  unsigned r;
  asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return static_cast<int>(r);
}
#endif

// Dynamic shared memory: out_proj's slab [cols, k] int8, y [k] float32, the codes [k] int8, the Hadamard's scratch
// (k floats then k bytes). k % 16 == 0 keeps every piece 16-byte aligned.
template <int HM, bool kXp>
__global__ void __launch_bounds__(kMaxThreads, 1)
    update_out_proj_kernel(qm_scan_args s, qm_linear_args o, HadamardConsts hq, int cols, bool vec, bool vec_dt) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900  // clusters, st.async, bulk copies; the host checks the device
  extern __shared__ int4 smem4[];
  __shared__ float m_s[kMaxCols], res_s[kMaxCols];
  __shared__ __align__(8) uint64_t y_bar;
  // Few values live across the update: what follows it is recomputed from the parameters.
  // out_proj's slab into shared memory by one bulk copy (the TMA engine: no registers, no load instructions),
  // before the dependency wait. 16-byte cp.async copies, one per thread and piece, measured slower: before the wait
  // their 74 KB per SM (130m) competed with the loads of the in_proj blocks on these 16 SMs, after it they took
  // 2 us of the critical path (NOTES.md, session 15).
  __shared__ __align__(8) uint64_t w_bar;
  const unsigned slab_bytes = static_cast<unsigned>(max(0, min(cols, o.n - block_rank() * cols))) * o.k;
  if (threadIdx.x == 0) {
    qm::mbar_init(&y_bar);  // its init is made visible to the other blocks by start_slab_copy's fence
    start_slab_copy(&w_bar, smem4, o.w + static_cast<int64_t>(block_rank() * cols) * o.k, slab_bytes);
  }
  {
    const int n0 = block_rank() * cols, ncols = max(0, min(cols, o.n - n0));
    stage_columns(o, n0, ncols, m_s, res_s);
  }
  // y arrives by asynchronous remote stores that count their bytes on each block's barrier (no cluster-wide
  // release, which would also wait for the update's state stores: +0.8 us per 130m layer, NOTES.md). Remote shared
  // memory may be written only once every block of the cluster runs and has initialised its barrier: arrive now,
  // wait before the first send.
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  int my_r = -1;
  float my_y = 0.f;
  state_update_row<kN, true, true, kXp>(s, vec, vec_dt, [&](int64_t r, float y) {
    static_cast<float*>(s.y)[r] = y;
    my_r = static_cast<int>(r);
    my_y = y;
  });
  if (threadIdx.x == 0) qm::mbar_expect(&y_bar, 4 * o.k);
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
  const int k = o.k, tid = static_cast<int>(threadIdx.x), nthreads = static_cast<int>(blockDim.x);
  const int rank = block_rank();
  int8_t* const w_s = reinterpret_cast<int8_t*>(smem4);
  float* const y_s = reinterpret_cast<float*>(w_s + static_cast<int64_t>(cols) * k);
  int8_t* const codes = reinterpret_cast<int8_t*>(y_s + k);
  float4* const scratch = reinterpret_cast<float4*>(codes + k);
  const int n0 = rank * cols, ncols = max(0, min(cols, o.n - n0));
  if (my_r >= 0)
    for (int q = 0; q < kCluster; ++q) send_to(y_s + my_r, &y_bar, q, my_y);
  qm::mbar_wait(&y_bar, 0);  // every block's y values are here, so every block has read x_proj's sums
  if (rank == 0 && o.clear)
    for (int i = tid; i < o.clear_n; i += nthreads) o.clear[i] = 0;
  hadamard8_row<float, HM, true, 32, true>(y_s, codes, scratch, k, hq.lp, hq.c, o.had_scale, hq.inv_scale, hq.fast);
  if (slab_bytes) qm::mbar_wait(&w_bar, 0);
  __syncthreads();
  slab_gemv_residual(codes, w_s, k, n0, ncols, m_s, o.early_residual ? res_s : nullptr, o.residual,
                     static_cast<float*>(o.seg_out[0]));
#endif
}

template <int HM, bool kXp>
int launch(const qm_scan_args* s, const qm_linear_args* o, const HadamardConsts& hq, cudaStream_t stream) {
  auto kernel = update_out_proj_kernel<HM, kXp>;
  const int cols = (o->n + kCluster - 1) / kCluster, threads = s->dim / kCluster * (kN / 4);
  const size_t smem = static_cast<size_t>(cols) * o->k + 10 * static_cast<size_t>(o->k);
  int smem_max = 0;
  const int rc = qm::sm90_smem_optin("qm_update_out_proj", &smem_max);
  if (rc != QM_OK) return rc;
  if (smem + 4096 > static_cast<size_t>(smem_max)) {  // 4 KB: the static arrays (2 KB) and the barriers, with room
    qm::set_error("qm_update_out_proj: out_proj's slab of %d columns x k=%d plus 10 k bytes (%zu) exceeds the "
                  "device's %d bytes of shared memory per block", cols, o->k, smem, smem_max);
    return QM_ERR_UNSUPPORTED;
  }
  QM_CHECK_LAUNCHED(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1),
                    "qm_update_out_proj: cudaFuncSetAttribute(non-portable cluster size)");
  QM_CHECK_LAUNCHED(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
                    "qm_update_out_proj: cudaFuncSetAttribute(shared memory)");
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  attr[1].id = cudaLaunchAttributeClusterDimension;
  attr[1].val.clusterDim.x = kCluster;
  attr[1].val.clusterDim.y = 1;
  attr[1].val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(kCluster);
  cfg.blockDim = dim3(static_cast<unsigned>(threads));
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 2;
  int clusters = 0;
  QM_CHECK_LAUNCHED(cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg),
                    "qm_update_out_proj: cudaOccupancyMaxActiveClusters");
  if (clusters < 1) {
    qm::set_error("qm_update_out_proj: this device cannot run a cluster of %d blocks of %d threads with %zu bytes of "
                  "shared memory each", kCluster, threads, smem);
    return QM_ERR_UNSUPPORTED;
  }
  const bool vec = qm::aligned(s->initial_state) && qm::aligned(s->final_state) && qm::aligned(s->A);
  const bool vec_dt = s->dt_rank % 16 == 0 && qm::aligned(s->dt_w) && qm::aligned(s->dt_lowrank);
  QM_CHECK_LAUNCHED(cudaLaunchKernelEx(&cfg, kernel, *s, *o, hq, cols, vec, vec_dt), "qm_update_out_proj launch");
  return QM_OK;
}
}  // namespace

extern "C" int qm_update_out_proj(const qm_scan_args* s, const qm_linear_args* o, cudaStream_t stream) {
  const int rc = qm::validate_scan_args(s, "qm_update_out_proj");
  if (rc != QM_OK) return rc;
  QM_CHECK_ARG(o, "qm_update_out_proj: out_proj's args must be non-null");
  QM_CHECK_ARG(s->batch == 1 && s->seqlen == 1 && s->input_dtype == QM_DTYPE_INT8 && s->dstate == kN && s->dt_w &&
                   s->y_dtype == QM_DTYPE_FLOAT32 && s->initial_state && s->final_state && qm::aligned(s->y),
               "qm_update_out_proj: the update must be one token of one sequence with int8 inputs, dstate %d, a fused "
               "dt_proj (dt_w), state in and out and a 16-byte aligned float32 y (got batch=%d seqlen=%d dstate=%d)",
               kN, s->batch, s->seqlen, s->dstate);
  QM_CHECK_ARG(s->dim % kCluster == 0 && (s->dim / kCluster) % 8 == 0 && s->dim / kCluster * (kN / 4) <= kMaxThreads,
               "qm_update_out_proj: d_inner=%d must be a multiple of %d up to %d", s->dim, 8 * kCluster,
               kMaxThreads / (kN / 4) * kCluster);
  QM_CHECK_ARG(o->had_x == s->y && o->k == s->dim && o->rows == 1,
               "qm_update_out_proj: out_proj's had_x must be the update's y, with k == d_inner (k=%d, d_inner=%d) and "
               "one row", o->k, s->dim);
  QM_CHECK_ARG(o->w && o->m_in && o->residual && o->n > 0 && o->n_seg == 1 && o->seg_scale[0] == 0.f &&
                   o->seg_end[0] == o->n && o->seg_out[0] && qm::aligned(o->w),
               "qm_update_out_proj: out_proj needs w (16-byte aligned), m_in, a residual and one float32 segment of "
               "all n columns");
  QM_CHECK_ARG(!o->x && !o->x_mask && !o->m_out && !o->acc_in && !o->acc_out && !o->norm_x && !o->conv_x &&
                   !o->xp_acc,
               "qm_update_out_proj: out_proj takes its input from the Hadamard only (x, x_mask, m_out, acc_in, "
               "acc_out, norm_x, conv_x and xp_acc must be NULL)");
  QM_CHECK_ARG((o->n + kCluster - 1) / kCluster <= kMaxCols, "qm_update_out_proj: n=%d must be at most %d", o->n,
               kMaxCols * kCluster);
  QM_CHECK_ARG(QM_VALID_SCALE(o->had_scale), "qm_update_out_proj: had_scale must be positive and finite");
  QM_CHECK_ARG(!o->clear || o->clear_n >= 0, "qm_update_out_proj: clear_n=%d must not be negative", o->clear_n);
  QM_CHECK_ARG(o->early_residual == 0 || o->early_residual == 1, "qm_update_out_proj: early_residual must be 0 or 1");
  int m = 0, p = 0;
  QM_CHECK_ARG(factor(o->k, &m, &p) && (m == 1 || m == 12) && p >= 8,
               "qm_update_out_proj: d_inner=%d must be m * 2^j with m 1 or 12 and 2^j >= 8", o->k);
  const HadamardConsts hq = hadamard_consts(o->k, p, o->had_scale);
  const bool xp = s->xp_acc != nullptr;
  if (m == 12) return xp ? launch<12, true>(s, o, hq, stream) : launch<12, false>(s, o, hq, stream);
  return xp ? launch<1, true>(s, o, hq, stream) : launch<1, false>(s, o, hq, stream);
}
