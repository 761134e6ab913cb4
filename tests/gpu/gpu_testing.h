// What every GPU suite needs: skipping without a device, and the switch that runs the lookup and
// attention suites on the mma.sync kernels where the device would take the wgmma ones.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "gpu/device.h"

#define SKIP_WITHOUT_DEVICE() \
  if (!::sqkv::gpu::DevicePresent()) GTEST_SKIP() << "no CUDA device"

namespace sqkv::testing {

// SQKV_TEST_MMA_SYNC=1: large lookup segments and prefill attention run their mma.sync kernels
// even on a compute capability 9.0 device (LookupArgs::wgmma, PagedAttentionArgs::wgmma), so one
// device covers both kernel families (the device scripts run the suites both ways).
inline bool MmaSyncKernels() {
  const char* v = std::getenv("SQKV_TEST_MMA_SYNC");
  return v != nullptr && std::string(v) == "1";
}

}  // namespace sqkv::testing
