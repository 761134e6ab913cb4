#include <cuda_runtime.h>

#include <string>

#include "gpu/device_buffer.h"

namespace sqkv::gpu {
namespace {

Status FromCuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  return Status::Internal(std::string(what) + ": " + cudaGetErrorString(err));
}

// cudaMemset, and cudaMemcpy from pageable host memory, may return before the device has
// written the destination; they run on the legacy default stream, which does not order work on
// non-blocking streams (Stream::Create). The copies and fills here are documented synchronous, so
// they wait for the device before returning: without this, a kernel launched next on a
// non-blocking stream could run before the upload or the poison fill landed, or under it (seen
// on the H200 as rare test failures, more often with other processes time-slicing the GPU).
Status Landed(const char* what) {
  return FromCuda(cudaDeviceSynchronize(), what);
}

}  // namespace

DeviceBuffer::~DeviceBuffer() { Reset(); }

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    Reset();
    ptr_ = o.ptr_;
    bytes_ = o.bytes_;
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

Status DeviceBuffer::Allocate(size_t bytes) {
  Reset();
  if (bytes == 0) return Status::Ok();
  cudaError_t err = cudaMalloc(&ptr_, bytes);
  if (err != cudaSuccess) {
    ptr_ = nullptr;
    cudaGetLastError();  // an out-of-memory must not be reported again by the next launch
    return Status::Unavailable("cudaMalloc of " + std::to_string(bytes) +
                               " bytes: " + cudaGetErrorString(err));
  }
  bytes_ = bytes;
  return Status::Ok();
}

void DeviceBuffer::Reset() {
  if (ptr_ != nullptr) cudaFree(ptr_);
  ptr_ = nullptr;
  bytes_ = 0;
}

Status DeviceBuffer::CopyFromHost(const void* src, size_t bytes, size_t offset) {
  if (offset + bytes > bytes_) return Status::InvalidArgument("copy past the end of a device buffer");
  if (bytes == 0) return Status::Ok();
  SQKV_RETURN_IF_ERROR(FromCuda(
      cudaMemcpy(static_cast<char*>(ptr_) + offset, src, bytes, cudaMemcpyHostToDevice),
      "cudaMemcpy H2D"));
  return Landed("cudaMemcpy H2D");
}

Status DeviceBuffer::CopyToHost(void* dst, size_t bytes, size_t offset) const {
  if (offset + bytes > bytes_) return Status::InvalidArgument("copy past the end of a device buffer");
  if (bytes == 0) return Status::Ok();
  return FromCuda(cudaMemcpy(dst, static_cast<char*>(ptr_) + offset, bytes, cudaMemcpyDeviceToHost),
                  "cudaMemcpy D2H");
}

Status DeviceBuffer::Fill(int value) {
  if (bytes_ == 0) return Status::Ok();
  SQKV_RETURN_IF_ERROR(FromCuda(cudaMemset(ptr_, value, bytes_), "cudaMemset"));
  return Landed("cudaMemset");
}

Status Synchronize() { return FromCuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }

Status Stream::Create(Stream* out) {
  cudaStream_t s = nullptr;
  SQKV_RETURN_IF_ERROR(FromCuda(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"));
  *out = Stream();
  out->s_ = s;
  return Status::Ok();
}

Stream::~Stream() {
  if (s_ != nullptr) cudaStreamDestroy(static_cast<cudaStream_t>(s_));
}

Stream& Stream::operator=(Stream&& o) noexcept {
  if (this != &o) {
    if (s_ != nullptr) cudaStreamDestroy(static_cast<cudaStream_t>(s_));
    s_ = o.s_;
    o.s_ = nullptr;
  }
  return *this;
}

Status Stream::Sync() const {
  return FromCuda(cudaStreamSynchronize(static_cast<cudaStream_t>(s_)), "cudaStreamSynchronize");
}

}  // namespace sqkv::gpu
