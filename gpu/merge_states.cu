// Merging attention states on the device: the public two-state merge (LaunchMergeStates) and
// the split merge kernel that the paged-attention launcher enqueues after a split attention
// kernel (its arithmetic is MergeSplitRows, gpu/split_merge.cuh).
// States are (o normalised, lse natural log); an empty state has lse = -inf and is skipped.
#include "gpu/paged_attention.h"
#include "gpu/paged_attention_common.cuh"
#include "gpu/paged_attention_internal.cuh"
#include "gpu/split_merge.cuh"

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

// One block per (segment, row).
template <int D>
__global__ void __launch_bounds__(kThreads) SplitMergeKernel(const SplitMergeParams mp) {
  __shared__ SplitMergeSmem<D, 1> sm;
  GridDependencyWait();  // the partial states of the attention kernel
  const int seg = static_cast<int>(blockIdx.x / mp.rows_cap);
  const int r = static_cast<int>(blockIdx.x % mp.rows_cap);
  const int rows = max(0, min(mp.seg_rows[seg], mp.rows_cap));
  if (r >= rows) return;
  const int64_t count = min(static_cast<int64_t>(max(__ldcg(mp.counts + seg), 0)), mp.count_cap);
  const int work = static_cast<int>((count * mp.count_mult + mp.count_div - 1) / mp.count_div);
  const int active = ActiveSplits(work, mp.splits);  // the attention kernel's cut
  const size_t base = static_cast<size_t>(seg) * mp.splits * mp.rows_cap + r;  // split 0
  const int q_row = mp.seg_q_row[seg];
  MergeSplitRows<D, 1>(sm, mp.part_o, mp.part_lse, base, mp.rows_cap, active, /*nrows=*/1,
                       mp.out + static_cast<size_t>(q_row + r) * D, mp.lse + q_row + r);
}

}  // namespace

Status LaunchSplitMerge(int head_dim, const SplitMergeParams& mp, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(mp.num_segments) * mp.rows_cap));
  const dim3 block(kThreads);
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
