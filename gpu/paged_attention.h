// Sparse paged attention on the device: the contract between the lookup (which writes page lists)
// and the attention kernels (which read them). Internal to gpu/; plain C++, streams as void*.
//
// Work is cut into segments: one segment = the query rows of one (request, kv head) over the pages
// selected for it. Query rows of a segment are contiguous: with q laid out (q_heads, n, head_dim),
// the rows of kv head h (query heads h*g .. h*g+g-1, g = q_heads / kv_heads) are the g*n rows
// starting at h*g*n.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"
#include "common/status.h"

namespace sqkv::gpu {

struct PagedAttentionArgs {
  DType dtype = DType::kBF16;  // storage dtype of the pool
  int head_dim = 128;          // 64 or 128
  int page_tokens = 16;        // token slots per page
  float scale = 0.f;           // usually 1/sqrt(head_dim)

  // Device: page p of the pool at pool + p * PageBytes(page_tokens, head_dim, dtype), laid out
  // K (page_tokens, head_dim) then V (page_tokens, head_dim).
  const void* pool = nullptr;

  int num_segments = 0;
  // All device arrays of length num_segments unless said otherwise.
  const int32_t* seg_q_row = nullptr;        // first row of the segment in q / out / lse
  const int32_t* seg_rows = nullptr;         // rows in the segment (g * n)
  const int32_t* seg_page_offset = nullptr;  // where the segment's list starts in page_ids/valid
  const int32_t* seg_page_count = nullptr;   // pages listed (written on the device by the lookup)
  // Device, indexed by seg_page_offset[s] + i for i < seg_page_count[s]:
  const int32_t* page_ids = nullptr;    // pool page
  const int32_t* page_valid = nullptr;  // real tokens in that page, 1..page_tokens

  // Host-side bounds used to size the grid (the device counts are not known on the host).
  int max_pages_per_segment = 0;
  int max_rows_per_segment = 0;

  const float* q = nullptr;  // device (total_rows, head_dim) float32
  float* out = nullptr;      // device (total_rows, head_dim) float32
  float* lse = nullptr;      // device (total_rows) float32, natural log; -inf for no pages

  void* workspace = nullptr;  // device scratch of PagedAttentionWorkspaceBytes(args) bytes

  // When true, the first attention kernel is a programmatic dependent launch: it may start while
  // the kernel enqueued just before it on the stream drains (the engine's lookup) and stage q
  // meanwhile; it waits for that kernel before reading seg_page_count, page_ids, page_valid or
  // the pool, and before writing anything. Set it only when that kernel writes none of q,
  // seg_q_row, seg_rows and seg_page_offset. Default: false (the stream's usual order).
  bool overlap_previous_kernel = false;

  // Prefill (more than 32 rows per segment) with 16-bit storage and head_dim 128 on a compute
  // capability 9.0 device (Hopper): the wgmma kernel; false: the mma.sync kernel every other
  // device runs. Same results up to float32 summation order. Default: true.
  bool wgmma = true;
};

// Scratch the launch needs for these args (split-K partial states and the like). Depends only on
// dtype, head_dim, page_tokens, num_segments and the two host bounds (and the device): the
// pointers may still be unset. 0 for arguments the launch would reject.
size_t PagedAttentionWorkspaceBytes(const PagedAttentionArgs& args);

// Enqueues the attention on `stream` (a cudaStream_t; nullptr = default stream). No host
// synchronisation; errors from the launch configuration come back as a Status.
Status LaunchPagedAttention(const PagedAttentionArgs& args, void* stream);

// Merges state b into state a on the device (see compute/attention.h for the formula).
// out_a, out_b: (rows, head_dim); lse_a, lse_b: (rows), natural log.
Status LaunchMergeStates(float* out_a, float* lse_a, const float* out_b, const float* lse_b,
                         int rows, int head_dim, void* stream);

}  // namespace sqkv::gpu
