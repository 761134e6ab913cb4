// Resident layers of the GPU engine: checks, index upload, page copies into the pool.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "gpu/engine_plan.h"

namespace sqkv::gpu {
namespace {

// Index arrays start on this boundary (bytes) inside the layer's buffer: float4 loads need 16.
constexpr size_t kArrayAlign = 256;

size_t AlignUp(size_t x, size_t a) { return (x + a - 1) / a * a; }

// Appends `bytes` of `src` at an aligned offset of `staging`; returns the offset.
size_t Append(std::vector<uint8_t>* staging, const void* src, size_t bytes) {
  const size_t at = AlignUp(staging->size(), kArrayAlign);
  staging->resize(at + bytes);
  if (bytes > 0) std::memcpy(staging->data() + at, src, bytes);
  return at;
}

}  // namespace

Status CudaStatus(int err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  cudaGetLastError();  // clear a non-sticky error so later calls start clean
  return Status::Internal(std::string(what) + ": " +
                          cudaGetErrorString(static_cast<cudaError_t>(err)));
}

Status PrepareLayer(DType dtype, int page_tokens, const std::vector<HeadIndex>& heads,
                    const void* /*pages: may be null (index only)*/, size_t slot_bytes,
                    ResidentLayer* layer) {
  if (heads.empty()) return Status::InvalidArgument("no kv heads");
  if (page_tokens < 1) return Status::InvalidArgument("page_tokens < 1");
  const int d = heads[0].head_dim;
  if (d < 16 || d % 16 != 0) {
    return Status::InvalidArgument("head_dim " + std::to_string(d) + " is not a multiple of 16");
  }
  layer->dtype = dtype;
  layer->page_tokens = page_tokens;
  layer->head_dim = d;
  layer->page_bytes = PageBytes(page_tokens, d, dtype);
  if (slot_bytes % layer->page_bytes != 0) {
    return Status::InvalidArgument("page of " + std::to_string(layer->page_bytes) +
                                   " bytes does not divide the pool slot of " +
                                   std::to_string(slot_bytes));
  }
  layer->total_pages = 0;
  layer->heads.clear();
  layer->sources.clear();
  for (size_t h = 0; h < heads.size(); ++h) {
    const HeadIndex& x = heads[h];
    const std::string where = "head " + std::to_string(h);
    if (x.head_dim != d || x.page_tokens != page_tokens) {
      return Status::InvalidArgument(where + ": head_dim or page_tokens differ from the layer's");
    }
    Status st = ValidateHeadIndex(x);
    if (!st.ok()) return Status::InvalidArgument(where + ": " + st.message());
    ResidentHead r;
    r.num_clusters = x.num_clusters();
    r.num_l1 = x.num_l1();
    r.tokens = x.tokens;
    r.num_pages = x.num_pages();
    r.sorted_sizes = x.cluster_size;
    std::sort(r.sorted_sizes.begin(), r.sorted_sizes.end());
    layer->heads.push_back(std::move(r));
    layer->sources.push_back(&x);
    layer->total_pages += static_cast<size_t>(x.num_pages());
  }
  return Status::Ok();
}

Status UploadLayer(const std::vector<int32_t>& pool_ids, const void* pages, void* pool,
                   void* stream_ptr, ResidentLayer* layer) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  // Index: per head centroids, sizes, page begins, page table, level-1 arrays.
  struct Offsets {
    size_t centroids, sizes, begin, table, l1c, l1s, l1b;
  };
  std::vector<uint8_t> staging;
  std::vector<Offsets> off(layer->heads.size());
  size_t page_base = 0;
  for (size_t h = 0; h < layer->heads.size(); ++h) {
    const HeadIndex& x = *layer->sources[h];
    Offsets& o = off[h];
    // Centroids in the lookup's 16-bit storage (gpu/lookup.h: half the bytes a lookup reads).
    std::vector<uint16_t> c16, l1_16;
    layer->heads[h].centroid_scale = CentroidsToF16(x.centroids, x.l1_centroids, &c16, &l1_16);
    o.centroids = Append(&staging, c16.data(), c16.size() * sizeof(uint16_t));
    o.sizes = Append(&staging, x.cluster_size.data(), x.cluster_size.size() * sizeof(int32_t));
    o.begin = Append(&staging, x.cluster_page_begin.data(),
                     x.cluster_page_begin.size() * sizeof(int32_t));
    o.table = Append(&staging, pool_ids.data() + page_base, x.num_pages() * sizeof(int32_t));
    page_base += x.num_pages();
    o.l1c = Append(&staging, l1_16.data(), l1_16.size() * sizeof(uint16_t));
    o.l1s = Append(&staging, x.l1_size.data(), x.l1_size.size() * sizeof(int32_t));
    o.l1b = Append(&staging, x.l1_child_begin.data(), x.l1_child_begin.size() * sizeof(int32_t));
  }
  SQKV_RETURN_IF_ERROR(layer->index.Allocate(staging.size()));
  SQKV_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(layer->index.get(), staging.data(),
                                                  staging.size(), cudaMemcpyHostToDevice, stream),
                                  "upload index"));
  auto* base = static_cast<uint8_t*>(layer->index.get());
  for (size_t h = 0; h < layer->heads.size(); ++h) {
    ResidentHead& r = layer->heads[h];
    const Offsets& o = off[h];
    r.centroids = reinterpret_cast<const uint16_t*>(base + o.centroids);
    r.cluster_size = reinterpret_cast<const int32_t*>(base + o.sizes);
    r.cluster_page_begin = reinterpret_cast<const int32_t*>(base + o.begin);
    r.page_table = reinterpret_cast<const int32_t*>(base + o.table);
    if (r.num_l1 > 0) {
      r.l1_centroids = reinterpret_cast<const uint16_t*>(base + o.l1c);
      r.l1_size = reinterpret_cast<const int32_t*>(base + o.l1s);
      r.l1_child_begin = reinterpret_cast<const int32_t*>(base + o.l1b);
    }
  }
  // Pages: runs of consecutive pool ids become one copy each.
  const auto* src = static_cast<const uint8_t*>(pages);
  auto* dst = static_cast<uint8_t*>(pool);
  const size_t pb = layer->page_bytes;
  size_t g = 0;
  while (pages != nullptr && g < pool_ids.size()) {
    size_t end = g + 1;
    while (end < pool_ids.size() && pool_ids[end] == pool_ids[end - 1] + 1) ++end;
    SQKV_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(dst + static_cast<size_t>(pool_ids[g]) * pb, src + g * pb,
                                   (end - g) * pb, cudaMemcpyHostToDevice, stream),
                   "upload pages"));
    g = end;
  }
  // The staging vector dies with this call: wait for the copies.
  SQKV_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "upload layer"));
  layer->sources.clear();
  return Status::Ok();
}

}  // namespace sqkv::gpu
