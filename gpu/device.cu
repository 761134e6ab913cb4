#include <cuda_runtime.h>

#include <atomic>
#include <cstdio>
#include <mutex>

#include "gpu/device.h"

namespace sqkv::gpu {

bool DevicePresent() {
  static const bool present = [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();  // clear the sticky "no device" error
      return false;
    }
    return n > 0;
  }();
  return present;
}

bool CurrentDeviceIsSm90() {
  // Asked on every lookup and attention launch: each device's answer is read once.
  constexpr int kCached = 64;
  static std::atomic<int8_t> cached[kCached] = {};  // 0 unknown, 1 yes, 2 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (dev >= 0 && dev < kCached) {
    const int8_t known = cached[dev].load(std::memory_order_relaxed);
    if (known != 0) return known == 1;
  }
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  const bool sm90 = major == 9 && minor == 0;
  if (dev >= 0 && dev < kCached) cached[dev].store(sm90 ? 1 : 2, std::memory_order_relaxed);
  return sm90;
}

Result<std::string> DeviceDescription(int device) {
  if (!DevicePresent()) return Status::Unavailable("no CUDA device found");
  cudaDeviceProp prop{};
  cudaError_t err = cudaGetDeviceProperties(&prop, device);
  if (err != cudaSuccess) return Status::Unavailable(cudaGetErrorString(err));
  char buf[256];
  std::snprintf(buf, sizeof(buf), "%s, %d SMs, %.1f GiB", prop.name, prop.multiProcessorCount,
                static_cast<double>(prop.totalGlobalMem) / (1ull << 30));
  return std::string(buf);
}

void* AllocPinnedHost(size_t bytes) {
  if (!DevicePresent()) return nullptr;
  void* p = nullptr;
  if (cudaHostAlloc(&p, bytes, cudaHostAllocPortable) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  return p;
}

void FreePinnedHost(void* p) {
  if (p != nullptr) cudaFreeHost(p);
}

}  // namespace sqkv::gpu
