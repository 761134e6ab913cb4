// Pieces shared by the two families of large-segment tensor-core passes (16-bit centroids): the
// mma.sync kernels (lookup_mma.cu) and the wgmma kernels (lookup_wgmma_sm90a.cu). Both keep the
// same blocks (128 query rows in pass 1, 128 entries in pass 2), pieces, workspace regions and
// arrival counters, so their results land in the same places and finish the same way.
// Device code, internal.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "gpu/lookup_select.cuh"
#include "gpu/paged_attention_common.cuh"

namespace sqkv::gpu::lookup_detail {

__device__ __forceinline__ int CeilDiv(int a, int b) { return (a + b - 1) / b; }

// Copies 4 bytes global -> shared (through L1); src_bytes 0 writes a zero.
__device__ __forceinline__ void CpAsync4(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}

// Where entry i's cluster size lies.
__device__ __forceinline__ const int32_t* EntrySizePtr(const EntrySet& e, int i) {
  if (e.list == nullptr) return e.prim_size + i;
  return (i < e.scored ? e.prim_size : e.extra_size) + e.list[i];
}

// The entry range [begin, end) of pass 1's piece `piece` of `splits`: whole groups of `group`
// entries (the last piece may be shorter; at level 2 of a two-level run, where the candidates are
// fewer than planned for, some may be empty). Pass 2 cuts the query rows the same way.
__device__ __forceinline__ int2 PieceRange(int total, int splits, int piece, int group) {
  const int per = CeilDiv(CeilDiv(total, splits), group) * group;
  const int begin = min(total, piece * per);
  return make_int2(begin, min(total, begin + per));
}

// Pass 2's piece `piece` of `splits` over `total` query rows where the first piece takes `first`
// rows (a multiple of `group`; 0: equal pieces, PieceRange) and the others share the rest equally.
__device__ __forceinline__ int2 PieceRangeFirst(int total, int splits, int piece, int group,
                                                int first) {
  if (first <= 0 || splits <= 1) return PieceRange(total, splits, piece, group);
  if (piece == 0) return make_int2(0, min(total, first));
  const int rest = max(0, total - first);
  const int2 r = PieceRange(rest, splits - 1, piece - 1, group);
  return make_int2(first + r.x, first + r.y);
}

// Which stage of a piece may be short (fewer than a full stage of entries or rows: the
// remainder); the others are full.
enum class ShortStage { kFirst, kLast };

// A piece's stages over [begin, end): kN entries (or rows) each but for the short one, which holds
// the remainder and comes first or last as kShort says. With the short stage known at compile
// time, a pass's stage loop can run the full stages' code alone.
template <ShortStage kShort, int kN>
struct StageSpans {
  int begin, end, ntiles, short_n;
  __device__ StageSpans(int b, int e)
      : begin(b), end(e), ntiles(CeilDiv(e - b, kN)), short_n(e - b - (ntiles - 1) * kN) {}
  __device__ int Begin(int it) const {
    if constexpr (kShort == ShortStage::kFirst) {
      return it > 0 ? begin + short_n + (it - 1) * kN : begin;
    } else {
      return begin + it * kN;
    }
  }
  __device__ int Count(int it) const {
    if constexpr (kShort == ShortStage::kFirst) {
      return it == 0 ? short_n : kN;
    } else {
      return min(kN, end - Begin(it));
    }
  }
};

// Which block of a pass this is (y: the large list; x: tile · splits + piece, or with the pieces
// in z, x the tile and z the piece), with what both passes read: the segment, its entry set, the
// binary16 q rows and the per-row info (factor, max, 1/Z, max + log2 Z).
struct PassBlock {
  int seg = 0;
  const LookupSegment* s = nullptr;
  EntrySet e;
  int splits = 1, tile = 0, piece = 0;
  const uint16_t* qh = nullptr;
  float4* info = nullptr;
};

// Pass 1 (splits: s.row_splits) or pass 2 (s.col_splits). pieces_in_z: the grid's z is the piece
// (the wgmma pass 2, which dispatches every tile's first piece before any second one; a block
// whose z is past its segment's pieces has no work). False when the segment is not scored at
// `level` (the whole grid row returns, its counters untouched).
__device__ __forceinline__ bool GetPassBlock(const LookupArgs& a, const Workspace& w, int level,
                                             bool row_pass, PassBlock* b,
                                             bool pieces_in_z = false) {
  b->seg = w.large_list[blockIdx.y];
  b->s = &a.segments[b->seg];
  if (!ScoredAtLevel(*b->s, level)) return false;
  b->e = GetEntrySet(*b->s, level, w.ints, a.head_dim, true);
  b->splits = row_pass ? b->s->row_splits : b->s->col_splits;
  b->tile = pieces_in_z ? blockIdx.x : blockIdx.x / b->splits;
  b->piece = pieces_in_z ? blockIdx.z : blockIdx.x % b->splits;
  b->qh = reinterpret_cast<const uint16_t*>(w.floats + b->s->qh_offset);
  b->info = reinterpret_cast<float4*>(w.floats + b->s->info_offset);
  return true;
}

// Launches a pass kernel; `dependent`: as a programmatic dependent of the kernel before it on the
// stream (pass 1 after the q conversion: its blocks stage their first entries while the
// conversion's last blocks finish, then GridDependencyWait before reading the q rows).
template <typename... Args>
inline cudaError_t LaunchPass(void (*kernel)(Args...), dim3 grid, int threads, int smem,
                              cudaStream_t stream, bool dependent, Args... args) {
  return detail::LaunchMaybeDependent(kernel, grid, dim3(threads), static_cast<size_t>(smem),
                                      stream, dependent, args...);
}

// Whether pass 1 at `level` directly follows the q conversion on the stream (single level, no
// small segments: LaunchSmall launches nothing before it), so it may be its programmatic dependent.
inline bool Pass1FollowsConversion(const LookupLayout& l, int level) {
  return level == 2 && !l.any_hierarchical && l.small_list.empty();
}

// Pass 1, one query row held by a quad (lane tq of 4 each saw different entries, with its own
// running max m and normaliser z under it; a lane that saw none holds (-inf, 0)): the row's max,
// every normaliser moved to it, summed. Lane 0 writes it: info (one piece) or the piece's slot of
// the partials. An empty piece leaves (-inf, 0). The whole quad calls it.
__device__ __forceinline__ void FinishRowStat(const LookupSegment& s, float4* info, float2* part,
                                              int piece, int splits, int row, int tq, float f,
                                              float m, float z) {
  const float mx = detail::QuadMax(m);
  z = detail::QuadSum(m > -INFINITY ? z * detail::FastExp2(m - mx) : 0.f);
  if (tq != 0 || row >= s.rows) return;
  if (splits == 1) {
    info[row] = make_float4(f, mx, 1.f / z, mx + log2f(z));
  } else {
    part[static_cast<size_t>(piece) * s.rows + row] = make_float2(mx, z);
  }
}

// Pass 1, several pieces: the last block of row tile `rtile` to arrive combines the pieces' (max,
// normaliser) in piece order. The whole block (T threads) calls it.
template <int T>
__device__ __forceinline__ void CombineRowPieces(const LookupSegment& s, const Workspace& w,
                                                 float4* info, const float2* part, int rtile,
                                                 int* last) {
  const int splits = s.row_splits;
  if (!ArriveLast(w.counters + s.tile_counter + rtile, splits, last)) return;
  const int row0 = rtile * kMmaRowTile;
  for (int r = threadIdx.x; r < kMmaRowTile; r += T) {
    const int row = row0 + r;
    if (row >= s.rows) break;
    float mx = -INFINITY;
    for (int p = 0; p < splits; ++p) {
      mx = fmaxf(mx, __ldcg(&part[static_cast<size_t>(p) * s.rows + row].x));
    }
    float z = 0.f;
    for (int p = 0; p < splits; ++p) {
      const float2 v = __ldcg(&part[static_cast<size_t>(p) * s.rows + row]);
      if (v.y > 0.f) z = fmaf(v.y, detail::FastExp2(v.x - mx), z);
    }
    // z >= the size of the arg-max entry >= 1
    info[row] = make_float4(__ldcg(&info[row].x), mx, 1.f / z, mx + log2f(z));
  }
}

// Pass 2, one entry held by a quad (each lane summed different rows): the quad's sum, written by
// lane 0 as the score (one piece) or the piece's partial. The whole quad calls it.
__device__ __forceinline__ void FinishColumn(const LookupSegment& s, const EntrySet& e,
                                             const Workspace& w, int piece, int splits, int i,
                                             int tq, float col) {
  const float c = detail::QuadSum(col);
  if (tq != 0 || i >= e.scored) return;
  if (splits == 1) {
    w.floats[s.score_offset + i] = c * (1.f / static_cast<float>(s.rows));
  } else {
    w.floats[s.part_offset + static_cast<size_t>(piece) * s.entry_capacity + i] = c;
  }
}

// Pass 2, several pieces: the last block of entry tile `etile` to arrive sums the pieces in piece
// order into the scores. The whole block (T threads) calls it.
template <int T>
__device__ __forceinline__ void CombineColumnPieces(const Workspace& w, const LookupSegment& s,
                                                    const EntrySet& e, int etile, int* last) {
  const int splits = s.col_splits;
  if (splits <= 1 || etile * kMmaColTile >= e.scored) return;
  const int rtiles = CeilDiv(s.rows, kMmaRowTile);
  if (!ArriveLast(w.counters + s.tile_counter + rtiles + etile, splits, last)) return;
  const float* part = w.floats + s.part_offset;  // (splits, entry_capacity)
  const int col0 = etile * kMmaColTile;
  for (int i = col0 + threadIdx.x; i < min(col0 + kMmaColTile, e.scored); i += T) {
    float sum = 0.f;
    for (int p = 0; p < splits; ++p) {
      sum += __ldcg(part + static_cast<size_t>(p) * s.entry_capacity + i);
    }
    w.floats[s.score_offset + i] = sum * (1.f / static_cast<float>(s.rows));
  }
}

// Pass 2's end of a block, after CombineColumnPieces of its tiles: with `finish`, the last of the
// segment's `blocks` blocks to arrive selects it (else the staged selection kernel does). The
// whole block (T threads) calls it, once.
template <int T>
__device__ __forceinline__ void FinishSegment(const LookupArgs& a, const Workspace& w, int seg,
                                              int level, bool finish, int blocks, int* last) {
  if (!finish) return;
  if (!ArriveLast(w.counters + seg, blocks, last)) return;
  if (a.score_only) return;
  __shared__ ArgsBuffer args;
  args.Fill(a, w);
  SelectSegment<T>(args.args(), args.ws(), seg, level, true);
}

// Pass 2's end for a block of one entry tile: CombineColumnPieces, then FinishSegment.
template <int T>
__device__ __forceinline__ void FinishColumns(const LookupArgs& a, const Workspace& w, int seg,
                                              const LookupSegment& s, const EntrySet& e, int etile,
                                              int level, bool finish, int* last) {
  CombineColumnPieces<T>(w, s, e, etile, last);
  FinishSegment<T>(a, w, seg, level, finish, gridDim.x, last);
}

}  // namespace sqkv::gpu::lookup_detail
