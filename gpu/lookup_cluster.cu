// The one-launch lookup of small (decode) segments: a thread-block cluster of G blocks per segment
// scores, selects and emits, exchanging what must be shared through distributed shared memory
// (DSMEM) and cluster barriers instead of the workspace and a second launch. See gpu/lookup.h.
//
// Block k of a segment's cluster owns the scoring tiles [k·T/G, (k+1)·T/G) (T = tiles of the
// segment) and the entries under them:
//   1. it puts the centroid rows of its first tiles in flight into shared memory (cp.async, up to
//      kMaxRing tiles ahead), stages its entries' sizes and page offsets, and scores each tile with
//      the tile of lookup_tile.cuh as its rows land, keeping the logits and per-tile
//      (max, normaliser) in shared memory;                                   — cluster barrier
//   2. every block combines all tiles' statistics (read through DSMEM, in the order FinishScores
//      uses) and finishes its own entries' scores: bit for bit the scores of the other paths;
//   3. the cut of a keep budget is the weighted radix select of FindCut, distributed: per digit
//      each block builds the histogram of its entries (barrier), sums one slice of the bins over
//      all blocks' histograms and publishes the slice total (barrier); every block then finds the
//      slice that holds the cut and the digit inside it, the same in all blocks;
//                                                           — two cluster barriers per digit
//   4. emission in ascending id: the tokens of tied entries before each block and the pages,
//      clusters and tokens selected before it come from the lower-ranked blocks' published
//      totals (DSMEM, one barrier each); each block writes its own selected clusters' pages.
//                                                   — a last barrier keeps shared memory alive
// Every branch that reaches a cluster barrier is uniform over the cluster.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>

#include "gpu/lookup_select.cuh"
#include "gpu/lookup_tile.cuh"
#include "gpu/paged_attention_common.cuh"

namespace cg = cooperative_groups;

namespace sqkv::gpu::lookup_detail {
namespace {

constexpr int kThreads = kSmallThreads;
constexpr int kWarps = kSmallWarps;
constexpr int kMaxCluster = 16;
// Entries one thread decides in the emission (a bit mask holds them).
constexpr int kMaxPer = 32;
// Centroid rows staged in shared memory ahead of the scoring: up to this many tiles in flight, for
// tiles of at most kMaxStagedTileBytes (binary16, head_dim <= 128: the engine's storage).
constexpr int kMaxRing = 4;
constexpr int kMaxStagedTileBytes = 32 * 1024;

// Published by each block for the others (read through DSMEM after a barrier; each field is
// written once, before the barrier that publishes it).
struct Range {
  uint32_t umin, umax;  // score bits
  int total;            // tokens of the block's entries
};
struct Totals {
  int pages, clusters, tokens;
};

// Launch shape: G blocks per segment, each at most `tiles` scoring tiles.
struct Shape {
  int g = 1;
  int tiles = 1;       // max tiles per block
  int rows = 4;        // R of the kernel variant
  int ring = 0;        // tiles staged ahead in shared memory (0: loads straight from global)
  int tile_bytes = 0;  // kSmallTile centroid rows
};

// Dynamic shared memory of a block, in 16-byte aligned regions.
struct Layout {
  size_t logits, stats, score, size, pbeg, out_pos, sel, hist, red, ring, bytes;
};

size_t Al(size_t x) { return (x + 15) / 16 * 16; }

Layout MakeLayout(const Shape& sh) {
  const size_t ecap = static_cast<size_t>(sh.tiles) * kSmallTile;
  Layout l;
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t r = at;
    at += Al(bytes);
    return r;
  };
  l.logits = take(ecap * sh.rows * 4);
  l.stats = take(static_cast<size_t>(sh.tiles) * sh.rows * 2 * 4);
  l.score = take(ecap * 4);
  l.size = take(ecap * 4);
  l.pbeg = take((ecap + 1) * 4);
  l.out_pos = take(ecap * 4);
  l.sel = take(ecap * 4);
  l.hist = take(kRadixBins * 4);
  l.red = take(kRadixBins * 4);
  l.ring = take(static_cast<size_t>(sh.ring) * sh.tile_bytes);
  l.bytes = at;
  return l;
}

// Which block of the cluster owns tile c (of T over G blocks: block k owns [k·T/G, (k+1)·T/G)).
__device__ __forceinline__ int TileOwner(int c, int T, int G) { return ((c + 1) * G + T - 1) / T - 1; }
__device__ __forceinline__ int FirstTile(int k, int T, int G) { return k * T / G; }

template <typename C, int R, int kLpc>
__global__ void __launch_bounds__(kThreads, 1)
    ClusterKernel(LookupArgs a, Workspace w, Shape shape, Layout lay) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float lgs[R][kSmallTile];
  __shared__ __align__(16) LookupSegment seg_sh;
  __shared__ SelectShared<kThreads> sh;
  __shared__ Range pub_range, all_range[kMaxCluster];
  __shared__ int pub_ties, pub_slice, all_slice[kMaxCluster];
  __shared__ Totals pub_totals, all_totals[kMaxCluster];
  __shared__ float row_max[kLookupSmallRows];
  __shared__ float row_inv_z[kLookupSmallRows];
  constexpr bool kF16 = std::is_same_v<C, uint16_t>;
  cg::cluster_group cluster = cg::this_cluster();
  const int G = shape.g;
  const int rank = static_cast<int>(cluster.block_rank());
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int seg = w.small_list[blockIdx.x / G];
  {
    static_assert(sizeof(LookupSegment) % 4 == 0, "segment copied as words");
    constexpr int kWords = sizeof(LookupSegment) / 4;
    const auto* src = reinterpret_cast<const int32_t*>(a.segments + seg);
    if (t < kWords) reinterpret_cast<int32_t*>(&seg_sh)[t] = src[t];
  }
  const size_t ecap = static_cast<size_t>(shape.tiles) * kSmallTile;
  float* logits = reinterpret_cast<float*>(smem + lay.logits);  // (R, ecap)
  float* stats = reinterpret_cast<float*>(smem + lay.stats);    // (R, tiles, 2)
  float* score = reinterpret_cast<float*>(smem + lay.score);
  int* size = reinterpret_cast<int*>(smem + lay.size);
  int* pbeg = reinterpret_cast<int*>(smem + lay.pbeg);
  int* out_pos = reinterpret_cast<int*>(smem + lay.out_pos);
  int* sel = reinterpret_cast<int*>(smem + lay.sel);
  int* hist = reinterpret_cast<int*>(smem + lay.hist);
  int* red = reinterpret_cast<int*>(smem + lay.red);
  unsigned char* ring = smem + lay.ring;
  __syncthreads();
  const LookupSegment& s = seg_sh;
  const int n = s.num_clusters;
  const int T = (n + kSmallTile - 1) / kSmallTile;
  const int t0 = min(T, FirstTile(rank, T, G)), t1 = min(T, FirstTile(rank + 1, T, G));
  const int e0 = t0 * kSmallTile, e1 = min(n, t1 * kSmallTile);
  const int ne = max(0, e1 - e0);
  const bool scored = s.run != LookupRun::kFixed;  // kFlat otherwise (single-level launches)
  const EntrySet e = GetEntrySet(s, 2, w.ints, a.head_dim, kF16);

  // 1. Centroid rows of the first tiles in flight, sizes and page offsets, then the tiles (each
  // waits for its rows, is scored from shared memory, and frees its slot for a later tile).
  const int mine = t1 - t0;
  const int slots = scored ? min(shape.ring, mine) : 0;
  auto issue = [&](int lt) {  // tile t0 + lt into slot lt % slots, one commit group
    const int base = (t0 + lt) * kSmallTile;
    const int chunks = min(kSmallTile, n - base) * e.row_bytes / 16;
    const unsigned char* src = e.prim + static_cast<size_t>(base) * e.row_bytes;
    const uint32_t dst = detail::SmemAddr(ring + static_cast<size_t>(lt % slots) * shape.tile_bytes);
    for (int c = t; c < chunks; c += kThreads) detail::CpAsync16(dst + 16 * c, src + 16 * c, 16);
    detail::CpAsyncCommit();
  };
  int issued = 0;
  for (; issued < slots; ++issued) issue(issued);
  for (int i = t; i <= ne; i += kThreads) {
    if (i < ne) size[i] = __ldg(s.cluster_size + e0 + i);
    pbeg[i] = __ldg(s.cluster_page_begin + e0 + i);
  }
  if (scored) {
    for (int lt = 0; lt < mine; ++lt) {
      const unsigned char* staged = nullptr;
      if (slots > 0) {
        switch (issued - lt - 1) {  // groups that may stay in flight: the later tiles'
          case 0: detail::CpAsyncWait<0>(); break;
          case 1: detail::CpAsyncWait<1>(); break;
          case 2: detail::CpAsyncWait<2>(); break;
          default: detail::CpAsyncWait<kMaxRing - 1>(); break;
        }
        __syncthreads();  // every thread's copies of this tile
        staged = ring + static_cast<size_t>(lt % slots) * shape.tile_bytes;
      }
      ScoreTile<C, R, kLpc>(a, s, e, (t0 + lt) * kSmallTile, lgs, logits + lt * kSmallTile, ecap,
                            stats + 2 * lt, static_cast<size_t>(shape.tiles) * 2, staged);
      __syncthreads();  // lgs and the slot are rewritten by later tiles
      if (slots > 0 && issued < mine) issue(issued++);
    }
  }
  cluster.sync();  // every block's tile statistics

  // 2. Row statistics over all tiles (FinishScores' order), then this block's scores.
  if (scored) {
    for (int r = warp; r < s.rows; r += kWarps) {
      float m = -INFINITY;
      for (int c = lane; c < T; c += 32) {
        const int k = TileOwner(c, T, G);
        const float* st = cluster.map_shared_rank(stats, k);
        m = fmaxf(m, st[static_cast<size_t>(r) * shape.tiles * 2 + 2 * (c - FirstTile(k, T, G))]);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      float z = 0.f;
      for (int c = lane; c < T; c += 32) {
        const int k = TileOwner(c, T, G);
        const float* st = cluster.map_shared_rank(stats, k) + static_cast<size_t>(r) *
                                                                   shape.tiles * 2 +
                          2 * (c - FirstTile(k, T, G));
        z += st[1] * exp2f(st[0] - m);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) z += __shfl_xor_sync(0xffffffffu, z, o);
      if (lane == 0) {
        row_max[r] = m;
        row_inv_z[r] = 1.f / z;  // z >= the size of the arg-max entry >= 1
      }
    }
    __syncthreads();
    const int rows = s.rows;
    const float inv_rows = 1.f / static_cast<float>(rows);
    for (int i = t; i < ne; i += kThreads) {
      float sum = 0.f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < rows) {
          sum = __fmaf_rn(exp2f(logits[r * ecap + i] - row_max[r]), row_inv_z[r], sum);
        }
      }
      score[i] = sum * inv_rows;
    }
    __syncthreads();
    if (a.score_only) {
      float* sc = w.floats + s.score_offset + e0;
      for (int i = t; i < ne; i += kThreads) sc[i] = score[i];
    }
  }
  if (a.score_only) {
    cluster.sync();  // the others may still read this block's statistics
    return;
  }

  // 3. The cut (the rules of SelectSegment at level 2).
  Cut cut;
  if (!scored) {
    cut.rule = s.mode == LookupMode::kDense ? Rule::kAll : Rule::kNone;
  } else if (s.mode != LookupMode::kBudget) {
    cut.rule = Rule::kThreshold;
    cut.threshold = s.threshold;
  } else if (s.budget > 0) {
    uint32_t umin = 0xffffffffu, umax = 0;
    int total = 0;
    for (int i = t; i < ne; i += kThreads) {
      const uint32_t u = __float_as_uint(score[i]);
      umin = min(umin, u);
      umax = max(umax, u);
      total += size[i];
    }
    umin = __reduce_min_sync(0xffffffffu, umin);
    umax = __reduce_max_sync(0xffffffffu, umax);
    total = __reduce_add_sync(0xffffffffu, total);
    if (lane == 0) {
      sh.red_min[warp] = umin;
      sh.red_max[warp] = umax;
      sh.red_sum[warp] = total;
    }
    __syncthreads();
    if (t == 0) {
      Range p{0xffffffffu, 0, 0};
      for (int x = 0; x < kWarps; ++x) {
        p.umin = min(p.umin, sh.red_min[x]);
        p.umax = max(p.umax, sh.red_max[x]);
        p.total += sh.red_sum[x];
      }
      pub_range = p;
    }
    cluster.sync();  // every block's (min, max, tokens)
    if (t < G) all_range[t] = *cluster.map_shared_rank(&pub_range, t);
    __syncthreads();
    umin = 0xffffffffu;
    umax = 0;
    total = 0;
    for (int k = 0; k < G; ++k) {
      umin = min(umin, all_range[k].umin);
      umax = max(umax, all_range[k].umax);
      total += all_range[k].total;
    }
    if (total <= s.budget) {
      cut.rule = Rule::kAll;
    } else {
      cut.rule = Rule::kCut;
      int rem = s.budget;
      int shift = 32 - __clz(static_cast<int>(umin ^ umax));
      uint32_t prefix = shift >= 32 ? 0u : (umin >> shift) << shift;
      constexpr int kPer = (kRadixBins + kThreads - 1) / kThreads;
      while (shift > 0) {
        const int width = min(kRadixBits, shift);
        shift -= width;
        const int hi = shift + width;
        const int bins = 1 << width;
        for (int i = t; i < bins; i += kThreads) hist[i] = 0;
        __syncthreads();
        for (int i = t; i < ne; i += kThreads) {
          const uint32_t u = __float_as_uint(score[i]);
          if (hi >= 32 || (u >> hi) == (prefix >> hi)) {
            atomicAdd(&hist[(u >> shift) & (bins - 1)], size[i]);
          }
        }
        cluster.sync();  // every block's histogram of this digit
        // This block sums the slice [lo, hi) of descending positions (bin = bins - 1 - position)
        // over the cluster's histograms; the slices' totals are published.
        const int lo = rank * bins / G, up = (rank + 1) * bins / G;
        int part = 0;
        for (int pos = lo + t; pos < up; pos += kThreads) {
          int sum = 0;
          for (int k = 0; k < G; ++k) sum += cluster.map_shared_rank(hist, k)[bins - 1 - pos];
          red[pos - lo] = sum;
          part += sum;
        }
        part = __reduce_add_sync(0xffffffffu, part);
        if (lane == 0) sh.red_sum[warp] = part;
        __syncthreads();
        if (t == 0) {
          int sum = 0;
          for (int x = 0; x < kWarps; ++x) sum += sh.red_sum[x];
          pub_slice = sum;
        }
        cluster.sync();  // every slice and its total
        // The slice that holds the cut (the same in every block), then its digit.
        if (t < G) all_slice[t] = *cluster.map_shared_rank(&pub_slice, t);
        __syncthreads();
        int ks = 0, before_slice = 0;
        while (ks < G - 1 && before_slice + all_slice[ks] < rem) before_slice += all_slice[ks++];
        const int slo = ks * bins / G, sup = (ks + 1) * bins / G;
        const int* sred = cluster.map_shared_rank(red, ks);
        int v[1] = {0};
        int bin[kPer];
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const int pos = slo + t * kPer + j;
          bin[j] = pos < sup ? sred[pos - slo] : 0;
          v[0] += bin[j];
        }
        int tot[1];
        BlockExclusiveScan<kThreads, 1>(v, tot, sh.scan);
        int before = before_slice + v[0];
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const int pos = slo + t * kPer + j;
          if (bin[j] > 0 && before < rem && rem <= before + bin[j]) {
            sh.digit = bins - 1 - pos;
            sh.rem = rem - before;
          }
          before += bin[j];
        }
        __syncthreads();
        prefix |= static_cast<uint32_t>(sh.digit) << shift;
        rem = sh.rem;
      }
      cut.key = prefix;
      cut.rem = rem;
    }
  }

  // 4. Emission. Thread t decides entries [i0, i0 + cnt) of this block, ascending.
  const int per = (ne + kThreads - 1) / kThreads;  // <= kMaxPer (the host checks the shape)
  const int i0 = min(ne, t * per);
  const int cnt = min(per, ne - i0);
  int tb = 0;  // tokens of tied entries before the next one of this thread (whole segment)
  if (cut.rule == Rule::kCut) {  // uniform over the cluster
    int tie[1] = {0};
    int tie_total[1];
    for (int j = 0; j < cnt; ++j) {
      if (IsTie(cut, score[i0 + j])) tie[0] += size[i0 + j];
    }
    BlockExclusiveScan<kThreads, 1>(tie, tie_total, sh.scan);
    if (t == 0) pub_ties = tie_total[0];
    cluster.sync();  // every block's tied tokens
    if (t < G) all_slice[t] = *cluster.map_shared_rank(&pub_ties, t);
    __syncthreads();
    int before = 0;
    for (int k = 0; k < rank; ++k) before += all_slice[k];
    tb = before + tie[0];
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
  BlockExclusiveScan<kThreads, 3>(v, tot, sh.scan);
  if (t == 0) pub_totals = Totals{tot[0], tot[1], tot[2]};
  cluster.sync();  // every block's selected totals
  if (t < G) all_totals[t] = *cluster.map_shared_rank(&pub_totals, t);
  __syncthreads();
  int page_base = 0, cluster_base = 0;
  int seg_total[3] = {0, 0, 0};
  for (int k = 0; k < G; ++k) {
    if (k < rank) {
      page_base += all_totals[k].pages;
      cluster_base += all_totals[k].clusters;
    }
    seg_total[0] += all_totals[k].pages;
    seg_total[1] += all_totals[k].clusters;
    seg_total[2] += all_totals[k].tokens;
  }
  int pos = page_base + v[0], cpos = v[1];
  while (mask != 0) {
    const int i = i0 + __ffs(mask) - 1;
    mask &= mask - 1;
    sel[cpos] = i;
    out_pos[cpos] = pos;
    pos += pbeg[i + 1] - pbeg[i];
    ++cpos;
  }
  __syncthreads();
  const int pt = a.page_tokens;
  const int cap = s.page_capacity;
  for (int c = t; c < tot[1]; c += kThreads) {
    const int i = sel[c];
    a.cluster_ids[s.cluster_offset + cluster_base + c] = e0 + i;
    const int first = pbeg[i];
    const int pages = pbeg[i + 1] - first;
    const int tokens = size[i];
    const int at = out_pos[c];
    for (int p0 = 0; p0 < pages && at + p0 < cap; p0 += 4) {
      int ids[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int p = p0 + k;
        ids[k] = p < pages && at + p < cap ? __ldg(s.page_table + first + p) : 0;
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int p = p0 + k;
        if (p < pages && at + p < cap) {
          a.page_ids[s.page_offset + at + p] = ids[k];
          const int rest = tokens - p * pt;
          a.page_valid[s.page_offset + at + p] = rest < pt ? rest : pt;
        }
      }
    }
  }
  if (rank == 0 && t == 0) {
    a.seg_page_count[seg] = seg_total[0] < cap ? seg_total[0] : cap;
    a.seg_cluster_count[seg] = seg_total[1];
    a.seg_tokens[seg] = seg_total[2];
    a.seg_scored[seg] = s.run == LookupRun::kFlat ? s.num_clusters + s.scored_extra : s.scored_fixed;
  }
  cluster.sync();  // no block leaves while another may still read its shared memory
}

// Per device and kernel variant: the dynamic shared memory a block may take (0: unavailable), the
// largest cluster that can be resident, and how many clusters of each size can be resident when
// every block takes a whole SM (the shared memory of a block padded past half of an SM's).
// Set once per device, outside graph captures in practice.
struct Limits {
  size_t smem = 0;
  size_t spread_smem = 0;  // a block that takes this much has an SM to itself
  int max_g = 0;
  int spread_clusters[kMaxCluster + 1] = {};
};

template <typename C, int R, int kLpc>
int ActiveClusters(int g, size_t smem) {
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(g);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.gridDim = dim3(static_cast<unsigned>(g));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, ClusterKernel<C, R, kLpc>, &cfg) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return clusters;
}

template <typename C, int R, int kLpc>
Limits KernelLimits() {
  constexpr int kMaxDevices = 64;
  static std::mutex mu;
  static Limits limits[kMaxDevices];
  static bool known[kMaxDevices];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    cudaGetLastError();
    return Limits{};
  }
  std::lock_guard<std::mutex> lock(mu);
  if (known[dev]) return limits[dev];
  Limits l;
  int optin = 0, major = 0, per_sm = 0;
  cudaFuncAttributes attr;
  auto kernel = ClusterKernel<C, R, kLpc>;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
      major >= 9 &&
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) ==
          cudaSuccess &&
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) ==
          cudaSuccess &&
      cudaFuncGetAttributes(&attr, kernel) == cudaSuccess &&
      static_cast<size_t>(optin) > attr.sharedSizeBytes &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           optin - static_cast<int>(attr.sharedSizeBytes)) == cudaSuccess) {
    l.smem = static_cast<size_t>(optin) - attr.sharedSizeBytes;
    const size_t half = static_cast<size_t>(per_sm) / 2 + 1024;
    l.spread_smem = half > attr.sharedSizeBytes ? half - attr.sharedSizeBytes : 0;
    if (l.spread_smem > l.smem) l.spread_smem = 0;
    const bool big =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) ==
        cudaSuccess;
    for (int g = 1; g <= (big ? kMaxCluster : 8); ++g) {
      if (ActiveClusters<C, R, kLpc>(g, 16 * 1024) > 0) l.max_g = g;
      if (l.spread_smem > 0) l.spread_clusters[g] = ActiveClusters<C, R, kLpc>(g, l.spread_smem);
    }
  }
  if (l.max_g == 0) l.smem = 0;
  cudaGetLastError();  // a failed query leaves the two-kernel path, not an error
  limits[dev] = l;
  known[dev] = true;
  return l;
}

int SmCount() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return sms;
}

// The shape of a launch, or g = 0 when the cluster path cannot take it. Blocks per segment: as
// many as give each segment an equal share of the SMs (at most max_g and the segment's tiles),
// raised while a block's shared memory does not fit. When every cluster can be resident with one
// block per SM, the shared memory is padded so that blocks spread over the SMs (the scoring is
// bound by each SM's loads in flight, so two blocks on one SM would halve the streams).
Shape ChooseShape(const LookupLayout& l, int R, int row_bytes, const Limits& lim, size_t* smem) {
  Shape sh;
  sh.rows = R;
  sh.g = 0;
  sh.tile_bytes = kSmallTile * row_bytes;
  const int segs = static_cast<int>(l.small_list.size());
  const int T = std::max(1, (l.max_small_clusters + kSmallTile - 1) / kSmallTile);
  const int sms = SmCount();
  if (lim.max_g == 0 || sms == 0 || segs == 0) return sh;
  const int top = std::min(lim.max_g, T);
  for (int g = std::max(1, std::min(top, sms / segs)); g <= top; ++g) {
    Shape c = sh;
    c.g = g;
    c.tiles = (T + g - 1) / g;
    c.ring = c.tile_bytes <= kMaxStagedTileBytes ? std::min(kMaxRing, c.tiles) : 0;
    if (static_cast<size_t>(c.tiles) * kSmallTile > static_cast<size_t>(kThreads) * kMaxPer) {
      continue;
    }
    const size_t bytes = MakeLayout(c).bytes;
    if (bytes > lim.smem) continue;
    *smem = bytes;
    if (segs * g <= sms && bytes <= lim.spread_smem && segs <= lim.spread_clusters[g]) {
      *smem = lim.spread_smem;
    }
    return c;
  }
  return sh;
}

template <typename C, int R, int kLpc>
cudaError_t LaunchShape(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                        const Shape& sh, size_t smem, cudaStream_t stream) {
  const Layout lay = MakeLayout(sh);
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(sh.g);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.gridDim = dim3(static_cast<unsigned>(sh.g * l.small_list.size()));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, ClusterKernel<C, R, kLpc>, a, w, sh, lay);
}

template <typename C, int R, int kLpc>
bool TryLaunch(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
               cudaStream_t stream, cudaError_t* err) {
  size_t smem = 0;
  const Shape sh = ChooseShape(l, R, a.head_dim * static_cast<int>(sizeof(C)),
                               KernelLimits<C, R, kLpc>(), &smem);
  if (sh.g == 0) return false;
  *err = LaunchShape<C, R, kLpc>(a, l, w, sh, smem, stream);
  return true;
}

template <typename C, int R>
bool TryR(const LookupArgs& a, const LookupLayout& l, const Workspace& w, cudaStream_t stream,
          cudaError_t* err) {
  if (a.head_dim <= 128) return TryLaunch<C, R, 16>(a, l, w, stream, err);
  return TryLaunch<C, R, 32>(a, l, w, stream, err);
}

template <typename C>
bool TryC(const LookupArgs& a, const LookupLayout& l, const Workspace& w, cudaStream_t stream,
          cudaError_t* err) {
  if (l.max_small_rows <= kSmallRowsNarrow) return TryR<C, kSmallRowsNarrow>(a, l, w, stream, err);
  return TryR<C, kLookupSmallRows>(a, l, w, stream, err);
}

}  // namespace

bool LaunchSmallCluster(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                        cudaStream_t stream, cudaError_t* err) {
  *err = cudaSuccess;
  if (!a.cluster_small || l.any_hierarchical || l.small_list.empty()) return false;
  return l.f16 ? TryC<uint16_t>(a, l, w, stream, err) : TryC<float>(a, l, w, stream, err);
}

}  // namespace sqkv::gpu::lookup_detail
