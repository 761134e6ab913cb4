// Prefill attention over 16-bit pages on Hopper's warpgroup products (wgmma, sm_90a), head_dim
// 128: the same work, grid, compact key lists (the pre-pass of paged_attention_prefill.cu) and
// outputs as the mma.sync kernel there, on a different engine.
//
// A block is three warpgroups over a 128-row tile, one block per SM. Warpgroup 0 gathers: the K
// and V rows of each 128-key tile (pool rows from the compact list, fetched a tile ahead) go by
// cp.async into three 128-byte swizzled stages, K and V each handed over by their own mbarriers.
// Warpgroups 1 and 2 compute, 64 rows each, with the registers the gatherer gives up
// (setmaxnreg): S = Q·Kᵀ (m64n128, Q as register fragments loaded once from its tile, K from
// shared memory), the online softmax in registers (base 2), P converted to register A fragments,
// O += P·V (m64n128, V read transposed from its row-major tile). A tile's softmax issues while the tensor cores run the previous tile's P·V,
// and the two warpgroups take turns issuing products; every product is waited for before the
// loop's back edge (ptxas would serialize them all otherwise).
#include <type_traits>

#include "gpu/paged_attention_common.cuh"
#include "gpu/kernel_trace.cuh"
#include "gpu/paged_attention_internal.cuh"
#include "gpu/wgmma.cuh"

SQKV_TRACE_UNIT(prefill_wgmma)

namespace sqkv::gpu::detail {
namespace {

constexpr int kBlockThreads = 384;  // warpgroup 0 gathers K and V, warpgroups 1 and 2 compute
constexpr int kConsumers = 256;
constexpr int kD = 128;
constexpr int kKeys = 2 * kPrefillKeys;  // keys per tile: two of the plan's 64-key work items
constexpr int kStages = 3;               // tiles it - 1 (V) and it (K) in use, one more landing
constexpr int kPanel = kKeys * 128;      // one 64-element half of a K or V tile: 16 KB
constexpr int kKvTile = 2 * kPanel;      // a K or V tile (128 keys × 128): 32 KB
constexpr int kQBytes = kPrefillRows * kD * 2;                         // 32 KB
constexpr size_t kSmemBytes = 1024 + kQBytes + kStages * 2 * kKvTile;  // 225 KB
constexpr int kAcc = kKeys / 2;  // S accumulator registers per thread (m64 × n128)
// Registers per thread after the split (launch: 65,536 / 384 = 168 each): the gathering
// warpgroup gives up what the computing ones take.
constexpr int kProducerRegs = 56, kConsumerRegs = 224;
static_assert(128 * kProducerRegs + kConsumers * kConsumerRegs <= 65536, "register file");
static_assert(kPrefillKeys == 64 && kPrefillRows == 128, "tile shapes of this kernel");

// Named barriers 1 and 2 (0 is __syncthreads) pass the turn between the computing warpgroups.
__device__ __forceinline__ void TurnWait(int cw) {
  if (cw == 0) {
    asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumers) : "memory");
  } else {
    asm volatile("bar.sync 2, %0;\n" ::"n"(kConsumers) : "memory");
  }
}
__device__ __forceinline__ void TurnPass(int cw) {  // to the other warpgroup
  if (cw == 0) {
    asm volatile("bar.arrive 2, %0;\n" ::"n"(kConsumers) : "memory");
  } else {
    asm volatile("bar.arrive 1, %0;\n" ::"n"(kConsumers) : "memory");
  }
}

// One tile's online softmax for the thread's rows h (g, g + 8), in place: s holds the raw scores
// (32 keys per row: 8j + 2tq + c) on entry and the weights on exit; scale > 0 is the base-2
// factor; m, l the running max and (per-lane) normaliser, corr the factor O must be rescaled by.
// kTail: keys from `valid` on are left out. Maxima and sums run as four independent chains.
template <bool kTail>
__device__ __forceinline__ void Softmax(float (&s)[kAcc], float scale, int tq, int valid,
                                        float (&m)[2], float (&l)[2], float (&corr)[2]) {
  auto ok = [&](int i) { return !kTail || (i / 4) * 8 + 2 * tq + (i & 1) < valid; };
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx[4] = {NegInf(), NegInf(), NegInf(), NegInf()};
#pragma unroll
    for (int j = 0; j < kAcc / 4; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int i = 4 * j + 2 * h + c;
        mx[(2 * j + c) % 4] = fmaxf(mx[(2 * j + c) % 4], ok(i) ? s[i] : NegInf());
      }
    }
    // scale > 0: the max of the raw scores gives the max of the scaled ones.
    const float tmax = QuadMax(fmaxf(fmaxf(mx[0], mx[1]), fmaxf(mx[2], mx[3]))) * scale;
    const float m_new = fmaxf(m[h], tmax);
    const float m_use = m_new == NegInf() ? 0.f : m_new;
    corr[h] = FastExp2(m[h] - m_use);
    m[h] = m_new;
    float sum[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int j = 0; j < kAcc / 4; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int i = 4 * j + 2 * h + c;
        s[i] = ok(i) ? FastExp2(fmaf(s[i], scale, -m_use)) : 0.f;
        sum[(2 * j + c) % 4] += s[i];
      }
    }
    l[h] = l[h] * corr[h] + ((sum[0] + sum[1]) + (sum[2] + sum[3]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads, 1) PrefillWgmmaKernel(const KernelParams p) {
  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (SmemAddr(smem_raw) + 1023u) & ~1023u;
  const uint32_t q_tile = base, kv0 = base + kQBytes;  // stage s: K at kv0 + 2s·tile, V after
  const int tid = threadIdx.x, lane = tid % 32;
  SQKV_TRACE_START(TraceKernel::kPrefill);
  const PrefillBlock blk = PrefillBlockOf(p);
  const int split = blk.split, seg = blk.seg, rows = blk.rows, r0 = blk.r0;
  if (r0 >= rows) {
    GridDependencyWait();  // every block waits, so this grid never finishes before the pre-pass
    return;
  }
  const int q_row = p.seg_q_row[seg];

  // Q tile → shared memory in the storage type (before the wait: independent of the pre-pass).
  unsigned char* smem = smem_raw + (base - SmemAddr(smem_raw));
  StagePrefillQ<T, kD, kBlockThreads>(p, blk, q_row, [&](int r, int c) {
    return reinterpret_cast<uint4*>(smem + Sw128TileOffset<kPrefillRows>(r, c));
  });

  GridDependencyWait();  // the compact lists of the pre-pass
  SQKV_TRACE_WAIT(TraceKernel::kPrefill);
  const int ntok = PrefillKeyCount(p, seg);
  // The split's share of the plan's 64-key work items, walked in 128-key tiles (the last one may
  // be short, also where the share ends before the list does).
  const SplitRange range = SplitOf((ntok + kPrefillKeys - 1) / kPrefillKeys, p.splits, split);
  if (split > 0 && range.begin >= range.end) return;
  const int key0 = range.begin * kPrefillKeys;
  const int key_end = min(ntok, range.end * kPrefillKeys);
  const int ntiles = key_end > key0 ? (key_end - key0 + kKeys - 1) / kKeys : 0;

  // The K and V halves of each stage are handed over by their own mbarriers: full_k / full_v
  // complete when the gathering warpgroup's copies have landed (count: its 128 threads),
  // empty_k / empty_v when both computing warpgroups are done with them (count: their 256
  // threads); a K buffer is free once its S product is done, a tile before its V buffer.
  __shared__ __align__(8) uint64_t bars[4 * kStages];
  const uint32_t bar0 = SmemAddr(&bars[0]);
  auto full_k = [&](int it) { return bar0 + 8 * (it % kStages); };
  auto empty_k = [&](int it) { return bar0 + 8 * (kStages + it % kStages); };
  auto full_v = [&](int it) { return bar0 + 8 * (2 * kStages + it % kStages); };
  auto empty_v = [&](int it) { return bar0 + 8 * (3 * kStages + it % kStages); };
  auto parity = [&](int it) { return static_cast<uint32_t>(it / kStages) & 1u; };
  if (tid == 0) {
    for (int b = 0; b < kStages; ++b) {
      MbarInit(full_k(b), 128);
      MbarInit(empty_k(b), kConsumers);
      MbarInit(full_v(b), 128);
      MbarInit(empty_v(b), kConsumers);
    }
  }
  __syncthreads();  // Q and the barriers in place

  if (tid < 128) {
    // Gathering warpgroup: thread → chunk tid % 16 of key rows tid / 16 + 8i (i < 16), K and V;
    // the pool rows of the next tile are loaded while this tile's copies are issued.
    SetMaxRegsDec<kProducerRegs>();
    constexpr int kRowsPer = kKeys / 8;
    const uint32_t* toks = PrefillKeyRows(p, seg);
    const T* pool = static_cast<const T*>(p.pool) + (tid % 16) * 8;
    const size_t v_offset = static_cast<size_t>(p.page_tokens) * kD;
    const uint32_t my_off = Sw128TileOffset<kKeys>(tid / 16, tid % 16);  // + 8i rows: + 1024 i
    uint32_t rows_next[kRowsPer];
    auto fetch = [&](int it) {
#pragma unroll
      for (int i = 0; i < kRowsPer; ++i) {
        const int t = key0 + it * kKeys + tid / 16 + i * 8;
        rows_next[i] = it < ntiles && t < key_end ? __ldcg(toks + t) : 0xffffffffu;
      }
    };
    fetch(0);
    for (int it = 0; it < ntiles; ++it) {
      const uint32_t dk = kv0 + (it % kStages) * 2 * kKvTile + my_off, dv = dk + kKvTile;
      auto gather = [&](uint32_t dst, size_t offset) {
#pragma unroll
        for (int i = 0; i < kRowsPer; ++i) {
          const bool ok = rows_next[i] != 0xffffffffu;
          const T* src = pool + static_cast<size_t>(ok ? rows_next[i] : 0) * kD + offset;
          CpAsync16(dst + i * 1024, src, ok ? 16 : 0);
        }
      };
      if (it >= kStages) MbarWait(empty_k(it), parity(it - kStages));  // its last user is done
      gather(dk, 0);
      MbarArriveCpAsync(full_k(it));
      if (it >= kStages) MbarWait(empty_v(it), parity(it - kStages));
      gather(dv, v_offset);
      MbarArriveCpAsync(full_v(it));
      fetch(it + 1);
    }
    CpAsyncWait<0>();
    GridDependencyTrigger();
    return;
  }

  SetMaxRegsInc<kConsumerRegs>();
  const int cw = (tid - 128) / 128;   // computing warpgroup: rows 64·cw .. 64·cw + 63 of the tile
  const int warp = (tid - 128) / 32;  // rows 16·warp .. 16·warp + 15
  const int g = lane / 4, tq = lane % 4;
  // Descriptors: a stage's K tile (K-major) and V tile (MN-major, panels 128 rows apart).
  const uint64_t desc_k = Sw128Desc(kv0, kKeys, 0);
  const uint64_t desc_v = Sw128DescMN(kv0 + kKvTile, kPanel);
  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.f;
  float m[2] = {NegInf(), NegInf()}, l[2] = {0.f, 0.f}, corr[2] = {1.f, 1.f};
  float s[kAcc];               // S of the current tile, then its weights
  uint32_t pa[kKeys / 16][4];  // P of the previous tile as A fragments (in flight in P·V)

  // Q as register A fragments (the warp's 16 rows of every k-step), from the swizzled Q tile: S is
  // an RS product, which reads only K from shared memory (1.5% faster than SS at 128K).
  uint32_t qa[kD / 16][4];
  LoadSw128AFragments<kPrefillRows>(q_tile, warp * 16, qa);
  auto issue_s = [&](int it) {
    MbarWait(full_k(it), parity(it));  // K of tile it landed
    FenceProxyAsyncShared();           // cp.async wrote it through the generic proxy
    const uint32_t buf = (it % kStages) * 2 * kKvTile;
    WgmmaFence();
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      WgmmaM64N128RS<T>(s, qa[ks], DescAdvance(desc_k, buf + Sw128KStep(kKeys, ks)), ks > 0);
    }
    WgmmaCommit();
  };
  auto issue_pv = [&](int it) {
    MbarWait(full_v(it), parity(it));
    FenceProxyAsyncShared();
    const uint32_t buf = (it % kStages) * 2 * kKvTile;
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      WgmmaM64N128RSTransB<T>(o, pa[kk], DescAdvance(desc_v, buf + kk * 16 * 128));
    }
    WgmmaCommit();
  };
  auto softmax = [&](int it) {
    const int valid = key_end - (key0 + it * kKeys);
    if (valid < kKeys) {
      Softmax<true>(s, p.scale_log2, tq, valid, m, l, corr);
    } else {
      Softmax<false>(s, p.scale_log2, tq, valid, m, l, corr);
    }
  };
  auto pack = [&] {
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      pa[kk][0] = Half16<T>::Pack(s[8 * kk + 0], s[8 * kk + 1]);
      pa[kk][1] = Half16<T>::Pack(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = Half16<T>::Pack(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = Half16<T>::Pack(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };
  // Rescale O only when some row's max moved (rare once the maxima have settled).
  auto rescale = [&] {
    if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
      for (int i = 0; i < 64; ++i) o[i] *= corr[(i / 2) & 1];
    }
  };

  if (ntiles > 0) {
    issue_s(0);  // (its proxy fence also covers Q, written by ordinary stores)
    WgmmaWait<0>();
    MbarArrive(empty_k(0));
    softmax(0);
    pack();
  }
  // Iteration it, entered with P(it - 1) in pa and O holding the tiles before it - 1 at the
  // maxima of tile it - 2 (corr moves them to tile it - 1's): S(it) is issued, O rescaled in its
  // shadow, O += P(it - 1)·V(it - 1) issued, and tile it's softmax runs once S(it) is done, while
  // the tensor cores work on P·V. Nothing is in flight across the loop's back edge.
  //
  // The two warpgroups take turns issuing (named barriers; warpgroup 0 first), so one's products
  // run while the other's softmax issues. Warpgroup 1's last pass would find no one waiting.
  //
  // Only a range's last tile can be short, so the loop runs the full tiles' softmax alone and the
  // last tile comes after it: the loop's code stays small.
  auto step = [&](int it, auto last_tag) {
    constexpr bool kLast = decltype(last_tag)::value;
    TurnWait(cw);
    issue_s(it);
    rescale();
    issue_pv(it - 1);
    if (cw == 0 || !kLast) TurnPass(cw);
    WgmmaWait<1>();  // S(it)
    MbarArrive(empty_k(it));
    if constexpr (kLast) {
      softmax(it);
    } else {
      Softmax<false>(s, p.scale_log2, tq, kKeys, m, l, corr);
    }
    WgmmaWait<0>();  // P(it - 1)·V(it - 1)
    MbarArrive(empty_v(it - 1));
    pack();
  };
  if (cw == 1 && ntiles > 1) TurnPass(cw);
  for (int it = 1; it + 1 < ntiles; ++it) step(it, std::false_type{});
  if (ntiles > 1) step(ntiles - 1, std::true_type{});
  if (ntiles > 0) {
    rescale();
    issue_pv(ntiles - 1);
    WgmmaWait<0>();
  }
  GridDependencyTrigger();

  // Epilogue straight from the accumulators: rows 16·warp + g (+ 8) of the tile.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = r0 + warp * 16 + g + 8 * h;
    const float lsum = QuadSum(l[h]);
    if (r >= rows) continue;
    const PrefillRowOut out = PrefillRowOutOf(p, blk, q_row, r, kD, m[h], lsum);
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      *reinterpret_cast<float2*>(out.o + j * 8 + tq * 2) =
          make_float2(o[4 * j + 2 * h] * out.inv, o[4 * j + 2 * h + 1] * out.inv);
    }
    if (tq == 0) *out.lse = out.lse_val;
  }
  SQKV_TRACE_END_BY(TraceKernel::kPrefill, threadIdx.x == 128);
}

template <typename T>
Status Info(KernelInfo* info) {
  static DeviceCache cache;
  return QueryKernelOnDevice(cache, PrefillWgmmaKernel<T>, static_cast<int>(kSmemBytes), info,
                             kBlockThreads);
}

}  // namespace

Status PrefillWgmmaInfo(DType dtype, KernelInfo* info) {
  return dtype == DType::kBF16 ? Info<__nv_bfloat16>(info) : Info<__half>(info);
}

Status LaunchPrefillWgmmaKernel(DType dtype, const KernelParams& p, const Plan& plan,
                                cudaStream_t stream) {
  KernelInfo info;
  SQKV_RETURN_IF_ERROR(PrefillWgmmaInfo(dtype, &info));
  const int64_t blocks = static_cast<int64_t>(p.num_segments) * plan.splits * plan.row_tiles;
  if (dtype == DType::kBF16) {
    return LaunchKernel(PrefillWgmmaKernel<__nv_bfloat16>, dim3(static_cast<unsigned>(blocks)),
                        dim3(kBlockThreads), kSmemBytes, stream, /*dependent=*/true,
                        "prefill attention kernel (wgmma)", p);
  }
  return LaunchKernel(PrefillWgmmaKernel<__half>, dim3(static_cast<unsigned>(blocks)),
                      dim3(kBlockThreads), kSmemBytes, stream, /*dependent=*/true,
                      "prefill attention kernel (wgmma)", p);
}

}  // namespace sqkv::gpu::detail
