// Exact attention over pages, the CPU reference, and the attention state that lets partial
// results be merged.
//
// State of one query row: the normalised output o (head_dim) and lse = log Σ exp(s_i) over the
// keys attended, natural log, s_i = scale·q·k_i. An empty state has lse = -inf and o = 0; merging
// with it changes nothing.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace sqkv {

// One page of keys and values (layout in index/head_index.h) and how many of its slots are real.
struct PageRef {
  const void* data = nullptr;  // (2, page_tokens, head_dim) in the context's dtype
  int32_t valid = 0;           // 1..page_tokens
};

// out: (rows, head_dim), lse: (rows); q: (rows, head_dim) float32.
// Float32 accumulation, online softmax (running max), keys in page order.
// With num_pages == 0 every row gets the empty state.
void AttendPages(const float* q, int rows, int head_dim, float scale, DType dtype, int page_tokens,
                 const PageRef* pages, int num_pages, float* out, float* lse);

// Merges state b into state a, row by row, exactly:
//   lse = log(e^lse_a + e^lse_b), o = (e^(lse_a-lse) o_a + e^(lse_b-lse) o_b).
// out_a, out_b: (rows, head_dim); lse_a, lse_b: (rows). Empty states (-inf) are handled.
void MergeStates(float* out_a, float* lse_a, const float* out_b, const float* lse_b, int rows,
                 int head_dim);

}  // namespace sqkv
