// Device helpers shared by the lookup kernels (gpu/lookup_*.cu). CUDA only; internal.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "gpu/lookup.h"

namespace sqkv::gpu::lookup_detail {

// Fused small (decode) kernel: threads per block, centroids per block tile (16 per warp).
inline constexpr int kSmallThreads = 256;
inline constexpr int kSmallTile = 128;
// Floats between a small segment's logit rows (LookupSegment::logit_offset): whole tiles, so every
// row starts on a 128-byte boundary (as the region offsets do) and can be read four entries at a
// time.
template <class Segment>  // LookupSegment or SmallScoreDesc
__host__ __device__ inline int64_t LogitStride(const Segment& s) {
  return static_cast<int64_t>(s.tiles) * kSmallTile;
}
// Large path, float32 centroids: rows x entries per block tile of the tiled passes, the d step.
inline constexpr int kTileRows = 64;
inline constexpr int kTileCols = 64;
inline constexpr int kTileK = 16;
inline constexpr int kTileThreads = 256;
// Large path, 16-bit centroids: a pass 1 block holds 128 query rows, a pass 2 block 128 entries,
// as A fragments in registers (two m16 tiles per warp, so each streamed B fragment feeds four mma;
// one at head_dim > 128). The streamed dimension is cut into pieces (kLookupPieceEntries,
// kLookupPieceRows).
inline constexpr int kMmaRowTile = 128;
inline constexpr int kMmaColTile = 128;
// The wgmma passes (sm_90a) give a pass-1 block two row tiles (256 query rows, one block per SM)
// and a pass-2 block one entry tile (two blocks per SM); gpu/lookup_wgmma_sm90a.cu.
inline constexpr int kWgmmaRowPassTiles = 2;
inline constexpr int kWgmmaColPassTiles = 1;
// Resident blocks per SM of a wgmma pass whose blocks take `tiles` tiles: 256 threads of 128
// registers per tile.
constexpr int WgmmaPassBlocksPerSm(int tiles) { return 2 / tiles; }
// Selection kernel of the float32 large path: threads per segment block.
inline constexpr int kSelectThreads = 256;

// The carved workspace: where each region starts (device pointers).
struct Workspace {
  const int32_t* small_list = nullptr;  // null: the identity (every segment is small)
  const int32_t* large_list = nullptr;
  int32_t* counters = nullptr;  // (num_segments) arrival counters, zero between launches
  float* floats = nullptr;      // base of the float regions (LookupSegment::*_offset)
  int32_t* ints = nullptr;      // base of the int regions (candidate lists)
};

// Segment id of entry i of the small list. A null list is the identity, the common decode case
// (every segment small), which spares the small kernels one dependent load before their first.
__device__ __forceinline__ int SmallSegment(const Workspace& w, int i) {
  return w.small_list == nullptr ? i : w.small_list[i];
}

// The entries one scoring level works on. Flat or level 1: entries 0..total-1 of `prim`.
// Level 2 of a two-level run: entry e < scored is child list[e] (prim), e >= scored is pruned
// parent list[e] (extra): it only joins the normaliser. prim / extra point at float32 or binary16
// rows of `row_bytes` bytes.
struct EntrySet {
  const uint8_t* prim = nullptr;
  const int32_t* prim_size = nullptr;
  const uint8_t* extra = nullptr;
  const int32_t* extra_size = nullptr;
  const int32_t* list = nullptr;
  int row_bytes = 0;
  int scored = 0;
  int total = 0;
};

// level 1: the parents of a two-level run; level 2: what the segment's selection ranks.
// f16: use the 16-bit centroid copies.
__device__ inline EntrySet GetEntrySet(const LookupSegment& s, int level, const int32_t* ints,
                                       int d, bool f16) {
  EntrySet e;
  e.row_bytes = d * (f16 ? 2 : 4);
  const void* cent = f16 ? static_cast<const void*>(s.centroids_f16) : s.centroids;
  const void* l1 = f16 ? static_cast<const void*>(s.l1_centroids_f16) : s.l1_centroids;
  if (level == 1) {
    e.prim = static_cast<const uint8_t*>(l1);
    e.prim_size = s.l1_size;
    e.scored = e.total = s.num_l1;
    return e;
  }
  e.prim = static_cast<const uint8_t*>(cent);
  e.prim_size = s.cluster_size;
  if (s.run != LookupRun::kTwoLevel) {
    e.scored = e.total = s.num_clusters;
    return e;
  }
  const int32_t* list = ints + s.list_offset;
  e.extra = static_cast<const uint8_t*>(l1);
  e.extra_size = s.l1_size;
  e.list = list;
  e.scored = list[s.entry_capacity];
  e.total = list[s.entry_capacity + 1];
  return e;
}

// The centroid row of entry i (float32 or binary16, as the set was made).
__device__ inline const void* EntryRow(const EntrySet& e, int i) {
  if (e.list == nullptr) return e.prim + static_cast<size_t>(i) * e.row_bytes;
  const int id = e.list[i];
  return (i < e.scored ? e.prim : e.extra) + static_cast<size_t>(id) * e.row_bytes;
}

__device__ inline const float* EntryCentroid(const EntrySet& e, int i) {
  return static_cast<const float*>(EntryRow(e, i));
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

// Whether a segment takes part in level `level` at all (level 2: every segment selects).
__device__ inline bool AtLevel(const LookupSegment& s, int level) {
  return level == 2 || s.run == LookupRun::kTwoLevel;
}

// Arrival of one block of a segment's grid row: every thread's global writes are made visible,
// then one atomic increment. True in the last block to arrive (of `blocks`), which also resets
// the counter for the next launch; the fences order the others' writes before its reads.
// Every thread of the block must call it; flag: a shared int.
__device__ inline bool ArriveLast(int32_t* counter, int blocks, int* flag) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const int old = atomicAdd(counter, 1);
    *flag = old == blocks - 1;
    if (*flag) *counter = 0;
    __threadfence();
  }
  __syncthreads();
  return *flag != 0;
}

// q rows go to binary16 after a per-row power-of-two scale 2^e2 that puts the largest |component|
// in [2^14, 2^15), so nothing overflows and small components keep their precision; both the large
// path (ConvertQKernel) and the decode tensor-core scorer (LoadMmaQuery) round q this way. e2 of a
// row whose largest |component| is max_abs (0 for a zero row).
__device__ __forceinline__ int QRowExponent(float max_abs) {
  int ex = 0;
  frexpf(max_abs, &ex);  // max_abs = f · 2^ex, f in [0.5, 1)
  return max_abs > 0.f ? 15 - ex : 0;
}

// Room for a kernel's LookupArgs and Workspace in shared memory: the last block copies its
// parameters there before calling the out-of-line finishing functions by reference (a reference to
// a kernel parameter would make every thread of every block copy the parameters to local memory).
struct alignas(16) ArgsBuffer {
  unsigned char bytes[sizeof(LookupArgs) + sizeof(Workspace)];
  __device__ LookupArgs& args() { return *reinterpret_cast<LookupArgs*>(bytes); }
  __device__ Workspace& ws() { return *reinterpret_cast<Workspace*>(bytes + sizeof(LookupArgs)); }
  // The whole block calls it; a and w are the kernel's parameters.
  __device__ __forceinline__ void Fill(const LookupArgs& a, const Workspace& w) {
    if (threadIdx.x == 0) {
      args() = a;
      ws() = w;
    }
    __syncthreads();
  }
};
static_assert(sizeof(LookupArgs) % alignof(Workspace) == 0, "Workspace follows LookupArgs");

// Kernel launchers. Each enqueues on `stream` and returns the launch error.
// The small-segment kernels (lookup_small.cu): scores, then the selection (in the last block, or
// by the staged selection kernel).
cudaError_t LaunchSmall(const LookupArgs& a, const LookupLayout& l, const Workspace& w, int level,
                        cudaStream_t stream);
// The staged selection (lookup_staged.cu) of the small list (after the scoring kernel ran with
// finish = false) or of the large list (after the column pass wrote the scores, without its
// last-block selection): whether this launch takes it (LookupArgs::staged_select, single level,
// shared memory enough), and its kernel.
enum class SegmentList : int { kSmall, kLarge };
bool UseStagedSelect(const LookupArgs& a, const LookupLayout& l, SegmentList list);
cudaError_t LaunchStagedSelect(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                               SegmentList list, cudaStream_t stream);
// Large path, float32 centroids (lookup_score.cu): the tiled passes into scores; then the
// selection kernel (lookup_select.cu), or the staged selection where the batch allows it.
cudaError_t LaunchLargeScoresF32(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                                 int level, cudaStream_t stream);
cudaError_t LaunchSelectLarge(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                              int level, cudaStream_t stream);
// Large path, 16-bit centroids (lookup_mma.cu): q to binary16 once per launch, then per level the
// row-statistics pass and the column pass, then the staged selection where the batch allows it,
// else the column pass's last block per segment selects.
cudaError_t LaunchConvertQ(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                           cudaStream_t stream);
cudaError_t LaunchLargeF16(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                           int level, cudaStream_t stream);
// The same passes on wgmma (lookup_wgmma_sm90a.cu, built for sm_90a only): head_dim <= 128 on a
// compute capability 9.0 device. LaunchLargeF16 takes it where LookupArgs::wgmma allows.
cudaError_t LaunchLargeWgmma(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                             int level, cudaStream_t stream);

}  // namespace sqkv::gpu::lookup_detail
