// Threshold calibration (Squeezed Attention §3.3): one global per-key score threshold per layer
// and target sparsity, learnt from calibration queries, so that selecting clusters with
// score >= threshold keeps on average (1 - sparsity) of the keys. Heads whose queries are peaked
// then keep fewer keys and flat heads more.
#pragma once

#include <vector>

#include "common/status.h"
#include "index/head_index.h"

namespace sqkv {

// heads: (kv_heads) indexes of one layer; queries: (q_heads, window, head_dim) float32, finite,
// q_heads a multiple of kv_heads. Every window position of every kv head is one calibration
// request made of the g = q_heads / kv_heads query rows of its group at that position (a decode
// step). sparsities: each in (0, 1). thresholds: (sparsities.size()) out.
//
// The threshold for target keep k = 1 - sparsity is the largest T with
//   mean over requests of [ Σ_{j: s_j >= T} n_j / tokens ] >= k,
// computed exactly by sorting every (request, cluster) score with weight n_j / (tokens·requests).
// Scores are ScoreClusters' (single level; on two-level indexes the level-2 scores are used).
Status CalibrateThresholds(const std::vector<HeadIndex>& heads, const float* queries, int q_heads,
                           int window, const std::vector<float>& sparsities,
                           std::vector<float>* thresholds);

// The threshold for `sparsity` from calibrated (sparsity, threshold) pairs (ascending sparsity):
// exact at a calibrated level, else interpolated linearly in log(threshold). InvalidArgument when
// `sparsity` lies outside the calibrated range.
Status InterpolateThreshold(const std::vector<float>& sparsities,
                            const std::vector<float>& thresholds, float sparsity, float* out);

}  // namespace sqkv
