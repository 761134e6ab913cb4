// Device lookup and the whole engine path (lookup + paged attention), timed with CUDA events on
// device buffers (no host copies): 32K and 128K-token contexts, 5% centroids, 8 kv heads,
// head_dim 128, bf16 pages of 16 tokens; decode (1 query x 32 heads, batch 8 distinct contexts)
// and prefill (1,024 queries x 32 heads, one context).
//
// Usage: gpu_lookup_bench [--iters N] [--keep F]
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "gpu/device.h"
#include "gpu/device_buffer.h"
#include "gpu/engine.h"
#include "gpu/engine_plan.h"
#include "gpu/engine_timing.h"
#include "gpu/lookup.h"

namespace {

using sqkv::DType;
using sqkv::HeadIndex;
using sqkv::Status;
namespace gpu = sqkv::gpu;

constexpr int kKvHeads = 8;
constexpr int kHeadDim = 128;
constexpr int kPageTokens = 16;
constexpr int kQHeads = 32;
constexpr double kCentroidFraction = 0.05;
constexpr int kDecodeBatch = 8;
constexpr int kPrefillQueries = 1024;

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
};

HeadIndex MakeHead(Rng& rng, int tokens) {
  HeadIndex x;
  x.head_dim = kHeadDim;
  x.page_tokens = kPageTokens;
  x.tokens = tokens;
  // Sizes: a uniform random composition of `tokens` into `clusters` parts (mean 20, >= 1).
  const int clusters = static_cast<int>(std::lround(kCentroidFraction * tokens));
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
                                   (n + kPageTokens - 1) / kPageTokens);
  }
  x.centroids.resize(x.cluster_size.size() * kHeadDim);
  for (float& v : x.centroids) v = rng.Normal();
  x.positions.assign(static_cast<size_t>(x.num_pages()) * kPageTokens, -1);
  int pos = 0;
  for (int c = 0; c < x.num_clusters(); ++c) {
    const size_t at = static_cast<size_t>(x.cluster_page_begin[c]) * kPageTokens;
    for (int i = 0; i < x.cluster_size[c]; ++i) x.positions[at + i] = pos++;
  }
  return x;
}

double Median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2] * 1e3;  // microseconds
}

#define CHECK_OK(expr)                                                               \
  do {                                                                               \
    Status _s = (expr);                                                              \
    if (!_s.ok()) {                                                                  \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, _s.ToString().c_str()); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

struct Row {
  std::string name;
  double lookup_us, lookup_alt_us, whole_us, graph_us;
  double centroid_mb, pages_mb, gflop;
};

Row RunCase(gpu::Engine* engine, const std::string& name, const std::vector<uint64_t>& layers,
            int n, float keep, int iters, Rng& rng) {
  std::vector<gpu::DeviceQuery> dq;
  for (uint64_t key : layers) {
    gpu::DeviceQuery q;
    q.layer_key = key;
    q.q_heads = kQHeads;
    q.n = n;
    q.select.keep_fraction = keep;
    dq.push_back(q);
  }
  std::unique_ptr<gpu::QueryPlan> plan;
  CHECK_OK(engine->Plan(dq, &plan));
  const size_t rows = plan->total_rows();
  std::vector<float> hq(rows * kHeadDim);
  for (float& v : hq) v = 1.5f * rng.Normal();
  gpu::DeviceBuffer q, out, lse;
  CHECK_OK(gpu::Upload(hq, &q));
  CHECK_OK(out.Allocate(rows * kHeadDim * 4));
  CHECK_OK(lse.Allocate(rows * 4));
  gpu::Stream stream;
  CHECK_OK(gpu::Stream::Create(&stream));
  const gpu::DeviceIO io{q.as<float>(), out.as<float>(), lse.as<float>()};
  CHECK_OK(gpu::Synchronize());  // the upload ran on the legacy stream
  auto& impl = static_cast<gpu::PlanImpl&>(*plan);
  impl.lookup.q = q.as<float>();
  const int warmup = 3;
  const int reps = n > 1 ? std::max(5, iters / 5) : iters;

  std::vector<float> ms;
  CHECK_OK(gpu::TimeOnStream(
      stream.get(), warmup, reps,
      [&] { return gpu::LaunchLookup(impl.lookup, impl.layout, stream.get()); }, &ms));
  Row row;
  row.name = name;
  row.lookup_us = Median(ms);
  // The other arithmetic of the tiled (prefill) passes.
  row.lookup_alt_us = 0;
  if (!impl.layout.large_list.empty()) {
    gpu::LookupArgs alt = impl.lookup;
    alt.split_tf32 = !alt.split_tf32;
    CHECK_OK(gpu::TimeOnStream(
        stream.get(), warmup, reps,
        [&] { return gpu::LaunchLookup(alt, impl.layout, stream.get()); }, &ms));
    row.lookup_alt_us = Median(ms);
  }
  CHECK_OK(gpu::TimeOnStream(
      stream.get(), warmup, reps, [&] { return engine->Run(*plan, io, stream.get()); }, &ms));
  row.whole_us = Median(ms);
  std::unique_ptr<gpu::CapturedGraph> graph;
  Status st = gpu::CapturedGraph::Capture(
      stream.get(), [&] { return engine->Run(*plan, io, stream.get()); }, &graph);
  if (st.ok()) {
    st = gpu::TimeOnStream(
        stream.get(), warmup, reps, [&] { return graph->Replay(stream.get()); }, &ms);
  }
  row.graph_us = st.ok() ? Median(ms) : -1;  // -1: the graph path failed (reported)
  if (!st.ok()) std::fprintf(stderr, "%s: graph: %s\n", name.c_str(), st.ToString().c_str());

  std::vector<std::vector<sqkv::HeadSelection>> sel;
  CHECK_OK(engine->ReadSelections(*plan, stream.get(), &sel));
  double pages = 0, centroids = 0, gflop = 0;
  for (size_t r = 0; r < sel.size(); ++r) {
    for (const auto& h : sel[r]) {
      pages += h.pages;
      centroids += h.centroids_scored;
      // Large path: two tiled passes of 2 * rows * centroids * d.
      const double seg_rows = static_cast<double>(kQHeads / kKvHeads) * n;
      gflop += (seg_rows > gpu::kLookupSmallRows ? 4.0 : 2.0) * seg_rows * h.centroids_scored *
               kHeadDim * 1e-9;
    }
  }
  row.centroid_mb = centroids * kHeadDim * 4 / 1e6;
  row.pages_mb = pages * sqkv::PageBytes(kPageTokens, kHeadDim, DType::kBF16) / 1e6;
  row.gflop = gflop;
  std::fprintf(stderr, "%s: lookup %.1f us (alt %.1f), whole %.1f us, graph %.1f us\n",
               name.c_str(), row.lookup_us, row.lookup_alt_us, row.whole_us, row.graph_us);
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 200;
  float keep = 0.1f;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--iters") == 0) iters = std::atoi(argv[i + 1]);
    if (std::strcmp(argv[i], "--keep") == 0) keep = static_cast<float>(std::atof(argv[i + 1]));
  }
  if (!gpu::DevicePresent()) {
    std::printf("no CUDA device: nothing to measure\n");
    return 0;
  }
  auto desc = gpu::DeviceDescription();
  std::printf("device: %s\n", desc.ok() ? desc->c_str() : "?");
  std::unique_ptr<gpu::Engine> engine;
  CHECK_OK(gpu::Engine::Create(gpu::EngineOptions(), &engine));
  Rng rng{0x5eed};
  std::vector<Row> rows;
  uint64_t next_key = 1;
  for (int tokens : {32768, 131072}) {
    // Pages are shared content (generated once), resident once per context.
    std::vector<HeadIndex> heads;
    size_t total_pages = 0;
    for (int h = 0; h < kKvHeads; ++h) {
      heads.push_back(MakeHead(rng, tokens));
      total_pages += heads.back().num_pages();
    }
    const size_t pb = sqkv::PageBytes(kPageTokens, kHeadDim, DType::kBF16);
    std::vector<uint16_t> pages(total_pages * pb / 2);
    for (size_t i = 0; i < pages.size(); ++i) {
      pages[i] = static_cast<uint16_t>(0x3c00 + (rng.Next() & 0x3ff)) ^ ((i & 1) << 15);
    }
    std::vector<uint64_t> keys;
    for (int c = 0; c < kDecodeBatch; ++c) {
      // Each context gets its own centroids (its own index), the same page contents.
      for (HeadIndex& x : heads) {
        for (float& v : x.centroids) v = rng.Normal();
      }
      CHECK_OK(engine->LoadLayer(next_key, DType::kBF16, kPageTokens, heads, pages.data()));
      keys.push_back(next_key++);
    }
    const std::string t = tokens == 32768 ? "32K" : "128K";
    rows.push_back(RunCase(engine.get(), t + " decode b8", keys, 1, keep, iters, rng));
    rows.push_back(
        RunCase(engine.get(), t + " prefill 1024", {keys[0]}, kPrefillQueries, keep, iters, rng));
    for (uint64_t k : keys) engine->EvictLayer(k);
  }
  std::printf("\nkeep_fraction %.3f, 8 kv heads, 32 q heads, d 128, bf16, 16-token pages\n", keep);
  std::printf("tiled passes: %s (alt_us: %s)\n",
              gpu::kLookupSplitTf32Default ? "split tf32" : "fp32 fma",
              gpu::kLookupSplitTf32Default ? "fp32 fma" : "split tf32");
  std::printf("%-18s %10s %10s %10s %10s %9s %9s %8s %8s\n", "case", "lookup_us", "alt_us",
              "whole_us", "graph_us", "cent_MB", "pages_MB", "lk_GB/s", "lk_TF/s");
  for (const Row& r : rows) {
    std::printf("%-18s %10.1f %10.1f %10.1f %10.1f %9.1f %9.1f %8.0f %8.1f\n", r.name.c_str(),
                r.lookup_us, r.lookup_alt_us, r.whole_us, r.graph_us, r.centroid_mb, r.pages_mb,
                r.centroid_mb / r.lookup_us * 1e3, r.gflop / r.lookup_us * 1e3);
  }
  return 0;
}
