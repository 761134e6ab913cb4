// Device-side timing and graph replay for benchmarks and tests of the engine's embedding form
// (Plan + Run). Plain C++: CUDA events and graphs behind a small interface.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "common/status.h"

namespace sqkv::gpu {

// Times what `enqueue` puts on `stream` (a cudaStream_t) with CUDA events: `warmup` untimed calls,
// then `iters` samples of one call each, back to back (no host sync between them).
// ms: (iters) milliseconds per sample.
Status TimeOnStream(void* stream, int warmup, int iters, const std::function<Status()>& enqueue,
                    std::vector<float>* ms);

// What `enqueue` puts on a stream, captured once into a CUDA graph (stream capture) and replayed.
class CapturedGraph {
 public:
  // Fails (Internal) if `enqueue` does something capture forbids (a synchronisation, a copy from
  // pageable memory, an allocation).
  static Status Capture(void* stream, const std::function<Status()>& enqueue,
                        std::unique_ptr<CapturedGraph>* out);
  ~CapturedGraph();
  CapturedGraph(const CapturedGraph&) = delete;
  CapturedGraph& operator=(const CapturedGraph&) = delete;
  // Enqueues one replay on `stream`.
  Status Replay(void* stream) const;

 private:
  CapturedGraph() = default;
  void* graph_ = nullptr;  // cudaGraph_t
  void* exec_ = nullptr;   // cudaGraphExec_t
};

}  // namespace sqkv::gpu
