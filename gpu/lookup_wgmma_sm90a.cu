// Large (prefill) segments with 16-bit centroids on Hopper's warpgroup products (wgmma, sm_90a):
// the same two passes as lookup_mma.cu (same blocks, pieces, workspace and finish; see there), at
// head_dim <= 128. A block holds an A tile of T of the passes' 128-row tiles in shared memory
// (query rows in pass 1, entries in pass 2), a warpgroup per 64 of its rows, and streams the other
// operand (entries in pass 1, query rows in pass 2) through 128-byte swizzled shared memory in
// stages copied by cp.async ahead of the products.
// - Pass 1 (StageLoopWide): 128 entries a stage, one m64n128 SS product per warpgroup and stage
//   into one accumulator set, its epilogue after it; the block's four warpgroups (two tiles, one
//   block per SM: a stage's copy feeds 256 rows) overlap each other's products and exp2 work. Its
//   registers have no room for A (RS spilled at two sets of m64n64), and one m64n128 product reads
//   A once per 128 entries: 12% faster than two sets of m64n64 SS (NOTES-gpu-lookup.md v28).
// - Pass 2 (StageLoop): 64 query rows a stage, m64n64 RS products (the entries held in
//   registers: half the shared-memory reads; 8% faster at 128K, v27) into two accumulator sets,
//   the next stage's product running while this one's exp2 work issues; one tile a block, two
//   blocks per SM, whose short blocks overlap each other's start. It is pass 1's programmatic
//   dependent: its blocks stage their entries, then wait for pass 1's row statistics (v29).
// kWgmmaRowPassTiles, kWgmmaColPassTiles and NOTES-gpu-lookup.md v16. Pass 2's pieces are unequal
// and its grid runs them longest first (grid z is the piece; PlanLookup's ChooseColPieces, v17).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <type_traits>

#include "gpu/device_cache.h"
#include "gpu/kernel_trace.cuh"
#include "gpu/lookup_mma.cuh"
#include "gpu/wgmma.cuh"

SQKV_TRACE_UNIT(lookup_wgmma)

namespace sqkv::gpu::lookup_detail {
namespace {

using detail::CpAsync16;
using detail::CpAsyncCommit;
using detail::CpAsyncWait;
using detail::DescAdvance;
using detail::FastExp2;
using detail::FenceProxyAsyncShared;
using detail::MbarArrive;
using detail::MbarArriveCpAsync;
using detail::MbarInit;
using detail::MbarWait;
using detail::SmemAddr;
using detail::Sw128Desc;
using detail::Sw128KStep;
using detail::Sw128Offset;
using detail::Sw128TileOffset;
using detail::WgmmaCommit;
using detail::WgmmaFence;
using detail::LoadSw128AFragments;
using detail::WgmmaM64N64RS;
using detail::WgmmaM64N128SS;
using detail::WgmmaM64N64SS;
using detail::WgmmaWait;

constexpr int kStageRows = 64;  // streamed rows per stage: the n64 of the product
constexpr int kStages = 4;
static_assert(kMmaRowTile == 128 && kMmaColTile == 128, "two warpgroups of 64 A rows a tile");

// A block of KS k-steps (head_dim / 16) over T tiles: 2T warpgroups, T · 128 A rows. Shared
// memory: the A tile and the stages' tiles (1,024-byte aligned), then per stage 64 sizes (pass 1)
// or 64 (x, L) pairs (pass 2). Registers: 128 a thread (WgmmaPassBlocksPerSm).
// SR streamed rows a stage (the n of the products), S stage buffers.
template <int KS, int T, int SR = kStageRows, int S = kStages>
struct Shape {
  static_assert(T == 1 || T == 2, "one or two tiles a block");
  static constexpr int kKS = KS;
  static constexpr int kSR = SR;
  static constexpr int kStages = S;
  static constexpr int kThreads = 256 * T;
  static constexpr int kMinBlocks = WgmmaPassBlocksPerSm(T);
  static constexpr int kARows = kMmaRowTile * T;
  static constexpr int kTileBytes = SR * KS * 32;  // KS k-steps of 16 halves per row
  static constexpr int kATileBytes = kARows * KS * 32;
  static constexpr int kSmemBytes = 1024 + kATileBytes + S * (kTileBytes + SR * 8);
};
// Pass 1 streams 128 entries a stage into one m64n128 product per warpgroup (StageLoopWide);
// pass 2 64 query rows into two sets of m64n64 RS products (StageLoop). Pass 2 the same way as
// pass 1 (RS, three stages of 128 rows, the A tile in the third buffer so that two blocks fit a
// SM) ran no faster: NOTES-gpu-lookup.md v28.
template <int KS>
using RowShape = Shape<KS, kWgmmaRowPassTiles, 128>;
template <int KS>
using ColShape = Shape<KS, kWgmmaColPassTiles>;

// An exact float of a non-negative int below 2^23, on the FMA pipe (no conversion unit).
__device__ __forceinline__ float SmallIntToFloat(int v) {
  return __int_as_float(v | 0x4B000000) - 8388608.f;
}

// Where a thread's copies of an R-row stage go in `tile` (KS / 4 panels of R × 128 bytes,
// swizzled): the thread copies 16-byte chunk ch of rows r0, r0 + kStep, ..., so its shared
// offsets differ by a constant (the swizzle repeats every 8 rows) and its source rows walk in
// order. Chunks at or past head_dim and rows past the valid ones are zero-filled.
template <class Sh, int R>
struct StageSlots {
  static constexpr int kChunks = Sh::kKS * 2;
  static constexpr int kStep = Sh::kThreads / kChunks;  // rows per sweep, a multiple of 8
  static_assert(kStep % 8 == 0 && R % kStep == 0, "whole sweeps, one swizzle phase");
  int ch, r0;
  uint32_t dst;  // row r0's chunk; row r0 + k kStep's is k kStep 128 bytes on
  __device__ explicit StageSlots(uint32_t tile)
      : ch(threadIdx.x % kChunks),
        r0(threadIdx.x / kChunks),
        dst(tile + (ch >> 3) * (R * 128) + Sw128Offset(r0, ch & 7)) {}
};

// R rows of a listed source into `tile`: row r's chunk ch from src(r) + 16 ch (StageSlots).
template <class Sh, int R, class Src>
__device__ __forceinline__ void StageRows(uint32_t tile, int valid, int d, const Src& src) {
  using Slots = StageSlots<Sh, R>;
  const Slots t(tile);
  const bool in_d = t.ch * 8 < d;
#pragma unroll
  for (int k = 0; k < R / Slots::kStep; ++k) {
    const int r = t.r0 + k * Slots::kStep;
    const bool ok = in_d && r < valid;
    CpAsync16(t.dst + k * Slots::kStep * 128, src(ok ? r : 0) + t.ch * 16, ok ? 16 : 0);
  }
}

// R rows `pitch` bytes apart from `rows` on (a flat source) into `tile` (StageSlots): the
// thread's rows are a constant 32-bit offset apart, and a stage with all R rows valid and every
// chunk inside head_dim takes no per-row predicate or clamp.
template <class Sh, int R>
__device__ __forceinline__ void StageFlatRows(uint32_t tile, const uint8_t* rows, uint32_t pitch,
                                              int valid, int d) {
  using Slots = StageSlots<Sh, R>;
  const Slots t(tile);
  const uint8_t* src = rows + t.r0 * pitch + t.ch * 16;
  const uint32_t step = Slots::kStep * pitch;
  const bool in_d = t.ch * 8 < d;
  if (valid >= R && in_d) {
#pragma unroll
    for (int k = 0; k < R / Slots::kStep; ++k) {
      CpAsync16(t.dst + k * Slots::kStep * 128, src + k * step, 16);
    }
  } else {
#pragma unroll
    for (int k = 0; k < R / Slots::kStep; ++k) {
      const bool ok = in_d && t.r0 + k * Slots::kStep < valid;
      CpAsync16(t.dst + k * Slots::kStep * 128, ok ? src + k * step : rows, ok ? 16 : 0);
    }
  }
}

// Rows of an entry set from entry i0 on: a flat set's rows by address, a listed one's by id.
template <class Sh, int R>
__device__ __forceinline__ void StageEntries(uint32_t tile, const EntrySet& e, int i0, int valid,
                                             int d) {
  if (e.list == nullptr) {
    StageFlatRows<Sh, R>(tile, e.prim + static_cast<size_t>(i0) * e.row_bytes,
                         static_cast<uint32_t>(e.row_bytes), valid, d);
  } else {
    StageRows<Sh, R>(tile, valid, d,
                     [&](int r) { return static_cast<const uint8_t*>(EntryRow(e, i0 + r)); });
  }
}

// Query rows r0 .. of the binary16 q (rows of d halves).
template <class Sh, int R>
__device__ __forceinline__ void StageQueries(uint32_t tile, const uint16_t* qh, int r0, int valid,
                                             int d) {
  StageFlatRows<Sh, R>(tile, reinterpret_cast<const uint8_t*>(qh + static_cast<size_t>(r0) * d),
                       static_cast<uint32_t>(d) * 2, valid, d);
}

// The block's shared memory: the A tile, the stage tiles (both 1,024-byte aligned), then per stage
// 64 extras (sizes in pass 1, row infos in pass 2).
template <class Sh>
struct Smem {
  uint32_t a_tile, tiles;
  uint8_t* extra;
  __device__ explicit Smem(uint8_t* raw) {
    const uint32_t base = (SmemAddr(raw) + 1023u) & ~1023u;
    a_tile = base;
    tiles = base + Sh::kATileBytes;
    extra = raw + (tiles - SmemAddr(raw)) + Sh::kStages * Sh::kTileBytes;
  }
  __device__ uint32_t Tile(int buf) const { return tiles + buf * Sh::kTileBytes; }
};

// Issues one stage's product without waiting: acc (the warpgroup's 64 A rows × the stage's 64
// rows) = A · tile^T over KS k-steps, A from registers (RS): af[ks] holds the warp's 16 A rows of
// k-step ks, and desc_b is the stage's tile at k-step 0. Only B is read from shared memory: half
// the bytes of an SS m64n64 product, which reads 4 KB for 131 KFLOP, right at the SM's 128 bytes
// a clock of shared memory at its dense tensor rate.
template <class Sh>
__device__ __forceinline__ void IssueProductRS(const uint32_t (&af)[Sh::kKS][4], uint64_t desc_b,
                                               float (&acc)[32]) {
  WgmmaFence();
#pragma unroll
  for (int ks = 0; ks < Sh::kKS; ++ks) {
    WgmmaM64N64RS<__half>(acc, af[ks], DescAdvance(desc_b, Sw128KStep(kStageRows, ks)), ks > 0);
  }
  WgmmaCommit();
}


// Where each pass keeps its short stage (StageSpans): the stage loops run that stage's epilogue
// outside their loop, so the loop's code holds the full one alone (with a short stage possible at
// every step, the loop's code doubled). Pass 1 takes the first (its last stage made ptxas spill
// inside the two-set loop); pass 2 the last at KS 8 (measured 2-3% faster there than the first)
// and the first at KS 4 (the last spilled there).
//
// Pass 2's stage loop (pass 1's too before StageLoopWide). stage(it) issues the cp.async copies of
// stage it (its tile and extras; nothing past the last); the loop learns that they landed from an
// mbarrier (cp.async.mbarrier.arrive), so stage() commits no groups. epi(buf, acc, short_tag)
// consumes stage it's product (its copies in buffer buf); short_tag (std::true_type or
// std::false_type) says whether it is the stage that may be short. The product of stage it + 1 runs
// on the tensor cores while the epilogue of stage it runs, into the other of two accumulator sets;
// the copies run two stages ahead of that product (kStages buffers: the one of stage it - 1 is
// refilled once every thread is past its epilogue, told by an mbarrier, so no block barrier holds
// the warpgroups in step inside the loop). prologue() runs once the first stages' copies are
// issued, before the first product: pass 1 copies a_tile there (after waiting for the q conversion)
// and waits for all its copies so far; pass 2's a_tile copies, issued before the loop, land before
// stage 0's barrier completes (an arrival counts every earlier copy of the thread). The products
// take A from registers, loaded from a_tile once it has landed.
template <class Sh, ShortStage kShort, class Prologue, class Stage, class Epi>
__device__ __forceinline__ void StageLoop(const Smem<Sh>& sm, int ntiles, const Prologue& prologue,
                                          const Stage& stage, const Epi& epi) {
  constexpr int kStages = Sh::kStages;
  const uint64_t desc_b = Sw128Desc(sm.tiles, kStageRows, 0);
  auto tile_desc = [&](int it) { return DescAdvance(desc_b, (it % kStages) * Sh::kTileBytes); };
  // Stage buffers are handed over by mbarriers, not block barriers, so the warpgroups drift
  // apart (one's products overlap the other's exp2 work): full[b] completes once every thread's
  // copies of the buffer's stage have landed, empty[b] once every thread's epilogue of it is done
  // (both counts: all threads).
  __shared__ __align__(8) uint64_t bars[2 * kStages];
  const uint32_t full0 = SmemAddr(&bars[0]), empty0 = SmemAddr(&bars[kStages]);
  auto full = [&](int it) { return full0 + 8 * (it % kStages); };
  auto empty = [&](int it) { return empty0 + 8 * (it % kStages); };
  auto parity = [&](int it) { return static_cast<uint32_t>(it / kStages) & 1u; };
  if (threadIdx.x == 0) {
    for (int b = 0; b < 2 * kStages; ++b) MbarInit(full0 + 8 * b, Sh::kThreads);
  }
  __syncthreads();          // the barriers in place
  auto put = [&](int it) {  // stage it's copies into the buffer stage it - kStages left
    if (it < ntiles && it >= kStages) MbarWait(empty(it), parity(it - kStages));
    stage(it);
    if (it < ntiles) MbarArriveCpAsync(full(it));
  };
  float acc[2][32];
#pragma unroll
  for (int p = 0; p < kStages - 1; ++p) put(p);
  prologue();
  if (ntiles > 0) MbarWait(full(0), 0);  // stage 0, and a_tile's copies issued before it
  FenceProxyAsyncShared();
  __syncthreads();  // the prologue's copies of every thread
  uint32_t af[Sh::kKS][4];
  // Warp w of the block holds A rows 16w .. 16w + 15 (warpgroup g: its 64 rows).
  LoadSw128AFragments<Sh::kARows>(sm.a_tile, (threadIdx.x / 32) * 16, af);
  auto issue = [&](uint64_t desc_b, float(&d)[32]) { IssueProductRS<Sh>(af, desc_b, d); };
  if (ntiles > 0) issue(tile_desc(0), acc[0]);
  WgmmaWait<0>();
  // acc[cur] holds stage it's product on entry; nothing is in flight across iterations (a product
  // in flight over the loop's back edge would make the compiler serialize them all).
  //
  // One step: if `next` (a bool or std::true_type / std::false_type) the product of stage it + 1
  // is issued; short_tag goes to the epilogue.
  using First = std::integral_constant<int, 0>;
  using Second = std::integral_constant<int, 1>;
  using Yes = std::true_type;
  using No = std::false_type;
  auto step = [&](auto cur_tag, int it, auto next, auto short_tag) {
    constexpr int cur = decltype(cur_tag)::value;
    if (next) {
      MbarWait(full(it + 1), parity(it + 1));  // stage it + 1 landed, every thread's copies
      FenceProxyAsyncShared();
      issue(tile_desc(it + 1), acc[cur ^ 1]);
    }
    put(it + kStages - 1);  // into stage it - 1's buffer, once every thread is past its epilogue
    epi(it % kStages, acc[cur], short_tag);
    WgmmaWait<0>();
    MbarArrive(empty(it));
  };
  // Stages it .. ntiles - 1 (the last of them short when last_short says so), the accumulator sets
  // taken in turn from set_a.
  auto run = [&](auto set_a, auto set_b, int it, auto last_short) {
    for (; it + 2 < ntiles; it += 2) {
      step(set_a, it, Yes(), No());
      step(set_b, it + 1, Yes(), No());
    }
    if (it + 1 < ntiles) {
      step(set_a, it, Yes(), No());
      step(set_b, it + 1, No(), last_short);
    } else if (it < ntiles) {
      step(set_a, it, No(), last_short);
    }
  };
  if constexpr (kShort == ShortStage::kFirst) {
    if (ntiles > 0) step(First(), 0, ntiles > 1, Yes());
    run(Second(), First(), 1, No());
  } else {
    run(First(), Second(), 0, Yes());
  }
  // Copies no barrier waited for (pass 2's a_tile where its piece is empty) land before the end.
  CpAsyncCommit();
  CpAsyncWait<0>();
}

// Pass 1's stage loop: one accumulator set and m64n128 SS products. A warpgroup's product and
// its epilogue alternate, and the block's other three warpgroups fill the tensor cores meanwhile.
// Against StageLoop's two sets of m64n64 it halves the products, barrier trips and epilogue
// entries a streamed row, and each product reads its A rows once a 128-row stage instead of
// twice (a quarter less shared-memory traffic). Copies, barriers, prologue and the short first
// stage as in StageLoop.
template <class Sh, class Prologue, class Stage, class Epi>
__device__ __forceinline__ void StageLoopWide(const Smem<Sh>& sm, int ntiles,
                                              const Prologue& prologue, const Stage& stage,
                                              const Epi& epi) {
  static_assert(Sh::kSR == 128, "one m64n128 product a stage");
  constexpr int kS = Sh::kStages;
  const int wg = threadIdx.x / 128;
  const uint64_t desc_a = Sw128Desc(sm.a_tile + wg * 64 * 128, Sh::kARows, 0);
  const uint64_t desc_b = Sw128Desc(sm.tiles, Sh::kSR, 0);
  __shared__ __align__(8) uint64_t bars[2 * kS];
  const uint32_t full0 = SmemAddr(&bars[0]), empty0 = SmemAddr(&bars[kS]);
  auto full = [&](int it) { return full0 + 8 * (it % kS); };
  auto empty = [&](int it) { return empty0 + 8 * (it % kS); };
  auto parity = [&](int it) { return static_cast<uint32_t>(it / kS) & 1u; };
  if (threadIdx.x == 0) {
    for (int b = 0; b < 2 * kS; ++b) MbarInit(full0 + 8 * b, Sh::kThreads);
  }
  __syncthreads();
  auto put = [&](int it) {
    if (it < ntiles && it >= kS) MbarWait(empty(it), parity(it - kS));
    stage(it);
    if (it < ntiles) MbarArriveCpAsync(full(it));
  };
  float acc[64];
#pragma unroll
  for (int p = 0; p < kS - 1; ++p) put(p);
  prologue();
  if (ntiles > 0) MbarWait(full(0), 0);
  FenceProxyAsyncShared();
  __syncthreads();  // the prologue's copies of every thread
  auto step = [&](int it, auto short_tag) {
    if (it > 0) {
      MbarWait(full(it), parity(it));
      FenceProxyAsyncShared();
    }
    const uint64_t db = DescAdvance(desc_b, (it % kS) * Sh::kTileBytes);
    WgmmaFence();
#pragma unroll
    for (int ks = 0; ks < Sh::kKS; ++ks) {
      WgmmaM64N128SS<__half>(acc, DescAdvance(desc_a, Sw128KStep(Sh::kARows, ks)),
                             DescAdvance(db, Sw128KStep(Sh::kSR, ks)), ks > 0);
    }
    WgmmaCommit();
    put(it + kS - 1);  // into stage it - 1's buffer, once every thread is past its epilogue
    WgmmaWait<0>();
    epi(it % kS, acc, short_tag);
    MbarArrive(empty(it));
  };
  if (ntiles > 0) step(0, std::true_type{});
  for (int it = 1; it < ntiles; ++it) step(it, std::false_type{});
  CpAsyncCommit();
  CpAsyncWait<0>();
}

// Pass 1 on one 128-entry stage: rows h (g, g + 8) take the logits acc · f of the thread's 32
// entries (columns 8j + 2tq + c of the m64n128 product, j < 16) into their running max and
// normaliser. Both rows' maxima first, then the sums, each pair of sizes loaded and converted
// where it is used (32 converted sizes held at once would not fit beside acc). Maxima and sums
// run as four independent chains a row (a single chain would leave the warp waiting on every
// add's latency); f > 0 and rounding is monotone, so max(acc) · f = max(acc · f). kTail: entries
// past `valid` (size 0) are left out; they hold logit 0, which may lie far above the max.
template <bool kTail>
__device__ __forceinline__ void RowUpdate(const float (&acc)[64], const int32_t* sizes, int tq,
                                          int valid, const float (&f)[2], float (&m_run)[2],
                                          float (&z_run)[2]) {
  constexpr int J = 16;
  float amax[2][4];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int k = 0; k < 4; ++k) amax[h][k] = -INFINITY;
  }
#pragma unroll
  for (int j = 0; j < J; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float& m = amax[h][(2 * j + c) % 4];
        m = fmaxf(m, !kTail || 8 * j + 2 * tq + c < valid ? acc[4 * j + 2 * h + c] : -INFINITY);
      }
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float tmax = fmaxf(fmaxf(amax[h][0], amax[h][1]), fmaxf(amax[h][2], amax[h][3])) * f[h];
    if (tmax > m_run[h]) {
      z_run[h] *= FastExp2(m_run[h] - tmax);  // from -inf: 2^-inf = 0
      m_run[h] = tmax;
    }
  }
  float z[2][4] = {};
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int2 v = *reinterpret_cast<const int2*>(sizes + 8 * j + 2 * tq);
    const float n[2] = {SmallIntToFloat(v.x), SmallIntToFloat(v.y)};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float term = n[c] * FastExp2(fmaf(acc[4 * j + 2 * h + c], f[h], -m_run[h]));
        z[h][(2 * j + c) % 4] += !kTail || 8 * j + 2 * tq + c < valid ? term : 0.f;
      }
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) z_run[h] += (z[h][0] + z[h][1]) + (z[h][2] + z[h][3]);
}

template <bool kTail>
__device__ __forceinline__ void ColumnUpdate(const float (&acc)[32], const float2* xl, int tq,
                                             int valid, float (&col)[2]) {
  float sum[2][4] = {};  // four independent chains per entry
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int r = 8 * j + 2 * tq + c;
      const float2 i = xl[r];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float p = FastExp2(fmaf(acc[4 * j + 2 * h + c], i.x, -i.y));
        sum[h][(2 * j + c) % 4] += !kTail || r < valid ? p : 0.f;
      }
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) col[h] += (sum[h][0] + sum[h][1]) + (sum[h][2] + sum[h][3]);
}

template <int KS>
__global__ void __launch_bounds__(RowShape<KS>::kThreads, RowShape<KS>::kMinBlocks)
    RowStatsWgmmaKernel(LookupArgs a, Workspace w, int level) {
  using Sh = RowShape<KS>;
  constexpr int kT = kWgmmaRowPassTiles;
  extern __shared__ uint8_t smem_raw[];
  __shared__ int last;
  SQKV_TRACE_START(TraceKernel::kRowPass);
  // Pass 2, this pass's programmatic dependent, may launch now: its blocks stage their entries on
  // SMs this grid leaves free (it has fewer blocks than SMs at 128K) or as its blocks end.
  detail::GridDependencyTrigger();
  PassBlock b;
  // (Every block waits for the conversion before it ends, so this grid's completion implies the
  // conversion's.)
  if (!GetPassBlock(a, w, level, /*row_pass=*/true, &b)) return detail::GridDependencyWait();
  const LookupSegment& s = *b.s;
  const EntrySet& e = b.e;
  // Row tiles kT b.tile .. kT b.tile + kT - 1 (the later ones may lie past the rows).
  const int splits = b.splits, rtile = kT * b.tile, piece = b.piece, row0 = rtile * kMmaRowTile;
  if (row0 >= s.rows) return detail::GridDependencyWait();
  const int d = a.head_dim;
  constexpr int SR = Sh::kSR;
  const int2 range = PieceRange(e.total, splits, piece, SR);
  const int begin = range.x, end = range.y;
  const int t = threadIdx.x, lane = t % 32, warp = t / 32, g = lane / 4, tq = lane % 4;
  const uint16_t* qh = b.qh;
  float4* info = b.info;
  const Smem<Sh> sm(smem_raw);
  int32_t* sizes = reinterpret_cast<int32_t*>(sm.extra);  // (kStages, Sh::kSR)

  const int ra = row0 + warp * 16 + g, rb = ra + 8;  // warp w: rows 16w .. 16w + 15 of the block
  float f[2];
  // The first stages' entries (index data) are copied before waiting for the q conversion, which
  // this kernel may follow as a programmatic dependent; then the block's query rows (one cp.async
  // group with those first stages, waited for here) and factors.
  auto queries = [&] {
    detail::GridDependencyWait();
    SQKV_TRACE_WAIT(TraceKernel::kRowPass);
    StageQueries<Sh, Sh::kARows>(sm.a_tile, qh, row0, s.rows - row0, d);
    CpAsyncCommit();
    f[0] = ra < s.rows ? info[ra].x : 0.f;
    f[1] = rb < s.rows ? info[rb].x : 0.f;
    CpAsyncWait<0>();
  };

  const StageSpans<ShortStage::kFirst, SR> spans(begin, end);
  const int ntiles = spans.ntiles;
  auto stage = [&](int it) {
    if (it < ntiles) {
      const int i0 = spans.Begin(it), valid = spans.Count(it), buf = it % Sh::kStages;
      StageEntries<Sh, SR>(sm.Tile(buf), e, i0, valid, d);
      if (t < SR) {
        const bool ok = t < valid;
        CpAsync4(SmemAddr(sizes + buf * SR + t), ok ? EntrySizePtr(e, i0 + t) : e.prim_size,
                 ok ? 4 : 0);
      }
    }
  };

  float m_run[2] = {-INFINITY, -INFINITY}, z_run[2] = {0.f, 0.f};
  auto epi = [&](int buf, const auto& acc, auto short_tag) {
    if (decltype(short_tag)::value && spans.short_n < SR) {
      RowUpdate<true>(acc, sizes + buf * SR, tq, spans.short_n, f, m_run, z_run);
    } else {
      RowUpdate<false>(acc, sizes + buf * SR, tq, SR, f, m_run, z_run);
    }
  };
  // SS products: with A in registers (as pass 2 has it) ptxas spilled at two accumulator sets,
  // and the pass ran 6% slower (NOTES-gpu-lookup.md v27).
  StageLoopWide<Sh>(sm, ntiles, queries, stage, epi);
  float2* part = reinterpret_cast<float2*>(w.floats + s.stat_offset);  // (splits, rows)
  FinishRowStat(s, info, part, piece, splits, ra, tq, f[0], m_run[0], z_run[0]);
  FinishRowStat(s, info, part, piece, splits, rb, tq, f[1], m_run[1], z_run[1]);
  if (splits > 1) {
    for (int k = 0; k < kT && (rtile + k) * kMmaRowTile < s.rows; ++k) {
      CombineRowPieces<Sh::kThreads>(s, w, info, part, rtile + k, &last);
    }
  }
  SQKV_TRACE_END(TraceKernel::kRowPass);
}

template <int KS>
__global__ void __launch_bounds__(ColShape<KS>::kThreads, ColShape<KS>::kMinBlocks)
    ColumnWgmmaKernel(LookupArgs a, Workspace w, int level, bool finish) {
  using Sh = ColShape<KS>;
  constexpr int kT = kWgmmaColPassTiles;
  extern __shared__ uint8_t smem_raw[];
  __shared__ int last;
  SQKV_TRACE_START(TraceKernel::kColPass);
  // The staged selection that follows (without finish) waits for this grid's completion before it
  // reads the scores; letting it launch now lets its blocks stage index data as SMs free up.
  if (!finish) detail::GridDependencyTrigger();
  PassBlock b;
  // Grid x: the tile, z: the piece (PlanLookup's ChooseColPieces). Blocks past the segment's
  // pieces only arrive at its end.
  // Every block waits for pass 1 (a programmatic dependent of it) before it ends, so this grid's
  // completion implies pass 1's.
  if (!GetPassBlock(a, w, level, /*row_pass=*/false, &b, /*pieces_in_z=*/true)) {
    return detail::GridDependencyWait();
  }
  const LookupSegment& s = *b.s;
  const EntrySet& e = b.e;
  const int seg = b.seg, d = a.head_dim;
  // Entry tiles kT b.tile .. kT b.tile + kT - 1 (the later ones may lie past the scored entries).
  const int splits = b.splits, etile = kT * b.tile, piece = b.piece, col0 = etile * kMmaColTile;
  const bool in_pieces = piece < splits;
  if (in_pieces && col0 < e.scored) {
    const int t = threadIdx.x, lane = t % 32, warp = t / 32, g = lane / 4, tq = lane % 4;
    const uint16_t* qh = b.qh;
    const float4* info = b.info;
    constexpr int SR = Sh::kSR;
    const int2 range = PieceRangeFirst(s.rows, splits, piece, SR, s.col_first);
    const int begin = range.x, end = range.y;
    const Smem<Sh> sm(smem_raw);
    // Per stage and query row (logit factor, base-2 log normaliser L): 2^(acc · x - L) is the
    // row's softmax weight of an entry.
    float2* row_xl = reinterpret_cast<float2*>(sm.extra);  // (Sh::kStages, SR)

    // The block's entries (only the scored ones: pass 2 scores what the selection ranks).
    StageEntries<Sh, Sh::kARows>(sm.a_tile, e, col0, e.scored - col0, d);
    detail::GridDependencyWait();  // pass 1's row statistics (info), which the stages copy
    const int ea = col0 + warp * 16 + g, eb = ea + 8;
    constexpr ShortStage kShort = KS <= 4 ? ShortStage::kFirst : ShortStage::kLast;
    const StageSpans<kShort, SR> spans(begin, end);
    const int ntiles = spans.ntiles;
    auto stage = [&](int it) {
      if (it < ntiles) {
        const int r0 = spans.Begin(it), valid = spans.Count(it), buf = it % Sh::kStages;
        StageQueries<Sh, SR>(sm.Tile(buf), qh, r0, valid, d);
        if (t < 2 * SR) {  // component t % 2 (x, L) of row t / 2; past the end: 0
          const int r = t / 2;
          const bool ok = r < valid;
          const float* src = ok ? &info[r0 + r].x + (t % 2 == 0 ? 0 : 3) : &info->x;
          CpAsync4(SmemAddr(row_xl + buf * SR) + 4 * t, src, ok ? 4 : 0);
        }
      }
    };
    float col[2] = {0.f, 0.f};  // entries g and g + 8 of the warp's 16
    auto epi = [&](int buf, const auto& acc, auto short_tag) {
      if (decltype(short_tag)::value && spans.short_n < SR) {
        ColumnUpdate<true>(acc, row_xl + buf * SR, tq, spans.short_n, col);
      } else {
        ColumnUpdate<false>(acc, row_xl + buf * SR, tq, SR, col);
      }
    };
    StageLoop<Sh, kShort>(sm, ntiles, [] {}, stage, epi);
    FinishColumn(s, e, w, piece, splits, ea, tq, col[0]);
    FinishColumn(s, e, w, piece, splits, eb, tq, col[1]);
  } else {
    detail::GridDependencyWait();
  }
  if (in_pieces) {
    for (int k = 0; k < kT; ++k) CombineColumnPieces<Sh::kThreads>(w, s, e, etile + k, &last);
  }
  FinishSegment<Sh::kThreads>(a, w, seg, level, finish, gridDim.x * gridDim.z, &last);
  SQKV_TRACE_END(TraceKernel::kColPass);
}

template <int KS>
cudaError_t LaunchKS(const LookupArgs& a, const LookupLayout& l, const Workspace& w, int level,
                     cudaStream_t stream) {
  const unsigned n = static_cast<unsigned>(l.large_list.size());
  const int steps = a.score_only ? a.large_steps : 3;  // LookupArgs::large_steps
  if (steps < 2) return cudaSuccess;
  using Row = RowShape<KS>;
  using Col = ColShape<KS>;
  // The raised limits are attributes of the kernels on the current device: once per device.
  static detail::DeviceCache raised;
  cudaError_t attr = cudaSuccess;
  detail::PerDevice(raised, [&attr](int) {
    cudaError_t e1 = cudaFuncSetAttribute(
        RowStatsWgmmaKernel<KS>, cudaFuncAttributeMaxDynamicSharedMemorySize, Row::kSmemBytes);
    cudaError_t e2 = cudaFuncSetAttribute(
        ColumnWgmmaKernel<KS>, cudaFuncAttributeMaxDynamicSharedMemorySize, Col::kSmemBytes);
    attr = e1 != cudaSuccess ? e1 : e2;
    return attr == cudaSuccess ? 1 : -1;
  });
  if (attr != cudaSuccess) return attr;
  cudaError_t err =
      LaunchPass(RowStatsWgmmaKernel<KS>, dim3(l.max_wgmma_row_blocks, n), Row::kThreads,
                 Row::kSmemBytes, stream, Pass1FollowsConversion(l, level), a, w, level);
  if (err != cudaSuccess || steps < 3) return err;
  const bool staged = level == 2 && UseStagedSelect(a, l, SegmentList::kLarge);
  // A programmatic dependent of pass 1: its blocks stage their entries before waiting.
  err = LaunchPass(ColumnWgmmaKernel<KS>, dim3(l.max_wgmma_col_tiles, n, l.max_col_splits),
                   Col::kThreads, Col::kSmemBytes, stream, /*dependent=*/true, a, w, level,
                   !staged);
  if (err != cudaSuccess || !staged || a.score_only) return err;
  return LaunchStagedSelect(a, l, w, SegmentList::kLarge, stream);
}

}  // namespace

cudaError_t LaunchLargeWgmma(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                             int level, cudaStream_t stream) {
  if (a.head_dim <= 64) return LaunchKS<4>(a, l, w, level, stream);
  return LaunchKS<8>(a, l, w, level, stream);
}

}  // namespace sqkv::gpu::lookup_detail
