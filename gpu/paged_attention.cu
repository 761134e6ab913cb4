// Host side of the paged attention: checks the arguments, plans the grid (which kernel, how many
// key splits) and enqueues the kernels. The plan depends only on the arguments and the device,
// so PagedAttentionWorkspaceBytes and LaunchPagedAttention agree on it.
#include <cmath>
#include <limits>
#include <string>

#include "gpu/device.h"
#include "gpu/paged_attention.h"
#include "gpu/paged_attention_common.cuh"
#include "gpu/paged_attention_internal.cuh"
#include "gpu/shapes.h"

namespace sqkv::gpu {
namespace {

using detail::KernelInfo;
using detail::PathKind;
using detail::Plan;

constexpr size_t kAlign = 256;

// Cost model for choosing the key splits, in work items of the kernel (decode / f32: a 16-slot
// unit ≈ 0.5 µs of one block's share of HBM; prefill: a 64-key tile ≈ 3 µs of tensor work).
struct CostModel {
  double block_overhead;   // start, Q load, epilogue of one block
  double merge_fixed;      // the merge kernel's launch and tail
  double merge_per_split;  // writing and reading one split's partial states
};

size_t AlignUp(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// What the plan depends on: dtype, sizes and bounds.
Status CheckShape(const PagedAttentionArgs& a) {
  if (a.dtype != DType::kF32 && a.dtype != DType::kF16 && a.dtype != DType::kBF16) {
    return Status::InvalidArgument("paged attention: unknown dtype");
  }
  if (!AttentionRunsHeadDim(a.head_dim)) {
    return Status::InvalidArgument("paged attention: head_dim must be 64 or 128, got " +
                                   std::to_string(a.head_dim));
  }
  if (!AttentionRunsPageTokens(a.page_tokens)) {
    return Status::InvalidArgument("paged attention: page_tokens must be a multiple of 8 in [8, " +
                                   std::to_string(kMaxPageTokens) + "], got " +
                                   std::to_string(a.page_tokens));
  }
  if (!std::isfinite(a.scale))
    return Status::InvalidArgument("paged attention: scale is not finite");
  if (a.num_segments < 0 || a.max_pages_per_segment < 0 || a.max_rows_per_segment < 0) {
    return Status::InvalidArgument("paged attention: negative segment count or bound");
  }
  return Status::Ok();
}

// The device pointers: needed to launch, not to size the workspace.
Status CheckPointers(const PagedAttentionArgs& a) {
  if (a.seg_q_row == nullptr || a.seg_rows == nullptr || a.seg_page_offset == nullptr ||
      a.seg_page_count == nullptr) {
    return Status::InvalidArgument("paged attention: null segment array");
  }
  if (a.max_pages_per_segment > 0 &&
      (a.pool == nullptr || a.page_ids == nullptr || a.page_valid == nullptr)) {
    return Status::InvalidArgument("paged attention: null pool or page list");
  }
  if (a.q == nullptr || a.out == nullptr || a.lse == nullptr) {
    return Status::InvalidArgument("paged attention: null q, out or lse");
  }
  auto misaligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 != 0; };
  if (misaligned(a.pool) || misaligned(a.q) || misaligned(a.out)) {
    return Status::InvalidArgument("paged attention: pool, q and out must be 16-byte aligned");
  }
  return Status::Ok();
}

// Picks the splits that minimise waves × (work per split + overhead) + merge cost, for the work
// the host bound allows (the device then cuts each segment's actual work evenly across them).
int ChooseSplits(int64_t base_blocks, int64_t work_total, int64_t slots, const CostModel& cost) {
  if (work_total <= 1 || base_blocks <= 0) return 1;
  int best = 1;
  double best_cost = std::numeric_limits<double>::infinity();
  const int64_t max_splits = std::min<int64_t>(work_total, detail::kMaxSplits);
  for (int64_t s = 1; s <= max_splits; ++s) {
    const int64_t per = (work_total + s - 1) / s;
    if ((work_total + per - 1) / per != s) continue;  // same cut as a smaller s
    const int64_t blocks = base_blocks * s;
    if (blocks > std::numeric_limits<int32_t>::max()) break;
    const double waves = static_cast<double>((blocks + slots - 1) / slots);
    double c = waves * (static_cast<double>(per) + cost.block_overhead);
    if (s > 1) c += cost.merge_fixed + cost.merge_per_split * static_cast<double>(s);
    if (c < best_cost * (1 - 1e-9)) {
      best_cost = c;
      best = static_cast<int>(s);
    }
  }
  return best;
}

Result<Plan> MakePlan(const PagedAttentionArgs& a) {
  SQKV_RETURN_IF_ERROR(CheckShape(a));
  Plan plan;
  plan.rows_cap = a.max_rows_per_segment;
  plan.units_per_page = (a.page_tokens + detail::kUnitSlots - 1) / detail::kUnitSlots;
  KernelInfo info;
  CostModel cost{4.0, 4.0, 0.0};
  if (a.dtype == DType::kF32) {
    plan.kind = PathKind::kF32;
    plan.row_tiles = (plan.rows_cap + detail::kF32Rows - 1) / detail::kF32Rows;
    plan.work_total = a.max_pages_per_segment * plan.units_per_page;
    SQKV_RETURN_IF_ERROR(detail::F32Info(a.head_dim, &info));
  } else if (plan.rows_cap <= detail::kDecodeMaxRows) {
    plan.kind = PathKind::kDecode;
    plan.decode_mtiles = plan.rows_cap <= 16 ? 1 : 2;
    plan.work_total = a.max_pages_per_segment * plan.units_per_page;
    SQKV_RETURN_IF_ERROR(detail::DecodeInfo(a.dtype, a.head_dim, plan.decode_mtiles, &info));
  } else {
    plan.kind = PathKind::kPrefill;
    plan.row_tiles = (plan.rows_cap + detail::kPrefillRows - 1) / detail::kPrefillRows;
    plan.tok_cap = static_cast<int64_t>(a.max_pages_per_segment) * a.page_tokens;
    plan.work_total =
        static_cast<int>((plan.tok_cap + detail::kPrefillKeys - 1) / detail::kPrefillKeys);
    // Partial states of one split: rows · head_dim floats written and read, ≈ 1 tile per
    // 8 MB-ish at HBM speed; the launch ≈ 1 tile.
    const double part_bytes = 2.0 * a.num_segments * plan.rows_cap * a.head_dim * 4;
    cost = CostModel{1.0, 1.0, part_bytes / 8e6};
    plan.prefill_wgmma = a.wgmma && a.head_dim == 128 && CurrentDeviceIsSm90();
    SQKV_RETURN_IF_ERROR(detail::PrefillInfo(a.dtype, a.head_dim, plan.prefill_wgmma, &info));
  }
  const int sms = CurrentDeviceSmCount();
  if (sms == 0) return Status::Unavailable("paged attention: no CUDA device answers");
  const int64_t base_blocks = static_cast<int64_t>(a.num_segments) * plan.row_tiles;
  const int64_t slots = static_cast<int64_t>(sms) * info.blocks_per_sm;
  plan.splits = ChooseSplits(base_blocks, plan.work_total, slots, cost);
  plan.dependent_first = a.overlap_previous_kernel;
  if (base_blocks * plan.splits > std::numeric_limits<int32_t>::max()) {
    return Status::InvalidArgument("paged attention: too many segments × rows for one grid");
  }

  size_t off = 0;
  if (plan.splits > 1) {
    const size_t part_rows =
        static_cast<size_t>(a.num_segments) * plan.splits * static_cast<size_t>(plan.rows_cap);
    plan.part_o_offset = off;
    off = AlignUp(off + part_rows * a.head_dim * sizeof(float));
    plan.part_lse_offset = off;
    off = AlignUp(off + part_rows * sizeof(float));
  }
  if (plan.kind == PathKind::kPrefill) {
    plan.tok_rows_offset = off;
    off = AlignUp(off + static_cast<size_t>(a.num_segments) * plan.tok_cap * sizeof(uint32_t));
    plan.tok_count_offset = off;
    off = AlignUp(off + static_cast<size_t>(a.num_segments) * sizeof(int32_t));
  }
  plan.workspace_bytes = off;
  return plan;
}

bool NothingToDo(const PagedAttentionArgs& a) {
  return a.num_segments == 0 || a.max_rows_per_segment == 0;
}

}  // namespace

// Sizing needs no device pointers: only the fields CheckShape reads, and the device.
size_t PagedAttentionWorkspaceBytes(const PagedAttentionArgs& args) {
  if (NothingToDo(args)) return 0;
  Result<Plan> plan = MakePlan(args);
  return plan.ok() ? plan->workspace_bytes : 0;
}

Status LaunchPagedAttention(const PagedAttentionArgs& args, void* stream_ptr) {
  if (NothingToDo(args)) return CheckShape(args);
  SQKV_RETURN_IF_ERROR(CheckPointers(args));
  SQKV_ASSIGN_OR_RETURN(const Plan plan, MakePlan(args));
  if (plan.workspace_bytes > 0 && args.workspace == nullptr) {
    return Status::InvalidArgument("paged attention: needs " +
                                   std::to_string(plan.workspace_bytes) +
                                   " bytes of workspace, got none");
  }
  auto* ws = static_cast<char*>(args.workspace);
  const auto stream = static_cast<cudaStream_t>(stream_ptr);

  detail::KernelParams p;
  p.pool = args.pool;
  p.page_tokens = args.page_tokens;
  p.scale_log2 = args.scale * detail::kLog2e;
  p.num_segments = args.num_segments;
  p.seg_q_row = args.seg_q_row;
  p.seg_rows = args.seg_rows;
  p.seg_page_offset = args.seg_page_offset;
  p.seg_page_count = args.seg_page_count;
  p.page_ids = args.page_ids;
  p.page_valid = args.page_valid;
  p.max_pages = args.max_pages_per_segment;
  p.q = args.q;
  p.out = args.out;
  p.lse = args.lse;
  p.rows_cap = plan.rows_cap;
  p.row_tiles = plan.row_tiles;
  p.splits = plan.splits;
  p.units_per_page = plan.units_per_page;
  if (plan.splits > 1) {
    p.part_o = reinterpret_cast<float*>(ws + plan.part_o_offset);
    p.part_lse = reinterpret_cast<float*>(ws + plan.part_lse_offset);
  }
  if (plan.kind == PathKind::kPrefill) {
    p.tok_rows = reinterpret_cast<uint32_t*>(ws + plan.tok_rows_offset);
    p.tok_count = reinterpret_cast<int32_t*>(ws + plan.tok_count_offset);
    p.tok_cap = plan.tok_cap;
  }

  switch (plan.kind) {
    case PathKind::kDecode:
      SQKV_RETURN_IF_ERROR(
          detail::LaunchDecode(args.dtype, args.head_dim, plan.decode_mtiles, p, plan, stream));
      break;
    case PathKind::kPrefill:
      SQKV_RETURN_IF_ERROR(detail::LaunchPrefill(args.dtype, args.head_dim, p, plan, stream));
      break;
    case PathKind::kF32:
      SQKV_RETURN_IF_ERROR(detail::LaunchF32(args.head_dim, p, plan, stream));
      break;
  }
  if (plan.splits == 1) return Status::Ok();

  detail::SplitMergeParams mp;
  mp.num_segments = args.num_segments;
  mp.rows_cap = plan.rows_cap;
  mp.splits = plan.splits;
  mp.seg_q_row = args.seg_q_row;
  mp.seg_rows = args.seg_rows;
  if (plan.kind == PathKind::kPrefill) {
    mp.counts = p.tok_count;
    mp.count_cap = plan.tok_cap;
    mp.count_mult = 1;
    mp.count_div = detail::kPrefillKeys;
  } else {
    mp.counts = args.seg_page_count;
    mp.count_cap = args.max_pages_per_segment;
    mp.count_mult = plan.units_per_page;
    mp.count_div = 1;
  }
  mp.part_o = p.part_o;
  mp.part_lse = p.part_lse;
  mp.out = args.out;
  mp.lse = args.lse;
  return detail::LaunchSplitMerge(args.head_dim, mp, stream);
}

}  // namespace sqkv::gpu
