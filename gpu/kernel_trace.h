// Kernel timeline tracing for benchmarks (build option SQKV_KERNEL_TRACE, off by default). When
// on, the decode path's kernels (small scoring, staged selection, decode attention, split merge)
// and the prefill path's (q conversion, the two 16-bit wgmma passes, the staged selection, the
// attention's compaction pre-pass and its wgmma kernel) stamp the GPU's global timer into a
// device buffer: per kernel the first block's start, the first and last block past the
// dependency wait, and the last block's end; per phase mark inside the scoring and selection
// kernels the first and last block to reach it. Off, none of this is compiled into the kernels
// and these functions report that tracing is unavailable. Plain C++.
#pragma once

#include <cstdint>

namespace sqkv::gpu {

// The kernels, then phase marks inside them (only their wait columns are stamped: the first and
// the last block to reach the mark).
enum class TraceKernel : int {
  kSmall,
  kStaged,
  kDecode,
  kSplitMerge,
  kConvertQ,  // prefill: q to binary16
  kRowPass,   // prefill: pass 1 (wgmma)
  kColPass,   // prefill: pass 2 (wgmma)
  kCompact,   // prefill attention: the compaction pre-pass
  kPrefill,   // prefill attention: the wgmma kernel
  kSmallStarted,    // scoring: the block started
  kSmallIssued,     // scoring (bulk copies): the block's first copies issued
  kSmallFirstTile,  // scoring: the block's first tile's logits computed (its loads arrived)
  kStagedScored,    // staged selection: the scores are in shared memory
  kStagedCut,       // staged selection: the cut is known
  kStagedDecided,   // staged selection: the output positions are known (page writes follow)
  kCount
};

// Nanoseconds on the GPU's global timer; ~0ull / 0 where nothing was stamped.
struct TraceRecord {
  uint64_t first_start;
  uint64_t first_wait;
  uint64_t last_wait;
  uint64_t last_end;
};

inline constexpr int kTraceKernels = static_cast<int>(TraceKernel::kCount);
// Display names, in TraceKernel order.
inline constexpr const char* kTraceKernelNames[kTraceKernels] = {
    "small scoring", "staged select", "decode attn", "split merge", "convert q",
    "row pass",      "column pass",   "compaction",  "prefill attn", " .started",
    " .copies out",  " .first tile",  " .scored",    " .cut known", " .decided"};

// Whether this build stamps kernels.
bool KernelTraceCompiled();
// Points every traced kernel at `device_records` (kTraceKernels TraceRecord in device memory, or
// null to stop). Not while kernels run.
bool KernelTraceSetBuffer(TraceRecord* device_records);
// Enqueues one empty kernel on `stream` (a cudaStream_t): the floor of a timed launch.
bool KernelTraceEmptyLaunch(void* stream);

}  // namespace sqkv::gpu
