// Device helpers shared by the paged-attention kernels: 16-byte asynchronous copies, ldmatrix,
// the m16n8k16 tensor-core product, conversions, the shared-memory swizzle and the programmatic
// dependent launch controls. Internal to gpu/.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sqkv::gpu::detail {

inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float NegInf() { return __int_as_float(0xff800000); }

// The empty online-softmax state of the mma.sync kernels' accumulators: MT m16 tiles of rows, the
// thread's two rows a tile (max -inf, normaliser 0) and its m16n8 output fragments (0).
template <int MT, int NT>
__device__ __forceinline__ void ZeroSoftmaxState(float (&o)[MT][NT][4], float (&m)[MT][2],
                                                 float (&l)[MT][2]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      m[mt][h] = NegInf();
      l[mt][h] = 0.f;
    }
#pragma unroll
    for (int dn = 0; dn < NT; ++dn) {
#pragma unroll
      for (int j = 0; j < 4; ++j) o[mt][dn][j] = 0.f;
    }
  }
}

// 2^x on the special-function unit (about 2 ulp; -inf gives +0, denormal results flush to 0).
__device__ __forceinline__ float FastExp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Alignment of the kernels' dynamic shared memory (extern __shared__ __align__(kSmemAlign); the
// wgmma kernels round their base up to 1,024 bytes by hand): the dynamic area comes after the
// kernel's static __shared__ variables, at their size rounded up to this. Measured on the H200
// (bench/NOTES-gpu-attention.md, "Dynamic shared memory off a 128-byte boundary"): the decode
// kernel, main loop unchanged, streams 14% slower with its dynamic area 16 bytes off a 128-byte
// boundary, which one static int used to cause.
inline constexpr int kSmemAlign = 128;

// Shared-memory address as the 32-bit value the PTX instructions take.
__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies 16 bytes global → shared, bypassing L1. src_bytes 0 reads nothing and writes zeros.
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most `n` committed groups of this thread are still in flight.
template <int n>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(n) : "memory");
}

// Programmatic dependent launch (sm_90). Wait: blocks until the grid this one depends on has
// finished and its writes are visible (a no-op when launched without the attribute).
// Trigger: lets the dependent grid be scheduled once every block has triggered or exited.
__device__ __forceinline__ void GridDependencyWait() {
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
}
__device__ __forceinline__ void GridDependencyTrigger() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

// Host: launches `kernel`, with the programmatic-stream-serialization attribute when `dependent`,
// so it may start while the kernel before it on the stream drains (it must GridDependencyWait
// before reading what that kernel writes).
template <typename... Args>
inline cudaError_t LaunchMaybeDependent(void (*kernel)(Args...), dim3 grid, dim3 block,
                                        size_t smem, cudaStream_t stream, bool dependent,
                                        Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = dependent ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

// Four 8×8 matrices of 16-bit elements; lane l gives the row address of matrix l / 8.
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// The 16-bit storage types and what the kernels need of them.
template <typename T>
struct Half16;
template <>
struct Half16<__nv_bfloat16> {
  __device__ __forceinline__ static uint32_t Pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  // c += a · b; a: 16×16 row-major fragment, b: 16×8 column fragment, c: 16×8 float32.
  __device__ __forceinline__ static void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct Half16<__half> {
  __device__ __forceinline__ static uint32_t Pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ __forceinline__ static void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Rows of `chunks` 16-byte chunks in shared memory; chunk c of row r sits at c ^ (r & 7), so the
// 8 rows an ldmatrix reads hit 8 different bank groups. Returns the chunk index.
template <int chunks>
__device__ __forceinline__ int Swizzle(int row, int chunk) {
  static_assert(chunks >= 8 && chunks % 8 == 0, "swizzle needs rows of >= 128 bytes");
  return row * chunks + (chunk ^ (row & 7));
}

// ldmatrix row addresses in a swizzled tile without per-use swizzle arithmetic. Every ldmatrix
// pattern here has the lane read row `lane_row + 8·i` (so row & 7 == lane & 7) and chunk
// 2·pair + b of it; then the swizzled chunk is (2·pair) ^ (b ^ (lane & 7)), whose low 3 bits
// depend on pair % 4 only. The four per-lane offsets are computed once; the rest of the address
// is a compile-time immediate when pair and the row offset are.
template <int chunks>
struct LdmAddr {
  uint32_t row_bytes;  // lane_row · row pitch
  uint32_t off[4];     // byte offset of the swizzled chunk for pair % 4
  __device__ __forceinline__ LdmAddr(int lane_row, int b, int lane) {
    row_bytes = static_cast<uint32_t>(lane_row) * chunks * 16;
    const int y = b ^ (lane & 7);
#pragma unroll
    for (int k = 0; k < 4; ++k) off[k] = static_cast<uint32_t>((2 * k) ^ y) * 16;
  }
  // Address of rows row0 + lane_row, chunk pair `pair`, in the tile at `tile`.
  __device__ __forceinline__ uint32_t At(uint32_t tile, int row0, int pair) const {
    return tile + row_bytes + static_cast<uint32_t>(row0 * chunks * 16 + (pair / 4) * 128) +
           off[pair % 4];
  }
};

// Packs 8 floats (a then b) as 8 16-bit values.
template <typename T>
__device__ __forceinline__ uint4 Convert8(const float4& a, const float4& b) {
  uint4 r;
  r.x = Half16<T>::Pack(a.x, a.y);
  r.y = Half16<T>::Pack(a.z, a.w);
  r.z = Half16<T>::Pack(b.x, b.y);
  r.w = Half16<T>::Pack(b.z, b.w);
  return r;
}

// Loads 8 consecutive floats (16-byte aligned) and packs them as 8 16-bit values.
template <typename T>
__device__ __forceinline__ uint4 LoadConvert8(const float* src) {
  return Convert8<T>(*reinterpret_cast<const float4*>(src),
                     *reinterpret_cast<const float4*>(src + 4));
}

__device__ __forceinline__ float QuadMax(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float QuadSum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

}  // namespace sqkv::gpu::detail
