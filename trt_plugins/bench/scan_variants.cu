// Times compile-time variants of the v4 prefill scan on one shape (a tuning tool, not part of the library):
//   nvcc -O3 -std=c++17 -fmad=false -gencode arch=compute_90,code=sm_90 -Itrt_plugins/kernels \
//     trt_plugins/bench/scan_variants.cu trt_plugins/kernels/errors.cu -o scan_variants && ./scan_variants B D L
// Prints, per variant: steps per lane T, resident blocks per SM, median ms of 20 (CUDA events).
#include <algorithm>
#include <vector>

#include "../kernels/selective_scan.cu"

namespace {
#define CK(x)                                                                            \
  do {                                                                                   \
    cudaError_t e_ = (x);                                                                \
    if (e_ != cudaSuccess) {                                                             \
      fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_));                           \
      exit(1);                                                                           \
    }                                                                                    \
  } while (0)

__global__ void fill(int8_t* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 2654435761u ^ seed;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    p[i] = int8_t(x >> 24);
  }
}

template <int T, int NI>
void run(qm_scan_args a) {
  using C = V4<16, true, T>;
  int blocks = 0;
  CK(cudaFuncSetAttribute(scan_v4_kernel<16, true, T, NI>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(C::SMEM)));
  CK(cudaFuncSetAttribute(scan_v4_kernel<16, true, T, NI>, cudaFuncAttributePreferredSharedMemoryCarveout,
                          cudaSharedmemCarveoutMaxShared));
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, scan_v4_kernel<16, true, T, NI>, kWarps * 32, C::SMEM));
  cudaEvent_t s, e;
  CK(cudaEventCreate(&s));
  CK(cudaEventCreate(&e));
  std::vector<float> ms;
  for (int r = 0; r < 25; ++r) {
    CK(cudaEventRecord(s));
    if (launch_v4<16, true, T, NI>(&a, 0, "variant") != QM_OK) {
      fprintf(stderr, "launch failed: %s\n", qm_last_error());
      exit(1);
    }
    CK(cudaEventRecord(e));
    CK(cudaEventSynchronize(e));
    float t;
    CK(cudaEventElapsedTime(&t, s, e));
    if (r >= 5) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  printf("T=%d NI=%d smem=%zu blocks/SM=%d median %.4f ms\n", T, NI, C::SMEM, blocks, ms[ms.size() / 2]);
}
}  // namespace

int main(int argc, char** argv) {
  const int B = argc > 1 ? atoi(argv[1]) : 1, D = argc > 2 ? atoi(argv[2]) : 1536, L = argc > 3 ? atoi(argv[3]) : 2048;
  const int N = 16;
  const int64_t BLD = int64_t(B) * L * D, BLN = int64_t(B) * L * N;
  int8_t *u, *dt, *z, *Bq, *Cq;
  uint8_t* mask;
  float *A, *Dk, *bias, *h0, *h1;
  __half* y;
  CK(cudaMalloc(&u, BLD)); CK(cudaMalloc(&dt, BLD)); CK(cudaMalloc(&z, BLD)); CK(cudaMalloc(&mask, BLD));
  CK(cudaMalloc(&Bq, BLN)); CK(cudaMalloc(&Cq, BLN)); CK(cudaMalloc(&y, BLD * 2));
  CK(cudaMalloc(&A, D * N * 4)); CK(cudaMalloc(&Dk, D * 4)); CK(cudaMalloc(&bias, D * 4));
  CK(cudaMalloc(&h0, int64_t(B) * D * N * 4)); CK(cudaMalloc(&h1, int64_t(B) * D * N * 4));
  fill<<<1024, 256>>>(u, BLD, 1); fill<<<1024, 256>>>(dt, BLD, 2); fill<<<1024, 256>>>(z, BLD, 3);
  fill<<<1024, 256>>>(Bq, BLN, 4); fill<<<1024, 256>>>(Cq, BLN, 5);
  CK(cudaMemset(mask, 0, BLD)); CK(cudaMemset(A, 0, D * N * 4)); CK(cudaMemset(Dk, 0, D * 4));
  CK(cudaMemset(bias, 0, D * 4)); CK(cudaMemset(h0, 0, int64_t(B) * D * N * 4));
  qm_scan_args a{};
  a.input_dtype = QM_DTYPE_INT8; a.u = u; a.u_mask = mask; a.dt = dt; a.B = Bq; a.C = Cq; a.z = z; a.A = A;
  a.Dskip = Dk; a.dt_bias = bias; a.initial_state = h0; a.y = y; a.y_dtype = QM_DTYPE_FLOAT16; a.final_state = h1;
  a.batch = B; a.seqlen = L; a.dim = D; a.dstate = N; a.dual_scale = 1;
  a.u_scale = 0.02f; a.u_outlier_scale = 0.2f; a.dt_scale = 0.03f; a.B_scale = 0.02f; a.C_scale = 0.02f;
  a.z_scale = 0.03f;
  printf("B%d D%d L%d N%d\n", B, D, L, N);
  run<8, 1>(a);
  run<16, 1>(a);
  return 0;
}
