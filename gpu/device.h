// Whether a CUDA device can be used. Plain C++: no CUDA types.
#pragma once

#include <cstddef>
#include <string>

#include "common/status.h"

namespace sqkv::gpu {

// True when this build has CUDA and a device answers. Cheap after the first call.
bool DevicePresent();

// How many CUDA devices answer (EngineOptions::device takes 0 .. DeviceCount() - 1); 0 without.
int DeviceCount();

// True when the current device has compute capability 9.0 (H100, H200), which runs the kernels
// this build has for sm_90a (wgmma) only.
bool CurrentDeviceIsSm90();

// The current device's multiprocessor count; 0 when no device answers. Cheap after the first call.
int CurrentDeviceSmCount();

// "NVIDIA H200, 132 SMs, 139.8 GiB" or Unavailable with the reason (no CUDA build, no device).
Result<std::string> DeviceDescription(int device = 0);

// Page-locked host memory (cudaHostAlloc), so host→device copies run at full speed and
// asynchronously. Null without a device or on failure; free with FreePinnedHost.
void* AllocPinnedHost(size_t bytes);
void FreePinnedHost(void* p);

}  // namespace sqkv::gpu
