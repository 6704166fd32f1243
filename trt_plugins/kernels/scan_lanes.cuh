// Prefill scan with lanes along the states (int8 inputs, N = 16). Included by selective_scan.cu only.
//
// A lane owns S states of one channel and walks time in order: per (t, d, n) one ex2, one multiply for dt*A, one
// for delta*u*B and two multiply-adds, with no map composition and no second pass. y's sum over the states crosses
// lanes: once per chunk of TC steps a butterfly reduce-scatter over the channel's LPC = 16 / S lanes leaves lane g
// with the sums of steps [g * TC / LPC, (g + 1) * TC / LPC). A warp holds 2S channels, a block of W warps CPB = 2SW
// channels of one batch row.
// Per chunk the block turns the channels' codes into delta, delta*u*B_scale, D*u and silu(z) rows (silu from a table
// of the 256 z codes, evaluated with the same function as the other kernels) and B, C into float rows in shared
// memory, once per (t, d) and (t, n), not per state. The next chunk's codes are in flight in registers while this
// one is scanned; the state loop is software-pipelined by hand.
// B_scale and C_scale are applied once per (t, d) instead of per state (float rounding only: y is compared with a
// tolerance, spec 4.4 "Exactness"). Beyond the sequence, delta = 0 and delta*u = 0 make every step the identity.
// Where it runs (the launcher): from 3072 channels (B*D), S = 2 below 12288 and S = 4 from there, up to 13311 for
// token-major inputs (above, one thread per channel, with no sum across lanes, wins) and without a bound for
// channel-major ones. At 2048 channels and below the per-chunk staging and the sum over lanes cost more than the
// time-parallel v5 saves (B1 D2048 L2048 0.095 ms against 0.073; B1 D1536 0.10 at S = 1 or 2 against 0.066).
// Measurements, with the variants that lost (sums through shared memory, per-channel delta tables): NOTES.md,
// session 16.
#pragma once

namespace lanes {

constexpr int N = 16;

template <int S_, int W_, int TC_>
struct Cfg {
  static constexpr int S = S_, W = W_, TC = TC_;
  static constexpr int LPC = N / S, CPW = 32 / LPC, CPB = W * CPW, THREADS = 32 * W;
  static constexpr int R = TC / LPC;  // steps whose y a lane holds after the reduction
  static constexpr int RS = TC + 4;   // floats per shared row: 16-byte aligned, consecutive rows 4 banks apart
  static constexpr int PIECES = TC * CPB / 4, PPT = PIECES / THREADS;  // 4-item pieces of the codes, per thread
  static constexpr int BC_PT = (2 * TC + THREADS - 1) / THREADS;       // 16-byte B/C rows per thread
  static_assert(S == 1 || S == 2 || S == 4, "states per lane");
  static_assert(CPB % 4 == 0 && PIECES % THREADS == 0, "whole 4-item pieces per thread");
  static_assert(R % 4 == 0 && TC % 4 == 0, "y and the rows come in float4s");
  // Column of step t in channel c's per-(t, d) rows: the 4-step group XOR (c / 8) % 4. The token-major staging
  // writes one step of 32 channels (4 per thread, 4 steps per warp) at a time: without it the rows' starts (36 words
  // apart) put the 32 stores in 8 banks (S = 4: 11.3 M of 51 M shared wavefronts were conflicts at B8 D1536 L2048,
  // 1.9 M with it, and 7% less time; NOTES.md, session 20). The XOR is constant over the 8 channels a warp reads
  // together in the state loop, which stay conflict-free.
  static __device__ __forceinline__ int col(int c, int t) { return t ^ (((c >> 3) & 3) << 2); }
  static_assert(TC % 16 == 0, "the column XOR stays inside the row (it flips bits 2 and 3 of t)");
};

// The block's shared memory (static: under the 48 KB that needs no opt-in).
template <class C>
struct Smem {
  float delta[C::CPB][C::RS], dlu[C::CPB][C::RS], skip[C::CPB][C::RS], gate[C::CPB][C::RS];  // per (channel, step)
  float B[N][C::RS], Cm[N][C::RS];  // codes as floats, per (state, step)
  float silu[256];                  // silu(z) per z code (byte)
  float dskip[C::CPB], bias[C::CPB];
};

// Piece k of the chunk for this thread: token-major (t, 4 channels), channel-major (channel, 4 steps).
template <class C, bool kCM>
__device__ __forceinline__ void piece_at(int k, int& t, int& c) {
  const int p = static_cast<int>(threadIdx.x) + k * C::THREADS;
  if constexpr (kCM) {
    t = p % (C::TC / 4) * 4, c = p / (C::TC / 4);
  } else {
    t = p / (C::CPB / 4), c = p % (C::CPB / 4) * 4;
  }
}

struct Codes {
  uint32_t u, dt, z, m;  // 4 codes each
};

// vec: 4-byte loads of whole pieces (token-major D % 4 == 0, channel-major L % 4 == 0, 4-byte aligned codes); else
// byte loads, each item checked.
template <class C, bool kCM>
__device__ __forceinline__ void load_codes(const qm_scan_args& a, Codes (&r)[C::PPT], uint4 (&bc)[C::BC_PT], int b,
                                           int t0, int d0, bool vec) {
  const int L = a.seqlen, D = a.dim;
  const uint8_t* mask = a.dual_scale ? a.u_mask : nullptr;
#pragma unroll
  for (int k = 0; k < C::PPT; ++k) {
    int t, c;
    piece_at<C, kCM>(k, t, c);
    const int64_t off = kCM ? (static_cast<int64_t>(b) * D + d0 + c) * L + t0 + t
                            : (static_cast<int64_t>(b) * L + t0 + t) * D + d0 + c;
    if (vec) {
      const bool ok = t0 + t < L && d0 + c < D;  // whole pieces
      auto word = [&](const void* p) {
        return ok && p ? *reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(p) + off) : 0u;
      };
      r[k] = {word(a.u), word(a.dt), word(a.z), word(mask)};
    } else {
      auto gather = [&](const void* p) {
        uint32_t w = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const bool ok = p && (kCM ? t0 + t + i < L && d0 + c < D : t0 + t < L && d0 + c + i < D);
          w |= ok ? static_cast<uint32_t>(static_cast<const uint8_t*>(p)[off + i]) << (8 * i) : 0u;
        }
        return w;
      };
      r[k] = {gather(a.u), gather(a.dt), gather(a.z), gather(mask)};
    }
  }
#pragma unroll
  for (int k = 0; k < C::BC_PT; ++k) {
    const int p = static_cast<int>(threadIdx.x) + k * C::THREADS, t = p % C::TC;
    const bool ok = p < 2 * C::TC && t0 + t < L;
    bc[k] = ok ? *reinterpret_cast<const uint4*>(static_cast<const int8_t*>(p < C::TC ? a.B : a.C) +
                                                  (static_cast<int64_t>(b) * L + t0 + t) * N)
               : uint4{};
  }
}

template <class C, bool kCM>
__device__ __forceinline__ void store_codes(const qm_scan_args& a, Smem<C>& sm, const Codes (&r)[C::PPT],
                                            const uint4 (&bc)[C::BC_PT], int t0, int d0) {
  const int L = a.seqlen, D = a.dim;
  const float s_in = a.u_scale * a.B_scale, s_out = (a.dual_scale ? a.u_outlier_scale : a.u_scale) * a.B_scale;
#pragma unroll
  for (int k = 0; k < C::PPT; ++k) {
    int t, c;
    piece_at<C, kCM>(k, t, c);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int ti = kCM ? t + i : t, ci = kCM ? c : c + i;
      const bool ok = t0 + ti < L && d0 + ci < D;
      const bool outlier = qm::byte_of(r[k].m, i);
      const float cu = qm::code_float(r[k].u, i), ub = cu * (outlier ? s_out : s_in);  // u * B_scale
      const float u = cu * (outlier ? a.u_outlier_scale : a.u_scale);
      const float delta = softplus_fast(__fmaf_rn(qm::code_float(r[k].dt, i), a.dt_scale, sm.bias[ci]));
      sm.delta[ci][C::col(ci, ti)] = ok ? delta : 0.f;
      sm.dlu[ci][C::col(ci, ti)] = ok ? delta * ub : 0.f;
      sm.skip[ci][C::col(ci, ti)] = sm.dskip[ci] * u;
      sm.gate[ci][C::col(ci, ti)] = a.z ? sm.silu[qm::byte_of(r[k].z, i)] : 1.f;
    }
  }
#pragma unroll
  for (int k = 0; k < C::BC_PT; ++k) {
    const int p = static_cast<int>(threadIdx.x) + k * C::THREADS, t = p % C::TC;
    if (p >= 2 * C::TC) break;
    float(*dst)[C::RS] = p < C::TC ? sm.B : sm.Cm;
    const uint32_t w[4] = {bc[k].x, bc[k].y, bc[k].z, bc[k].w};
#pragma unroll
    for (int n = 0; n < N; ++n) dst[n][t] = qm::code_float(w[n / 4], n % 4);
  }
}

// Butterfly reduce-scatter of p[0, TC) over the channel's LPC lanes (g = lane % LPC), from mask M = LPC / 2 down: each
// level keeps half of the remaining LEN values; afterwards p[0, TC / LPC) of lane g holds the channel's sums for
// steps g * TC / LPC + i.
template <int M, int LEN, int TC>
__device__ __forceinline__ void reduce_scatter(float (&p)[TC], int g) {
  if constexpr (M >= 1) {
    const bool upper = g & M;
#pragma unroll
    for (int j = 0; j < LEN / 2; ++j) {
      const float send = upper ? p[j] : p[j + LEN / 2], keep = upper ? p[j + LEN / 2] : p[j];
      p[j] = keep + __shfl_xor_sync(0xffffffffu, send, M);
    }
    reduce_scatter<M / 2, LEN / 2>(p, g);
  }
}

// Y: y's type (a template argument: one store per step, not both predicated; NOTES.md, session 21)
template <class C, bool kCM, class Y>
__global__ void __launch_bounds__(C::THREADS) scan_lanes_kernel(qm_scan_args a, bool vec) {
  constexpr int S = C::S, LPC = C::LPC, TC = C::TC, R = C::R;
  static_assert(sizeof(Smem<C>) <= 48 * 1024, "static shared memory");
  __shared__ __align__(16) Smem<C> sm;
  const int lane = threadIdx.x % 32, g = lane % LPC, ch = threadIdx.x / LPC;
  const int D = a.dim, L = a.seqlen, b = blockIdx.y, d0 = blockIdx.x * C::CPB, d = d0 + ch;
  const bool active = d < D;
  for (int i = threadIdx.x; i < 256; i += C::THREADS)
    sm.silu[i] = silu_fast(static_cast<float>(static_cast<int8_t>(i)) * a.z_scale);
  for (int i = threadIdx.x; i < C::CPB; i += C::THREADS) {
    sm.dskip[i] = d0 + i < D && a.Dskip ? a.Dskip[d0 + i] : 0.f;
    sm.bias[i] = d0 + i < D && a.dt_bias ? a.dt_bias[d0 + i] : 0.f;
  }
  float h[S], A2[S];
  const int64_t sbase = (static_cast<int64_t>(b) * D + (active ? d : 0)) * N;
#pragma unroll
  for (int s = 0; s < S; ++s) {  // state n = s * LPC + g: the lanes of a channel read rows 4 banks apart
    const int n = s * LPC + g;
    h[s] = active && a.initial_state ? a.initial_state[sbase + n] : 0.f;
    A2[s] = active ? a.A[static_cast<int64_t>(d) * N + n] * kLog2e : 0.f;
  }
  Codes r[C::PPT];
  uint4 bc[C::BC_PT];
  load_codes<C, kCM>(a, r, bc, b, 0, d0, vec);
  __syncthreads();  // the silu table, D and dt_bias
  for (int t0 = 0; t0 < L; t0 += TC) {
    store_codes<C, kCM>(a, sm, r, bc, t0, d0);
    if (t0 + TC < L) load_codes<C, kCM>(a, r, bc, b, t0 + TC, d0, vec);  // in flight while this chunk is scanned
    __syncthreads();
    // Two-stage software pipeline over groups of 4 steps: group q + 1's shared loads, exponentials and delta*u*B
    // are in flight while group q's recurrence runs (written out: the compiler kept each group's loads, ex2 and
    // chain back to back). p stays in registers until the chunk ends (no shared store inside the loop).
    float p[TC];
    float4 dl = *reinterpret_cast<const float4*>(&sm.delta[ch][C::col(ch, 0)]);
    float4 du = *reinterpret_cast<const float4*>(&sm.dlu[ch][C::col(ch, 0)]);
    float4 bv[S], cv[S];
#pragma unroll
    for (int s = 0; s < S; ++s) {
      bv[s] = *reinterpret_cast<const float4*>(&sm.B[s * LPC + g][0]);
      cv[s] = *reinterpret_cast<const float4*>(&sm.Cm[s * LPC + g][0]);
    }
    float ea[4][S], eb[4][S], ec[4][S];  // the current group's exp(delta*A), delta*u*B and C
    auto stage = [&]() {
      const float dls[4] = {dl.x, dl.y, dl.z, dl.w}, dus[4] = {du.x, du.y, du.z, du.w};
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int s = 0; s < S; ++s) {
          ea[j][s] = ex2_approx(dls[j] * A2[s]);
          eb[j][s] = dus[j] * (&bv[s].x)[j];
          ec[j][s] = (&cv[s].x)[j];
        }
    };
    stage();
#pragma unroll
    for (int q = 0; q < TC; q += 4) {
      if (q + 4 < TC) {
        dl = *reinterpret_cast<const float4*>(&sm.delta[ch][C::col(ch, q + 4)]);
        du = *reinterpret_cast<const float4*>(&sm.dlu[ch][C::col(ch, q + 4)]);
#pragma unroll
        for (int s = 0; s < S; ++s) {
          bv[s] = *reinterpret_cast<const float4*>(&sm.B[s * LPC + g][q + 4]);
          cv[s] = *reinterpret_cast<const float4*>(&sm.Cm[s * LPC + g][q + 4]);
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int s = 0; s < S; ++s) {
          h[s] = __fmaf_rn(ea[j][s], h[s], eb[j][s]);
          p[q + j] = s == 0 ? h[s] * ec[j][s] : __fmaf_rn(h[s], ec[j][s], p[q + j]);
        }
      if (q + 4 < TC) stage();
    }
    reduce_scatter<LPC / 2, TC>(p, g);  // p[i]: y of step g * R + i before D*u and the gate
    const int tl = g * R;
    // The lane's R steps from t0 + tl, by a pointer advanced D per step; the steps from nvalid on (past L in the last
    // chunk, or all of them for a channel past D) store nothing. One predicated store per step: with the address
    // computed per step and a branch around each store, this loop was ~16 instructions per y (NOTES.md, session 22).
    const int nvalid = active ? min(R, L - (t0 + tl)) : 0;
    Y* y = static_cast<Y*>(a.y) + (static_cast<int64_t>(b) * L + t0 + tl) * D + (active ? d : 0);
#pragma unroll
    for (int i = 0; i < R; i += 4) {
      const float4 sk = *reinterpret_cast<const float4*>(&sm.skip[ch][C::col(ch, tl + i)]);
      const float4 gt = *reinterpret_cast<const float4*>(&sm.gate[ch][C::col(ch, tl + i)]);
      const float sks[4] = {sk.x, sk.y, sk.z, sk.w}, gts[4] = {gt.x, gt.y, gt.z, gt.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float out = __fmaf_rn(p[i + j], a.C_scale, sks[j]) * gts[j];
        if (i + j < nvalid) *y = qm::out_value<Y>(out);
        y += D;
      }
    }
    __syncthreads();  // the chunk's rows are read before the next chunk's are stored
  }
  if (active && a.final_state)
#pragma unroll
    for (int s = 0; s < S; ++s) a.final_state[sbase + s * LPC + g] = h[s];
}

// Whether the kernel takes these arguments: int8, N = 16, B and C in 16-byte rows.
inline bool applies(const qm_scan_args* a) {
  return a->input_dtype == QM_DTYPE_INT8 && a->dstate == N && qm::aligned(a->B) && qm::aligned(a->C);
}

using KernelFn = void (*)(qm_scan_args, bool);

// The instantiation for these arguments' layout and y type.
template <class C>
KernelFn kernel_for(const qm_scan_args* a) {
  const bool half = a->y_dtype == QM_DTYPE_FLOAT16;
  return a->channel_major ? (half ? scan_lanes_kernel<C, true, __half> : scan_lanes_kernel<C, true, float>)
                          : (half ? scan_lanes_kernel<C, false, __half> : scan_lanes_kernel<C, false, float>);
}

template <class C>
int64_t blocks_of(const qm_scan_args* a) {
  return (static_cast<int64_t>(a->dim) + C::CPB - 1) / C::CPB * a->batch;
}

template <class C>
int launch(const qm_scan_args* a, cudaStream_t stream, const char* fn) {
  const dim3 grid(static_cast<unsigned>((a->dim + C::CPB - 1) / C::CPB), static_cast<unsigned>(a->batch));
  const bool vec = (a->channel_major ? a->seqlen % 4 == 0 : a->dim % 4 == 0) && qm::aligned(a->u, 4) &&
                   qm::aligned(a->dt, 4) && (!a->z || qm::aligned(a->z, 4)) && (!a->dual_scale || qm::aligned(a->u_mask, 4));
  kernel_for<C>(a)<<<grid, C::THREADS, 0, stream>>>(*a, vec);
  QM_CHECK_LAUNCH(fn);
  return QM_OK;
}

// Blocks of this kernel resident per SM on the current device (occupancy; cached per device).
template <class C>
int resident_blocks(const qm_scan_args* a) {
  static int n[64][4] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) dev = 0;
  int& r = n[dev][2 * a->channel_major + (a->y_dtype == QM_DTYPE_FLOAT16)];
  if (r == 0 && (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&r, kernel_for<C>(a), C::THREADS, 0) != cudaSuccess ||
                 r < 1))
    r = 1;
  return r;
}

// Warps the busiest SM runs when every block is resident at once (blocks spread evenly over the SMs), or -1 where
// they do not all fit in one wave.
template <class C>
int64_t busiest_sm_warps(const qm_scan_args* a) {
  const int64_t per_sm = (blocks_of<C>(a) + qm::sm_count() - 1) / qm::sm_count();
  return per_sm <= resident_blocks<C>(a) ? per_sm * C::W : -1;
}

// Two states per lane (3072 to 12287 channels: 1-2 warps per SM sub-partition, latency-bound): the block size (2, 4
// or 8 warps) whose blocks leave the busiest SM the fewest warps, in one wave; on a tie the larger blocks (fewer
// copies of the chunk's B and C rows). H100, L2048, ms against 4 warps everywhere: B1 D3072 (2 warps) 0.124 ->
// 0.107, B1 D5120 (2) 0.170 -> 0.152, B1 D4096 (8) 0.118 -> 0.114, B2 D4096 (8) 0.192 -> 0.183 (NOTES.md, session
// 21). Four states per lane keep 4 warps (2 measured 2% slower at 12288 channels, 8 take one block per SM).
inline int launch_two_states(const qm_scan_args* a, cudaStream_t stream, const char* fn) {
  using W8 = Cfg<2, 8, 32>;
  using W4 = Cfg<2, 4, 32>;
  using W2 = Cfg<2, 2, 32>;
  const int64_t w8 = busiest_sm_warps<W8>(a), w4 = busiest_sm_warps<W4>(a), w2 = busiest_sm_warps<W2>(a);
  auto better = [](int64_t x, int64_t than) { return x > 0 && (than < 0 || x < than); };
  if (w8 > 0 && !better(w4, w8) && !better(w2, w8)) return launch<W8>(a, stream, fn);
  if (w2 > 0 && better(w2, w4)) return launch<W2>(a, stream, fn);
  return launch<W4>(a, stream, fn);
}

}  // namespace lanes
