// Selective scan (spec 4.4, 4.5) and the decode state update.
// v3 (int8 inputs): 32-step chunks staged in shared memory, one thread per channel, fast float32 math.
// v2 (float inputs, N = 8/16/32, small B*D): N lanes per (b, d), y reduced by shuffles.
// v1 (N = 64): one thread per (b, d) with the N states in registers, spec-order float math.
// Both walk time sequentially; a chunked parallel scan is the next step: trt_plugins/bench/NOTES.md.
#include "common.cuh"

namespace {
constexpr int kMaxN = 64;

struct Deq {
  int kind;  // QM_DTYPE_INT8 or QM_DTYPE_FLOAT32
  const void* p;
  float s;
  __device__ __forceinline__ float operator()(int64_t i) const {
    return kind == QM_DTYPE_INT8 ? __fmul_rn(static_cast<float>(static_cast<const int8_t*>(p)[i]), s)
                                 : static_cast<const float*>(p)[i];
  }
};

template <int N>
__global__ void scan_kernel(qm_scan_args a) {
  int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(a.batch) * a.dim) return;
  const int D = a.dim, L = a.seqlen;
  int d = static_cast<int>(idx % D);
  int b = static_cast<int>(idx / D);
  Deq du{a.input_dtype, a.u, a.u_scale}, ddt{a.input_dtype, a.dt, a.dt_scale}, db{a.input_dtype, a.B, a.B_scale},
      dc{a.input_dtype, a.C, a.C_scale}, dz{a.input_dtype, a.z, a.z_scale};
  float h[N], A[N];
  const int64_t sbase = (static_cast<int64_t>(b) * D + d) * N;
  for (int n = 0; n < N; ++n) {
    h[n] = a.initial_state ? a.initial_state[sbase + n] : 0.f;
    A[n] = a.A[static_cast<int64_t>(d) * N + n];
  }
  const float dskip = a.Dskip ? a.Dskip[d] : 0.f;
  const float bias = a.dt_bias ? a.dt_bias[d] : 0.f;
  for (int t = 0; t < L; ++t) {
    const int64_t e = (static_cast<int64_t>(b) * L + t) * D + d;
    float u;
    if (a.input_dtype == QM_DTYPE_INT8 && a.dual_scale) {
      float s = a.u_mask[e] ? a.u_outlier_scale : a.u_scale;
      u = __fmul_rn(static_cast<float>(static_cast<const int8_t*>(a.u)[e]), s);
    } else {
      u = du(e);
    }
    float delta = qm::softplus_r(__fadd_rn(ddt(e), bias));
    float dlu = __fmul_rn(delta, u);
    const int64_t bn = (static_cast<int64_t>(b) * L + t) * N;
    double y = 0.0;
    for (int n = 0; n < N; ++n) {
      float da = expf(__fmul_rn(delta, A[n]));
      h[n] = __fadd_rn(__fmul_rn(da, h[n]), __fmul_rn(dlu, db(bn + n)));
      y += static_cast<double>(__fmul_rn(h[n], dc(bn + n)));
    }
    float yt = __fadd_rn(static_cast<float>(y), __fmul_rn(dskip, u));
    if (a.z) yt = __fmul_rn(yt, qm::silu_r(dz(e)));
    if (a.y_dtype == QM_DTYPE_FLOAT16)
      static_cast<__half*>(a.y)[e] = __float2half_rn(yt);
    else
      static_cast<float*>(a.y)[e] = yt;
  }
  if (a.final_state)
    for (int n = 0; n < N; ++n) a.final_state[sbase + n] = h[n];
}


// v2: one (b, d) per group of N lanes (N in {8, 16, 32}); lane n owns state n. Fast float32 math on this
// path: its y feeds no quantizer (spec "Exactness"), so y is compared with a tolerance.
template <int N>
__global__ void scan_lanes_kernel(qm_scan_args a) {
  constexpr float kLog2e = 1.4426950408889634f;
  const int lane = threadIdx.x % N;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / N;
  const bool active = row < static_cast<int64_t>(a.batch) * a.dim;
  const int D = a.dim, L = a.seqlen;
  const int d = active ? static_cast<int>(row % D) : 0;
  const int b = active ? static_cast<int>(row / D) : 0;
  Deq du{a.input_dtype, a.u, a.u_scale}, ddt{a.input_dtype, a.dt, a.dt_scale}, db{a.input_dtype, a.B, a.B_scale},
      dc{a.input_dtype, a.C, a.C_scale}, dz{a.input_dtype, a.z, a.z_scale};
  const int64_t sidx = (static_cast<int64_t>(b) * D + d) * N + lane;
  float h = (active && a.initial_state) ? a.initial_state[sidx] : 0.f;
  const float A2 = active ? a.A[static_cast<int64_t>(d) * N + lane] * kLog2e : 0.f;
  const float dskip = (active && a.Dskip) ? a.Dskip[d] : 0.f;
  const float bias = (active && a.dt_bias) ? a.dt_bias[d] : 0.f;
  for (int t = 0; t < L; ++t) {
    const int64_t e = (static_cast<int64_t>(b) * L + t) * D + d;
    const int64_t bn = (static_cast<int64_t>(b) * L + t) * N + lane;
    float u = 0.f, x = 0.f, bv = 0.f, cv = 0.f;
    if (active) {
      if (a.input_dtype == QM_DTYPE_INT8 && a.dual_scale) {
        float s = a.u_mask[e] ? a.u_outlier_scale : a.u_scale;
        u = static_cast<float>(static_cast<const int8_t*>(a.u)[e]) * s;
      } else {
        u = du(e);
      }
      x = ddt(e) + bias;
      bv = db(bn);
      cv = dc(bn);
    }
    float delta = x > 20.f ? x : log1pf(__expf(x));
    h = exp2f(delta * A2) * h + (delta * u) * bv;
    float y = h * cv;
#pragma unroll
    for (int off = N / 2; off > 0; off >>= 1) y += __shfl_xor_sync(0xffffffffu, y, off, N);
    if (active && lane == 0) {
      y += dskip * u;
      if (a.z) {
        float zv = dz(e);
        y *= zv / (1.f + __expf(-zv));
      }
      if (a.y_dtype == QM_DTYPE_FLOAT16)
        static_cast<__half*>(a.y)[e] = __float2half_rn(y);
      else
        static_cast<float*>(a.y)[e] = y;
    }
  }
  if (active && a.final_state) a.final_state[sidx] = h;
}


// v3 (int8 inputs): a block owns 128 consecutive channels of one batch row and walks time in chunks of
// kChunk steps staged in shared memory with coalesced loads; B and C are dequantized once per block.
constexpr int kChunk = 32;
constexpr int kTile = 128;

template <int N>
__global__ void __launch_bounds__(kTile) scan_chunk_kernel(qm_scan_args a) {
  constexpr float kLog2e = 1.4426950408889634f;
  __shared__ int8_t su[kChunk][kTile], sdt[kChunk][kTile], sz[kChunk][kTile];
  __shared__ uint8_t smask[kChunk][kTile];
  __shared__ float sB[kChunk][N], sC[kChunk][N];
  const int D = a.dim, L = a.seqlen, b = blockIdx.y;
  const int d0 = blockIdx.x * kTile, d = d0 + threadIdx.x;
  const bool active = d < D;
  const int8_t* U = static_cast<const int8_t*>(a.u);
  const int8_t* DT = static_cast<const int8_t*>(a.dt);
  const int8_t* Z = static_cast<const int8_t*>(a.z);
  const int8_t* Bq = static_cast<const int8_t*>(a.B);
  const int8_t* Cq = static_cast<const int8_t*>(a.C);
  float h[N], A2[N];
  const int64_t sbase = (static_cast<int64_t>(b) * D + (active ? d : 0)) * N;
#pragma unroll
  for (int n = 0; n < N; ++n) {
    h[n] = (active && a.initial_state) ? a.initial_state[sbase + n] : 0.f;
    A2[n] = active ? a.A[static_cast<int64_t>(d) * N + n] * kLog2e : 0.f;
  }
  const float dskip = (active && a.Dskip) ? a.Dskip[d] : 0.f;
  const float bias = (active && a.dt_bias) ? a.dt_bias[d] : 0.f;
  for (int t0 = 0; t0 < L; t0 += kChunk) {
    const int nt = min(kChunk, L - t0);
    for (int i = threadIdx.x; i < nt * kTile; i += kTile) {
      const int tt = i / kTile, dd = i % kTile;
      if (d0 + dd < D) {
        const int64_t e = (static_cast<int64_t>(b) * L + t0 + tt) * D + d0 + dd;
        su[tt][dd] = U[e];
        sdt[tt][dd] = DT[e];
        if (Z) sz[tt][dd] = Z[e];
        if (a.dual_scale) smask[tt][dd] = a.u_mask[e];
      }
    }
    for (int i = threadIdx.x; i < nt * N; i += kTile) {
      const int tt = i / N, n = i % N;
      const int64_t e = (static_cast<int64_t>(b) * L + t0 + tt) * N + n;
      sB[tt][n] = static_cast<float>(Bq[e]) * a.B_scale;
      sC[tt][n] = static_cast<float>(Cq[e]) * a.C_scale;
    }
    __syncthreads();
    if (active) {
      for (int tt = 0; tt < nt; ++tt) {
        const float su_s = (a.dual_scale && smask[tt][threadIdx.x]) ? a.u_outlier_scale : a.u_scale;
        const float u = static_cast<float>(su[tt][threadIdx.x]) * su_s;
        const float x = static_cast<float>(sdt[tt][threadIdx.x]) * a.dt_scale + bias;
        const float delta = x > 20.f ? x : log1pf(__expf(x));
        const float dlu = delta * u;
        float y = 0.f;
#pragma unroll
        for (int n = 0; n < N; ++n) {
          h[n] = exp2f(delta * A2[n]) * h[n] + dlu * sB[tt][n];
          y += h[n] * sC[tt][n];
        }
        y += dskip * u;
        if (Z) {
          const float zv = static_cast<float>(sz[tt][threadIdx.x]) * a.z_scale;
          y *= zv / (1.f + __expf(-zv));
        }
        const int64_t e = (static_cast<int64_t>(b) * L + t0 + tt) * D + d;
        if (a.y_dtype == QM_DTYPE_FLOAT16)
          static_cast<__half*>(a.y)[e] = __float2half_rn(y);
        else
          static_cast<float*>(a.y)[e] = y;
      }
    }
    __syncthreads();
  }
  if (active && a.final_state)
#pragma unroll
    for (int n = 0; n < N; ++n) a.final_state[sbase + n] = h[n];
}

int validate(const qm_scan_args* a, const char* fn) {
  QM_CHECK_ARG(a, "%s: args must be non-null", fn);
  QM_CHECK_ARG(a->u && a->dt && a->B && a->C && a->A && a->y, "%s: u, dt, B, C, A and y must be non-null", fn);
  QM_CHECK_ARG(a->batch > 0 && a->seqlen > 0 && a->dim > 0, "%s: batch=%d seqlen=%d dim=%d must be positive", fn,
               a->batch, a->seqlen, a->dim);
  QM_CHECK_ARG(a->dstate == 16 || a->dstate == 8 || a->dstate == 32 || a->dstate == 64,
               "%s: dstate=%d must be 8, 16, 32 or 64", fn, a->dstate);
  QM_CHECK_ARG(a->input_dtype == QM_DTYPE_INT8 || a->input_dtype == QM_DTYPE_FLOAT32,
               "%s: input_dtype=%d must be int8 or float32", fn, a->input_dtype);
  QM_CHECK_ARG(a->y_dtype == QM_DTYPE_FLOAT32 || a->y_dtype == QM_DTYPE_FLOAT16, "%s: y_dtype=%d must be float32 "
               "or float16", fn, a->y_dtype);
  QM_CHECK_ARG(a->dual_scale == 0 || a->dual_scale == 1, "%s: dual_scale must be 0 or 1", fn);
  if (a->input_dtype == QM_DTYPE_INT8) {
    QM_CHECK_ARG(QM_VALID_SCALE(a->u_scale) && QM_VALID_SCALE(a->dt_scale) && QM_VALID_SCALE(a->B_scale) &&
                 QM_VALID_SCALE(a->C_scale) && (!a->z || QM_VALID_SCALE(a->z_scale)),
                 "%s: every scale must be positive and finite", fn);
    QM_CHECK_ARG(!a->dual_scale || (a->u_mask && QM_VALID_SCALE(a->u_outlier_scale)),
                 "%s: dual_scale needs u_mask and a positive finite u_outlier_scale", fn);
  } else {
    QM_CHECK_ARG(!a->dual_scale, "%s: dual_scale needs int8 inputs", fn);
  }
  return QM_OK;
}

int launch(const qm_scan_args* a, cudaStream_t stream, const char* fn) {
  int64_t rows = static_cast<int64_t>(a->batch) * a->dim;
  const int threads = 128;
  unsigned blocks = static_cast<unsigned>((rows + threads - 1) / threads);
  const unsigned lane_blocks = static_cast<unsigned>((rows * a->dstate + threads - 1) / threads);
  if (a->input_dtype == QM_DTYPE_INT8) {  // v3
    dim3 grid(static_cast<unsigned>((a->dim + kTile - 1) / kTile), static_cast<unsigned>(a->batch));
    switch (a->dstate) {
      case 8: scan_chunk_kernel<8><<<grid, kTile, 0, stream>>>(*a); break;
      case 16: scan_chunk_kernel<16><<<grid, kTile, 0, stream>>>(*a); break;
      case 32: scan_chunk_kernel<32><<<grid, kTile, 0, stream>>>(*a); break;
      default: scan_chunk_kernel<64><<<grid, kTile, 0, stream>>>(*a); break;
    }
    QM_CHECK_LAUNCH(fn);
    return QM_OK;
  }
  // float inputs. v2 wins while the GPU is under-filled (B*D <= 8192 measured on the H100); v1 beyond
  const bool lanes = rows <= 8192;
  switch (lanes ? a->dstate : 64 + a->dstate) {
    case 8: scan_lanes_kernel<8><<<lane_blocks, threads, 0, stream>>>(*a); break;
    case 16: scan_lanes_kernel<16><<<lane_blocks, threads, 0, stream>>>(*a); break;
    case 32: scan_lanes_kernel<32><<<lane_blocks, threads, 0, stream>>>(*a); break;
    case 64 + 8: scan_kernel<8><<<blocks, threads, 0, stream>>>(*a); break;
    case 64 + 16: scan_kernel<16><<<blocks, threads, 0, stream>>>(*a); break;
    case 64 + 32: scan_kernel<32><<<blocks, threads, 0, stream>>>(*a); break;
    default: scan_kernel<64><<<blocks, threads, 0, stream>>>(*a); break;  // N = 64: one thread per (b, d)
  }
  QM_CHECK_LAUNCH(fn);
  return QM_OK;
}
}  // namespace

extern "C" int qm_selective_scan_workspace_size(int batch, int seqlen, int dim, int dstate, size_t* bytes) {
  QM_CHECK_ARG(bytes, "qm_selective_scan_workspace_size: bytes must be non-null");
  QM_CHECK_ARG(batch > 0 && seqlen > 0 && dim > 0 && dstate > 0 && dstate <= kMaxN,
               "qm_selective_scan_workspace_size: shapes must be positive (dstate <= %d)", kMaxN);
  *bytes = 0;  // the sequential kernel needs none
  return QM_OK;
}

extern "C" int qm_selective_scan(const qm_scan_args* args, cudaStream_t stream) {
  int rc = validate(args, "qm_selective_scan");
  if (rc != QM_OK) return rc;
  return launch(args, stream, "qm_selective_scan launch");
}

extern "C" int qm_selective_state_update(const qm_scan_args* args, cudaStream_t stream) {
  int rc = validate(args, "qm_selective_state_update");
  if (rc != QM_OK) return rc;
  QM_CHECK_ARG(args->seqlen == 1, "qm_selective_state_update: seqlen=%d must be 1", args->seqlen);
  QM_CHECK_ARG(args->initial_state && args->final_state, "qm_selective_state_update: state in and out are required");
  return launch(args, stream, "qm_selective_state_update launch");
}
