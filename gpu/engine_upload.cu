// Host->device page uploads (see gpu/engine_upload.h).
#include "gpu/engine_upload.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <string>

namespace sqkv::gpu {
namespace {

// 128 threads x 4 loads of 16 bytes: one 8 KiB page (bf16, 16 tokens, head_dim 128) per block and
// iteration, every load issued before the first store so that PCIe reads overlap.
constexpr int kGatherThreads = 128;
constexpr int kGatherUnroll = 4;
// Blocks that apply the device writes (grid-stride beyond that).
constexpr int kMaxWriteBlocks = 64;

__global__ void __launch_bounds__(kGatherThreads)
    GatherKernel(const PageGather* pages, int n_pages, int vecs_per_page, uint8_t* pool,
                 const DeviceWrite* writes, int n_writes) {
  const int b = blockIdx.x;
  if (b < n_pages) {
    const PageGather g = pages[b];
    const uint4* src = static_cast<const uint4*>(g.src);
    uint4* dst = reinterpret_cast<uint4*>(pool + g.dst_offset);
    for (int base = 0; base < vecs_per_page; base += kGatherThreads * kGatherUnroll) {
      uint4 v[kGatherUnroll];
#pragma unroll
      for (int u = 0; u < kGatherUnroll; ++u) {
        const int i = base + u * kGatherThreads + static_cast<int>(threadIdx.x);
        if (i < vecs_per_page) v[u] = src[i];
      }
#pragma unroll
      for (int u = 0; u < kGatherUnroll; ++u) {
        const int i = base + u * kGatherThreads + static_cast<int>(threadIdx.x);
        if (i < vecs_per_page) dst[i] = v[u];
      }
    }
    return;
  }
  const int blocks = static_cast<int>(gridDim.x) - n_pages;
  for (int i = (b - n_pages) * kGatherThreads + static_cast<int>(threadIdx.x); i < n_writes;
       i += blocks * kGatherThreads) {
    const DeviceWrite w = writes[i];
    *w.dst = w.value;
  }
}

Status FromCuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  cudaGetLastError();
  return Status::Internal(std::string(what) + ": " + cudaGetErrorString(err));
}

}  // namespace

Status LaunchPageGather(const PageGather* pages, int n_pages, size_t page_bytes, void* pool,
                        const DeviceWrite* writes, int n_writes, void* stream) {
  if (n_pages < 0 || n_writes < 0) return Status::InvalidArgument("negative gather counts");
  if (n_pages == 0 && n_writes == 0) return Status::Ok();
  if (n_pages > 0 && (page_bytes == 0 || page_bytes % 16 != 0)) {
    return Status::InvalidArgument("page_bytes " + std::to_string(page_bytes) +
                                   " is not a positive multiple of 16");
  }
  const int write_blocks =
      std::min(kMaxWriteBlocks, (n_writes + kGatherThreads - 1) / kGatherThreads);
  const int vecs = static_cast<int>(page_bytes / 16);
  GatherKernel<<<n_pages + write_blocks, kGatherThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      pages, n_pages, vecs, static_cast<uint8_t*>(pool), writes, n_writes);
  return FromCuda(cudaGetLastError(), "page gather launch");
}

PinnedBuffer::~PinnedBuffer() {
  if (host_ != nullptr) cudaFreeHost(host_);
}

Status PinnedBuffer::Reserve(size_t bytes) {
  if (bytes <= bytes_) return Status::Ok();
  const size_t want = std::max(bytes, 2 * bytes_);
  if (host_ != nullptr) cudaFreeHost(host_);
  host_ = device_ = nullptr;
  bytes_ = 0;
  void* p = nullptr;
  cudaError_t err = cudaHostAlloc(&p, want, cudaHostAllocMapped | cudaHostAllocPortable);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return Status::Unavailable("pinned staging of " + std::to_string(want) +
                               " bytes: " + cudaGetErrorString(err));
  }
  void* d = nullptr;
  err = cudaHostGetDevicePointer(&d, p, 0);
  if (err != cudaSuccess) {
    cudaFreeHost(p);
    return FromCuda(err, "cudaHostGetDevicePointer");
  }
  host_ = p;
  device_ = d;
  bytes_ = want;
  return Status::Ok();
}

const void* DeviceAddressOf(const void* p) {
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();  // older runtimes answer an error for pageable memory
    return nullptr;
  }
  if (a.type == cudaMemoryTypeHost) return a.devicePointer;
  return nullptr;
}

}  // namespace sqkv::gpu
