#include "index/kmeans.h"

#include <faiss/Clustering.h>
#include <faiss/IndexFlat.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <random>
#include <string>

#include "common/dot.h"

namespace sqkv {
namespace {

// Below this much work per Lloyd iteration (n * k * d multiply-adds), FAISS runs on the calling
// thread alone: OpenMP's fork/join and spinning workers cost more than they save on small heads,
// and on a busy machine they cost a lot (several x the serial time, measured on 2 cores).
constexpr double kParallelWorkPerIteration = 1 << 30;

// Sets the calling thread's OpenMP team size (an ICV of this thread only) for a scope.
class ScopedOmpThreads {
 public:
  explicit ScopedOmpThreads(int threads) : saved_(omp_get_max_threads()) {
    omp_set_num_threads(threads);
  }
  ~ScopedOmpThreads() { omp_set_num_threads(saved_); }
  ScopedOmpThreads(const ScopedOmpThreads&) = delete;
  ScopedOmpThreads& operator=(const ScopedOmpThreads&) = delete;

 private:
  int saved_;
};

// FAISS's seed is an int; fold the 64-bit seed into its non-negative range.
int FaissSeed(uint64_t seed) { return static_cast<int>((seed ^ (seed >> 32)) & 0x7fffffffu); }

// x: (n, d); out: (n, d), each row scaled to unit norm (rows of norm zero stay zero).
void NormaliseRows(const float* x, int n, int d, std::vector<float>* out) {
  out->resize(static_cast<size_t>(n) * d);
  for (int i = 0; i < n; ++i) {
    const float* row = x + static_cast<size_t>(i) * d;
    float* dst = out->data() + static_cast<size_t>(i) * d;
    double norm2 = 0;
    for (int c = 0; c < d; ++c) norm2 += static_cast<double>(row[c]) * row[c];
    const double inv = norm2 > 0 ? 1.0 / std::sqrt(norm2) : 0.0;
    for (int c = 0; c < d; ++c) dst[c] = static_cast<float>(row[c] * inv);
  }
}

// A uniform double in [0, 1) from 53 random bits: the same sequence on every standard library
// (std::uniform_real_distribution is implementation-defined).
double Uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

// k-means++ seeding on unit rows: each next centroid is a row drawn with probability
// proportional to its squared distance to the nearest centroid chosen so far. Random initial
// centroids often put two seeds in one well-separated group and none in another, a local optimum
// Lloyd iterations cannot leave. unit: (n, d) rows of norm 1 or 0; centroids: (k, d).
void PlusPlusSeeds(const std::vector<float>& unit, int n, int d, int k, uint64_t seed,
                   std::vector<float>* centroids) {
  std::mt19937_64 rng(seed);
  centroids->resize(static_cast<size_t>(k) * d);
  std::vector<double> norm2(n), dist(n);
  for (int i = 0; i < n; ++i) {
    const float* x = unit.data() + static_cast<size_t>(i) * d;
    norm2[i] = Dot(x, x, static_cast<size_t>(d));
  }
  int pick = static_cast<int>(Uniform01(rng) * n);
  for (int j = 0; j < k; ++j) {
    const float* c = unit.data() + static_cast<size_t>(pick) * d;
    std::copy(c, c + d, centroids->data() + static_cast<size_t>(j) * d);
    double total = 0;
    for (int i = 0; i < n; ++i) {
      // |x - c|^2 = |x|^2 + |c|^2 - 2 x.c, rounding kept from going negative.
      const float* x = unit.data() + static_cast<size_t>(i) * d;
      const double dot = Dot(x, c, static_cast<size_t>(d));
      const double d2 = std::max(0.0, norm2[i] + norm2[pick] - 2.0 * dot);
      dist[i] = j == 0 ? d2 : std::min(dist[i], d2);
      total += dist[i];
    }
    if (j + 1 == k) break;
    if (!(total > 0)) {  // every row sits on a centroid: any row will do (duplicates)
      pick = static_cast<int>(Uniform01(rng) * n);
      continue;
    }
    const double r = Uniform01(rng) * total;
    double acc = 0;
    pick = n - 1;
    for (int i = 0; i < n; ++i) {
      acc += dist[i];
      if (acc > r) {
        pick = i;
        break;
      }
    }
  }
}

}  // namespace

Status SphericalKMeans(const float* x, int n, int d, int k, const KMeansOptions& options,
                       std::vector<int32_t>* assign) {
  if (x == nullptr || assign == nullptr) return Status::InvalidArgument("kmeans: null buffer");
  if (n < 1 || d < 1) {
    return Status::InvalidArgument("kmeans: shape (" + std::to_string(n) + ", " +
                                   std::to_string(d) + ") has no rows or no columns");
  }
  if (options.niter < 1) {
    return Status::InvalidArgument("kmeans: niter " + std::to_string(options.niter) + " < 1");
  }
  const size_t count = static_cast<size_t>(n) * d;
  for (size_t i = 0; i < count; ++i) {
    if (!std::isfinite(x[i])) {
      return Status::InvalidArgument("kmeans: x[" + std::to_string(i / d) + ", " +
                                     std::to_string(i % d) + "] is not finite");
    }
  }
  k = std::clamp(k, 1, n);
  assign->assign(n, 0);
  if (k == 1) return Status::Ok();

  std::vector<float> unit;
  NormaliseRows(x, n, d, &unit);

  const double work = static_cast<double>(n) * k * d;
  const ScopedOmpThreads threads(work < kParallelWorkPerIteration ? 1 : omp_get_max_threads());
  try {
    faiss::ClusteringParameters cp;
    cp.niter = options.niter;
    cp.seed = FaissSeed(options.seed);
    cp.spherical = true;
    cp.verbose = false;
    // Never subsample the training set, and silence the "too few points" warning: a few points
    // per centroid is the point of this index.
    cp.min_points_per_centroid = 1;
    cp.max_points_per_centroid = n;
    faiss::Clustering clustering(d, k, cp);
    // Centroids present on input are FAISS's initialisation.
    PlusPlusSeeds(unit, n, d, k, options.seed, &clustering.centroids);
    faiss::IndexFlatIP train_index(d);
    clustering.train(n, unit.data(), train_index);

    faiss::IndexFlatIP assign_index(d);
    assign_index.add(k, clustering.centroids.data());
    std::vector<float> sim(n);
    std::vector<faiss::Index::idx_t> label(n);
    assign_index.search(n, unit.data(), 1, sim.data(), label.data());
    for (int i = 0; i < n; ++i) {
      // A row FAISS could not place (never expected) goes to cluster 0 rather than out of range.
      const auto l = label[i];
      (*assign)[i] = (l >= 0 && l < k) ? static_cast<int32_t>(l) : 0;
    }
  } catch (const std::exception& e) {
    return Status::Internal("kmeans: faiss failed clustering " + std::to_string(n) + " x " +
                            std::to_string(d) + " into " + std::to_string(k) + ": " + e.what());
  }
  return Status::Ok();
}

}  // namespace sqkv
