// Shared helpers of the qmamba kernels: spec arithmetic (docs/quantization.md section 2) and errors.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include <type_traits>

#include "qmamba_kernels.h"

namespace qm {

// Programmatic dependent launch (Hopper, sm_90+). A kernel started with qm::launch may begin while the kernel
// before it in the stream is still finishing (its launch latency and its weight loads overlap that tail). Such a
// kernel calls wait_for_inputs() before it reads anything but constant weights and before it writes anything,
// then allow_dependents() so that the next kernel may start early in turn. Both are no-ops below sm_90 and when
// the kernel was launched without the attribute.
__device__ __forceinline__ void wait_for_inputs() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

template <typename... KernelArgs, typename... Args>
cudaError_t launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<KernelArgs>(args)...);
}

// Thread-local last error message, set by fail().
void set_error(const char* fmt, ...);
int fail_cuda(const char* what, cudaError_t e);
// Streaming multiprocessors of the current device (cached per device; 132 if the query fails). Sizes capped grids.
int sm_count();

// The int8 code of an already rounded quotient: clamp to [-128, 127].
__device__ __forceinline__ int8_t saturate_code(float rounded) {
  return static_cast<int8_t>(fminf(fmaxf(rounded, -128.f), 127.f));
}

// Spec rule 1: clamp(rne(x / s), -128, 127), IEEE division, no reciprocal multiply.
__device__ __forceinline__ int8_t quantize(float x, float s) { return saturate_code(rintf(__fdiv_rn(x, s))); }

// Byte w (0 = lowest) of a 32-bit word.
__device__ __forceinline__ uint8_t byte_of(uint32_t v, int w) { return static_cast<uint8_t>(v >> (8 * w)); }

// The int8 code in byte b as a float by the adder, not I2F: with its sign bit flipped the byte is code + 128, and
// 0x4B0000xx is the float 2^23 + xx exactly, so one logic op and one exact subtraction give the code. I2F runs on the
// pipe that also does MUFU (ex2, rcp), which the scans' exponentials keep busy (NOTES.md, session 20).
__device__ __forceinline__ float code_float(uint8_t b) {
  return __int_as_float(0x4B000000u | (static_cast<uint32_t>(b) ^ 0x80u)) - 8388736.f;
}
// The same for byte i of a word of 4 codes (one byte permutation per code).
__device__ __forceinline__ float code_float(uint32_t w, int i) {
  return __int_as_float(__byte_perm(w ^ 0x80808080u, 0x4B000000u, 0x7650 + i)) - 8388736.f;
}

// A float result in the output type a kernel is instantiated for (fp16 by round to nearest even, or fp32).
template <class Y>
__device__ __forceinline__ Y out_value(float v) {
  if constexpr (std::is_same_v<Y, __half>)
    return __float2half_rn(v);
  else
    return v;
}

// MUFU.EX2 / MUFU.RCP alone (2 ulp / 1 ulp; .ftz: subnormal inputs and results flush to 0), without the range
// fix-ups that exp2f, __expf and __fdividef add around them. Fast float32 paths only.
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float rcp_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// x + kRound - kRound == rint(x) for |x| < 2^22 (round to nearest even by the FP32 adder), and the low byte of the
// bits of x + kRound is rint(x) mod 256: rounding and the int8 code without F2I / FRND (the conversion pipe runs at
// 16 per clock per SM, the adder at 128).
constexpr float kRound = 12582912.f;  // 1.5 * 2^23

// The int8 code of r by the adder: c = clamp(r, -128, 127) (rint(c) == clamp(rint(r)): rint is monotone and keeps
// the integer bounds), bits (low byte = the code) and dist = |c - rint(c)|. Kernels that approximate a quotient x / s
// (a reciprocal multiply, a float32 SiLU in front) take the code when certain(e) holds for a bound e on the error of
// r: then every real number within e of c rounds alike (a clamped r has dist 0: the bound whatever the error), else
// the spec's exact path decides.
struct FastCode {
  float clamped, dist;
  int bits;
  __device__ __forceinline__ bool certain(float e) const { return 0.5f - dist > e; }
};

__device__ __forceinline__ FastCode fast_code(float r) {
  const float c = fminf(fmaxf(r, -128.f), 127.f), biased = __fadd_rn(c, kRound);
  return {c, fabsf(__fsub_rn(c, __fsub_rn(biased, kRound))), __float_as_int(biased)};
}

// Host: whether a device pointer allows accesses `bytes` wide (the vector paths' condition; NULL counts as aligned).
inline bool aligned(const void* p, int bytes = 16) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Scales whose reciprocal is a normal float32 with a 0.5 ulp error: where the reciprocal-multiply bounds hold.
__host__ __device__ inline bool has_accurate_reciprocal(float s) { return s > 0x1p-100f && s < 0x1p100f; }

// Spec rule 4: silu evaluated in float64, rounded once.
__device__ __forceinline__ float silu_r(float v) {
  double x = static_cast<double>(v);
  return static_cast<float>(x / (1.0 + exp(-x)));
}

// Spec rule 4: softplus in float64 with the log-only log1p form.
__device__ __forceinline__ float softplus_r(float v) {
  double x = static_cast<double>(v);
  if (x > 20.0) return v;
  double e = exp(x);
  double w = 1.0 + e;
  double lp = (w == 1.0) ? e : log(w) * e / (w - 1.0);
  return static_cast<float>(lp);
}

// The float64 sum of a value over the warp's lanes, in a fixed butterfly order (every lane gets the sum).
__device__ __forceinline__ double warp_sum(double acc) {
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  return acc;
}

// Spec 4.1's sum of squares, one warp's part: the float64 sum of the float32 squares row[i] for i = the thread's
// index, + stride, ... (stride = the block's threads), over the warp's lanes (every lane gets the warp's sum).
__device__ __forceinline__ double warp_sumsq(const float* row, int k, int stride) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < k; i += stride) acc += static_cast<double>(__fmul_rn(row[i], row[i]));
  return warp_sum(acc);
}

// Spec 4.1: 1 / rms from the float64 sum of float32 squares: fl(sum) / d (IEEE), + eps, sqrt_r, reciprocal.
__device__ __forceinline__ float rms_reciprocal(double sumsq, int d, float eps) {
  const float ms = __fdiv_rn(static_cast<float>(sumsq), static_cast<float>(d));
  return __frcp_rn(static_cast<float>(sqrt(static_cast<double>(__fadd_rn(ms, eps)))));
}

// Spec 4.1: the int8 code of element x of a row with reciprocal rms rr and norm weight w.
__device__ __forceinline__ int8_t rms_code(float x, float rr, float w, float scale) {
  return quantize(__fmul_rn(__fmul_rn(x, rr), w), scale);
}

// 4 rows of 4 bytes -> 4 columns: out[j] byte i = in[i] byte j (8 byte permutes)
__device__ __forceinline__ void transpose4x4(const int (&in)[4], int (&out)[4]) {
  const unsigned t0 = __byte_perm(in[0], in[1], 0x5140), t1 = __byte_perm(in[0], in[1], 0x7362);
  const unsigned t2 = __byte_perm(in[2], in[3], 0x5140), t3 = __byte_perm(in[2], in[3], 0x7362);
  out[0] = static_cast<int>(__byte_perm(t0, t2, 0x5410));
  out[1] = static_cast<int>(__byte_perm(t0, t2, 0x7632));
  out[2] = static_cast<int>(__byte_perm(t1, t3, 0x5410));
  out[3] = static_cast<int>(__byte_perm(t1, t3, 0x7632));
}

// Spec rule 7: fl(a * b) in float64.
__device__ __forceinline__ float scale_product(float a, float b) {
  return static_cast<float>(static_cast<double>(a) * static_cast<double>(b));
}

}  // namespace qm

#define QM_CHECK_ARG(cond, ...)   \
  do {                            \
    if (!(cond)) {                \
      qm::set_error(__VA_ARGS__); \
      return QM_ERR_INVALID_ARGUMENT; \
    }                             \
  } while (0)

#define QM_CHECK_LAUNCH(what)                                  \
  do {                                                         \
    cudaError_t e_ = cudaGetLastError();                       \
    if (e_ != cudaSuccess) return qm::fail_cuda((what), e_);   \
  } while (0)

#define QM_CHECK_LAUNCHED(expr, what)                          \
  do {                                                         \
    cudaError_t e_ = (expr);                                   \
    if (e_ != cudaSuccess) return qm::fail_cuda((what), e_);   \
  } while (0)

#define QM_VALID_SCALE(s) (isfinite(s) && (s) > 0.f)
