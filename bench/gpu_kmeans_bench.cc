// Index-build K-means, GPU against CPU (FAISS), on key-like synthetic rows (n / 40 random
// directions + noise + a shared direction), head_dim 128, 5% centroids, 20 iterations:
//   1. per head: 4K / 32K / 128K keys; GPU (cuBLAS TF32, cuBLAS FP32, built-in FP32) as the
//      median of --repeats timed calls after a warm-up, host wall clock from host rows to host
//      labels; CPU once per size (FAISS, all cores). Quality = mean cosine of the rows to their
//      cluster's normalised mean (the spherical objective), and the non-empty cluster count.
//   2. one context, index only (no file I/O): --layers x --heads heads of --context-tokens keys;
//      the K-means calls alone and BuildHeadIndex with the GPU hook (levels 1 and 2). The keys of
//      --heads distinct heads are reused by every layer (generating 4 GB of keys would dominate
//      the run); every call still uploads and clusters its keys afresh.
//
// Usage: gpu_kmeans_bench [--sizes 4096,32768,131072] [--cpu-max N] [--repeats R]
//                         [--layers 32] [--heads 8] [--context-tokens 32768] [--no-context]
//                         [--only-cpu]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "gpu/device.h"
#include "gpu/kmeans.h"
#include "index/build.h"
#include "index/kmeans.h"

namespace {

using sqkv::KMeansOptions;
using sqkv::Status;
using sqkv::bench::Check;
using sqkv::bench::Rng;
namespace gpu = sqkv::gpu;

constexpr int kHeadDim = 128;
constexpr double kCentroidFraction = 0.05;
constexpr int kIterations = 20;
constexpr int kRowsPerGroup = 40;

struct Args {
  std::vector<int> sizes = {4096, 32768, 131072};
  int cpu_max = 131072;
  int repeats = 5;
  int layers = 32, heads = 8, context_tokens = 32768;
  bool context = true;
  bool only_cpu = false;  // CPU rows alone (the run script times them last, under a timeout)
};

// Key-like rows: x: (n, d).
std::vector<float> Keys(uint64_t seed, int n, int d) {
  Rng rng{seed};
  const int groups = std::max(1, n / kRowsPerGroup);
  std::vector<float> centers(static_cast<size_t>(groups) * d), shared(d);
  for (float& v : centers) v = rng.Normal();
  for (float& v : shared) v = 0.3f * rng.Normal();
  std::vector<float> x(static_cast<size_t>(n) * d);
  for (int i = 0; i < n; ++i) {
    const size_t g = rng.Next() % groups;
    for (int j = 0; j < d; ++j) {
      x[static_cast<size_t>(i) * d + j] = centers[g * d + j] + shared[j] + 0.7f * rng.Normal();
    }
  }
  return x;
}

// Mean cosine of rows to their cluster's normalised mean of unit rows; *used = non-empty
// clusters. x: (n, d); assign: (n) in [0, k).
double Quality(const std::vector<float>& x, int n, int d, const std::vector<int32_t>& assign,
               int k, int* used) {
  std::vector<double> unit(static_cast<size_t>(n) * d), c(static_cast<size_t>(k) * d, 0.0);
  for (int i = 0; i < n; ++i) {
    const float* r = x.data() + static_cast<size_t>(i) * d;
    double ss = 0;
    for (int j = 0; j < d; ++j) ss += static_cast<double>(r[j]) * r[j];
    const double inv = ss > 0 ? 1.0 / std::sqrt(ss) : 0.0;
    for (int j = 0; j < d; ++j) {
      unit[static_cast<size_t>(i) * d + j] = r[j] * inv;
      c[static_cast<size_t>(assign[i]) * d + j] += r[j] * inv;
    }
  }
  *used = 0;
  for (int j = 0; j < k; ++j) {
    double ss = 0;
    for (int e = 0; e < d; ++e) ss += c[static_cast<size_t>(j) * d + e] * c[static_cast<size_t>(j) * d + e];
    if (ss > 0) ++*used;
    for (int e = 0; e < d && ss > 0; ++e) c[static_cast<size_t>(j) * d + e] /= std::sqrt(ss);
  }
  double sum = 0;
  for (int i = 0; i < n; ++i) {
    double dot = 0;
    for (int e = 0; e < d; ++e) {
      dot += unit[static_cast<size_t>(i) * d + e] * c[static_cast<size_t>(assign[i]) * d + e];
    }
    sum += dot;
  }
  return sum / n;
}

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::vector<int> ParseList(const char* s) {
  std::vector<int> out;
  for (const char* p = s; *p != '\0';) {
    out.push_back(std::atoi(p));
    const char* comma = std::strchr(p, ',');
    if (comma == nullptr) break;
    p = comma + 1;
  }
  return out;
}

Args Parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    const bool has = i + 1 < argc;
    if (f == "--sizes" && has) {
      a.sizes = ParseList(argv[++i]);
    } else if (f == "--cpu-max" && has) {
      a.cpu_max = std::atoi(argv[++i]);
    } else if (f == "--repeats" && has) {
      a.repeats = std::max(1, std::atoi(argv[++i]));
    } else if (f == "--layers" && has) {
      a.layers = std::atoi(argv[++i]);
    } else if (f == "--heads" && has) {
      a.heads = std::atoi(argv[++i]);
    } else if (f == "--context-tokens" && has) {
      a.context_tokens = std::atoi(argv[++i]);
    } else if (f == "--no-context") {
      a.context = false;
    } else if (f == "--only-cpu") {
      a.only_cpu = true;
    } else {
      std::fprintf(stderr, "unknown argument %s\n", f.c_str());
      std::exit(2);
    }
  }
  return a;
}

struct Variant {
  const char* name;
  gpu::GpuKMeansOptions options;
};

void PerHead(const Args& a) {
  const KMeansOptions km{.niter = kIterations, .seed = 1234};
  const Variant variants[] = {
      {"gpu cublas-tf32", {.gemm = gpu::KMeansGemm::kCublas, .tf32 = true}},
      {"gpu cublas-fp32", {.gemm = gpu::KMeansGemm::kCublas, .tf32 = false}},
      {"gpu builtin-fp32", {.gemm = gpu::KMeansGemm::kBuiltin}},
  };
  std::printf("%-8s %-17s %10s %10s %10s %9s %8s\n", "keys", "path", "wall_ms", "seed_ms",
              "lloyd_ms", "quality", "used");
  for (int n : a.sizes) {
    const int k = std::max(1, static_cast<int>(std::lround(kCentroidFraction * n)));
    const std::vector<float> x = Keys(0x5eed0000u + n, n, kHeadDim);
    std::vector<int32_t> assign;
    int used = 0;
    if (!a.only_cpu) {
      for (const Variant& v : variants) {
        gpu::GpuKMeansStats stats;
        const Status warm = gpu::SphericalKMeans(x.data(), n, kHeadDim, k, km, v.options, &assign,
                                                 &stats);
        if (warm.IsUnavailable()) {
          std::printf("%-8d %-17s unavailable: %s\n", n, v.name, warm.ToString().c_str());
          continue;
        }
        Check(warm, v.name);
        std::vector<double> wall;
        std::vector<gpu::GpuKMeansStats> all;
        for (int r = 0; r < a.repeats; ++r) {
          const auto t0 = std::chrono::steady_clock::now();
          Check(gpu::SphericalKMeans(x.data(), n, kHeadDim, k, km, v.options, &assign, &stats),
              v.name);
          wall.push_back(1e3 * Seconds(t0));
          all.push_back(stats);
        }
        std::vector<size_t> order(wall.size());
        for (size_t i = 0; i < order.size(); ++i) order[i] = i;
        std::sort(order.begin(), order.end(), [&](size_t i, size_t j) { return wall[i] < wall[j]; });
        const size_t mid = order[order.size() / 2];
        const double q = Quality(x, n, kHeadDim, assign, k, &used);
        std::printf("%-8d %-17s %10.2f %10.2f %10.2f %9.5f %8d   (min %.2f, max %.2f ms)\n", n,
                    v.name, wall[mid], all[mid].seed_ms, all[mid].lloyd_ms, q, used,
                    wall[order.front()], wall[order.back()]);
        std::fflush(stdout);
      }
    }
    if (n <= a.cpu_max) {
      const auto t0 = std::chrono::steady_clock::now();
      Check(sqkv::SphericalKMeans(x.data(), n, kHeadDim, k, km, &assign), "cpu kmeans");
      const double ms = 1e3 * Seconds(t0);
      const double q = Quality(x, n, kHeadDim, assign, k, &used);
      std::printf("%-8d %-17s %10.2f %10s %10s %9.5f %8d   (one run)\n", n, "cpu faiss", ms, "-",
                  "-", q, used);
      std::fflush(stdout);
    }
  }
}

void Context(const Args& a) {
  const int n = a.context_tokens;
  const int k = std::max(1, static_cast<int>(std::lround(kCentroidFraction * n)));
  std::printf("\ncontext: %d layers x %d kv heads x %d tokens x d%d (keys of %d distinct heads "
              "reused per layer)\n",
              a.layers, a.heads, n, kHeadDim, a.heads);
  const auto tg = std::chrono::steady_clock::now();
  std::vector<std::vector<float>> keys;
  for (int h = 0; h < a.heads; ++h) keys.push_back(Keys(0xc0de0000u + h, n, kHeadDim));
  std::printf("  key generation (host, not counted): %.2f s\n", Seconds(tg));

  // K-means alone, as BuildHeadIndex's level 2 calls it.
  std::vector<int32_t> assign;
  gpu::GpuKMeansStats stats, sum;
  const auto t0 = std::chrono::steady_clock::now();
  for (int l = 0; l < a.layers; ++l) {
    for (int h = 0; h < a.heads; ++h) {
      const KMeansOptions km{.niter = kIterations, .seed = 1234u + l};
      Check(gpu::SphericalKMeans(keys[h].data(), n, kHeadDim, k, km, {}, &assign, &stats),
          "context kmeans");
      sum.upload_ms += stats.upload_ms;
      sum.seed_ms += stats.seed_ms;
      sum.lloyd_ms += stats.lloyd_ms;
      sum.download_ms += stats.download_ms;
    }
  }
  const double kmeans_s = Seconds(t0);
  const int calls = a.layers * a.heads;
  std::printf("  gpu kmeans only (%s): %.2f s for %d heads, %.2f ms/head "
              "(device: upload %.2f, seed %.2f, lloyd %.2f, download %.2f ms/head)\n",
              stats.cublas ? "cublas-tf32" : "builtin", kmeans_s, calls, 1e3 * kmeans_s / calls,
              sum.upload_ms / calls, sum.seed_ms / calls, sum.lloyd_ms / calls,
              sum.download_ms / calls);
  std::fflush(stdout);

  // The whole index build per head (clustering, raw-key centroids, page layout, validation).
  for (int levels : {1, 2}) {
    sqkv::IndexParams p;
    p.levels = levels;
    p.kmeans = gpu::GpuKMeansFn();
    sqkv::HeadIndex index;
    size_t clusters = 0;
    const auto t1 = std::chrono::steady_clock::now();
    for (int l = 0; l < a.layers; ++l) {
      p.seed = 1234u + l;
      for (int h = 0; h < a.heads; ++h) {
        Check(sqkv::BuildHeadIndex(keys[h].data(), n, kHeadDim, p, &index), "build index");
        clusters += index.num_clusters();
      }
    }
    const double s = Seconds(t1);
    std::printf("  gpu BuildHeadIndex levels %d: %.2f s for %d heads, %.2f ms/head, "
                "%.1f clusters/head\n",
                levels, s, calls, 1e3 * s / calls, static_cast<double>(clusters) / calls);
    std::fflush(stdout);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = Parse(argc, argv);
  auto desc = gpu::DeviceDescription();
  std::printf("device: %s\n", desc.ok() ? desc->c_str() : desc.status().ToString().c_str());
  std::printf("k-means: d%d, %.0f%% centroids, %d iterations, seed 1234\n", kHeadDim,
              100 * kCentroidFraction, kIterations);
  PerHead(a);
  if (a.context && !a.only_cpu) {
    if (!gpu::DevicePresent()) {
      std::printf("context: skipped, no device\n");
      return 0;
    }
    Context(a);
  }
  return 0;
}
