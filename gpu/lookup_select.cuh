// The selection of one segment by one block of T threads, shared by the kernels that end a lookup
// (the fused small kernel, the 16-bit column pass, the float32 path's selection kernel). Reads the
// scores from the workspace (written by earlier kernels, by this block, or by other blocks of the
// same launch before ArriveLast: its fences order those writes before these plain, L1-cached
// reads, which the per-thread runs of the emission need), finds the cut of a keep-fraction
// selection by a weighted radix select over the score bits (descending score, ties by ascending
// id), and emits the selection in ascending id order: the page list and cluster ids (level 2) or
// the candidate list of a two-level run (level 1). Device code, internal; include from one .cu file
// per kernel family.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "gpu/lookup_device.cuh"

namespace sqkv::gpu::lookup_detail {

// Digits of the radix select: 11 bits (2048 bins), at most three passes over the score bits.
inline constexpr int kRadixBits = 11;
inline constexpr int kRadixBins = 1 << kRadixBits;
// Level 2 emission: entries per thread per chunk (contiguous, so a bit mask holds the selection).
inline constexpr int kEmitPer = 32;

// Exclusive scan of N ints per thread over the block of T threads, in thread order; total: the
// block sums. smem: (T / 32) * N ints. Ends with a barrier, so smem can be reused at once.
template <int T, int N>
__device__ __forceinline__ void BlockExclusiveScan(int (&v)[N], int (&total)[N], int* smem) {
  constexpr int kWarps = T / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int incl[N];
#pragma unroll
  for (int n = 0; n < N; ++n) incl[n] = v[n];
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
      const int x = __shfl_up_sync(0xffffffffu, incl[n], o);
      if (lane >= o) incl[n] += x;
    }
  }
  if (lane == 31) {
#pragma unroll
    for (int n = 0; n < N; ++n) smem[warp * N + n] = incl[n];
  }
  __syncthreads();
#pragma unroll
  for (int n = 0; n < N; ++n) {
    int before = 0, sum = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int x = smem[w * N + n];
      before += w < warp ? x : 0;
      sum += x;
    }
    v[n] = incl[n] - v[n] + before;
    total[n] = sum;
  }
  __syncthreads();
}

enum class Rule : int { kNone, kAll, kCut, kThreshold };

struct Cut {
  Rule rule = Rule::kNone;
  uint32_t key = 0;  // kCut: score bits of the last entry taken
  int rem = 0;       // kCut: tokens still needed among the entries whose bits equal key
  float threshold = 0.f;
};

template <int T>
struct SelectShared {
  int hist[kRadixBins];
  int scan[(T / 32) * 4];
  uint32_t red_min[T / 32];
  uint32_t red_max[T / 32];
  int red_sum[T / 32];
  int digit;
  int rem;
};

// Where FindCut reads the scores and sizes of the ranked entries: the workspace and the entry set
// (global memory), or shared memory (the staged selection, gpu/lookup_staged.cu).
struct GlobalEntries {
  const EntrySet& e;
  const float* sc;
  __device__ __forceinline__ uint32_t Bits(int i) const { return __float_as_uint(sc[i]); }
  __device__ __forceinline__ int Size(int i) const { return EntrySize(e, i); }
};

// Weighted radix select over entries 0..n-1 of `src`: the ranking cut at which the kept tokens
// first reach `budget` (>= 1). Scores are >= 0, so their bits order like the values; ranking is
// descending bits, ties by ascending entry (= ascending id). kAll when every entry together holds
// <= budget tokens. The digits start below the highest bit in which the scores differ (min / max
// first).
template <int T, class Src>
__device__ Cut FindCut(const Src& src, int n, int budget, SelectShared<T>& sh) {
  constexpr int kWarps = T / 32;
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  uint32_t umin = 0xffffffffu, umax = 0;
  int total = 0;
  for (int i = t; i < n; i += T) {
    const uint32_t u = src.Bits(i);
    umin = min(umin, u);
    umax = max(umax, u);
    total += src.Size(i);
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
  umin = 0xffffffffu;
  umax = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    umin = min(umin, sh.red_min[w]);
    umax = max(umax, sh.red_max[w]);
    total += sh.red_sum[w];
  }
  Cut c;
  if (total <= budget) {
    c.rule = Rule::kAll;
    return c;
  }
  c.rule = Rule::kCut;
  int rem = budget;
  int shift = 32 - __clz(static_cast<int>(umin ^ umax));  // bits >= shift are common to all
  uint32_t prefix = shift >= 32 ? 0u : (umin >> shift) << shift;
  constexpr int kPer = (kRadixBins + T - 1) / T;  // bins per thread in the scan
  while (shift > 0) {
    const int width = min(kRadixBits, shift);
    shift -= width;
    const int hi = shift + width;
    const int bins = 1 << width;
    for (int i = t; i < bins; i += T) sh.hist[i] = 0;
    __syncthreads();
    for (int i = t; i < n; i += T) {
      const uint32_t u = src.Bits(i);
      if (hi >= 32 || (u >> hi) == (prefix >> hi)) {
        atomicAdd(&sh.hist[(u >> shift) & (bins - 1)], src.Size(i));
      }
    }
    __syncthreads();
    // Thread t holds descending positions t*kPer .. +kPer (digit = bins - 1 - position).
    int v[1] = {0};
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int pos = t * kPer + j;
      if (pos < bins) v[0] += sh.hist[bins - 1 - pos];
    }
    int tot[1];
    BlockExclusiveScan<T, 1>(v, tot, sh.scan);
    int before = v[0];
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int pos = t * kPer + j;
      const int bin = pos < bins ? sh.hist[bins - 1 - pos] : 0;
      if (bin > 0 && before < rem && rem <= before + bin) {
        sh.digit = bins - 1 - pos;
        sh.rem = rem - before;
      }
      before += bin;
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(sh.digit) << shift;
    rem = sh.rem;
    // The next writes of digit / rem and hist follow two more barriers.
  }
  c.key = prefix;
  c.rem = rem;
  return c;
}

// Per-row max and 1/normaliser of a small segment from its first `tiles` per-tile statistics
// (floats + s.tstat_offset: (rows, s.tiles, 2) base-2 (max, normaliser)), one warp per row, the
// block's warps striding by `warps`; lane 0 writes row_max[r] and row_inv_z[r]. Both selections
// of small segments (the last scoring block's and the staged kernel's) combine through here, so
// their scores agree bit for bit. The caller synchronises before reading the results.
__device__ __forceinline__ void CombineTileStats(const LookupSegment& s, const float* floats,
                                                 int tiles, int warps, float* row_max,
                                                 float* row_inv_z) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float* ts = floats + s.tstat_offset;
  for (int r = warp; r < s.rows; r += warps) {
    const float* row = ts + static_cast<size_t>(r) * s.tiles * 2;
    float m = -INFINITY;
    for (int c = lane; c < tiles; c += 32) m = fmaxf(m, __ldcg(row + 2 * c));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float z = 0.f;
    for (int c = lane; c < tiles; c += 32) {
      z += __ldcg(row + 2 * c + 1) * exp2f(__ldcg(row + 2 * c) - m);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) z += __shfl_xor_sync(0xffffffffu, z, o);
    if (lane == 0) {
      row_max[r] = m;
      row_inv_z[r] = 1.f / z;  // z >= the size of the arg-max entry >= 1
    }
  }
}

// Selection of an entry under the cut; tie_before: tokens of tied entries before it (ascending).
__device__ __forceinline__ bool Selected(const Cut& c, float score, int tie_before) {
  switch (c.rule) {
    case Rule::kAll:
      return true;
    case Rule::kThreshold:
      return score >= c.threshold;
    case Rule::kCut: {
      const uint32_t u = __float_as_uint(score);
      return u > c.key || (u == c.key && tie_before < c.rem);
    }
    default:
      return false;
  }
}

__device__ __forceinline__ bool IsTie(const Cut& c, float score) {
  return c.rule == Rule::kCut && __float_as_uint(score) == c.key;
}

// Level 1 of a two-level run: the candidate list, children of kept parents (ascending), then the
// pruned parents, and the two counts after them.
template <int T>
__device__ void EmitCandidates(const LookupSegment& s, const EntrySet& e, const float* sc,
                               const Cut& cut, const Workspace& w, SelectShared<T>& sh) {
  const int t = threadIdx.x;
  int32_t* list = w.ints + s.list_offset;
  int kept_carry = 0, pruned_carry = 0;
  for (int pass = 0; pass < 2; ++pass) {
    int tie_carry = 0;
    for (int base = 0; base < e.scored; base += T) {
      const int i = base + t;
      const bool valid = i < e.scored;
      const float score = valid ? sc[i] : 0.f;
      int tie[1] = {valid && IsTie(cut, score) ? EntrySize(e, i) : 0};
      int tie_total[1];
      BlockExclusiveScan<T, 1>(tie, tie_total, sh.scan);
      const bool keep = valid && Selected(cut, score, tie_carry + tie[0]);
      tie_carry += tie_total[0];
      const int first = valid ? s.l1_child_begin[i] : 0;
      const int children = valid ? s.l1_child_begin[i + 1] - first : 0;
      int v[1] = {pass == 0 ? (keep ? children : 0) : (valid && !keep ? 1 : 0)};
      int tot[1];
      BlockExclusiveScan<T, 1>(v, tot, sh.scan);
      if (pass == 0 && keep) {
        for (int c = 0; c < children; ++c) list[kept_carry + v[0] + c] = first + c;
      } else if (pass == 1 && valid && !keep) {
        list[kept_carry + pruned_carry + v[0]] = i;
      }
      if (pass == 0) {
        kept_carry += tot[0];
      } else {
        pruned_carry += tot[0];
      }
    }
  }
  if (t == 0) {
    list[s.entry_capacity] = kept_carry;
    list[s.entry_capacity + 1] = kept_carry + pruned_carry;
  }
}

// Level 2: page list and cluster ids in ascending cluster id. Thread t takes kEmitPer contiguous
// entries of each chunk of T * kEmitPer.
template <int T>
__device__ void EmitPages(const LookupArgs& a, const LookupSegment& s, int seg, const EntrySet& e,
                          const float* sc, bool scored, const Cut& cut, SelectShared<T>& sh) {
  const int t = threadIdx.x;
  const int pt = a.page_tokens;
  int page_carry = 0, cluster_carry = 0, token_carry = 0, tie_carry = 0;
  for (int base = 0; base < e.scored; base += T * kEmitPer) {
    const int i0 = base + t * kEmitPer;
    const int cnt = max(0, min(kEmitPer, e.scored - i0));
    int tie[1] = {0};
    int tie_total[1] = {0};
    if (cut.rule == Rule::kCut) {  // uniform over the block
      for (int j = 0; j < cnt; ++j) {
        if (IsTie(cut, sc[i0 + j])) tie[0] += EntrySize(e, i0 + j);
      }
      BlockExclusiveScan<T, 1>(tie, tie_total, sh.scan);
    }
    int tb = tie_carry + tie[0];
    tie_carry += tie_total[0];
    uint32_t mask = 0;
    int v[3] = {0, 0, 0};  // pages, clusters, tokens
    for (int j = 0; j < cnt; ++j) {
      const int i = i0 + j;
      const float score = scored ? sc[i] : 0.f;
      const int n = EntrySize(e, i);
      if (Selected(cut, score, tb)) {
        const int id = EntryId(e, i);
        mask |= 1u << j;
        v[0] += s.cluster_page_begin[id + 1] - s.cluster_page_begin[id];
        v[1] += 1;
        v[2] += n;
      }
      if (IsTie(cut, score)) tb += n;
    }
    int tot[3];
    BlockExclusiveScan<T, 3>(v, tot, sh.scan);
    int pos = page_carry + v[0];
    int cpos = cluster_carry + v[1];
    while (mask != 0) {
      const int j = __ffs(mask) - 1;
      mask &= mask - 1;
      const int i = i0 + j;
      const int id = EntryId(e, i);
      const int n = EntrySize(e, i);
      const int first = s.cluster_page_begin[id];
      const int pages = s.cluster_page_begin[id + 1] - first;
      a.cluster_ids[s.cluster_offset + cpos] = id;
      ++cpos;
      for (int p = 0; p < pages && pos + p < s.page_capacity; ++p) {
        a.page_ids[s.page_offset + pos + p] = s.page_table[first + p];
        const int rest = n - p * pt;
        a.page_valid[s.page_offset + pos + p] = rest < pt ? rest : pt;
      }
      pos += pages;
    }
    page_carry += tot[0];
    cluster_carry += tot[1];
    token_carry += tot[2];
  }
  if (t == 0) {
    a.seg_page_count[seg] = page_carry < s.page_capacity ? page_carry : s.page_capacity;
    a.seg_cluster_count[seg] = cluster_carry;
    a.seg_tokens[seg] = token_carry;
    int scored_count = s.scored_fixed;
    if (s.run == LookupRun::kFlat) scored_count = s.num_clusters + s.scored_extra;
    if (s.run == LookupRun::kTwoLevel) scored_count = s.num_l1 + e.scored;
    a.seg_scored[seg] = scored_count;
  }
}

// Selects segment `seg` at `level` from the scores in the workspace. The whole block calls it.
// Segments not at this level return at once. f16: which centroid copy the entry set names (only
// sizes and ids are read here, so either works).
template <int T>
__device__ __noinline__ void SelectSegment(const LookupArgs& a, const Workspace& w, int seg,
                                           int level, bool f16) {
  __shared__ SelectShared<T> sh;
  const LookupSegment& s = a.segments[seg];
  if (!AtLevel(s, level)) return;
  const EntrySet e = GetEntrySet(s, level, w.ints, a.head_dim, f16);
  const float* sc = w.floats + s.score_offset;
  const bool scored = s.run != LookupRun::kFixed;
  Cut cut;
  if (!scored) {
    cut.rule = s.mode == LookupMode::kDense ? Rule::kAll : Rule::kNone;
  } else {
    const bool budget_mode = level == 1 || s.mode == LookupMode::kBudget;
    const int budget = level == 1 ? s.l1_budget : s.budget;
    if (!budget_mode) {
      cut.rule = Rule::kThreshold;
      cut.threshold = s.threshold;
    } else if (budget > 0) {
      cut = FindCut<T>(GlobalEntries{e, sc}, e.scored, budget, sh);
    }
  }
  if (level == 1) {
    EmitCandidates<T>(s, e, sc, cut, w, sh);
  } else {
    EmitPages<T>(a, s, seg, e, sc, scored, cut, sh);
  }
}

}  // namespace sqkv::gpu::lookup_detail
