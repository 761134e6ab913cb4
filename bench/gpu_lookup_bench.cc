// Device lookup and the whole engine path (lookup + paged attention), timed with CUDA events on
// device buffers (no host copies): 32K and 128K-token contexts, 5% centroids, 8 kv heads,
// head_dim 128 (or 64), bf16 pages of 16 tokens; decode batch 1 (1 query x 32 heads, one context)
// and batch 8 (8 distinct contexts), prefill (1,024 queries x 32 heads, one context). Eight
// contexts are resident; batch-1 and prefill launches rotate over them, so centroids come from
// HBM, not L2.
//
// Per case: the engine's lookup (16-bit centroids) in full, its scoring alone (score_only: the
// selection is the difference), the same lookup over float32 copies of the centroids, each also
// as a replayed CUDA graph; then Engine::Run (lookup + attention) and its graph. "global": the
// engine's lookup with staged_select = false (the last scoring block selects from global memory:
// the design before the staged selection), for before/after in one run. Prefill cases also time
// the steps of the 16-bit large path (LookupArgs::large_steps): the q conversion, the
// row-statistics pass (p1) and the column pass (p2), each as the difference of score_only runs.
//
// Usage: gpu_lookup_bench [--iters N] [--keep F] [--tokens N] [--head-dim D] [--cases C]
//                         [--whole-only] [--mma-sync]
//   --tokens N: one context size only (32768 or 131072; default both)
//   --cases C: all (default), decode, prefill, b1 or b8 (decode batch 1 / batch 8 only)
//   --head-dim D: 64 or 128 (default 128)
//   --whole-only: time the lookup and the whole path only (score, global, step and f32 columns 0)
//   --mma-sync: the prefill passes on mma.sync even where the device has wgmma (LookupArgs::wgmma)
//   --trace N: N graph replays of each whole path (decode and prefill) with the kernels' global-timer stamps
//     and phase marks (a build with -DSQKV_KERNEL_TRACE=ON), printed as medians relative to the
//     first kernel's start, beside the event time of the same replays and of an empty kernel's
//     graph
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "gpu/device.h"
#include "gpu/device_buffer.h"
#include "gpu/engine.h"
#include "gpu/engine_plan.h"
#include "gpu/engine_timing.h"
#include "gpu/kernel_trace.h"
#include "gpu/lookup.h"

namespace {

// --head-dim (64 or 128; default: the shared shape's kHeadDim).
int g_head_dim = sqkv::bench::shape::kHeadDim;

using sqkv::DType;

// --mma-sync: the prefill passes on mma.sync where the device has wgmma (LookupArgs::wgmma).
bool g_mma_sync = false;
// --trace N: replays of the whole path with kernel stamps (0: none).
int g_trace = 0;
using sqkv::HeadIndex;
using sqkv::Status;
using sqkv::bench::Median;
using sqkv::bench::Rng;
namespace gpu = sqkv::gpu;
using namespace sqkv::bench::shape;

// One resident context: its engine key and float32 device copies of its centroids.
struct Context {
  uint64_t key = 0;
  std::vector<gpu::DeviceBuffer> centroids32;  // (kv heads) of (clusters, head_dim)
};

// A lookup of a plan's segments over float32 centroids, with its own workspace and outputs.
struct F32Lookup {
  std::vector<gpu::LookupSegment> segments;
  gpu::LookupLayout layout;
  gpu::LookupArgs args;
  gpu::DeviceBuffer dsegs, ws, outputs;
};

void MakeF32Lookup(const gpu::PlanImpl& plan, const std::vector<const Context*>& ctx,
                   F32Lookup* f) {
  f->segments = plan.segments;
  for (size_t i = 0; i < f->segments.size(); ++i) {
    gpu::LookupSegment& s = f->segments[i];
    s.centroids = ctx[i / kKvHeads]->centroids32[i % kKvHeads].as<float>();
    s.centroids_f16 = nullptr;
    s.centroid_scale = 1.f;
  }
  CHECK_OK(gpu::PlanLookup(g_head_dim, &f->segments, &f->layout));
  const int n = static_cast<int>(f->segments.size());
  CHECK_OK(f->dsegs.Allocate(n * sizeof(gpu::LookupSegment)));
  CHECK_OK(f->dsegs.CopyFromHost(f->segments.data(), n * sizeof(gpu::LookupSegment)));
  CHECK_OK(f->ws.Allocate(gpu::LookupWorkspaceBytes(f->layout)));
  std::vector<uint8_t> tables;
  gpu::LookupWorkspaceTables(f->layout, &tables);
  CHECK_OK(f->ws.CopyFromHost(tables.data(), tables.size()));
  const size_t pc = std::max(1, f->layout.total_page_capacity);
  const size_t cc = std::max(1, f->layout.total_cluster_capacity);
  CHECK_OK(f->outputs.Allocate((4 * n + 2 * pc + cc) * sizeof(int32_t)));
  auto* o = f->outputs.as<int32_t>();
  f->args = plan.lookup;
  f->args.segments = f->dsegs.as<gpu::LookupSegment>();
  f->args.seg_page_count = o;
  f->args.seg_cluster_count = o + n;
  f->args.seg_tokens = o + 2 * n;
  f->args.seg_scored = o + 3 * n;
  f->args.page_ids = o + 4 * n;
  f->args.page_valid = o + 4 * n + pc;
  f->args.cluster_ids = o + 4 * n + 2 * pc;
  f->args.workspace = f->ws.get();
}

struct Row {
  std::string name;
  double lookup_us = 0, lookup_graph_us = 0, score_us = 0, score_graph_us = 0, f32_us = 0,
         f32_graph_us = 0, whole_us = 0, whole_graph_us = 0, global_us = 0, global_graph_us = 0,
         global_score_us = 0, global_score_graph_us = 0;
  // Prefill, graph replays of score_only stopped after the q conversion / after pass 1 (else -1).
  double conv_graph_us = -1, p1_graph_us = -1;
  double centroid_mb = 0, pages_mb = 0, gflop = 0;
};

// TimeWithGraphs on `stream` with kWarmup untimed calls.
void Time(gpu::Stream& stream, int reps, int variants, const std::function<Status(int)>& call,
          double* us, double* graph_us) {
  sqkv::bench::TimeWithGraphs(stream.get(), kWarmup, reps, variants, call, us, graph_us);
}

// --trace: g_trace replays of each variant's captured `call`, each with the kernel stamps reset
// before and read after, and CUDA events around it; an empty kernel's graph timed the same way.
void TraceWhole(gpu::Stream& stream, int variants, const std::function<Status(int)>& call,
                const std::string& name) {
  if (!gpu::KernelTraceCompiled()) {
    std::fprintf(stderr, "--trace: this build has no kernel stamps (-DSQKV_KERNEL_TRACE=ON)\n");
    return;
  }
  constexpr int K = gpu::kTraceKernels;
  gpu::DeviceBuffer buf;
  CHECK_OK(buf.Allocate(K * sizeof(gpu::TraceRecord)));
  auto* rec = static_cast<gpu::TraceRecord*>(buf.get());
  std::vector<std::unique_ptr<gpu::CapturedGraph>> graphs(variants);
  for (int v = 0; v < variants; ++v) {
    CHECK_OK(gpu::CapturedGraph::Capture(
        stream.get(), [&] { return call(v); }, &graphs[v]));
  }
  std::unique_ptr<gpu::CapturedGraph> empty;
  CHECK_OK(gpu::CapturedGraph::Capture(
      stream.get(),
      [&] {
        return gpu::KernelTraceEmptyLaunch(stream.get()) ? Status::Ok()
                                                         : Status::Internal("empty kernel");
      },
      &empty));
  std::vector<float> empty_ms;
  CHECK_OK(gpu::TimeOnStream(
      stream.get(), kWarmup, std::max(20, g_trace), [&] { return empty->Replay(stream.get()); },
      &empty_ms));
  gpu::TraceRecord reset[K];
  for (auto& r : reset) r = {~0ull, ~0ull, 0, 0};
  CHECK_OK(gpu::KernelTraceSetBuffer(rec) ? Status::Ok() : Status::Internal("trace buffer"));
  // Columns: per kernel first start, first / last past the wait, last end; then event time.
  std::vector<std::vector<double>> cols(4 * K + 1);
  for (int i = 0; i < g_trace; ++i) {
    CHECK_OK(buf.CopyFromHost(reset, sizeof(reset)));
    std::vector<float> ms;
    CHECK_OK(gpu::TimeOnStream(
        stream.get(), 0, 1, [&] { return graphs[i % variants]->Replay(stream.get()); }, &ms));
    gpu::TraceRecord got[K];
    CHECK_OK(buf.CopyToHost(got, sizeof(got)));
    uint64_t t0 = ~0ull;
    for (const auto& r : got) t0 = std::min(t0, r.first_start);
    auto rel = [&](uint64_t t, bool is_min) {
      if (is_min ? t == ~0ull : t == 0) return -1.0;
      return (static_cast<double>(t) - static_cast<double>(t0)) * 1e-3;
    };
    for (int k = 0; k < K; ++k) {
      cols[4 * k].push_back(rel(got[k].first_start, true));
      cols[4 * k + 1].push_back(rel(got[k].first_wait, true));
      cols[4 * k + 2].push_back(rel(got[k].last_wait, false));
      cols[4 * k + 3].push_back(rel(got[k].last_end, false));
    }
    cols[4 * K].push_back(ms[0] * 1e3);
  }
  CHECK_OK(gpu::KernelTraceSetBuffer(nullptr) ? Status::Ok() : Status::Internal("trace buffer"));
  std::printf(
      "trace %s (median us over %d graph replays, from the first kernel's start; "
      "-1 = not stamped): event time %.1f, empty-kernel graph %.1f\n",
      name.c_str(), g_trace, Median(cols[4 * K]), Median(empty_ms) * 1e3);
  std::printf("  %-14s %8s %10s %10s %8s\n", "kernel", "start", "wait-first", "wait-last", "end");
  for (int k = 0; k < K; ++k) {
    std::printf("  %-14s %8.2f %10.2f %10.2f %8.2f\n", gpu::kTraceKernelNames[k],
                Median(cols[4 * k]), Median(cols[4 * k + 1]), Median(cols[4 * k + 2]),
                Median(cols[4 * k + 3]));
  }
}

// groups: the requests of each plan (a plan per group; launches rotate over the groups).
Row RunCase(gpu::Engine* engine, const std::string& name,
            const std::vector<std::vector<const Context*>>& groups, int n, float keep, int iters,
            bool whole_only, Rng& rng) {
  std::vector<std::unique_ptr<gpu::QueryPlan>> plans;
  std::vector<F32Lookup> f32(groups.size());
  for (size_t g = 0; g < groups.size(); ++g) {
    std::vector<gpu::DeviceQuery> dq;
    for (const Context* c : groups[g]) {
      gpu::DeviceQuery q;
      q.layer_key = c->key;
      q.q_heads = kQHeads;
      q.n = n;
      q.select.keep_fraction = keep;
      dq.push_back(q);
    }
    plans.emplace_back();
    CHECK_OK(engine->Plan(dq, &plans.back()));
  }
  const size_t rows = plans[0]->total_rows();
  std::vector<float> hq(rows * g_head_dim);
  for (float& v : hq) v = 1.5f * rng.Normal();
  gpu::DeviceBuffer q, out, lse;
  CHECK_OK(gpu::Upload(hq, &q));
  CHECK_OK(out.Allocate(rows * g_head_dim * 4));
  CHECK_OK(lse.Allocate(rows * 4));
  gpu::Stream stream;
  CHECK_OK(gpu::Stream::Create(&stream));
  const gpu::DeviceIO io{q.as<float>(), out.as<float>(), lse.as<float>()};
  std::vector<gpu::LookupArgs> score_only(groups.size()), global(groups.size()),
      global_score(groups.size()), conv_only(groups.size()), pass1_only(groups.size());
  for (size_t g = 0; g < groups.size(); ++g) {
    auto& impl = static_cast<gpu::PlanImpl&>(*plans[g]);
    impl.lookup.q = q.as<float>();
    impl.lookup.wgmma = !g_mma_sync;
    score_only[g] = impl.lookup;
    score_only[g].score_only = true;
    global[g] = impl.lookup;
    global[g].staged_select = false;
    global_score[g] = score_only[g];
    global_score[g].staged_select = false;
    conv_only[g] = score_only[g];
    conv_only[g].large_steps = 1;
    pass1_only[g] = score_only[g];
    pass1_only[g].large_steps = 2;
    MakeF32Lookup(impl, groups[g], &f32[g]);
  }
  CHECK_OK(gpu::Synchronize());  // uploads ran on the legacy stream
  const int reps = n > 1 ? std::max(5, iters / 5) : iters;
  const int variants = static_cast<int>(groups.size());
  auto impl = [&](int v) -> gpu::PlanImpl& { return static_cast<gpu::PlanImpl&>(*plans[v]); };
  Row row;
  row.name = name;
  Time(
      stream, reps, variants,
      [&](int v) { return gpu::LaunchLookup(impl(v).lookup, impl(v).layout, stream.get()); },
      &row.lookup_us, &row.lookup_graph_us);
  if (!whole_only) {
    Time(
        stream, reps, variants,
        [&](int v) { return gpu::LaunchLookup(score_only[v], impl(v).layout, stream.get()); },
        &row.score_us, &row.score_graph_us);
    Time(
        stream, reps, variants,
        [&](int v) { return gpu::LaunchLookup(global[v], impl(v).layout, stream.get()); },
        &row.global_us, &row.global_graph_us);
    Time(
        stream, reps, variants,
        [&](int v) { return gpu::LaunchLookup(global_score[v], impl(v).layout, stream.get()); },
        &row.global_score_us, &row.global_score_graph_us);
    if (n > gpu::kLookupSmallRows) {
      double direct_us = 0;
      Time(
          stream, reps, variants,
          [&](int v) { return gpu::LaunchLookup(conv_only[v], impl(v).layout, stream.get()); },
          &direct_us, &row.conv_graph_us);
      Time(
          stream, reps, variants,
          [&](int v) { return gpu::LaunchLookup(pass1_only[v], impl(v).layout, stream.get()); },
          &direct_us, &row.p1_graph_us);
    }
    Time(
        stream, reps, variants,
        [&](int v) { return gpu::LaunchLookup(f32[v].args, f32[v].layout, stream.get()); },
        &row.f32_us, &row.f32_graph_us);
  }
  Time(
      stream, reps, variants, [&](int v) { return engine->Run(*plans[v], io, stream.get()); },
      &row.whole_us, &row.whole_graph_us);
  if (g_trace > 0) {
    TraceWhole(
        stream, variants, [&](int v) { return engine->Run(*plans[v], io, stream.get()); }, name);
  }

  // Bytes and work of one launch (the first group; all groups have the same shape).
  std::vector<std::vector<sqkv::HeadSelection>> sel;
  CHECK_OK(engine->Run(*plans[0], io, stream.get()));
  CHECK_OK(engine->ReadSelections(*plans[0], stream.get(), &sel));
  double pages = 0, centroids = 0, gflop = 0;
  for (size_t r = 0; r < sel.size(); ++r) {
    for (const auto& h : sel[r]) {
      pages += h.pages;
      centroids += h.centroids_scored;
      // Large path: two passes of 2 * rows * centroids * d.
      const double seg_rows = static_cast<double>(kQHeads / kKvHeads) * n;
      gflop += (seg_rows > gpu::kLookupSmallRows ? 4.0 : 2.0) * seg_rows * h.centroids_scored *
               g_head_dim * 1e-9;
    }
  }
  row.centroid_mb = centroids * g_head_dim * 2 / 1e6;  // 16-bit storage
  row.pages_mb = pages * sqkv::PageBytes(kPageTokens, g_head_dim, DType::kBF16) / 1e6;
  row.gflop = gflop;
  std::fprintf(
      stderr,
      "%s: lookup %.1f us (graph %.1f), scores %.1f (graph %.1f), f32 %.1f (graph %.1f), "
      "whole %.1f (graph %.1f), global %.1f (graph %.1f), global scores %.1f (graph %.1f)\n",
      name.c_str(), row.lookup_us, row.lookup_graph_us, row.score_us, row.score_graph_us,
      row.f32_us, row.f32_graph_us, row.whole_us, row.whole_graph_us, row.global_us,
      row.global_graph_us, row.global_score_us, row.global_score_graph_us);
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 200;
  float keep = 0.1f;
  std::string cases = "all";
  int only_tokens = 0;
  bool whole_only = false;
  for (int i = 1; i < argc; ++i) {
    const bool has_value = i + 1 < argc;
    if (std::strcmp(argv[i], "--whole-only") == 0) {
      whole_only = true;
    } else if (std::strcmp(argv[i], "--mma-sync") == 0) {
      g_mma_sync = true;
    } else if (has_value && std::strcmp(argv[i], "--trace") == 0) {
      g_trace = std::atoi(argv[++i]);
    } else if (has_value && std::strcmp(argv[i], "--iters") == 0) {
      iters = std::atoi(argv[++i]);
    } else if (has_value && std::strcmp(argv[i], "--keep") == 0) {
      keep = static_cast<float>(std::atof(argv[++i]));
    } else if (has_value && std::strcmp(argv[i], "--tokens") == 0) {
      only_tokens = std::atoi(argv[++i]);
    } else if (has_value && std::strcmp(argv[i], "--cases") == 0) {
      cases = argv[++i];
    } else if (has_value && std::strcmp(argv[i], "--head-dim") == 0) {
      g_head_dim = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr,
                   "usage: %s [--iters N] [--keep F] [--tokens N] [--head-dim 64|128] "
                   "[--cases all|decode|prefill|b1|b8] [--whole-only] [--mma-sync] "
                   "[--trace N]\n",
                   argv[0]);
      return 2;
    }
  }
  if (g_head_dim != 64 && g_head_dim != 128) {
    std::fprintf(stderr, "--head-dim: %d is not 64 or 128\n", g_head_dim);
    return 2;
  }
  const bool b1 = cases == "all" || cases == "decode" || cases == "b1";
  const bool b8 = cases == "all" || cases == "decode" || cases == "b8";
  const bool prefill = cases == "all" || cases == "prefill";
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
    if (only_tokens != 0 && tokens != only_tokens) continue;
    // Pages are shared content (generated once), resident once per context.
    std::vector<HeadIndex> heads;
    size_t total_pages = 0;
    for (int h = 0; h < kKvHeads; ++h) {
      heads.push_back(
          sqkv::bench::SyntheticHead(rng, tokens, g_head_dim, kPageTokens, kCentroidFraction));
      total_pages += heads.back().num_pages();
    }
    const size_t pb = sqkv::PageBytes(kPageTokens, g_head_dim, DType::kBF16);
    std::vector<uint16_t> pages(total_pages * pb / 2);
    for (size_t i = 0; i < pages.size(); ++i) {
      pages[i] = static_cast<uint16_t>(0x3c00 + (rng.Next() & 0x3ff)) ^ ((i & 1) << 15);
    }
    std::vector<Context> ctx(kContexts);
    for (Context& c : ctx) {
      // Each context gets its own centroids (its own index), the same page contents.
      for (HeadIndex& x : heads) {
        for (float& v : x.centroids) v = rng.Normal();
        c.centroids32.emplace_back();
        CHECK_OK(gpu::Upload(x.centroids, &c.centroids32.back()));
      }
      c.key = next_key++;
      CHECK_OK(engine->LoadLayer(c.key, DType::kBF16, kPageTokens, heads, pages.data()));
    }
    std::vector<std::vector<const Context*>> singles, batch(1);
    for (const Context& c : ctx) {
      singles.push_back({&c});
      batch[0].push_back(&c);
    }
    const std::string t = tokens == 32768 ? "32K" : "128K";
    if (b1) {
      rows.push_back(
          RunCase(engine.get(), t + " decode b1", singles, 1, keep, iters, whole_only, rng));
    }
    if (b8) {
      rows.push_back(
          RunCase(engine.get(), t + " decode b8", batch, 1, keep, iters, whole_only, rng));
    }
    if (prefill) {
      rows.push_back(RunCase(engine.get(), t + " prefill 1024", singles, kPrefillQueries, keep,
                             iters, whole_only, rng));
    }
    for (const Context& c : ctx) engine->EvictLayer(c.key);
  }
  std::printf("\nkeep_fraction %.3f, 8 kv heads, 32 q heads, d %d, bf16, 16-token pages\n", keep,
              g_head_dim);
  std::printf(
      "lookup: 16-bit centroids (the engine's); score: its scoring alone (score_only); "
      "f32: float32 centroids; glob/gsc: staged_select off (lookup, score); g: graph replay\n");
  std::printf("%-17s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %7s %8s %8s %7s\n", "case", "lookup",
              "g", "score", "g", "glob_g", "gsc_g", "f32", "g", "whole", "g", "cent_MB", "pages_MB",
              "lk_GB/s", "lk_TF/s");
  for (const Row& r : rows) {
    std::printf(
        "%-17s %8.1f %8.1f %8.1f %8.1f %8.1f %8.1f %8.1f %8.1f %8.1f %8.1f %7.1f %8.1f %8.0f "
        "%7.1f\n",
        r.name.c_str(), r.lookup_us, r.lookup_graph_us, r.score_us, r.score_graph_us,
        r.global_graph_us, r.global_score_graph_us, r.f32_us, r.f32_graph_us, r.whole_us,
        r.whole_graph_us, r.centroid_mb, r.pages_mb, r.centroid_mb / r.lookup_graph_us * 1e3,
        r.gflop / r.lookup_graph_us * 1e3);
  }
  std::printf(
      "\nprefill steps, 16-bit (graph replay, us): conv = q to binary16; p1 = row statistics;"
      " p2 = column pass; sel = lookup - score\n");
  std::printf("%-17s %8s %8s %8s %8s %8s\n", "case", "conv", "p1", "p2", "sel", "p1+p2 TF/s");
  for (const Row& r : rows) {
    if (r.p1_graph_us < 0) continue;
    const double p1 = r.p1_graph_us - r.conv_graph_us, p2 = r.score_graph_us - r.p1_graph_us;
    std::printf("%-17s %8.1f %8.1f %8.1f %8.1f %8.1f\n", r.name.c_str(), r.conv_graph_us, p1, p2,
                r.lookup_graph_us - r.score_graph_us, r.gflop / (p1 + p2) * 1e3);
  }
  return 0;
}
