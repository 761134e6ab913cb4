// For the benchmarks that call the CUDA runtime themselves (events, copies, raw launches): a
// fail-fast check of each call. bench_util.h stays free of CUDA.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

// Ends the process with the file, line, call and CUDA's message unless `expr` (a cudaError_t) is
// cudaSuccess.
#define CUDA_OK(expr)                                                                            \
  do {                                                                                           \
    const cudaError_t _e = (expr);                                                               \
    if (_e != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(_e)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)
