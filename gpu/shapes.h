// The shapes the GPU kernels run, in plain C++ (no CUDA types), for callers that choose between
// the GPU and the CPU before they reach the engine, and for the kernels' own checks.
#pragma once

namespace sqkv::gpu {

// Page sizes the paged attention kernels take: a multiple of 8 tokens, at most 1,024 (which keeps
// page_id * 2 * page_tokens in 32 bits for large pools).
inline constexpr int kPageTokensQuantum = 8;
inline constexpr int kMaxPageTokens = 1024;

inline bool AttentionRunsHeadDim(int head_dim) { return head_dim == 64 || head_dim == 128; }

inline bool AttentionRunsPageTokens(int page_tokens) {
  return page_tokens >= kPageTokensQuantum && page_tokens % kPageTokensQuantum == 0 &&
         page_tokens <= kMaxPageTokens;
}

}  // namespace sqkv::gpu
