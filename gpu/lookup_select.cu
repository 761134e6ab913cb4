// Lookup selection: one block per segment. Finishes the small-path scores, finds the cut of a
// keep-fraction selection by a weighted radix select over the score bits (descending score, ties
// by ascending id), and emits the selection in ascending id order: the page list and cluster ids
// (level 2) or the candidate list of a two-level run (level 1).
#include <cuda_runtime.h>

#include <cmath>

#include "gpu/lookup_device.cuh"

namespace sqkv::gpu::lookup_detail {
namespace {

constexpr int kWarps = kSelectThreads / 32;
constexpr int kBins = 256;  // 8-bit digits: four passes over a float's bits
static_assert(kLookupSmallRows <= kWarps, "one warp per small-path row");

// Exclusive scan of N ints per thread over the block, in thread order. totals: the block sums.
// smem: kWarps * N ints. Ends with a barrier, so smem can be reused at once.
template <int N>
__device__ void BlockExclusiveScan(int (&v)[N], int (&total)[N], int* smem) {
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

struct Shared {
  int hist[kWarps][kBins];
  int scan[kWarps * 4];
  float row_max[kLookupSmallRows];
  float row_inv_z[kLookupSmallRows];
  int digit;
  int rem;
  int all;
};

// Small path: scores from the stored logits (rows <= kLookupSmallRows). sc: (e.scored).
__device__ void SmallScores(const LookupSegment& s, const EntrySet& e, const float* lg, float* sc,
                            Shared& sh) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const size_t ld = static_cast<size_t>(s.entry_capacity);
  if (warp < s.rows) {
    const float* row = lg + warp * ld;
    float m = -INFINITY;
    for (int i = lane; i < e.total; i += 32) m = fmaxf(m, row[i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float z = 0.f;
    for (int i = lane; i < e.total; i += 32) {
      z += static_cast<float>(EntrySize(e, i)) * expf(row[i] - m);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) z += __shfl_xor_sync(0xffffffffu, z, o);
    if (lane == 0) {
      sh.row_max[warp] = m;
      sh.row_inv_z[warp] = 1.f / z;  // z >= the size of the arg-max entry >= 1
    }
  }
  __syncthreads();
  const float inv_rows = 1.f / static_cast<float>(s.rows);
  for (int i = threadIdx.x; i < e.scored; i += kSelectThreads) {
    float sum = 0.f;
    for (int r = 0; r < s.rows; ++r) sum += expf(lg[r * ld + i] - sh.row_max[r]) * sh.row_inv_z[r];
    sc[i] = sum * inv_rows;
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

// Weighted radix select: the ranking cut at which the kept tokens first reach `budget` (>= 1).
// Scores are >= 0, so their bits order like the values; ranking is descending bits, ties by
// ascending entry (= ascending id). kAll when every scored entry together holds <= budget tokens.
__device__ Cut FindCut(const EntrySet& e, const float* sc, int budget, Shared& sh) {
  const int t = threadIdx.x, warp = t / 32;
  uint32_t prefix = 0;
  int rem = budget;
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    for (int i = t; i < kWarps * kBins; i += kSelectThreads) (&sh.hist[0][0])[i] = 0;
    __syncthreads();
    for (int i = t; i < e.scored; i += kSelectThreads) {
      const uint32_t u = __float_as_uint(sc[i]);
      // pass 0 takes every entry (and shift + 8 would be 32).
      if (pass == 0 || (u >> (shift + 8)) == (prefix >> (shift + 8))) {
        atomicAdd(&sh.hist[warp][(u >> shift) & (kBins - 1)], EntrySize(e, i));
      }
    }
    __syncthreads();
    // Thread t holds digit 255 - t: the exclusive scan is the weight ranked above that digit.
    int v[1] = {0};
    if (t < kBins) {
      for (int w = 0; w < kWarps; ++w) v[0] += sh.hist[w][kBins - 1 - t];
    }
    const int bin = v[0];
    int total[1];
    BlockExclusiveScan<1>(v, total, sh.scan);
    if (pass == 0 && t == 0) sh.all = total[0] <= rem;
    if (t < kBins && bin > 0 && v[0] < rem && rem <= v[0] + bin) {
      sh.digit = kBins - 1 - t;
      sh.rem = rem - v[0];
    }
    __syncthreads();
    if (sh.all) {
      Cut c;
      c.rule = Rule::kAll;
      return c;
    }
    prefix |= static_cast<uint32_t>(sh.digit) << shift;
    rem = sh.rem;
    __syncthreads();
  }
  Cut c;
  c.rule = Rule::kCut;
  c.key = prefix;
  c.rem = rem;
  return c;
}

// Selection of entry i under the cut; tie_before: tokens of tied entries before i (ascending).
__device__ inline bool Selected(const Cut& c, float score, int tie_before) {
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

__global__ void __launch_bounds__(kSelectThreads)
    SelectKernel(LookupArgs a, Workspace w, int level) {
  __shared__ Shared sh;
  const int seg = blockIdx.x;
  const LookupSegment& s = a.segments[seg];
  const int t = threadIdx.x;
  if (level == 1 && s.run != LookupRun::kTwoLevel) return;
  const EntrySet e = GetEntrySet(s, level, w.ints);
  float* sc = w.floats + s.score_offset;

  Cut cut;
  if (s.run == LookupRun::kFixed) {
    cut.rule = s.mode == LookupMode::kDense ? Rule::kAll : Rule::kNone;
  } else {
    if (!s.large) SmallScores(s, e, w.floats + s.logit_offset, sc, sh);
    const bool budget_mode = level == 1 || s.mode == LookupMode::kBudget;
    const int budget = level == 1 ? s.l1_budget : s.budget;
    if (!budget_mode) {
      cut.rule = Rule::kThreshold;
      cut.threshold = s.threshold;
    } else if (budget > 0) {
      cut = FindCut(e, sc, budget, sh);
    }
  }
  const bool scored = s.run != LookupRun::kFixed;

  int tie_carry = 0;
  if (level == 1) {
    // Candidates: children of kept parents (ascending), then the pruned parents.
    int32_t* list = w.ints + s.list_offset;
    int kept_carry = 0, pruned_carry = 0;
    for (int pass = 0; pass < 2; ++pass) {
      tie_carry = 0;
      for (int base = 0; base < e.scored; base += kSelectThreads) {
        const int i = base + t;
        const bool valid = i < e.scored;
        const float score = valid ? sc[i] : 0.f;
        int tie[1] = {cut.rule == Rule::kCut && valid && __float_as_uint(score) == cut.key
                          ? EntrySize(e, i)
                          : 0};
        int tie_total[1];
        BlockExclusiveScan<1>(tie, tie_total, sh.scan);
        const bool keep = valid && Selected(cut, score, tie_carry + tie[0]);
        tie_carry += tie_total[0];
        const int first = valid ? s.l1_child_begin[i] : 0;
        const int children = valid ? s.l1_child_begin[i + 1] - first : 0;
        int v[1] = {pass == 0 ? (keep ? children : 0) : (valid && !keep ? 1 : 0)};
        int tot[1];
        BlockExclusiveScan<1>(v, tot, sh.scan);
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
    return;
  }

  // Level 2: page list and cluster ids in ascending cluster id.
  int page_carry = 0, cluster_carry = 0, token_carry = 0;
  const int pt = a.page_tokens;
  for (int base = 0; base < e.scored; base += kSelectThreads) {
    const int i = base + t;
    const bool valid = i < e.scored;
    const float score = valid && scored ? sc[i] : 0.f;
    const int n = valid ? EntrySize(e, i) : 0;
    int tie[1] = {cut.rule == Rule::kCut && valid && __float_as_uint(score) == cut.key ? n : 0};
    int tie_total[1];
    BlockExclusiveScan<1>(tie, tie_total, sh.scan);
    const bool sel = valid && Selected(cut, score, tie_carry + tie[0]);
    tie_carry += tie_total[0];
    const int id = valid ? EntryId(e, i) : 0;
    const int first = valid ? s.cluster_page_begin[id] : 0;
    const int pages = valid ? s.cluster_page_begin[id + 1] - first : 0;
    int v[3] = {sel ? pages : 0, sel ? 1 : 0, sel ? n : 0};
    int tot[3];
    BlockExclusiveScan<3>(v, tot, sh.scan);
    if (sel) {
      a.cluster_ids[s.cluster_offset + cluster_carry + v[1]] = id;
      const int pos = page_carry + v[0];
      for (int p = 0; p < pages && pos + p < s.page_capacity; ++p) {
        a.page_ids[s.page_offset + pos + p] = s.page_table[first + p];
        const int rest = n - p * pt;
        a.page_valid[s.page_offset + pos + p] = rest < pt ? rest : pt;
      }
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

}  // namespace

cudaError_t LaunchSelect(const LookupArgs& a, const LookupLayout& l, const Workspace& w, int level,
                         cudaStream_t stream) {
  if (l.num_segments == 0) return cudaSuccess;
  SelectKernel<<<l.num_segments, kSelectThreads, 0, stream>>>(a, w, level);
  return cudaGetLastError();
}

}  // namespace sqkv::gpu::lookup_detail
