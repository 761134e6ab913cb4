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
// block sums. smem: (T / 32) * N ints. The warp totals are combined lane-parallel (lane w holds
// warp w's total), not by every thread walking all of them. kReuse: end with a barrier, so smem
// can be written again at once.
template <int T, int N, bool kReuse = true>
__device__ __forceinline__ void BlockExclusiveScan(int (&v)[N], int (&total)[N], int* smem) {
  constexpr int kWarps = T / 32;
  static_assert(kWarps <= 32, "one warp combines the warp totals");
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
    const int wv = lane < kWarps ? smem[lane * N + n] : 0;
    int wi = wv;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int x = __shfl_up_sync(0xffffffffu, wi, o);
      if (lane >= o) wi += x;
    }
    const int before = __shfl_sync(0xffffffffu, wi - wv, warp);  // warps before this one
    total[n] = __shfl_sync(0xffffffffu, wi, 31);
    v[n] = incl[n] - v[n] + before;
  }
  if constexpr (kReuse) __syncthreads();
}

enum class Rule : int { kNone, kAll, kCut, kThreshold };

struct Cut {
  Rule rule = Rule::kNone;
  uint32_t key = 0;  // kCut: score bits of the last entry taken
  int rem = 0;       // kCut: tokens still needed among the entries whose bits equal key
  // kCut: no other entry has bits equal to key, so the tie counts of the emission are all zero.
  bool unique = false;
  float threshold = 0.f;
};

// Entries FindCut ranks directly (each against all the others) once the first digit has found the
// bin holding the cut; a bin with more goes through the remaining radix passes.
template <int T>
inline constexpr int kCutCandidates = T < 256 ? T : 256;

template <int T>
struct SelectShared {
  int hist[kRadixBins];
  int scan[(T / 32) * 4];
  uint32_t red_min[T / 32];
  uint32_t red_max[T / 32];
  int red_sum[T / 32];
  uint32_t cand_bits[kCutCandidates<T>];
  int cand_size[kCutCandidates<T>];
  int cand_entry[kCutCandidates<T>];
  int cands;
  int digit;
  int rem;
  uint32_t key;
  int unique;
};

// Where FindCut reads the scores and sizes of the ranked entries: the workspace and the entry set
// (global memory), or shared memory (the staged selection, gpu/lookup_staged.cu).
struct GlobalEntries {
  const EntrySet& e;
  const float* sc;
  __device__ __forceinline__ uint32_t Bits(int i) const { return __float_as_uint(sc[i]); }
  __device__ __forceinline__ int Size(int i) const { return EntrySize(e, i); }
};

// This thread's part of the score-bit range and token total of FindCut's entries, where the
// caller has them already (FindCut reduces them over the block).
struct CutPartials {
  uint32_t umin = 0xffffffffu;
  uint32_t umax = 0;
  int total = 0;
  bool known = false;  // false: FindCut finds them itself
};

// Weighted radix select over entries 0..n-1 of `src`: the ranking cut at which the kept tokens
// first reach `budget` (>= 1). Scores are >= 0, so their bits order like the values; ranking is
// descending bits, ties by ascending entry (= ascending id). kAll when every entry together holds
// <= budget tokens. The digits start below the highest bit in which the scores differ (min / max
// first). After the first digit, the entries of the bin that holds the cut (typically a few dozen
// of thousands) are gathered and ranked against each other directly: two barriers instead of a
// radix pass (four) per remaining digit; a fuller bin takes the remaining passes. partials: this
// thread's CutPartials where the caller has them (known), else a pass over the entries finds them.
template <int T, class Src>
__device__ Cut FindCut(const Src& src, int n, int budget, SelectShared<T>& sh,
                       CutPartials partials = CutPartials{}) {
  constexpr int kWarps = T / 32;
  constexpr int kCand = kCutCandidates<T>;
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  uint32_t umin = 0xffffffffu, umax = 0;
  int total = 0;
  if (partials.known) {
    umin = partials.umin;
    umax = partials.umax;
    total = partials.total;
  } else {
    for (int i = t; i < n; i += T) {
      const uint32_t u = src.Bits(i);
      umin = min(umin, u);
      umax = max(umax, u);
      total += src.Size(i);
    }
  }
  umin = __reduce_min_sync(0xffffffffu, umin);
  umax = __reduce_max_sync(0xffffffffu, umax);
  total = __reduce_add_sync(0xffffffffu, total);
  if (lane == 0) {
    sh.red_min[warp] = umin;
    sh.red_max[warp] = umax;
    sh.red_sum[warp] = total;
  }
  for (int i = t; i < kRadixBins; i += T) sh.hist[i] = 0;  // the first digit's bins
  if (t == 0) sh.cands = 0;
  __syncthreads();
  umin = __reduce_min_sync(0xffffffffu, lane < kWarps ? sh.red_min[lane] : 0xffffffffu);
  umax = __reduce_max_sync(0xffffffffu, lane < kWarps ? sh.red_max[lane] : 0u);
  total = __reduce_add_sync(0xffffffffu, lane < kWarps ? sh.red_sum[lane] : 0);
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
  bool first = true;
  while (shift > 0) {
    const int width = min(kRadixBits, shift);
    shift -= width;
    const int hi = shift + width;
    const int bins = 1 << width;
    if (!first) {
      for (int i = t; i < bins; i += T) sh.hist[i] = 0;
      __syncthreads();
    }
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
    BlockExclusiveScan<T, 1, false>(v, tot, sh.scan);  // sh.scan is next written after barriers
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
    if (!first || shift == 0) continue;
    first = false;
    // The entries of the cut's bin (their bits agree with prefix above `shift`).
    for (int i = t; i < n; i += T) {
      const uint32_t u = src.Bits(i);
      if ((u >> shift) == (prefix >> shift)) {
        const int k = atomicAdd(&sh.cands, 1);
        if (k < kCand) {
          sh.cand_bits[k] = u;
          sh.cand_size[k] = src.Size(i);
          sh.cand_entry[k] = i;
        }
      }
    }
    __syncthreads();  // also: every thread has read sh.digit and sh.rem
    const int cands = sh.cands;
    if (cands > kCand) continue;  // uniform
    // Tokens ranked before each candidate (greater bits, or equal bits and a lower entry) and
    // those with strictly greater bits; the candidate whose tokens reach rem is the cut. kParts
    // consecutive lanes share a candidate, each summing every kParts-th other one.
    constexpr int kParts = T / kCand >= 4 ? 4 : 1;
    const int ci = t / kParts, part = t % kParts;
    const bool mine = ci < cands;
    const uint32_t u = mine ? sh.cand_bits[ci] : 0u;
    const int entry = mine ? sh.cand_entry[ci] : 0;
    int above = 0, greater = 0, equal = 0;
    for (int j = part; mine && j < cands; j += kParts) {
      const uint32_t uj = sh.cand_bits[j];
      const int sj = sh.cand_size[j];
      above += uj > u || (uj == u && sh.cand_entry[j] < entry) ? sj : 0;
      greater += uj > u ? sj : 0;
      equal += uj == u ? 1 : 0;
    }
#pragma unroll
    for (int o = 1; o < kParts; o <<= 1) {
      above += __shfl_xor_sync(0xffffffffu, above, o);
      greater += __shfl_xor_sync(0xffffffffu, greater, o);
      equal += __shfl_xor_sync(0xffffffffu, equal, o);
    }
    if (mine && part == 0 && above < rem && rem <= above + sh.cand_size[ci]) {
      sh.key = u;
      sh.rem = rem - greater;
      sh.unique = equal == 1;
    }
    __syncthreads();
    c.key = sh.key;
    c.rem = sh.rem;
    c.unique = sh.unique != 0;
    return c;
  }
  c.key = prefix;
  c.rem = rem;
  return c;
}

// A small segment's score of an entry is (1/rows) Σ_r 2^(l_r - row_max_r) · row_inv_z_r; this
// adds row r's term. Every selection of small segments (the last scoring block's FinishScores, the
// staged kernel's scalar and four-entry paths) sums through here, in row order, so their scores
// agree bit for bit.
__device__ __forceinline__ float AddRowScore(float sum, float logit, float row_max,
                                             float row_inv_z) {
  return __fmaf_rn(exp2f(logit - row_max), row_inv_z, sum);
}

// Per-row max and 1/normaliser of a small segment from its first `tiles` per-tile statistics
// (floats + s.tstat_offset: (rows, s.tiles, 2) base-2 (max, normaliser)), one warp per row, the
// block's warps striding by `warps`; lane 0 writes row_max[r] and row_inv_z[r]. Both selections
// of small segments (the last scoring block's and the staged kernel's) combine through here, so
// their scores agree bit for bit. The caller synchronises before reading the results.
__device__ __forceinline__ void CombineTileStats(const LookupSegment& s, const float* floats,
                                                 int tiles, int warps, float* row_max,
                                                 float* row_inv_z) {
  // Up to 32 * kHeld tiles, a lane loads all of its (max, normaliser) pairs at once, so a row costs
  // one trip to L2; the sums run in the same order either way.
  constexpr int kHeld = 4;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float* ts = floats + s.tstat_offset;
  for (int r = warp; r < s.rows; r += warps) {
    const float* row = ts + static_cast<size_t>(r) * s.tiles * 2;
    float m = -INFINITY;
    float z = 0.f;
    if (tiles <= 32 * kHeld) {
      float tm[kHeld], tz[kHeld];
#pragma unroll
      for (int k = 0; k < kHeld; ++k) {
        const int c = lane + 32 * k;
        tm[k] = c < tiles ? __ldcg(row + 2 * c) : -INFINITY;
        tz[k] = c < tiles ? __ldcg(row + 2 * c + 1) : 0.f;
      }
#pragma unroll
      for (int k = 0; k < kHeld; ++k) m = fmaxf(m, tm[k]);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
#pragma unroll
      for (int k = 0; k < kHeld; ++k) {
        if (lane + 32 * k < tiles) z += tz[k] * exp2f(tm[k] - m);
      }
    } else {
      for (int c = lane; c < tiles; c += 32) m = fmaxf(m, __ldcg(row + 2 * c));
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      for (int c = lane; c < tiles; c += 32) {
        z += __ldcg(row + 2 * c + 1) * exp2f(__ldcg(row + 2 * c) - m);
      }
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
    if (cut.rule == Rule::kCut && !cut.unique) {  // uniform over the block
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
