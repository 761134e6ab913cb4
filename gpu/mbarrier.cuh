// Shared-memory barriers (mbarrier) and the bulk copy engine (cp.async.bulk), for producer /
// consumer pipelines among the threads of a block. mbarrier needs sm_80, the bulk copy and the
// transaction counts sm_90 (plain: no sm_90a feature). Internal to gpu/.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sqkv::gpu::detail {

// Shared-memory barriers (mbarrier) for a producer / consumer pipeline among the threads of a
// block. Init: one thread, before a __syncthreads; `count` arrivals complete a phase.
__device__ __forceinline__ void MbarInit(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// One arrival of this thread.
__device__ __forceinline__ void MbarArrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar)
               : "memory");
}
// One arrival of this thread once all its earlier cp.async copies have landed (counted in the
// barrier's init count, not added to it).
__device__ __forceinline__ void MbarArriveCpAsync(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the phase of parity `parity` (0 for the first phase, 1 for the second, ...) is done.
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// Bulk copies complete on an mbarrier as transactions: the phase completes once its arrivals are
// in and as many bytes as were announced (expect_tx) have landed. One arrival of this thread that
// also announces `bytes`. sm_90.
__device__ __forceinline__ void MbarArriveExpectTx(uint32_t bar, uint32_t bytes) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n.reg .b64 state;\nmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(
          bar),
      "r"(bytes)
      : "memory");
#else
  __trap();
#endif
}

// `bytes` (a multiple of 16; both addresses 16-byte aligned) from global memory to this block's
// shared memory at `dst` by the copy engine, completing as transactions on `bar`. sm_90.
__device__ __forceinline__ void BulkCopyToShared(uint32_t dst, const void* src, uint32_t bytes,
                                                 uint32_t bar) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
#else
  __trap();
#endif
}

// Makes this thread's mbarrier initialisations visible to the copy engine (before the barrier
// that publishes them to the block).
__device__ __forceinline__ void FenceMbarInit() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

}  // namespace sqkv::gpu::detail
