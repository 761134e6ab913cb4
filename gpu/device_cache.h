// A per-device cache of facts the driver answers that do not change (attributes, a kernel's
// raised shared-memory limit): asked once per device, then read without a lock. Internal to gpu/:
// host code of the CUDA build.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

namespace sqkv::gpu::detail {

// The first kCachedDevices ordinals are cached, each slot holding the value + 1 (0: not asked
// yet). One static DeviceCache per fact.
inline constexpr int kCachedDevices = 64;
using DeviceCache = std::atomic<int>[kCachedDevices];

// query(device) for the current device: a value >= 0 is cached, a negative one (the driver did
// not answer) is returned and asked again next time; -1 when no device is current. Two threads
// may both ask the first time, so query must be idempotent (the cached value is released with
// the query's effects, such as a raised kernel attribute).
template <class Query>
int PerDevice(DeviceCache& cache, const Query& query) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  const bool cacheable = dev >= 0 && dev < kCachedDevices;
  if (cacheable) {
    const int known = cache[dev].load(std::memory_order_acquire);
    if (known != 0) return known - 1;
  }
  const int value = query(dev);
  if (cacheable && value >= 0) cache[dev].store(value + 1, std::memory_order_release);
  return value;
}

}  // namespace sqkv::gpu::detail
