// QuantCausalConv1d (spec 4.3, 4.5): int32 taps; the spec's float64 SiLU where a float32 one could round differently.
// The new conv state (the last K-1 tokens of concat(state, x)): the tile kernel (K = 4) writes it from its first tile,
// whose threads alone read the old state; the generic path writes it by a second kernel after the first has read the
// old state, one thread per (b, d). Either way state_out may alias state_in.
#include "common.cuh"
#include "conv_decode.cuh"

namespace {
constexpr int kMaxK = 8;

__device__ __forceinline__ int8_t tap(const int8_t* x, const int8_t* state, int b, int t, int d, int L, int D,
                                      int km1) {
  // element t of concat(state, x) along time, t in [0, K-1+L)
  if (t < km1) return state ? state[(static_cast<int64_t>(b) * D + d) * km1 + t] : 0;
  return x[(static_cast<int64_t>(b) * L + (t - km1)) * D + d];
}

__device__ __forceinline__ bool finish_fast(float v, const ConvQuant& q, int8_t& u_out, uint8_t& mask_out) {
  int bits;
  bool outlier;
  const bool certain = q.dual ? code_fast<true>(v, q.inv_out, q.inv_outlier, bits, outlier)
                              : code_fast<false>(v, q.inv_out, q.inv_outlier, bits, outlier);
  u_out = static_cast<int8_t>(bits);
  mask_out = outlier ? 1 : 0;
  return q.fast && certain;
}

__device__ __forceinline__ void finish(float v, const ConvQuant& q, int8_t& u_out, uint8_t& mask_out) {
  if (!finish_fast(v, q, u_out, mask_out)) finish_exact(v, q.out_scale, q.outlier_scale, q.dual, u_out, mask_out);
}

__device__ __forceinline__ void conv_channel(const int8_t* __restrict__ x, const int8_t* __restrict__ w,
                                             const float* __restrict__ ws, const float* __restrict__ bias,
                                             const int8_t* state, int b, int t, int d, int L, int D, int K,
                                             float in_scale, const ConvQuant& q, int8_t& u_out, uint8_t& mask_out) {
  int acc = 0;  // output t reads elements t .. t + K - 1 of concat(state, x)
  for (int k = 0; k < K; ++k) acc += static_cast<int>(tap(x, state, b, t + k, d, L, D, K - 1)) * w[d * K + k];
  const float m = qm::scale_product(in_scale, ws[d]);
  finish(__fadd_rn(__fmul_rn(static_cast<float>(acc), m), bias[d]), q, u_out, mask_out);
}

// One output element from global memory through finish(): the tile kernel's out-of-line path for the rare elements
// whose float32 code is not certain (kept out of the unrolled tile so the common path stays short and branch-free).
__device__ __noinline__ void conv_element(const int8_t* x, const int8_t* w, const float* ws, const float* bias,
                                          const int8_t* state, int b, int t, int d, int L, int D, int K,
                                          float in_scale, ConvQuant q, int8_t* u, uint8_t* mask) {
  int8_t uo;
  uint8_t mo;
  conv_channel(x, w, ws, bias, state, b, t, d, L, D, K, in_scale, q, uo, mo);
  const int64_t e = (static_cast<int64_t>(b) * L + t) * D + d;
  u[e] = uo;
  if (mask) mask[e] = mo;
}

// Fast path (K = 4, D % 4 == 0, scales with accurate reciprocals): block = up to kTileMaxThreads threads (tile_threads)
// x 4 channels x kTile tokens of one batch row. A thread loads its kTaps - 1 + kTile token rows of 4 channel bytes,
// transposes them to 3 words per channel (byte i of channel j's word stream = token row i), and takes each output's
// int32 sum as one dp4a of a 4-byte window of that stream with the channel's 4 weight bytes (one int load: the weight
// row of a channel is its K taps).
constexpr int kTile = 8, kTaps = 4, kTileThreads = 256, kTileMaxThreads = 512;
static_assert(kTaps == 4 && kTile == 8, "the byte transpose below is written for 4 taps and 8 tokens");

__device__ __forceinline__ int pack_bytes(int8_t a, int8_t b, int8_t c, int8_t d) {
  return static_cast<int>(static_cast<uint8_t>(a) | static_cast<uint8_t>(b) << 8 | static_cast<uint8_t>(c) << 16 |
                          static_cast<uint32_t>(static_cast<uint8_t>(d)) << 24);
}

template <bool kDual>
__global__ void __launch_bounds__(kTileMaxThreads) conv_tile_kernel(
    const int8_t* __restrict__ x, const int8_t* __restrict__ w, const float* __restrict__ ws,
    const float* __restrict__ bias, const int8_t* state, int8_t* __restrict__ u, uint8_t* __restrict__ mask,
    int8_t* state_out, int L, int D, float in_scale, ConvQuant q, bool early_state) {
  const int b = blockIdx.z, t0 = blockIdx.x * kTile;
  const int d0 = (blockIdx.y * blockDim.x + threadIdx.x) * 4;
  if (d0 >= D) return;
  const int8_t* xb = x + static_cast<int64_t>(b) * L * D + d0;
  int wt[4];  // weights first: they are constant, so they may load before the previous kernel is done
  float m[4], bs[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    wt[j] = *reinterpret_cast<const int*>(w + (d0 + j) * kTaps);
    m[j] = qm::scale_product(in_scale, ws[d0 + j]);
    bs[j] = bias[d0 + j];
  }
  // token i of the conv state (0 .. kTaps - 2, oldest first) for the thread's 4 channels, byte j = channel d0 + j
  auto state_row = [&](int i) {
    const int8_t* sb = state + (static_cast<int64_t>(b) * D + d0) * (kTaps - 1) + i;
    return pack_bytes(sb[0], sb[kTaps - 1], sb[2 * (kTaps - 1)], sb[3 * (kTaps - 1)]);
  };
  int early[kTaps - 1] = {0, 0, 0};  // decode with early_state: the state's rows, read before the wait
  const bool early_rows = early_state && state && L == 1;
  if (early_rows)
#pragma unroll
    for (int i = 0; i < kTaps - 1; ++i) early[i] = state_row(i);
  qm::wait_for_inputs();
  qm::allow_dependents();
  int rows[12];  // token rows t0 - 3 .. t0 + 8 (the last is padding), byte j = channel d0 + j
  if (t0 >= kTaps - 1 && t0 + kTile <= L) {  // interior tile (all but the first and a partial last): no checks
    const int8_t* p = xb + static_cast<int64_t>(t0 - (kTaps - 1)) * D;
#pragma unroll
    for (int i = 0; i < kTaps - 1 + kTile; ++i, p += D) rows[i] = *reinterpret_cast<const int*>(p);
  } else {
#pragma unroll
    for (int i = 0; i < kTaps - 1; ++i) {  // the K-1 tokens before the tile: x, the conv state, or zeros
      const int src = t0 - (kTaps - 1) + i;
      if (src >= 0) {
        rows[i] = *reinterpret_cast<const int*>(xb + static_cast<int64_t>(src) * D);
      } else if (early_rows) {
        rows[i] = early[i];
      } else if (state) {
        rows[i] = state_row(kTaps - 1 + src);
      } else {
        rows[i] = 0;
      }
    }
#pragma unroll
    for (int i = 0; i < kTile; ++i)
      rows[kTaps - 1 + i] = t0 + i < L ? *reinterpret_cast<const int*>(xb + static_cast<int64_t>(t0 + i) * D) : 0;
  }
  rows[11] = 0;
  int cols[3][4];  // cols[g][j]: tokens 4g .. 4g + 3 of channel j
#pragma unroll
  for (int g = 0; g < 3; ++g) qm::transpose4x4(*reinterpret_cast<const int(*)[4]>(&rows[4 * g]), cols[g]);
  int8_t* ub = u + static_cast<int64_t>(b) * L * D + d0;
  uint8_t* mb = kDual ? mask + static_cast<int64_t>(b) * L * D + d0 : nullptr;
  unsigned pending = 0;  // bit 4 i + j: element (token t0 + i, channel d0 + j) needs the exact path
  static_assert(kTile * 4 <= 32, "one bit per element of the tile");
#pragma unroll
  for (int i = 0; i < kTile; ++i) {
    if (t0 + i >= L) break;
    int bits[4];
    bool outlier[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int window = i % 4 == 0 ? cols[i / 4][j] : __funnelshift_r(cols[i / 4][j], cols[i / 4 + 1][j], 8 * (i % 4));
      // the sum (|acc| <= 2^16) added to kRound's bits is the float kRound + acc: fl(acc) without I2F
      const float acc = __fsub_rn(__int_as_float(__dp4a(window, wt[j], __float_as_int(qm::kRound))), qm::kRound);
      const bool ok =
          code_fast<kDual>(__fadd_rn(__fmul_rn(acc, m[j]), bs[j]), q.inv_out, q.inv_outlier, bits[j], outlier[j]);
      pending |= ok ? 0u : 1u << (4 * i + j);
    }
    const int64_t e = static_cast<int64_t>(t0 + i) * D;
    *reinterpret_cast<int*>(ub + e) = static_cast<int>(
        __byte_perm(__byte_perm(bits[0], bits[1], 0x40), __byte_perm(bits[2], bits[3], 0x40), 0x5410));
    if (kDual)
      *reinterpret_cast<uchar4*>(mb + e) = make_uchar4(outlier[0], outlier[1], outlier[2], outlier[3]);
  }
  while (pending) {  // rare (about 2e-4 of elements): rewrite them exactly, reading the old state from memory
    const int bit = __ffs(static_cast<int>(pending)) - 1;
    pending &= pending - 1;
    conv_element(x, w, ws, bias, state, b, t0 + bit / 4, d0 + bit % 4, L, D, kTaps, in_scale, q, u, mask);
  }
  // The new state (tokens L .. L + K - 2 of concat(state, x)), by the first tile's threads: they alone read the old
  // state (tokens before 0; the exact path's reads too), each for its own 4 channels, so writing it after every read
  // is safe when state_out aliases the old state. One launch instead of a second kernel.
  if (state_out != nullptr && t0 == 0) {
    int nrow[kTaps - 1];
#pragma unroll
    for (int k = 0; k < kTaps - 1; ++k) {
      const int src = L - (kTaps - 1) + k;  // x's token, or the old state's token K - 1 + src when negative
      if (L == 1)
        nrow[k] = rows[k + 1];  // decode: the tile's rows already hold them (the early rows included)
      else if (src >= 0)
        nrow[k] = *reinterpret_cast<const int*>(xb + static_cast<int64_t>(src) * D);
      else
        nrow[k] = state ? state_row(kTaps - 1 + src) : 0;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      int8_t* so = state_out + (static_cast<int64_t>(b) * D + d0 + j) * (kTaps - 1);
#pragma unroll
      for (int k = 0; k < kTaps - 1; ++k) so[k] = static_cast<int8_t>(nrow[k] >> (8 * j));
    }
  }
}

// One block per (token, 1024-channel tile); each thread owns 4 consecutive channels of one token (char4 loads
// and stores when D % 4 == 0 and the pointers are aligned): any K, any alignment.
constexpr int kConvThreads = 256, kConvVec = 4;

__global__ void __launch_bounds__(kConvThreads) conv_kernel(
    const int8_t* __restrict__ x, const int8_t* __restrict__ w, const float* __restrict__ ws,
    const float* __restrict__ bias, const int8_t* state, int8_t* __restrict__ u, uint8_t* __restrict__ mask,
    int8_t* state_out, int L, int D, int K, float in_scale, ConvQuant q, bool vec) {
  const int64_t row = blockIdx.x;  // token b * L + t
  const int b = static_cast<int>(row / L), t = static_cast<int>(row % L);
  const int d0 = (blockIdx.y * kConvThreads + threadIdx.x) * kConvVec;
  if (d0 >= D) return;
  const bool dual = q.dual;
  int8_t uo[kConvVec];
  uint8_t mo[kConvVec];
#pragma unroll
  for (int j = 0; j < kConvVec; ++j)
    if (d0 + j < D)
      conv_channel(x, w, ws, bias, state, b, t, d0 + j, L, D, K, in_scale, q, uo[j], mo[j]);
  if (state_out != nullptr) {  // L == 1 (decode): this thread alone reads and writes its channels' state rows
    const int km1 = K - 1;
    for (int j = 0; j < kConvVec && d0 + j < D; ++j) {
      const int64_t srow = (static_cast<int64_t>(b) * D + d0 + j) * km1;
      const int8_t xv = x[row * D + d0 + j];
      for (int q = 0; q < km1 - 1; ++q) state_out[srow + q] = state ? state[srow + q + 1] : 0;
      state_out[srow + km1 - 1] = xv;
    }
  }
  const int64_t e = row * D + d0;
  if (vec) {  // D % 4 == 0: the 4 channels are in range and 4-byte aligned
    *reinterpret_cast<char4*>(u + e) = make_char4(uo[0], uo[1], uo[2], uo[3]);
    if (dual) *reinterpret_cast<uchar4*>(mask + e) = make_uchar4(mo[0], mo[1], mo[2], mo[3]);
    return;
  }
  for (int j = 0; j < kConvVec && d0 + j < D; ++j) {
    u[e + j] = uo[j];
    if (dual) mask[e + j] = mo[j];
  }
}

// The tile kernel's block size for D / 4 threads' worth of channels and `tiles` token tiles: kTileThreads, or one
// block per tile spanning the row (no block with idle threads) where those blocks make one wave on all SMs. There
// fewer, fuller blocks ran faster: B1 D1536 L2048 8.4 -> 7.2 us on an H100 (256 blocks of 384 threads instead of
// 256 + 256 of 256 threads with 256 + 128 live); with several waves, or fewer blocks than SMs, they ran slower
// (B8 D1536 L2048 42 -> 45 us, B1 L512 3.9 -> 4.6 us; NOTES.md session 18).
int tile_threads(int quads, int64_t tiles, const void* kernel) {
  const int sms = qm::sm_count();
  int per_sm = 0;
  if (quads > kTileMaxThreads || tiles < sms ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, quads, 0) != cudaSuccess)
    return kTileThreads;
  return tiles <= static_cast<int64_t>(sms) * per_sm ? quads : kTileThreads;
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
                                      int early_state, cudaStream_t stream) {
  QM_CHECK_ARG(x && weight && weight_scale && bias && u, "qm_quant_causal_conv1d: x, weight, weight_scale, bias "
               "and u must be non-null");
  QM_CHECK_ARG(batch > 0 && seqlen > 0 && dim > 0, "qm_quant_causal_conv1d: batch=%d seqlen=%d dim=%d must be "
               "positive", batch, seqlen, dim);
  QM_CHECK_ARG(kernel_size >= 2 && kernel_size <= kMaxK, "qm_quant_causal_conv1d: kernel_size=%d not in 2..%d",
               kernel_size, kMaxK);
  QM_CHECK_ARG(dual_scale == 0 || dual_scale == 1, "qm_quant_causal_conv1d: dual_scale=%d must be 0 or 1",
               dual_scale);
  QM_CHECK_ARG(early_state == 0 || early_state == 1, "qm_quant_causal_conv1d: early_state=%d must be 0 or 1",
               early_state);
  QM_CHECK_ARG((mask != nullptr) == (dual_scale == 1), "qm_quant_causal_conv1d: mask must be non-null exactly "
               "when dual_scale=1");
  QM_CHECK_ARG(QM_VALID_SCALE(in_scale) && QM_VALID_SCALE(out_scale), "qm_quant_causal_conv1d: in_scale and "
               "out_scale must be positive and finite");
  QM_CHECK_ARG(!dual_scale || QM_VALID_SCALE(outlier_scale), "qm_quant_causal_conv1d: outlier_scale must be "
               "positive and finite when dual_scale=1");
  int64_t total = static_cast<int64_t>(batch) * seqlen * dim;
  QM_CHECK_ARG(total < (1ll << 40), "qm_quant_causal_conv1d: tensor too large");
  const int threads = 256;
  const ConvQuant q = make_conv_quant(out_scale, outlier_scale, dual_scale == 1);
  if (q.fast && kernel_size == kTaps && dim % 4 == 0 && batch <= 65535 && qm::aligned(x, 4) &&
      qm::aligned(weight, 4) && qm::aligned(u, 4) && qm::aligned(mask, 4)) {
    // the tile kernel writes the new state itself, at every L
    auto kernel = q.dual ? conv_tile_kernel<true> : conv_tile_kernel<false>;
    const int64_t tiles = static_cast<int64_t>(batch) * ((seqlen + kTile - 1) / kTile);
    const int block = tile_threads(dim / 4, tiles, reinterpret_cast<const void*>(kernel));
    const int channels = 4 * block;  // per block
    const dim3 grid(static_cast<unsigned>((seqlen + kTile - 1) / kTile),
                    static_cast<unsigned>((dim + channels - 1) / channels), static_cast<unsigned>(batch));
    QM_CHECK_LAUNCHED(qm::launch(kernel, grid, dim3(block), 0, stream,
                                 x, weight, weight_scale, bias, state_in, u, mask, state_out, seqlen, dim, in_scale,
                                 q, early_state == 1),
                      "qm_quant_causal_conv1d conv launch");
    return QM_OK;
  }
  // the generic path: at decode (L = 1) the conv kernel also shifts the state (one launch instead of two), else the
  // state kernel follows
  int8_t* fused_state = seqlen == 1 ? state_out : nullptr;
  const bool vec = dim % kConvVec == 0 && qm::aligned(u, 4) && qm::aligned(mask, 4);
  const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(batch) * seqlen),
                  static_cast<unsigned>((dim + kConvThreads * kConvVec - 1) / (kConvThreads * kConvVec)));
  conv_kernel<<<grid, kConvThreads, 0, stream>>>(x, weight, weight_scale, bias, state_in, u, mask, fused_state, seqlen,
                                                 dim, kernel_size, in_scale, q, vec);
  QM_CHECK_LAUNCH("qm_quant_causal_conv1d conv launch");
  if (state_out && !fused_state) {
    const int64_t rows = static_cast<int64_t>(batch) * dim;
    state_kernel<<<static_cast<unsigned>((rows + threads - 1) / threads), threads, 0, stream>>>(
        x, state_in, state_out, batch, seqlen, dim, kernel_size);
    QM_CHECK_LAUNCH("qm_quant_causal_conv1d state launch");
  }
  return QM_OK;
}
