// Decode attention over 16-bit pages: few rows (<= 32) per segment, many keys.
//
// A block owns a run of key units of one segment (a unit = 16 slots of one page). Its 4 warps
// take the units in turn; each warp streams its units through a private 3-stage cp.async
// pipeline (slots past the page's valid count are never read: cp.async zero-fills them) and
// keeps its own online-softmax state for every row of the segment, computed with m16n8k16
// tensor-core products (rows padded to 16 or 32). The warps' states are merged in shared memory
// at the end; with one split the block writes out / lse, else a partial state for the merge.
// A split's run of units is cut from the segment's page count on the device (SplitOf), so the
// blocks of a segment carry equal shares whatever the host bound.
#include "gpu/kernel_trace.cuh"
#include "gpu/paged_attention_common.cuh"
#include "gpu/paged_attention_internal.cuh"

SQKV_TRACE_UNIT(decode)

namespace sqkv::gpu::detail {
namespace {

constexpr int kWarps = kThreads / 32;
constexpr int kStages = 3;

template <int D, int MT>
struct DecodeShape {
  static constexpr int kRows = MT * 16;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per 16-bit row
  static constexpr int kUnitElems = kUnitSlots * D;
  static constexpr int kStageElems = 2 * kUnitElems;  // K then V
  static constexpr int kWarpElems = kStages * kStageElems;
  static constexpr int kOStride = D + 4;  // floats per row of the combine buffer
  static constexpr size_t kQBytes = size_t{kRows} * D * 2;
  static constexpr size_t kPipeBytes = size_t{kWarps} * kWarpElems * 2;
  static constexpr size_t kCombineBytes = size_t{kWarps} * kRows * (kOStride + 2) * 4;
  static constexpr size_t kSmemBytes =
      kQBytes + (kPipeBytes > kCombineBytes ? kPipeBytes : kCombineBytes);
};

template <typename T, int D, int MT>
__global__ void __launch_bounds__(kThreads, 2) DecodeKernel(const KernelParams p) {
  using S = DecodeShape<D, MT>;
  constexpr int C = S::kChunks;
  constexpr int kQLoads = S::kRows * C / kThreads;  // 16-byte Q chunks staged per thread
  static_assert(S::kRows * C % kThreads == 0, "Q chunks must spread evenly over the threads");
  extern __shared__ __align__(kSmemAlign) unsigned char smem[];
  T* sq = reinterpret_cast<T*>(smem);
  T* spipe = reinterpret_cast<T*>(smem + S::kQBytes);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int seg = blockIdx.x / p.splits;
  const int split = blockIdx.x % p.splits;
  SQKV_TRACE_START(TraceKernel::kDecode);

  // Before the wait, only what the kernel before this one (the lookup, in a dependent launch)
  // does not write: the segment's rows and its Q rows. Q is loaded into registers here and
  // converted after the page count's load is issued, so the two loads overlap.
  const int rows = max(0, min(p.seg_rows[seg], S::kRows));
  const int q_row = p.seg_q_row[seg];
  const int page_off = p.seg_page_offset[seg];
  float4 q_lo[kQLoads], q_hi[kQLoads];
#pragma unroll
  for (int j = 0; j < kQLoads; ++j) {
    const int i = tid + j * kThreads, r = i / C, c = i % C;
    q_lo[j] = q_hi[j] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (r < rows) {
      const float* src = p.q + static_cast<size_t>(q_row + r) * D + c * 8;
      q_lo[j] = *reinterpret_cast<const float4*>(src);
      q_hi[j] = *reinterpret_cast<const float4*>(src + 4);
    }
  }
  // Every block waits (none returns before), so this grid, and the split merge that depends on
  // it, never finish before the kernel before it.
  GridDependencyWait();
  SQKV_TRACE_WAIT(TraceKernel::kDecode);
  // Counts past the host bound are a contract violation; the extra pages are ignored.
  const int count = max(0, min(p.seg_page_count[seg], p.max_pages));
  // Q → shared memory in the storage type; rows past the segment are zero.
#pragma unroll
  for (int j = 0; j < kQLoads; ++j) {
    const int i = tid + j * kThreads, r = i / C, c = i % C;
    reinterpret_cast<uint4*>(sq)[Swizzle<C>(r, c)] = Convert8<T>(q_lo[j], q_hi[j]);
  }
  if (rows == 0) return;
  const int work = count * p.units_per_page;
  const SplitRange range = SplitOf(work, p.splits, split);
  if (split > 0 && range.begin >= work) return;  // split 0 always runs: it writes the empty state
  const int u0 = range.begin, u1 = range.end;
  const int page_tokens = p.page_tokens;
  const T* pool = static_cast<const T*>(p.pool);

  // Unit k of this warp is u0 + warp + k * kWarps.
  const int span = u1 - u0;
  const int n_mine = span > warp ? (span - warp + kWarps - 1) / kWarps : 0;

  // Page info of the warp's units, kept a window ahead so no copy waits on a page-list load:
  // lane j holds unit base + j (cur_*) and unit base + 32 + j (nxt_*, in flight). row: the unit's
  // first K row in the pool, counted in head_dim-element rows.
  auto load_info = [&](int k, uint32_t& row, int& valid) {
    row = 0;
    valid = 0;
    if (k < n_mine) {
      const int u = u0 + warp + k * kWarps;
      const int page = u / p.units_per_page;
      const int sub = u - page * p.units_per_page;
      const uint32_t pid = static_cast<uint32_t>(__ldg(p.page_ids + page_off + page));
      const int pv = min(max(__ldg(p.page_valid + page_off + page), 0), page_tokens);
      row = pid * static_cast<uint32_t>(2 * page_tokens) + sub * kUnitSlots;
      valid = min(pv - sub * kUnitSlots, kUnitSlots);
    }
  };
  uint32_t cur_row, nxt_row;
  int cur_valid, nxt_valid, base = 0;
  load_info(lane, cur_row, cur_valid);
  load_info(32 + lane, nxt_row, nxt_valid);
  // Info of unit k; k must grow by one per call.
  uint32_t next_row = 0;
  int next_valid = 0;
  auto fetch = [&](int k) {
    if (k - base >= 32) {
      base += 32;
      cur_row = nxt_row;
      cur_valid = nxt_valid;
      load_info(base + 32 + lane, nxt_row, nxt_valid);
    }
    next_row = __shfl_sync(0xffffffffu, cur_row, k - base);
    next_valid = __shfl_sync(0xffffffffu, cur_valid, k - base);
  };
  __syncthreads();  // Q is in shared memory

  T* wpipe = spipe + warp * S::kWarpElems;
  const uint32_t wpipe_addr = SmemAddr(wpipe);
  const uint32_t q_addr = SmemAddr(sq);
  const LdmAddr<C> a_addr(lane % 8 + ((lane / 8) % 2) * 8, lane / 16, lane);  // Q, V (trans)
  const LdmAddr<C> b_addr((lane / 16) * 8 + lane % 8, (lane / 8) % 2, lane);  // K

  auto issue = [&](int stage) {
    if (next_valid <= 0) return;
    const uint32_t dk = wpipe_addr + stage * S::kStageElems * 2;
    const uint32_t dv = dk + S::kUnitElems * 2;
#pragma unroll
    for (int i = 0; i < kUnitSlots * C / 32; ++i) {
      const int idx = lane + 32 * i;
      const int r = idx / C, c = idx % C;
      const bool ok = r < next_valid;
      const T* src = pool + (static_cast<size_t>(next_row) + r) * D + c * 8;
      const uint32_t off = Swizzle<C>(r, c) * 16;
      CpAsync16(dk + off, ok ? src : pool, ok ? 16 : 0);
      CpAsync16(dv + off, ok ? src + static_cast<size_t>(page_tokens) * D : pool, ok ? 16 : 0);
    }
  };

  float o[MT][D / 8][4];
  float m[MT][2], l[MT][2];
  ZeroSoftmaxState(o, m, l);

  // Valid slots of the units in the three stages: computed (va), next (vb), newest (vc).
  int va = 0, vb = 0, vc = 0;
  fetch(0);
  va = next_valid;
  issue(0);
  CpAsyncCommit();
  fetch(1);
  vb = next_valid;
  issue(1);
  CpAsyncCommit();
  fetch(2);
  int stage = 0;
  for (int k = 0; k < n_mine; ++k) {
    const int stage_new = stage == 0 ? 2 : stage - 1;  // (k + 2) % 3
    vc = next_valid;
    issue(stage_new);
    CpAsyncCommit();
    fetch(k + 3);
    CpAsyncWait<kStages - 1>();
    __syncwarp();

    if (va > 0) {
      const uint32_t k_addr = wpipe_addr + stage * S::kStageElems * 2;
      const uint32_t v_addr = k_addr + S::kUnitElems * 2;
      float s[MT][2][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int j = 0; j < 8; ++j) s[mt][j / 4][j % 4] = 0.f;
      }
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t kb[4];
        LdMatrixX4(kb, b_addr.At(k_addr, 0, ks));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          uint32_t qa[4];
          LdMatrixX4(qa, a_addr.At(q_addr, mt * 16, ks));
          Half16<T>::Mma(s[mt][0], qa, kb[0], kb[1]);
          Half16<T>::Mma(s[mt][1], qa, kb[2], kb[3]);
        }
      }
      // Scale, mask the slots past the valid count, online softmax (base 2).
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int key = nt * 8 + (lane % 4) * 2 + (j & 1);
            s[mt][nt][j] = key < va ? s[mt][nt][j] * p.scale_log2 : NegInf();
          }
        }
        float corr[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float mx = fmaxf(fmaxf(s[mt][0][2 * h], s[mt][0][2 * h + 1]),
                           fmaxf(s[mt][1][2 * h], s[mt][1][2 * h + 1]));
          mx = QuadMax(mx);
          const float m_new = fmaxf(m[mt][h], mx);
          const float m_use = m_new == NegInf() ? 0.f : m_new;
          corr[h] = FastExp2(m[mt][h] - m_use);
          m[mt][h] = m_new;
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
            for (int j = 2 * h; j < 2 * h + 2; ++j) {
              s[mt][nt][j] = FastExp2(s[mt][nt][j] - m_use);
              sum += s[mt][nt][j];
            }
          }
          l[mt][h] = l[mt][h] * corr[h] + sum;
        }
        // Rescale only when a row's max moved (rare once the max has settled).
        if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
          for (int dn = 0; dn < D / 8; ++dn) {
            o[mt][dn][0] *= corr[0];
            o[mt][dn][1] *= corr[0];
            o[mt][dn][2] *= corr[1];
            o[mt][dn][3] *= corr[1];
          }
        }
      }
      // O += P · V: the score accumulators are already in the A-fragment layout.
      uint32_t pa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pa[mt][0] = Half16<T>::Pack(s[mt][0][0], s[mt][0][1]);
        pa[mt][1] = Half16<T>::Pack(s[mt][0][2], s[mt][0][3]);
        pa[mt][2] = Half16<T>::Pack(s[mt][1][0], s[mt][1][1]);
        pa[mt][3] = Half16<T>::Pack(s[mt][1][2], s[mt][1][3]);
      }
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t vb4[4];
        LdMatrixX4Trans(vb4, a_addr.At(v_addr, 0, dn));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Half16<T>::Mma(o[mt][2 * dn], pa[mt], vb4[0], vb4[1]);
          Half16<T>::Mma(o[mt][2 * dn + 1], pa[mt], vb4[2], vb4[3]);
        }
      }
    }
    __syncwarp();
    va = vb;
    vb = vc;
    stage = stage == 2 ? 0 : stage + 1;
  }
  CpAsyncWait<0>();
  GridDependencyTrigger();
  __syncthreads();  // every warp is done with its pipeline: reuse it for the combine

  float* so = reinterpret_cast<float*>(spipe);        // (kWarps, kRows, kOStride)
  float* sml = so + kWarps * S::kRows * S::kOStride;  // (kWarps, kRows, 2): m, l
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = mt * 16 + lane / 4 + 8 * h;
      const float lsum = QuadSum(l[mt][h]);
      if (lane % 4 == 0) {
        sml[(warp * S::kRows + row) * 2] = m[mt][h];
        sml[(warp * S::kRows + row) * 2 + 1] = lsum;
      }
      float* dst = so + (warp * S::kRows + row) * S::kOStride + (lane % 4) * 2;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        *reinterpret_cast<float2*>(dst + dn * 8) =
            make_float2(o[mt][dn][2 * h], o[mt][dn][2 * h + 1]);
      }
    }
  }
  __syncthreads();

  for (int i = tid; i < rows * (D / 4); i += kThreads) {
    const int r = i / (D / 4), c = (i % (D / 4)) * 4;
    float mw[kWarps];
    float mx = NegInf();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      mw[w] = sml[(w * S::kRows + r) * 2];
      mx = fmaxf(mx, mw[w]);
    }
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    float lse_val = NegInf();
    if (mx != NegInf()) {
      float lsum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float wt = exp2f(mw[w] - mx);
        lsum += wt * sml[(w * S::kRows + r) * 2 + 1];
        const float4 v =
            *reinterpret_cast<const float4*>(so + (w * S::kRows + r) * S::kOStride + c);
        acc.x += wt * v.x;
        acc.y += wt * v.y;
        acc.z += wt * v.z;
        acc.w += wt * v.w;
      }
      const float inv = 1.f / lsum;
      acc.x *= inv;
      acc.y *= inv;
      acc.z *= inv;
      acc.w *= inv;
      lse_val = (mx + log2f(lsum)) * kLn2;
    }
    if (p.splits == 1) {
      *reinterpret_cast<float4*>(p.out + static_cast<size_t>(q_row + r) * D + c) = acc;
      if (c == 0) p.lse[q_row + r] = lse_val;
    } else {
      const size_t prow = (static_cast<size_t>(seg) * p.splits + split) * p.rows_cap + r;
      *reinterpret_cast<float4*>(p.part_o + prow * D + c) = acc;
      if (c == 0) p.part_lse[prow] = lse_val;
    }
  }
  SQKV_TRACE_END(TraceKernel::kDecode);
}

template <typename T, int D, int MT>
Status Info(KernelInfo* info) {
  static DeviceCache cache;
  return QueryKernelOnDevice(cache, DecodeKernel<T, D, MT>,
                             static_cast<int>(DecodeShape<D, MT>::kSmemBytes), info);
}

template <typename T, int D, int MT>
Status Launch(const KernelParams& p, const Plan& plan, cudaStream_t stream) {
  KernelInfo info;
  SQKV_RETURN_IF_ERROR((Info<T, D, MT>(&info)));
  const int64_t blocks = static_cast<int64_t>(p.num_segments) * plan.splits;
  return LaunchKernel(DecodeKernel<T, D, MT>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads),
                      DecodeShape<D, MT>::kSmemBytes, stream, plan.dependent_first,
                      "decode attention kernel", p);
}

// Calls F<T, D, MT>(args...) for the runtime dtype / head_dim / m tiles.
template <template <typename, int, int> class F, typename... A>
Status Dispatch(DType dtype, int head_dim, int mtiles, A&&... args) {
#define SQKV_DECODE_CASE(TYPE, DIM, MTILES) \
  if (head_dim == DIM && mtiles == MTILES) return F<TYPE, DIM, MTILES>::Run(args...);
  if (dtype == DType::kBF16) {
    SQKV_DECODE_CASE(__nv_bfloat16, 64, 1)
    SQKV_DECODE_CASE(__nv_bfloat16, 64, 2)
    SQKV_DECODE_CASE(__nv_bfloat16, 128, 1)
    SQKV_DECODE_CASE(__nv_bfloat16, 128, 2)
  } else if (dtype == DType::kF16) {
    SQKV_DECODE_CASE(__half, 64, 1)
    SQKV_DECODE_CASE(__half, 64, 2)
    SQKV_DECODE_CASE(__half, 128, 1)
    SQKV_DECODE_CASE(__half, 128, 2)
  }
#undef SQKV_DECODE_CASE
  return Status::InvalidArgument("decode attention: no kernel for this dtype / head_dim");
}

template <typename T, int D, int MT>
struct InfoOp {
  static Status Run(KernelInfo* info) { return Info<T, D, MT>(info); }
};
template <typename T, int D, int MT>
struct LaunchOp {
  static Status Run(const KernelParams& p, const Plan& plan, cudaStream_t stream) {
    return Launch<T, D, MT>(p, plan, stream);
  }
};

}  // namespace

Status DecodeInfo(DType dtype, int head_dim, int mtiles, KernelInfo* info) {
  return Dispatch<InfoOp>(dtype, head_dim, mtiles, info);
}

Status LaunchDecode(DType dtype, int head_dim, int mtiles, const KernelParams& p, const Plan& plan,
                    cudaStream_t stream) {
  return Dispatch<LaunchOp>(dtype, head_dim, mtiles, p, plan, stream);
}

}  // namespace sqkv::gpu::detail
