// The GPU engine: page pool, resident layers, and the query paths (see gpu/engine.h).
#include "gpu/engine.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <tuple>
#include <unordered_map>

#include "gpu/device.h"
#include "gpu/device_buffer.h"
#include "gpu/engine_plan.h"
#include "gpu/lookup.h"
#include "gpu/paged_attention.h"

namespace sqkv::gpu {
namespace {

// Share of the free device memory the pool takes when EngineOptions::pool_bytes is 0.
constexpr double kDefaultPoolShare = 0.4;

class EngineImpl final : public Engine {
 public:
  EngineImpl(const EngineOptions& o, void* pool, size_t slots, Stream stream)
      : options_(o), pool_(pool), num_slots_(slots), stream_(std::move(stream)) {
    // Descending, so that pop_back hands out ascending (contiguous) slots.
    free_slots_.reserve(slots);
    for (size_t i = slots; i > 0; --i) free_slots_.push_back(static_cast<int32_t>(i - 1));
  }
  ~EngineImpl() override {
    cudaSetDevice(options_.device);
    cudaStreamSynchronize(static_cast<cudaStream_t>(stream_.get()));
    layers_.clear();
    cudaFree(pool_);
  }

  Status LoadLayer(uint64_t layer_key, DType dtype, int page_tokens,
                   const std::vector<HeadIndex>& heads, const void* pages) override;
  bool HasLayer(uint64_t layer_key) const override { return layers_.count(layer_key) > 0; }
  void EvictLayer(uint64_t layer_key) override;
  size_t pool_used_bytes() const override {
    return (num_slots_ - free_slots_.size()) * options_.slot_bytes;
  }
  size_t pool_bytes() const override { return num_slots_ * options_.slot_bytes; }

  Status Query(const std::vector<QueryRequest>& requests) override;
  Status Plan(const std::vector<DeviceQuery>& queries, std::unique_ptr<QueryPlan>* plan) override;
  Status Run(QueryPlan& plan, const DeviceIO& io, void* stream) override;
  Status ReadSelections(const QueryPlan& plan, void* stream,
                        std::vector<std::vector<HeadSelection>>* out) override;

 private:
  Status BuildPlan(const std::vector<DeviceQuery>& queries, DeviceBuffer* scratch, PlanImpl* plan);
  cudaStream_t stream() const { return static_cast<cudaStream_t>(stream_.get()); }

  EngineOptions options_;
  void* pool_ = nullptr;
  size_t num_slots_ = 0;
  Stream stream_;
  std::vector<int32_t> free_slots_;
  std::unordered_map<uint64_t, std::unique_ptr<ResidentLayer>> layers_;
  uint64_t next_generation_ = 1;
  // Query's reusable device buffers (grow only).
  DeviceBuffer scratch_, q_dev_, out_dev_, lse_dev_;
};

Status Grow(DeviceBuffer* b, size_t bytes) {
  if (b->size() >= bytes) return Status::Ok();
  return b->Allocate(bytes);
}

Status EngineImpl::LoadLayer(uint64_t layer_key, DType dtype, int page_tokens,
                             const std::vector<HeadIndex>& heads, const void* pages) {
  SQKV_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(options_.device), "cudaSetDevice"));
  if (layers_.count(layer_key) > 0) {
    return Status::AlreadyExists("layer " + std::to_string(layer_key) + " is resident");
  }
  auto layer = std::make_unique<ResidentLayer>();
  SQKV_RETURN_IF_ERROR(
      PrepareLayer(dtype, page_tokens, heads, pages, options_.slot_bytes, layer.get()));
  const size_t per_slot = options_.slot_bytes / layer->page_bytes;
  if (num_slots_ * per_slot > static_cast<size_t>(INT32_MAX)) {
    return Status::InvalidArgument("pool too large for 32-bit ids of " +
                                   std::to_string(layer->page_bytes) + "-byte pages");
  }
  const size_t total_pages = layer->total_pages;
  const size_t need = (total_pages + per_slot - 1) / per_slot;
  if (need > free_slots_.size()) {
    return Status::Unavailable("page pool full: layer needs " + std::to_string(need) + " slots, " +
                               std::to_string(free_slots_.size()) + " free");
  }
  layer->slots.assign(free_slots_.end() - need, free_slots_.end());
  std::reverse(layer->slots.begin(), layer->slots.end());
  free_slots_.resize(free_slots_.size() - need);
  layer->generation = next_generation_++;

  // Global page g (head-major) lives in slot slots[g / per_slot] at position g % per_slot.
  std::vector<int32_t> pool_ids(total_pages);
  for (size_t g = 0; g < total_pages; ++g) {
    pool_ids[g] = static_cast<int32_t>(static_cast<size_t>(layer->slots[g / per_slot]) * per_slot +
                                       g % per_slot);
  }
  Status st = UploadLayer(pool_ids, pages, pool_, stream(), layer.get());
  if (st.ok()) st = CudaStatus(cudaStreamSynchronize(stream()), "load layer");
  if (!st.ok()) {
    for (auto it = layer->slots.rbegin(); it != layer->slots.rend(); ++it) {
      free_slots_.push_back(*it);
    }
    return st.WithContext("load layer " + std::to_string(layer_key));
  }
  layers_[layer_key] = std::move(layer);
  return Status::Ok();
}

void EngineImpl::EvictLayer(uint64_t layer_key) {
  auto it = layers_.find(layer_key);
  if (it == layers_.end()) return;
  cudaSetDevice(options_.device);
  cudaStreamSynchronize(stream());
  const std::vector<int32_t>& slots = it->second->slots;
  for (auto s = slots.rbegin(); s != slots.rend(); ++s) free_slots_.push_back(*s);
  layers_.erase(it);
}

Status EngineImpl::BuildPlan(const std::vector<DeviceQuery>& queries, DeviceBuffer* scratch,
                             PlanImpl* plan) {
  std::vector<const ResidentLayer*> layers;
  for (size_t r = 0; r < queries.size(); ++r) {
    auto it = layers_.find(queries[r].layer_key);
    if (it == layers_.end()) {
      return Status::NotFound("request " + std::to_string(r) + ": layer " +
                              std::to_string(queries[r].layer_key) + " is not resident");
    }
    layers.push_back(it->second.get());
  }
  SQKV_RETURN_IF_ERROR(FillPlan(queries, layers, pool_, plan));
  return AllocatePlan(scratch, stream(), plan);
}

Status EngineImpl::Plan(const std::vector<DeviceQuery>& queries, std::unique_ptr<QueryPlan>* out) {
  SQKV_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(options_.device), "cudaSetDevice"));
  auto plan = std::make_unique<PlanImpl>();
  SQKV_RETURN_IF_ERROR(BuildPlan(queries, nullptr, plan.get()));
  *out = std::move(plan);
  return Status::Ok();
}

Status EngineImpl::Run(QueryPlan& base, const DeviceIO& io, void* stream) {
  auto& plan = static_cast<PlanImpl&>(base);
  for (size_t r = 0; r < plan.layer_keys.size(); ++r) {
    auto it = layers_.find(plan.layer_keys[r]);
    if (it == layers_.end() || it->second->generation != plan.generations[r]) {
      return Status::InvalidArgument("plan is stale: layer " + std::to_string(plan.layer_keys[r]) +
                                     " was evicted");
    }
  }
  return RunPlan(plan, io, stream);
}

Status EngineImpl::ReadSelections(const QueryPlan& base, void* stream,
                                  std::vector<std::vector<HeadSelection>>* out) {
  SQKV_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(options_.device), "cudaSetDevice"));
  SQKV_RETURN_IF_ERROR(
      CudaStatus(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "sync"));
  return ReadPlanSelections(static_cast<const PlanImpl&>(base), out);
}

Status EngineImpl::Query(const std::vector<QueryRequest>& requests) {
  SQKV_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(options_.device), "cudaSetDevice"));
  // Group by (dtype, head_dim, page_tokens): one lookup and one attention launch per group.
  std::map<std::tuple<int, int, int>, std::vector<int>> groups;
  for (size_t r = 0; r < requests.size(); ++r) {
    const QueryRequest& q = requests[r];
    auto it = layers_.find(q.layer_key);
    if (it == layers_.end()) {
      return Status::NotFound("request " + std::to_string(r) + ": layer " +
                              std::to_string(q.layer_key) + " is not resident");
    }
    const ResidentLayer& l = *it->second;
    SQKV_RETURN_IF_ERROR(CheckHostRequest(q, l).WithContext("request " + std::to_string(r)));
    groups[{static_cast<int>(l.dtype), l.head_dim, l.page_tokens}].push_back(static_cast<int>(r));
  }
  for (const auto& [key, members] : groups) {
    std::vector<DeviceQuery> dq;
    for (int r : members) {
      const QueryRequest& q = requests[r];
      dq.push_back(DeviceQuery{q.layer_key, q.q_heads, q.n, q.select});
    }
    PlanImpl plan;
    SQKV_RETURN_IF_ERROR(BuildPlan(dq, &scratch_, &plan));
    const size_t d = static_cast<size_t>(plan.head_dim_);
    const size_t rows = static_cast<size_t>(plan.total_rows_);
    SQKV_RETURN_IF_ERROR(Grow(&q_dev_, rows * d * sizeof(float)));
    SQKV_RETURN_IF_ERROR(Grow(&out_dev_, rows * d * sizeof(float)));
    SQKV_RETURN_IF_ERROR(Grow(&lse_dev_, rows * sizeof(float)));
    for (size_t i = 0; i < members.size(); ++i) {
      const QueryRequest& q = requests[members[i]];
      const size_t n_rows = static_cast<size_t>(q.q_heads) * q.n;
      SQKV_RETURN_IF_ERROR(
          CudaStatus(cudaMemcpyAsync(q_dev_.as<float>() + plan.row_offsets_[i] * d, q.q,
                                     n_rows * d * sizeof(float), cudaMemcpyHostToDevice, stream()),
                     "upload q"));
    }
    DeviceIO io{q_dev_.as<float>(), out_dev_.as<float>(), lse_dev_.as<float>()};
    SQKV_RETURN_IF_ERROR(RunPlan(plan, io, stream()));
    for (size_t i = 0; i < members.size(); ++i) {
      const QueryRequest& q = requests[members[i]];
      const size_t n_rows = static_cast<size_t>(q.q_heads) * q.n;
      SQKV_RETURN_IF_ERROR(
          CudaStatus(cudaMemcpyAsync(q.out, out_dev_.as<float>() + plan.row_offsets_[i] * d,
                                     n_rows * d * sizeof(float), cudaMemcpyDeviceToHost, stream()),
                     "download out"));
      SQKV_RETURN_IF_ERROR(
          CudaStatus(cudaMemcpyAsync(q.lse, lse_dev_.as<float>() + plan.row_offsets_[i],
                                     n_rows * sizeof(float), cudaMemcpyDeviceToHost, stream()),
                     "download lse"));
    }
    SQKV_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream()), "query"));
    bool want = false;
    for (int r : members) want |= requests[r].selection != nullptr;
    if (!want) continue;
    std::vector<std::vector<HeadSelection>> sel;
    SQKV_RETURN_IF_ERROR(ReadPlanSelections(plan, &sel));
    for (size_t i = 0; i < members.size(); ++i) {
      if (requests[members[i]].selection != nullptr) {
        *requests[members[i]].selection = std::move(sel[i]);
      }
    }
  }
  return Status::Ok();
}

}  // namespace

Status Engine::Create(const EngineOptions& options, std::unique_ptr<Engine>* out) {
  if (!DevicePresent()) return Status::Unavailable("no CUDA device found");
  if (options.slot_bytes == 0 || options.slot_bytes % 256 != 0) {
    return Status::InvalidArgument("slot_bytes must be a positive multiple of 256");
  }
  SQKV_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(options.device), "cudaSetDevice"));
  size_t bytes = options.pool_bytes;
  if (bytes == 0) {
    size_t free_bytes = 0, total = 0;
    SQKV_RETURN_IF_ERROR(CudaStatus(cudaMemGetInfo(&free_bytes, &total), "cudaMemGetInfo"));
    bytes = static_cast<size_t>(kDefaultPoolShare * static_cast<double>(free_bytes));
  }
  const size_t slots = bytes / options.slot_bytes;
  if (slots == 0) return Status::InvalidArgument("pool_bytes holds no slot");
  void* pool = nullptr;
  cudaError_t err = cudaMalloc(&pool, slots * options.slot_bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return Status::Unavailable("page pool of " + std::to_string(slots * options.slot_bytes) +
                               " bytes: " + cudaGetErrorString(err));
  }
  Stream stream;
  Status st = Stream::Create(&stream);
  if (!st.ok()) {
    cudaFree(pool);
    return st;
  }
  *out = std::make_unique<EngineImpl>(options, pool, slots, std::move(stream));
  return Status::Ok();
}

}  // namespace sqkv::gpu
