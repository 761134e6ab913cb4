// Synthetic contexts with the structure real keys have (each head's tokens gather around a few
// dozen directions), and queries that look mostly at one of them: for demos, tests, benchmarks.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"

namespace sqkv {

struct SyntheticOptions {
  int layers = 2;
  int kv_heads = 2;
  int q_heads = 8;     // a multiple of kv_heads
  int tokens = 2048;
  int head_dim = 64;
  DType dtype = DType::kBF16;
  int window = 16;     // q.<layer> window queries per layer; 0 writes none
  int topics = 24;     // key directions per head
  int n = 4;           // user query tokens per head in `queries`
  uint64_t seed = 7;
};

// Writes a safetensors context to `path` (k.<l>, v.<l>, and q.<l> when window > 0). With a
// non-null `queries`, also returns layer-0 user queries (q_heads, n, head_dim) float32.
Status WriteSyntheticContext(const SyntheticOptions& options, const std::string& path,
                             std::vector<float>* queries);

}  // namespace sqkv
