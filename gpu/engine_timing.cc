#include "gpu/engine_timing.h"

#include <cuda_runtime.h>

#include <string>

#include "gpu/engine_plan.h"

namespace sqkv::gpu {

Status TimeOnStream(void* stream_ptr, int warmup, int iters, const std::function<Status()>& enqueue,
                    std::vector<float>* ms) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  for (int i = 0; i < warmup; ++i) SQKV_RETURN_IF_ERROR(enqueue());
  std::vector<cudaEvent_t> events(2 * static_cast<size_t>(iters), nullptr);
  Status st;
  for (auto& e : events) {
    st = CudaStatus(cudaEventCreate(&e), "cudaEventCreate");
    if (!st.ok()) break;
  }
  for (int i = 0; i < iters && st.ok(); ++i) {
    st = CudaStatus(cudaEventRecord(events[2 * i], stream), "cudaEventRecord");
    if (st.ok()) st = enqueue();
    if (st.ok()) st = CudaStatus(cudaEventRecord(events[2 * i + 1], stream), "cudaEventRecord");
  }
  if (st.ok()) st = CudaStatus(cudaStreamSynchronize(stream), "time");
  ms->assign(iters, 0.f);
  for (int i = 0; i < iters && st.ok(); ++i) {
    st = CudaStatus(cudaEventElapsedTime(&(*ms)[i], events[2 * i], events[2 * i + 1]),
                    "cudaEventElapsedTime");
  }
  for (auto& e : events) {
    if (e != nullptr) cudaEventDestroy(e);
  }
  return st;
}

Status CapturedGraph::Capture(void* stream_ptr, const std::function<Status()>& enqueue,
                              std::unique_ptr<CapturedGraph>* out) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  SQKV_RETURN_IF_ERROR(CudaStatus(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal),
                                  "begin capture"));
  Status st = enqueue();
  cudaGraph_t graph = nullptr;
  Status end = CudaStatus(cudaStreamEndCapture(stream, &graph), "end capture");
  if (!st.ok() || !end.ok()) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    return !st.ok() ? st.WithContext("during capture") : end;
  }
  cudaGraphExec_t exec = nullptr;
  st = CudaStatus(cudaGraphInstantiate(&exec, graph, 0), "instantiate graph");
  if (!st.ok()) {
    cudaGraphDestroy(graph);
    return st;
  }
  std::unique_ptr<CapturedGraph> g(new CapturedGraph());
  g->graph_ = graph;
  g->exec_ = exec;
  *out = std::move(g);
  return Status::Ok();
}

CapturedGraph::~CapturedGraph() {
  if (exec_ != nullptr) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
  if (graph_ != nullptr) cudaGraphDestroy(static_cast<cudaGraph_t>(graph_));
}

Status CapturedGraph::Replay(void* stream) const {
  return CudaStatus(
      cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec_), static_cast<cudaStream_t>(stream)),
      "graph launch");
}

}  // namespace sqkv::gpu
