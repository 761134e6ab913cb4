// Merging attention states on the device: the public two-state merge (LaunchMergeStates) and
// the merge of a segment's split partial states that the paged-attention launcher enqueues.
// States are (o normalised, lse natural log); an empty state has lse = -inf and is skipped.
#include "gpu/kernel_trace.cuh"
#include "gpu/paged_attention.h"
#include "gpu/paged_attention_common.cuh"
#include "gpu/paged_attention_internal.cuh"

SQKV_TRACE_UNIT(merge)

namespace sqkv::gpu {
namespace detail {
namespace {

constexpr int kMergeWarps = 4;
constexpr int kSplitMergeThreads = 128;

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

// One block per (segment, row). Threads read the split lse values in parallel, then each owns a
// float4 column of the output and a share of the splits (split group g = tid / (D / 4)), so the
// partial rows are read with many loads in flight instead of one split after another.
template <int D>
__global__ void __launch_bounds__(kSplitMergeThreads) SplitMergeKernel(const SplitMergeParams mp) {
  constexpr int kCols = D / 4;                         // float4 columns of a row
  constexpr int kGroups = kSplitMergeThreads / kCols;  // splits handled side by side
  constexpr int kWarps = kSplitMergeThreads / 32;
  __shared__ float s_w[kMaxSplits];
  __shared__ float4 s_acc[kGroups][kCols];
  __shared__ float s_red[kWarps];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int seg = static_cast<int>(blockIdx.x / mp.rows_cap);
  const int r = static_cast<int>(blockIdx.x % mp.rows_cap);
  SQKV_TRACE_START(TraceKernel::kSplitMerge);
  // Before the wait, what the attention kernel does not write: the segment's rows and Q row (plan
  // inputs) and its count. The count may come from the kernel before the attention (the lookup),
  // but every attention kernel triggers this launch only after its own dependency wait, so those
  // writes are complete and visible once this grid runs. The three loads go out together.
  const int seg_rows = mp.seg_rows[seg];
  const int q_row = mp.seg_q_row[seg];
  const int seg_count = __ldcg(mp.counts + seg);
  GridDependencyWait();  // the partial states of the attention kernel
  SQKV_TRACE_WAIT(TraceKernel::kSplitMerge);
  const int rows = max(0, min(seg_rows, mp.rows_cap));
  if (r >= rows) return;
  const int64_t count = min(static_cast<int64_t>(max(seg_count, 0)), mp.count_cap);
  const int work = static_cast<int>((count * mp.count_mult + mp.count_div - 1) / mp.count_div);
  const int active = ActiveSplits(work, mp.splits);  // the attention kernel's cut
  const size_t base = static_cast<size_t>(seg) * mp.splits * mp.rows_cap + r;  // split 0
  const size_t split_stride = mp.rows_cap;
  // This thread's float4 column of its first kPreload splits' partial rows (group, group +
  // kGroups, ...) goes out with the lse loads below rather than after the weights: one trip to
  // L2 instead of two for up to kGroups * kPreload splits.
  constexpr int kPreload = 9;
  const int col = tid % kCols, group = tid / kCols;
  auto part_o = [&](int i) {  // this thread's column of split i's partial row
    return __ldcg(reinterpret_cast<const float4*>(mp.part_o + (base + i * split_stride) * D) + col);
  };
  float4 pre[kPreload];
#pragma unroll
  for (int k = 0; k < kPreload; ++k) {
    const int i = group + k * kGroups;
    pre[k] = i < active ? part_o(i) : make_float4(0.f, 0.f, 0.f, 0.f);
  }

  // Block-wide max of the lse values, then the weights e^(lse - max) and their sum.
  float mx = NegInf();
  for (int i = tid; i < active; i += kSplitMergeThreads) {
    s_w[i] = __ldcg(mp.part_lse + base + i * split_stride);
    mx = fmaxf(mx, s_w[i]);
  }
#pragma unroll
  for (int x = 1; x < 32; x *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, x));
  if (lane == 0) s_red[warp] = mx;
  __syncthreads();
  mx = s_red[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) mx = fmaxf(mx, s_red[w]);
  __syncthreads();  // s_red is reused for the sum
  float sum = 0.f;
  for (int i = tid; i < active; i += kSplitMergeThreads) {
    const float w = mx == NegInf() ? 0.f : expf(s_w[i] - mx);
    s_w[i] = w;
    sum += w;
  }
#pragma unroll
  for (int x = 1; x < 32; x *= 2) sum += __shfl_xor_sync(0xffffffffu, sum, x);
  if (lane == 0) s_red[warp] = sum;
  __syncthreads();
  sum = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) sum += s_red[w];

  // Every active split wrote its partial (o = 0 for an empty one), so o is always finite. The
  // splits are summed in the same order whether preloaded or not.
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  auto add = [&](int i, const float4& v) {
    const float w = s_w[i];
    acc.x += w * v.x;
    acc.y += w * v.y;
    acc.z += w * v.z;
    acc.w += w * v.w;
  };
#pragma unroll
  for (int k = 0; k < kPreload; ++k) {
    const int i = group + k * kGroups;
    if (i < active) add(i, pre[k]);
  }
#pragma unroll 4
  for (int i = group + kPreload * kGroups; i < active; i += kGroups) add(i, part_o(i));
  s_acc[group][col] = acc;
  __syncthreads();
  if (group != 0) return;
#pragma unroll
  for (int g = 1; g < kGroups; ++g) {
    const float4 v = s_acc[g][col];
    acc.x += v.x;
    acc.y += v.y;
    acc.z += v.z;
    acc.w += v.w;
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  reinterpret_cast<float4*>(mp.out + static_cast<size_t>(q_row + r) * D)[col] =
      make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
  if (col == 0) mp.lse[q_row + r] = sum > 0.f ? mx + logf(sum) : NegInf();
  SQKV_TRACE_END(TraceKernel::kSplitMerge);
}

}  // namespace

Status LaunchSplitMerge(int head_dim, const SplitMergeParams& mp, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(mp.num_segments) * mp.rows_cap));
  const dim3 block(kSplitMergeThreads);
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
