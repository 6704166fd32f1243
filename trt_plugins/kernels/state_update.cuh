// The decode state update of one (b, d) row per G = N / 4 threads (spec 4.4 at L = 1, with the fused dt_proj, conv
// shift and x_proj epilogue of qm_scan_args), shared by qm_selective_state_update's kernel and the cluster kernel
// of qm_update_out_proj: one code path, so both give the same bits. Also the fast softplus and SiLU of the scans.
#pragma once
#include "common.cuh"

namespace qm {
// qm_scan_args' checks of qm_selective_scan / qm_selective_state_update (selective_scan.cu): QM_OK or the error
// code, with the message set.
int validate_scan_args(const qm_scan_args* a, const char* fn);
}  // namespace qm

namespace {
constexpr float kLog2e = 1.4426950408889634f;
using qm::ex2_approx;
using qm::rcp_approx;

// softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1], with log1p(e) = e * P(e): P of degree 8 fitted to
// log1p(e) / e on [0, 1] (Chebyshev least squares; 1.9e-7 relative in float32 Horner steps). One MUFU op (ex2, without
// the range fix-ups of __expf; e flushes to 0 only below 2^-126, where log1p(e) is e to float precision anyway) and 9
// multiply-adds; the earlier atanh series needed a reciprocal too, on the pipe the scans' exponentials keep busy.
// Branch-free: no select for x > 20 (the reference's cut), where e * P(e) < 2.1e-9 is below half an ulp of x (>=
// 2^-20) and the sum rounds to x; a select there made the compiler branch around the series, which split each scan
// step's schedule (NOTES.md, session 20).
__device__ __forceinline__ float softplus_fast(float x) {
  const float e = ex2_approx(fabsf(x) * -kLog2e);
  float p = __fmaf_rn(e, 5.253457930e-03f, -2.958850749e-02f);
  p = __fmaf_rn(p, e, 7.836166769e-02f);
  p = __fmaf_rn(p, e, -1.367477030e-01f);
  p = __fmaf_rn(p, e, 1.911143064e-01f);
  p = __fmaf_rn(p, e, -2.484436929e-01f);
  p = __fmaf_rn(p, e, 3.331927061e-01f);
  p = __fmaf_rn(p, e, -4.999950230e-01f);
  p = __fmaf_rn(p, e, 1.f);
  return __fmaf_rn(e, p, fmaxf(x, 0.f));
}
// z / (1 + exp(-z)); for z < -126 ln 2 the ex2 result is +inf, its reciprocal 0 and the product -0 (silu ~ -z e^z)
__device__ __forceinline__ float silu_fast(float z) { return z * rcp_approx(1.f + ex2_approx(z * -kLog2e)); }


// G = N/4 threads per (b, d), each owning 4 consecutive states, so state reads and writes
// are coalesced 16-byte accesses; y is reduced over the G threads with shuffles. In place is safe: every
// thread reads its own states before writing them.
// kDtW: dt_proj fused in (a.dt_w non-null), in its own instantiation: with the 16-byte rank pieces in, every update
// took 34 registers instead of 32, and the plain one measured 5-10% slower at B16/B64 (NOTES.md, session 6).
// kXp: x_proj's epilogue fused in as well (a.xp_acc: one sequence), in its own instantiation. The block turns x_proj's
// int32 sums into the dt_lowrank / B / C codes in shared memory (block 0 also writes them out), then reads those.
constexpr int kMaxXp = 1024;
// emit(r, y) takes each row's output.
template <int N, bool kInt8, bool kDtW, bool kXp, class Emit>
__device__ __forceinline__ void state_update_row(const qm_scan_args& a, bool vec, bool vec_dt, Emit emit) {
  static_assert(!kXp || kDtW, "x_proj's epilogue comes with the fused dt_proj");
  constexpr int G = N / 4;
  constexpr int kPer = 4;  // dt_proj: 16-byte rank pieces per lane per round (ranks up to 16 * kPer * G in one)
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = gid / G;
  const int q = static_cast<int>(gid % G);
  const int D = a.dim;
  const bool active = row < static_cast<int64_t>(a.batch) * D;
  const int64_t r = active ? row : 0;
  const int d = static_cast<int>(r % D), b = static_cast<int>(r / D);
  const int64_t s0 = r * N + 4 * q, a0 = static_cast<int64_t>(d) * N + 4 * q, b0 = static_cast<int64_t>(b) * N + 4 * q;
  // The weights (A, dt_bias, D, dt_proj's row and multiplier) load before waiting for the previous kernel: at
  // decode they come from HBM, and their latency overlaps that kernel's tail instead of following it.
  float A[4];
  if (vec) {
    const float4 av = reinterpret_cast<const float4*>(a.A)[a0 / 4];
    A[0] = av.x, A[1] = av.y, A[2] = av.z, A[3] = av.w;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) A[j] = a.A[a0 + j];
  }
  const float bias = a.dt_bias ? a.dt_bias[d] : 0.f, dskip = a.Dskip ? a.Dskip[d] : 0.f;
  const int8_t* wr = kDtW ? a.dt_w + static_cast<int64_t>(d) * a.dt_rank : nullptr;
  const float dt_m = kDtW ? a.dt_m[d] : 0.f;
  const int pieces = kDtW && vec_dt ? a.dt_rank / 16 : 0;
  int4 w_first[kPer];  // the first round's dt_proj pieces
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int j = q + k * G;
    w_first[k] = j < pieces ? reinterpret_cast<const int4*>(wr)[j] : int4{};
  }
  auto load_h = [&](float (&h)[4]) {
    if (vec) {
      // the state streams (evict-first loads and stores): read and written once per step, it would only push the
      // weights or other layers' inputs out of L2 (B64 D5120: 23.3 -> 18.3 us on an H100, NOTES.md)
      const float4 hv = a.initial_state ? __ldcs(reinterpret_cast<const float4*>(a.initial_state) + s0 / 4) : float4{};
      h[0] = hv.x, h[1] = hv.y, h[2] = hv.z, h[3] = hv.w;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) h[j] = a.initial_state ? a.initial_state[s0 + j] : 0.f;
    }
  };
  float h[4];
  if (a.early_state) load_h(h);  // the caller asserts no kernel ahead of this one writes it (qmamba_kernels.h)
  // the deferred conv-state shift (a.conv_state): lane 0 of the channel moves tokens 1, 2 down and appends x
  const bool shift = kDtW && a.conv_state && active && q == 0;
  int8_t* const crow = shift ? a.conv_state + r * 3 : nullptr;
  int8_t c1 = 0, c2 = 0;
  if (shift && a.early_state) c1 = crow[1], c2 = crow[2];
  // x_proj's multipliers for this thread's first two outputs (weights: before the wait)
  float xm_in[2] = {0.f, 0.f}, xm_out[2] = {0.f, 0.f};
  if constexpr (kXp) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int j = static_cast<int>(threadIdx.x + i * blockDim.x);
      if (j < a.xp_n) {
        xm_in[i] = a.xp_m_in[j];
        if (a.xp_m_out) xm_out[i] = a.xp_m_out[j];
      }
    }
  }
  qm::wait_for_inputs();
  qm::allow_dependents();
  // the token's codes, written by the kernel before: loaded first, so that their L2 round trip overlaps that of
  // x_proj's sums below instead of following its barrier
  int8_t uq = 0, dtq = 0, zq = 0;
  bool outlier = false;
  if constexpr (kInt8) {
    uq = static_cast<const int8_t*>(a.u)[r];
    outlier = a.dual_scale && a.u_mask[r];
    if (!kDtW) dtq = static_cast<const int8_t*>(a.dt)[r];
    if (a.z) zq = static_cast<const int8_t*>(a.z)[r];
  }
  const int8_t cx = shift ? a.conv_x[r] : 0;
  __shared__ __align__(16) int8_t sx[kXp ? kMaxXp : 16];  // x_proj's codes: dt_lowrank, then B, then C
  if constexpr (kXp) {
    const int R = a.dt_rank;
    for (int j = static_cast<int>(threadIdx.x), i = 0; j < a.xp_n; j += static_cast<int>(blockDim.x), ++i) {
      // spec 4.2's epilogue, as qm_int8_linear's: fl(fl(acc_in) m_in) (+ fl(fl(acc_out) m_out)), then Q per segment
      const float m_in = i == 0 ? xm_in[0] : i == 1 ? xm_in[1] : a.xp_m_in[j];
      float y = __fmul_rn(static_cast<float>(a.xp_acc[j]), m_in);
      if (a.xp_m_out) {
        const float m_out = i == 0 ? xm_out[0] : i == 1 ? xm_out[1] : a.xp_m_out[j];
        y = __fadd_rn(y, __fmul_rn(static_cast<float>(a.xp_acc[a.xp_n + j]), m_out));
      }
      const int8_t c = qm::quantize(y, j < R ? a.dt_lowrank_scale : j < R + N ? a.B_scale : a.C_scale);
      sx[j] = c;
      if (blockIdx.x == 0) {  // the codes are outputs here (the pointers are the caller's buffers)
        int8_t* dst = j < R ? const_cast<int8_t*>(a.dt_lowrank) + j
                    : j < R + N ? static_cast<int8_t*>(const_cast<void*>(a.B)) + (j - R)
                                : static_cast<int8_t*>(const_cast<void*>(a.C)) + (j - R - N);
        *dst = c;
      }
    }
    __syncthreads();
  }
  float u, x, zv = 0.f;
  if constexpr (kInt8) {
    u = static_cast<float>(uq) * (outlier ? a.u_outlier_scale : a.u_scale);
    if constexpr (kDtW) {  // dt_proj fused in: the G lanes of this (b, d) split the rank, int32 sum, the epilogue
      const int8_t* lr = kXp ? sx : a.dt_lowrank + static_cast<int64_t>(b) * a.dt_rank;
      int acc = 0;  // an exact int32 sum: any order gives the same bits
      if (vec_dt) {
        // rank % 16 == 0, 16-byte aligned rows: 16-byte pieces, all of a round's loads in flight before the first
        // dp4a (byte loads in a loop of runtime length took one L2 round trip per few bytes)
        for (int j0 = q; j0 < pieces; j0 += kPer * G) {
          int4 lv[kPer], wv[kPer];
#pragma unroll
          for (int k = 0; k < kPer; ++k) {
            const int j = j0 + k * G;
            lv[k] = j < pieces ? reinterpret_cast<const int4*>(lr)[j] : int4{};
            wv[k] = j0 == q ? w_first[k] : j < pieces ? reinterpret_cast<const int4*>(wr)[j] : int4{};
          }
#pragma unroll
          for (int k = 0; k < kPer; ++k) {
            acc = __dp4a(lv[k].x, wv[k].x, acc);
            acc = __dp4a(lv[k].y, wv[k].y, acc);
            acc = __dp4a(lv[k].z, wv[k].z, acc);
            acc = __dp4a(lv[k].w, wv[k].w, acc);
          }
        }
      } else {
        for (int j = q; j < a.dt_rank; j += G) acc += static_cast<int>(lr[j]) * static_cast<int>(wr[j]);
      }
#pragma unroll
      for (int off = G / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off, G);
      const int8_t code = qm::quantize(__fmul_rn(static_cast<float>(acc), dt_m), a.dt_scale);
      x = static_cast<float>(code) * a.dt_scale;
    } else {
      x = static_cast<float>(dtq) * a.dt_scale;
    }
    if (a.z) zv = static_cast<float>(zq) * a.z_scale;
  } else {
    u = static_cast<const float*>(a.u)[r];
    x = static_cast<const float*>(a.dt)[r];
    if (a.z) zv = static_cast<const float*>(a.z)[r];
  }
  if (a.dt_bias) x += bias;
  const float delta = softplus_fast(x), dlu = delta * u;
  float Bv[4], Cv[4];
  if (!a.early_state) load_h(h);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (kInt8) {
      const int8_t* bsrc = kXp ? sx + a.dt_rank : static_cast<const int8_t*>(a.B);
      const int8_t* csrc = kXp ? sx + a.dt_rank + N : static_cast<const int8_t*>(a.C);
      Bv[j] = static_cast<float>(bsrc[b0 + j]) * a.B_scale;
      Cv[j] = static_cast<float>(csrc[b0 + j]) * a.C_scale;
    } else {
      Bv[j] = static_cast<const float*>(a.B)[b0 + j];
      Cv[j] = static_cast<const float*>(a.C)[b0 + j];
    }
  }
  float y = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    h[j] = __fmaf_rn(ex2_approx(delta * A[j] * kLog2e), h[j], dlu * Bv[j]);
    y = __fmaf_rn(h[j], Cv[j], y);
  }
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) y += __shfl_xor_sync(0xffffffffu, y, off, G);
  if (!active) return;
  if (shift) {  // after the wait: the GEMV that computed the conv from the old row has finished
    if (!a.early_state) c1 = crow[1], c2 = crow[2];
    crow[0] = c1, crow[1] = c2, crow[2] = cx;
  }
  if (a.final_state && vec)
    __stcs(reinterpret_cast<float4*>(a.final_state) + s0 / 4, make_float4(h[0], h[1], h[2], h[3]));
  else if (a.final_state)
#pragma unroll
    for (int j = 0; j < 4; ++j) a.final_state[s0 + j] = h[j];
  if (q == 0) {
    if (a.Dskip) y += dskip * u;
    if (a.z) y *= silu_fast(zv);
    emit(r, y);
  }
}
}  // namespace
