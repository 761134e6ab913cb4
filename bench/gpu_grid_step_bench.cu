// What a grid-wide step costs on this device: the primitive a single persistent decode kernel
// (scoring, selection and attention as phases of one launch, bench/NOTES-gpu-lookup.md v18 and
// v21) would pay between its phases. Times launches of a kernel that does nothing but `steps`
// barriers, and reports the cost of one step as the slope over the step count:
//   coop:  cooperative_groups grid.sync() (a cooperative launch, every block resident);
//   flag:  a hand-rolled grid barrier (a block arrives with a release add on one counter, thread 0
//          spins on an acquire load until every block of the step has arrived);
//   group: the same among the blocks of one segment only (groups of --group blocks, one counter
//          each), as a per-(request, kv head) phase boundary would be.
// Each on grids of 2 blocks of 256 threads per SM (the decode scoring grid's shape) and 1 block of
// 1,024 threads per SM. Median over --reps timings of --launches back-to-back launches (events).
//
// Usage: gpu_grid_step_bench [--reps N] [--launches N] [--group G]
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "bench/bench_cuda.h"

namespace {

namespace cg = cooperative_groups;

enum Kind : int { kCoop = 0, kFlag = 1, kGroup = 2 };

__device__ __forceinline__ void RedRelease(int* p, int v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ int LoadAcquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// counters: zero at the launch's start (a memset before it); group: blocks per group (kGroup).
__global__ void StepKernel(int kind, int steps, int group, int* counters) {
  if (kind == kCoop) {
    cg::grid_group grid = cg::this_grid();
    for (int s = 0; s < steps; ++s) grid.sync();
    return;
  }
  const int first = kind == kGroup ? static_cast<int>(blockIdx.x) / group * group : 0;
  const int members = kind == kGroup ? min(group, static_cast<int>(gridDim.x) - first)
                                     : static_cast<int>(gridDim.x);
  int* counter = counters + (kind == kGroup ? blockIdx.x / group : 0);
  for (int s = 0; s < steps; ++s) {
    __syncthreads();
    if (threadIdx.x == 0) {
      RedRelease(counter, 1);
      const int target = (s + 1) * members;
      while (LoadAcquire(counter) < target) __nanosleep(32);
    }
    __syncthreads();
  }
}

struct Shape {
  const char* name;
  int blocks_per_sm;
  int threads;
};

}  // namespace

int main(int argc, char** argv) {
  int reps = 21, launches = 50, group = 33;
  for (int i = 1; i < argc; ++i) {
    const bool has_value = i + 1 < argc;
    if (has_value && std::strcmp(argv[i], "--reps") == 0) {
      reps = std::max(1, std::atoi(argv[++i]));
    } else if (has_value && std::strcmp(argv[i], "--launches") == 0) {
      launches = std::max(1, std::atoi(argv[++i]));
    } else if (has_value && std::strcmp(argv[i], "--group") == 0) {
      group = std::max(1, std::atoi(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: %s [--reps N] [--launches N] [--group G]\n", argv[0]);
      return 2;
    }
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: nothing to measure\n");
    return 0;
  }
  cudaDeviceProp prop;
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  std::printf("device: %s, %d SMs\n", prop.name, sms);
  int* counters = nullptr;
  const int max_counters = 2 * sms;
  CUDA_OK(cudaMalloc(&counters, max_counters * sizeof(int)));
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  cudaEvent_t t0, t1;
  CUDA_OK(cudaEventCreate(&t0));
  CUDA_OK(cudaEventCreate(&t1));

  const Shape shapes[] = {{"2 x 256 thr / SM", 2, 256}, {"1 x 1024 thr / SM", 1, 1024}};
  const char* kinds[] = {"coop", "flag", "group"};
  const int step_counts[] = {0, 1, 4, 16};
  std::printf("%-18s %-6s %6s %8s | median us per launch at steps 0 / 1 / 4 / 16 | us per step\n",
              "grid", "kind", "blocks", "group");
  for (const Shape& sh : shapes) {
    int resident = 0;
    CUDA_OK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, StepKernel, sh.threads, 0));
    const int blocks = std::min(sh.blocks_per_sm, resident) * sms;
    for (int kind = kCoop; kind <= kGroup; ++kind) {
      const int g = kind == kGroup ? std::min(group, blocks) : blocks;
      std::vector<double> per_launch;
      for (int steps : step_counts) {
        std::vector<double> times;
        for (int r = 0; r < reps; ++r) {
          CUDA_OK(cudaEventRecord(t0, stream));
          for (int l = 0; l < launches; ++l) {
            CUDA_OK(cudaMemsetAsync(counters, 0, max_counters * sizeof(int), stream));
            int k = kind, st = steps, gg = g;
            void* args[] = {&k, &st, &gg, &counters};
            if (kind == kCoop) {
              CUDA_OK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(StepKernel), dim3(blocks),
                                                  dim3(sh.threads), args, 0, stream));
            } else {
              // Every block is resident (blocks <= what the SMs hold), so the spin cannot wait on
              // a block that never starts.
              CUDA_OK(cudaLaunchKernel(reinterpret_cast<void*>(StepKernel), dim3(blocks),
                                       dim3(sh.threads), args, 0, stream));
            }
          }
          CUDA_OK(cudaEventRecord(t1, stream));
          CUDA_OK(cudaEventSynchronize(t1));
          float ms = 0.f;
          CUDA_OK(cudaEventElapsedTime(&ms, t0, t1));
          times.push_back(1000.0 * ms / launches);
        }
        std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
        per_launch.push_back(times[times.size() / 2]);
      }
      // Least-squares slope over the step counts.
      double sx = 0, sy = 0, sxx = 0, sxy = 0;
      const int n = static_cast<int>(per_launch.size());
      for (int i = 0; i < n; ++i) {
        sx += step_counts[i];
        sy += per_launch[i];
        sxx += static_cast<double>(step_counts[i]) * step_counts[i];
        sxy += step_counts[i] * per_launch[i];
      }
      const double slope = (n * sxy - sx * sy) / (n * sxx - sx * sx);
      std::printf("%-18s %-6s %6d %8d | %8.2f %8.2f %8.2f %8.2f | %6.2f\n", sh.name, kinds[kind],
                  blocks, g, per_launch[0], per_launch[1], per_launch[2], per_launch[3], slope);
    }
  }
  CUDA_OK(cudaFree(counters));
  return 0;
}
