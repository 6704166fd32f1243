// Logits through the tied int8 embedding (spec 4.7): out[r, v] = fl(fl(sum_k h[r, k] * E_q[v, k]) * s_E[v]).
// Weight-only int8: h stays float32 (it feeds no quantizer), the table is read once per group of <= 4 rows, which is
// what makes decode's logits cheap (a quarter of the float32 table's bytes). Summation order is free (tolerance).
#include "common.cuh"

namespace {
constexpr int kRows = 4;        // rows per launch; the host loops over groups of 4
constexpr int kWarps = 8;       // 256 threads
constexpr int kVocabPerWarp = 4;
constexpr int kMaxK = 4096;     // h rows staged in shared memory as float32: 4 x 4096 x 4 = 64 KiB
// Resident blocks per SM: the grid is capped and each warp walks groups of table rows (h is staged once per block).
// 4 measured best for one row on the H100 (2.8b B1: 78.7 us uncapped -> 47.1 us, 91% of the HBM floor).
#ifndef QM_LOGITS_BLOCKS_PER_SM
#define QM_LOGITS_BLOCKS_PER_SM 4
#endif

// Four int8 codes -> exact floats without the conversion pipe: bytes offset to unsigned (b + 128) are placed in the
// mantissa of 2^23, so the float is 2^23 + b + 128 exactly; subtracting 2^23 + 128 leaves b.
__device__ __forceinline__ void codes4(int w, float (&f)[4]) {
  const unsigned u = static_cast<unsigned>(w) ^ 0x80808080u;
  f[0] = __fsub_rn(__int_as_float(static_cast<int>(__byte_perm(u, 0x4b000000u, 0x7650))), 8388736.f);
  f[1] = __fsub_rn(__int_as_float(static_cast<int>(__byte_perm(u, 0x4b000000u, 0x7651))), 8388736.f);
  f[2] = __fsub_rn(__int_as_float(static_cast<int>(__byte_perm(u, 0x4b000000u, 0x7652))), 8388736.f);
  f[3] = __fsub_rn(__int_as_float(static_cast<int>(__byte_perm(u, 0x4b000000u, 0x7653))), 8388736.f);
}

// Launch bounds: one row keeps the grid's 4 blocks per SM resident (64 registers; 80 without the bound), four rows
// 2 per SM (128 registers).
template <int R>
__global__ void __launch_bounds__(kWarps * 32, R == 1 ? QM_LOGITS_BLOCKS_PER_SM : 2)
    tied_logits_kernel(const float* __restrict__ h, const int8_t* __restrict__ e_q, const float* __restrict__ e_scale,
                       float* __restrict__ out, int rows, int k, int n, const float* __restrict__ norm_w,
                       float norm_eps) {
  extern __shared__ float hs[];  // [R][k]
  __shared__ double red[R][kWarps];  // the final norm's warp sums, per row
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int chunks = k / 16, groups = (n + kVocabPerWarp - 1) / kVocabPerWarp;
  const int total_warps = static_cast<int>(gridDim.x) * kWarps;
  int g = static_cast<int>(blockIdx.x) * kWarps + warp;  // this warp's first group of kVocabPerWarp table rows
  auto load = [&](int grp, int j, int4 (&wv)[kVocabPerWarp]) {
#pragma unroll
    for (int dv = 0; dv < kVocabPerWarp; ++dv) {
      const int v = grp * kVocabPerWarp + dv;
      wv[dv] = v < n && j < chunks ? reinterpret_cast<const int4*>(e_q + static_cast<int64_t>(v) * k)[j]
                                   : make_int4(0, 0, 0, 0);
    }
  };
  int4 first[kVocabPerWarp];
  load(g, lane, first);  // the table is constant: load before waiting for h
  // so are the row scales (each group loads its own with its first pieces, not after its sums: that round trip
  // stood between a warp's groups) and the final norm's weights (lines into L1: no registers held)
  auto load_scales = [&](int grp, float (&es)[kVocabPerWarp]) {
#pragma unroll
    for (int dv = 0; dv < kVocabPerWarp; ++dv) {
      const int v = grp * kVocabPerWarp + dv;
      es[dv] = v < n ? e_scale[v] : 0.f;
    }
  };
  float es_first[kVocabPerWarp];
  load_scales(g, es_first);
  if (norm_w)
    for (int i = static_cast<int>(threadIdx.x) * 32; i < k; i += kWarps * 32 * 32)
      asm volatile("prefetch.global.L1 [%0];" ::"l"(norm_w + i));
  qm::wait_for_inputs();
  qm::allow_dependents();
  for (int i = threadIdx.x; i < R * k; i += kWarps * 32) {
    const int r = i / k;
    hs[i] = r < rows ? h[static_cast<int64_t>(r) * k + (i - r * k)] : 0.f;
  }
  __syncthreads();
  if (norm_w) {  // the final RMSNorm, every block for itself (a row is a few KB; it replaces a dozen small kernels)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const double acc = qm::warp_sumsq(hs + r * k, k, kWarps * 32);
      if (lane == 0) red[r][warp] = acc;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < R; ++r) {
      double sum = 0.0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += red[r][w];
      const float rr = qm::rms_reciprocal(sum, k, norm_eps);
      for (int i = threadIdx.x; i < k; i += kWarps * 32)
        hs[r * k + i] = __fmul_rn(__fmul_rn(hs[r * k + i], rr), norm_w[i]);
    }
    __syncthreads();
  }
  for (bool head = true; g < groups; g += total_warps, head = false) {  // warp-uniform
    float es[kVocabPerWarp];
    if (head) {
#pragma unroll
      for (int dv = 0; dv < kVocabPerWarp; ++dv) es[dv] = es_first[dv];
    } else {
      load_scales(g, es);
    }
    float acc[kVocabPerWarp][R];
#pragma unroll
    for (int dv = 0; dv < kVocabPerWarp; ++dv)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[dv][r] = 0.f;
    for (int j = lane; j < chunks; j += 32) {
      int4 wv[kVocabPerWarp];
      if (head && j == lane) {
#pragma unroll
        for (int dv = 0; dv < kVocabPerWarp; ++dv) wv[dv] = first[dv];
      } else {
        load(g, j, wv);
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float c[kVocabPerWarp][4];
#pragma unroll
        for (int dv = 0; dv < kVocabPerWarp; ++dv) {
          const int ww[4] = {wv[dv].x, wv[dv].y, wv[dv].z, wv[dv].w};
          codes4(ww[q], c[dv]);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {  // one shared-memory read of h serves kVocabPerWarp table rows
          const float4 x = reinterpret_cast<const float4*>(hs + r * k)[j * 4 + q];
#pragma unroll
          for (int dv = 0; dv < kVocabPerWarp; ++dv) {
            acc[dv][r] = __fmaf_rn(x.x, c[dv][0], acc[dv][r]);
            acc[dv][r] = __fmaf_rn(x.y, c[dv][1], acc[dv][r]);
            acc[dv][r] = __fmaf_rn(x.z, c[dv][2], acc[dv][r]);
            acc[dv][r] = __fmaf_rn(x.w, c[dv][3], acc[dv][r]);
          }
        }
      }
    }
#pragma unroll
    for (int dv = 0; dv < kVocabPerWarp; ++dv) {
#pragma unroll
      for (int r = 0; r < R; ++r)
        for (int off = 16; off > 0; off >>= 1)
          acc[dv][r] = __fadd_rn(acc[dv][r], __shfl_xor_sync(0xffffffffu, acc[dv][r], off));
      const int v = g * kVocabPerWarp + dv;
      if (v < n && lane < R && lane < rows) {
        float a = acc[dv][0];
#pragma unroll
        for (int r = 1; r < R; ++r)
          if (lane == r) a = acc[dv][r];
        out[static_cast<int64_t>(lane) * n + v] = __fmul_rn(a, es[dv]);
      }
    }
  }
}

__global__ void embedding_kernel(const int64_t* __restrict__ ids, const int8_t* __restrict__ e_q,
                                 const float* __restrict__ e_scale, float* __restrict__ out, int k, int64_t n) {
  qm::allow_dependents();  // launched without PDL: everything before has finished; the next kernel may start early
  const int r = static_cast<int>(blockIdx.x);
  const int64_t id = ids[r];
  const bool ok = id >= 0 && id < n;
  const float s = ok ? e_scale[id] : 0.f;
  const float nan = __int_as_float(0x7fc00000);
  for (int i = threadIdx.x; i < k; i += blockDim.x)
    out[static_cast<int64_t>(r) * k + i] = ok ? __fmul_rn(static_cast<float>(e_q[id * k + i]), s) : nan;
}
}  // namespace

extern "C" int qm_embedding_lookup(const int64_t* ids, const int8_t* e_q, const float* e_scale, float* out, int rows,
                                   int k, int64_t n, cudaStream_t stream) {
  QM_CHECK_ARG(ids && e_q && e_scale && out, "qm_embedding_lookup: ids, e_q, e_scale and out must be non-null");
  QM_CHECK_ARG(rows > 0 && k > 0 && n > 0, "qm_embedding_lookup: rows=%d k=%d n=%lld must be positive", rows, k,
               static_cast<long long>(n));
  embedding_kernel<<<rows, 256, 0, stream>>>(ids, e_q, e_scale, out, k, n);  // no PDL: see the header
  QM_CHECK_LAUNCH("qm_embedding_lookup launch");
  return QM_OK;
}

extern "C" int qm_tied_logits(const float* h, const int8_t* e_q, const float* e_scale, float* out, int rows, int k,
                              int n, const float* norm_w, float norm_eps, cudaStream_t stream) {
  QM_CHECK_ARG(h && e_q && e_scale && out, "qm_tied_logits: h, e_q, e_scale and out must be non-null");
  QM_CHECK_ARG(rows > 0 && k > 0 && n > 0, "qm_tied_logits: rows=%d k=%d n=%d must be positive", rows, k, n);
  QM_CHECK_ARG(k % 16 == 0 && k <= kMaxK && reinterpret_cast<uintptr_t>(e_q) % 16 == 0,
               "qm_tied_logits: needs k %% 16 == 0, k <= %d and a 16-byte aligned table (k=%d)", kMaxK, k);
  QM_CHECK_ARG(!norm_w || (isfinite(norm_eps) && norm_eps > 0.f), "qm_tied_logits: norm_eps must be positive and "
               "finite with norm_w");

  const int64_t needed = (n + kWarps * kVocabPerWarp - 1) / (kWarps * kVocabPerWarp);
  const int64_t cap = int64_t{QM_LOGITS_BLOCKS_PER_SM} * qm::sm_count();
  const unsigned blocks = static_cast<unsigned>(needed < cap ? needed : cap);
  for (int r0 = 0; r0 < rows; r0 += kRows) {
    const int rr = rows - r0 < kRows ? rows - r0 : kRows;
    const float* hr = h + static_cast<int64_t>(r0) * k;
    float* outr = out + static_cast<int64_t>(r0) * n;
    if (rr == 1) {
      const size_t smem = static_cast<size_t>(k) * sizeof(float);
      QM_CHECK_LAUNCHED(qm::launch(tied_logits_kernel<1>, dim3(blocks), dim3(kWarps * 32), smem, stream, hr, e_q,
                                   e_scale, outr, rr, k, n, norm_w, norm_eps),
                        "qm_tied_logits launch");
    } else {
      const size_t smem = static_cast<size_t>(kRows) * k * sizeof(float);
      if (smem > 48 * 1024) {
        QM_CHECK_LAUNCHED(cudaFuncSetAttribute(tied_logits_kernel<kRows>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem)),
                          "qm_tied_logits shared-memory opt-in");
      }
      QM_CHECK_LAUNCHED(qm::launch(tied_logits_kernel<kRows>, dim3(blocks), dim3(kWarps * 32), smem, stream, hr,
                                   e_q, e_scale, outr, rr, k, n, norm_w, norm_eps),
                        "qm_tied_logits launch");
    }
  }
  return QM_OK;
}
