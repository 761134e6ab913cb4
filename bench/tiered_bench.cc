// Tiered paging benchmark (issue 4): many contexts, several times more bytes than the host cache,
// random queries. Cold and warm latency (p50/p99) and bytes read from disk per query, side by
// side with the baseline that loads the whole context for a cold query (one large direct read of
// every layer's pages, then dense attention over the queried layer).
//
//   tiered_bench [--contexts 1000] [--tokens 4096] [--layers 4] [--kv-heads 8] [--cache-mb 1024]
//                [--queries 400] [--keep 0.1] [--iterations 4] [--dir /tmp/sqkv-tiered] [--reuse]
//                [--device cpu|gpu]
//
// With --device gpu the queries run on the GPU through the device tier (pages disk → host → GPU
// on demand), and the baseline is the whole context read and copied to the device (no attention
// time counted; the copy goes from pageable memory into a fresh allocation each time, so it is a
// simple restore, not the fastest one possible).
//
// --reuse keeps an existing store (importing 1,000 contexts takes minutes). Cold means: the
// segment pages are not in the host cache and are read with O_DIRECT (the OS page cache is
// bypassed); the catalog (RocksDB) may still be in the OS page cache.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "api/store.h"
#include "api/synthetic.h"
#include "compute/attention.h"
#include "gpu/device.h"
#if defined(SQKV_HAVE_CUDA)
#include "gpu/device_buffer.h"
#endif
#include "index/head_index.h"

namespace {

using Clock = std::chrono::steady_clock;

double Ms(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

double Pct(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * v.size()))];
}

const char* ArgS(int argc, char** argv, const char* name, const char* def) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], name) == 0) return argv[i + 1];
  }
  return def;
}
double Arg(int argc, char** argv, const char* name, double def) {
  const char* s = ArgS(argc, argv, name, nullptr);
  return s ? std::atof(s) : def;
}
bool Flag(int argc, char** argv, const char* name) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], name) == 0) return true;
  }
  return false;
}

// Baseline: read the whole context with one direct read and run dense attention over the layer.
double BaselineMs(const std::string& seg, const sqkv::ContextInfo& c, int layer, const float* q,
                  int q_heads, int n, uint64_t* bytes, bool to_device) {
  const auto t0 = Clock::now();
  const size_t page_bytes = sqkv::PageBytes(c.page_tokens, c.head_dim, c.dtype);
  // The whole context: every layer's pages, as a KV-offloading system restores a context.
  const uint64_t first = 0, count = c.layer_first_page.back();
  const size_t len = count * page_bytes;
  const size_t aligned = (len + 4095) / 4096 * 4096;
  void* buf = std::aligned_alloc(4096, aligned);
  int fd = ::open(seg.c_str(), O_RDONLY | O_DIRECT);
  if (buf == nullptr || fd < 0) {  // a baseline that read nothing would look fast
    std::fprintf(stderr, "baseline: cannot open %s or allocate %zu bytes\n", seg.c_str(), aligned);
    std::abort();
  }
  size_t done = 0;
  const off_t base = static_cast<off_t>(4096 + first * page_bytes);
  while (done < len) {  // the last read may end short of `aligned` at the end of the file
    ssize_t r = ::pread(fd, static_cast<char*>(buf) + done, aligned - done, base + done);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      std::fprintf(stderr, "baseline: read of %s stopped at %zu of %zu bytes\n", seg.c_str(),
                   done, len);
      std::abort();
    }
    done += r;
  }
  ::close(fd);
  *bytes = len;
#if defined(SQKV_HAVE_CUDA)
  if (to_device) {  // the whole context onto the GPU; attention over it not counted
    sqkv::gpu::DeviceBuffer d;
    if (!d.Allocate(len).ok() || !d.CopyFromHost(buf, len).ok()) std::abort();
    std::free(buf);
    return Ms(t0, Clock::now());
  }
#else
  (void)to_device;  // never true: main refuses --device gpu without a device
#endif
  // Dense attention: every page of each head (valid counts are not needed for a timing peer:
  // padding slots hold zeros, which only perturb the numbers, not the work).
  const int g = q_heads / c.kv_heads, rows = g * n, d = c.head_dim;
  const uint64_t layer_first = c.layer_first_page[layer];
  const uint64_t per_head = (c.layer_first_page[layer + 1] - layer_first) / c.kv_heads;
  std::vector<sqkv::PageRef> refs(per_head);
  std::vector<float> out(static_cast<size_t>(rows) * d), lse(rows);
  for (int h = 0; h < c.kv_heads; ++h) {
    for (uint64_t p = 0; p < per_head; ++p) {
      refs[p] = {static_cast<char*>(buf) + (layer_first + h * per_head + p) * page_bytes,
                 c.page_tokens};
    }
    sqkv::AttendPages(q + static_cast<size_t>(h) * rows * d, rows, d, 1.f / std::sqrt(d), c.dtype,
                      c.page_tokens, refs.data(), static_cast<int>(per_head), out.data(),
                      lse.data());
  }
  std::free(buf);
  return Ms(t0, Clock::now());
}

}  // namespace

int main(int argc, char** argv) {
  using namespace sqkv;
  const int contexts = static_cast<int>(Arg(argc, argv, "--contexts", 1000));
  const int queries = static_cast<int>(Arg(argc, argv, "--queries", 400));
  const double keep = Arg(argc, argv, "--keep", 0.1);
  const std::string dir = ArgS(argc, argv, "--dir", "/tmp/sqkv-tiered");
  SyntheticOptions so;
  so.layers = static_cast<int>(Arg(argc, argv, "--layers", 4));
  so.kv_heads = static_cast<int>(Arg(argc, argv, "--kv-heads", 8));
  so.q_heads = so.kv_heads * 4;
  so.tokens = static_cast<int>(Arg(argc, argv, "--tokens", 4096));
  so.head_dim = 128;
  so.window = 0;
  so.n = 1;
  so.topics = 64;
  if (!Flag(argc, argv, "--reuse")) std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);

  StoreOptions opt;
  opt.data_dir = dir + "/data";
  opt.host_cache_bytes = static_cast<size_t>(Arg(argc, argv, "--cache-mb", 1024)) << 20;
  opt.index_cache_layers = 64;  // far fewer than the contexts: cold queries decode their index
  std::unique_ptr<Store> store;
  if (Status s = Store::Open(opt, &store); !s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  // Import: a few distinct synthetic files, each imported under many names (the K-means runs
  // anyway; the data repeating does not matter to I/O).
  constexpr int kDistinct = 8;
  std::vector<std::vector<float>> user_q(kDistinct);
  std::vector<ContextInfo> existing;
  (void)store->List(&existing);
  if (static_cast<int>(existing.size()) < contexts) {
    ImportOptions io;
    io.kmeans_iterations = static_cast<int>(Arg(argc, argv, "--iterations", 4));
    const auto t0 = Clock::now();
    for (int i = 0; i < kDistinct; ++i) {
      so.seed = 1000 + i;
      if (Status s = WriteSyntheticContext(so, dir + "/src" + std::to_string(i) + ".st", &user_q[i]);
          !s.ok()) {
        std::fprintf(stderr, "%s\n", s.ToString().c_str());
        return 1;
      }
    }
    for (int c = static_cast<int>(existing.size()); c < contexts; ++c) {
      Status s = store->Import("ctx" + std::to_string(c),
                               dir + "/src" + std::to_string(c % kDistinct) + ".st", io, nullptr);
      if (!s.ok() && s.code() != Status::Code::kAlreadyExists) {
        std::fprintf(stderr, "%s\n", s.ToString().c_str());
        return 1;
      }
      if (c % 100 == 99) std::fprintf(stderr, "imported %d contexts (%.0f s)\n", c + 1, Ms(t0, Clock::now()) / 1e3);
    }
  } else {
    for (int i = 0; i < kDistinct; ++i) {
      so.seed = 1000 + i;
      WriteSyntheticContext(so, dir + "/q.st", &user_q[i]).PermitUncheckedError();
    }
  }
  StoreStats st;
  (void)store->Stats(&st);
  const double ctx_mb = st.segment_bytes / 1e6 / std::max(1, st.contexts);
  std::printf("store: %d contexts, %.1f GB of segments (%.1f MB each), host cache %zu MB (%.1fx smaller)\n",
              st.contexts, st.segment_bytes / 1e9, ctx_mb, opt.host_cache_bytes >> 20,
              st.segment_bytes / static_cast<double>(opt.host_cache_bytes));

  std::mt19937_64 rng(42);
  std::uniform_int_distribution<int> pick(0, contexts - 1);
  const bool on_gpu = std::string(ArgS(argc, argv, "--device", "cpu")) == "gpu";
  if (on_gpu && !gpu::DevicePresent()) {
    std::fprintf(stderr, "--device gpu: no CUDA device\n");
    return 1;
  }
  QueryOptions qo;
  qo.device = on_gpu ? Device::kGpu : Device::kCpu;
  qo.select.keep_fraction = static_cast<float>(keep);
  std::vector<double> cold_ms, warm_ms, base_ms, cold_frac;
  std::vector<int> seen(contexts, 0);
  uint64_t cold_bytes = 0, base_bytes_total = 0;
  for (int i = 0; i < queries; ++i) {
    const int c = pick(rng);
    const std::string name = "ctx" + std::to_string(c);
    const auto& q = user_q[c % kDistinct];
    QueryResult r;
    const auto t0 = Clock::now();
    Status s = store->Query(name, 0, q.data(), so.q_heads, so.n, so.head_dim, qo, &r);
    const double ms = Ms(t0, Clock::now());
    if (!s.ok()) {
      std::fprintf(stderr, "%s\n", s.ToString().c_str());
      return 1;
    }
    if (r.stats.pages_from_disk > 0 && r.stats.pages_from_host == 0 &&
        r.stats.pages_from_device == 0) {
      cold_ms.push_back(ms);
      cold_bytes += r.stats.disk_bytes_read;
      ContextInfo info;
      (void)store->Info(name, &info);
      cold_frac.push_back(r.stats.disk_bytes_read / static_cast<double>(info.segment_bytes));
      // The whole-context baseline on the same context, right after (its pages are cold for
      // O_DIRECT whatever the host cache holds).
      uint64_t bb = 0;
      base_ms.push_back(BaselineMs(dir + "/data/segments/" + info.SegmentFileName(), info, 0, q.data(),
                                   so.q_heads, so.n, &bb, on_gpu));
      base_bytes_total += bb;
    } else if (r.stats.pages_from_disk == 0) {
      warm_ms.push_back(ms);
    }
    ++seen[c];
  }
  // Warm phase: repeat queries over a small hot set that fits in the cache.
  for (int i = 0; i < queries; ++i) {
    const int c = i % 16;
    QueryResult r;
    const auto t0 = Clock::now();
    (void)store->Query("ctx" + std::to_string(c), 0, user_q[c % kDistinct].data(), so.q_heads,
                       so.n, so.head_dim, qo, &r);
    if (r.stats.pages_from_disk == 0) warm_ms.push_back(Ms(t0, Clock::now()));
  }
  TierStats ts;
  (void)store->GetTierStats(&ts);
  auto row = [](const char* what, const std::vector<double>& v) {
    if (v.empty()) return;
    std::printf("%-34s n=%4zu  p50 %8.2f ms  p99 %8.2f ms\n", what, v.size(), Pct(v, 0.5), Pct(v, 0.99));
  };
  std::printf("keep %.2f, 1 query token x %d q heads, head_dim 128, bf16, on the %s\n", keep,
              so.q_heads, on_gpu ? "GPU (device tier)" : "CPU");
  row("cold query (selected pages only)", cold_ms);
  row(on_gpu ? "baseline: whole context to the GPU" : "baseline: whole context, then dense",
      base_ms);
  row(on_gpu ? "warm query (resident on the GPU)" : "warm query (host cache)", warm_ms);
  if (!cold_ms.empty()) {
    std::printf("cold query reads %.1f%% of the context's bytes (mean), baseline 100%%; "
                "median speedup %.2fx\n",
                100 * std::accumulate(cold_frac.begin(), cold_frac.end(), 0.0) / cold_frac.size(),
                Pct(base_ms, 0.5) / Pct(cold_ms, 0.5));
  }
  if (on_gpu) {
    std::printf("device: %llu page hits, %llu misses, %llu pages uploaded (%.1f MB), %llu evicted, "
                "pool %.0f MB of %.0f MB\n",
                (unsigned long long)ts.device_hits, (unsigned long long)ts.device_misses,
                (unsigned long long)ts.device_pages_uploaded, ts.device_bytes_uploaded / 1e6,
                (unsigned long long)ts.device_pages_evicted, ts.device_pool_bytes_used / 1e6,
                ts.device_pool_bytes / 1e6);
  }
  std::printf("host cache: %llu hits, %llu misses, %llu evictions, %.0f MB in use; disk: %llu reads, "
              "%.1f MB (%.0f%% direct)\n",
              (unsigned long long)ts.host_hits, (unsigned long long)ts.host_misses,
              (unsigned long long)ts.host_evictions, ts.host_bytes_in_use / 1e6,
              (unsigned long long)ts.disk_reads, ts.disk_bytes / 1e6,
              ts.disk_bytes ? 100.0 * ts.disk_direct_bytes / ts.disk_bytes : 0.0);
  std::printf("{\"bench\":\"tiered\",\"contexts\":%d,\"cold_p50_ms\":%.3f,\"cold_p99_ms\":%.3f,"
              "\"baseline_p50_ms\":%.3f,\"warm_p50_ms\":%.3f,\"warm_p99_ms\":%.3f}\n",
              st.contexts, cold_ms.empty() ? 0 : Pct(cold_ms, 0.5), cold_ms.empty() ? 0 : Pct(cold_ms, 0.99),
              base_ms.empty() ? 0 : Pct(base_ms, 0.5), warm_ms.empty() ? 0 : Pct(warm_ms, 0.5),
              warm_ms.empty() ? 0 : Pct(warm_ms, 0.99));
  (void)cold_bytes;
  (void)base_bytes_total;
  return 0;
}
