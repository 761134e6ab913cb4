// Hopper warpgroup matrix products (wgmma, sm_90a only): shared-memory matrix descriptors for
// the 128-byte swizzled layout, the fence / commit / wait controls, and m64nNk16 products with
// 16-bit operands (binary16 or bfloat16) and float32 accumulators. Internal to gpu/; include only
// from files built for sm_90a (the *_sm90a.cu files, see gpu/CMakeLists.txt).
//
// Layout the descriptors describe ("K-major, 128-byte swizzle"): a tile of R rows × 64 16-bit
// elements is R rows of 128 bytes, 1,024-byte aligned; the 16-byte chunk c of row r sits at chunk
// c ^ (r % 8) of that row (Sw128Offset). A row of 128 elements is two such panels, the second
// R × 128 bytes after the first (Sw128TileOffset). Step ks of 16 elements starts at panel ks / 4,
// byte 32 · (ks % 4) (Sw128KStep, Sw128Desc).
//
// Accumulator layout of m64nN (float32, N / 2 registers per thread): warp w of the warpgroup holds
// rows 16w + g and 16w + g + 8 (g = lane / 4); register 4j + 2h + c is row 16w + g + 8h, column
// 8j + 2 (lane % 4) + c. A from registers (the RS form) takes the mma.sync m16n8k16 A fragment of
// the warp's 16 rows.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "gpu/mbarrier.cuh"
#include "gpu/paged_attention_common.cuh"  // LdMatrixX4

namespace sqkv::gpu::detail {

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` in a 128-byte swizzled panel.
__device__ __forceinline__ uint32_t Sw128Offset(int row, int chunk) {
  return static_cast<uint32_t>(row * 128 + ((chunk ^ (row & 7)) << 4));
}

// Byte offset of 16-byte chunk `chunk` (0..15) of row `row` in a tile of R rows of 128 16-bit
// elements (two panels, the second R × 128 bytes after the first).
template <int R>
__device__ __forceinline__ uint32_t Sw128TileOffset(int row, int chunk) {
  return (chunk >> 3) * (R * 128) + Sw128Offset(row, chunk & 7);
}

// Byte offset of k-step `ks` (16 elements) in a K-major tile of `rows` rows: panel ks / 4, byte
// 32 · (ks % 4) of its rows.
__device__ __forceinline__ uint32_t Sw128KStep(int rows, int ks) {
  return static_cast<uint32_t>((ks >> 2) * rows * 128 + (ks & 3) * 32);
}

// Descriptor of the k-step `ks` (16 elements) of a K-major, 128-byte swizzled tile of `rows` rows
// at shared address `tile` (1,024-byte aligned). Fields: start address >> 4 (bits 0-13), leading
// byte offset >> 4 (16-29; unused by this layout, 1 by convention), stride byte offset >> 4
// (32-45: 1,024 bytes between groups of 8 rows), swizzle mode (62-63: 1 = 128 bytes).
__device__ __forceinline__ uint64_t Sw128Desc(uint32_t tile, int rows, int ks) {
  const uint32_t addr = tile + Sw128KStep(rows, ks);
  uint64_t desc = (addr & 0x3FFFFu) >> 4;
  desc |= uint64_t{1} << 16;
  desc |= uint64_t{1024 >> 4} << 32;
  desc |= uint64_t{1} << 62;
  return desc;
}

// Descriptor of an MN-major (transposed) 16-bit operand in the same storage: R rows along K of
// 64-element, 128-byte swizzled panels along MN, `panel_bytes` apart (R × 128), at shared address
// `tile` (1,024-byte aligned; k-steps of 16 rows start 2,048 bytes apart). Leading byte offset:
// from one 64-element panel to the next along MN; stride byte offset: 1,024 bytes between groups
// of 8 rows along K.
__device__ __forceinline__ uint64_t Sw128DescMN(uint32_t tile, uint32_t panel_bytes) {
  uint64_t desc = (tile & 0x3FFFFu) >> 4;
  desc |= uint64_t{(panel_bytes & 0x3FFFFu) >> 4} << 16;
  desc |= uint64_t{1024 >> 4} << 32;
  desc |= uint64_t{1} << 62;
  return desc;
}

// A descriptor moved on by `bytes` (a multiple of 16) within the same swizzled layout.
__device__ __forceinline__ uint64_t DescAdvance(uint64_t desc, uint32_t bytes) {
  return desc + (bytes >> 4);
}

// Orders this thread's register writes (A fragments, accumulators) before the wgmma that follow.
__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
// Closes the group of wgmma issued since the last commit.
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Waits until at most `n` committed groups are still running; their accumulators are then valid.
template <int n>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(n) : "memory");
}
// Moves this warpgroup's register budget per thread down / up to kRegs (a multiple of 8 in
// 24..256; every thread of the warpgroup calls it): what one warpgroup of a block gives up,
// another may take.
template <int kRegs>
__device__ __forceinline__ void SetMaxRegsDec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void SetMaxRegsInc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
// Makes this thread's ordinary (generic-proxy) shared-memory writes, cp.async ones included once
// waited for, visible to the async proxy (wgmma operands, bulk copies). Then a barrier.
__device__ __forceinline__ void FenceProxyAsyncShared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

#define SQKV_WG_D32                                                                             \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24," \
  "%25,%26,%27,%28,%29,%30,%31}"
#define SQKV_WG_D32_OPS(d)                                                                        \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),    \
      "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),  \
      "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),  \
      "+f"(d[29]), "+f"(d[30]), "+f"(d[31])

// The products take their 16-bit element type as T: __half (binary16) or __nv_bfloat16.

// The products with both operands in shared memory (K-major descriptors), FN<TYPE>(d, desc_a,
// desc_b, accumulate): d (m64 × N, float32) (+)= a · b^T; accumulate false: d = a · b^T. D and
// D_OPS: the accumulators' operand list (N / 2 of them, operands 0 .. N / 2 - 1); P, A, B: the
// operand numbers of accumulate, desc_a and desc_b after them.
#define SQKV_WG_SS(FN, N, D, D_OPS, P, A, B, TYPE, NAME)                                        \
  template <>                                                                                   \
  __device__ __forceinline__ void FN<TYPE>(float(&d)[N / 2], uint64_t desc_a, uint64_t desc_b,  \
                                           bool accumulate) {                                   \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #P                                        \
                 ", 0;\n"                                                                       \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." NAME "." NAME " " D ", %" #A \
                 ", %" #B ", p, 1, 1, 0, 0;\n}\n"                                               \
                 : D_OPS(d)                                                                     \
                 : "r"(static_cast<int>(accumulate)), "l"(desc_a), "l"(desc_b));                \
  }

// d (m64 × n64) (+)= a · b^T, both from shared memory.
template <class T>
__device__ __forceinline__ void WgmmaM64N64SS(float (&d)[32], uint64_t desc_a, uint64_t desc_b,
                                              bool accumulate);
SQKV_WG_SS(WgmmaM64N64SS, 64, SQKV_WG_D32, SQKV_WG_D32_OPS, 32, 33, 34, __half, "f16")
SQKV_WG_SS(WgmmaM64N64SS, 64, SQKV_WG_D32, SQKV_WG_D32_OPS, 32, 33, 34, __nv_bfloat16, "bf16")

#define SQKV_WG_D64                                                                             \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24," \
  "%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,"    \
  "%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}"
#define SQKV_WG_D64_OPS(d)                                                                       \
  SQKV_WG_D32_OPS(d), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),           \
      "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), \
      "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), \
      "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), \
      "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// The products with A from registers (RS): FN<TYPE>(d, a, desc_b, accumulate): d (m64 × N,
// float32) (+)= a (m64 × k16: the warp's 16 rows as mma.sync's m16n8k16 A fragment) · b, b at
// desc_b K-major (b^T, TRANS_B 0) or MN-major (stored row by row along K as V is, TRANS_B 1).
// A0..A3, B, P: the operand numbers of a, desc_b and accumulate after the accumulators.
#define SQKV_WG_RS(FN, N, D, D_OPS, A0, A1, A2, A3, B, P, TRANS_B, TYPE, NAME)                   \
  template <>                                                                                    \
  __device__ __forceinline__ void FN<TYPE>(float(&d)[N / 2], const uint32_t(&a)[4],             \
                                           uint64_t desc_b, bool accumulate) {                   \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #P                                        \
                 ", 0;\n"                                                                        \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." NAME "." NAME " " D           \
                 ", {%" #A0 ",%" #A1 ",%" #A2 ",%" #A3 "}, %" #B ", p, 1, 1, " #TRANS_B ";\n}\n"   \
                 : D_OPS(d)                                                                      \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b),                      \
                   "r"(static_cast<int>(accumulate)));                                           \
  }

// d (m64 × n64) (+)= a · b^T, b: 64 rows, K-major.
template <class T>
__device__ __forceinline__ void WgmmaM64N64RS(float (&d)[32], const uint32_t (&a)[4],
                                              uint64_t desc_b, bool accumulate);
SQKV_WG_RS(WgmmaM64N64RS, 64, SQKV_WG_D32, SQKV_WG_D32_OPS, 32, 33, 34, 35, 36, 37, 0, __half,
           "f16")
SQKV_WG_RS(WgmmaM64N64RS, 64, SQKV_WG_D32, SQKV_WG_D32_OPS, 32, 33, 34, 35, 36, 37, 0,
           __nv_bfloat16, "bf16")

// d (m64 × n128) (+)= a · b, b (k16 × n128) MN-major.
template <class T>
__device__ __forceinline__ void WgmmaM64N128RSTransB(float (&d)[64], const uint32_t (&a)[4],
                                                     uint64_t desc_b, bool accumulate = true);
SQKV_WG_RS(WgmmaM64N128RSTransB, 128, SQKV_WG_D64, SQKV_WG_D64_OPS, 64, 65, 66, 67, 68, 69, 1,
           __half, "f16")
SQKV_WG_RS(WgmmaM64N128RSTransB, 128, SQKV_WG_D64, SQKV_WG_D64_OPS, 64, 65, 66, 67, 68, 69, 1,
           __nv_bfloat16, "bf16")

// d (m64 × n128) (+)= a · b^T, b: 128 rows, K-major.
template <class T>
__device__ __forceinline__ void WgmmaM64N128RS(float (&d)[64], const uint32_t (&a)[4],
                                               uint64_t desc_b, bool accumulate);
SQKV_WG_RS(WgmmaM64N128RS, 128, SQKV_WG_D64, SQKV_WG_D64_OPS, 64, 65, 66, 67, 68, 69, 0, __half,
           "f16")
SQKV_WG_RS(WgmmaM64N128RS, 128, SQKV_WG_D64, SQKV_WG_D64_OPS, 64, 65, 66, 67, 68, 69, 0,
           __nv_bfloat16, "bf16")
#undef SQKV_WG_RS

// d (m64 × n128) (+)= a · b^T, both from shared memory (b: 128 rows).
template <class T>
__device__ __forceinline__ void WgmmaM64N128SS(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                               bool accumulate);
SQKV_WG_SS(WgmmaM64N128SS, 128, SQKV_WG_D64, SQKV_WG_D64_OPS, 64, 65, 66, __half, "f16")
SQKV_WG_SS(WgmmaM64N128SS, 128, SQKV_WG_D64, SQKV_WG_D64_OPS, 64, 65, 66, __nv_bfloat16, "bf16")

#undef SQKV_WG_SS
#undef SQKV_WG_D64
#undef SQKV_WG_D64_OPS
#undef SQKV_WG_D32
#undef SQKV_WG_D32_OPS

// The RS A operand of a warp: rows row0 .. row0 + 15 of k-steps 0 .. KS - 1 of an R-row K-major
// swizzled tile at shared address `tile`, as mma.sync's m16n8k16 A fragments (ldmatrix.x4: lanes
// 8m .. 8m + 7 give the rows of matrix m, which covers rows +8 (m & 1) and k-chunk +(m >> 1)).
template <int R, int KS>
__device__ __forceinline__ void LoadSw128AFragments(uint32_t tile, int row0, uint32_t (&a)[KS][4]) {
  const int lane = threadIdx.x % 32, m = lane / 8;
  const int row = row0 + (m & 1) * 8 + lane % 8;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    LdMatrixX4(a[ks], tile + Sw128TileOffset<R>(row, 2 * ks + (m >> 1)));
  }
}

}  // namespace sqkv::gpu::detail
