// Owning device allocations and copies for host code (tests, engine): plain C++, no CUDA types.
#pragma once

#include <cstddef>
#include <vector>

#include "common/status.h"

namespace sqkv::gpu {

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) {
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  // Frees what is held, then allocates `bytes` (cudaMalloc). Zero bytes holds nothing.
  Status Allocate(size_t bytes);
  void Reset();
  // Synchronous copies; offset and sizes in bytes. CopyFromHost and Fill return once the device
  // holds the bytes, so work on any stream launched afterwards sees them.
  Status CopyFromHost(const void* src, size_t bytes, size_t offset = 0);
  Status CopyToHost(void* dst, size_t bytes, size_t offset = 0) const;
  // Fills every byte with `value` (e.g. 0xff poisons floats with NaN).
  Status Fill(int value);

  void* get() const { return ptr_; }
  template <typename T>
  T* as() const { return static_cast<T*>(ptr_); }
  size_t size() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Host vector → new device buffer.
template <typename T>
Status Upload(const std::vector<T>& host, DeviceBuffer* out) {
  SQKV_RETURN_IF_ERROR(out->Allocate(host.size() * sizeof(T)));
  return out->CopyFromHost(host.data(), host.size() * sizeof(T));
}

// Waits for all work on the device; returns the first asynchronous error, if any.
Status Synchronize();

// A CUDA stream owned by host code (void* is a cudaStream_t).
class Stream {
 public:
  static Status Create(Stream* out);
  ~Stream();
  Stream() = default;
  Stream(Stream&& o) noexcept : s_(o.s_) { o.s_ = nullptr; }
  Stream& operator=(Stream&& o) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  void* get() const { return s_; }
  Status Sync() const;

 private:
  void* s_ = nullptr;
};

}  // namespace sqkv::gpu
