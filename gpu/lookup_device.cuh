// Device helpers shared by the lookup kernels (gpu/lookup_*.cu). CUDA only; internal.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "gpu/lookup.h"

namespace sqkv::gpu::lookup_detail {

// Small path: centroids per block of the logits kernel.
inline constexpr int kSmallTile = 128;
// Large path: rows x entries per block tile of the tiled passes, and the d step.
inline constexpr int kTileRows = 64;
inline constexpr int kTileCols = 64;
inline constexpr int kTileK = 16;
inline constexpr int kTileThreads = 256;
// Selection: threads per segment block.
inline constexpr int kSelectThreads = 512;

// The carved workspace: where each region starts (device pointers).
struct Workspace {
  const int32_t* small_list = nullptr;
  const int32_t* large_list = nullptr;
  float* floats = nullptr;  // base of the float regions (LookupSegment::*_offset)
  int32_t* ints = nullptr;  // base of the int regions (candidate lists)
};

// The entries one scoring level works on. Flat or level 1: entries 0..total-1 of `prim`.
// Level 2 of a two-level run: entry e < scored is child list[e] (prim), e >= scored is pruned
// parent list[e] (extra): it only joins the normaliser.
struct EntrySet {
  const float* prim = nullptr;
  const int32_t* prim_size = nullptr;
  const float* extra = nullptr;
  const int32_t* extra_size = nullptr;
  const int32_t* list = nullptr;
  int scored = 0;
  int total = 0;
};

// level 1: the parents of a two-level run; level 2: what the segment's selection ranks.
__device__ inline EntrySet GetEntrySet(const LookupSegment& s, int level, const int32_t* ints) {
  EntrySet e;
  if (level == 1) {
    e.prim = s.l1_centroids;
    e.prim_size = s.l1_size;
    e.scored = e.total = s.num_l1;
    return e;
  }
  e.prim = s.centroids;
  e.prim_size = s.cluster_size;
  if (s.run != LookupRun::kTwoLevel) {
    e.scored = e.total = s.num_clusters;
    return e;
  }
  const int32_t* list = ints + s.list_offset;
  e.extra = s.l1_centroids;
  e.extra_size = s.l1_size;
  e.list = list;
  e.scored = list[s.entry_capacity];
  e.total = list[s.entry_capacity + 1];
  return e;
}

__device__ inline const float* EntryCentroid(const EntrySet& e, int i, int d) {
  if (e.list == nullptr) return e.prim + static_cast<size_t>(i) * d;
  const int id = e.list[i];
  return (i < e.scored ? e.prim : e.extra) + static_cast<size_t>(id) * d;
}

__device__ inline int EntrySize(const EntrySet& e, int i) {
  if (e.list == nullptr) return e.prim_size[i];
  return i < e.scored ? e.prim_size[e.list[i]] : e.extra_size[e.list[i]];
}

// Cluster id (level 2) or parent id (level 1) of a scored entry.
__device__ inline int EntryId(const EntrySet& e, int i) {
  return e.list == nullptr ? i : e.list[i];
}

// Whether a segment takes part in scoring level `level`.
__device__ inline bool ScoredAtLevel(const LookupSegment& s, int level) {
  if (level == 1) return s.run == LookupRun::kTwoLevel;
  return s.run != LookupRun::kFixed;
}

// Kernel launchers (lookup_score.cu, lookup_select.cu). Each enqueues on `stream` and returns the
// launch error.
cudaError_t LaunchSmallLogits(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                              int level, cudaStream_t stream);
cudaError_t LaunchLargeScores(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                              int level, cudaStream_t stream);
// The two tiled passes of lookup_tf32.cu (stats: pass 1, else pass 2).
cudaError_t LaunchTiledTf32(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                            int level, bool stats, float scale, cudaStream_t stream);
cudaError_t LaunchSelect(const LookupArgs& a, const LookupLayout& l, const Workspace& w, int level,
                         cudaStream_t stream);

}  // namespace sqkv::gpu::lookup_detail
