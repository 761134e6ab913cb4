// Merging attention states on the device: the public two-state merge (LaunchMergeStates) and
// the merge of a segment's split partial states that the paged-attention launcher enqueues.
// States are (o normalised, lse natural log); an empty state has lse = -inf and is skipped.
#include "gpu/paged_attention.h"
#include "gpu/paged_attention_common.cuh"
#include "gpu/paged_attention_internal.cuh"

namespace sqkv::gpu {
namespace detail {
namespace {

constexpr int kMergeWarps = 4;

// One warp per row: a ← merge(a, b), the same arithmetic as compute/MergeStates.
__global__ void __launch_bounds__(kMergeWarps * 32)
    MergeTwoKernel(float* out_a, float* lse_a, const float* out_b, const float* lse_b, int rows,
                   int head_dim) {
  const int row = blockIdx.x * kMergeWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const float la = lse_a[row], lb = lse_b[row];
  if (lb == NegInf()) return;
  float* oa = out_a + static_cast<size_t>(row) * head_dim;
  const float* ob = out_b + static_cast<size_t>(row) * head_dim;
  float new_lse = lb;
  if (la == NegInf()) {
    for (int c = lane; c < head_dim; c += 32) oa[c] = ob[c];
  } else {
    const float mx = fmaxf(la, lb);
    const float wa = expf(la - mx), wb = expf(lb - mx);
    const float sum = wa + wb;
    for (int c = lane; c < head_dim; c += 32) oa[c] = (wa * oa[c] + wb * ob[c]) / sum;
    new_lse = mx + logf(sum);
  }
  __syncwarp();  // every lane has read lse_a before it changes
  if (lane == 0) lse_a[row] = new_lse;
}

// One warp per (segment, row); lane l owns columns [l·D/32, (l+1)·D/32).
template <int D>
__global__ void __launch_bounds__(kMergeWarps * 32) SplitMergeKernel(const SplitMergeParams mp) {
  constexpr int kPerLane = D / 32;
  GridDependencyWait();  // the partial states of the attention kernel
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kMergeWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (gw >= static_cast<int64_t>(mp.num_segments) * mp.rows_cap) return;
  const int seg = static_cast<int>(gw / mp.rows_cap);
  const int r = static_cast<int>(gw % mp.rows_cap);
  const int rows = max(0, min(mp.seg_rows[seg], mp.rows_cap));
  if (r >= rows) return;
  const int64_t count = min(static_cast<int64_t>(max(__ldcg(mp.counts + seg), 0)), mp.count_cap);
  const int64_t work = (count * mp.count_mult + mp.count_div - 1) / mp.count_div;
  const int active = static_cast<int>(
      max(int64_t{1}, min(static_cast<int64_t>(mp.splits),
                          (work + mp.work_per_split - 1) / mp.work_per_split)));
  const size_t base = static_cast<size_t>(seg) * mp.splits * mp.rows_cap + r;  // split 0
  const size_t split_stride = mp.rows_cap;

  float mx = NegInf();
  for (int i = lane; i < active; i += 32) mx = fmaxf(mx, __ldcg(mp.part_lse + base + i * split_stride));
#pragma unroll
  for (int x = 1; x < 32; x *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, x));

  float acc[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) acc[j] = 0.f;
  float sum = 0.f;
  if (mx != NegInf()) {
    for (int i = 0; i < active; ++i) {
      const size_t prow = base + i * split_stride;
      const float w = expf(__ldcg(mp.part_lse + prow) - mx);
      if (w == 0.f) continue;  // empty partial (or negligible): its o is never read
      sum += w;
      const float* src = mp.part_o + prow * D + lane * kPerLane;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) acc[j] += w * __ldcg(src + j);
    }
  }
  float* dst = mp.out + static_cast<size_t>(mp.seg_q_row[seg] + r) * D + lane * kPerLane;
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) dst[j] = acc[j] * inv;
  if (lane == 0) mp.lse[mp.seg_q_row[seg] + r] = sum > 0.f ? mx + logf(sum) : NegInf();
}

}  // namespace

Status LaunchSplitMerge(int head_dim, const SplitMergeParams& mp, cudaStream_t stream) {
  const int64_t warps = static_cast<int64_t>(mp.num_segments) * mp.rows_cap;
  const dim3 grid(static_cast<unsigned>((warps + kMergeWarps - 1) / kMergeWarps));
  const dim3 block(kMergeWarps * 32);
  static const Status carveout = [] {
    SQKV_RETURN_IF_ERROR(PreferShared(SplitMergeKernel<64>));
    return PreferShared(SplitMergeKernel<128>);
  }();
  SQKV_RETURN_IF_ERROR(carveout);
  if (head_dim == 64) {
    return LaunchKernel(SplitMergeKernel<64>, grid, block, 0, stream, /*dependent=*/true,
                        "split merge kernel", mp);
  }
  if (head_dim == 128) {
    return LaunchKernel(SplitMergeKernel<128>, grid, block, 0, stream, /*dependent=*/true,
                        "split merge kernel", mp);
  }
  return Status::InvalidArgument("split merge: head_dim must be 64 or 128");
}

}  // namespace detail

Status LaunchMergeStates(float* out_a, float* lse_a, const float* out_b, const float* lse_b,
                         int rows, int head_dim, void* stream) {
  if (rows < 0 || head_dim <= 0) {
    return Status::InvalidArgument("LaunchMergeStates: rows must be >= 0 and head_dim > 0");
  }
  if (rows == 0) return Status::Ok();
  if (out_a == nullptr || lse_a == nullptr || out_b == nullptr || lse_b == nullptr) {
    return Status::InvalidArgument("LaunchMergeStates: null state pointer");
  }
  const dim3 grid((rows + detail::kMergeWarps - 1) / detail::kMergeWarps);
  return detail::LaunchKernel(detail::MergeTwoKernel, grid, dim3(detail::kMergeWarps * 32), 0,
                              static_cast<cudaStream_t>(stream), /*dependent=*/false,
                              "merge states kernel", out_a, lse_a, out_b, lse_b, rows, head_dim);
}

}  // namespace sqkv::gpu
