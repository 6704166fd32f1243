// QuantCausalConv1d's output quantizer (spec 4.3, 4.5), shared by the conv kernels and by the GEMV that computes the
// decode conv in front of x_proj (int8_linear.cu): one code path, so both give the same bits.
#pragma once
#include "common.cuh"

namespace {
// The spec's u = silu_r(v) (float64) and its quantization, exactly: the reference path.
__device__ __forceinline__ void finish_exact(float v, float out_scale, float outlier_scale, bool dual, int8_t& u_out,
                                             uint8_t& mask_out) {
  const float sv = qm::silu_r(v);
  if (!dual) {
    u_out = qm::quantize(sv, out_scale);
    mask_out = 0;
    return;
  }
  const float q_in = rintf(__fdiv_rn(sv, out_scale));
  const bool outlier = q_in < -128.f || q_in > 127.f;
  const float q = outlier ? rintf(__fdiv_rn(sv, outlier_scale)) : q_in;
  u_out = qm::saturate_code(q);
  mask_out = outlier ? 1 : 0;
}

// Same result as finish_exact, cheaper: SiLU in float32 and the quotient by a reciprocal multiply; the float64
// path runs only when a code is not certain (qm::FastCode::certain with a tolerance from the bound below;
// about 2e-4 of elements) or v <= -16. Error of r against the spec's quotient (itself within 2^-23 of the real one),
// relative: a = fl(-v fl(log2 e)) is within 2^-23.2 of -v log2 e; ex2 (<= 2 ulp, 2^-22) and rcp (1 ulp) by MUFU
// alone, then 4 roundings (1 + e, v * rcp, inv = fl(1 / s), r * inv). For v > -16 (|a| < 23.1) e is within 2^-19
// and r within 2^-18.7: the rule's 2^-17 is 3.2x that. For v >= 0 (a <= 0, e <= 1) e's absolute error is at most
// 2^-22 + max(u e^-u) 2^-23.2 = 2^-21.8 against 1 + e >= 1, and r is within 2^-20.35: tolerance 2^-19, 2.5x.
struct ConvQuant {
  float out_scale, outlier_scale, inv_out, inv_outlier;
  bool dual, fast;
};

// The float32 path without branches: the code's float bits (low byte = the int8 code), the outlier flag, and
// whether both are certain (else the spec's float64 path decides: finish, or the tile's conv_element).
template <bool kDual>
__device__ __forceinline__ bool code_fast(float v, float inv_out, float inv_outlier, int& code_bits, bool& outlier) {
  // 1 + e is in [1, 2^24) where v > -16 (the only results used); an e below 2^-126 flushes to 0 (1 + e = 1)
  const float e = qm::ex2_approx(__fmul_rn(v, -1.44269504088896341f));
  const float sv = __fmul_rn(v, qm::rcp_approx(__fadd_rn(1.f, e)));
  const float r = __fmul_rn(sv, inv_out);
  float rs = r;  // the quotient whose code is stored
  float beyond = 0.f;  // dual: |r + 0.5| - 128, > 0 exactly when rint(r) leaves [-128, 127] (r >= 127.5 or r < -128.5)
  outlier = false;
  if (kDual) {  // at beyond == 0 (r = 127.5 or -128.5, ties to even: 128 / -128) the split is left to the exact path
    beyond = __fsub_rn(fabsf(__fadd_rn(r, 0.5f)), 128.f);
    outlier = beyond > 0.f;
    rs = __fmul_rn(sv, outlier ? inv_outlier : inv_out);
  }
  // c = the clamped rs has v's sign, so the tolerance is |c| 2^-19 for v >= 0 and |c| 2^-17 below (the bound above)
  const qm::FastCode code = qm::fast_code(rs);
  code_bits = code.bits;
  const float tolerance = fmaxf(__fmul_rn(code.clamped, 0x1p-19f), __fmul_rn(code.clamped, -0x1p-17f));
  bool certain = (v > -16.f) & code.certain(tolerance);  // & : no short-circuit branches
  // and r is not near an outlier threshold 127.5 / -128.5 (|r| < 129 there: the error bound is below 2^-11)
  if (kDual) certain &= fabsf(beyond) > 0x1p-9f;
  return certain;
}

// The exact path for byte j of a packed group (rare: about 2e-4 of elements), kept out of line so that the
// unrolled common path stays short.
__device__ __noinline__ void conv_exact_byte(float v, ConvQuant q, int j, int& codes, int& masks) {
  int8_t u;
  uint8_t m;
  finish_exact(v, q.out_scale, q.outlier_scale, q.dual, u, m);
  const int sh = 8 * j;
  codes = static_cast<int>((static_cast<unsigned>(codes) & ~(0xffu << sh)) |
                           static_cast<unsigned>(static_cast<uint8_t>(u)) << sh);
  masks = static_cast<int>((static_cast<unsigned>(masks) & ~(0xffu << sh)) | static_cast<unsigned>(m) << sh);
}

// The decode conv (one token, 4 taps) of 4 adjacent channels c .. c + 3, spec 4.3 / 4.5. st: the 12 bytes of their
// state rows as stored (3 tokens per channel, oldest first), xw: their 4 input bytes, wt: their weight rows (one
// int of 4 taps per channel), m: fl(in_scale * w_scale), bs: the bias. Out: the 4 codes packed (byte j = channel
// c + j) and the 4 outlier flags (0/1 bytes). Same arithmetic as conv_tile_kernel, so the same bits.
template <bool kDual>
__device__ __forceinline__ void conv4_decode(const int (&st)[3], int xw, int4 wt, float4 m, float4 bs,
                                             const ConvQuant& q, int& codes, int& masks) {
  // each channel's window: its 3 state tokens and the new one (byte k = tap k)
  const int win[4] = {static_cast<int>(__byte_perm(st[0], xw, 0x4210)),
                      static_cast<int>(__byte_perm(__byte_perm(st[0], st[1], 0x0543), xw, 0x5210)),
                      static_cast<int>(__byte_perm(__byte_perm(st[1], st[2], 0x0432), xw, 0x6210)),
                      static_cast<int>(__byte_perm(__byte_perm(st[2], 0, 0x0321), xw, 0x7210))};
  const int w[4] = {wt.x, wt.y, wt.z, wt.w};
  const float mm[4] = {m.x, m.y, m.z, m.w}, bb[4] = {bs.x, bs.y, bs.z, bs.w};
  int bits[4];
  bool outlier[4];
  float v[4];
  unsigned pending = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    v[j] = __fadd_rn(__fmul_rn(static_cast<float>(__dp4a(win[j], w[j], 0)), mm[j]), bb[j]);
    const bool ok = code_fast<kDual>(v[j], q.inv_out, q.inv_outlier, bits[j], outlier[j]);
    pending |= ok && q.fast ? 0u : 1u << j;
  }
  codes = static_cast<int>(__byte_perm(__byte_perm(bits[0], bits[1], 0x40), __byte_perm(bits[2], bits[3], 0x40),
                                       0x5410));
  masks = static_cast<int>(static_cast<unsigned>(outlier[0]) | static_cast<unsigned>(outlier[1]) << 8 |
                           static_cast<unsigned>(outlier[2]) << 16 | static_cast<unsigned>(outlier[3]) << 24);
  if (pending)
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (pending >> j & 1u) conv_exact_byte(v[j], q, j, codes, masks);
}

// The quantizer's scales; fast (reciprocal multiplies) only where the reciprocals are accurate (host side).
inline ConvQuant make_conv_quant(float out_scale, float outlier_scale, bool dual) {
  ConvQuant q{out_scale, dual ? outlier_scale : out_scale, 0.f, 0.f, dual, false};
  if (qm::has_accurate_reciprocal(q.out_scale) && qm::has_accurate_reciprocal(q.outlier_scale)) {
    q.inv_out = static_cast<float>(1.0 / q.out_scale);
    q.inv_outlier = static_cast<float>(1.0 / q.outlier_scale);
    q.fast = true;
  }
  return q;
}
}  // namespace
