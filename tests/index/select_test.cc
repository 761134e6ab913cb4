#include "index/select.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "index/build.h"
#include "tests/testing/synthetic_index.h"
#include "tests/testing/testing.h"

namespace sqkv {
namespace {

using testing::FreshSeed;
using testing::RandomNormal;
using testing::SyntheticIndex;
using Mode = SelectOptions::Mode;

// ---- float64 reference, written from the formulas in select.h ----

// Log-domain per-key scores of the listed entries, each of the queries normalised over `rows`
// (entries scored) plus `extra` (entries that only join the normaliser).
// centroids: (*, d); log_score: (rows.size()), log of mean_q exp(l_qj) / Σ_i n_i exp(l_qi).
struct Entry {
  const float* centroid;
  int32_t size;
};
std::vector<double> RefLogScores(const float* queries, int nq, int d,
                                 const std::vector<Entry>& rows, const std::vector<Entry>& extra) {
  std::vector<double> out(rows.size(), -std::numeric_limits<double>::infinity());
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  auto logit = [&](const float* q, const float* c) {
    double s = 0;
    for (int i = 0; i < d; ++i) s += static_cast<double>(q[i]) * c[i];
    return s * scale;
  };
  auto log_add = [](double a, double b) {
    if (a == -std::numeric_limits<double>::infinity()) return b;
    const double m = std::max(a, b);
    return m + std::log(std::exp(a - m) + std::exp(b - m));
  };
  for (int qi = 0; qi < nq; ++qi) {
    const float* q = queries + static_cast<size_t>(qi) * d;
    std::vector<double> l;
    double log_z = -std::numeric_limits<double>::infinity();
    for (const Entry& e : rows) {
      l.push_back(logit(q, e.centroid));
      log_z = log_add(log_z, std::log(static_cast<double>(e.size)) + l.back());
    }
    for (const Entry& e : extra) {
      log_z = log_add(log_z, std::log(static_cast<double>(e.size)) + logit(q, e.centroid));
    }
    for (size_t j = 0; j < rows.size(); ++j) out[j] = log_add(out[j], l[j] - log_z);
  }
  for (double& v : out) v -= std::log(static_cast<double>(nq));
  return out;
}

std::vector<Entry> Leaves(const HeadIndex& x, const std::vector<int32_t>& ids) {
  std::vector<Entry> e;
  for (int32_t c : ids)
    e.push_back({x.centroids.data() + static_cast<size_t>(c) * x.head_dim, x.cluster_size[c]});
  return e;
}
std::vector<Entry> Parents(const HeadIndex& x, const std::vector<int32_t>& ids) {
  std::vector<Entry> e;
  for (int32_t p : ids)
    e.push_back({x.l1_centroids.data() + static_cast<size_t>(p) * x.head_dim, x.l1_size[p]});
  return e;
}
std::vector<int32_t> Range(int n) {
  std::vector<int32_t> r(n);
  std::iota(r.begin(), r.end(), 0);
  return r;
}

// Positions (into ids) by descending score, ties by ascending id.
std::vector<size_t> Ranked(const std::vector<int32_t>& ids, const std::vector<double>& score) {
  std::vector<size_t> r(ids.size());
  std::iota(r.begin(), r.end(), 0);
  std::sort(r.begin(), r.end(), [&](size_t a, size_t b) {
    return score[a] != score[b] ? score[a] > score[b] : ids[a] < ids[b];
  });
  return r;
}

// The budget rule is select.h's KeepTokenTarget (its own test: KeepTokenTarget.Definition).
int64_t Target(float fraction, int64_t tokens) {
  return KeepTokenTarget(fraction, static_cast<int32_t>(tokens));
}

// Float32 scoring (logits of magnitude ~10 carry errors ~1e-6) can reorder scores closer than
// this (in log) to each other or to a threshold; a reference decision that hinges on such a
// near-tie is not compared.
constexpr double kNearTie = 1e-5;

// The selection rule over scored entries (log scores). Returns chosen ids, ascending; sets
// *ambiguous when the outcome hinges on a near-tie.
std::vector<int32_t> RefPick(const std::vector<int32_t>& ids, const std::vector<double>& log_score,
                             const std::vector<int32_t>& sizes, const SelectOptions& o,
                             int64_t tokens, bool* ambiguous) {
  std::vector<int32_t> out;
  if (o.mode == Mode::kDense) {
    out = ids;
  } else if (o.mode == Mode::kThreshold) {
    const double log_t = std::log(static_cast<double>(o.threshold));
    for (size_t i = 0; i < ids.size(); ++i) {
      if (log_score[i] >= log_t) out.push_back(ids[i]);
      if (std::abs(log_score[i] - log_t) < kNearTie) *ambiguous = true;
    }
  } else {
    const int64_t target = Target(o.keep_fraction, tokens);
    int64_t kept = 0;
    const std::vector<size_t> rank = Ranked(ids, log_score);
    for (size_t k = 0; k < rank.size(); ++k) {
      if (kept >= target) {
        // Only the last one in and the first one out can trade places.
        if (k > 0 && log_score[rank[k - 1]] - log_score[rank[k]] < kNearTie) *ambiguous = true;
        break;
      }
      out.push_back(ids[rank[k]]);
      kept += sizes[rank[k]];
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

struct RefResult {
  std::vector<int32_t> clusters;
  int32_t centroids_scored = 0;
  bool ambiguous = false;  // decided by a near-tie: not compared
};

RefResult RefSelect(const HeadIndex& x, const std::vector<float>& q, int nq,
                    const SelectOptions& o) {
  const int d = x.head_dim;
  std::vector<int32_t> leaf_ids = Range(x.num_clusters());
  std::vector<Entry> extra;
  RefResult r;
  if (x.hierarchical()) {
    const std::vector<int32_t> pids = Range(x.num_l1());
    const std::vector<double> ps = RefLogScores(q.data(), nq, d, Parents(x, pids), {});
    // The level-1 policy is select.h's (its own test: Level1KeepFraction.PerMode).
    const double f1 = Level1KeepFraction(o);
    const std::vector<int32_t> kept = RefPick(
        pids, ps, x.l1_size,
        [&] {
          SelectOptions k;
          k.mode = Mode::kKeepFraction;
          k.keep_fraction = static_cast<float>(f1);
          return k;
        }(),
        x.tokens, &r.ambiguous);
    r.centroids_scored = x.num_l1();
    leaf_ids.clear();
    std::vector<int32_t> pruned;
    for (int32_t p : pids) {
      if (std::binary_search(kept.begin(), kept.end(), p)) {
        for (int c = x.l1_child_begin[p]; c < x.l1_child_begin[p + 1]; ++c) leaf_ids.push_back(c);
      } else {
        pruned.push_back(p);
      }
    }
    extra = Parents(x, pruned);
  }
  std::vector<int32_t> sizes;
  for (int32_t c : leaf_ids) sizes.push_back(x.cluster_size[c]);
  const std::vector<double> ls = RefLogScores(q.data(), nq, d, Leaves(x, leaf_ids), extra);
  r.clusters = RefPick(leaf_ids, ls, sizes, o, x.tokens, &r.ambiguous);
  r.centroids_scored += static_cast<int32_t>(leaf_ids.size());
  return r;
}

// ---- checks ----

void ExpectSelection(const HeadIndex& x, const HeadSelection& got, const RefResult& want) {
  if (want.ambiguous) {
    std::printf("[note] reference decided by a near-tie; selection not compared\n");
  } else {
    EXPECT_EQ(got.clusters, want.clusters);
    EXPECT_EQ(got.centroids_scored, want.centroids_scored);
  }
  EXPECT_TRUE(std::is_sorted(got.clusters.begin(), got.clusters.end()));
  int32_t tokens = 0, pages = 0;
  for (int32_t c : got.clusters) {
    tokens += x.cluster_size[c];
    pages += x.cluster_page_begin[c + 1] - x.cluster_page_begin[c];
  }
  EXPECT_EQ(got.tokens, tokens);
  EXPECT_EQ(got.pages, pages);
}

SelectOptions Keep(float f, float l1 = 0.f) {
  SelectOptions o;
  o.keep_fraction = f;
  o.l1_keep_fraction = l1;
  return o;
}

TEST(KeepTokenTarget, Definition) {
  EXPECT_EQ(KeepTokenTarget(0.1f, 100), 10);
  EXPECT_EQ(KeepTokenTarget(0.05f, 4096), 205);
  EXPECT_EQ(KeepTokenTarget(0.3f, 10), 3);
  EXPECT_EQ(KeepTokenTarget(1e-9f, 100), 1);
  EXPECT_EQ(KeepTokenTarget(0.f, 100), 0);
  EXPECT_EQ(KeepTokenTarget(-1.f, 100), 0);
  EXPECT_EQ(KeepTokenTarget(1.f, 100), 100);
  EXPECT_EQ(KeepTokenTarget(7.f, 100), 100);
  EXPECT_EQ(KeepTokenTarget(0.1f, 7), 1);
  // Past a million keys a fixed relative slack would drop the half key: ceil(500000.5) stays.
  EXPECT_EQ(KeepTokenTarget(0.5f, 1000001), 500001);
  EXPECT_EQ(KeepTokenTarget(0.25f, 4000001), 1000001);
  EXPECT_EQ(KeepTokenTarget(0.1f, 1000000000), 100000000);  // 0.1f is 0.1 + 1.5e-9
  EXPECT_EQ(KeepTokenTarget(0.1f, 1000000001), 100000001);
}

TEST(Level1KeepFraction, PerMode) {
  SelectOptions o;
  o.keep_fraction = 0.1f;
  EXPECT_FLOAT_EQ(Level1KeepFraction(o), 0.3f);  // automatic: 3 x keep
  o.keep_fraction = 0.5f;
  EXPECT_FLOAT_EQ(Level1KeepFraction(o), 1.f);  // capped at every parent
  o.keep_fraction = 0.3f;
  o.l1_keep_fraction = 0.6f;
  EXPECT_FLOAT_EQ(Level1KeepFraction(o), 0.6f);  // as set
  o.l1_keep_fraction = 0.2f;
  EXPECT_FLOAT_EQ(Level1KeepFraction(o), 0.3f);  // never below the budget it must meet
  o.mode = Mode::kThreshold;
  o.l1_keep_fraction = 0.f;
  EXPECT_FLOAT_EQ(Level1KeepFraction(o), 1.f);  // calibrated thresholds: no pruning by default
  o.l1_keep_fraction = 0.2f;
  EXPECT_FLOAT_EQ(Level1KeepFraction(o), 0.2f);  // pruning only when asked for
  o.mode = Mode::kDense;
  EXPECT_FLOAT_EQ(Level1KeepFraction(o), 1.f);
}

TEST(ScoreClusters, MatchesFloat64AndSumsToOne) {
  std::mt19937_64 rng(FreshSeed());
  const HeadIndex x = SyntheticIndex(rng, 150, 64, 16, 40);
  for (int nq : {1, 7, 600}) {  // 600: more than one GEMM block of queries
    const std::vector<float> q = RandomNormal(static_cast<size_t>(nq) * 64, rng);
    std::vector<float> s(x.num_clusters());
    ScoreClusters(x, q.data(), nq, s.data());
    const std::vector<double> ref =
        RefLogScores(q.data(), nq, 64, Leaves(x, Range(x.num_clusters())), {});
    double mass = 0;
    for (int c = 0; c < x.num_clusters(); ++c) {
      ASSERT_NEAR(s[c], std::exp(ref[c]), 1e-4 * std::exp(ref[c]) + 1e-12) << "cluster " << c;
      mass += static_cast<double>(x.cluster_size[c]) * s[c];
    }
    EXPECT_NEAR(mass, 1.0, 1e-5);
  }
}

TEST(SelectClusters, FlatMatchesReference) {
  std::mt19937_64 rng(FreshSeed());
  for (int trial = 0; trial < 4; ++trial) {
    const int d = trial % 2 ? 128 : 48;
    const HeadIndex x = SyntheticIndex(rng, 100 + 37 * trial, d, 16, 50);
    for (int nq : {1, 4, 64}) {  // 64: a GQA group of 4 heads over 16 positions
      const std::vector<float> q = RandomNormal(static_cast<size_t>(nq) * d, rng, 1.5f);
      for (float f : {-1.f, 0.f, 0.01f, 0.1f, 0.25f, 0.5f, 0.99f, 1.f, 2.f}) {
        SCOPED_TRACE("trial " + std::to_string(trial) + " nq " + std::to_string(nq) + " keep " +
                     std::to_string(f));
        HeadSelection got;
        ASSERT_TRUE(SelectClusters(x, q.data(), nq, Keep(f), &got).ok());
        ExpectSelection(x, got, RefSelect(x, q, nq, Keep(f)));
        if (f <= 0) {
          EXPECT_TRUE(got.clusters.empty());
        }
        if (f >= 1) {
          EXPECT_EQ(got.tokens, x.tokens);
        }
        if (f > 0) {
          EXPECT_GE(got.tokens, KeepTokenTarget(f, x.tokens));
        }
      }
      SelectOptions dense;
      dense.mode = Mode::kDense;
      HeadSelection got;
      ASSERT_TRUE(SelectClusters(x, q.data(), nq, dense, &got).ok());
      ExpectSelection(x, got, RefSelect(x, q, nq, dense));
      EXPECT_EQ(got.tokens, x.tokens);
      EXPECT_EQ(got.pages, x.num_pages());
    }
  }
}

TEST(SelectClusters, ThresholdMatchesReference) {
  std::mt19937_64 rng(FreshSeed());
  const int d = 64, nq = 16;
  const HeadIndex x = SyntheticIndex(rng, 200, d, 8, 30);
  const std::vector<float> q = RandomNormal(static_cast<size_t>(nq) * d, rng, 1.5f);
  std::vector<double> ls = RefLogScores(q.data(), nq, d, Leaves(x, Range(x.num_clusters())), {});
  std::sort(ls.rbegin(), ls.rend());
  // Thresholds halfway (in log) between consecutive reference scores: far from every score.
  for (size_t k : {size_t{0}, size_t{5}, size_t{50}, size_t{198}}) {
    SelectOptions o;
    o.mode = Mode::kThreshold;
    o.threshold = static_cast<float>(std::exp(0.5 * (ls[k] + ls[k + 1])));
    HeadSelection got;
    ASSERT_TRUE(SelectClusters(x, q.data(), nq, o, &got).ok());
    ExpectSelection(x, got, RefSelect(x, q, nq, o));
    EXPECT_EQ(got.clusters.size(), k + 1);
  }
}

TEST(SelectClusters, BuiltIndexMatchesReference) {
  std::mt19937_64 rng(FreshSeed());
  constexpr int kTokens = 1500, kDim = 64;
  const std::vector<float> keys = RandomNormal(kTokens * kDim, rng);
  for (int levels : {1, 2}) {
    IndexParams p;
    p.levels = levels;
    p.l1_fraction = 0.004f;
    HeadIndex x;
    ASSERT_TRUE(BuildHeadIndex(keys.data(), kTokens, kDim, p, &x).ok());
    // Queries near some keys, as in attention.
    std::vector<float> q = RandomNormal(8 * kDim, rng, 0.3f);
    for (int r = 0; r < 8; ++r) {
      for (int i = 0; i < kDim; ++i) q[r * kDim + i] += 2.f * keys[(97 * r) * kDim + i];
    }
    for (float f : {0.05f, 0.2f}) {
      HeadSelection got;
      ASSERT_TRUE(SelectClusters(x, q.data(), 8, Keep(f), &got).ok());
      ExpectSelection(x, got, RefSelect(x, q, 8, Keep(f)));
    }
  }
}

// Keys and queries scaled by 1000: logits in the hundreds of thousands. Scores must stay finite,
// agree with the float64 log-domain reference where float32 can represent them, and the best
// clusters must be selected.
TEST(SelectClusters, ExtremeLogitsStayFinite) {
  std::mt19937_64 rng(FreshSeed());
  const int d = 128, nq = 8;
  HeadIndex x = SyntheticIndex(rng, 120, d, 16, 20);
  for (float& v : x.centroids) v *= 1000.f;
  std::vector<float> q = RandomNormal(static_cast<size_t>(nq) * d, rng);
  for (float& v : q) v *= 1000.f;
  std::vector<float> s(x.num_clusters());
  ScoreClusters(x, q.data(), nq, s.data());
  const std::vector<double> ref =
      RefLogScores(q.data(), nq, d, Leaves(x, Range(x.num_clusters())), {});
  double max_logit = 0, mass = 0;
  for (int qi = 0; qi < nq; ++qi) {
    for (int c = 0; c < x.num_clusters(); ++c) {
      double dot = 0;
      for (int i = 0; i < d; ++i)
        dot += static_cast<double>(q[qi * d + i]) * x.centroids[c * d + i];
      max_logit = std::max(max_logit, std::abs(dot) / std::sqrt(d));
    }
  }
  // Float32 logits carry an absolute error of about 1e-6 of their magnitude.
  const double tol = 1e-5 * max_logit + 1e-3;
  for (int c = 0; c < x.num_clusters(); ++c) {
    ASSERT_TRUE(std::isfinite(s[c])) << c;
    ASSERT_GE(s[c], 0.f);
    mass += static_cast<double>(x.cluster_size[c]) * s[c];
    if (ref[c] > -80) {  // comfortably inside float32's range
      EXPECT_NEAR(std::log(s[c]), ref[c], tol) << "cluster " << c;
    } else if (s[c] > 0) {
      EXPECT_LT(std::log(s[c]), ref[c] + tol) << "cluster " << c;
    }
  }
  EXPECT_NEAR(mass, 1.0, 1e-4);
  const int best = static_cast<int>(std::max_element(ref.begin(), ref.end()) - ref.begin());
  HeadSelection got;
  ASSERT_TRUE(SelectClusters(x, q.data(), nq, Keep(0.05f), &got).ok());
  EXPECT_TRUE(std::binary_search(got.clusters.begin(), got.clusters.end(), best));
  EXPECT_GE(got.tokens, KeepTokenTarget(0.05f, x.tokens));
}

TEST(SelectClusters, HierarchicalMatchesReference) {
  std::mt19937_64 rng(FreshSeed());
  const int d = 64;
  for (int trial = 0; trial < 3; ++trial) {
    const HeadIndex x = SyntheticIndex(rng, 160, d, 16, 40, 8 + 8 * trial);
    for (int nq : {1, 32}) {
      const std::vector<float> q = RandomNormal(static_cast<size_t>(nq) * d, rng, 1.5f);
      for (const SelectOptions& o :
           {Keep(0.1f), Keep(0.05f, 0.5f), Keep(0.3f, 0.2f), Keep(0.f), Keep(0.02f, 0.9f)}) {
        SCOPED_TRACE("keep " + std::to_string(o.keep_fraction) + " l1 " +
                     std::to_string(o.l1_keep_fraction) + " nq " + std::to_string(nq));
        HeadSelection got;
        ASSERT_TRUE(SelectClusters(x, q.data(), nq, o, &got).ok());
        ExpectSelection(x, got, RefSelect(x, q, nq, o));
        // The budget holds even when the level-1 fraction asked for is below it.
        EXPECT_GE(got.tokens, KeepTokenTarget(o.keep_fraction, x.tokens));
      }
      SelectOptions t;
      t.mode = Mode::kThreshold;
      t.l1_keep_fraction = 0.6f;  // threshold mode prunes level 1 only when asked to
      t.threshold = 1.f / x.tokens;
      HeadSelection got;
      ASSERT_TRUE(SelectClusters(x, q.data(), nq, t, &got).ok());
      ExpectSelection(x, got, RefSelect(x, q, nq, t));
    }
  }
}

TEST(SelectClusters, HierarchicalKeepingEveryParentEqualsFlat) {
  std::mt19937_64 rng(FreshSeed());
  const int d = 96, nq = 12;
  const HeadIndex x = SyntheticIndex(rng, 140, d, 16, 30, 12);
  HeadIndex flat = x;
  flat.l1_centroids.clear();
  flat.l1_size.clear();
  flat.l1_child_begin.clear();
  const std::vector<float> q = RandomNormal(static_cast<size_t>(nq) * d, rng);
  for (float f : {0.02f, 0.1f, 0.4f}) {
    HeadSelection h, g;
    ASSERT_TRUE(SelectClusters(x, q.data(), nq, Keep(f, 1.f), &h).ok());
    ASSERT_TRUE(SelectClusters(flat, q.data(), nq, Keep(f), &g).ok());
    EXPECT_EQ(h.clusters, g.clusters);
    EXPECT_EQ(h.tokens, g.tokens);
    EXPECT_EQ(h.pages, g.pages);
    EXPECT_EQ(h.centroids_scored, g.centroids_scored + x.num_l1());
  }
  // Threshold mode keeps every parent unless told otherwise, so a threshold calibrated on
  // single-level scores selects what it was calibrated for.
  std::vector<float> flat_scores(flat.num_clusters());
  ScoreClusters(flat, q.data(), nq, flat_scores.data());
  std::sort(flat_scores.begin(), flat_scores.end());
  for (size_t k : {flat_scores.size() / 2, flat_scores.size() * 9 / 10}) {
    SelectOptions t;
    t.mode = Mode::kThreshold;
    t.threshold = flat_scores[k];
    HeadSelection h, g;
    ASSERT_TRUE(SelectClusters(x, q.data(), nq, t, &h).ok());
    ASSERT_TRUE(SelectClusters(flat, q.data(), nq, t, &g).ok());
    EXPECT_EQ(h.clusters, g.clusters) << "threshold at rank " << k;
    EXPECT_EQ(static_cast<size_t>(g.clusters.size()), flat_scores.size() - k);
  }
  SelectOptions dense;
  dense.mode = Mode::kDense;
  HeadSelection h;
  ASSERT_TRUE(SelectClusters(x, q.data(), nq, dense, &h).ok());
  EXPECT_EQ(h.tokens, x.tokens);
}

TEST(SelectClusters, HierarchicalPruningScoresFewerCentroids) {
  std::mt19937_64 rng(FreshSeed());
  constexpr int kTokens = 3000, kDim = 64;
  const std::vector<float> keys = RandomNormal(kTokens * kDim, rng);
  IndexParams p;
  p.levels = 2;
  HeadIndex x;
  ASSERT_TRUE(BuildHeadIndex(keys.data(), kTokens, kDim, p, &x).ok());
  ASSERT_GT(x.num_l1(), 4);
  const std::vector<float> q = RandomNormal(4 * kDim, rng);
  HeadSelection got;
  ASSERT_TRUE(SelectClusters(x, q.data(), 4, Keep(0.05f), &got).ok());  // level 1 keeps 15%
  EXPECT_LT(got.centroids_scored, x.num_clusters() / 2 + x.num_l1());
  EXPECT_GE(got.tokens, KeepTokenTarget(0.05f, kTokens));
  ExpectSelection(x, got, RefSelect(x, q, 4, Keep(0.05f)));
}

// The CPU benchmark's shape for one kv head: 512 positions x GQA group 4 against 1638 centroids
// of head_dim 128. Reports the time; selection must take milliseconds.
TEST(SelectClusters, BenchmarkScaleTiming) {
  std::mt19937_64 rng(FreshSeed());
  constexpr int kQueries = 512 * 4, kClusters = 1638, kDim = 128;
  const HeadIndex flat = SyntheticIndex(rng, kClusters, kDim, 16, 40);
  const HeadIndex tree = SyntheticIndex(rng, kClusters, kDim, 16, 40, kClusters / 5);
  const std::vector<float> q = RandomNormal(static_cast<size_t>(kQueries) * kDim, rng);
  for (const HeadIndex* x : {&flat, &tree}) {
    HeadSelection got;
    const auto t0 = std::chrono::steady_clock::now();
    ASSERT_TRUE(SelectClusters(*x, q.data(), kQueries, Keep(0.1f), &got).ok());
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::printf("[timing] select %s, %d queries x %d centroids x d %d: %.1f ms (%d scored)\n",
                x->hierarchical() ? "two-level" : "single-level", kQueries, kClusters, kDim, ms,
                got.centroids_scored);
    EXPECT_LT(ms, 5000.0);
  }
}

TEST(SelectClusters, RejectsBadQueries) {
  std::mt19937_64 rng(FreshSeed());
  const HeadIndex x = SyntheticIndex(rng, 10, 8, 4, 5);
  std::vector<float> q = RandomNormal(2 * 8, rng);
  HeadSelection got;
  EXPECT_TRUE(SelectClusters(x, q.data(), 0, {}, &got).IsInvalidArgument());
  q[11] = std::numeric_limits<float>::quiet_NaN();
  const Status s = SelectClusters(x, q.data(), 2, {}, &got);
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("(1, 3)"), std::string::npos) << s.ToString();
  q[11] = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(SelectClusters(x, q.data(), 2, {}, &got).IsInvalidArgument());
}

}  // namespace
}  // namespace sqkv
