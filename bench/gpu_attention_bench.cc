// Times the GPU sparse paged attention (gpu/paged_attention.h) on synthetic pools shaped like a
// Squeezed-Attention store: bf16, head_dim 128, 32 query heads over 8 kv heads (group 4),
// page_tokens 16, keys stored in clusters of 12..28 tokens (each cluster on its own pages, its last
// page partial), a fraction of the clusters selected per kv head.
//
// Modes: decode batch 1 (8 segments of 4 rows), decode batch 8 (64 segments of 4 rows), prefill of
// 1,024 queries (8 segments of 4,096 rows). Eight contexts have their own pools; consecutive
// launches rotate through them so a launch reads HBM, not what the previous one left in L2.
// Prints a table; with --json PATH also writes one JSON object per line.
//
// Usage: gpu_attention_bench [--json PATH] [--quick] [--only MODE:TOKENS:KEEP[,...]] [--iters N]
//                            [--bound-slack F] [--mma-sync]
//   --only runs the configurations listed (e.g. decode_b1:131072:0.1), for a profiler.
//   --bound-slack F plans the grid for F times the largest page count (default 1): the engine's
//   host bound is the lookup's page capacity, about 1.3 times the pages it selects.
//   --mma-sync: prefill on the mma.sync kernel even where the device has wgmma.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#if defined(SQKV_HAVE_CUDA)
#include <cuda_runtime.h>

#include "bench/bench_cuda.h"
#include "bench/bench_util.h"
#include "common/dtype.h"
#include "compute/attention.h"
#include "gpu/device.h"
#include "gpu/device_buffer.h"
#include "gpu/paged_attention.h"
#include "index/head_index.h"

namespace sqkv::gpu {
namespace {

using namespace sqkv::bench::shape;
constexpr int kMinCluster = 12, kMaxCluster = 28;
constexpr DType kDType = DType::kBF16;
constexpr size_t kPageBytes = PageBytes(kPageTokens, kHeadDim, kDType);

using ::sqkv::bench::Check;

// --mma-sync: prefill on the mma.sync kernel even where the device has wgmma.
bool g_mma_sync = false;

// Clusters of one (context, kv head): sizes and first pool page of each.
struct HeadLayout {
  std::vector<int> size;
  std::vector<int> first_page;
};

struct PoolLayout {
  int tokens = 0;
  int64_t pages = 0;
  std::vector<HeadLayout> heads;  // (kContexts * kKvHeads), context-major
};

PoolLayout MakeLayout(int tokens, std::mt19937_64& rng) {
  PoolLayout pl;
  pl.tokens = tokens;
  std::uniform_int_distribution<int> size(kMinCluster, kMaxCluster);
  for (int h = 0; h < kContexts * kKvHeads; ++h) {
    HeadLayout hl;
    for (int left = tokens; left > 0;) {
      const int n = std::min(left, size(rng));
      hl.size.push_back(n);
      hl.first_page.push_back(static_cast<int>(pl.pages));
      pl.pages += (n + kPageTokens - 1) / kPageTokens;
      left -= n;
    }
    pl.heads.push_back(std::move(hl));
  }
  return pl;
}

// The page list of the clusters kept for one head: a random `keep` share of its tokens, in
// storage order (scattered over the head's pages).
struct PageList {
  std::vector<int32_t> ids, valid;
  int64_t keys = 0;
};

PageList Select(const HeadLayout& hl, int tokens, double keep, std::mt19937_64& rng) {
  std::vector<int> order(hl.size.size());
  std::iota(order.begin(), order.end(), 0);
  if (keep < 1.0) {
    std::shuffle(order.begin(), order.end(), rng);
    int64_t sum = 0;
    size_t n = 0;
    while (n < order.size() && sum < keep * tokens) sum += hl.size[order[n++]];
    order.resize(n);
    std::sort(order.begin(), order.end());
  }
  PageList pl;
  for (int c : order) {
    for (int t = 0; t < hl.size[c]; t += kPageTokens) {
      pl.ids.push_back(hl.first_page[c] + t / kPageTokens);
      pl.valid.push_back(std::min(kPageTokens, hl.size[c] - t));
    }
    pl.keys += hl.size[c];
  }
  return pl;
}

enum class Mode { kDecode1, kDecode8, kPrefill };
const char* ModeName(Mode m) {
  switch (m) {
    case Mode::kDecode1:
      return "decode_b1";
    case Mode::kDecode8:
      return "decode_b8";
    case Mode::kPrefill:
      return "prefill_1024";
  }
  return "?";
}

// One launch's inputs (one rotation).
struct Launch {
  DeviceBuffer seg_q_row, seg_rows, seg_off, seg_count, ids, valid, q;
  PagedAttentionArgs args;
  int64_t keys = 0, pages = 0, rows = 0, flop_keys = 0;  // flop_keys: Σ rows · keys
  std::vector<PageList> lists;                           // per segment (for the check)
};

void BuildLaunch(Mode mode, int rotation, const PoolLayout& pl, double keep, double bound_slack,
                 const void* pool, std::mt19937_64& rng, Launch* l) {
  const int requests = mode == Mode::kDecode8 ? 8 : 1;
  const int n = mode == Mode::kPrefill ? 1024 : 1;  // queries per request
  const int rows = kGroup * n;
  std::vector<int32_t> q_row, seg_rows, off, count, ids, valid;
  for (int b = 0; b < requests; ++b) {
    const int ctx = (rotation + b) % kContexts;
    for (int h = 0; h < kKvHeads; ++h) {
      PageList list = Select(pl.heads[ctx * kKvHeads + h], pl.tokens, keep, rng);
      q_row.push_back((b * kKvHeads + h) * rows);  // q: (requests, q_heads, n, d)
      seg_rows.push_back(rows);
      off.push_back(static_cast<int32_t>(ids.size()));
      count.push_back(static_cast<int32_t>(list.ids.size()));
      ids.insert(ids.end(), list.ids.begin(), list.ids.end());
      valid.insert(valid.end(), list.valid.begin(), list.valid.end());
      l->keys += list.keys;
      l->pages += static_cast<int64_t>(list.ids.size());
      l->flop_keys += static_cast<int64_t>(rows) * list.keys;
      l->lists.push_back(std::move(list));
    }
  }
  l->rows = static_cast<int64_t>(requests) * kKvHeads * rows;
  std::vector<float> q(static_cast<size_t>(l->rows) * kHeadDim);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (auto& x : q) x = normal(rng);
  Check(Upload(q_row, &l->seg_q_row), "upload");
  Check(Upload(seg_rows, &l->seg_rows), "upload");
  Check(Upload(off, &l->seg_off), "upload");
  Check(Upload(count, &l->seg_count), "upload");
  Check(Upload(ids, &l->ids), "upload");
  Check(Upload(valid, &l->valid), "upload");
  Check(Upload(q, &l->q), "upload");
  PagedAttentionArgs& a = l->args;
  a.dtype = kDType;
  a.head_dim = kHeadDim;
  a.page_tokens = kPageTokens;
  a.scale = 1.f / std::sqrt(static_cast<float>(kHeadDim));
  a.wgmma = !g_mma_sync;
  a.pool = pool;
  a.num_segments = static_cast<int>(count.size());
  a.seg_q_row = l->seg_q_row.as<int32_t>();
  a.seg_rows = l->seg_rows.as<int32_t>();
  a.seg_page_offset = l->seg_off.as<int32_t>();
  a.seg_page_count = l->seg_count.as<int32_t>();
  a.page_ids = l->ids.as<int32_t>();
  a.page_valid = l->valid.as<int32_t>();
  a.max_pages_per_segment =
      static_cast<int>(std::ceil(bound_slack * *std::max_element(count.begin(), count.end())));
  a.max_rows_per_segment = rows;
  a.q = l->q.as<float>();
}

struct Timing {
  double median_us = 0, p10_us = 0, p90_us = 0, graph_us = 0;
};

Timing TimeLaunches(std::vector<Launch>& launches, int iters, cudaStream_t stream, void* head_start,
                    size_t head_start_bytes) {
  const int rot = static_cast<int>(launches.size());
  for (int i = 0; i < 2 * rot; ++i)
    Check(LaunchPagedAttention(launches[i % rot].args, stream), "warm-up");
  CUDA_OK(cudaStreamSynchronize(stream));

  // Per-launch events; a large memset first lets the host queue the launches ahead of the GPU.
  std::vector<cudaEvent_t> start(iters), stop(iters);
  for (int i = 0; i < iters; ++i) {
    CUDA_OK(cudaEventCreate(&start[i]));
    CUDA_OK(cudaEventCreate(&stop[i]));
  }
  CUDA_OK(cudaMemsetAsync(head_start, 0, head_start_bytes, stream));
  for (int i = 0; i < iters; ++i) {
    CUDA_OK(cudaEventRecord(start[i], stream));
    Check(LaunchPagedAttention(launches[i % rot].args, stream), "launch");
    CUDA_OK(cudaEventRecord(stop[i], stream));
  }
  CUDA_OK(cudaStreamSynchronize(stream));
  std::vector<double> us(iters);
  for (int i = 0; i < iters; ++i) {
    float ms = 0;
    CUDA_OK(cudaEventElapsedTime(&ms, start[i], stop[i]));
    us[i] = 1e3 * ms;
    CUDA_OK(cudaEventDestroy(start[i]));
    CUDA_OK(cudaEventDestroy(stop[i]));
  }
  std::sort(us.begin(), us.end());
  Timing t;
  t.median_us = us[iters / 2];
  t.p10_us = us[iters / 10];
  t.p90_us = us[iters * 9 / 10];

  // One graph of `rot` launches (also proves the launch is capturable), replayed.
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < rot; ++i) Check(LaunchPagedAttention(launches[i].args, stream), "capture");
  CUDA_OK(cudaStreamEndCapture(stream, &graph));
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  CUDA_OK(cudaGraphLaunch(exec, stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  const int replays = std::max(2, iters / rot);
  cudaEvent_t g0, g1;
  CUDA_OK(cudaEventCreate(&g0));
  CUDA_OK(cudaEventCreate(&g1));
  CUDA_OK(cudaEventRecord(g0, stream));
  for (int i = 0; i < replays; ++i) CUDA_OK(cudaGraphLaunch(exec, stream));
  CUDA_OK(cudaEventRecord(g1, stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  float ms = 0;
  CUDA_OK(cudaEventElapsedTime(&ms, g0, g1));
  t.graph_us = 1e3 * ms / (replays * rot);
  CUDA_OK(cudaEventDestroy(g0));
  CUDA_OK(cudaEventDestroy(g1));
  CUDA_OK(cudaGraphExecDestroy(exec));
  CUDA_OK(cudaGraphDestroy(graph));
  return t;
}

// ‖gpu − cpu‖/‖cpu‖ over the first `rows` rows of segment 0 of a launch, CPU = AttendPages.
double CheckAgainstCpu(const Launch& l, const void* pool, const float* d_out, int rows) {
  const PageList& list = l.lists[0];
  std::vector<uint8_t> pages(list.ids.size() * kPageBytes);
  std::vector<PageRef> refs(list.ids.size());
  for (size_t i = 0; i < list.ids.size(); ++i) {
    CUDA_OK(cudaMemcpy(pages.data() + i * kPageBytes,
                       static_cast<const uint8_t*>(pool) + list.ids[i] * kPageBytes, kPageBytes,
                       cudaMemcpyDeviceToHost));
    refs[i] = PageRef{pages.data() + i * kPageBytes, list.valid[i]};
  }
  std::vector<float> q(static_cast<size_t>(rows) * kHeadDim), got(q.size()), ref(q.size());
  std::vector<float> lse(rows);
  CUDA_OK(cudaMemcpy(q.data(), l.args.q, q.size() * 4, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(got.data(), d_out, got.size() * 4, cudaMemcpyDeviceToHost));
  AttendPages(q.data(), rows, kHeadDim, l.args.scale, kDType, kPageTokens, refs.data(),
              static_cast<int>(refs.size()), ref.data(), lse.data());
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isnan(got[i])) return INFINITY;
    num += (got[i] - ref[i]) * static_cast<double>(got[i] - ref[i]);
    den += static_cast<double>(ref[i]) * ref[i];
  }
  return std::sqrt(num / den);
}

// Device-to-device copy bandwidth (bytes read + written), the memory ceiling of this card.
double CopyBandwidthGBs(cudaStream_t stream) {
  const size_t bytes = size_t{2} << 30;
  DeviceBuffer a, b;
  Check(a.Allocate(bytes), "alloc");
  Check(b.Allocate(bytes), "alloc");
  Check(a.Fill(1), "fill");
  // One untimed copy, the median of 5 timed.
  return bench::MedianGBs(stream, 1, 5, 2.0 * bytes, [&] {
    CUDA_OK(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, stream));
    return Status::Ok();
  });
}

int Run(int argc, char** argv) {
  std::string json_path, only;
  bool quick = false;
  int iters_override = 0;
  double bound_slack = 1.0;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0 && i + 1 < argc) {
      json_path = argv[++i];
    } else if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else if (std::strcmp(argv[i], "--mma-sync") == 0) {
      g_mma_sync = true;
    } else if (std::strcmp(argv[i], "--only") == 0 && i + 1 < argc) {
      only = argv[++i];
    } else if (std::strcmp(argv[i], "--iters") == 0 && i + 1 < argc) {
      iters_override = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--bound-slack") == 0 && i + 1 < argc) {
      bound_slack = std::max(1.0, std::atof(argv[++i]));
    } else {
      std::fprintf(stderr,
                   "usage: %s [--json PATH] [--quick] [--only MODE:TOKENS:KEEP[,...]] [--iters N] "
                   "[--bound-slack F] [--mma-sync]\n",
                   argv[0]);
      return 2;
    }
  }
  // "decode_b1:131072:0.1,decode_b8:131072:0.1" → the configurations to run.
  auto wanted = [&](Mode mode, int tokens, double keep) {
    if (only.empty()) return true;
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%s:%d:%g", ModeName(mode), tokens, keep);
    return ("," + only + ",").find("," + std::string(buf) + ",") != std::string::npos;
  };
  if (!DevicePresent()) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  FILE* json = json_path.empty() ? nullptr : std::fopen(json_path.c_str(), "w");
  std::printf("device: %s\n", DeviceDescription().value().c_str());
  Stream stream_owner;
  Check(Stream::Create(&stream_owner), "stream");
  const auto stream = static_cast<cudaStream_t>(stream_owner.get());
  const double copy_gbs = CopyBandwidthGBs(stream);
  std::printf("device-to-device copy: %.0f GB/s (read + write)\n", copy_gbs);
  std::printf("host page bound: %.2f x the largest segment's page count\n", bound_slack);
  if (json) std::fprintf(json, "{\"impl\":\"copy\",\"gbps\":%.1f}\n", copy_gbs);

  DeviceBuffer head_start, out, lse, ws;
  const size_t head_start_bytes = size_t{4} << 30;
  Check(head_start.Allocate(head_start_bytes), "alloc");
  const size_t max_rows = 8 * kKvHeads * kGroup * 1024;
  Check(out.Allocate(max_rows * kHeadDim * 4), "alloc");
  Check(lse.Allocate(max_rows * 4), "alloc");

  std::mt19937_64 rng(20261128);
  std::printf("\n%7s %5s %-13s %5s %9s %8s %10s %10s %10s %8s %8s %9s\n", "tokens", "keep", "mode",
              "segs", "keys/seg", "MB_read", "median_us", "p90_us", "graph_us", "GB/s", "TFLOP/s",
              "check_rel");
  const std::vector<int> token_counts =
      quick ? std::vector<int>{32768} : std::vector<int>{32768, 131072};
  for (int tokens : token_counts) {
    if (!only.empty() && only.find(":" + std::to_string(tokens) + ":") == std::string::npos) {
      continue;
    }
    const PoolLayout layout = MakeLayout(tokens, rng);
    // The pool: random bf16 bytes, never zeros (a 64 MB random block copied around).
    DeviceBuffer pool;
    const size_t pool_bytes = static_cast<size_t>(layout.pages) * kPageBytes;
    Check(pool.Allocate(pool_bytes), "pool alloc");
    {
      const size_t block = size_t{64} << 20;
      std::vector<float> f(block / 2);
      std::uniform_real_distribution<float> u(-2.f, 2.f);
      for (auto& x : f) x = u(rng);
      std::vector<uint8_t> bytes(block);
      FromFloat(kDType, f.data(), bytes.data(), f.size());
      DeviceBuffer src;
      Check(Upload(bytes, &src), "upload");
      for (size_t off = 0, k = 0; off < pool_bytes; off += block / 2, ++k) {
        const size_t shift = (k * 4096 * 7) % (block / 2);
        const size_t n = std::min(block / 2, pool_bytes - off);
        CUDA_OK(cudaMemcpy(static_cast<uint8_t*>(pool.get()) + off,
                           static_cast<uint8_t*>(src.get()) + shift, n, cudaMemcpyDeviceToDevice));
      }
    }
    for (double keep : {0.1, 0.3, 1.0}) {
      for (Mode mode : {Mode::kDecode1, Mode::kDecode8, Mode::kPrefill}) {
        if (!wanted(mode, tokens, keep)) continue;
        std::vector<Launch> launches(kContexts);
        size_t ws_bytes = 0;
        for (int r = 0; r < kContexts; ++r) {
          BuildLaunch(mode, r, layout, keep, bound_slack, pool.get(), rng, &launches[r]);
          launches[r].args.out = out.as<float>();
          launches[r].args.lse = lse.as<float>();
          ws_bytes = std::max(ws_bytes, PagedAttentionWorkspaceBytes(launches[r].args));
        }
        if (ws.size() < ws_bytes) Check(ws.Allocate(ws_bytes), "workspace alloc");
        for (auto& l : launches) l.args.workspace = ws.get();

        double check = -1;  // AttendPages on segment 0 of rotation 0 (skipped where too slow)
        const int check_rows = mode == Mode::kPrefill ? 16 : kGroup;
        if (keep < 1.0 || mode != Mode::kPrefill) {
          Check(LaunchPagedAttention(launches[0].args, stream), "check launch");
          CUDA_OK(cudaStreamSynchronize(stream));
          check = CheckAgainstCpu(launches[0], pool.get(), out.as<float>(), check_rows);
        }
        const int iters = iters_override > 0 ? iters_override : mode == Mode::kPrefill ? 24 : 200;
        const Timing t = TimeLaunches(launches, iters, stream, head_start.get(), head_start_bytes);

        double keys = 0, pages = 0, rows = 0, flop_keys = 0;
        for (const auto& l : launches) {
          keys += l.keys;
          pages += l.pages;
          rows += l.rows;
          flop_keys += l.flop_keys;
        }
        keys /= kContexts;
        pages /= kContexts;
        rows /= kContexts;
        flop_keys /= kContexts;
        const int segs = launches[0].args.num_segments;
        // Bytes the launch must move: the valid K and V rows, the page lists, q in, out and lse
        // out.
        const double bytes = keys * kHeadDim * 2.0 * DTypeSize(kDType) + pages * 8.0 +
                             rows * kHeadDim * 4.0 * 2 + rows * 4.0;
        const double flops = 4.0 * flop_keys * kHeadDim;
        const double gbs = bytes / (t.median_us * 1e3);
        const double tflops = flops / (t.median_us * 1e6);
        std::printf("%7d %5.2f %-13s %5d %9.0f %8.1f %10.2f %10.2f %10.2f %8.0f %8.1f %9.2g\n",
                    tokens, keep, ModeName(mode), segs, keys / segs, bytes / 1e6, t.median_us,
                    t.p90_us, t.graph_us, gbs, tflops, check);
        std::fflush(stdout);
        if (json) {
          std::fprintf(json,
                       "{\"impl\":\"sqkv\",\"mode\":\"%s\",\"tokens\":%d,\"keep\":%.2f,"
                       "\"segments\":%d,\"keys_per_segment\":%.0f,\"bytes\":%.0f,\"flops\":%.0f,"
                       "\"median_us\":%.3f,\"p10_us\":%.3f,\"p90_us\":%.3f,\"graph_us\":%.3f,"
                       "\"gbps\":%.1f,\"tflops\":%.2f,\"check_rel\":%.3g}\n",
                       ModeName(mode), tokens, keep, segs, keys / segs, bytes, flops, t.median_us,
                       t.p10_us, t.p90_us, t.graph_us, gbs, tflops, check);
          std::fflush(json);
        }
      }
    }
  }
  if (json) std::fclose(json);
  return 0;
}

}  // namespace
}  // namespace sqkv::gpu

int main(int argc, char** argv) { return sqkv::gpu::Run(argc, argv); }

#else  // !SQKV_HAVE_CUDA

int main() {
  std::fprintf(stderr, "gpu_attention_bench: this build has no CUDA support\n");
  return 1;
}

#endif
