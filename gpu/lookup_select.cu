// The selection kernel of the float32 large path: one block per large segment, after the tiled
// passes wrote its scores, where the staged selection (lookup_staged.cu) does not take the batch.
// gpu/lookup_select.cuh holds the selection itself.
#include <cuda_runtime.h>

#include "gpu/lookup_select.cuh"

namespace sqkv::gpu::lookup_detail {
namespace {

__global__ void __launch_bounds__(kSelectThreads)
    SelectLargeKernel(LookupArgs a, Workspace w, int level) {
  __shared__ ArgsBuffer args;
  args.Fill(a, w);
  SelectSegment<kSelectThreads>(args.args(), args.ws(), w.large_list[blockIdx.x], level,
                                /*f16=*/false);
}

}  // namespace

cudaError_t LaunchSelectLarge(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                              int level, cudaStream_t stream) {
  if (l.large_list.empty() || a.score_only) return cudaSuccess;
  if (level == 2 && UseStagedSelect(a, l, SegmentList::kLarge)) {
    return LaunchStagedSelect(a, l, w, SegmentList::kLarge, stream);
  }
  SelectLargeKernel<<<static_cast<unsigned>(l.large_list.size()), kSelectThreads, 0, stream>>>(
      a, w, level);
  return cudaGetLastError();
}

}  // namespace sqkv::gpu::lookup_detail
