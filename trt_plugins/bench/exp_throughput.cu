// Measures the GPU's exp2 throughput (MUFU.EX2, the instruction the scan's exps compile to): each thread
// runs 8 independent chains of ex2.approx; prints exps per second. Used by bench_kernels.py for the floor.
#include <cuda_runtime.h>
#include <stdio.h>

#define CHECK(x)                                                                  \
  do {                                                                            \
    cudaError_t e_ = (x);                                                         \
    if (e_ != cudaSuccess) {                                                      \
      fprintf(stderr, "%s failed: %s\n", #x, cudaGetErrorString(e_));             \
      return 1;                                                                   \
    }                                                                             \
  } while (0)

constexpr int kIters = 4096, kChains = 8;

__global__ void exp_chains(float* out, float seed) {
  float v[kChains];
  for (int c = 0; c < kChains; ++c) v[c] = seed * (threadIdx.x + c) * 1e-9f;
  for (int i = 0; i < kIters; ++i)
#pragma unroll
    for (int c = 0; c < kChains; ++c) asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(v[c]));
  float s = 0.f;
  for (int c = 0; c < kChains; ++c) s += v[c];
  if (s == 12345.f) out[0] = s;  // keeps the chains alive
}

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  float* out;
  CHECK(cudaMalloc(&out, 4));
  const int blocks = sms * 8, threads = 256;
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  exp_chains<<<blocks, threads>>>(out, 1.f);
  CHECK(cudaGetLastError());
  float best = 1e30f;
  for (int r = 0; r < 10; ++r) {
    CHECK(cudaEventRecord(a));
    exp_chains<<<blocks, threads>>>(out, 1.f + r);
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    if (ms < best) best = ms;
  }
  const double exps = double(blocks) * threads * kIters * kChains;
  printf("%.6e\n", exps / (best * 1e-3));
  return 0;
}
