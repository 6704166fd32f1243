/*
 * qmamba CUDA kernels: plain C ABI (no TensorRT, no exceptions across this boundary).
 *
 * Semantics: docs/quantization.md (spec 1.0); PyTorch oracles in qmamba/ops/ref.py.
 * Layout is token-major: activations [B, L, C]; conv state [B, D, K-1]; SSM state [B, D, N].
 * All pointers are device pointers, contiguous. Every function returns a qm_status; on failure
 * qm_last_error() returns a message naming the argument or CUDA call that failed (thread-local).
 * Nothing is launched when an argument is invalid.
 */
#ifndef QMAMBA_KERNELS_H
#define QMAMBA_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QM_API __attribute__((visibility("default")))

typedef enum {
  QM_OK = 0,
  QM_ERR_INVALID_ARGUMENT = 1, /* null pointer, bad shape, non-finite or non-positive scale */
  QM_ERR_UNSUPPORTED = 2,      /* valid but not implemented (e.g. d_inner without a spec Hadamard) */
  QM_ERR_CUDA = 3              /* a CUDA call or launch failed; message has cudaGetErrorString */
} qm_status;

typedef enum { QM_DTYPE_FLOAT32 = 0, QM_DTYPE_FLOAT16 = 1, QM_DTYPE_INT8 = 2 } qm_dtype;

QM_API const char* qm_last_error(void);
QM_API const char* qm_status_string(int status);
/* qm_abi_version bumps on any incompatible change; currently 9. 3: qm_tied_logits; 4: early_state; 5: the decode
 * conv and the HadamardQuant fused into the GEMV, the conv state shift into the update; 6: the conv and x_proj's
 * sums behind the GEMV, x_proj's epilogue in the update, clear, qm_tied_logits' norm, qm_embedding_lookup; 7: the
 * scan's channel_major inputs; 8: qm_linear_args.early_residual; 9: qm_update_out_proj. */
QM_API int qm_abi_version(void);

/* RMSNormQuant (spec 4.1): y[t,:] = Q(rmsnorm(x[t,:]) , scale). tokens = B*L. */
QM_API int qm_rmsnorm_quant(const float* x, const float* weight, int8_t* y, int64_t tokens, int d_model,
                            float eps, float scale, cudaStream_t stream);

/* Early state reads (decode). The kernels start early under programmatic dependent launch and wait for the
 * kernel before them in the stream before reading their inputs. early_state = 1 lets a decode kernel read its
 * state (the conv state, the SSM state) before that wait, overlapping the HBM round trip with the previous
 * kernel. The caller asserts that no kernel still ahead of this one in the stream writes the state, e.g. it was
 * last written by an earlier decode step and a kernel launched without programmatic dependent launch has run
 * since (qmamba's decode step starts with the embedding gather). 0 is always safe. */

/* QuantCausalConv1d (spec 4.3, 4.5). state_in may be NULL (zeros); state_out may be NULL (not written)
 * and may alias state_in (decode in place). mask must be non-NULL iff dual_scale. early_state: see above
 * (used when seqlen == 1). */
QM_API int qm_quant_causal_conv1d(const int8_t* x, const int8_t* weight, const float* weight_scale,
                                  const float* bias, const int8_t* state_in, int8_t* u, uint8_t* mask,
                                  int8_t* state_out, int batch, int seqlen, int dim, int kernel_size,
                                  float in_scale, float out_scale, float outlier_scale, int dual_scale,
                                  int early_state, cudaStream_t stream);

/* Selective scan (spec 4.4). input_dtype QM_DTYPE_INT8: u/dt/B/C/z are int8 codes dequantized with
 * the scales (u_mask + u_outlier_scale when dual_scale); QM_DTYPE_FLOAT32: they are float32 and the
 * scales are ignored. y_dtype: QM_DTYPE_FLOAT32 or QM_DTYPE_FLOAT16. initial_state may be NULL
 * (zeros); final_state may be NULL; final_state may alias initial_state. */
typedef struct {
  int input_dtype;
  const void* u;
  const uint8_t* u_mask;
  const void* dt;
  const void* B;
  const void* C;
  const void* z; /* may be NULL: no gating */
  const float* A;       /* [D, N], negative */
  const float* Dskip;   /* [D], may be NULL */
  const float* dt_bias; /* [D], may be NULL */
  const float* initial_state;
  void* y;
  int y_dtype;
  float* final_state;
  int batch, seqlen, dim, dstate;
  int dual_scale;
  float u_scale, u_outlier_scale, dt_scale, B_scale, C_scale, z_scale;
  void* workspace; /* qm_selective_scan_workspace_size bytes, may be NULL when that is 0 */
  size_t workspace_bytes;
  /* Decode only (qm_selective_state_update), optional: dt_proj fused in. When dt_w is non-NULL, dt is not read;
   * the kernel computes dt = Q(fl(fl(sum_r dt_lowrank[b, r] * dt_w[d, r]) * dt_m[d]), dt_scale) itself (spec 4.2,
   * int32 accumulation) from dt_lowrank int8 [B, dt_rank], dt_w int8 [D, dt_rank] and the multiplier dt_m [D]. */
  const int8_t* dt_lowrank;
  const int8_t* dt_w;
  const float* dt_m;
  int dt_rank;
  int early_state; /* decode only, 0 or 1: initial_state read before the PDL wait (see "Early state reads") */
  /* Decode only, with a fused dt_proj (dt_w), optional: the conv state's shift for this token, deferred to here
   * from a GEMV that computed the conv (qm_linear_args.conv_x), which only reads the state. When conv_state is
   * non-NULL, each row conv_state[b, d, :] (int8 [B, D, conv_kernel_size - 1], in place) becomes its last
   * conv_kernel_size - 2 tokens followed by conv_x[b, d] (int8 [B, D]). conv_kernel_size must be 4. With
   * early_state the row is also read before the wait. */
  int8_t* conv_state;
  const int8_t* conv_x;
  int conv_kernel_size;
  /* Decode of one sequence (batch 1) with a fused dt_proj, optional: x_proj's epilogue (spec 4.2) fused in. When
   * xp_acc is non-NULL, dt_lowrank, B and C are not read but written: the kernel computes their codes from x_proj's
   * int32 sums xp_acc [xp_n] (inliers; then [xp_n] outliers when xp_m_out is non-NULL), xp_n = dt_rank + 2 dstate,
   * y = fl(fl(acc_in) * xp_m_in[j]) (+ fl(fl(acc_out) * xp_m_out[j])), codes Q(y, dt_lowrank_scale / B_scale /
   * C_scale) for the three segments (qm_linear_args.xp_acc computes such sums). xp_n <= 1024. */
  const int32_t* xp_acc;
  const float* xp_m_in;
  const float* xp_m_out;
  int xp_n;
  float dt_lowrank_scale;
  /* 0 or 1. 1: u, dt, z and u_mask are [B, D, L] (channel-major, mamba_ssm's layout) instead of [B, L, D]; B, C
   * and y keep theirs. qm_selective_scan then runs its chunked kernel at every shape (16-byte staging copies when
   * seqlen % 16 == 0 and those pointers are 16-byte aligned). At seqlen 1 both layouts are the same. */
  int channel_major;
} qm_scan_args;

QM_API int qm_selective_scan_workspace_size(int batch, int seqlen, int dim, int dstate, size_t* bytes);
QM_API int qm_selective_scan(const qm_scan_args* args, cudaStream_t stream);
/* Decode: one token (args->seqlen must be 1); initial_state required, final_state may alias it. */
QM_API int qm_selective_state_update(const qm_scan_args* args, cudaStream_t stream);

/* W8A8 linear (spec 4.2): y[r, n] = fl(fl(acc_in) * m_in[n]) (+ fl(fl(acc_out) * m_out[n]) with x_mask), written
 * per output segment [seg_end[s-1], seg_end[s]) as int8 Q(y, seg_scale[s]) or, with seg_scale[s] == 0, as float32
 * (plus residual, in place allowed, for a single float segment). Each segment output is [rows, width] contiguous.
 * acc_in/acc_out: int32 [rows, n] from a GEMM; when acc_in is NULL the accumulators come from a GEMV over
 * x [rows, k] int8 (x_mask uint8 0/1 splits inliers/outliers) and w [n, k] int8, for rows <= 4, k % 16 == 0 (16-byte aligned). */
typedef struct {
  const int8_t* x;
  const uint8_t* x_mask;
  const int8_t* w;
  const int32_t* acc_in;
  const int32_t* acc_out;
  const float* m_in;
  const float* m_out;
  int rows, k, n;
  int n_seg;
  int seg_end[3];
  float seg_scale[3];
  void* seg_out[3];
  float* residual;
  /* Optional, GEMV only: RMSNormQuant (spec 4.1) fused in front. When norm_x is non-NULL, x is not read: each
   * block computes x = RMSNormQuant(norm_x [rows, k] float32, norm_w [k], norm_eps, norm_scale) itself. */
  const float* norm_x;
  const float* norm_w;
  float norm_eps, norm_scale;
  /* Optional, GEMV only: the decode step of QuantCausalConv1d (spec 4.3, 4.5: one token, kernel size 4) fused in
   * front. When conv_x is non-NULL, x and x_mask must be NULL: each block computes x = u, the conv of conv_x
   * [rows, k] int8 with the state conv_state [rows, k, 3] int8, weights conv_w [k, 4] int8, conv_w_scale [k],
   * conv_bias [k] at conv_in_scale -> conv_out_scale (and conv_outlier_scale with its outlier mask as x_mask when
   * conv_dual_scale = 1: m_out is then required). The blocks also write u to conv_u [rows, k] (and the mask to
   * conv_mask), each its share. The state is only read: the caller shifts it after this kernel
   * (qm_scan_args.conv_state). conv_early_state (0/1): the state is read before the PDL wait ("Early state
   * reads"). Needs k <= 6144 (one row: 24576) and 16-byte aligned conv_w, conv_w_scale, conv_bias; 4-byte aligned
   * conv_x, conv_state, conv_u, conv_mask. */
  const int8_t* conv_x;
  const int8_t* conv_w;
  const float* conv_w_scale;
  const float* conv_bias;
  int8_t* conv_state; /* only read in front; shifted in place behind (xp_acc) */
  int8_t* conv_u;
  uint8_t* conv_mask;
  float conv_in_scale, conv_out_scale, conv_outlier_scale;
  int conv_dual_scale, conv_early_state;
  /* Optional, GEMV with one row only: HadamardQuant (spec 4.6) fused in front. When had_x is non-NULL, x and
   * x_mask must be NULL: each block computes x = HadamardQuant(had_x [1, k] float32, had_scale) itself. Needs
   * a 16-byte aligned had_x and k = m * 2^j, 2^j >= 8: m in {1, 12} up to k = 2048; above (sm_90+, one float32
   * segment), m in {1, 12, 20, 28} up to k = 6144, each block then holding its weight rows in shared memory. */
  const float* had_x;
  float had_scale;
  /* Optional, GEMV with one row only: the decode conv and the next linear's (x_proj's) int32 sums fused behind.
   * When xp_acc is non-NULL, segment 0 (int8, its width a multiple of 16) is the conv's input x: each block takes
   * the codes of its segment-0 columns, computes their conv as above (conv_w .. conv_dual_scale, conv_early_state;
   * conv_x NULL, conv_in_scale == seg_scale[0]), writes u to conv_u and the mask to conv_mask, shifts conv_state
   * [1, width, 3] in place by x, and adds its channels' share of x_proj (xp_w int8 [xp_n, width], 16-byte aligned):
   * xp_acc[j] += sum_c xp_w[j, c] * u[c] over inliers, and xp_acc[xp_n + j] over outliers with conv_dual_scale.
   * Integer sums, exact in any order. xp_acc must hold zeros before: clear (below) of a kernel that runs after
   * the sums' reader resets them. The segment-0 codes are written to seg_out[0] as usual. */
  const int8_t* xp_w;
  int32_t* xp_acc;
  int xp_n;
  /* Optional, GEMV only: after its dependency wait the kernel sets clear[0 .. clear_n) to 0 (int32; e.g. the x_proj
   * sums above once the state update that reads them has finished). */
  int32_t* clear;
  int clear_n;
  /* 0 or 1. 1 (GEMV, one row, residual): the residual is read before the PDL wait, so its round trip overlaps the
   * kernels ahead instead of following the dot products. The caller asserts that the residual was last written by a
   * kernel at least two places back in the stream (not by the kernel right before this one): under programmatic
   * dependent launch this kernel starts only after the previous one has passed its own wait, by which time every
   * kernel further back has finished and its writes are visible (qmamba's kernels wait before they let dependents
   * start; qmamba's decode step runs in_proj and the state update between one out_proj and the next). 0 is always
   * safe. */
  int early_residual;
} qm_linear_args;

QM_API int qm_int8_linear(const qm_linear_args* args, cudaStream_t stream);

/* Decode of one sequence, small models: qm_selective_state_update(scan) followed by qm_int8_linear(out_proj) with
 * HadamardQuant in front (out_proj->had_x == scan->y) and the residual behind, in one kernel: one cluster of 16
 * thread blocks (sm_90+) that pass y through distributed shared memory instead of a kernel boundary. Same results,
 * bit for bit, as the two calls (y is written too). scan: batch 1, seqlen 1, int8 inputs, dstate 16, a fused
 * dt_proj (dt_w; x_proj's epilogue and the conv shift optional), float32 y, d_inner a multiple of 128 up to 2048.
 * out_proj: one row, k = d_inner, n <= 2048 columns, one float32 segment of all n columns plus the residual (in
 * place allowed), clear and early_residual as for qm_int8_linear. Each block keeps its share of out_proj's weights
 * (n / 16 rows of k bytes) in shared memory: QM_ERR_UNSUPPORTED where that or the cluster does not fit. */
QM_API int qm_update_out_proj(const qm_scan_args* scan, const qm_linear_args* out_proj, cudaStream_t stream);

/* Logits through the tied int8 embedding (spec 4.7): out[r, v] = fl(fl(sum_k h[r, k] * e_q[v, k]) * e_scale[v]),
 * h float32 [rows, k], e_q int8 [n, k] (16-byte aligned, k % 16 == 0, k <= 4096), out float32 [rows, n]. The table
 * is read once per group of 4 rows: meant for decode (few rows). norm_w non-NULL: h is the residual stream and each
 * block applies the final RMSNorm (spec 4.1 without the quantizer: fl(fl(h * r) * norm_w[k]), r from the float64
 * sum of squares, norm_eps) itself first. */
QM_API int qm_tied_logits(const float* h, const int8_t* e_q, const float* e_scale, float* out, int rows, int k, int n,
                          const float* norm_w, float norm_eps, cudaStream_t stream);

/* Embedding lookup (spec 4.7): out[r, :] = fl(float(e_q[ids[r], :]) * e_scale[ids[r]]), ids int64 [rows], e_q int8
 * [n, k], out float32 [rows, k]. An id outside [0, n) gives a row of NaN (nothing is read out of bounds). Launched
 * without programmatic dependent launch: it waits for all earlier work in the stream, so it can open a decode step
 * whose kernels read their states early ("Early state reads"). */
QM_API int qm_embedding_lookup(const int64_t* ids, const int8_t* e_q, const float* e_scale, float* out, int rows,
                               int k, int64_t n, cudaStream_t stream);

/* HadamardQuant (spec 4.6): rows = B*L vectors of length dim; x_dtype float32 or float16. */
QM_API int qm_hadamard_quant(const void* x, int x_dtype, int8_t* y, int64_t rows, int dim, float scale,
                             cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
