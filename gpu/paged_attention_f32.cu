// Attention over float32 pages on the CUDA cores (a correctness path, not a fast one).
//
// A block takes a 16-row tile of one segment and a run of 16-slot key units; 8 threads share a
// row: each scores 2 keys of the unit and accumulates head_dim / 8 output columns. K and V units
// are double-buffered through shared memory with cp.async; slots past the valid count are never
// read.
#include "gpu/paged_attention_common.cuh"
#include "gpu/paged_attention_internal.cuh"

namespace sqkv::gpu::detail {
namespace {

constexpr int kLanesPerRow = kThreads / kF32Rows;  // 8

template <int D>
struct F32Shape {
  static constexpr int kStride = D + 4;  // floats per shared row: conflict-free float4 reads
  static constexpr int kVec = D / 4;     // float4 per row
  static constexpr int kUnitFloats = kUnitSlots * kStride;
  static constexpr size_t kSmemBytes = (size_t{kF32Rows} * kStride + 4 * size_t{kUnitFloats}) * 4;
  static constexpr int kColVecs = D / (4 * kLanesPerRow);  // float4 columns per thread
};

template <int D>
__global__ void __launch_bounds__(kThreads) F32Kernel(const KernelParams p) {
  using S = F32Shape<D>;
  extern __shared__ __align__(kSmemAlign) unsigned char smem[];
  float* sq = reinterpret_cast<float*>(smem);
  float* skv = sq + kF32Rows * S::kStride;  // stage s: K at 2s·unit, V at (2s+1)·unit
  const int tid = threadIdx.x, lane = tid % 32;
  const int rt = blockIdx.x % p.row_tiles;
  const int split = (blockIdx.x / p.row_tiles) % p.splits;
  const int seg = blockIdx.x / (p.row_tiles * p.splits);

  const int rows = max(0, min(p.seg_rows[seg], p.rows_cap));
  const int r0 = rt * kF32Rows;
  const int q_row = p.seg_q_row[seg];
  const int page_off = p.seg_page_offset[seg];
  const int page_tokens = p.page_tokens;
  const float* pool = static_cast<const float*>(p.pool);

  // Q tile → shared memory: independent of the kernel before (the lookup, in a dependent launch).
  if (r0 < rows) {
    for (int i = tid; i < kF32Rows * S::kVec; i += kThreads) {
      const int r = i / S::kVec, c = i % S::kVec;
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (r0 + r < rows) {
        v = *reinterpret_cast<const float4*>(p.q + static_cast<size_t>(q_row + r0 + r) * D + c * 4);
      }
      *reinterpret_cast<float4*>(sq + r * S::kStride + c * 4) = v;
    }
  }
  GridDependencyWait();  // every block waits before it returns or reads the page lists
  if (r0 >= rows) return;
  const int count = max(0, min(p.seg_page_count[seg], p.max_pages));
  const int work = count * p.units_per_page;
  const SplitRange range = SplitOf(work, p.splits, split);  // even shares of the actual units
  if (split > 0 && range.begin >= work) return;
  const int u0 = range.begin, u1 = range.end;

  uint32_t next_row = 0;
  int next_valid = 0;
  auto fetch = [&](int u) {
    next_row = 0;
    next_valid = 0;
    if (u < u1) {
      const int page = u / p.units_per_page;
      const int sub = u - page * p.units_per_page;
      const uint32_t pid = static_cast<uint32_t>(__ldg(p.page_ids + page_off + page));
      const int valid = min(max(__ldg(p.page_valid + page_off + page), 0), page_tokens);
      next_row = pid * static_cast<uint32_t>(2 * page_tokens) + sub * kUnitSlots;
      next_valid = min(valid - sub * kUnitSlots, kUnitSlots);
    }
  };
  const uint32_t skv_addr = SmemAddr(skv);
  auto issue = [&](int stage) {
    if (next_valid <= 0) return;
    const uint32_t dk = skv_addr + 2 * stage * S::kUnitFloats * 4;
    const uint32_t dv = dk + S::kUnitFloats * 4;
    for (int i = tid; i < kUnitSlots * S::kVec; i += kThreads) {
      const int r = i / S::kVec, c = i % S::kVec;
      const bool ok = r < next_valid;
      const float* src = pool + (static_cast<size_t>(next_row) + r) * D + c * 4;
      const uint32_t off = (r * S::kStride + c * 4) * 4;
      CpAsync16(dk + off, ok ? src : pool, ok ? 16 : 0);
      CpAsync16(dv + off, ok ? src + static_cast<size_t>(page_tokens) * D : pool, ok ? 16 : 0);
    }
  };

  const int r = tid / kLanesPerRow, lg = tid % kLanesPerRow;
  const int group = lane & ~(kLanesPerRow - 1);
  float4 o[S::kColVecs];
#pragma unroll
  for (int i = 0; i < S::kColVecs; ++i) o[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  float m = NegInf(), l = 0.f;

  fetch(u0);
  int v_cur = next_valid;
  issue(0);
  CpAsyncCommit();
  fetch(u0 + 1);
  int stage = 0;
  for (int u = u0; u < u1; ++u) {
    const int v_next = next_valid;
    issue(stage ^ 1);
    CpAsyncCommit();
    fetch(u + 2);
    CpAsyncWait<1>();
    __syncthreads();
    if (v_cur > 0) {
      const float* sk = skv + 2 * stage * S::kUnitFloats;
      const float* sv = sk + S::kUnitFloats;
      float d0 = 0.f, d1 = 0.f;
#pragma unroll 8
      for (int c = 0; c < S::kVec; ++c) {
        const float4 qv = *reinterpret_cast<const float4*>(sq + r * S::kStride + c * 4);
        const float4 k0 = *reinterpret_cast<const float4*>(sk + lg * S::kStride + c * 4);
        const float4 k1 = *reinterpret_cast<const float4*>(sk + (lg + 8) * S::kStride + c * 4);
        d0 += qv.x * k0.x + qv.y * k0.y + qv.z * k0.z + qv.w * k0.w;
        d1 += qv.x * k1.x + qv.y * k1.y + qv.z * k1.z + qv.w * k1.w;
      }
      const float s0 = lg < v_cur ? d0 * p.scale_log2 : NegInf();
      const float s1 = lg + 8 < v_cur ? d1 * p.scale_log2 : NegInf();
      float mx = fmaxf(s0, s1);
#pragma unroll
      for (int x = 1; x < kLanesPerRow; x *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, x));
      const float m_new = fmaxf(m, mx);
      const float m_use = m_new == NegInf() ? 0.f : m_new;
      const float corr = exp2f(m - m_use);
      m = m_new;
      const float p0 = exp2f(s0 - m_use), p1 = exp2f(s1 - m_use);
      l = l * corr + p0 + p1;
#pragma unroll
      for (int i = 0; i < S::kColVecs; ++i) {
        o[i].x *= corr;
        o[i].y *= corr;
        o[i].z *= corr;
        o[i].w *= corr;
      }
#pragma unroll
      for (int k = 0; k < kUnitSlots; ++k) {
        const float pk = __shfl_sync(0xffffffffu, k < 8 ? p0 : p1, group + (k & 7));
#pragma unroll
        for (int i = 0; i < S::kColVecs; ++i) {
          const float4 v = *reinterpret_cast<const float4*>(sv + k * S::kStride + lg * 4 + 32 * i);
          o[i].x += pk * v.x;
          o[i].y += pk * v.y;
          o[i].z += pk * v.z;
          o[i].w += pk * v.w;
        }
      }
    }
    __syncthreads();
    v_cur = v_next;
    stage ^= 1;
  }
  CpAsyncWait<0>();
  GridDependencyTrigger();

#pragma unroll
  for (int x = 1; x < kLanesPerRow; x *= 2) l += __shfl_xor_sync(0xffffffffu, l, x);
  if (r0 + r >= rows) return;
  const bool empty = l == 0.f;
  const float inv = empty ? 0.f : 1.f / l;
  const float lse_val = empty ? NegInf() : (m + log2f(l)) * kLn2;
  float* dst;
  float* lse_dst;
  if (p.splits == 1) {
    dst = p.out + static_cast<size_t>(q_row + r0 + r) * D;
    lse_dst = p.lse + q_row + r0 + r;
  } else {
    const size_t prow = (static_cast<size_t>(seg) * p.splits + split) * p.rows_cap + r0 + r;
    dst = p.part_o + prow * D;
    lse_dst = p.part_lse + prow;
  }
#pragma unroll
  for (int i = 0; i < S::kColVecs; ++i) {
    *reinterpret_cast<float4*>(dst + lg * 4 + 32 * i) =
        make_float4(o[i].x * inv, o[i].y * inv, o[i].z * inv, o[i].w * inv);
  }
  if (lg == 0) *lse_dst = lse_val;
}

template <int D>
Status Info(KernelInfo* info) {
  static DeviceCache cache;
  return QueryKernelOnDevice(cache, F32Kernel<D>, static_cast<int>(F32Shape<D>::kSmemBytes), info);
}

template <int D>
Status Launch(const KernelParams& p, const Plan& plan, cudaStream_t stream) {
  KernelInfo info;
  SQKV_RETURN_IF_ERROR(Info<D>(&info));
  const int64_t blocks = static_cast<int64_t>(p.num_segments) * plan.splits * plan.row_tiles;
  return LaunchKernel(F32Kernel<D>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads),
                      F32Shape<D>::kSmemBytes, stream, plan.dependent_first, "f32 attention kernel",
                      p);
}

}  // namespace

Status F32Info(int head_dim, KernelInfo* info) {
  if (head_dim == 64) return Info<64>(info);
  if (head_dim == 128) return Info<128>(info);
  return Status::InvalidArgument("f32 attention: head_dim must be 64 or 128");
}

Status LaunchF32(int head_dim, const KernelParams& p, const Plan& plan, cudaStream_t stream) {
  if (head_dim == 64) return Launch<64>(p, plan, stream);
  if (head_dim == 128) return Launch<128>(p, plan, stream);
  return Status::InvalidArgument("f32 attention: head_dim must be 64 or 128");
}

}  // namespace sqkv::gpu::detail
