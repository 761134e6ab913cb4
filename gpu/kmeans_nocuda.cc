// Built when SQKV_WITH_CUDA=OFF: there is never a device, so the GPU K-means is Unavailable and
// GpuOrCpuKMeansFn always runs the CPU path.
#include "gpu/kmeans.h"

namespace sqkv::gpu {

Status SphericalKMeans(const float*, int, int, int, const KMeansOptions&, std::vector<int32_t>*) {
  return Status::Unavailable("this build has no GPU support (built with SQKV_WITH_CUDA=OFF)");
}

Status SphericalKMeans(const float*, int, int, int, const KMeansOptions&, const GpuKMeansOptions&,
                       std::vector<int32_t>*, GpuKMeansStats*) {
  return Status::Unavailable("this build has no GPU support (built with SQKV_WITH_CUDA=OFF)");
}

KMeansFn GpuKMeansFn(const GpuKMeansOptions& gpu_options) {
  return [gpu_options](const float* x, int n, int d, int k, const KMeansOptions& options,
                       std::vector<int32_t>* assign) {
    return SphericalKMeans(x, n, d, k, options, gpu_options, assign);
  };
}

KMeansFn GpuOrCpuKMeansFn(const GpuKMeansOptions&) {
  return [](const float* x, int n, int d, int k, const KMeansOptions& options,
            std::vector<int32_t>* assign) {
    return ::sqkv::SphericalKMeans(x, n, d, k, options, assign);
  };
}

}  // namespace sqkv::gpu
