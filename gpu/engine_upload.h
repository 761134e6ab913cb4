// Host->device page uploads of the engine's paging (gpu/engine.h, "Uploads"): a gather kernel
// that reads page-locked host pages over PCIe, small device writes (page tables, page lists), and
// page-locked staging buffers. Internal to gpu/; plain C++, streams as void*.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/status.h"

namespace sqkv::gpu {

// One page for the gather kernel: `src` is a device-accessible address of page-locked host memory
// (16-byte aligned), copied to pool + dst_offset.
struct PageGather {
  const void* src = nullptr;
  uint64_t dst_offset = 0;  // bytes from the start of the pool
};

// One 32-bit device write.
struct DeviceWrite {
  int32_t* dst = nullptr;
  int32_t value = 0;
  int32_t pad = 0;
};

// Enqueues one kernel: pages[i] (n_pages of page_bytes each, a multiple of 16) gathered into the
// pool, then writes[j] (n_writes) applied. pages and writes must be device-accessible (device
// memory or mapped page-locked host memory) until the kernel has run. No-op when both are empty.
Status LaunchPageGather(const PageGather* pages, int n_pages, size_t page_bytes, void* pool,
                        const DeviceWrite* writes, int n_writes, void* stream);

// Page-locked host memory, mapped for the device (cudaHostAlloc, mapped and portable). Grows only.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  ~PinnedBuffer();
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  // Ensures at least `bytes`; contents are lost when it grows.
  Status Reserve(size_t bytes);
  void* host() const { return host_; }
  void* device() const { return device_; }
  size_t size() const { return bytes_; }

 private:
  void* host_ = nullptr;
  void* device_ = nullptr;
  size_t bytes_ = 0;
};

// Device-accessible address of `p` when it is page-locked host memory mapped for the device, null
// otherwise (pageable memory, device memory). One runtime query (cudaPointerGetAttributes).
const void* DeviceAddressOf(const void* p);

}  // namespace sqkv::gpu
