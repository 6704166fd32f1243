// W8A8 linear epilogue (spec 4.2) and a small-batch GEMV, so a quantized linear is one or two kernels:
//   y[r, n] = fl(fl(acc_in) * m_in[n])  (+ fl(fl(acc_out) * m_out[n]) for a dual-scale input, added after)
// then per output segment: int8 = Q(y, scale) (division, ties to even), or float32 y, or residual + y.
// acc comes from a GEMM (int32, e.g. cuBLASLt via torch._int_mm) or, for rows <= 4 (decode), from the GEMV
// here: 1 or 4 warps per output column, 16-byte loads and dp4a over K, x masked per byte for the dual split.
#include "common.cuh"
#include "conv_decode.cuh"
#include "hadamard_row.cuh"
#include "slab_gemv.cuh"

namespace {
constexpr int kMaxGemvRows = 4;  // beyond, cuBLASLt's int8 GEMM + the epilogue kernel is faster (H100)

struct Seg {
  int end[3];
  float scale[3];
  void* out[3];
  int n;
};

// The segment of column n, picked with constant indices only: a runtime index into the Seg kernel parameter made
// every thread copy it to local memory (56 bytes per thread, as many bytes as a third of the weights read).
__device__ __forceinline__ void store(const Seg& sg, const qm_linear_args& a, int r, int n, float y) {
  const bool past0 = sg.n > 1 && n >= sg.end[0], past1 = past0 && sg.n > 2 && n >= sg.end[1];
  const int begin = past1 ? sg.end[1] : past0 ? sg.end[0] : 0;
  const int end = past1 ? sg.end[2] : past0 ? sg.end[1] : sg.end[0];
  const float scale = past1 ? sg.scale[2] : past0 ? sg.scale[1] : sg.scale[0];
  void* const dst = past1 ? sg.out[2] : past0 ? sg.out[1] : sg.out[0];
  const int64_t o = static_cast<int64_t>(r) * (end - begin) + (n - begin);
  if (scale > 0.f) {
    static_cast<int8_t*>(dst)[o] = qm::quantize(y, scale);
  } else {
    float* out = static_cast<float*>(dst);
    out[o] = a.residual ? __fadd_rn(a.residual[o], y) : y;
  }
}

__device__ __forceinline__ float dequant(const qm_linear_args& a, bool masked, int n, int32_t acc_in,
                                         int32_t acc_out) {
  float y = __fmul_rn(static_cast<float>(acc_in), a.m_in[n]);
  if (masked) y = __fadd_rn(y, __fmul_rn(static_cast<float>(acc_out), a.m_out[n]));
  return y;
}

__global__ void epilogue_kernel(qm_linear_args a, Seg sg) {
  qm::wait_for_inputs();
  qm::allow_dependents();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(a.rows) * a.n) return;
  const int r = static_cast<int>(i / a.n), n = static_cast<int>(i % a.n);
  store(sg, a, r, n, dequant(a, a.x_mask != nullptr, n, a.acc_in[i], a.x_mask ? a.acc_out[i] : 0));
}

// RMSNormQuant of the block's rows into shared memory (every block recomputes it: a row is a few KB read from L2,
// against a separate kernel launch and its round trip through memory).
// One row of k <= 256 * kNormPer (decode B1: 130m to 2.8b): each thread's values load at once (one L2 round trip
// for the sum of squares), and the codes' quotients take the reciprocal multiply where it decides the code (the
// spec's division otherwise), from the row and the norm weights loaded again from L1 in rounds of NPR. The loop
// form took a round trip per few elements and divided each: in a microbenchmark of 640 blocks (k 2560) 5.9 -> 4.6
// us, 384 blocks (k 768) 4.1 -> 3.0; 2.8b decode B1 -1.4 us per layer (NOTES.md, session 13).
// NPR: the codes' rounds of loads (ptxas: 5 spills 16 bytes in the plain one-row GEMVs; 2 none; the two-columns-
// per-warp GEMV measured faster with 5 in spite of its spills, NOTES.md session 13).
constexpr int kNormPer = 10;

// Spec 4.1's 1 / rms of a row into *rr from each warp's float64 sum of squares (8 warps; thread 0 adds their sums in
// warp order). The caller syncs before reading *rr.
__device__ __forceinline__ void block_rms_reciprocal(double warp_acc, double* red, float* rr, int k, float eps) {
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = warp_acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double sum = 0.0;
    for (int w = 0; w < 8; ++w) sum += red[w];
    *rr = qm::rms_reciprocal(sum, k, eps);
  }
}

template <int R, int NPR>
__device__ void norm_prologue(const qm_linear_args& a, int8_t* xs) {
  __shared__ double red[8];
  __shared__ float rr[R];
  const int t = threadIdx.x;
  if (R == 1 && a.k <= 256 * kNormPer) {
    float v[kNormPer];
#pragma unroll
    for (int j = 0; j < kNormPer; ++j) v[j] = t + 256 * j < a.k ? a.norm_x[t + 256 * j] : 0.f;
    double acc = 0.0;  // qm::warp_sumsq's order (a missing element adds 0.0: the same bits)
#pragma unroll
    for (int j = 0; j < kNormPer; ++j) acc += static_cast<double>(__fmul_rn(v[j], v[j]));
    block_rms_reciprocal(qm::warp_sum(acc), red, rr, a.k, a.norm_eps);
    const float inv_scale = __frcp_rn(a.norm_scale);
    const bool fast = qm::has_accurate_reciprocal(a.norm_scale);
    __syncthreads();
    const float r0 = rr[0];
    // the row again (L1) with the norm weights (L1, asked for before the wait), in two rounds of loads: keeping the
    // row in registers through the reduction made the one-row GEMVs spill (ptxas)
#pragma unroll
    for (int h = 0; h < kNormPer; h += NPR) {
      float x[NPR], w[NPR];
#pragma unroll
      for (int j = 0; j < NPR; ++j) {
        const int i = t + 256 * (h + j);
        x[j] = i < a.k ? a.norm_x[i] : 0.f;
        w[j] = i < a.k ? a.norm_w[i] : 0.f;
      }
#pragma unroll
      for (int j = 0; j < NPR; ++j)
        if (t + 256 * (h + j) < a.k)
          xs[t + 256 * (h + j)] = quantize_fast(__fmul_rn(__fmul_rn(x[j], r0), w[j]), a.norm_scale, inv_scale, fast);
    }
    __syncthreads();
    return;
  }
  for (int r = 0; r < R && r < a.rows; ++r) {
    const float* row = a.norm_x + static_cast<int64_t>(r) * a.k;
    block_rms_reciprocal(qm::warp_sumsq(row, a.k, 256), red, rr + r, a.k, a.norm_eps);
    __syncthreads();
    for (int i = threadIdx.x; i < a.k; i += 256) xs[r * a.k + i] = qm::rms_code(row[i], rr[r], a.norm_w[i], a.norm_scale);
  }
  __syncthreads();
}

// The decode conv in front of x_proj (a.conv_x non-null): every block computes the conv of all k channels of its
// rows into shared memory (codes, then the outlier mask) and writes its share (groups g = block mod grid) of the
// codes and mask to conv_u / conv_mask; no block waits for another. The state is only read (the state update
// shifts it afterwards, qm_scan_args.conv_state). Work unit: a group of 4 channels of every row.
template <int R>
struct ConvEarly {
  static constexpr int kPre = R == 1 ? 2 : 1;  // rounds of a block's groups whose constants load before the wait
  int4 w[kPre];
  float4 m[kPre], bias[kPre];
  int st[kPre][R][3];
};

template <int R>
__device__ __forceinline__ void conv_load_state(const qm_linear_args& a, int g, int (&st)[R][3]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int* s = reinterpret_cast<const int*>(a.conv_state) + static_cast<int64_t>(r) * a.k * 3 / 4 + 3 * g;
#pragma unroll
    for (int i = 0; i < 3; ++i) st[r][i] = r < a.rows ? s[i] : 0;
  }
}

__device__ __forceinline__ void conv_load_weights(const qm_linear_args& a, int g, int4& w, float4& m, float4& bias) {
  w = reinterpret_cast<const int4*>(a.conv_w)[g];
  const float4 ws = reinterpret_cast<const float4*>(a.conv_w_scale)[g];
  m = make_float4(qm::scale_product(a.conv_in_scale, ws.x), qm::scale_product(a.conv_in_scale, ws.y),
                  qm::scale_product(a.conv_in_scale, ws.z), qm::scale_product(a.conv_in_scale, ws.w));
  bias = reinterpret_cast<const float4*>(a.conv_bias)[g];
}

// before the wait: the weights of the thread's first kPre groups, and their state when the caller allows it
template <int R, int T>
__device__ __forceinline__ void conv_prologue_early(const qm_linear_args& a, ConvEarly<R>& e) {
  const int groups = a.k / 4;
#pragma unroll
  for (int i = 0; i < ConvEarly<R>::kPre; ++i) {
    const int g = static_cast<int>(threadIdx.x) + i * T;
    if (g < groups) {
      conv_load_weights(a, g, e.w[i], e.m[i], e.bias[i]);
      if (a.conv_early_state) conv_load_state<R>(a, g, e.st[i]);
    }
  }
}

template <int R, bool kDual>
__device__ __forceinline__ void conv_group(const qm_linear_args& a, const ConvQuant& q, int g, const int (&st)[R][3],
                                           int4 w, float4 m, float4 bias, int* xs, int* ms) {
  const bool mine = g % static_cast<int>(gridDim.x) == static_cast<int>(blockIdx.x);  // this block writes it out
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r >= a.rows) break;
    const int64_t o = static_cast<int64_t>(r) * a.k / 4 + g;  // in 4-byte words
    int codes, masks;
    conv4_decode<kDual>(st[r], reinterpret_cast<const int*>(a.conv_x)[o], w, m, bias, q, codes, masks);
    xs[o] = codes;
    if (kDual) ms[o] = masks;
    if (mine) {
      reinterpret_cast<int*>(a.conv_u)[o] = codes;
      if (kDual) reinterpret_cast<int*>(a.conv_mask)[o] = masks;
    }
  }
}

// after the wait: every group of every row into xs (codes) and ms (mask), shared memory
template <int R, int T, bool kDual>
__device__ void conv_prologue(const qm_linear_args& a, const ConvQuant& q, const ConvEarly<R>& e, int* xs,
                              int* ms) {
  const int groups = a.k / 4;
#pragma unroll
  for (int i = 0; i < ConvEarly<R>::kPre; ++i) {
    const int g = static_cast<int>(threadIdx.x) + i * T;
    if (g < groups) {
      int st[R][3];
      if (a.conv_early_state) {
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int j = 0; j < 3; ++j) st[r][j] = e.st[i][r][j];
      } else {
        conv_load_state<R>(a, g, st);
      }
      conv_group<R, kDual>(a, q, g, st, e.w[i], e.m[i], e.bias[i], xs, ms);
    }
  }
  for (int g = static_cast<int>(threadIdx.x) + ConvEarly<R>::kPre * T; g < groups; g += T) {
    int st[R][3];
    int4 w;
    float4 m, bias;
    conv_load_weights(a, g, w, m, bias);
    conv_load_state<R>(a, g, st);
    conv_group<R, kDual>(a, q, g, st, w, m, bias, xs, ms);
  }
  __syncthreads();
}

// The conv and x_proj's sums behind a one-row GEMV (a.xp_acc non-null, in_proj at decode): the conv is per
// channel, so the block that computed channels [base, base + C) of segment 0 (x) runs their conv itself, shifts
// their state, and adds their share of x_proj into int32 sums (red.add: exact in any order). The kernel that
// reads the sums (the state update) applies x_proj's epilogue; one kernel per layer fewer than a separate x_proj.
// Work unit of the conv: a group of 4 channels (thread t < C / 4).
__device__ __forceinline__ void tail_prefetch(const qm_linear_args& a, int base, int width) {
  // before the wait: the lines of the block's x_proj weight slices and of its conv constants, into L1 (no registers)
  for (int j = threadIdx.x; j < a.xp_n; j += blockDim.x)
    asm volatile("prefetch.global.L1 [%0];" ::"l"(a.xp_w + static_cast<int64_t>(j) * width + base));
  if (threadIdx.x == 0) {
    asm volatile("prefetch.global.L1 [%0];" ::"l"(a.conv_w + 4 * base));
    asm volatile("prefetch.global.L1 [%0];" ::"l"(a.conv_w_scale + base));
    asm volatile("prefetch.global.L1 [%0];" ::"l"(a.conv_bias + base));
  }
}

// the group's state row after this token: each channel's tokens 1, 2, then x (byte j of xw is channel j's x)
__device__ __forceinline__ void shifted_state(const int (&st)[3], int xw, int (&out)[3]) {
  unsigned o[12], nb[12];
#pragma unroll
  for (int i = 0; i < 12; ++i) o[i] = static_cast<unsigned>(st[i / 4]) >> (8 * (i % 4)) & 0xffu;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    nb[3 * j] = o[3 * j + 1];
    nb[3 * j + 1] = o[3 * j + 2];
    nb[3 * j + 2] = static_cast<unsigned>(xw) >> (8 * j) & 0xffu;
  }
#pragma unroll
  for (int i = 0; i < 3; ++i)
    out[i] = static_cast<int>(nb[4 * i] | nb[4 * i + 1] << 8 | nb[4 * i + 2] << 16 | nb[4 * i + 3] << 24);
}

// after the GEMV (xs: the block's C segment-0 codes in shared memory, 4-byte aligned; st: the state of thread t's
// group when read before the wait)
template <int C>
__device__ void conv_xproj_tail(const qm_linear_args& a, const ConvQuant& q, int base, int width, const int8_t* xs,
                                const int (&st_early)[1][3]) {
  constexpr int kGroups = C / 4;
  __shared__ int us[kGroups], ms[kGroups];
  const int t = static_cast<int>(threadIdx.x);
  if (t < kGroups) {
    const int g = base / 4 + t;
    int st[1][3];
    if (a.conv_early_state) {
#pragma unroll
      for (int i = 0; i < 3; ++i) st[0][i] = st_early[0][i];
    } else {
      conv_load_state<1>(a, g, st);
    }
    int4 w;
    float4 m, bias;
    conv_load_weights(a, g, w, m, bias);
    const int xw = reinterpret_cast<const int*>(xs)[t];
    int codes, masks = 0;
    if (a.conv_dual_scale)
      conv4_decode<true>(st[0], xw, w, m, bias, q, codes, masks);
    else
      conv4_decode<false>(st[0], xw, w, m, bias, q, codes, masks);
    us[t] = codes;
    ms[t] = masks;
    reinterpret_cast<int*>(a.conv_u)[g] = codes;
    if (a.conv_dual_scale) reinterpret_cast<int*>(a.conv_mask)[g] = masks;
    int nst[3];
    shifted_state(st[0], xw, nst);
    int* srow = reinterpret_cast<int*>(a.conv_state) + 3 * g;
#pragma unroll
    for (int i = 0; i < 3; ++i) srow[i] = nst[i];
  }
  __syncthreads();
  const bool dual = a.conv_dual_scale != 0;
  for (int j = t; j < a.xp_n; j += blockDim.x) {
    const int* wrow = reinterpret_cast<const int*>(a.xp_w + static_cast<int64_t>(j) * width + base);
    int wv[kGroups];
    if constexpr (kGroups == 4) {
      const int4 v = *reinterpret_cast<const int4*>(wrow);
      wv[0] = v.x, wv[1] = v.y, wv[2] = v.z, wv[3] = v.w;
    } else {
      static_assert(kGroups == 2, "8 or 16 channels per block");
      const int2 v = *reinterpret_cast<const int2*>(wrow);
      wv[0] = v.x, wv[1] = v.y;
    }
    int ai = 0, ao = 0;
#pragma unroll
    for (int i = 0; i < kGroups; ++i) {
      const unsigned mm = static_cast<unsigned>(ms[i]) * 0xffu;  // 0/1 bytes -> byte masks
      ai = __dp4a(static_cast<int>(static_cast<unsigned>(us[i]) & ~mm), wv[i], ai);
      ao = __dp4a(static_cast<int>(static_cast<unsigned>(us[i]) & mm), wv[i], ao);
    }
    // packed sums: one cache line per sum measured slower (its reader then loads xp_n lines; NOTES.md, session 9)
    if (ai) atomicAdd(a.xp_acc + j, ai);  // adding 0 changes nothing: skipped
    if (dual && ao) atomicAdd(a.xp_acc + a.xp_n + j, ao);
  }
}

// Resident blocks per SM the one-row GEMV is compiled for (register cap 65536 / (256 x this)): a one-row decode
// GEMV is latency-bound, so more resident warps keep more weight loads in flight.
#ifndef QM_GEMV_MIN_BLOCKS
#define QM_GEMV_MIN_BLOCKS 6
#endif
// The same for the two-columns-per-warp GEMV (more registers per thread: two columns' pieces in flight).
#ifndef QM_GEMV_PAIR_MIN_BLOCKS
#define QM_GEMV_PAIR_MIN_BLOCKS 5
#endif

// One output column per group of S warps (S = 1, or 4 when there are few columns, e.g. x_proj): the S warps
// split K, lanes read 16 bytes of the weight row per step (4 dp4a), partial sums meet in shared memory.
// Persistent (P): the grid is capped and each warp group walks columns n, n + grid columns, ...; the first pieces
// of its next column load before the current column's reduction. Otherwise each warp group owns CPW adjacent
// columns (CPW = 2 for one row when one column per warp would take more than one wave of blocks: every block pays
// the dependency wait and the fused RMSNorm prologue, so fewer, longer blocks; a lane keeps CPW loads in flight).
// CT > 0: the decode conv computed in front (conv_prologue), in its own instantiations with CT = 512 or 1024 threads
// per block and at most 64 registers. Every block computes all of the conv: with 256 threads a thread's share
// (1.5 groups of 4 channels at 130m, 5 at 2.8b) is a dependent chain that 8 warps cannot hide; and a block of 1024
// threads needs a whole SM's registers, so it cannot start beside the previous kernel's blocks under PDL, which
// costs where the share is small (130m B1: 512 threads 0.369 ms, 1024 0.383, 256 0.400; 2.8b B1: 2.127, 2.069,
// 2.311; NOTES.md, session 8). The columns per block grow with the warps: the same warps per column and in total.
// HM > 0: HadamardQuant (H_HM (x) H_p, HM = 1 or 12) computed in front, one row, by the hadamard8_row that
// qm_hadamard_quant runs (3 blocks per SM: 130m's out_proj, 384 blocks, in one wave; at 64 registers H_12 spilled).
// Build knobs of the session-8 sweep (H100, decode B1 ms, 130m / 2.8b; NOTES.md): one warp per column for the fused
// conv (QM_CONV_FEW_BELOW=0) 0.365 / 2.311 against 0.364 / 2.138; pairs above one block per SM
// (QM_GEMV_PAIRS_ABOVE=1) 0.365 / 2.198.
#ifndef QM_CONV_FEW_BELOW  // a fused conv: 4 warps per column below this many columns
#define QM_CONV_FEW_BELOW 2048
#endif
#ifndef QM_GEMV_L2_PREFETCH  // one row: each block asks its weight slab into L2 before its wait (1) or not (0)
#define QM_GEMV_L2_PREFETCH 1
#endif
// The two-columns-per-warp GEMV (2.8b / 1.4b in_proj): 2 = each column's row past the pieces loaded ahead is asked
// into L2 after the wait (so HBM streams during the fused norm, and not against the previous kernel's loads);
// 1 = the block's slab before the wait, as the other GEMVs; 0 = none. Decode B1 2.8b / 1.4b, ms (NOTES.md session
// 12): 0: 2.074 / 2.034, 1.168 / 1.167; 1: 2.075 / 2.042, 1.163 / 1.162; 2: 2.018 / 2.018, 1.161 / 1.163.
#ifndef QM_GEMV_PAIRS_L2_PREFETCH
#define QM_GEMV_PAIRS_L2_PREFETCH 2
#endif
#ifndef QM_GEMV_HALVES  // one row, under half a wave: two warps per column (1) or one (0)
#define QM_GEMV_HALVES 1
#endif
#ifndef QM_GEMV_PAIRS_ABOVE  // one row: 2 columns per warp above this many blocks per SM
#define QM_GEMV_PAIRS_ABOVE QM_GEMV_MIN_BLOCKS
#endif
template <int R, int S, bool P, int CPW = 1, int CT = 0, int HM = 0, bool XP = false>
__global__ void __launch_bounds__(CT > 0 ? CT : 256, CT > 0   ? 1024 / (CT > 0 ? CT : 256)
                                                     : HM > 0 ? 3
                                                     : R > 1  ? 1
                                                     : CPW > 1 || XP ? QM_GEMV_PAIR_MIN_BLOCKS
                                                               : QM_GEMV_MIN_BLOCKS)
    gemv_kernel(qm_linear_args a, Seg sg, ConvQuant cq, HadamardConsts hq) {
  constexpr bool kConv = CT > 0;
  static_assert(HM == 0 || (R == 1 && !kConv && CPW == 1 && !P), "the fused Hadamard: one row, nothing else fused");
  static_assert(CPW == 1 || (S == 1 && !P), "several columns per warp: one warp per column group, not persistent");
  static_assert(!kConv || (CPW == 1 && !P), "the fused conv runs with one column per warp group, not persistent");
  static_assert(!XP || (R == 1 && S == 1 && !P && !kConv && HM == 0), "the tail: one row, one warp per column group");
  constexpr int kThreads = kConv ? CT : 256, kWarps = kThreads / 32, kCols = kWarps / S * CPW;
  __shared__ int part[kWarps][R][2];
  __shared__ __align__(16) int8_t tail_x[XP ? kCols : 16];  // the block's segment-0 codes (the tail's conv input)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slice = warp % S;
  const int chunks = a.k / 16;  // 16-byte pieces of a row
  const int col_step = static_cast<int>(gridDim.x) * kCols;
  extern __shared__ int4 xs_norm[];  // rows x k codes when RMSNormQuant (or the conv: then also its mask) is fused in
  const int8_t* xsrc = a.x;
  const uint8_t* msrc = a.x_mask;
  const bool masked = kConv ? a.conv_dual_scale != 0 : a.x_mask != nullptr;
  // one 16-byte piece j of x (and of its mask) against the same piece of each of the CPW weight rows
  auto step = [&](const int4 (&wv)[CPW], int j, int (&acc_in)[CPW][R], int (&acc_out)[CPW][R]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= a.rows) break;
      const int4 xv = reinterpret_cast<const int4*>(xsrc + static_cast<int64_t>(r) * a.k)[j];
      const int xx[4] = {xv.x, xv.y, xv.z, xv.w};
      if (masked) {  // bytes are 0/1: times 0xff makes a byte mask (no carries)
        const int4 mv4 = reinterpret_cast<const int4*>(msrc + static_cast<int64_t>(r) * a.k)[j];
        const unsigned mm[4] = {static_cast<unsigned>(mv4.x) * 0xffu, static_cast<unsigned>(mv4.y) * 0xffu,
                                static_cast<unsigned>(mv4.z) * 0xffu, static_cast<unsigned>(mv4.w) * 0xffu};
#pragma unroll
        for (int c = 0; c < CPW; ++c) {
          const int ww[4] = {wv[c].x, wv[c].y, wv[c].z, wv[c].w};
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            acc_in[c][r] = __dp4a(static_cast<int>(static_cast<unsigned>(xx[q]) & ~mm[q]), ww[q], acc_in[c][r]);
            acc_out[c][r] = __dp4a(static_cast<int>(static_cast<unsigned>(xx[q]) & mm[q]), ww[q], acc_out[c][r]);
          }
        }
      } else {
#pragma unroll
        for (int c = 0; c < CPW; ++c) {
          const int ww[4] = {wv[c].x, wv[c].y, wv[c].z, wv[c].w};
#pragma unroll
          for (int q = 0; q < 4; ++q) acc_in[c][r] = __dp4a(xx[q], ww[q], acc_in[c][r]);
        }
      }
    }
  };
  constexpr int kPre = 4 / CPW;  // 16-byte pieces per lane loaded ahead, per column (the same bytes in flight)
  const int j0 = slice * 32 + lane, stride = 32 * S;
  int4 pre[CPW][kPre];
  auto prefetch = [&](int n0) {
#pragma unroll
    for (int c = 0; c < CPW; ++c) {
      const int n = n0 + c < a.n ? n0 + c : n0;  // as in the main loop: a missing second column rereads the first
      const int4* w = reinterpret_cast<const int4*>(a.w + static_cast<int64_t>(n) * a.k);
#pragma unroll
      for (int u = 0; u < kPre; ++u)
        pre[c][u] = n < a.n && j0 + u * stride < chunks ? w[j0 + u * stride] : make_int4(0, 0, 0, 0);
    }
  };
  // the first pieces load before waiting for the previous kernel (weights are constant)
  prefetch(static_cast<int>(blockIdx.x) * kCols + warp / S * CPW);
#if QM_GEMV_L2_PREFETCH && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // one row, rows longer than those pieces: the block's whole slab (its columns' rows are contiguous) is asked into
  // L2 now, so HBM streams it during the wait and the fused prologue instead of after them
  if (R == 1 && !P && (CPW == 1 || QM_GEMV_PAIRS_L2_PREFETCH == 1) && threadIdx.x == 0 && chunks > kPre * 32 * S) {
    const int n0 = static_cast<int>(blockIdx.x) * kCols;
    const int cols = min(kCols, a.n - n0);
    if (cols > 0)
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(a.w + static_cast<int64_t>(n0) * a.k),
                   "r"(static_cast<unsigned>(cols) * static_cast<unsigned>(a.k)) : "memory");
  }
#endif
  // so do the lines of the first columns' multipliers and of one row's norm weights, into L1 by prefetches (they
  // hold no register): at decode they come from HBM, and those round trips would follow the wait
  if (lane == 0 && slice == 0)
#pragma unroll
    for (int c = 0; c < CPW; ++c) {
      const int n = min(static_cast<int>(blockIdx.x) * kCols + warp / S * CPW + c, a.n - 1);
      asm volatile("prefetch.global.L1 [%0];" ::"l"(a.m_in + n));
      if (masked) asm volatile("prefetch.global.L1 [%0];" ::"l"(a.m_out + n));
    }
  if (R == 1 && a.norm_x)
    for (int i = threadIdx.x * 32; i < a.k; i += kThreads * 32)
      asm volatile("prefetch.global.L1 [%0];" ::"l"(a.norm_w + i));
  // the residual of the columns this lane finishes (a.early_residual: the caller asserts that no kernel still running
  // writes it), from L2 (no stale L1 line), so that its round trip is not the kernel's last; kept in shared memory
  // (in registers through the main loop it made the one-row GEMVs spill)
  constexpr bool kMayEarly = R == 1 && !P && !kConv && !XP;
  const bool early_res = kMayEarly && a.early_residual;
  __shared__ float res_early[kMayEarly ? kWarps * CPW : 1];
  if (early_res && slice == 0 && lane == 0)
#pragma unroll
    for (int c = 0; c < CPW; ++c) {
      const int n = static_cast<int>(blockIdx.x) * kCols + warp / S * CPW + c;
      res_early[warp * CPW + c] = n < a.n ? __ldcg(a.residual + n) : 0.f;  // read back by this lane only
    }
  ConvEarly<R> conv_early;
  if constexpr (kConv) conv_prologue_early<R, kThreads>(a, conv_early);
  const int tail_base = static_cast<int>(blockIdx.x) * kCols;
  const bool tail = XP && tail_base < sg.end[0];  // block-uniform: segment 0's width is a multiple of kCols
  int tail_st[1][3] = {{0, 0, 0}};
  if constexpr (XP) {
    if (tail) {
      tail_prefetch(a, tail_base, sg.end[0]);
      if (a.conv_early_state && threadIdx.x < kCols / 4) conv_load_state<1>(a, tail_base / 4 + threadIdx.x, tail_st);
    }
  }
  qm::wait_for_inputs();
  qm::allow_dependents();
#if QM_GEMV_PAIRS_L2_PREFETCH == 2 && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // the two-columns-per-warp GEMV: each column's row past the pieces already in registers is asked into L2 now,
  // after the wait (before it, the requests compete with the previous kernel's loads), so that HBM streams it
  // during the fused prologue
  if (CPW > 1 && R == 1 && !P && static_cast<int>(threadIdx.x) < kCols && chunks > kPre * 32 * S) {
    const int n = static_cast<int>(blockIdx.x) * kCols + static_cast<int>(threadIdx.x);
    const int skip = kPre * 32 * S * 16;  // bytes of the row loaded ahead
    if (n < a.n)
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(a.w + static_cast<int64_t>(n) * a.k + skip),
                   "r"(static_cast<unsigned>(a.k - skip)) : "memory");
  }
#endif
  if (a.clear)
    for (int i = static_cast<int>(blockIdx.x) * kThreads + static_cast<int>(threadIdx.x); i < a.clear_n;
         i += static_cast<int>(gridDim.x) * kThreads)
      a.clear[i] = 0;
  if constexpr (kConv) {
    int* xs = reinterpret_cast<int*>(xs_norm);
    int* ms = xs + R * a.k / 4;
    if (a.conv_dual_scale)
      conv_prologue<R, kThreads, true>(a, cq, conv_early, xs, ms);
    else
      conv_prologue<R, kThreads, false>(a, cq, conv_early, xs, ms);
    xsrc = reinterpret_cast<const int8_t*>(xs);
    msrc = reinterpret_cast<const uint8_t*>(ms);
  } else if constexpr (HM > 0) {  // the row's codes, then k floats and k bytes of the Hadamard's scratch
    int8_t* xs = reinterpret_cast<int8_t*>(xs_norm);
    hadamard8_row<float, HM, true, 32, true>(a.had_x, xs, reinterpret_cast<float4*>(xs_norm + a.k / 16), a.k, hq.lp,
                                             hq.c, a.had_scale, hq.inv_scale, hq.fast);
    __syncthreads();
    xsrc = xs;
  } else if (a.norm_x) {
    norm_prologue<R, (CPW > 1 ? 5 : 2)>(a, reinterpret_cast<int8_t*>(xs_norm));
    xsrc = reinterpret_cast<const int8_t*>(xs_norm);
  }
  for (int base = static_cast<int>(blockIdx.x) * kCols; base < a.n; base += col_step) {  // block-uniform trip count
    const int n0 = base + warp / S * CPW;
    int acc_in[CPW][R], acc_out[CPW][R];
#pragma unroll
    for (int c = 0; c < CPW; ++c)
#pragma unroll
      for (int r = 0; r < R; ++r) acc_in[c][r] = acc_out[c][r] = 0;
    if (n0 < a.n) {
      // a last odd column: the second slot rereads the first column's row and its sums are dropped
      const int64_t second = CPW > 1 && n0 + 1 < a.n ? chunks : 0;
#pragma unroll
      for (int u = 0; u < kPre; ++u)
        if (j0 + u * stride < chunks) {
          int4 wv[CPW];
#pragma unroll
          for (int c = 0; c < CPW; ++c) wv[c] = pre[c][u];
          step(wv, j0 + u * stride, acc_in, acc_out);
        }
      const int4* w0 = reinterpret_cast<const int4*>(a.w + static_cast<int64_t>(n0) * a.k);
#pragma unroll(4 / CPW)
      for (int j = j0 + kPre * stride; j < chunks; j += stride) {
        int4 wv[CPW];
#pragma unroll
        for (int c = 0; c < CPW; ++c) wv[c] = w0[c * second + j];  // column n0 + 1's row follows n0's
        step(wv, j, acc_in, acc_out);
      }
    }
    if (P) prefetch(n0 + col_step);
#pragma unroll
    for (int c = 0; c < CPW; ++c) {
      const int n = n0 + c;
      const bool active = n < a.n;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        for (int off = 16; off > 0; off >>= 1) {
          acc_in[c][r] += __shfl_xor_sync(0xffffffffu, acc_in[c][r], off);
          if (masked) acc_out[c][r] += __shfl_xor_sync(0xffffffffu, acc_out[c][r], off);
        }
        if (S > 1 && lane == 0) {
          part[warp][r][0] = acc_in[c][r];
          part[warp][r][1] = acc_out[c][r];
        }
      }
      if (S > 1) __syncthreads();
      if (active && slice == 0 && lane < R && lane < a.rows) {
        const int r = lane;  // lane r of the column's first warp finishes row r
        int ai = 0, ao = 0;
        if (S > 1) {
          for (int t = 0; t < S; ++t) {
            ai += part[warp + t][r][0];
            ao += part[warp + t][r][1];
          }
        } else {
#pragma unroll
          for (int q = 0; q < R; ++q)
            if (q == r) ai = acc_in[c][q], ao = acc_out[c][q];
        }
        const float y = dequant(a, masked, n, ai, ao);
        if (early_res)  // one float segment: out = residual + y, as store() computes it
          static_cast<float*>(sg.out[0])[n] = __fadd_rn(res_early[warp * CPW + c], y);
        else
          store(sg, a, r, n, y);
        if (XP && tail) tail_x[n - tail_base] = qm::quantize(y, sg.scale[0]);  // the code store() wrote
      }
    }
    if (P && S > 1) __syncthreads();  // part[] is rewritten by the next column
  }
  if constexpr (XP) {
    __syncthreads();
    if (tail) conv_xproj_tail<kCols>(a, cq, tail_base, sg.end[0], tail_x, tail_st);
  }
}

// Resident blocks per SM of the persistent GEMV, used for 2-4 rows: there the fused RMSNormQuant prologue of 4 rows
// is dear and runs once per resident block instead of once per 8 columns (2.8b in_proj B4: 40.7 -> 31.0 us on the
// H100). For 1 row the one-column-per-warp grid is as fast or faster (bench/NOTES.md, 2026-11-25).
#ifndef QM_GEMV_BLOCKS_PER_SM
#define QM_GEMV_BLOCKS_PER_SM 4
#endif
}  // namespace

extern "C" int qm_int8_linear(const qm_linear_args* a, cudaStream_t stream) {
  QM_CHECK_ARG(a, "qm_int8_linear: args must be non-null");
  QM_CHECK_ARG(a->rows > 0 && a->k > 0 && a->n > 0, "qm_int8_linear: rows=%d k=%d n=%d must be positive", a->rows,
               a->k, a->n);
  QM_CHECK_ARG(a->m_in && (!a->x_mask || a->m_out), "qm_int8_linear: m_in (and m_out with a mask) must be non-null");
  QM_CHECK_ARG(a->n_seg >= 1 && a->n_seg <= 3, "qm_int8_linear: n_seg=%d must be 1..3", a->n_seg);
  Seg sg{};
  sg.n = a->n_seg;
  for (int s = 0; s < a->n_seg; ++s) {
    QM_CHECK_ARG(a->seg_out[s], "qm_int8_linear: segment %d output is null", s);
    QM_CHECK_ARG(a->seg_end[s] > (s ? a->seg_end[s - 1] : 0), "qm_int8_linear: segment ends must increase");
    QM_CHECK_ARG(a->seg_scale[s] == 0.f || QM_VALID_SCALE(a->seg_scale[s]),
                 "qm_int8_linear: segment %d scale must be positive and finite (0: float output)", s);
    sg.end[s] = a->seg_end[s];
    sg.scale[s] = a->seg_scale[s];
    sg.out[s] = a->seg_out[s];
  }
  QM_CHECK_ARG(sg.end[sg.n - 1] == a->n, "qm_int8_linear: the last segment must end at n=%d", a->n);
  QM_CHECK_ARG(!a->residual || (sg.n == 1 && sg.scale[0] == 0.f), "qm_int8_linear: residual needs one float segment");
  QM_CHECK_ARG(a->early_residual == 0 || (a->early_residual == 1 && a->residual && a->rows == 1 && !a->acc_in),
               "qm_int8_linear: early_residual=%d must be 0, or 1 with a residual, one row and the GEMV (no acc_in)",
               a->early_residual);
  const int threads = 256;
  if (a->acc_in) {
    QM_CHECK_ARG(!a->x_mask || a->acc_out, "qm_int8_linear: a masked input needs acc_out");
    const int64_t total = static_cast<int64_t>(a->rows) * a->n;
    QM_CHECK_ARG(!a->conv_x && !a->had_x && !a->xp_acc && !a->clear,
                 "qm_int8_linear: a fused conv, Hadamard, xp_acc or clear needs the GEMV, not acc_in");
    QM_CHECK_LAUNCHED(qm::launch(epilogue_kernel, dim3(static_cast<unsigned>((total + threads - 1) / threads)),
                                 dim3(threads), 0, stream, *a, sg),
                      "qm_int8_linear epilogue launch");
    return QM_OK;
  }
  const bool conv = a->conv_x != nullptr, xp = a->xp_acc != nullptr;
  QM_CHECK_ARG(!a->clear == (a->clear_n == 0) && a->clear_n >= 0 && qm::aligned(a->clear, 4),
               "qm_int8_linear: clear (4-byte aligned) needs clear_n > 0 and clear_n=%d needs clear", a->clear_n);
  if (xp) {
    const int width = sg.end[0];
    QM_CHECK_ARG(a->rows == 1 && !a->had_x, "qm_int8_linear: the conv and x_proj behind (xp_acc) take one row and no "
                 "fused Hadamard, got rows=%d", a->rows);
    QM_CHECK_ARG(sg.scale[0] > 0.f && width % 16 == 0 && a->conv_in_scale == sg.scale[0],
                 "qm_int8_linear: the conv behind (xp_acc) takes segment 0 as int8 codes of a width %% 16 == 0 "
                 "(got %d) at conv_in_scale == seg_scale[0]", width);
    QM_CHECK_ARG(a->xp_w && a->xp_n > 0 && qm::aligned(a->xp_w) && qm::aligned(a->xp_acc, 4),
                 "qm_int8_linear: xp_acc needs xp_w (16-byte aligned), xp_n > 0 (got %d) and a 4-byte aligned xp_acc",
                 a->xp_n);
  } else {
    QM_CHECK_ARG(!a->xp_w && a->xp_n == 0, "qm_int8_linear: xp_w / xp_n without xp_acc");
  }
  ConvQuant cq{};
  if (conv || xp) {
    if (conv)
      QM_CHECK_ARG(!a->x && !a->x_mask && !a->norm_x && !xp, "qm_int8_linear: with a fused conv (conv_x) x, x_mask, "
                   "norm_x and xp_acc must be NULL (the conv computes x)");
    QM_CHECK_ARG(a->conv_w && a->conv_w_scale && a->conv_bias && a->conv_state && a->conv_u,
                 "qm_int8_linear: a fused conv needs conv_w, conv_w_scale, conv_bias, conv_state and conv_u");
    QM_CHECK_ARG(a->conv_dual_scale == 0 || a->conv_dual_scale == 1, "qm_int8_linear: conv_dual_scale=%d must be "
                 "0 or 1", a->conv_dual_scale);
    QM_CHECK_ARG(a->conv_early_state == 0 || a->conv_early_state == 1, "qm_int8_linear: conv_early_state=%d must "
                 "be 0 or 1", a->conv_early_state);
    QM_CHECK_ARG((a->conv_mask != nullptr) == (a->conv_dual_scale == 1) && (!a->conv_dual_scale || a->m_out || xp),
                 "qm_int8_linear: conv_mask (and m_out) must be non-null exactly when conv_dual_scale=1");
    QM_CHECK_ARG(QM_VALID_SCALE(a->conv_in_scale) && QM_VALID_SCALE(a->conv_out_scale) &&
                 (!a->conv_dual_scale || QM_VALID_SCALE(a->conv_outlier_scale)),
                 "qm_int8_linear: the conv scales must be positive and finite");
    QM_CHECK_ARG(qm::aligned(a->conv_w) && qm::aligned(a->conv_w_scale) && qm::aligned(a->conv_bias) &&
                     qm::aligned(a->conv_x, 4) && qm::aligned(a->conv_state, 4) && qm::aligned(a->conv_u, 4) &&
                     qm::aligned(a->conv_mask, 4),
                 "qm_int8_linear: a fused conv needs 16-byte aligned conv_w, conv_w_scale, conv_bias and 4-byte "
                 "aligned conv_x, conv_state, conv_u, conv_mask");
    cq = make_conv_quant(a->conv_out_scale, a->conv_outlier_scale, a->conv_dual_scale == 1);
  }
  if (conv)
    QM_CHECK_ARG(a->k % 16 == 0 && a->k <= (a->rows <= 1 ? 24576 : 6144),
                 "qm_int8_linear: a fused conv needs k %% 16 == 0 and k <= 6144 (24576 for one row), k=%d", a->k);
  const bool had = a->had_x != nullptr;
  HadamardConsts hq{};
  int had_m = 0, had_p = 0;
  bool had_slab = false;  // above k = 2048: the weights wait in shared memory (hadamard_slab.cu)
  if (had) {
    QM_CHECK_ARG(!a->x && !a->x_mask && !a->norm_x && !conv, "qm_int8_linear: with a fused Hadamard (had_x) x, "
                 "x_mask, norm_x and conv_x must be NULL");
    QM_CHECK_ARG(a->rows == 1, "qm_int8_linear: a fused Hadamard takes one row, got rows=%d", a->rows);
    QM_CHECK_ARG(QM_VALID_SCALE(a->had_scale), "qm_int8_linear: had_scale must be positive and finite");
    const bool fits = factor(a->k, &had_m, &had_p) && had_p >= 8 && qm::aligned(a->had_x);
    had_slab = a->k > 2048;
    QM_CHECK_ARG(fits && (had_slab ? a->k <= 6144 && sg.n == 1 && sg.scale[0] == 0.f : had_m == 1 || had_m == 12),
                 "qm_int8_linear: a fused Hadamard needs a 16-byte aligned had_x and k = m * 2^j, 2^j >= 8: m 1 or 12 "
                 "up to k = 2048, or m 1, 12, 20 or 28 up to k = 6144 with one float32 segment (k=%d)", a->k);
    hq = hadamard_consts(a->k, had_p, a->had_scale);
  }
  const bool norm = a->norm_x != nullptr;
  QM_CHECK_ARG(!norm || (!a->acc_in && !a->x_mask && a->norm_w && QM_VALID_SCALE(a->norm_scale) &&
                         isfinite(a->norm_eps) && a->norm_eps > 0.f && a->k <= 8192),
               "qm_int8_linear: a fused RMSNormQuant needs the GEMV (no acc_in), no x_mask, norm_w, a positive "
               "finite norm_scale and norm_eps, and k <= 8192 (k=%d)", a->k);
  QM_CHECK_ARG((a->x || norm || conv || had) && a->w,
               "qm_int8_linear: without acc_in, x (or norm_x) and w must be non-null (GEMV)");
  QM_CHECK_ARG(a->rows <= kMaxGemvRows, "qm_int8_linear: the GEMV takes rows <= %d, got %d (pass acc_in)",
               kMaxGemvRows, a->rows);
  QM_CHECK_ARG(a->k % 16 == 0 && reinterpret_cast<uintptr_t>(a->x) % 16 == 0 &&
               reinterpret_cast<uintptr_t>(a->w) % 16 == 0 && reinterpret_cast<uintptr_t>(a->x_mask) % 16 == 0,
               "qm_int8_linear: the GEMV needs k %% 16 == 0 and 16-byte aligned x, w, mask (k=%d)", a->k);
  if (had_slab) return qm::launch_hadamard_slab(a, had_m, had_p, stream);
  // few columns: 4 warps share each column's K. Not with a fused Hadamard: one warp per column makes 4x fewer blocks,
  // so 4x fewer copies of the row's transform (130m B1 0.384 -> 0.360 ms, NOTES.md session 8)
  // and not with the conv behind: its channel groups of 4 must not straddle blocks
  const bool few = !had && !xp && a->n < (conv ? QM_CONV_FEW_BELOW : 2048);
  // a fused conv: 1024 threads where the rows have more than 512 groups of 4 channels (one round per thread), else 512
  const int conv_threads = !conv ? 0 : a->rows <= 1 && a->k / 4 > 512 ? 1024 : 512;
  const int cols = (few ? 2 : 8) * (conv ? conv_threads / 256 : 1);  // per block
  const int64_t needed = (a->n + cols - 1) / cols;
  const int64_t cap = int64_t{QM_GEMV_BLOCKS_PER_SM} * qm::sm_count();
  const bool persistent = !conv && a->rows > 1 && needed > cap;
  // one row, many columns: 2 columns per warp when one per warp needs more than one wave of resident blocks
  const bool pairs = !conv && !had && a->rows <= 1 && !few && needed > int64_t{QM_GEMV_PAIRS_ABOVE} * qm::sm_count();
  // one row, a plain GEMV whose one-warp-per-column grid fills at most half a wave of resident blocks (2.8b out_proj:
  // 320 blocks for 6 x 132 slots): two warps share each column's K, twice the blocks and the loads in flight
  const bool halves = QM_GEMV_HALVES && !conv && !had && !xp && !norm && a->rows <= 1 && !few && !pairs &&
                      2 * needed <= int64_t{QM_GEMV_MIN_BLOCKS} * qm::sm_count();
  const int block_cols = pairs ? 2 * cols : halves ? cols / 2 : cols;
  const unsigned blocks = static_cast<unsigned>(persistent ? cap : (a->n + block_cols - 1) / block_cols);
  // the fused prologue's codes (and the conv's mask) in shared memory: <= 48 KiB, no opt-in needed
  const size_t smem = had ? 6 * static_cast<size_t>(a->k)  // codes, then the Hadamard's k floats and k bytes
                    : norm || conv ? static_cast<size_t>(a->rows <= 1 ? 1 : 4) * a->k * (conv ? 2 : 1) : 0;
  auto kernel = xp             ? (pairs ? gemv_kernel<1, 1, false, 2, 0, 0, true>
                                        : gemv_kernel<1, 1, false, 1, 0, 0, true>)
               : had            ? (had_m == 12 ? gemv_kernel<1, 1, false, 1, 0, 12> : gemv_kernel<1, 1, false, 1, 0, 1>)
               : conv           ? (a->rows > 1             ? (few ? gemv_kernel<4, 4, false, 1, 512>
                                                                 : gemv_kernel<4, 1, false, 1, 512>)
                                  : conv_threads == 1024 ? (few ? gemv_kernel<1, 4, false, 1, 1024>
                                                                 : gemv_kernel<1, 1, false, 1, 1024>)
                                                          : (few ? gemv_kernel<1, 4, false, 1, 512>
                                                                 : gemv_kernel<1, 1, false, 1, 512>))
               : a->rows <= 1 ? (few      ? gemv_kernel<1, 4, false>
                                 : pairs  ? gemv_kernel<1, 1, false, 2>
                                 : halves ? gemv_kernel<1, 2, false>
                                          : gemv_kernel<1, 1, false>)
               : persistent   ? (few ? gemv_kernel<4, 4, true> : gemv_kernel<4, 1, true>)
                              : (few ? gemv_kernel<4, 4, false> : gemv_kernel<4, 1, false>);
  if (conv && smem > 32768)  // with the kernel's static shared memory, beyond the 48 KiB that needs no opt-in
    QM_CHECK_LAUNCHED(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
                      "cudaFuncSetAttribute(qm_int8_linear fused conv shared memory)");
  QM_CHECK_LAUNCHED(qm::launch(kernel, dim3(blocks), dim3(conv ? conv_threads : threads), smem, stream, *a, sg, cq, hq),
                    "qm_int8_linear gemv launch");
  return QM_OK;
}
