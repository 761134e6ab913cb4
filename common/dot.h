// Float32 dot product for the CPU paths' small products (decode-sized batches), where a BLAS
// call costs more than it saves. Header-only so that it is compiled inside each caller: the
// callers are built for AVX2 + FMA and for the baseline (target_clones), and this body inherits
// the caller's target.
#pragma once

#include <cstddef>

// On x86-64, a function marked SQKV_CPU_CLONES is built twice (AVX2 + FMA, and the baseline) and
// the loader picks the one the CPU runs; elsewhere it is built once.
#if defined(__x86_64__) && defined(__GNUC__)
#define SQKV_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SQKV_CPU_CLONES
#endif

namespace sqkv {

// Σ a[i]·b[i] over n components with kDotLanes independent partial sums (vectorised without
// reassociating anything), added pairwise at the end. Differs from a sequential sum only in
// float32 rounding.
inline constexpr int kDotLanes = 16;
[[gnu::always_inline]] inline float Dot(const float* a, const float* b, size_t n) {
  float acc[kDotLanes] = {};
  size_t i = 0;
  for (; i + kDotLanes <= n; i += kDotLanes) {
    for (int j = 0; j < kDotLanes; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * b[i];
  for (int w = kDotLanes / 2; w > 0; w /= 2) {
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  }
  return acc[0] + tail;
}

}  // namespace sqkv
