// What the paged-attention launcher (paged_attention.cu) shares with its kernel files: the plan
// (which kernel, how the grid is cut, where the workspace pieces lie) and the kernel parameters.
// Internal to gpu/.
//
// Three kernels, chosen by the plan:
//   decode  (16-bit storage, <= 32 rows per segment): a block takes a run of 16-slot key units
//           of one segment; its 4 warps take units in turn, each with its own cp.async pipeline
//           and online-softmax state, merged in shared memory at the end.
//   prefill (16-bit storage, > 32 rows): FlashAttention-2 style, 128-row tiles × 64-key tiles
//           over a compacted list of the segment's valid token slots (written by a pre-pass); on
//           compute capability 9.0 with head_dim 128, a wgmma kernel of the same shape
//           (paged_attention_prefill_sm90a.cu, Plan::prefill_wgmma), else mma.sync.
//   f32     (float32 storage, any rows): CUDA-core kernel over 16-row tiles and key units.
// Any of them may split a segment's keys across blocks (splits > 1): each block then writes a
// partial state (normalised o, natural-log lse) to the workspace and a merge kernel combines them.
// The host plans how many splits (from the host bound on pages per segment); the device cuts each
// segment's actual work evenly across them (SplitOf below).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "common/dtype.h"
#include "common/status.h"
#include "gpu/device_cache.h"
#include "gpu/paged_attention_common.cuh"

namespace sqkv::gpu::detail {

inline constexpr int kThreads = 128;      // every attention kernel runs 4 warps
inline constexpr int kUnitSlots = 16;     // decode / f32 key unit: 16 slots of one page
inline constexpr int kPrefillRows = 128;  // rows per prefill tile
inline constexpr int kPrefillKeys = 64;   // compacted keys per prefill tile
inline constexpr int kF32Rows = 16;       // rows per f32 tile
inline constexpr int kDecodeMaxRows = 32;
inline constexpr int kMaxSplits = 512;  // key splits per (segment, row tile), at most

enum class PathKind { kDecode, kPrefill, kF32 };

struct Plan {
  PathKind kind = PathKind::kDecode;
  int decode_mtiles = 1;   // decode: 16-row m tiles per warp (1 or 2)
  int rows_cap = 0;        // rows per segment the grid covers (= max_rows_per_segment)
  int row_tiles = 1;       // row tiles per segment
  int splits = 1;          // key splits per (segment, row tile)
  int work_total = 0;      // work items of the largest segment the bound allows (units or tiles)
  int units_per_page = 1;  // decode / f32: ceil(page_tokens / 16)
  int64_t tok_cap = 0;     // prefill: token slots per segment in the compact list
  // Workspace byte offsets (0 size when unused).
  size_t part_o_offset = 0, part_lse_offset = 0, tok_rows_offset = 0, tok_count_offset = 0;
  size_t workspace_bytes = 0;
  // The first kernel is a programmatic dependent launch (PagedAttentionArgs::
  // overlap_previous_kernel): it stages q, then waits for the kernel before it.
  bool dependent_first = false;
  // Prefill on the wgmma kernel (PagedAttentionArgs::wgmma, head_dim 128, 16-bit, sm_90).
  bool prefill_wgmma = false;
  int64_t blocks() const { return static_cast<int64_t>(row_tiles) * splits; }
};

// How a segment's work (decode / f32: 16-slot key units; prefill: 64-key tiles) is cut across the
// `splits` blocks planned for it. The cut is made on the device from the segment's actual work,
// not the host bound, so the splits that run carry equal shares: per = max(1, ceil(work /
// splits)); split s takes [s·per, min((s+1)·per, work)); the active splits are
// max(1, min(splits, ceil(work / per))) — split 0 always runs (with no work it writes the empty
// state). The attention kernels and the split merge both use these, so they agree.
struct SplitRange {
  int begin = 0, end = 0;  // work items [begin, end)
};
__host__ __device__ __forceinline__ int SplitShare(int work, int splits) {
  const int per = (work + splits - 1) / splits;
  return per > 1 ? per : 1;
}
__host__ __device__ __forceinline__ SplitRange SplitOf(int work, int splits, int split) {
  const int per = SplitShare(work, splits);
  SplitRange r;
  r.begin = split * per;
  r.end = r.begin + per < work ? r.begin + per : work;
  return r;
}
__host__ __device__ __forceinline__ int ActiveSplits(int work, int splits) {
  const int per = SplitShare(work, splits);
  const int used = (work + per - 1) / per;
  return used < 1 ? 1 : (used < splits ? used : splits);
}

struct KernelParams {
  const void* pool = nullptr;
  int page_tokens = 0;
  float scale_log2 = 0.f;  // scale · log2(e): scores are kept in base 2 inside the kernels
  int num_segments = 0;
  const int32_t* seg_q_row = nullptr;
  const int32_t* seg_rows = nullptr;
  const int32_t* seg_page_offset = nullptr;
  const int32_t* seg_page_count = nullptr;
  const int32_t* page_ids = nullptr;
  const int32_t* page_valid = nullptr;
  int max_pages = 0;
  const float* q = nullptr;
  float* out = nullptr;
  float* lse = nullptr;
  // From the plan.
  int rows_cap = 0, row_tiles = 1, splits = 1, units_per_page = 1;
  // Split partial states: part_o (num_segments, splits, rows_cap, head_dim), part_lse
  // (num_segments, splits, rows_cap).
  float* part_o = nullptr;
  float* part_lse = nullptr;
  // Prefill compact key lists: tok_rows (num_segments, tok_cap) holds, for each valid key of the
  // segment in page-list order, its K row in the pool counted in head_dim-element rows
  // (page_id · 2 · page_tokens + slot); tok_count (num_segments) how many there are.
  uint32_t* tok_rows = nullptr;
  int32_t* tok_count = nullptr;
  int64_t tok_cap = 0;
};

// What the planner needs to know of a kernel: resident blocks per SM at its shared-memory size.
struct KernelInfo {
  int blocks_per_sm = 0;
  int smem_bytes = 0;
};

// Which prefill block this is (grid x: (segment · splits + split) · row_tiles + row tile): its
// segment's rows (clamped to the plan) and the first row of its tile.
struct PrefillBlock {
  int seg = 0, split = 0, rt = 0, rows = 0, r0 = 0;
};
__device__ __forceinline__ PrefillBlock PrefillBlockOf(const KernelParams& p) {
  PrefillBlock b;
  b.rt = blockIdx.x % p.row_tiles;
  b.split = (blockIdx.x / p.row_tiles) % p.splits;
  b.seg = blockIdx.x / (p.row_tiles * p.splits);
  b.rows = max(0, min(p.seg_rows[b.seg], p.rows_cap));
  b.r0 = b.rt * kPrefillRows;
  return b;
}

// The block's kPrefillRows query rows (D components each) into shared memory in the storage type:
// 16-byte chunk c of tile row r goes to *dst(r, c) (the kernel's layout); rows past the segment's
// are zero. It does not depend on the pre-pass, so kernels run it before their dependency wait.
template <typename T, int D, int kBlockThreads, class Dst>
__device__ __forceinline__ void StagePrefillQ(const KernelParams& p, const PrefillBlock& b,
                                              int q_row, const Dst& dst) {
  constexpr int C = D / 8;
  for (int i = threadIdx.x; i < kPrefillRows * C; i += kBlockThreads) {
    const int r = i / C, c = i % C;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (b.r0 + r < b.rows) {
      v = LoadConvert8<T>(p.q + static_cast<size_t>(q_row + b.r0 + r) * D + c * 8);
    }
    *dst(r, c) = v;
  }
}

// A segment's compact key list (pool rows, written by the pre-pass) and its length, clamped to
// the list's capacity; read both after the dependency wait.
__device__ __forceinline__ uint32_t* PrefillKeyRows(const KernelParams& p, int seg) {
  return p.tok_rows + static_cast<size_t>(seg) * p.tok_cap;
}
__device__ __forceinline__ int PrefillKeyCount(const KernelParams& p, int seg) {
  return static_cast<int>(min(static_cast<int64_t>(max(__ldcg(p.tok_count + seg), 0)), p.tok_cap));
}

// Where a finished prefill row goes, and with what scale: row r of block b's segment, running max
// m (base 2) and normaliser l (the row's quad summed). One split: out / lse; several: the split's
// partial state. An empty row (l = 0) is o = 0, lse = -inf; otherwise o · inv and a natural-log
// lse.
struct PrefillRowOut {
  float* o = nullptr;
  float* lse = nullptr;
  float inv = 0.f, lse_val = 0.f;
};
__device__ __forceinline__ PrefillRowOut PrefillRowOutOf(const KernelParams& p,
                                                         const PrefillBlock& b, int q_row, int r,
                                                         int head_dim, float m, float l) {
  PrefillRowOut out;
  const bool empty = l == 0.f;
  out.inv = empty ? 0.f : 1.f / l;
  out.lse_val = empty ? NegInf() : (m + log2f(l)) * kLn2;
  if (p.splits == 1) {
    out.o = p.out + static_cast<size_t>(q_row + r) * head_dim;
    out.lse = p.lse + q_row + r;
  } else {
    const size_t prow = (static_cast<size_t>(b.seg) * p.splits + b.split) * p.rows_cap + r;
    out.o = p.part_o + prow * head_dim;
    out.lse = p.part_lse + prow;
  }
  return out;
}

// Per kernel file. Info calls raise the kernel's dynamic shared-memory limit once. The first
// kernel of each launch is a programmatic dependent launch when plan.dependent_first; it stages q
// (independent of the kernel before it) and then waits (GridDependencyWait) before its first read
// of seg_page_count, page_ids, page_valid or the pool, in every block, so no later kernel can
// overtake the one before it.
Status DecodeInfo(DType dtype, int head_dim, int mtiles, KernelInfo* info);
Status LaunchDecode(DType dtype, int head_dim, int mtiles, const KernelParams& p, const Plan& plan,
                    cudaStream_t stream);
// wgmma: the sm_90a kernel (paged_attention_prefill_sm90a.cu; head_dim 128, 16-bit storage).
Status PrefillInfo(DType dtype, int head_dim, bool wgmma, KernelInfo* info);
Status PrefillWgmmaInfo(DType dtype, KernelInfo* info);
// The wgmma prefill kernel alone (LaunchPrefill enqueues the pre-pass before it).
Status LaunchPrefillWgmmaKernel(DType dtype, const KernelParams& p, const Plan& plan,
                                cudaStream_t stream);
// Enqueues the compaction pre-pass, then the prefill kernel (as a programmatic dependent launch).
// The pre-pass has no q to stage: it waits first.
Status LaunchPrefill(DType dtype, int head_dim, const KernelParams& p, const Plan& plan,
                     cudaStream_t stream);
Status F32Info(int head_dim, KernelInfo* info);
Status LaunchF32(int head_dim, const KernelParams& p, const Plan& plan, cudaStream_t stream);

// Combines the split partial states of every (segment, row) into out / lse. For segment s the
// splits that ran are ActiveSplits(work_s, splits) with
// work_s = ceil(min(counts[s], count_cap) · count_mult / count_div), the work the attention
// kernel cut. Launched as a programmatic dependent of the attention kernel.
struct SplitMergeParams {
  int num_segments = 0, rows_cap = 0, splits = 1;
  const int32_t* seg_q_row = nullptr;
  const int32_t* seg_rows = nullptr;
  const int32_t* counts = nullptr;
  int64_t count_cap = 0;
  int count_mult = 1, count_div = 1;
  const float* part_o = nullptr;
  const float* part_lse = nullptr;
  float* out = nullptr;
  float* lse = nullptr;
};
Status LaunchSplitMerge(int head_dim, const SplitMergeParams& mp, cudaStream_t stream);

// Status from a CUDA error code, naming what failed.
inline Status CudaStatus(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  return Status::Internal(std::string(what) + ": " + cudaGetErrorString(err));
}

// LaunchMaybeDependent with the error as a Status naming `what`.
template <typename... Args>
Status LaunchKernel(void (*kernel)(Args...), dim3 grid, dim3 block, size_t smem,
                    cudaStream_t stream, bool dependent, const char* what, Args... args) {
  return CudaStatus(LaunchMaybeDependent(kernel, grid, block, smem, stream, dependent, args...),
                    what);
}

// Asks for the largest shared-memory carveout: every kernel of this family does, so consecutive
// kernels (attention, merge) never wait for an SM to change its L1 / shared split.
template <typename Kernel>
Status PreferShared(Kernel kernel) {
  return CudaStatus(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                         cudaSharedmemCarveoutMaxShared),
                    "cudaFuncSetAttribute(carveout)");
}

// Raises the dynamic shared-memory limit of `kernel` and reads its occupancy.
template <typename Kernel>
Status QueryKernel(Kernel kernel, int smem_bytes, KernelInfo* info, int threads = kThreads) {
  SQKV_RETURN_IF_ERROR(CudaStatus(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes),
      "cudaFuncSetAttribute"));
  SQKV_RETURN_IF_ERROR(PreferShared(kernel));
  int blocks = 0;
  SQKV_RETURN_IF_ERROR(CudaStatus(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem_bytes),
      "cudaOccupancyMaxActiveBlocksPerMultiprocessor"));
  if (blocks < 1) return Status::Internal("attention kernel cannot be resident on an SM");
  info->blocks_per_sm = blocks;
  info->smem_bytes = smem_bytes;
  return Status::Ok();
}

// QueryKernel once per device: the raised shared-memory limit is an attribute of the kernel on
// the current device, so an engine on a second device must raise it there too. `cache` is one
// static DeviceCache per kernel instantiation; a failure is not cached (asked again next time).
template <typename Kernel>
Status QueryKernelOnDevice(DeviceCache& cache, Kernel kernel, int smem_bytes, KernelInfo* info,
                           int threads = kThreads) {
  Status failed = Status::Unavailable("attention kernel: no current CUDA device");
  const int blocks = PerDevice(cache, [&](int) {
    KernelInfo k;
    failed = QueryKernel(kernel, smem_bytes, &k, threads);
    return failed.ok() ? k.blocks_per_sm : -1;
  });
  if (blocks < 0) return failed;
  info->blocks_per_sm = blocks;
  info->smem_bytes = smem_bytes;
  return Status::Ok();
}

}  // namespace sqkv::gpu::detail
