// The staged selection: one block of kStageThreads per segment of a list, launched after the
// scoring kernels. Small (decode) segments: the scoring kernel (lookup_small.cu) wrote base-2
// logits and per-tile (max, normaliser), which this block finishes. Large (prefill) segments: the
// column pass (lookup_mma.cu, or lookup_score.cu for float32 centroids) wrote the final scores.
// The block
//   1. reads the segment's cluster sizes and page offsets (large: and scores) into shared memory
//      (coalesced, every thread's loads issued together) while, small, one warp per row combines
//      the tile statistics;
//   2. small: finishes the scores in shared memory (the first logits are loaded before the
//      statistics are combined, so both trips to L2 overlap);
//   3. finds the cut (lookup_select.cuh, FindCut: one radix digit, then the cut bin's entries
//      ranked against each other) over shared memory;
//   4. emits the selection in ascending id order: thread t decides a contiguous run of entries,
//      block scans give the output positions, then the selected clusters are written one per
//      thread (cluster id, its pages from the page table, valid counts).
// The arithmetic of the scores is that of FinishScores (lookup_small.cu), and the large scores are
// read as written, so both selections (this one and SelectSegment's) give the same outputs. The
// previous design walked 26-32 entries per thread with dependent global loads in the last scoring
// block (256 threads): bench/NOTES-gpu-lookup.md.
#include <cuda_runtime.h>

#include "gpu/device_cache.h"
#include "gpu/kernel_trace.cuh"
#include "gpu/lookup_select.cuh"
#include "gpu/paged_attention_common.cuh"

SQKV_TRACE_UNIT(lookup_staged)

namespace sqkv::gpu::lookup_detail {
namespace {

constexpr int kStageThreads = 1024;
constexpr int kStageWarps = kStageThreads / 32;
// Entries one thread decides in the emission: a bit mask holds them.
constexpr int kStageMaxPer = 32;
// Shared memory per cluster: score (reused for selected ids), size, page begin, output position.
constexpr size_t kStageBytesPerCluster = 16;
// Pages written per step of a selected cluster (their page-table loads issued together).
constexpr int kPageBatch = 4;

// R of StagedSelectKernel for large segments: nothing to finish, the scores are in the workspace.
constexpr int kScoresReady = 0;

// Dynamic shared memory of a block over segments of at most `clusters` clusters.
size_t StagedBytes(int clusters) {
  // page begins hold num_clusters + 1 entries; keep 16-byte alignment.
  return (static_cast<size_t>(clusters) * kStageBytesPerCluster + 16 + 15) / 16 * 16;
}

int MaxClusters(const LookupLayout& l, SegmentList list) {
  return list == SegmentList::kSmall ? l.max_small_clusters : l.max_large_clusters;
}

// FindCut's entries in shared memory.
struct SharedEntries {
  const float* score;
  const int* size;
  __device__ __forceinline__ uint32_t Bits(int i) const { return __float_as_uint(score[i]); }
  __device__ __forceinline__ int Size(int i) const { return size[i]; }
};

// R: the largest row count of the launch's small segments (4 or kLookupSmallRows), as the scoring
// kernel's variant; kScoresReady: the large list, whose scores are final in the workspace.
template <int R>
__global__ void __launch_bounds__(kStageThreads, 1) StagedSelectKernel(LookupArgs a, Workspace w) {
  extern __shared__ __align__(detail::kSmemAlign) unsigned char stage[];
  __shared__ SelectShared<kStageThreads> sh;
  __shared__ __align__(16) LookupSegment seg_sh;
  __shared__ float row_max[kLookupSmallRows];
  __shared__ float row_inv_z[kLookupSmallRows];
  constexpr int T = kStageThreads;
  const int t = threadIdx.x;
  constexpr bool kFinish = R != kScoresReady;  // scores to finish from logits
  SQKV_TRACE_START(TraceKernel::kStaged);
  // The attention that follows is a programmatic dependent: it waits for this grid's completion
  // before reading the page lists, so it may launch now and stage its queries on the free SMs.
  detail::GridDependencyTrigger();
  const int seg = kFinish ? SmallSegment(w, blockIdx.x) : w.large_list[blockIdx.x];
  {
    static_assert(sizeof(LookupSegment) % 4 == 0, "segment copied as words");
    constexpr int kWords = sizeof(LookupSegment) / 4;
    const auto* src = reinterpret_cast<const int32_t*>(a.segments + seg);
    if (t < kWords) reinterpret_cast<int32_t*>(&seg_sh)[t] = src[t];
  }
  __syncthreads();
  const LookupSegment& s = seg_sh;
  const int n = s.num_clusters;
  // kFlat otherwise (single-level launches); the large list holds scored segments only.
  const bool scored = s.run != LookupRun::kFixed;
  float* score = reinterpret_cast<float*>(stage);  // (n); selected ids after the decisions
  int* size = reinterpret_cast<int*>(stage) + n;   // (n)
  int* pbeg = size + n;                            // (n + 1)
  int* out_pos = pbeg + n + 1;                     // (n): page position of selected cluster c
  int* sel_id = reinterpret_cast<int*>(stage);     // (clusters selected), aliases score

  // 1. Sizes and page begins (index data: issued before waiting for the scoring kernel, which
  // this kernel follows as a programmatic dependent), then the row statistics (small: warps
  // 0..rows-1) or the scores (large) that kernel wrote. Beyond 4 * T entries a thread's first
  // kPreload are all loaded before any is stored, so they take one trip to memory: four at a
  // time, a 128K context's 6,554 clusters took two trips per thread, and the block reached its
  // wait about 2.5 us after the scoring kernel had finished.
  constexpr int kPreload = 8;
  CutPartials part;  // this thread's share of FindCut's token total (and, vectorised, its range)
  // Up to 4 * T entries the loop below has them in one trip anyway (four loads in flight).
  const int preloaded = n > 4 * T ? kPreload * T : 0;
  if (preloaded > 0) {
    int pre_size[kPreload], pre_beg[kPreload];
#pragma unroll
    for (int k = 0; k < kPreload; ++k) {
      const int i = t + k * T;
      pre_size[k] = i < n ? __ldg(s.cluster_size + i) : 0;
      pre_beg[k] = i <= n ? __ldg(s.cluster_page_begin + i) : 0;
    }
#pragma unroll
    for (int k = 0; k < kPreload; ++k) {
      const int i = t + k * T;
      if (i < n) size[i] = pre_size[k];
      if (i <= n) pbeg[i] = pre_beg[k];
      part.total += pre_size[k];  // 0 past n
    }
  }
#pragma unroll 4
  for (int i = t + preloaded; i <= n; i += T) {
    if (i < n) {
      size[i] = __ldg(s.cluster_size + i);
      part.total += size[i];
    }
    pbeg[i] = __ldg(s.cluster_page_begin + i);
  }
  detail::GridDependencyWait();
  SQKV_TRACE_WAIT(TraceKernel::kStaged);
  // Small: the first logits (all rows) are loaded before the row statistics are combined, so the
  // two trips to L2 overlap. kPer entries per thread a step, one at a time; or, up to
  // kLookupNarrowRows rows (the decode launch) and more entries than one such step holds,
  // groups of four consecutive entries, a 16-byte load per row (LogitStride keeps the rows
  // aligned), kVecGroups groups a thread a step (8,192 entries: a 128K-token context's 6,554
  // clusters at 5% in one step; the first step's second group is loaded after the combine, for
  // registers). The vectorised scores also give FindCut its range (CutPartials). Measured on the
  // H200, 128K decode b1: whole path 46.2 -> 44.3 us. Not below one step: at 32K (1,638
  // clusters) fewer threads with longer chains made decode b8 slower (+0.7 us, one A/B).
  constexpr int kPer = R >= kLookupSmallRows ? 1 : (R > 0 ? 16 / R : 1);
  constexpr int kRows = R > 0 ? R : 1;
  constexpr bool kVecCapable = R > 0 && R <= kLookupNarrowRows;
  constexpr int kVecGroups = 2;
  const bool vec = kVecCapable && scored && n > T * kPer;  // uniform over the block
  const size_t ld = static_cast<size_t>(LogitStride(s));
  const float* lg = w.floats + s.logit_offset;
  const int rows = s.rows;
  float l[kPer][kRows];
  float4 x[kVecCapable ? kVecGroups : 1][kRows];
  auto load_logits = [&](int base) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int i = base + j * T + t;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        l[j][r] = i < n && r < rows ? __ldcg(lg + r * ld + i) : 0.f;
      }
    }
  };
  // Groups k0 .. k1 - 1 of the step at group `base` (a group: four entries).
  auto load_groups = [&](int base, int k0, int k1) {
#pragma unroll
    for (int k = 0; k < (kVecCapable ? kVecGroups : 1); ++k) {
      if (k < k0 || k >= k1) continue;
      const int g = base + k * T + t;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        x[k][r] = 4 * g < n && r < rows ? __ldcg(reinterpret_cast<const float4*>(lg + r * ld) + g)
                                        : make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
  };
  if (kFinish && scored) {
    if (vec) {
      load_groups(0, 0, 1);
    } else {
      load_logits(0);
    }
    const int tiles = (n + kSmallTile - 1) / kSmallTile;
    CombineTileStats(s, w.floats, tiles, kStageWarps, row_max, row_inv_z);
  }
  if constexpr (!kFinish) {
    // The column pass's scores, with their bit range for FindCut (CutPartials), which then skips
    // its own pass over them.
    const float* ready = w.floats + s.score_offset;
#pragma unroll 4
    for (int i = t; i < n; i += T) {
      const float v = __ldcg(ready + i);
      score[i] = v;
      const uint32_t u = __float_as_uint(v);
      part.umin = min(part.umin, u);
      part.umax = max(part.umax, u);
    }
  }
  __syncthreads();

  // 2. Small: scores, kPer entries per thread per step, all their logits (kPer * R) loaded first.
  // (The large list is launched without score_only: its scores are the column pass's output.)
  if constexpr (kFinish) {
    if (scored && vec) {
      const float inv_rows = 1.f / static_cast<float>(rows);
      float rmax[kRows], rinv[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        rmax[r] = r < rows ? row_max[r] : 0.f;
        rinv[r] = r < rows ? row_inv_z[r] : 0.f;
      }
      for (int base = 0; 4 * base < n; base += T * kVecGroups) {
        load_groups(base, base > 0 ? 0 : 1, kVecGroups);
#pragma unroll
        for (int k = 0; k < (kVecCapable ? kVecGroups : 1); ++k) {
          const int i0 = 4 * (base + k * T + t);
          if (i0 >= n) continue;
          float out[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float sum = 0.f;
#pragma unroll
            for (int r = 0; r < R; ++r) {
              const float v = e == 0   ? x[k][r].x
                              : e == 1 ? x[k][r].y
                              : e == 2 ? x[k][r].z
                                       : x[k][r].w;
              if (r < rows) sum = AddRowScore(sum, v, rmax[r], rinv[r]);
            }
            out[e] = sum * inv_rows;
            if (i0 + e < n) {
              const uint32_t u = __float_as_uint(out[e]);
              part.umin = min(part.umin, u);
              part.umax = max(part.umax, u);
            }
          }
          if (i0 + 4 <= n) {
            *reinterpret_cast<float4*>(score + i0) = make_float4(out[0], out[1], out[2], out[3]);
          } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              if (i0 + e < n) score[i0 + e] = out[e];
            }
          }
        }
      }
    } else if (scored) {
      const float inv_rows = 1.f / static_cast<float>(rows);
      for (int base = 0; base < n; base += T * kPer) {
        if (base > 0) load_logits(base);
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const int i = base + j * T + t;
          if (i >= n) continue;
          float sum = 0.f;
#pragma unroll
          for (int r = 0; r < R; ++r) {
            if (r < rows) sum = AddRowScore(sum, l[j][r], row_max[r], row_inv_z[r]);
          }
          score[i] = sum * inv_rows;
        }
      }
    }
    if (scored) {
      __syncthreads();
      SQKV_TRACE_WAIT(TraceKernel::kStagedScored);
      if (a.score_only) {
        float* sc = w.floats + s.score_offset;
        for (int i = t; i < n; i += T) sc[i] = score[i];
        return;
      }
    } else if (a.score_only) {
      return;
    }
  }

  // 3. The cut (same rules as SelectSegment at level 2).
  Cut cut;
  if (!scored) {
    cut.rule = s.mode == LookupMode::kDense ? Rule::kAll : Rule::kNone;
  } else if (s.mode != LookupMode::kBudget) {
    cut.rule = Rule::kThreshold;
    cut.threshold = s.threshold;
  } else if (s.budget > 0) {
    part.known = vec || !kFinish;
    cut = FindCut<T>(SharedEntries{score, size}, n, s.budget, sh, part);
  }
  SQKV_TRACE_WAIT(TraceKernel::kStagedCut);

  // 4. Emission. Thread t decides entries [i0, i0 + cnt), ascending.
  const int per = (n + T - 1) / T;  // <= kStageMaxPer (UseStagedSelect)
  const int i0 = min(n, t * per);
  const int cnt = min(per, n - i0);
  int tb = 0;  // tokens of tied entries before the next one of this thread
  if (cut.rule == Rule::kCut && !cut.unique) {  // uniform over the block
    int tie[1] = {0};
    int tie_total[1];
    for (int j = 0; j < cnt; ++j) {
      if (IsTie(cut, score[i0 + j])) tie[0] += size[i0 + j];
    }
    BlockExclusiveScan<T, 1>(tie, tie_total, sh.scan);
    tb = tie[0];
  }
  uint32_t mask = 0;
  int v[3] = {0, 0, 0};  // pages, clusters, tokens
  for (int j = 0; j < cnt; ++j) {
    const int i = i0 + j;
    const float sc = scored ? score[i] : 0.f;
    const int tokens = size[i];
    if (Selected(cut, sc, tb)) {
      mask |= 1u << j;
      v[0] += pbeg[i + 1] - pbeg[i];
      v[1] += 1;
      v[2] += tokens;
    }
    if (IsTie(cut, sc)) tb += tokens;
  }
  int tot[3];
  BlockExclusiveScan<T, 3>(v, tot, sh.scan);  // ends with a barrier: scores are no longer read
  SQKV_TRACE_WAIT(TraceKernel::kStagedDecided);
  int pos = v[0], cpos = v[1];
  while (mask != 0) {
    const int i = i0 + __ffs(mask) - 1;
    mask &= mask - 1;
    sel_id[cpos] = i;
    out_pos[cpos] = pos;
    pos += pbeg[i + 1] - pbeg[i];
    ++cpos;
  }
  __syncthreads();
  const int pt = a.page_tokens;
  const int cap = s.page_capacity;
  const int clusters = tot[1];
  for (int c = t; c < clusters; c += T) {
    const int id = sel_id[c];
    a.cluster_ids[s.cluster_offset + c] = id;
    const int first = pbeg[id];
    const int pages = pbeg[id + 1] - first;
    const int tokens = size[id];
    const int at = out_pos[c];
    for (int p0 = 0; p0 < pages && at + p0 < cap; p0 += kPageBatch) {
      int ids[kPageBatch];
#pragma unroll
      for (int k = 0; k < kPageBatch; ++k) {
        const int p = p0 + k;
        ids[k] = p < pages && at + p < cap ? __ldg(s.page_table + first + p) : 0;
      }
#pragma unroll
      for (int k = 0; k < kPageBatch; ++k) {
        const int p = p0 + k;
        if (p < pages && at + p < cap) {
          a.page_ids[s.page_offset + at + p] = ids[k];
          const int rest = tokens - p * pt;
          a.page_valid[s.page_offset + at + p] = rest < pt ? rest : pt;
        }
      }
    }
  }
  if (t == 0) {
    a.seg_page_count[seg] = tot[0] < cap ? tot[0] : cap;
    a.seg_cluster_count[seg] = tot[1];
    a.seg_tokens[seg] = tot[2];
    a.seg_scored[seg] =
        s.run == LookupRun::kFlat ? s.num_clusters + s.scored_extra : s.scored_fixed;
  }
  SQKV_TRACE_END(TraceKernel::kStaged);
}

// The dynamic shared memory a StagedSelectKernel<R> block may take on the current device (0: the
// staged selection is unavailable). The first call per device raises the kernel's limit to it
// (outside any graph capture in practice: the first lookup of a process runs before captures).
template <int R>
size_t StagedLimit() {
  static detail::DeviceCache cache;
  const int limit = detail::PerDevice(cache, [](int dev) {
    int optin = 0;
    cudaFuncAttributes attr;
    int lim = 0;
    if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) ==
            cudaSuccess &&
        cudaFuncGetAttributes(&attr, StagedSelectKernel<R>) == cudaSuccess &&
        static_cast<size_t>(optin) > attr.sharedSizeBytes) {
      lim = optin - static_cast<int>(attr.sharedSizeBytes);
      if (cudaFuncSetAttribute(StagedSelectKernel<R>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               lim) != cudaSuccess) {
        lim = 0;
      }
    }
    cudaGetLastError();  // a failed query leaves the global-memory path, not an error
    return lim;
  });
  return limit > 0 ? static_cast<size_t>(limit) : 0;
}

template <int R>
cudaError_t LaunchStagedR(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                          SegmentList list, cudaStream_t stream) {
  const size_t segs = list == SegmentList::kSmall ? l.small_list.size() : l.large_list.size();
  // A programmatic dependent of the scoring kernel before it: its blocks may start (and stage the
  // index data) while that kernel's last blocks finish; GridDependencyWait orders the rest.
  return detail::LaunchMaybeDependent(StagedSelectKernel<R>, dim3(static_cast<unsigned>(segs)),
                                      dim3(kStageThreads), StagedBytes(MaxClusters(l, list)),
                                      stream, /*dependent=*/true, a, w);
}

// The kernel variant for a list: kScoresReady for the large list, else by the small rows.
int VariantRows(const LookupLayout& l, SegmentList list) {
  if (list == SegmentList::kLarge) return kScoresReady;
  return l.max_small_rows <= kLookupNarrowRows ? kLookupNarrowRows : kLookupSmallRows;
}

}  // namespace

bool UseStagedSelect(const LookupArgs& a, const LookupLayout& l, SegmentList list) {
  const bool empty = list == SegmentList::kSmall ? l.small_list.empty() : l.large_list.empty();
  if (!a.staged_select || l.any_hierarchical || empty) return false;
  const int clusters = MaxClusters(l, list);
  if (clusters > kStageThreads * kStageMaxPer) return false;
  size_t limit = 0;
  switch (VariantRows(l, list)) {
    case kScoresReady:
      limit = StagedLimit<kScoresReady>();
      break;
    case kLookupNarrowRows:
      limit = StagedLimit<kLookupNarrowRows>();
      break;
    default:
      limit = StagedLimit<kLookupSmallRows>();
  }
  return StagedBytes(clusters) <= limit;
}

cudaError_t LaunchStagedSelect(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                               SegmentList list, cudaStream_t stream) {
  switch (VariantRows(l, list)) {
    case kScoresReady:
      return LaunchStagedR<kScoresReady>(a, l, w, list, stream);
    case kLookupNarrowRows:
      return LaunchStagedR<kLookupNarrowRows>(a, l, w, list, stream);
    default:
      return LaunchStagedR<kLookupSmallRows>(a, l, w, list, stream);
  }
}

}  // namespace sqkv::gpu::lookup_detail
