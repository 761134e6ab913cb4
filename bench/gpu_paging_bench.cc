// The engine's device tier (issue 4): host->device page uploads against a plain pinned memcpy of
// the same bytes, and cold / partly warm / fully resident queries against the whole-layer load.
//
// Layers: `--layers` of one context, 8 kv heads, head_dim 128, bf16 pages of 16 tokens,
// `--tokens` keys per head (default 32K: 2,048 pages of 8 KiB per head, 128 MiB per layer), 5%
// centroids. The host tier is page-locked memory (what the Store's page cache hands out in GPU
// builds), pages either in layer order ("contiguous") or in a random order ("scattered", what a
// page cache looks like after a while).
//
//   upload   PreloadLayer of whole layers (one supplier call and one upload per kv head: 16 MiB
//            batches), each upload path x host layout; GB/s = bytes / device time of the upload.
//   memcpy   one cudaMemcpyAsync of 16 MiB and of 128 MiB from pinned memory (the ceiling).
//   query    decode (32 query heads, 1 row), keep --keep: cold (index only), partly warm (a new
//            q on a layer queried before), fully resident (QueryPaged and Query), and the
//            whole-layer baseline (LoadLayer of the layer from pinned memory, then Query).
//   churn    random decode queries over every layer through a pool of a quarter of their pages.
//
// Usage: gpu_paging_bench [--layers N] [--tokens T] [--keep F] [--iters N]
#include <cuda_runtime.h>

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
#include <vector>

#include "bench/bench_cuda.h"
#include "bench/bench_util.h"
#include "gpu/device.h"
#include "gpu/engine.h"

namespace {

using sqkv::DType;
using sqkv::HeadIndex;
using sqkv::Status;
using sqkv::bench::Median;
using sqkv::bench::Rng;
namespace gpu = sqkv::gpu;
using namespace sqkv::bench::shape;
constexpr size_t kPageBytes = sqkv::PageBytes(kPageTokens, kHeadDim, DType::kBF16);

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * v.size()))];
}
double Now() {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The host tier: every layer's pages in one page-locked allocation, in layer order or shuffled.
struct HostTier {
  std::vector<std::vector<HeadIndex>> heads;  // (layers, kv heads)
  std::vector<std::vector<size_t>> head_base;  // (layers, kv heads + 1) pages
  uint8_t* pinned = nullptr;
  size_t pages = 0;
  std::vector<uint32_t> slot;  // global page -> slot in `pinned` (identity or a permutation)
  std::vector<size_t> layer_base;

  const uint8_t* Page(int layer, int head, int32_t p) const {
    return pinned + static_cast<size_t>(slot[layer_base[layer] + head_base[layer][head] + p]) *
                        kPageBytes;
  }
  void Shuffle(Rng& rng, bool on) {
    for (size_t i = 0; i < pages; ++i) slot[i] = static_cast<uint32_t>(i);
    if (!on) return;
    for (size_t i = pages - 1; i > 0; --i) std::swap(slot[i], slot[rng.Next() % (i + 1)]);
  }
  gpu::PageSupplier Supplier(uint64_t key_base) const {
    return [this, key_base](uint64_t key, int head, const std::vector<int32_t>& ps,
                            std::vector<const void*>* out) -> Status {
      const int layer = static_cast<int>(key - key_base);
      out->resize(ps.size());
      for (size_t i = 0; i < ps.size(); ++i) (*out)[i] = Page(layer, head, ps[i]);
      return Status::Ok();
    };
  }
};

std::unique_ptr<gpu::Engine> MakeEngine(size_t pool, gpu::EngineOptions::Upload upload) {
  gpu::EngineOptions o;
  o.pool_bytes = pool;
  o.upload = upload;
  std::unique_ptr<gpu::Engine> e;
  CHECK_OK(gpu::Engine::Create(o, &e));
  return e;
}

const char* Name(gpu::EngineOptions::Upload u) {
  switch (u) {
    case gpu::EngineOptions::Upload::kAuto:
      return "gather kernel";
    case gpu::EngineOptions::Upload::kCopyEngine:
      return "memcpy per run";
    default:
      return "memcpy batch";
  }
}

}  // namespace

int main(int argc, char** argv) {
  int layers = 8, tokens = 32768, iters = 30;
  float keep = 0.1f;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--layers") layers = std::atoi(argv[i + 1]);
    else if (a == "--tokens") tokens = std::atoi(argv[i + 1]);
    else if (a == "--keep") keep = static_cast<float>(std::atof(argv[i + 1]));
    else if (a == "--iters") iters = std::atoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  auto desc = gpu::DeviceDescription();
  if (!desc.ok()) {
    std::printf("no device: %s\n", desc.status().ToString().c_str());
    return 0;
  }
  std::printf("device: %s\n", desc->c_str());
  std::printf("layers %d x %d kv heads x %d tokens, head_dim %d, bf16, %zu-byte pages, keep %.2f\n",
              layers, kKvHeads, tokens, kHeadDim, kPageBytes, keep);

  Rng rng{0x5eed1234u};
  HostTier host;
  for (int l = 0; l < layers; ++l) {
    host.layer_base.push_back(host.pages);
    host.heads.emplace_back();
    host.head_base.emplace_back(1, 0);
    for (int h = 0; h < kKvHeads; ++h) {
      // Cluster sizes a random composition of `tokens` (mean 20), then the centroids.
      HeadIndex x =
          sqkv::bench::SyntheticHead(rng, tokens, kHeadDim, kPageTokens, kCentroidFraction);
      for (float& v : x.centroids) v = rng.Normal();
      host.heads[l].push_back(std::move(x));
      host.head_base[l].push_back(host.head_base[l].back() + host.heads[l][h].num_pages());
    }
    host.pages += host.head_base[l].back();
  }
  const size_t layer_pages = host.head_base[0].back();
  const size_t layer_bytes = layer_pages * kPageBytes;
  CUDA_OK(cudaHostAlloc(reinterpret_cast<void**>(&host.pinned), host.pages * kPageBytes,
                        cudaHostAllocPortable | cudaHostAllocMapped));
  {  // bf16 values in ±[2^-7, 2): random sign, exponent and mantissa
    auto* w = reinterpret_cast<uint64_t*>(host.pinned);
    const size_t words = host.pages * kPageBytes / 8;
    for (size_t i = 0; i < words; ++i) {
      uint64_t r = rng.Next(), v = 0;
      for (int k = 0; k < 4; ++k) {
        const uint64_t e = 120 + ((r >> (16 * k + 8)) & 7);
        v |= (((r >> (16 * k)) & 0x807f) | (e << 7)) << (16 * k);
      }
      w[i] = v;
    }
  }
  host.slot.resize(host.pages);
  std::printf("host tier: %.2f GiB page-locked, %zu pages per layer (%.1f MiB)\n",
              host.pages * kPageBytes / 1073741824.0, layer_pages, layer_bytes / 1048576.0);

  // --- memcpy ceiling
  void* dev = nullptr;
  CUDA_OK(cudaMalloc(&dev, layer_bytes));
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  auto memcpy_gbs = [&](size_t bytes) {  // 2 untimed copies, the median of 10 timed
    return sqkv::bench::MedianGBs(stream, 2, 10, static_cast<double>(bytes), [&] {
      CUDA_OK(cudaMemcpyAsync(dev, host.pinned, bytes, cudaMemcpyHostToDevice, stream));
      return Status::Ok();
    });
  };
  const size_t head_bytes = layer_bytes / kKvHeads;
  const double ceiling_head = memcpy_gbs(head_bytes);
  const double ceiling_layer = memcpy_gbs(layer_bytes);
  std::printf("\n[memcpy] pinned H2D, one cudaMemcpyAsync: %.1f MiB %.1f GB/s, %.1f MiB %.1f GB/s\n",
              head_bytes / 1048576.0, ceiling_head, layer_bytes / 1048576.0, ceiling_layer);
  CUDA_OK(cudaFree(dev));

  // --- pointer checks (the kAuto path asks the runtime about every page)
  {
    std::vector<uint8_t> pageable(1 << 20);
    cudaPointerAttributes a{};
    const int n = 100000;
    double t0 = Now();
    for (int i = 0; i < n; ++i) {
      cudaPointerGetAttributes(&a, host.pinned + (static_cast<size_t>(i) * kPageBytes) % layer_bytes);
    }
    double t1 = Now();
    for (int i = 0; i < n; ++i) cudaPointerGetAttributes(&a, pageable.data() + (i % 128) * 8192);
    double t2 = Now();
    cudaGetLastError();
    std::printf("[pointer check] cudaPointerGetAttributes: %.3f us pinned, %.3f us pageable\n",
                (t1 - t0) / n, (t2 - t1) / n);
  }

  // --- uploads: PreloadLayer of whole layers
  std::printf("\n[upload] PreloadLayer, %d kv-head batches of %.1f MiB; device time of the "
              "uploads; %% of the %.1f MiB memcpy\n",
              kKvHeads, head_bytes / 1048576.0, head_bytes / 1048576.0);
  std::printf("%-16s %-11s %10s %10s %8s %12s\n", "path", "host", "GB/s", "wall GB/s", "%memcpy",
              "supply us");
  const gpu::EngineOptions::Upload modes[] = {gpu::EngineOptions::Upload::kAuto,
                                              gpu::EngineOptions::Upload::kCopyEngine,
                                              gpu::EngineOptions::Upload::kBatchCopy};
  double best_upload = 0;
  for (bool scattered : {false, true}) {
    host.Shuffle(rng, scattered);
    for (auto mode : modes) {
      auto e = MakeEngine(2 * layer_bytes + (64 << 20), mode);
      std::vector<double> gbs, wall;
      double supply = 0;
      const int reps = std::min(layers, 4);
      for (int r = 0; r < reps + 1; ++r) {
        const int l = r % layers;
        CHECK_OK(e->LoadLayerIndex(1000 + l, DType::kBF16, kPageTokens, host.heads[l]));
        gpu::PagingStats st;
        const double t0 = Now();
        CHECK_OK(e->PreloadLayer(1000 + l, host.Supplier(1000), &st));
        const double t1 = Now();
        if (r > 0) {  // the first warms the engine's staging and events
          gbs.push_back(st.bytes_uploaded / (st.upload_us * 1e3));
          wall.push_back(st.bytes_uploaded / ((t1 - t0) * 1e3));
          supply += st.supply_us / reps;
        }
        e->EvictLayer(1000 + l);
      }
      const double g = Median(gbs);
      best_upload = std::max(best_upload, g);
      std::printf("%-16s %-11s %10.1f %10.1f %7.0f%% %12.0f\n", Name(mode),
                  scattered ? "scattered" : "contiguous", g, Median(wall),
                  100.0 * g / ceiling_head, supply);
    }
  }

  // --- queries
  host.Shuffle(rng, true);
  sqkv::SelectOptions sel;
  sel.keep_fraction = keep;
  std::vector<float> q(static_cast<size_t>(kQHeads) * kHeadDim), out(q.size()), lse(kQHeads);
  auto request = [&](uint64_t key) {
    for (float& v : q) v = rng.Normal();
    gpu::QueryRequest r;
    r.layer_key = key;
    r.q = q.data();
    r.q_heads = kQHeads;
    r.n = 1;
    r.select = sel;
    r.out = out.data();
    r.lse = lse.data();
    return r;
  };
  auto e = MakeEngine(static_cast<size_t>(layers) * layer_bytes + (256 << 20),
                      gpu::EngineOptions::Upload::kAuto);
  auto supplier = host.Supplier(0);
  std::vector<double> cold, cold_up, cold_mb, warm, warm_up, paged_full, plain_full, whole;
  for (int l = 0; l < layers; ++l) {
    CHECK_OK(e->LoadLayerIndex(l, DType::kBF16, kPageTokens, host.heads[l]));
    gpu::PagingStats st;
    std::vector<gpu::QueryRequest> r = {request(l)};  // fresh q, drawn outside the timing
    double t0 = Now();
    CHECK_OK(e->QueryPaged(r, supplier, &st));
    cold.push_back(Now() - t0);
    cold_up.push_back(st.upload_us);
    cold_mb.push_back(st.bytes_uploaded / 1048576.0);
    r = {request(l)};  // a new q: part of its pages resident
    t0 = Now();
    CHECK_OK(e->QueryPaged(r, supplier, &st));
    warm.push_back(Now() - t0);
    warm_up.push_back(st.pages_selected > 0 ? 100.0 * st.pages_from_device / st.pages_selected : 0);
  }
  for (int l = 0; l < layers; ++l) CHECK_OK(e->PreloadLayer(l, supplier, nullptr));
  for (int i = 0; i < iters; ++i) {
    const int l = i % layers;
    // The two calls alternate in order, so that neither finds the layer's data in L2 after the
    // other more often than the other does.
    for (int k = 0; k < 2; ++k) {
      const bool paged = (k == 0) == (i % 2 == 0);
      const std::vector<gpu::QueryRequest> r = {request(l)};
      const double t0 = Now();
      CHECK_OK(paged ? e->QueryPaged(r, supplier, nullptr) : e->Query(r));
      (paged ? paged_full : plain_full).push_back(Now() - t0);
    }
  }
  // Whole-layer baseline: the layer from pinned memory in layer order, then the query.
  host.Shuffle(rng, false);
  for (int l = 0; l < layers; ++l) {
    e->EvictLayer(l);
    const uint8_t* pages = host.Page(l, 0, 0);
    const std::vector<gpu::QueryRequest> r = {request(l)};
    const double t0 = Now();
    CHECK_OK(e->LoadLayer(l, DType::kBF16, kPageTokens, host.heads[l], pages));
    CHECK_OK(e->Query(r));
    whole.push_back(Now() - t0);
  }
  std::printf("\n[query] decode, %d q heads, keep %.2f, medians over %d layers (wall us)\n",
              kQHeads, keep, layers);
  std::printf("  cold (index only): %8.0f us, %.1f MiB uploaded in %.0f us device time\n",
              Median(cold), Median(cold_mb), Median(cold_up));
  std::printf("  partly warm (new q, same layer): %8.0f us, %.0f%% of its pages resident\n",
              Median(warm), Median(warm_up));
  std::printf("  fully resident: QueryPaged %6.0f us, Query %6.0f us (median of %d)\n",
              Median(paged_full), Median(plain_full), iters);
  std::printf("  whole-layer baseline (LoadLayer %.0f MiB + Query): %8.0f us = %.1fx cold\n",
              layer_bytes / 1048576.0, Median(whole), Median(whole) / Median(cold));
  e.reset();

  // --- churn: a pool of a quarter of the pages, random layers
  host.Shuffle(rng, true);
  const size_t pool = std::max<size_t>(layers * layer_bytes / 4, 64ull << 20);
  auto c = MakeEngine(pool, gpu::EngineOptions::Upload::kAuto);
  for (int l = 0; l < layers; ++l) {
    CHECK_OK(c->LoadLayerIndex(l, DType::kBF16, kPageTokens, host.heads[l]));
  }
  std::vector<double> lat;
  int64_t selected = 0, from_device = 0, evicted = 0, uploaded = 0;
  double up_us = 0;
  const int n_churn = 4 * iters;
  for (int i = 0; i < n_churn; ++i) {
    const int l = static_cast<int>(rng.Next() % layers);
    gpu::PagingStats st;
    const std::vector<gpu::QueryRequest> r = {request(l)};
    const double t0 = Now();
    CHECK_OK(c->QueryPaged(r, supplier, &st));
    if (i >= layers) {
      lat.push_back(Now() - t0);
      selected += st.pages_selected;
      from_device += st.pages_from_device;
      evicted += st.pages_evicted;
      uploaded += st.bytes_uploaded;
      up_us += st.upload_us;
    }
  }
  const gpu::EngineCounters k = c->counters();
  std::printf("\n[churn] pool %.0f MiB (1/4 of the pages), %d random decode queries\n",
              pool / 1048576.0, n_churn - layers);
  std::printf("  p50 %.0f us, p99 %.0f us; device hit rate %.0f%%; %lld pages evicted; upload "
              "%.1f GB/s; pool used %.0f MiB\n",
              Percentile(lat, 0.5), Percentile(lat, 0.99),
              selected > 0 ? 100.0 * from_device / selected : 0.0,
              static_cast<long long>(evicted), up_us > 0 ? uploaded / (up_us * 1e3) : 0.0,
              k.pool_used_bytes / 1048576.0);
  std::printf("\nsummary: best batched upload %.1f GB/s = %.0f%% of pinned memcpy %.1f GB/s "
              "(target >= 80%%)\n",
              best_upload, 100.0 * best_upload / ceiling_head, ceiling_head);
  c.reset();
  cudaFreeHost(host.pinned);
  return 0;
}
