// CPU path benchmark (issue 2): import + index time per million keys, and query latency of one
// layer of a 32K-token context (8 kv heads, 32 query heads, head_dim 128, bf16) for 1 and 512
// query tokens, dense and keep 0.1, measured side by side in one run.
//
//   cpu_query_bench [--tokens 32768] [--layers 2] [--reps 7] [--dir /tmp/sqkv-bench]
//                   [--n 0|1|512] [--reuse 0|1]
//   --n: only that many query tokens (0: both 1 and 512); --reuse 1: keep the directory and import
//   only when the context is not there yet (for profiling the queries alone).
//
// A query touches one layer, so the context has fewer layers than a real model's 32 (indexing
// 32 x 8 heads of 32K keys takes ~20 min on 2 cores); per-layer latency does not depend on it.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "api/store.h"
#include "api/synthetic.h"

namespace {

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int Arg(int argc, char** argv, const char* name, int def) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], name) == 0) return std::atoi(argv[i + 1]);
  }
  return def;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace sqkv;
  using Clock = std::chrono::steady_clock;
  const int tokens = Arg(argc, argv, "--tokens", 32768);
  const int layers = Arg(argc, argv, "--layers", 2);
  const int reps = Arg(argc, argv, "--reps", 7);
  const int only_n = Arg(argc, argv, "--n", 0);
  const bool reuse = Arg(argc, argv, "--reuse", 0) != 0;
  std::string dir = "/tmp/sqkv-bench";
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--dir") == 0) dir = argv[i + 1];
  }
  if (!reuse) std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);

  SyntheticOptions so;
  so.layers = layers;
  so.kv_heads = 8;
  so.q_heads = 32;
  so.tokens = tokens;
  so.head_dim = 128;
  so.dtype = DType::kBF16;
  so.window = 0;
  so.n = 512;
  so.topics = 64;
  std::vector<float> q512;
  const std::string file = dir + "/ctx.safetensors";
  if (Status s = WriteSyntheticContext(so, file, &q512); !s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  std::unique_ptr<Store> store;
  StoreOptions opt;
  opt.data_dir = dir + "/data";
  if (Status s = Store::Open(opt, &store); !s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  const auto t0 = Clock::now();
  ContextInfo existing;
  if (reuse && store->Info("bench", &existing).ok() && existing.tokens == tokens) {
    // Nothing imported: no import figure (a time near zero would read as one).
    std::printf("reusing the imported context in %s (no import timed)\n", dir.c_str());
  } else {
    if (Status s = store->Import("bench", file, ImportOptions(), nullptr); !s.ok()) {
      std::fprintf(stderr, "%s\n", s.ToString().c_str());
      return 1;
    }
    const double import_s = std::chrono::duration<double>(Clock::now() - t0).count();
    const double keys = static_cast<double>(layers) * so.kv_heads * tokens;
    std::printf("import: %d layers x 8 kv heads x %d tokens x 128 (bf16) = %.0f keys in %.2f s "
                "= %.1f s per million keys (centroids 5%%, 20 K-means iterations)\n",
                layers, tokens, keys, import_s, import_s / keys * 1e6);
    std::printf(
        "{\"bench\":\"import\",\"keys\":%.0f,\"seconds\":%.3f,\"s_per_million_keys\":%.2f}\n",
        keys, import_s, import_s / keys * 1e6);
  }

  std::printf("\n%-6s %-10s %12s %12s %14s\n", "n", "mode", "median_ms", "kept_frac", "MB_from_disk");
  for (int n : {1, 512}) {
    if (only_n != 0 && n != only_n) continue;
    // q: (32, n, 128) — the first n of the 512 synthetic user queries of each head.
    std::vector<float> q(static_cast<size_t>(32) * n * 128);
    for (int h = 0; h < 32; ++h) {
      std::memcpy(q.data() + static_cast<size_t>(h) * n * 128,
                  q512.data() + static_cast<size_t>(h) * 512 * 128, sizeof(float) * n * 128);
    }
    for (bool dense : {true, false}) {
      QueryOptions qo;
      qo.device = Device::kCpu;
      qo.select.mode = dense ? SelectOptions::Mode::kDense : SelectOptions::Mode::kKeepFraction;
      qo.select.keep_fraction = 0.1f;
      std::vector<double> ms;
      QueryResult r;
      for (int i = 0; i < reps + 1; ++i) {
        const auto s0 = Clock::now();
        Status s = store->Query("bench", 0, q.data(), 32, n, 128, qo, &r);
        if (!s.ok()) {
          std::fprintf(stderr, "%s\n", s.ToString().c_str());
          return 1;
        }
        if (i > 0) ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - s0).count());
      }
      const double kept = static_cast<double>(r.stats.tokens_selected) / (8.0 * tokens);
      std::printf("%-6d %-10s %12.2f %12.3f %14.2f\n", n, dense ? "dense" : "keep0.1", Median(ms),
                  kept, r.stats.disk_bytes_read / 1e6);
      std::printf("{\"bench\":\"cpu_query\",\"tokens\":%d,\"n\":%d,\"mode\":\"%s\",\"median_ms\":%.3f,"
                  "\"kept_fraction\":%.4f,\"reps\":%d}\n",
                  tokens, n, dense ? "dense" : "keep0.1", Median(ms), kept, reps);
    }
  }
  return 0;
}
