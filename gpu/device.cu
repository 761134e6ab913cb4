#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>

#include "gpu/device.h"
#include "gpu/device_cache.h"

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

int DeviceCount() {
  int n = 0;
  if (!DevicePresent() || cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

namespace {

using detail::DeviceCache;
using detail::PerDevice;

int Attribute(cudaDeviceAttr attr, int dev) {
  int v = 0;
  if (cudaDeviceGetAttribute(&v, attr, dev) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return v;
}

}  // namespace

bool CurrentDeviceIsSm90() {
  static DeviceCache cache;  // asked on every lookup and attention launch
  return PerDevice(cache, [](int dev) {
           const int major = Attribute(cudaDevAttrComputeCapabilityMajor, dev);
           const int minor = Attribute(cudaDevAttrComputeCapabilityMinor, dev);
           if (major < 0 || minor < 0) return -1;
           return major == 9 && minor == 0 ? 1 : 0;
         }) == 1;
}

int CurrentDeviceSmCount() {
  static DeviceCache cache;  // asked when planning lookups and attention, and per decode lookup
  return std::max(
      0, PerDevice(cache, [](int dev) { return Attribute(cudaDevAttrMultiProcessorCount, dev); }));
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
