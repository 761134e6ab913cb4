// Host side of gpu/kernel_trace.h.
#include <cuda_runtime.h>

#include "gpu/kernel_trace.h"

#ifdef SQKV_KERNEL_TRACE
void SqkvTraceSet_lookup_small(void* p);
void SqkvTraceSet_lookup_staged(void* p);
void SqkvTraceSet_decode(void* p);
void SqkvTraceSet_merge(void* p);
void SqkvTraceSet_lookup_mma(void* p);
void SqkvTraceSet_lookup_wgmma(void* p);
void SqkvTraceSet_prefill(void* p);
void SqkvTraceSet_prefill_wgmma(void* p);
#endif

namespace sqkv::gpu {
namespace {
__global__ void EmptyKernel() {}
}  // namespace

bool KernelTraceCompiled() {
#ifdef SQKV_KERNEL_TRACE
  return true;
#else
  return false;
#endif
}

bool KernelTraceSetBuffer(TraceRecord* device_records) {
#ifdef SQKV_KERNEL_TRACE
  SqkvTraceSet_lookup_small(device_records);
  SqkvTraceSet_lookup_staged(device_records);
  SqkvTraceSet_decode(device_records);
  SqkvTraceSet_merge(device_records);
  SqkvTraceSet_lookup_mma(device_records);
  SqkvTraceSet_lookup_wgmma(device_records);
  SqkvTraceSet_prefill(device_records);
  SqkvTraceSet_prefill_wgmma(device_records);
  return cudaGetLastError() == cudaSuccess;
#else
  (void)device_records;
  return false;
#endif
}

bool KernelTraceEmptyLaunch(void* stream) {
  EmptyKernel<<<1, 32, 0, static_cast<cudaStream_t>(stream)>>>();
  return cudaGetLastError() == cudaSuccess;
}

}  // namespace sqkv::gpu
