// Prefill attention over 16-bit pages: hundreds to thousands of rows per segment.
//
// A pre-pass compacts each segment's valid token slots (page-list order) into a list of pool
// rows, so key tiles hold no padding. The main kernel is FlashAttention-2 shaped: a block takes
// a 128-row tile of one segment (4 warps × 32 rows) and a run of 64-key tiles, gathers each tile's
// K and V rows by pool row with cp.async (double-buffered), and computes S = Q·Kᵀ and O += P·V
// with m16n8k16 tensor-core products, Q converted to the storage type in shared memory once.
#include <type_traits>

#include "gpu/kernel_trace.cuh"
#include "gpu/paged_attention_common.cuh"
#include "gpu/paged_attention_internal.cuh"

SQKV_TRACE_UNIT(prefill)

namespace sqkv::gpu::detail {
namespace {

constexpr int kCompactThreads = 256;
// Blocks a segment's compaction is cut into at most (each sums the valid slots of the pages
// before its own, so the reads grow with the square of this).
constexpr int kCompactMaxChunks = 16;
constexpr int kMt = kPrefillRows / (16 * (kThreads / 32));  // 16-row m tiles per warp: 2
constexpr int kNt = kPrefillKeys / 8;                       // 8-key n tiles per key tile: 8
static_assert(kMt == 2, "the rescale vote below names both m tiles");

// Pages a compaction block takes: a multiple of kCompactThreads, at most kCompactMaxChunks blocks
// a segment.
int CompactChunkPages(int max_pages) {
  const int per = (max(max_pages, 1) + kCompactMaxChunks - 1) / kCompactMaxChunks;
  return max(1, (per + kCompactThreads - 1) / kCompactThreads) * kCompactThreads;
}

// tok_rows[s][...] = pool rows of segment s's valid slots in page-list order, tok_count[s] =
// how many. Grid (segments, chunks): block (s, c) takes pages [c·chunk, (c + 1)·chunk) of s's
// list. Its first slot is the sum of the valid slots before, which the block adds up itself (a
// few loads a thread); then kCompactThreads pages a step: a block scan gives each page its first
// slot, and each warp writes whole pages, a page's rows by consecutive lanes, so every store is
// contiguous. The block holding the list's last page (block 0 for an empty list) writes the
// count. (One 1,024-thread block a segment walking the whole list took 11 µs at 128K prefill,
// ≈ 1,200 pages a segment: bench/NOTES-gpu-attention.md.)
__global__ void __launch_bounds__(kCompactThreads) CompactKernel(const KernelParams p,
                                                                 int chunk_pages) {
  constexpr int kWarps = kCompactThreads / 32;
  __shared__ int warp_sums[kWarps];
  __shared__ int warp_before[kWarps];          // the sum of the pages before the chunk, by warp
  __shared__ int page_start[kCompactThreads];  // the step's pages: first slot, step-relative
  __shared__ int page_count[kCompactThreads];  // valid slots
  __shared__ uint32_t page_row[kCompactThreads];
  SQKV_TRACE_START(TraceKernel::kCompact);
  GridDependencyTrigger();  // the prefill kernel may start loading its Q tile now
  const int seg = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int page_off = p.seg_page_offset[seg];
  // The page lists of the kernel before (the lookup, in a dependent launch). Every block waits,
  // so the prefill kernel, which waits for this grid, also comes after that kernel.
  GridDependencyWait();
  SQKV_TRACE_WAIT(TraceKernel::kCompact);
  const int count = max(0, min(p.seg_page_count[seg], p.max_pages));
  const int page_tokens = p.page_tokens;
  const int b0 = static_cast<int>(blockIdx.y) * chunk_pages;
  if (blockIdx.y > 0 && b0 >= count) return;
  const int b1 = min(count, b0 + chunk_pages);
  auto valid_of = [&](int i) {
    return min(max(__ldcg(p.page_valid + page_off + i), 0), page_tokens);
  };
  auto load = [&](int i, int& valid, uint32_t& row) {
    valid = 0;
    row = 0;
    if (i < b1) {
      valid = valid_of(i);
      row = static_cast<uint32_t>(__ldcg(p.page_ids + page_off + i)) *
            static_cast<uint32_t>(2 * page_tokens);
    }
  };
  int next_valid;
  uint32_t next_row;
  load(b0 + tid, next_valid, next_row);
  int before = 0;  // valid slots of pages [0, b0)
  {
    constexpr int kHeld = 4;  // loads a thread issues together
    for (int i0 = 0; i0 < b0; i0 += kHeld * kCompactThreads) {
      int v[kHeld];
#pragma unroll
      for (int k = 0; k < kHeld; ++k) {
        const int i = i0 + k * kCompactThreads + tid;
        v[k] = i < b0 ? valid_of(i) : 0;
      }
#pragma unroll
      for (int k = 0; k < kHeld; ++k) before += v[k];
    }
    before = __reduce_add_sync(0xffffffffu, before);
    if (lane == 0) warp_before[warp] = before;
    __syncthreads();
    before = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) before += warp_before[w];
  }
  uint32_t* dst = PrefillKeyRows(p, seg);
  // Lanes per page in the writes: 16 for pages of up to 16 tokens (two pages a warp), else 32.
  const int sub = page_tokens <= 16 ? 16 : 32;
  const int per_warp = 32 / sub;
  int base = before;
  for (int c0 = b0; c0 < b1; c0 += kCompactThreads) {
    const int valid = next_valid;
    const uint32_t row = next_row;
    load(c0 + kCompactThreads + tid, next_valid, next_row);
    int incl = valid;  // inclusive scan within the warp
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int v = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += v;
    }
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    int warps_before = 0, total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int ws = warp_sums[w];
      warps_before += w < warp ? ws : 0;
      total += ws;
    }
    page_start[tid] = warps_before + incl - valid;
    page_count[tid] = valid;
    page_row[tid] = row;
    __syncthreads();
    const int pages = min(kCompactThreads, b1 - c0);
    for (int k = warp * per_warp + lane / sub; k < pages; k += kWarps * per_warp) {
      const int start = base + page_start[k], n = page_count[k];
      const uint32_t r = page_row[k];
      for (int t = lane % sub; t < n; t += sub) dst[start + t] = r + t;
    }
    base += total;
    __syncthreads();  // warp_sums and the page arrays are rewritten by the next step
  }
  if (tid == 0 && b1 == count) p.tok_count[seg] = base;
  SQKV_TRACE_END(TraceKernel::kCompact);
}

template <int D>
struct PrefillShape {
  static constexpr int kChunks = D / 8;
  static constexpr int kQElems = kPrefillRows * D;
  static constexpr int kTileElems = kPrefillKeys * D;
  static constexpr size_t kSmemBytes =
      (size_t{kQElems} + 4 * size_t{kTileElems}) * 2;  // Q, 2×(K,V)
  // Tile loading: thread → chunk (tid % kChunks) of rows tid / kChunks + i * kRowStep.
  static constexpr int kRowStep = kThreads / kChunks;
  static constexpr int kRowsPerThread = kPrefillKeys / kRowStep;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2) PrefillKernel(const KernelParams p) {
  using S = PrefillShape<D>;
  constexpr int C = S::kChunks;
  extern __shared__ __align__(kSmemAlign) unsigned char smem[];
  T* sq = reinterpret_cast<T*>(smem);
  T* skv = sq + S::kQElems;  // stage s: K at skv + 2s·tile, V at skv + (2s+1)·tile
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const PrefillBlock blk = PrefillBlockOf(p);
  const int split = blk.split, seg = blk.seg, rows = blk.rows, r0 = blk.r0;
  if (r0 >= rows) {
    GridDependencyWait();  // every block waits, so this grid never finishes before the pre-pass
    return;
  }
  const int q_row = p.seg_q_row[seg];

  // Q tile → shared memory in the storage type (independent of the pre-pass: runs before the wait).
  StagePrefillQ<T, D, kThreads>(
      p, blk, q_row, [&](int r, int c) { return reinterpret_cast<uint4*>(sq) + Swizzle<C>(r, c); });

  GridDependencyWait();  // the compact lists of the pre-pass
  const int ntok = PrefillKeyCount(p, seg);
  const int tiles = (ntok + kPrefillKeys - 1) / kPrefillKeys;
  const SplitRange range = SplitOf(tiles, p.splits, split);  // even shares of the actual tiles
  if (split > 0 && range.begin >= tiles) return;
  const int t0 = range.begin, t1 = range.end;
  const uint32_t* toks = PrefillKeyRows(p, seg);
  const T* pool = static_cast<const T*>(p.pool);
  const size_t v_offset = static_cast<size_t>(p.page_tokens) * D;

  // Pool rows of this thread's key rows in the next tile to issue (fetched a tile ahead).
  const int my_chunk = tid % C, my_row0 = tid / C;
  uint32_t next_rows[S::kRowsPerThread];
  auto fetch = [&](int tile) {
#pragma unroll
    for (int i = 0; i < S::kRowsPerThread; ++i) {
      const int t = tile * kPrefillKeys + my_row0 + i * S::kRowStep;
      next_rows[i] = t < ntok ? __ldcg(toks + t) : 0xffffffffu;  // L2: written by the pre-pass
    }
  };
  const uint32_t skv_addr = SmemAddr(skv);
  auto issue = [&](int stage) {
    const uint32_t dk = skv_addr + 2 * stage * S::kTileElems * 2;
    const uint32_t dv = dk + S::kTileElems * 2;
#pragma unroll
    for (int i = 0; i < S::kRowsPerThread; ++i) {
      const int r = my_row0 + i * S::kRowStep;
      const bool ok = next_rows[i] != 0xffffffffu;
      const T* src = pool + static_cast<size_t>(next_rows[i]) * D + my_chunk * 8;
      const uint32_t off = Swizzle<C>(r, my_chunk) * 16;
      CpAsync16(dk + off, ok ? src : pool, ok ? 16 : 0);
      CpAsync16(dv + off, ok ? src + v_offset : pool, ok ? 16 : 0);
    }
  };

  float o[kMt][D / 8][4];
  float m[kMt][2], l[kMt][2];
  ZeroSoftmaxState(o, m, l);

  if (t0 < t1) {
    fetch(t0);
    issue(0);
    CpAsyncCommit();
    if (t0 + 1 < t1) fetch(t0 + 1);
  }
  const uint32_t q_addr = SmemAddr(sq);
  const int warp_row = warp * kMt * 16;
  // A operands (Q) and transposed B (V): lane reads row lane%8 + 8·((lane/8)%2), pair half lane/16.
  // B operands (K): row (lane/16)·8 + lane%8, pair half (lane/8)%2.
  const LdmAddr<C> a_addr(lane % 8 + ((lane / 8) % 2) * 8, lane / 16, lane);
  const LdmAddr<C> b_addr((lane / 16) * 8 + lane % 8, (lane / 8) % 2, lane);
  for (int tile = t0; tile < t1; ++tile) {
    const int stage = (tile - t0) & 1;
    if (tile + 1 < t1) {
      issue(stage ^ 1);
      if (tile + 2 < t1) fetch(tile + 2);
    }
    CpAsyncCommit();
    CpAsyncWait<1>();
    __syncthreads();

    const uint32_t k_addr = skv_addr + 2 * stage * S::kTileElems * 2;
    const uint32_t v_addr = k_addr + S::kTileElems * 2;
    float s[kMt][kNt][4];
#pragma unroll
    for (int mt = 0; mt < kMt; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt) {
#pragma unroll
        for (int j = 0; j < 4; ++j) s[mt][nt][j] = 0.f;
      }
    }
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t qa[kMt][4];
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt) {
        LdMatrixX4(qa[mt], a_addr.At(q_addr, warp_row + mt * 16, ks));
      }
#pragma unroll
      for (int np = 0; np < kNt / 2; ++np) {
        uint32_t kb[4];
        LdMatrixX4(kb, b_addr.At(k_addr, np * 16, ks));
#pragma unroll
        for (int mt = 0; mt < kMt; ++mt) {
          Half16<T>::Mma(s[mt][2 * np], qa[mt], kb[0], kb[1]);
          Half16<T>::Mma(s[mt][2 * np + 1], qa[mt], kb[2], kb[3]);
        }
      }
    }
    // Scale; mask keys past the end (only the last tile has any); online softmax in base 2.
    const int valid = ntok - tile * kPrefillKeys;
#pragma unroll
    for (int mt = 0; mt < kMt; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt) {
#pragma unroll
        for (int j = 0; j < 4; ++j) s[mt][nt][j] *= p.scale_log2;
      }
    }
    if (valid < kPrefillKeys) {
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kNt; ++nt) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int key = nt * 8 + (lane % 4) * 2 + (j & 1);
            if (key >= valid) s[mt][nt][j] = NegInf();
          }
        }
      }
    }
    float corr[kMt][2];
#pragma unroll
    for (int mt = 0; mt < kMt; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = NegInf();
#pragma unroll
        for (int nt = 0; nt < kNt; ++nt)
          mx = fmaxf(mx, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
        mx = QuadMax(mx);
        const float m_new = fmaxf(m[mt][h], mx);
        const float m_use = m_new == NegInf() ? 0.f : m_new;
        corr[mt][h] = FastExp2(m[mt][h] - m_use);
        m[mt][h] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNt; ++nt) {
#pragma unroll
          for (int j = 2 * h; j < 2 * h + 2; ++j) {
            s[mt][nt][j] = FastExp2(s[mt][nt][j] - m_use);
            sum += s[mt][nt][j];
          }
        }
        l[mt][h] = l[mt][h] * corr[mt][h] + sum;
      }
    }
    // Rescale O only when some row's max moved (rare once the maxima have settled).
    if (__any_sync(0xffffffffu, corr[0][0] != 1.f || corr[0][1] != 1.f || corr[1][0] != 1.f ||
                                    corr[1][1] != 1.f)) {
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt) {
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
          o[mt][dn][0] *= corr[mt][0];
          o[mt][dn][1] *= corr[mt][0];
          o[mt][dn][2] *= corr[mt][1];
          o[mt][dn][3] *= corr[mt][1];
        }
      }
    }
    // O += P · V, 16 keys at a time.
#pragma unroll
    for (int kk = 0; kk < kNt / 2; ++kk) {
      uint32_t pa[kMt][4];
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt) {
        pa[mt][0] = Half16<T>::Pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][1] = Half16<T>::Pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][2] = Half16<T>::Pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][3] = Half16<T>::Pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t vb[4];
        LdMatrixX4Trans(vb, a_addr.At(v_addr, kk * 16, dn));
#pragma unroll
        for (int mt = 0; mt < kMt; ++mt) {
          Half16<T>::Mma(o[mt][2 * dn], pa[mt], vb[0], vb[1]);
          Half16<T>::Mma(o[mt][2 * dn + 1], pa[mt], vb[2], vb[3]);
        }
      }
    }
    __syncthreads();  // the stage is refilled by the next iteration's issue
  }
  CpAsyncWait<0>();
  GridDependencyTrigger();

  // Epilogue straight from the accumulators.
#pragma unroll
  for (int mt = 0; mt < kMt; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = r0 + warp_row + mt * 16 + lane / 4 + 8 * h;
      const float lsum = QuadSum(l[mt][h]);
      if (r >= rows) continue;
      const PrefillRowOut out = PrefillRowOutOf(p, blk, q_row, r, D, m[mt][h], lsum);
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        *reinterpret_cast<float2*>(out.o + dn * 8 + (lane % 4) * 2) =
            make_float2(o[mt][dn][2 * h] * out.inv, o[mt][dn][2 * h + 1] * out.inv);
      }
      if (lane % 4 == 0) *out.lse = out.lse_val;
    }
  }
}

template <typename T, int D>
Status Info(KernelInfo* info) {
  static DeviceCache cache;
  return QueryKernelOnDevice(cache, PrefillKernel<T, D>,
                             static_cast<int>(PrefillShape<D>::kSmemBytes), info);
}

template <typename T>
constexpr DType DTypeOf() {
  return std::is_same_v<T, __half> ? DType::kF16 : DType::kBF16;
}

template <typename T, int D>
Status Launch(const KernelParams& p, const Plan& plan, cudaStream_t stream) {
  KernelInfo info;
  if (!plan.prefill_wgmma) SQKV_RETURN_IF_ERROR((Info<T, D>(&info)));
  static const Status carveout = PreferShared(CompactKernel);
  SQKV_RETURN_IF_ERROR(carveout);
  const int chunk_pages = CompactChunkPages(p.max_pages);
  const int chunks = (max(p.max_pages, 1) + chunk_pages - 1) / chunk_pages;
  SQKV_RETURN_IF_ERROR(LaunchKernel(CompactKernel,
                                    dim3(p.num_segments, static_cast<unsigned>(chunks)),
                                    dim3(kCompactThreads), 0, stream, plan.dependent_first,
                                    "prefill compaction kernel", p, chunk_pages));
  if (plan.prefill_wgmma) return LaunchPrefillWgmmaKernel(DTypeOf<T>(), p, plan, stream);
  const int64_t blocks = static_cast<int64_t>(p.num_segments) * plan.splits * plan.row_tiles;
  return LaunchKernel(PrefillKernel<T, D>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads),
                      PrefillShape<D>::kSmemBytes, stream, /*dependent=*/true,
                      "prefill attention kernel", p);
}

}  // namespace

Status PrefillInfo(DType dtype, int head_dim, bool wgmma, KernelInfo* info) {
  if (wgmma && head_dim == 128 && dtype != DType::kF32) return PrefillWgmmaInfo(dtype, info);
  if (dtype == DType::kBF16 && head_dim == 64) return Info<__nv_bfloat16, 64>(info);
  if (dtype == DType::kBF16 && head_dim == 128) return Info<__nv_bfloat16, 128>(info);
  if (dtype == DType::kF16 && head_dim == 64) return Info<__half, 64>(info);
  if (dtype == DType::kF16 && head_dim == 128) return Info<__half, 128>(info);
  return Status::InvalidArgument("prefill attention: no kernel for this dtype / head_dim");
}

Status LaunchPrefill(DType dtype, int head_dim, const KernelParams& p, const Plan& plan,
                     cudaStream_t stream) {
  if (dtype == DType::kBF16 && head_dim == 64) return Launch<__nv_bfloat16, 64>(p, plan, stream);
  if (dtype == DType::kBF16 && head_dim == 128) return Launch<__nv_bfloat16, 128>(p, plan, stream);
  if (dtype == DType::kF16 && head_dim == 64) return Launch<__half, 64>(p, plan, stream);
  if (dtype == DType::kF16 && head_dim == 128) return Launch<__half, 128>(p, plan, stream);
  return Status::InvalidArgument("prefill attention: no kernel for this dtype / head_dim");
}

}  // namespace sqkv::gpu::detail
