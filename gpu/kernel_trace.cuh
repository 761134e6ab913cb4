// Device side of gpu/kernel_trace.h. A traced .cu file puts SQKV_TRACE_UNIT(name) at global scope
// (its own buffer pointer, set by KernelTraceSetBuffer) and stamps with SQKV_TRACE_START / _WAIT /
// _END(kernel); without SQKV_KERNEL_TRACE all of these expand to nothing.
#pragma once

#include "gpu/kernel_trace.h"

#ifdef SQKV_KERNEL_TRACE
#include <cuda_runtime.h>

namespace sqkv::gpu::trace_detail {
__device__ __forceinline__ unsigned long long Now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
}  // namespace sqkv::gpu::trace_detail

#define SQKV_TRACE_UNIT(name)                                                          \
  namespace sqkv_trace_unit_##name {                                                   \
  __device__ ::sqkv::gpu::TraceRecord* g_records;                                      \
  }                                                                                    \
  namespace sqkv_trace_unit { using namespace sqkv_trace_unit_##name; }                \
  void SqkvTraceSet_##name(void* p) {                                                  \
    cudaMemcpyToSymbol(sqkv_trace_unit_##name::g_records, &p, sizeof(p));              \
  }
#define SQKV_TRACE_STAMP_(k, field, op) SQKV_TRACE_STAMP_BY_(k, field, op, threadIdx.x == 0)
#define SQKV_TRACE_STAMP_BY_(k, field, op, stamper)                                          \
  do {                                                                                       \
    ::sqkv::gpu::TraceRecord* r_ = ::sqkv_trace_unit::g_records;                             \
    if ((stamper) && r_ != nullptr) {                                                        \
      op(reinterpret_cast<unsigned long long*>(&r_[static_cast<int>(k)].field),              \
         ::sqkv::gpu::trace_detail::Now());                                                  \
    }                                                                                        \
  } while (0)
#define SQKV_TRACE_START(k) SQKV_TRACE_STAMP_(k, first_start, atomicMin)
#define SQKV_TRACE_WAIT(k)                        \
  do {                                            \
    SQKV_TRACE_STAMP_(k, first_wait, atomicMin);  \
    SQKV_TRACE_STAMP_(k, last_wait, atomicMax);   \
  } while (0)
#define SQKV_TRACE_END(k) SQKV_TRACE_STAMP_(k, last_end, atomicMax)
// For kernels whose thread 0 leaves early (a warp-specialised block): `stamper` names the thread.
#define SQKV_TRACE_END_BY(k, stamper) SQKV_TRACE_STAMP_BY_(k, last_end, atomicMax, stamper)
#else
#define SQKV_TRACE_UNIT(name)
#define SQKV_TRACE_START(k) \
  do {                      \
  } while (0)
#define SQKV_TRACE_WAIT(k) \
  do {                     \
  } while (0)
#define SQKV_TRACE_END(k) \
  do {                    \
  } while (0)
#define SQKV_TRACE_END_BY(k, stamper) \
  do {                                \
  } while (0)
#endif
