#include "index/select.h"

#include <cblas.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "common/dot.h"

namespace sqkv {
namespace {

// Queries scored per GEMM call: bounds the logits scratch to kQueryBlock * candidates floats.
constexpr int kQueryBlock = 256;

// What one scoring pass works on. Scored entries get a score; "extra" entries (level-1 parents
// pruned from a hierarchical scan) only join the normaliser, with logits computed earlier.
struct Candidates {
  const float* centroids = nullptr;  // (count, d)
  const int32_t* sizes = nullptr;    // (count)
  int count = 0;
  const float* extra_centroids = nullptr;  // (*, d), rows named by extra_ids
  const int32_t* extra_sizes = nullptr;    // indexed by extra_ids
  const int32_t* extra_ids = nullptr;      // (extra_count)
  int extra_count = 0;
  const float* extra_logits = nullptr;  // (num_queries, extra_ld), column = extra id
  int extra_ld = 0;
};

float LogitScale(int d) { return 1.f / std::sqrt(static_cast<float>(d)); }

// Fewer query rows than this (decode) take SmallLogits: a BLAS call for a handful of rows costs
// more than it saves (OpenBLAS also wakes its threads for it).
constexpr int kGemmMinRows = 32;

// logits (rows, count) = scale · q (rows, d) · centroidsᵀ, one dot product at a time. Built for
// AVX2 + FMA and for the baseline; the CPU's best runs.
SQKV_CPU_CLONES void SmallLogits(const float* q, int rows, int d, const float* centroids, int count,
                                 float scale, float* logits) {
  for (int j = 0; j < count; ++j) {
    const float* c = centroids + static_cast<size_t>(j) * d;
    for (int r = 0; r < rows; ++r) {
      const float* qr = q + static_cast<size_t>(r) * d;
      logits[static_cast<size_t>(r) * count + j] = Dot(qr, c, d) * scale;
    }
  }
}

// Float64 fallback for one query whose float32 logits overflowed: recomputes every logit in
// float64 and accumulates that query's per-key scores. q: (d); acc: (set.count).
void AccumulateRowF64(const float* q, int d, const Candidates& set, double* acc) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  auto logit = [&](const float* c) {
    double dot = 0;
    for (int i = 0; i < d; ++i) dot += static_cast<double>(q[i]) * c[i];
    return dot * scale;
  };
  std::vector<double> l(set.count), le(set.extra_count);
  double m = -std::numeric_limits<double>::infinity();
  for (int j = 0; j < set.count; ++j) {
    l[j] = logit(set.centroids + static_cast<size_t>(j) * d);
    m = std::max(m, l[j]);
  }
  for (int j = 0; j < set.extra_count; ++j) {
    le[j] = logit(set.extra_centroids + static_cast<size_t>(set.extra_ids[j]) * d);
    m = std::max(m, le[j]);
  }
  double z = 0;
  for (int j = 0; j < set.count; ++j) z += set.sizes[j] * std::exp(l[j] - m);
  for (int j = 0; j < set.extra_count; ++j) {
    z += set.extra_sizes[set.extra_ids[j]] * std::exp(le[j] - m);
  }
  for (int j = 0; j < set.count; ++j) acc[j] += std::exp(l[j] - m) / z;
}

// Accumulates one query's per-key scores e_j / Z into acc. row: (set.count) float32 logits of
// this query, overwritten; extra: (set.extra_count) logits of the extra entries.
// Returns false (acc untouched) when a logit is not finite, for the float64 fallback.
bool AccumulateRow(float* row, const float* extra, const Candidates& set, double* acc) {
  float m = -std::numeric_limits<float>::infinity();
  bool finite = true;
  for (int j = 0; j < set.count; ++j) {
    m = std::max(m, row[j]);
    finite &= std::isfinite(row[j]);
  }
  for (int j = 0; j < set.extra_count; ++j) {
    m = std::max(m, extra[j]);
    finite &= std::isfinite(extra[j]);
  }
  if (!finite) return false;
  double z = 0;
  for (int j = 0; j < set.count; ++j) {
    row[j] = std::exp(row[j] - m);
    z += static_cast<double>(set.sizes[j]) * row[j];
  }
  for (int j = 0; j < set.extra_count; ++j) {
    z += static_cast<double>(set.extra_sizes[set.extra_ids[j]]) * std::exp(extra[j] - m);
  }
  // z >= the size of the arg-max entry >= 1: no division by zero.
  const double inv_z = 1.0 / z;
  for (int j = 0; j < set.count; ++j) acc[j] += row[j] * inv_z;
  return true;
}

// scores: (set.count), mean over the queries of exp(l_j - m) / Σ_i n_i exp(l_i - m), the sum
// over the scored and the extra entries. queries: (num_queries, d).
// logits_out, when given, receives the float32 logits: (num_queries, set.count).
void ScoreCandidates(const float* queries, int num_queries, int d, const Candidates& set,
                     float* scores, std::vector<float>* logits_out) {
  if (set.count == 0) return;
  const float scale = LogitScale(d);
  std::vector<double> acc(set.count, 0.0);
  std::vector<float> block;
  std::vector<float> extra(set.extra_count);
  std::vector<float> copy;
  if (logits_out != nullptr) {
    logits_out->resize(static_cast<size_t>(num_queries) * set.count);
    copy.resize(set.count);
  } else {
    block.resize(static_cast<size_t>(std::min(num_queries, kQueryBlock)) * set.count);
  }
  for (int q0 = 0; q0 < num_queries; q0 += kQueryBlock) {
    const int rows = std::min(kQueryBlock, num_queries - q0);
    const float* q = queries + static_cast<size_t>(q0) * d;
    float* logits = logits_out != nullptr ? logits_out->data() + static_cast<size_t>(q0) * set.count
                                          : block.data();
    // logits (rows, count) = scale * q (rows, d) · centroidsᵀ (d, count).
    if (rows < kGemmMinRows) {
      SmallLogits(q, rows, d, set.centroids, set.count, scale, logits);
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, set.count, d, scale, q, d,
                  set.centroids, d, 0.f, logits, set.count);
    }
    for (int r = 0; r < rows; ++r) {
      const size_t qi = static_cast<size_t>(q0) + r;
      for (int j = 0; j < set.extra_count; ++j) {
        extra[j] = set.extra_logits[qi * set.extra_ld + set.extra_ids[j]];
      }
      // Scoring overwrites its row: work on a copy when logits_out must keep the logits.
      float* row = logits + static_cast<size_t>(r) * set.count;
      float* work = row;
      if (logits_out != nullptr) {
        std::copy(row, row + set.count, copy.begin());
        work = copy.data();
      }
      if (!AccumulateRow(work, extra.data(), set, acc.data())) {
        AccumulateRowF64(queries + qi * d, d, set, acc.data());
      }
    }
  }
  for (int j = 0; j < set.count; ++j) scores[j] = static_cast<float>(acc[j] / num_queries);
}

// Indices of `scores` by descending score, ties by ascending index.
std::vector<int32_t> RankDescending(const std::vector<float>& scores) {
  std::vector<int32_t> rank(scores.size());
  std::iota(rank.begin(), rank.end(), 0);
  std::sort(rank.begin(), rank.end(), [&](int32_t a, int32_t b) {
    return scores[a] != scores[b] ? scores[a] > scores[b] : a < b;
  });
  return rank;
}

// Applies the selection rule to scored level-2 clusters. ids: (n) cluster ids, ascending;
// scores: (n). Fills clusters (ascending), tokens and pages of *out.
void Pick(const HeadIndex& index, const std::vector<int32_t>& ids, const std::vector<float>& scores,
          const SelectOptions& options, HeadSelection* out) {
  std::vector<int32_t>& chosen = out->clusters;
  chosen.clear();
  switch (options.mode) {
    case SelectOptions::Mode::kDense:
      chosen = ids;
      break;
    case SelectOptions::Mode::kThreshold:
      for (size_t i = 0; i < ids.size(); ++i) {
        if (scores[i] >= options.threshold) chosen.push_back(ids[i]);
      }
      break;
    case SelectOptions::Mode::kKeepFraction: {
      const int64_t target = KeepTokenTarget(options.keep_fraction, index.tokens);
      int64_t kept = 0;
      for (int32_t i : RankDescending(scores)) {
        if (kept >= target) break;
        chosen.push_back(ids[i]);
        kept += index.cluster_size[ids[i]];
      }
      std::sort(chosen.begin(), chosen.end());
      break;
    }
  }
  out->tokens = 0;
  out->pages = 0;
  for (int32_t c : chosen) {
    out->tokens += index.cluster_size[c];
    out->pages += index.cluster_page_begin[c + 1] - index.cluster_page_begin[c];
  }
}

Status CheckInputs(const HeadIndex& index, const float* queries, int num_queries,
                   const SelectOptions& options, const HeadSelection* out) {
  if (out == nullptr || queries == nullptr) return Status::InvalidArgument("select: null buffer");
  const int32_t d = index.head_dim;
  const int32_t nc = index.num_clusters();
  if (d < 1 || nc < 1 || index.centroids.size() != static_cast<size_t>(nc) * d ||
      index.cluster_page_begin.size() != static_cast<size_t>(nc) + 1) {
    return Status::InvalidArgument("select: malformed index (run ValidateHeadIndex)");
  }
  if (index.hierarchical() &&
      (index.l1_centroids.size() != static_cast<size_t>(index.num_l1()) * d ||
       index.l1_child_begin.size() != static_cast<size_t>(index.num_l1()) + 1)) {
    return Status::InvalidArgument("select: malformed level-1 index (run ValidateHeadIndex)");
  }
  if (num_queries < 1) {
    return Status::InvalidArgument("select: num_queries " + std::to_string(num_queries));
  }
  const size_t count = static_cast<size_t>(num_queries) * d;
  for (size_t i = 0; i < count; ++i) {
    if (!std::isfinite(queries[i])) {
      return Status::InvalidArgument("select: query element (" + std::to_string(i / d) + ", " +
                                     std::to_string(i % d) + ") is not finite");
    }
  }
  if (std::isnan(options.keep_fraction) || std::isnan(options.threshold) ||
      std::isnan(options.l1_keep_fraction)) {
    return Status::InvalidArgument("select: NaN in options");
  }
  return Status::Ok();
}

// Single-level selection over every level-2 cluster.
void SelectFlat(const HeadIndex& index, const float* queries, int num_queries,
                const SelectOptions& options, HeadSelection* out) {
  const int32_t nc = index.num_clusters();
  std::vector<float> scores(nc);
  ScoreClusters(index, queries, num_queries, scores.data());
  std::vector<int32_t> ids(nc);
  std::iota(ids.begin(), ids.end(), 0);
  Pick(index, ids, scores, options, out);
  out->centroids_scored = nc;
}

}  // namespace

int32_t KeepTokenTarget(float fraction, int32_t tokens) {
  if (!(fraction > 0.f) || tokens <= 0) return 0;
  if (fraction >= 1.f) return tokens;
  // fraction = digits * 10^-scale, the shortest decimal that reads back as `fraction` (what the
  // caller wrote: 0.1f is 0.1 + 1.5e-9, and ceil(0.1f * 10^9) in binary would be 10^8 + 2).
  char buf[32];
  const auto [end, ec] = std::to_chars(buf, buf + sizeof buf, fraction,
                                       std::chars_format::scientific);  // "d.ddde-XX"
  if (ec != std::errc()) return tokens;  // cannot happen: 32 bytes hold any float
  int64_t digits = 0;                    // at most 9 significant digits
  int scale = 0;
  const char* p = buf;
  bool after_point = false;
  for (; p < end && *p != 'e'; ++p) {
    if (*p == '.') {
      after_point = true;
      continue;
    }
    digits = digits * 10 + (*p - '0');
    scale += after_point;
  }
  int exponent = 0;
  std::from_chars(p + 1 + (p[1] == '+'), end, exponent);
  scale -= exponent;  // >= 1: 0 < fraction < 1
  // ceil(digits * tokens / 10^scale), exactly: digits * tokens < 10^9 * 2^31 < 2^63.
  const int64_t num = digits * tokens;
  if (scale > 18) return 1;  // num < 10^19 <= 10^scale: a positive fraction of one key
  int64_t den = 1;
  for (int i = 0; i < scale; ++i) den *= 10;
  const int64_t t = num / den + (num % den != 0);
  return static_cast<int32_t>(std::clamp<int64_t>(t, 1, tokens));
}

float Level1KeepFraction(const SelectOptions& options) {
  const float set = options.l1_keep_fraction;
  switch (options.mode) {
    case SelectOptions::Mode::kDense:
      return 1.f;
    case SelectOptions::Mode::kThreshold:
      return set > 0.f ? std::min(1.f, set) : 1.f;
    case SelectOptions::Mode::kKeepFraction:
      break;
  }
  const float keep = std::clamp(options.keep_fraction, 0.f, 1.f);
  const float f1 = set > 0.f ? std::min(1.f, set) : std::min(1.f, 3.f * keep);
  return std::max(f1, keep);
}

void ScoreClusters(const HeadIndex& index, const float* queries, int num_queries, float* scores) {
  Candidates all;
  all.centroids = index.centroids.data();
  all.sizes = index.cluster_size.data();
  all.count = index.num_clusters();
  ScoreCandidates(queries, num_queries, index.head_dim, all, scores, nullptr);
}

Status SelectClusters(const HeadIndex& index, const float* queries, int num_queries,
                      const SelectOptions& options, HeadSelection* out) {
  SQKV_RETURN_IF_ERROR(CheckInputs(index, queries, num_queries, options, out));
  if (!index.hierarchical()) {
    SelectFlat(index, queries, num_queries, options, out);
    return Status::Ok();
  }

  // Level 1: score the parents, keep the best until enough keys lie under them.
  const int32_t d = index.head_dim;
  const int32_t n1 = index.num_l1();
  Candidates parents;
  parents.centroids = index.l1_centroids.data();
  parents.sizes = index.l1_size.data();
  parents.count = n1;
  std::vector<float> parent_scores(n1);
  std::vector<float> l1_logits;  // (num_queries, n1)
  ScoreCandidates(queries, num_queries, d, parents, parent_scores.data(), &l1_logits);

  std::vector<uint8_t> kept(n1, 0);
  const int64_t target = KeepTokenTarget(Level1KeepFraction(options), index.tokens);
  int32_t num_kept = 0;
  if (target >= index.tokens) {
    num_kept = n1;  // every parent (dense, and threshold mode by default): nothing to rank
  } else {
    int64_t keys = 0;
    for (int32_t p : RankDescending(parent_scores)) {
      if (keys >= target) break;
      kept[p] = 1;
      ++num_kept;
      keys += index.l1_size[p];
    }
  }
  if (num_kept == n1) {
    // Nothing pruned: exactly the single-level selection, plus the parents scored.
    SelectFlat(index, queries, num_queries, options, out);
    out->centroids_scored += n1;
    return Status::Ok();
  }

  // Level 2: score only the children of kept parents; pruned parents join the normaliser.
  std::vector<int32_t> child_ids, pruned;
  for (int32_t p = 0; p < n1; ++p) {
    if (!kept[p]) {
      pruned.push_back(p);
      continue;
    }
    for (int32_t c = index.l1_child_begin[p]; c < index.l1_child_begin[p + 1]; ++c) {
      child_ids.push_back(c);
    }
  }
  std::vector<float> child_centroids;
  std::vector<int32_t> child_sizes;
  child_centroids.reserve(child_ids.size() * d);
  for (int32_t c : child_ids) {
    const float* src = index.centroids.data() + static_cast<size_t>(c) * d;
    child_centroids.insert(child_centroids.end(), src, src + d);
    child_sizes.push_back(index.cluster_size[c]);
  }
  Candidates children;
  children.centroids = child_centroids.data();
  children.sizes = child_sizes.data();
  children.count = static_cast<int>(child_ids.size());
  children.extra_centroids = index.l1_centroids.data();
  children.extra_sizes = index.l1_size.data();
  children.extra_ids = pruned.data();
  children.extra_count = static_cast<int>(pruned.size());
  children.extra_logits = l1_logits.data();
  children.extra_ld = n1;
  std::vector<float> child_scores(child_ids.size());
  ScoreCandidates(queries, num_queries, d, children, child_scores.data(), nullptr);
  Pick(index, child_ids, child_scores, options, out);
  out->centroids_scored = n1 + children.count;
  return Status::Ok();
}

}  // namespace sqkv
