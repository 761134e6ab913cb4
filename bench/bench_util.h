// Helpers the GPU benchmarks share: fast fresh inputs, synthetic head indexes, medians, fail-fast
// error checks, and bandwidth timed through gpu/engine_timing.h. Plain C++ (no CUDA types).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "common/status.h"
#include "gpu/engine_timing.h"
#include "index/head_index.h"

namespace sqkv::bench {

// The shape of issue 3's GPU benchmarks and of BENCHMARKS.md's H200 runs (a file takes it with
// `using namespace sqkv::bench::shape;`): 32 query heads over 8 kv heads (GQA group 4), head_dim
// 128, pages of 16 tokens, centroids at 5% of the tokens; decode batches of 8 contexts, prefill
// with 1,024 queries, 3 warm-up launches before timing.
namespace shape {
inline constexpr int kKvHeads = 8;
inline constexpr int kQHeads = 32;
inline constexpr int kGroup = kQHeads / kKvHeads;
inline constexpr int kHeadDim = 128;
inline constexpr int kPageTokens = 16;
inline constexpr double kCentroidFraction = 0.05;
inline constexpr int kContexts = 8;
inline constexpr int kPrefillQueries = 1024;
inline constexpr int kWarmup = 3;
}  // namespace shape

// Ends the process with `what` and the status unless it is ok.
inline void Check(const Status& st, const char* what) {
  if (st.ok()) return;
  std::fprintf(stderr, "%s: %s\n", what, st.ToString().c_str());
  std::exit(1);
}

// Ends the process with the file, line and status unless `expr` (a Status) is ok.
#define CHECK_OK(expr)                                                                \
  do {                                                                                \
    const ::sqkv::Status _st = (expr);                                                \
    if (!_st.ok()) {                                                                  \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, _st.ToString().c_str()); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

// splitmix64: fast fresh inputs for gigabytes of pages.
struct Rng {
  uint64_t s;
  uint64_t Next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float Uniform() { return static_cast<float>(Next() >> 40) / static_cast<float>(1 << 24); }
  // Approximately N(0, 1): a scaled sum of four uniforms.
  float Normal() { return (Uniform() + Uniform() + Uniform() + Uniform() - 2.f) * 1.7320508f; }
  // Uniform in [0, n).
  int Pick(int n) { return static_cast<int>(Next() % static_cast<uint64_t>(n)); }
};

// One head's index over `tokens` keys: round(centroid_fraction * tokens) clusters whose sizes are
// a uniform random composition of `tokens` (each >= 1), each cluster on its own pages, positions
// in storage order. Centroids: (clusters, head_dim), all zero (the caller draws them).
inline HeadIndex SyntheticHead(Rng& rng, int tokens, int head_dim, int page_tokens,
                               double centroid_fraction) {
  HeadIndex x;
  x.head_dim = head_dim;
  x.page_tokens = page_tokens;
  x.tokens = tokens;
  const int clusters = static_cast<int>(std::lround(centroid_fraction * tokens));
  std::vector<int32_t> cuts(tokens - 1);
  for (int i = 0; i < tokens - 1; ++i) cuts[i] = i + 1;
  for (int i = 0; i < clusters - 1; ++i) {
    std::swap(cuts[i], cuts[i + rng.Next() % (cuts.size() - i)]);
  }
  cuts.resize(clusters - 1);
  std::sort(cuts.begin(), cuts.end());
  cuts.push_back(tokens);
  x.cluster_page_begin.push_back(0);
  int prev = 0;
  for (int32_t c : cuts) {
    const int n = c - prev;
    prev = c;
    x.cluster_size.push_back(n);
    x.cluster_page_begin.push_back(x.cluster_page_begin.back() +
                                   (n + page_tokens - 1) / page_tokens);
  }
  x.centroids.resize(x.cluster_size.size() * head_dim);
  x.positions.assign(static_cast<size_t>(x.num_pages()) * page_tokens, -1);
  int pos = 0;
  for (int c = 0; c < x.num_clusters(); ++c) {
    const size_t at = static_cast<size_t>(x.cluster_page_begin[c]) * page_tokens;
    for (int i = 0; i < x.cluster_size[c]; ++i) x.positions[at + i] = pos++;
  }
  return x;
}

// The upper median (element size / 2 after sorting); 0 for an empty vector. Same unit as v.
template <typename T>
double Median(std::vector<T> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median GB/s (1e9 bytes per second) of `iters` calls of `enqueue`, each moving `bytes`, timed
// with CUDA events on `stream` (a cudaStream_t) by gpu::TimeOnStream after `warmup` untimed calls.
inline double MedianGBs(void* stream, int warmup, int iters, double bytes,
                        const std::function<Status()>& enqueue) {
  std::vector<float> ms;
  CHECK_OK(gpu::TimeOnStream(stream, warmup, iters, enqueue, &ms));
  std::vector<double> gbs;
  for (float t : ms) gbs.push_back(bytes / (t * 1e6));
  return Median(gbs);
}

// Median µs of `call(i % variants)` enqueued back to back on `stream` (a cudaStream_t) after
// `warmup` untimed calls, then of graph replays of each variant's capture (-1 when a capture
// fails), by gpu::TimeOnStream.
inline void TimeWithGraphs(void* stream, int warmup, int reps, int variants,
                           const std::function<Status(int)>& call, double* us,
                           double* graph_us) {
  int next = 0;
  std::vector<float> ms;
  CHECK_OK(gpu::TimeOnStream(
      stream, warmup, reps, [&] { return call(next++ % variants); }, &ms));
  *us = Median(ms) * 1e3;
  std::vector<std::unique_ptr<gpu::CapturedGraph>> graphs(variants);
  for (int v = 0; v < variants; ++v) {
    Status st = gpu::CapturedGraph::Capture(
        stream, [&] { return call(v); }, &graphs[v]);
    if (!st.ok()) {
      std::fprintf(stderr, "graph capture: %s\n", st.ToString().c_str());
      *graph_us = -1;
      return;
    }
  }
  // Every graph is replayed at least once before the timed replays (a first replay uploads it).
  next = 0;
  CHECK_OK(gpu::TimeOnStream(
      stream, std::max(warmup, variants), reps,
      [&] { return graphs[next++ % variants]->Replay(stream); }, &ms));
  *graph_us = Median(ms) * 1e3;
}

}  // namespace sqkv::bench
