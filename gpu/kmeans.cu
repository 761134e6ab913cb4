// GPU spherical K-means: argument checks, the per-thread workspace, and the order of the steps
// (upload and normalise, D² seeding in rounds, Lloyd iterations, final assignment, download).
#include "gpu/kmeans.h"

#include <cub/device/device_radix_sort.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <string>

#include "gpu/device.h"
#include "gpu/device_buffer.h"
#include "gpu/kmeans_internal.cuh"

namespace sqkv::gpu {
namespace {

using namespace kmeans_detail;  // NOLINT: this file is the module's driver

// Rows of an assignment tile are a multiple of this (whole tensor-core tiles for cuBLAS).
constexpr int kTileRowAlign = 128;
// Seeding draws at most ceil((k - 1) / kSeedRounds) centroids per round, in about kSeedRounds
// rounds once the doubling round sizes reach that cap (see gpu/kmeans.h).
constexpr int kSeedRounds = 32;

Status Cuda(cudaError_t err, const char* what) { return CudaStatus(err, what); }

// Grows a buffer to hold at least `bytes` (its contents are lost when it grows).
Status Reserve(DeviceBuffer* b, size_t bytes) {
  if (b->size() >= bytes) return Status::Ok();
  return b->Allocate(bytes);
}

// A uniform double in [0, 1) from 53 random bits, the same draw as the CPU path's seeding.
double Uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

// The calling thread's stream, products and buffers, kept between calls.
class Workspace {
 public:
  // Status, not Result: nvcc warns on Result's internals (common/status.h) in .cu files.
  static Status ForThisThread(Workspace** out) {
    thread_local std::unique_ptr<Workspace> ws;
    if (ws == nullptr) {
      auto fresh = std::unique_ptr<Workspace>(new Workspace());
      SQKV_RETURN_IF_ERROR(
          Cuda(cudaStreamCreateWithFlags(&fresh->stream, cudaStreamNonBlocking), "stream"));
      for (cudaEvent_t& e : fresh->events) {
        SQKV_RETURN_IF_ERROR(Cuda(cudaEventCreate(&e), "event"));
      }
      fresh->builtin = MakeBuiltinGemm(fresh->stream);
      ws = std::move(fresh);
    }
    *out = ws.get();
    return Status::Ok();
  }

  ~Workspace() {
    cublas.reset();  // the handle is bound to the stream: release it first
    for (cudaEvent_t e : events) {
      if (e != nullptr) cudaEventDestroy(e);
    }
    if (stream != nullptr) cudaStreamDestroy(stream);
  }

  // The product for `mode`; with kAuto, cuBLAS when it can be set up, else the built-in kernel.
  Status SelectGemm(KMeansGemm mode, Gemm** out) {
    if (mode != KMeansGemm::kBuiltin && cublas_status == nullptr) {
      cublas_status = std::make_unique<Status>(MakeCublasGemm(stream, &cublas));
    }
    if (mode == KMeansGemm::kBuiltin || (mode == KMeansGemm::kAuto && cublas == nullptr)) {
      *out = builtin.get();
      return Status::Ok();
    }
    if (cublas == nullptr) return *cublas_status;
    *out = cublas.get();
    return Status::Ok();
  }

  cudaStream_t stream = nullptr;
  cudaEvent_t events[5] = {};
  std::unique_ptr<Gemm> builtin;
  std::unique_ptr<Gemm> cublas;
  std::unique_ptr<Status> cublas_status;  // null until cuBLAS was tried
  // unit: (n, d); norm2, d2: (n); centroids: (k, d); s: one tile of products; chunk_sum,
  // chunk_prefix: (n / kSeedChunk) float64; picks: (k); uniform: the seeding draws; labels,
  // sorted_labels, iota, order: (n); begin, end: (k); sort_temp: CUB's scratch.
  DeviceBuffer unit, norm2, d2, centroids, s, chunk_sum, chunk_prefix, picks, uniform;
  DeviceBuffer labels, sorted_labels, iota, order, begin, end, sort_temp;

 private:
  Workspace() = default;
};

// The sizes of one call.
struct Plan {
  int n = 0, d = 0, k = 0;
  int lds = 0;        // stride of an assignment tile: k rounded up to a multiple of 4
  int tile_rows = 0;  // rows per assignment tile
  std::vector<int> round_sizes;  // seeding: 1, then 1, 2, 4, ... capped; they sum to k
  int seed_tile_rows = 0;        // rows per seeding product tile (a multiple of kSeedChunk or n)
  size_t s_floats = 0;
  int sort_bits = 1;  // label bits the radix sort looks at
};

// tile_bytes: GpuKMeansOptions::tile_bytes.
Plan MakePlan(int n, int d, int k, size_t tile_bytes) {
  Plan p;
  p.n = n;
  p.d = d;
  p.k = k;
  p.lds = (k + 3) / 4 * 4;
  const size_t tile_floats = tile_bytes / sizeof(float);
  const int64_t rows = static_cast<int64_t>(tile_floats / p.lds) / kTileRowAlign * kTileRowAlign;
  p.tile_rows = static_cast<int>(std::min<int64_t>(n, std::max<int64_t>(kTileRowAlign, rows)));
  const int cap = std::max(1, (k - 1 + kSeedRounds - 1) / kSeedRounds);
  p.round_sizes.push_back(1);
  for (int picked = 1, next = 1; picked < k; next = std::min(2 * next, cap)) {
    const int count = std::min(next, k - picked);
    p.round_sizes.push_back(count);
    picked += count;
  }
  const int64_t seed_rows =
      static_cast<int64_t>(tile_floats / cap) / kSeedChunk * kSeedChunk;
  p.seed_tile_rows = static_cast<int>(std::min<int64_t>(n, std::max<int64_t>(kSeedChunk, seed_rows)));
  p.s_floats = std::max(static_cast<size_t>(p.tile_rows) * p.lds,
                        static_cast<size_t>(p.seed_tile_rows) * cap);
  while ((int64_t{1} << p.sort_bits) < k) ++p.sort_bits;
  return p;
}

Status CheckArguments(const float* x, int n, int d, const KMeansOptions& options,
                      const std::vector<int32_t>* assign) {
  if (x == nullptr || assign == nullptr) return Status::InvalidArgument("gpu kmeans: null buffer");
  if (n < 1 || d < 1) {
    return Status::InvalidArgument("gpu kmeans: shape (" + std::to_string(n) + ", " +
                                   std::to_string(d) + ") has no rows or no columns");
  }
  if (d > kMaxDim) {
    return Status::InvalidArgument("gpu kmeans: d " + std::to_string(d) + " > " +
                                   std::to_string(kMaxDim));
  }
  if (options.niter < 1) {
    return Status::InvalidArgument("gpu kmeans: niter " + std::to_string(options.niter) + " < 1");
  }
  const size_t count = static_cast<size_t>(n) * d;
  for (size_t i = 0; i < count; ++i) {
    if (!std::isfinite(x[i])) {
      return Status::InvalidArgument("gpu kmeans: x[" + std::to_string(i / d) + ", " +
                                     std::to_string(i % d) + "] is not finite");
    }
  }
  return Status::Ok();
}

class Runner {
 public:
  Runner(Workspace* ws, Gemm* gemm, const Plan& p, bool tf32)
      : ws_(*ws), gemm_(*gemm), p_(p), tf32_(tf32), stream_(ws->stream) {}

  Status Reserve(size_t* sort_temp_bytes) {
    const size_t n = p_.n, d = p_.d, k = p_.k;
    const size_t chunks = (n + kSeedChunk - 1) / kSeedChunk;
    size_t uniforms = 0;
    for (int c : p_.round_sizes) uniforms += 1 + c;
    SQKV_RETURN_IF_ERROR(gpu::Reserve(&ws_.unit, n * d * sizeof(float)));
    SQKV_RETURN_IF_ERROR(gpu::Reserve(&ws_.norm2, n * sizeof(float)));
    SQKV_RETURN_IF_ERROR(gpu::Reserve(&ws_.d2, n * sizeof(float)));
    SQKV_RETURN_IF_ERROR(gpu::Reserve(&ws_.centroids, k * d * sizeof(float)));
    SQKV_RETURN_IF_ERROR(gpu::Reserve(&ws_.s, p_.s_floats * sizeof(float)));
    SQKV_RETURN_IF_ERROR(gpu::Reserve(&ws_.chunk_sum, chunks * sizeof(double)));
    SQKV_RETURN_IF_ERROR(gpu::Reserve(&ws_.chunk_prefix, chunks * sizeof(double)));
    SQKV_RETURN_IF_ERROR(gpu::Reserve(&ws_.picks, k * sizeof(int32_t)));
    SQKV_RETURN_IF_ERROR(gpu::Reserve(&ws_.uniform, uniforms * sizeof(double)));
    for (DeviceBuffer* b : {&ws_.labels, &ws_.sorted_labels, &ws_.iota, &ws_.order}) {
      SQKV_RETURN_IF_ERROR(gpu::Reserve(b, n * sizeof(int32_t)));
    }
    SQKV_RETURN_IF_ERROR(gpu::Reserve(&ws_.begin, k * sizeof(int32_t)));
    SQKV_RETURN_IF_ERROR(gpu::Reserve(&ws_.end, k * sizeof(int32_t)));
    size_t bytes = 0;
    SQKV_RETURN_IF_ERROR(Cuda(cub::DeviceRadixSort::SortPairs(
                                  nullptr, bytes, Labels(), ws_.sorted_labels.as<int32_t>(),
                                  ws_.iota.as<int32_t>(), ws_.order.as<int32_t>(), p_.n, 0,
                                  p_.sort_bits, stream_),
                              "radix sort size"));
    *sort_temp_bytes = bytes;
    return gpu::Reserve(&ws_.sort_temp, std::max<size_t>(bytes, 1));
  }

  // x: (n, d) host → unit rows and their squared norms.
  Status Upload(const float* x) {
    SQKV_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(ws_.unit.get(), x,
                                              static_cast<size_t>(p_.n) * p_.d * sizeof(float),
                                              cudaMemcpyHostToDevice, stream_),
                              "upload rows"));
    return LaunchNormalise(Unit(), ws_.norm2.as<float>(), p_.n, p_.d, stream_);
  }

  // D² seeding in rounds of p_.round_sizes; draws from mt19937_64(seed).
  Status Seed(uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<double> uniform;
    for (int c : p_.round_sizes) {
      for (int i = 0; i < 1 + c; ++i) uniform.push_back(Uniform01(rng));
    }
    SQKV_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(ws_.uniform.get(), uniform.data(),
                                              uniform.size() * sizeof(double),
                                              cudaMemcpyHostToDevice, stream_),
                              "upload draws"));
    // The copy from pageable memory has left `uniform` once cudaMemcpyAsync returns.
    const double* draws = ws_.uniform.as<double>();
    float* d2 = ws_.d2.as<float>();
    double* chunk_sum = ws_.chunk_sum.as<double>();
    int32_t* picks = ws_.picks.as<int32_t>();
    float* centroids = ws_.centroids.as<float>();
    int picked = 0, last_begin = 0, last_count = 0;
    size_t draw = 0;
    for (size_t r = 0; r < p_.round_sizes.size(); ++r) {
      const int count = p_.round_sizes[r];
      if (r > 0) {  // distances to the previous round's centroids
        for (int row0 = 0; row0 < p_.n; row0 += p_.seed_tile_rows) {
          const int rows = std::min(p_.seed_tile_rows, p_.n - row0);
          SQKV_RETURN_IF_ERROR(gemm_.Run(Unit() + static_cast<size_t>(row0) * p_.d, rows,
                                         centroids + static_cast<size_t>(last_begin) * p_.d,
                                         last_count, p_.d, S(), last_count, /*tf32=*/false));
          SQKV_RETURN_IF_ERROR(LaunchSeedUpdate(S(), last_count, picks + last_begin,
                                                ws_.norm2.as<float>(), d2, chunk_sum, row0, rows,
                                                /*init=*/last_begin == 0, stream_));
        }
      }
      SQKV_RETURN_IF_ERROR(LaunchSeedPick(d2, chunk_sum, ws_.chunk_prefix.as<double>(), p_.n,
                                          draws + draw, count, /*first=*/r == 0, Unit(), p_.d,
                                          picks + picked,
                                          centroids + static_cast<size_t>(picked) * p_.d,
                                          stream_));
      draw += 1 + count;
      last_begin = picked;
      last_count = count;
      picked += count;
    }
    return Status::Ok();
  }

  // labels = the nearest centroid of every row, tile by tile.
  Status Assign() {
    for (int row0 = 0; row0 < p_.n; row0 += p_.tile_rows) {
      const int rows = std::min(p_.tile_rows, p_.n - row0);
      SQKV_RETURN_IF_ERROR(gemm_.Run(Unit() + static_cast<size_t>(row0) * p_.d, rows,
                                     ws_.centroids.as<float>(), p_.k, p_.d, S(), p_.lds, tf32_));
      SQKV_RETURN_IF_ERROR(LaunchArgmax(S(), rows, p_.k, p_.lds, Labels() + row0, stream_));
    }
    return Status::Ok();
  }

  // centroids = the normalised sum of each cluster's unit rows, summed in row order (a stable
  // sort by label groups them).
  Status Update(size_t sort_temp_bytes) {
    SQKV_RETURN_IF_ERROR(Cuda(
        cub::DeviceRadixSort::SortPairs(ws_.sort_temp.get(), sort_temp_bytes, Labels(),
                                        ws_.sorted_labels.as<int32_t>(), ws_.iota.as<int32_t>(),
                                        ws_.order.as<int32_t>(), p_.n, 0, p_.sort_bits, stream_),
        "radix sort"));
    const size_t range_bytes = static_cast<size_t>(p_.k) * sizeof(int32_t);
    SQKV_RETURN_IF_ERROR(Cuda(cudaMemsetAsync(ws_.begin.get(), 0, range_bytes, stream_), "memset"));
    SQKV_RETURN_IF_ERROR(Cuda(cudaMemsetAsync(ws_.end.get(), 0, range_bytes, stream_), "memset"));
    SQKV_RETURN_IF_ERROR(LaunchClusterRanges(ws_.sorted_labels.as<int32_t>(), p_.n,
                                             ws_.begin.as<int32_t>(), ws_.end.as<int32_t>(),
                                             stream_));
    return LaunchCentroids(Unit(), ws_.order.as<int32_t>(), ws_.begin.as<int32_t>(),
                           ws_.end.as<int32_t>(), p_.k, p_.d, ws_.centroids.as<float>(), stream_);
  }

  // Labels → host; waits for the stream. With ev (5 events, 0..3 recorded before), fills the
  // phase times of stats.
  Status Download(std::vector<int32_t>* assign, cudaEvent_t* ev, GpuKMeansStats* stats) {
    assign->resize(p_.n);
    SQKV_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(assign->data(), Labels(), p_.n * sizeof(int32_t),
                                              cudaMemcpyDeviceToHost, stream_),
                              "download labels"));
    if (ev != nullptr) SQKV_RETURN_IF_ERROR(Cuda(cudaEventRecord(ev[4], stream_), "event"));
    SQKV_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream_), "kmeans on the device"));
    if (ev == nullptr) return Status::Ok();
    float ms[4] = {};
    for (int i = 0; i < 4; ++i) {
      SQKV_RETURN_IF_ERROR(Cuda(cudaEventElapsedTime(&ms[i], ev[i], ev[i + 1]), "event time"));
    }
    stats->upload_ms = ms[0];
    stats->seed_ms = ms[1];
    stats->lloyd_ms = ms[2];
    stats->download_ms = ms[3];
    return Status::Ok();
  }

 private:
  float* Unit() { return ws_.unit.as<float>(); }
  float* S() { return ws_.s.as<float>(); }
  int32_t* Labels() { return ws_.labels.as<int32_t>(); }

  Workspace& ws_;
  Gemm& gemm_;
  const Plan& p_;
  bool tf32_;
  cudaStream_t stream_;
};

}  // namespace

Status SphericalKMeans(const float* x, int n, int d, int k, const KMeansOptions& options,
                       std::vector<int32_t>* assign) {
  return SphericalKMeans(x, n, d, k, options, GpuKMeansOptions{}, assign);
}

Status SphericalKMeans(const float* x, int n, int d, int k, const KMeansOptions& options,
                       const GpuKMeansOptions& gpu_options, std::vector<int32_t>* assign,
                       GpuKMeansStats* stats) {
  SQKV_RETURN_IF_ERROR(CheckArguments(x, n, d, options, assign));
  if (!DevicePresent()) return Status::Unavailable("gpu kmeans: no CUDA device");
  if (stats != nullptr) *stats = GpuKMeansStats{};
  k = std::clamp(k, 1, n);
  if (k == 1) {
    assign->assign(n, 0);
    return Status::Ok();
  }
  Workspace* ws = nullptr;
  SQKV_RETURN_IF_ERROR(Workspace::ForThisThread(&ws));
  Gemm* gemm = nullptr;
  SQKV_RETURN_IF_ERROR(ws->SelectGemm(gpu_options.gemm, &gemm));
  const Plan plan = MakePlan(n, d, k, gpu_options.tile_bytes);
  Runner run(ws, gemm, plan, gpu_options.tf32);
  size_t sort_temp_bytes = 0;
  SQKV_RETURN_IF_ERROR(run.Reserve(&sort_temp_bytes));
  SQKV_RETURN_IF_ERROR(LaunchIota(ws->iota.as<int32_t>(), n, ws->stream));

  cudaEvent_t* ev = ws->events;
  auto mark = [&](int i) {
    return stats != nullptr ? Cuda(cudaEventRecord(ev[i], ws->stream), "event") : Status::Ok();
  };
  SQKV_RETURN_IF_ERROR(mark(0));
  SQKV_RETURN_IF_ERROR(run.Upload(x));
  SQKV_RETURN_IF_ERROR(mark(1));
  SQKV_RETURN_IF_ERROR(run.Seed(options.seed));
  SQKV_RETURN_IF_ERROR(mark(2));
  for (int it = 0; it < options.niter; ++it) {
    SQKV_RETURN_IF_ERROR(run.Assign());
    SQKV_RETURN_IF_ERROR(run.Update(sort_temp_bytes));
  }
  SQKV_RETURN_IF_ERROR(run.Assign());
  SQKV_RETURN_IF_ERROR(mark(3));
  const Status done = run.Download(assign, stats != nullptr ? ev : nullptr, stats);
  if (!done.ok()) {
    assign->clear();
    return done;
  }
  if (stats != nullptr) stats->cublas = gemm->cublas();
  return Status::Ok();
}

KMeansFn GpuKMeansFn(const GpuKMeansOptions& gpu_options) {
  return [gpu_options](const float* x, int n, int d, int k, const KMeansOptions& options,
                       std::vector<int32_t>* assign) {
    return SphericalKMeans(x, n, d, k, options, gpu_options, assign);
  };
}

KMeansFn GpuOrCpuKMeansFn(const GpuKMeansOptions& gpu_options) {
  return [gpu_options](const float* x, int n, int d, int k, const KMeansOptions& options,
                       std::vector<int32_t>* assign) {
    const Status st = SphericalKMeans(x, n, d, k, options, gpu_options, assign);
    if (!st.IsUnavailable()) return st;
    return ::sqkv::SphericalKMeans(x, n, d, k, options, assign);
  };
}

}  // namespace sqkv::gpu
