// What one decode-step link costs, before building a persistent decode kernel (trt_plugins/bench/NOTES.md, session 6):
//   chain:   a CUDA graph of K kernels with programmatic dependent launch (as the decode step launches its kernels),
//            each waiting for the previous one, reading one value it wrote and writing one for the next;
//   barrier: one cooperative kernel with K grid-wide barriers between stages that do the same (a counter and a
//            generation word in global memory, thread 0 of each block arrives and spins);
//   cg:      the same with cooperative_groups' grid.sync().
// Each at 1, 2 and 4 blocks of 256 threads per SM. Prints microseconds per link (median of 20 replays).
// Build and run (H100): nvcc -O3 -std=c++17 -gencode arch=compute_90,code=sm_90 grid_barrier.cu -o gb && ./gb
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace cg = cooperative_groups;

#define CHECK(x)                                                                              \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

constexpr int kThreads = 256;

// one link of the chain: wait for the previous kernel, read its value, write ours
__global__ void link_kernel(const float* in, float* out) {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" :::);
  if (blockIdx.x == 0 && threadIdx.x == 0) out[0] = in[0] + 1.f;
}

__device__ void arrive_and_wait(unsigned* count, unsigned* gen, unsigned blocks) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned g = *reinterpret_cast<volatile unsigned*>(gen);  // read before arriving: it cannot move yet
    __threadfence();
    if (atomicAdd(count, 1u) == blocks - 1) {
      *count = 0;
      __threadfence();
      atomicAdd(gen, 1u);
    } else {
      while (*reinterpret_cast<volatile unsigned*>(gen) == g) {
      }
    }
    __threadfence();
  }
  __syncthreads();
}

// K stages; stage s is block s % grid's: it reads the value another block wrote in the stage before (from L2) and
// writes the next, so a barrier that let a block run ahead shows in the final count
__global__ void barrier_kernel(float* v, int stages, unsigned* count, unsigned* gen) {
  for (int s = 0; s < stages; ++s) {
    if (blockIdx.x == s % gridDim.x && threadIdx.x == 0) v[s + 1] = __ldcg(v + s) + 1.f;
    arrive_and_wait(count, gen, gridDim.x);
  }
}

__global__ void cg_kernel(float* v, int stages) {
  cg::grid_group grid = cg::this_grid();
  for (int s = 0; s < stages; ++s) {
    if (blockIdx.x == s % gridDim.x && threadIdx.x == 0) v[s + 1] = __ldcg(v + s) + 1.f;
    grid.sync();
  }
}

float median(std::vector<float> t) {
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// median time of run() (which enqueues on st) between two events on st
template <class F>
float time_us(cudaStream_t st, F&& run, int reps = 20) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  run();  // warm-up
  CHECK(cudaStreamSynchronize(st));
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    CHECK(cudaEventRecord(a, st));
    run();
    CHECK(cudaEventRecord(b, st));
    CHECK(cudaEventSynchronize(b));
    float ms = 0.f;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms * 1e3f);
  }
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return median(t);
}

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  constexpr int K = 144;  // links per measurement: 24 layers x 6 kernels
  float* v = nullptr;
  unsigned *count = nullptr, *gen = nullptr;
  CHECK(cudaMalloc(&v, (K + 2) * sizeof(float)));
  CHECK(cudaMalloc(&count, sizeof(unsigned)));
  CHECK(cudaMalloc(&gen, sizeof(unsigned)));
  CHECK(cudaMemset(v, 0, (K + 2) * sizeof(float)));
  CHECK(cudaMemset(count, 0, sizeof(unsigned)));
  CHECK(cudaMemset(gen, 0, sizeof(unsigned)));
  cudaStream_t st;
  CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  std::printf("%s, %d SMs; %d links per measurement, median of 20\n\n", prop.name, sms, K);
  std::printf("| blocks per SM | PDL chain us/link | grid barrier us/stage | cg grid.sync us/stage |\n|---|---|---|---|\n");
  for (int per_sm : {1, 2, 4}) {
    const unsigned blocks = static_cast<unsigned>(sms * per_sm);
    // the chain, captured in a graph as the decode step is
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < K; ++i) {
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[0].val.programmaticStreamSerializationAllowed = 1;
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(blocks);
      cfg.blockDim = dim3(kThreads);
      cfg.stream = st;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      const float* in = v + (i % 2);
      float* out = v + 1 - (i % 2);
      CHECK(cudaLaunchKernelEx(&cfg, link_kernel, in, out));
    }
    CHECK(cudaStreamEndCapture(st, &graph));
    CHECK(cudaGraphInstantiate(&exec, graph, 0));
    const float chain = time_us(st, [&] { CHECK(cudaGraphLaunch(exec, st)); }) / K;
    CHECK(cudaGraphExecDestroy(exec));
    CHECK(cudaGraphDestroy(graph));
    // the persistent kernel with its own barrier; all blocks must be resident: check the occupancy first
    int fit = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, barrier_kernel, kThreads, 0));
    float bar = -1.f, cgs = -1.f;
    if (fit >= per_sm) {
      int stages = K;
      void* args[] = {&v, &stages, &count, &gen};
      bar = time_us(st, [&] {
              CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(barrier_kernel), dim3(blocks), dim3(kThreads),
                                                args, 0, st));
            }) / K;
      void* cargs[] = {&v, &stages};
      cgs = time_us(st, [&] {
              CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(cg_kernel), dim3(blocks), dim3(kThreads), cargs,
                                                0, st));
            }) / K;
    }
    std::printf("| %d | %.2f | %.2f | %.2f |\n", per_sm, chain, bar, cgs);
  }
  std::vector<float> h(K + 1);
  CHECK(cudaMemcpy(h.data(), v, (K + 1) * sizeof(float), cudaMemcpyDeviceToHost));
  const bool ok = h[K] - h[0] == static_cast<float>(K);
  std::printf("\ncheck: the last barrier stage counted %.0f steps (expected %d): %s\n", h[K] - h[0], K,
              ok ? "ok" : "WRONG, the barrier let a block run ahead");
  if (!ok) return 2;
  CHECK(cudaFree(v));
  CHECK(cudaFree(count));
  CHECK(cudaFree(gen));
  return 0;
}
