// Cluster selection, the CPU reference: which clusters of one (layer, kv head) a batch of
// queries needs.
//
// Score of cluster j (the estimated attention weight of one key of cluster j, averaged over the
// queries of the kv head's group):
//     s_j = mean_q [ exp(q·c_j/√d) / Σ_i n_i·exp(q·c_i/√d) ]
// computed with the max subtracted (never overflows). n_j·s_j is the cluster-size-weighted softmax
// estimate of the attention mass of cluster j; Σ_j n_j·s_j = 1.
//
// Ranking: descending score, ties broken by ascending cluster id. Every backend (CPU, GPU) must
// select exactly the clusters this reference selects.
//
// Hierarchical indexes (index.hierarchical()): the level-1 parents are scored by the same formula
// over (l1_centroids, l1_size) and kept in ranking order until KeepTokenTarget(l1 fraction) keys
// lie under them (kDense keeps every parent). Only the children of kept parents are scored, with
//     Z = Σ_{children c of kept parents} n_c·e_c + Σ_{pruned parents p} n_p·e_p
// (the max subtracted over all of those logits); the mode's rule then applies to those children.
// When every parent is kept the result is exactly the single-level selection.
//
// Arithmetic of this reference: logits (q·c)·(1/√d) in float32 (BLAS sgemm), e = expf(l - m) in
// float32, Z and the mean over queries in float64, the score rounded to float32. A query whose
// float32 logits overflow is redone in float64.
#pragma once

#include <cstdint>
#include <vector>

#include "common/status.h"
#include "index/head_index.h"

namespace sqkv {

struct SelectOptions {
  enum class Mode : uint8_t {
    kKeepFraction,  // whole clusters in descending score until >= keep_fraction * tokens keys
    kThreshold,     // every cluster with score >= threshold
    kDense,         // every cluster
  };
  Mode mode = Mode::kKeepFraction;
  // Default: 0.1 (keep 10% of the keys).
  float keep_fraction = 0.1f;
  // Per-key score threshold for kThreshold (calibrated per target sparsity). Default: 0.
  float threshold = 0.f;
  // Hierarchical indexes only: the level-1 parents kept (descending level-1 score) until
  // >= l1_keep_fraction * tokens keys lie under them; only their children are scored.
  // 1.0 keeps every parent (and selects exactly what a single-level scan of the leaves would).
  // Default: 0 = choose automatically; Level1KeepFraction() gives what each mode applies.
  float l1_keep_fraction = 0.f;
};

struct HeadSelection {
  // Selected level-2 clusters in ascending id (= storage) order.
  std::vector<int32_t> clusters;
  int32_t tokens = 0;            // keys under the selected clusters
  int32_t pages = 0;             // pages under the selected clusters
  int32_t centroids_scored = 0;  // level-1 plus level-2 centroids scored
};

// The key count kKeepFraction (and the level-1 keep rule) aims for: 0 when fraction <= 0,
// `tokens` when fraction >= 1, else ceil(fraction * tokens) computed exactly for the shortest
// decimal that reads back as `fraction`, i.e. the number the caller wrote (0.1f * 100 gives 10,
// not 11; 0.1f * 10^9 gives 10^8; 0.5f * 1000001 gives 500001); at least 1 for any positive
// fraction.
int32_t KeepTokenTarget(float fraction, int32_t tokens);

// The level-1 keep fraction a hierarchical selection applies (parents kept in ranking order until
// that fraction of the keys lies under them), in [0, 1]:
//   kDense         1 (every parent);
//   kKeepFraction  l1_keep_fraction when set, else min(1, 3 * keep_fraction); never below
//                  keep_fraction, so the children of the kept parents can meet the budget;
//   kThreshold     l1_keep_fraction when set, else 1: thresholds are calibrated on single-level
//                  scores (index/calibrate.h), which only an unpruned level 2 reproduces. A set
//                  l1_keep_fraction prunes, and the sparsity reached then differs from the
//                  calibrated one.
// Every backend takes its level-1 rule from here.
float Level1KeepFraction(const SelectOptions& options);

// scores: (num_clusters); queries: (num_queries, head_dim) float32.
// Scores every level-2 cluster (ignores level 1).
void ScoreClusters(const HeadIndex& index, const float* queries, int num_queries, float* scores);

// queries: (num_queries, head_dim) float32, finite. num_queries >= 1.
Status SelectClusters(const HeadIndex& index, const float* queries, int num_queries,
                      const SelectOptions& options, HeadSelection* out);

}  // namespace sqkv
