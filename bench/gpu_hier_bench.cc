// Hierarchical (two-level) against single-level lookup at equal keep (issue 6), on the device:
// 32K and 128K-token contexts, 8 kv heads, 32 q heads, head_dim 128, bf16 pages of 16 tokens,
// 5% level-2 centroids, level-1 parents 1% of the tokens.
//
// Per context size, 8 contexts of synthetic clustered keys (each head's keys are noisy copies of
// `--topics` directions, as api/synthetic.cc makes them; rounded to bf16 first, as an import
// reads them). Each context's keys are indexed twice with the GPU K-means hook: levels 2 and
// levels 1. The level-2 clustering of the two builds is the same call (same keys, k, seed), so
// the flat build takes its labels from the two-level one (a memo in front of the hook) instead of
// clustering again: the two indexes have the same leaves, stored in different orders. Both are
// loaded as layers of one Engine.
//
// Queries as api/synthetic.cc's user queries: per (context, kv head) one main topic, per q head
// a second one: q = 1.2·topic_main + 0.6·topic_second + 0.5·noise; prefill rows share the main
// topic and differ in noise.
//
// Cases: decode b1 (1 query x 32 heads; launches rotate over the 8 contexts), decode b8 (the 8
// contexts in one plan), prefill 1,024 (per context; rotating). Keep 0.1; flat, two-level with
// l1_keep_fraction auto (= min(1, 3 keep)) and 0.5. Per case:
//   lookup   the engine's lookup alone (gpu::LaunchLookup of the plan), CUDA events and graph
//   whole    Engine::Run (lookup + attention), CUDA events and graph; attn = whole − lookup
//   scored   centroids scored per (request, kv head), level 1 plus level 2 (ReadSelections)
//   kept     tokens selected per (request, kv head)
//   mass     per row exp(lse_sparse − lse_dense), dense = SelectOptions::kDense through the same
//            engine and layer; the mean and the minimum over every row of every plan
//   err      ‖out_sparse − out_dense‖ / ‖out_dense‖ over every row of every plan
// A table, then one JSON line per case.
//
// Usage: gpu_hier_bench [--iters N] [--keep F] [--topics T] [--sizes 32768,131072]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "common/dtype.h"
#include "gpu/device.h"
#include "gpu/device_buffer.h"
#include "gpu/engine.h"
#include "gpu/engine_plan.h"
#include "gpu/engine_timing.h"
#include "gpu/kmeans.h"
#include "gpu/lookup.h"
#include "index/build.h"

namespace {

using sqkv::DType;
using sqkv::HeadIndex;
using sqkv::HeadSelection;
using sqkv::SelectOptions;
using sqkv::Status;
namespace gpu = sqkv::gpu;
using namespace sqkv::bench::shape;

constexpr float kL1Fraction = 0.01f;
// api/synthetic.cc's shape of keys and queries.
constexpr float kKeyNoise = 0.35f;
constexpr float kQueryMain = 1.2f, kQuerySecond = 0.6f, kQueryNoise = 0.5f;

using sqkv::bench::Rng;

// The K-means hook with a memo of its level-2 call (rows == `keys`): a second build over the same
// keys reuses the labels instead of clustering again.
sqkv::KMeansFn MemoKMeans(const float* keys, std::shared_ptr<std::vector<int32_t>> memo,
                          std::shared_ptr<int> memo_k) {
  sqkv::KMeansFn inner = gpu::GpuKMeansFn();
  return [=](const float* x, int n, int d, int k, const sqkv::KMeansOptions& o,
             std::vector<int32_t>* assign) -> Status {
    if (x == keys && !memo->empty() && *memo_k == k && memo->size() == static_cast<size_t>(n)) {
      *assign = *memo;
      return Status::Ok();
    }
    SQKV_RETURN_IF_ERROR(inner(x, n, d, k, o, assign));
    if (x == keys) {
      *memo = *assign;
      *memo_k = k;
    }
    return Status::Ok();
  };
}

// Pages of one head in the index's layout: page p = K (page_tokens, d) then V; padding zero.
// keys, values: (tokens, d) bf16 bits.
void AppendPages(const HeadIndex& x, const std::vector<uint16_t>& keys,
                 const std::vector<uint16_t>& values, std::vector<uint16_t>* pages) {
  const size_t page_elems = 2 * kPageTokens * kHeadDim;
  const size_t base = pages->size();
  pages->resize(base + static_cast<size_t>(x.num_pages()) * page_elems, 0);
  for (size_t s = 0; s < x.positions.size(); ++s) {
    const int32_t p = x.positions[s];
    if (p < 0) continue;
    uint16_t* page = pages->data() + base + (s / kPageTokens) * page_elems;
    const size_t slot = (s % kPageTokens) * kHeadDim;
    std::memcpy(page + slot, &keys[static_cast<size_t>(p) * kHeadDim], kHeadDim * 2);
    std::memcpy(page + kPageTokens * kHeadDim + slot, &values[static_cast<size_t>(p) * kHeadDim],
                kHeadDim * 2);
  }
}

// One context: its two layers and its queries.
struct Context {
  uint64_t flat_key = 0, hier_key = 0;
  std::vector<float> q_decode;   // (q_heads, 1, d)
  std::vector<float> q_prefill;  // (q_heads, kPrefillQueries, d)
  int l2_clusters = 0, l1_clusters = 0;  // summed over heads
};

struct HeadOut {
  HeadIndex flat, hier;
  std::vector<uint16_t> keys, values;  // bf16 bits (tokens, d)
  double build_hier_s = 0, build_flat_s = 0;
};

// Generates, indexes and loads one context. Heads run on their own threads (each with its own
// K-means stream and workspace).
void MakeContext(gpu::Engine* engine, int tokens, int topics, uint64_t seed, uint64_t key_base,
                 Context* ctx, double* build_hier_s, double* build_flat_s) {
  std::vector<HeadOut> heads(kKvHeads);
  ctx->q_decode.assign(static_cast<size_t>(kQHeads) * kHeadDim, 0.f);
  ctx->q_prefill.assign(static_cast<size_t>(kQHeads) * kPrefillQueries * kHeadDim, 0.f);
  std::vector<std::thread> pool;
  for (int h = 0; h < kKvHeads; ++h) {
    pool.emplace_back([&, h] {
      Rng rng{seed * 1000003ull + static_cast<uint64_t>(h)};
      HeadOut& o = heads[h];
      const size_t d = kHeadDim;
      std::vector<float> dirs(static_cast<size_t>(topics) * d);
      for (float& v : dirs) v = rng.Normal();
      std::vector<float> keys(static_cast<size_t>(tokens) * d);
      o.keys.resize(keys.size());
      o.values.resize(keys.size());
      for (int t = 0; t < tokens; ++t) {
        const float* dir = &dirs[static_cast<size_t>(rng.Pick(topics)) * d];
        for (size_t i = 0; i < d; ++i) {
          const size_t at = static_cast<size_t>(t) * d + i;
          o.keys[at] = sqkv::FloatToBf16(dir[i] + kKeyNoise * rng.Normal());
          keys[at] = sqkv::Bf16ToFloat(o.keys[at]);  // index what the pages hold
          o.values[at] = sqkv::FloatToBf16(rng.Normal());
        }
      }
      // Queries: one main topic per (context, kv head), a second one per q head.
      const int main = rng.Pick(topics);
      for (int g = 0; g < kGroup; ++g) {
        const int second = rng.Pick(topics);
        const int qh = h * kGroup + g;
        auto fill = [&](float* row) {
          for (size_t i = 0; i < d; ++i) {
            row[i] = kQueryMain * dirs[main * d + i] + kQuerySecond * dirs[second * d + i] +
                     kQueryNoise * rng.Normal();
          }
        };
        fill(&ctx->q_decode[static_cast<size_t>(qh) * d]);
        for (int j = 0; j < kPrefillQueries; ++j) {
          fill(&ctx->q_prefill[(static_cast<size_t>(qh) * kPrefillQueries + j) * d]);
        }
      }
      auto memo = std::make_shared<std::vector<int32_t>>();
      auto memo_k = std::make_shared<int>(0);
      sqkv::IndexParams p;
      p.centroid_fraction = kCentroidFraction;
      p.page_tokens = kPageTokens;
      p.levels = 2;
      p.l1_fraction = kL1Fraction;
      p.kmeans = MemoKMeans(keys.data(), memo, memo_k);
      auto t0 = std::chrono::steady_clock::now();
      CHECK_OK(sqkv::BuildHeadIndex(keys.data(), tokens, kHeadDim, p, &o.hier));
      auto t1 = std::chrono::steady_clock::now();
      p.levels = 1;
      CHECK_OK(sqkv::BuildHeadIndex(keys.data(), tokens, kHeadDim, p, &o.flat));
      auto t2 = std::chrono::steady_clock::now();
      o.build_hier_s = std::chrono::duration<double>(t1 - t0).count();
      o.build_flat_s = std::chrono::duration<double>(t2 - t1).count();
    });
  }
  for (auto& t : pool) t.join();
  std::vector<HeadIndex> flat, hier;
  std::vector<uint16_t> flat_pages, hier_pages;
  for (HeadOut& o : heads) {
    AppendPages(o.flat, o.keys, o.values, &flat_pages);
    AppendPages(o.hier, o.keys, o.values, &hier_pages);
    ctx->l2_clusters += o.hier.num_clusters();
    ctx->l1_clusters += o.hier.num_l1();
    *build_hier_s = std::max(*build_hier_s, o.build_hier_s);
    *build_flat_s = std::max(*build_flat_s, o.build_flat_s);
    flat.push_back(std::move(o.flat));
    hier.push_back(std::move(o.hier));
  }
  ctx->flat_key = key_base;
  ctx->hier_key = key_base + 1;
  CHECK_OK(engine->LoadLayer(ctx->flat_key, DType::kBF16, kPageTokens, flat, flat_pages.data()));
  CHECK_OK(engine->LoadLayer(ctx->hier_key, DType::kBF16, kPageTokens, hier, hier_pages.data()));
}

// TimeWithGraphs on `stream` with kWarmup untimed calls.
void Time(gpu::Stream& stream, int reps, int variants, const std::function<Status(int)>& call,
          double* us, double* graph_us) {
  sqkv::bench::TimeWithGraphs(stream.get(), kWarmup, reps, variants, call, us, graph_us);
}

struct Row {
  std::string size, mode, index;
  float l1_keep = 0;  // requested (0 = auto)
  double lookup_us = 0, lookup_graph_us = 0, whole_us = 0, whole_graph_us = 0;
  double scored = 0, kept = 0, pages = 0;  // per (request, kv head)
  double mass_mean = 0, mass_min = 1, rel_err = 0;
  int64_t rows = 0;
};

// One plan's device buffers.
struct PlanIO {
  std::unique_ptr<gpu::QueryPlan> plan;
  gpu::DeviceBuffer q, out, lse;
  gpu::DeviceIO io;
};

// q: the plan's host queries, (requests, q_heads, n, d): rows stacked in request order.
void MakePlan(gpu::Engine* engine, const std::vector<uint64_t>& layers, int n,
              const SelectOptions& sel, const std::vector<float>& q, PlanIO* p) {
  std::vector<gpu::DeviceQuery> dq;
  for (uint64_t key : layers) {
    gpu::DeviceQuery d;
    d.layer_key = key;
    d.q_heads = kQHeads;
    d.n = n;
    d.select = sel;
    dq.push_back(d);
  }
  CHECK_OK(engine->Plan(dq, &p->plan));
  for (int r = 0; r < p->plan->num_requests(); ++r) {
    if (p->plan->row_offset(r) != r * kQHeads * n) {
      std::fprintf(stderr, "request %d starts at row %d, not %d\n", r, p->plan->row_offset(r),
                   r * kQHeads * n);
      std::exit(1);
    }
  }
  const size_t rows = p->plan->total_rows();
  if (q.size() != rows * kHeadDim) {
    std::fprintf(stderr, "query rows %zu != plan rows %zu\n", q.size() / kHeadDim, rows);
    std::exit(1);
  }
  CHECK_OK(gpu::Upload(q, &p->q));
  CHECK_OK(p->out.Allocate(rows * kHeadDim * 4));
  CHECK_OK(p->lse.Allocate(rows * 4));
  p->io = gpu::DeviceIO{p->q.as<float>(), p->out.as<float>(), p->lse.as<float>()};
  static_cast<gpu::PlanImpl&>(*p->plan).lookup.q = p->q.as<float>();
}

// Runs `p` once and copies its outputs back. out: (rows, d); lse: (rows).
void RunOnce(gpu::Engine* engine, PlanIO& p, gpu::Stream& stream, std::vector<float>* out,
             std::vector<float>* lse, std::vector<std::vector<HeadSelection>>* sel) {
  const size_t rows = p.plan->total_rows();
  CHECK_OK(p.out.Fill(0xff));  // NaN: an unwritten row shows
  CHECK_OK(p.lse.Fill(0xff));
  CHECK_OK(gpu::Synchronize());  // the fills ran on the legacy stream
  CHECK_OK(engine->Run(*p.plan, p.io, stream.get()));
  CHECK_OK(stream.Sync());
  if (sel != nullptr) CHECK_OK(engine->ReadSelections(*p.plan, stream.get(), sel));
  out->resize(rows * kHeadDim);
  lse->resize(rows);
  CHECK_OK(p.out.CopyToHost(out->data(), out->size() * 4));
  CHECK_OK(p.lse.CopyToHost(lse->data(), lse->size() * 4));
}

// groups[g]: the contexts of plan g (launches rotate over the plans).
Row RunCase(gpu::Engine* engine, const std::string& size, const std::string& mode, bool hier,
            float l1_keep, const std::vector<std::vector<const Context*>>& groups, int n,
            float keep, int iters) {
  SelectOptions sel;
  sel.mode = SelectOptions::Mode::kKeepFraction;
  sel.keep_fraction = keep;
  sel.l1_keep_fraction = l1_keep;
  SelectOptions dense;
  dense.mode = SelectOptions::Mode::kDense;
  std::vector<PlanIO> plans(groups.size()), dense_plans(groups.size());
  for (size_t g = 0; g < groups.size(); ++g) {
    std::vector<uint64_t> layers;
    std::vector<float> q;
    for (const Context* c : groups[g]) {
      layers.push_back(hier ? c->hier_key : c->flat_key);
      const auto& src = n == 1 ? c->q_decode : c->q_prefill;
      q.insert(q.end(), src.begin(), src.end());
    }
    MakePlan(engine, layers, n, sel, q, &plans[g]);
    MakePlan(engine, layers, n, dense, q, &dense_plans[g]);
  }
  CHECK_OK(gpu::Synchronize());
  gpu::Stream stream;
  CHECK_OK(gpu::Stream::Create(&stream));
  const int reps = n > 1 ? std::max(10, iters / 5) : iters;
  const int variants = static_cast<int>(plans.size());
  auto impl = [&](int v) -> gpu::PlanImpl& {
    return static_cast<gpu::PlanImpl&>(*plans[v].plan);
  };
  Row row;
  row.size = size;
  row.mode = mode;
  row.index = hier ? "2-level" : "flat";
  row.l1_keep = l1_keep;
  Time(
      stream, reps, variants,
      [&](int v) { return gpu::LaunchLookup(impl(v).lookup, impl(v).layout, stream.get()); },
      &row.lookup_us, &row.lookup_graph_us);
  Time(
      stream, reps, variants,
      [&](int v) { return engine->Run(*plans[v].plan, plans[v].io, stream.get()); },
      &row.whole_us, &row.whole_graph_us);

  // Selections and accuracy against dense, every plan.
  double err2 = 0, ref2 = 0, mass_sum = 0;
  int64_t heads = 0;
  std::vector<float> out, lse, dout, dlse;
  for (size_t g = 0; g < plans.size(); ++g) {
    std::vector<std::vector<HeadSelection>> s;
    RunOnce(engine, plans[g], stream, &out, &lse, &s);
    RunOnce(engine, dense_plans[g], stream, &dout, &dlse, nullptr);
    for (const auto& r : s) {
      for (const HeadSelection& h : r) {
        row.scored += h.centroids_scored;
        row.kept += h.tokens;
        row.pages += h.pages;
        ++heads;
      }
    }
    for (size_t i = 0; i < lse.size(); ++i) {
      const double m = std::exp(static_cast<double>(lse[i]) - dlse[i]);  // 0 when lse = -inf
      mass_sum += m;
      row.mass_min = std::min(row.mass_min, m);
      ++row.rows;
    }
    for (size_t i = 0; i < out.size(); ++i) {
      const double e = static_cast<double>(out[i]) - dout[i];
      err2 += e * e;
      ref2 += static_cast<double>(dout[i]) * dout[i];
    }
  }
  row.scored /= heads;
  row.kept /= heads;
  row.pages /= heads;
  row.mass_mean = mass_sum / row.rows;
  row.rel_err = std::sqrt(err2 / ref2);
  std::fprintf(stderr, "%s %s %s l1 %.2f: lookup %.1f us (graph %.1f), whole %.1f (graph %.1f)\n",
               size.c_str(), mode.c_str(), row.index.c_str(), l1_keep, row.lookup_us,
               row.lookup_graph_us, row.whole_us, row.whole_graph_us);
  return row;
}

std::string L1Name(const Row& r, float keep) {
  if (r.index == "flat") return "-";
  char b[32];
  if (r.l1_keep == 0.f) {
    std::snprintf(b, sizeof b, "auto %.2f", std::min(1.f, 3.f * keep));
  } else {
    std::snprintf(b, sizeof b, "%.2f", r.l1_keep);
  }
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 200, topics = 24;
  float keep = 0.1f;
  std::vector<int> sizes = {32768, 131072};
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--iters") == 0) iters = std::atoi(argv[i + 1]);
    if (std::strcmp(argv[i], "--keep") == 0) keep = static_cast<float>(std::atof(argv[i + 1]));
    if (std::strcmp(argv[i], "--topics") == 0) topics = std::atoi(argv[i + 1]);
    if (std::strcmp(argv[i], "--sizes") == 0) {
      sizes.clear();
      for (const char* s = argv[i + 1]; *s != '\0';) {
        sizes.push_back(std::atoi(s));
        s = std::strchr(s, ',');
        if (s == nullptr) break;
        ++s;
      }
    }
  }
  if (iters < 1 || topics < 1 || !(keep > 0.f && keep <= 1.f) || sizes.empty()) {
    std::fprintf(stderr, "bad arguments\n");
    return 2;
  }
  if (!gpu::DevicePresent()) {
    std::printf("no CUDA device: nothing to measure\n");
    return 0;
  }
  auto desc = gpu::DeviceDescription();
  std::printf("device: %s\n", desc.ok() ? desc->c_str() : "?");
  std::unique_ptr<gpu::Engine> engine;
  CHECK_OK(gpu::Engine::Create(gpu::EngineOptions(), &engine));
  std::vector<Row> rows;
  uint64_t next_key = 1;
  for (int tokens : sizes) {
    const std::string size = tokens % 1024 == 0 ? std::to_string(tokens / 1024) + "K"
                                                : std::to_string(tokens);
    std::vector<Context> ctx(kContexts);
    double hier_s = 0, flat_s = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (int c = 0; c < kContexts; ++c) {
      double h = 0, f = 0;
      MakeContext(engine.get(), tokens, topics, 0x5eed + 97 * c + tokens, next_key, &ctx[c], &h,
                  &f);
      next_key += 2;
      hier_s += h;
      flat_s += f;
    }
    const double setup_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%s: %d contexts set up in %.1f s (per context, slowest head: two-level build "
                "%.2f s, flat build %.2f s with the level-2 labels reused); level-2 clusters "
                "%.0f, level-1 %.0f per head\n",
                size.c_str(), kContexts, setup_s, hier_s / kContexts, flat_s / kContexts,
                ctx[0].l2_clusters / double(kKvHeads), ctx[0].l1_clusters / double(kKvHeads));
    std::fflush(stdout);
    std::vector<std::vector<const Context*>> singles, batch(1);
    for (const Context& c : ctx) {
      singles.push_back({&c});
      batch[0].push_back(&c);
    }
    struct Mode {
      const char* name;
      const std::vector<std::vector<const Context*>>* groups;
      int n;
    };
    const Mode modes[] = {{"decode b1", &singles, 1},
                          {"decode b8", &batch, 1},
                          {"prefill 1024", &singles, kPrefillQueries}};
    for (const Mode& m : modes) {
      rows.push_back(RunCase(engine.get(), size, m.name, false, 0.f, *m.groups, m.n, keep, iters));
      rows.push_back(RunCase(engine.get(), size, m.name, true, 0.f, *m.groups, m.n, keep, iters));
      rows.push_back(RunCase(engine.get(), size, m.name, true, 0.5f, *m.groups, m.n, keep, iters));
    }
    for (const Context& c : ctx) {
      engine->EvictLayer(c.flat_key);
      engine->EvictLayer(c.hier_key);
    }
  }
  std::printf("\nkeep_fraction %.3f, %d topics, 8 kv heads, 32 q heads, d 128, bf16, 16-token "
              "pages, 5%% level-2 / 1%% level-1 centroids\n",
              keep, topics);
  std::printf("µs: median, CUDA events (ev) and graph replay (g); attn = whole g − lookup g; "
              "scored / kept: per (request, kv head); mass = mean (min) over rows of "
              "exp(lse − lse_dense); err = ‖out − dense‖ / ‖dense‖\n");
  std::printf("%-5s %-12s %-7s %-9s %8s %8s %8s %8s %8s %8s %7s %17s %8s\n", "size", "case",
              "index", "l1_keep", "look_ev", "look_g", "whole_ev", "whole_g", "attn_g", "scored",
              "kept", "mass (min)", "err");
  for (const Row& r : rows) {
    std::printf("%-5s %-12s %-7s %-9s %8.1f %8.1f %8.1f %8.1f %8.1f %8.0f %7.0f %8.5f (%.4f) %8.2e\n",
                r.size.c_str(), r.mode.c_str(), r.index.c_str(), L1Name(r, keep).c_str(),
                r.lookup_us, r.lookup_graph_us, r.whole_us, r.whole_graph_us,
                r.whole_graph_us - r.lookup_graph_us, r.scored, r.kept, r.mass_mean, r.mass_min,
                r.rel_err);
  }
  std::printf("\n");
  for (const Row& r : rows) {
    std::printf(
        "{\"bench\":\"gpu_hier\",\"size\":\"%s\",\"case\":\"%s\",\"index\":\"%s\",\"keep\":%.3f,"
        "\"l1_keep\":%.3f,\"lookup_us\":%.2f,\"lookup_graph_us\":%.2f,\"whole_us\":%.2f,"
        "\"whole_graph_us\":%.2f,\"centroids_scored\":%.1f,\"tokens_kept\":%.1f,\"pages\":%.1f,"
        "\"mass_mean\":%.6f,\"mass_min\":%.6f,\"rel_err\":%.4e,\"rows\":%lld,\"topics\":%d}\n",
        r.size.c_str(), r.mode.c_str(), r.index.c_str(), keep,
        r.index == "flat" ? 0.0 : (r.l1_keep == 0.f ? std::min(1.f, 3.f * keep) : r.l1_keep),
        r.lookup_us, r.lookup_graph_us, r.whole_us, r.whole_graph_us, r.scored, r.kept, r.pages,
        r.mass_mean, r.mass_min, r.rel_err, static_cast<long long>(r.rows), topics);
  }
  return 0;
}
