// The two-kernel lookup of small (decode) segments and of unscored (fixed) segments; see
// gpu/lookup.h. One block = one scoring tile (lookup_tile.cuh): it writes its base-2 logits and
// per-row (max, Σ n·2^(l - max)) to the workspace; then either the staged selection kernel
// (lookup_staged.cu) or the last block of the segment to arrive combines the tiles, computes the
// scores and selects. The cluster path (lookup_cluster.cu) does the same in one launch.
#include <cuda_runtime.h>

#include <type_traits>

#include "gpu/lookup_select.cuh"
#include "gpu/lookup_tile.cuh"

namespace sqkv::gpu::lookup_detail {
namespace {

constexpr int kWarps = kSmallWarps;
static_assert(kLookupSmallRows <= 2 * kWarps, "stats: two rows per warp at most");

// The last block: per-row max and 1/normaliser over the tiles, then the scores of the scored
// entries into the workspace (visible to the whole block on return).
__device__ __noinline__ void FinishScores(const LookupArgs& a, const Workspace& w, int seg,
                                          int level, bool f16) {
  __shared__ float row_max[kLookupSmallRows];
  __shared__ float row_inv_z[kLookupSmallRows];
  const LookupSegment& s = a.segments[seg];
  const EntrySet e = GetEntrySet(s, level, w.ints, a.head_dim, f16);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int tiles = (e.total + kSmallTile - 1) / kSmallTile;
  const float* ts = w.floats + s.tstat_offset;
  for (int r = warp; r < s.rows; r += kWarps) {
    const float* row = ts + static_cast<size_t>(r) * s.tiles * 2;
    float m = -INFINITY;
    for (int c = lane; c < tiles; c += 32) m = fmaxf(m, __ldcg(row + 2 * c));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float z = 0.f;
    for (int c = lane; c < tiles; c += 32)
      z += __ldcg(row + 2 * c + 1) * exp2f(__ldcg(row + 2 * c) - m);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) z += __shfl_xor_sync(0xffffffffu, z, o);
    if (lane == 0) {
      row_max[r] = m;
      row_inv_z[r] = 1.f / z;  // z >= the size of the arg-max entry >= 1
    }
  }
  __syncthreads();
  const size_t ld = static_cast<size_t>(s.entry_capacity);
  const float* lg = w.floats + s.logit_offset;
  float* sc = w.floats + s.score_offset;
  const float inv_rows = 1.f / static_cast<float>(s.rows);
  for (int i = threadIdx.x; i < e.scored; i += kSmallThreads) {
    float sum = 0.f;
#pragma unroll 4
    for (int r = 0; r < s.rows; ++r) {
      // The staged selection (lookup_staged.cu) rounds the same way: explicit fma.
      sum = __fmaf_rn(exp2f(__ldcg(lg + r * ld + i) - row_max[r]), row_inv_z[r], sum);
    }
    sc[i] = sum * inv_rows;
  }
  __syncthreads();
}

// Resident blocks per SM the register budget aims at: three for the engine's case (16-bit, four
// rows: more loads in flight across block turnovers), two or one where q or float32 components
// need the registers.
template <typename C, int R>
constexpr int SmallMinBlocks() {
  return R > kSmallRowsNarrow ? 1 : std::is_same_v<C, uint16_t> ? 3 : 2;
}

template <typename C, int R, int kLpc>
__global__ void __launch_bounds__(kSmallThreads, (SmallMinBlocks<C, R>()))
    SmallKernel(LookupArgs a, Workspace w, int level, bool finish) {
  __shared__ float lgs[R][kSmallTile];
  __shared__ int last;
  constexpr bool kF16 = std::is_same_v<C, uint16_t>;
  const int seg = w.small_list[blockIdx.y];
  const LookupSegment& s = a.segments[seg];
  if (!AtLevel(s, level)) return;  // the whole grid row: its counter stays untouched
  const bool scoring = ScoredAtLevel(s, level);
  if (scoring) {
    const EntrySet e = GetEntrySet(s, level, w.ints, a.head_dim, kF16);
    const int base = blockIdx.x * kSmallTile;
    if (base < e.total) {
      ScoreTile<C, R, kLpc>(a, s, e, base, lgs, w.floats + s.logit_offset + base,
                            static_cast<size_t>(s.entry_capacity),
                            w.floats + s.tstat_offset + 2 * blockIdx.x,
                            static_cast<size_t>(s.tiles) * 2);
    }
  }
  if (!finish) return;  // the staged selection kernel finishes the segment
  if (!ArriveLast(w.counters + seg, gridDim.x, &last)) return;
  __shared__ ArgsBuffer args;
  args.Fill(a, w);
  if (scoring) FinishScores(args.args(), args.ws(), seg, level, kF16);
  if (a.score_only) return;
  SelectSegment<kSmallThreads>(args.args(), args.ws(), seg, level, kF16);
}

template <typename C, int R>
cudaError_t LaunchR(const LookupArgs& a, const LookupLayout& l, const Workspace& w, int level,
                    bool finish, cudaStream_t stream) {
  const dim3 grid(l.max_small_tiles, static_cast<unsigned>(l.small_list.size()));
  if (a.head_dim <= 128) {
    SmallKernel<C, R, 16><<<grid, kSmallThreads, 0, stream>>>(a, w, level, finish);
  } else {
    SmallKernel<C, R, 32><<<grid, kSmallThreads, 0, stream>>>(a, w, level, finish);
  }
  return cudaGetLastError();
}

template <typename C>
cudaError_t LaunchC(const LookupArgs& a, const LookupLayout& l, const Workspace& w, int level,
                    bool finish, cudaStream_t stream) {
  if (l.max_small_rows <= kSmallRowsNarrow)
    return LaunchR<C, kSmallRowsNarrow>(a, l, w, level, finish, stream);
  return LaunchR<C, kLookupSmallRows>(a, l, w, level, finish, stream);
}

}  // namespace

cudaError_t LaunchSmall(const LookupArgs& a, const LookupLayout& l, const Workspace& w, int level,
                        cudaStream_t stream) {
  if (l.small_list.empty()) return cudaSuccess;
  cudaError_t cluster_err = cudaSuccess;
  if (level == 2 && LaunchSmallCluster(a, l, w, stream, &cluster_err)) return cluster_err;
  const bool staged = level == 2 && UseStagedSelect(a, l);
  const cudaError_t err = l.f16 ? LaunchC<uint16_t>(a, l, w, level, !staged, stream)
                                : LaunchC<float>(a, l, w, level, !staged, stream);
  if (err != cudaSuccess || !staged) return err;
  return LaunchStagedSelect(a, l, w, stream);
}

}  // namespace sqkv::gpu::lookup_detail
