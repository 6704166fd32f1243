// Pieces of the sm_90 one-row GEMVs whose weights wait in shared memory (qm_update_out_proj's cluster kernel and
// qm_int8_linear's Hadamard-in-front path above k = 2048): each block's slab of weight rows comes in by one bulk
// copy (TMA) with an mbarrier before the dependency wait, and the dot products read it from shared memory.
#pragma once
#include "common.cuh"
#include "mbarrier.cuh"

namespace qm {
// qm_int8_linear's fused Hadamard above k = 2048 (hadamard_slab.cu): a validated one-row GEMV with had_x, one float32
// segment and k = m * p; QM_ERR_UNSUPPORTED where the device or its shared memory does not take it.
int launch_hadamard_slab(const qm_linear_args* a, int m, int p, cudaStream_t stream);

// Host: *smem_max = the current device's shared memory per block with the opt-in, QM_OK on sm_90+ (bulk copies,
// clusters); QM_ERR_UNSUPPORTED with a message naming fn below it, QM_ERR_CUDA where a query fails.
inline int sm90_smem_optin(const char* fn, int* smem_max) {
  int dev = 0, major = 0;
  QM_CHECK_LAUNCHED(cudaGetDevice(&dev), "cudaGetDevice");
  QM_CHECK_LAUNCHED(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
  QM_CHECK_LAUNCHED(cudaDeviceGetAttribute(smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
                    "cudaDeviceGetAttribute");
  if (major < 9) {
    set_error("%s: needs sm_90+ (bulk copies, thread-block clusters), the device is sm_%d", fn, major * 10);
    return QM_ERR_UNSUPPORTED;
  }
  return QM_OK;
}
}  // namespace qm

namespace {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int kSlabCpw = 4;  // columns per warp at a time

// One thread: initialises *bar (the caller's other barriers may be initialised before, under the same fences) and
// starts the bulk copy of `bytes` (a multiple of 16, 16-byte aligned ends) from global src into shared dst, counted
// on *bar.
__device__ __forceinline__ void start_slab_copy(uint64_t* bar, void* dst, const void* src, unsigned bytes) {
  qm::mbar_init(bar);
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the initialised barrier, seen by the copy engine
  if (bytes) {
    qm::mbar_expect(bar, bytes);
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(qm::smem_addr(dst)), "l"(src), "r"(bytes), "r"(qm::smem_addr(bar)) : "memory");
  }
}

// Before the dependency wait: the block's columns' multipliers, and their residuals where the caller asserts that
// the kernel before does not write them (o.early_residual), into shared memory.
__device__ __forceinline__ void stage_columns(const qm_linear_args& o, int n0, int ncols, float* m_s, float* res_s) {
  for (int c = threadIdx.x; c < ncols; c += blockDim.x) {
    m_s[c] = o.m_in[n0 + c];
    if (o.early_residual) res_s[c] = __ldcg(o.residual + n0 + c);
  }
}

// The block's columns [n0, n0 + ncols) of out = residual + fl(fl(x . w_n) * m[n]) (qm_int8_linear's float segment
// with a residual), x = k int8 codes and w = the slab [ncols, k] in shared memory: kSlabCpw columns per warp at once
// (their loads in flight together), 16-byte pieces, dp4a (exact int32 in any order). m_s / res_s: the columns'
// multipliers and (early) residuals, staged in shared memory; res_s null: the residual from global memory.
__device__ __forceinline__ void slab_gemv_residual(const int8_t* codes, const int8_t* w_s, int k, int n0, int ncols,
                                                   const float* m_s, const float* res_s, const float* residual,
                                                   float* out) {
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32, chunks = k / 16;
  const int4* const x4 = reinterpret_cast<const int4*>(codes);
  const int4* const w4 = reinterpret_cast<const int4*>(w_s);
  for (int c0 = warp * kSlabCpw; c0 < ncols; c0 += static_cast<int>(blockDim.x) / 32 * kSlabCpw) {
    int acc[kSlabCpw] = {};
    for (int j = lane; j < chunks; j += 32) {
      const int4 xv = x4[j];
      int4 wv[kSlabCpw];
#pragma unroll
      for (int c = 0; c < kSlabCpw; ++c)
        wv[c] = c0 + c < ncols ? w4[static_cast<int64_t>(c0 + c) * chunks + j] : int4{};
#pragma unroll
      for (int c = 0; c < kSlabCpw; ++c) {
        acc[c] = __dp4a(xv.x, wv[c].x, acc[c]);
        acc[c] = __dp4a(xv.y, wv[c].y, acc[c]);
        acc[c] = __dp4a(xv.z, wv[c].z, acc[c]);
        acc[c] = __dp4a(xv.w, wv[c].w, acc[c]);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
#pragma unroll
      for (int c = 0; c < kSlabCpw; ++c) acc[c] += __shfl_xor_sync(0xffffffffu, acc[c], off);
    if (lane < kSlabCpw && c0 + lane < ncols) {
      int a = acc[0];
#pragma unroll
      for (int c = 1; c < kSlabCpw; ++c)
        if (lane == c) a = acc[c];
      const int c = c0 + lane, n = n0 + c;
      out[n] = __fadd_rn(res_s ? res_s[c] : residual[n], __fmul_rn(static_cast<float>(a), m_s[c]));
    }
  }
}
#endif
}  // namespace
