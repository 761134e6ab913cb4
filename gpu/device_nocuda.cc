// Built when SQKV_WITH_CUDA=OFF: there is never a device.
#include "gpu/device.h"

namespace sqkv::gpu {

bool DevicePresent() { return false; }

int DeviceCount() { return 0; }

bool CurrentDeviceIsSm90() { return false; }

int CurrentDeviceSmCount() { return 0; }

Result<std::string> DeviceDescription(int) {
  return Status::Unavailable("this build has no GPU support (built with SQKV_WITH_CUDA=OFF)");
}

void* AllocPinnedHost(size_t) { return nullptr; }
void FreePinnedHost(void*) {}

}  // namespace sqkv::gpu
