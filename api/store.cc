#include <algorithm>
#include <cctype>
#include <cinttypes>
#include <filesystem>
#include <set>

#include "api/store_impl.h"
#include "gpu/device.h"
#include "gpu/engine.h"
#include "index/serialize.h"
#include "storage/file_util.h"

// OpenBLAS's thread control, when OpenBLAS is the BLAS linked in (weak: null otherwise).
extern "C" void openblas_set_num_threads(int threads) __attribute__((weak));

namespace sqkv {

const char* DeviceName(Device d) {
  switch (d) {
    case Device::kAuto: return "auto";
    case Device::kCpu: return "cpu";
    case Device::kGpu: return "gpu";
  }
  return "?";
}

bool ParseDevice(std::string_view s, Device* out) {
  if (s == "auto") *out = Device::kAuto;
  else if (s == "cpu") *out = Device::kCpu;
  else if (s == "gpu") *out = Device::kGpu;
  else return false;
  return true;
}

Status ValidateContextName(std::string_view name) {
  constexpr size_t kMaxName = 128;
  if (name.empty() || name.size() > kMaxName) {
    return Status::InvalidArgument("context name must have 1 to 128 characters");
  }
  if (name[0] == '.' || name[0] == '-') {
    return Status::InvalidArgument("context name '" + std::string(name) +
                                   "' must not start with '.' or '-'");
  }
  for (char c : name) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-')) {
      return Status::InvalidArgument("context name '" + std::string(name) +
                                     "' may only hold letters, digits, '.', '_' and '-'");
    }
  }
  return Status::Ok();
}

namespace {
Status NoTiers() { return Status::Unavailable("this store has no page tiers (pin, preload)"); }
}  // namespace

Status Store::Pin(const std::string&, Tier) { return NoTiers(); }
Status Store::Unpin(const std::string&) { return NoTiers(); }
Status Store::Preload(const std::string&, Tier) { return NoTiers(); }
Status Store::ListPins(std::vector<std::pair<std::string, Tier>>*) { return NoTiers(); }
Status Store::GetTierStats(TierStats*) { return NoTiers(); }

Status Store::Open(const StoreOptions& options, std::unique_ptr<Store>* out) {
  if (options.data_dir.empty()) return Status::InvalidArgument("empty data directory");
  if (options.blas_threads < 0) return Status::InvalidArgument("negative blas_threads");
  if (options.blas_threads > 0 && openblas_set_num_threads != nullptr) {
    openblas_set_num_threads(options.blas_threads);
  }
  if (!options.create_if_missing && !std::filesystem::exists(options.data_dir + "/catalog")) {
    return Status::NotFound("no store in " + options.data_dir +
                            " (give --data DIR or $SQKV_DATA; `sqkv import` creates one)");
  }
  SQKV_RETURN_IF_ERROR(EnsureDir(options.data_dir));
  SQKV_RETURN_IF_ERROR(EnsureDir(options.data_dir + "/segments"));
  std::unique_ptr<Catalog> catalog;
  SQKV_RETURN_IF_ERROR(Catalog::Open(options.data_dir + "/catalog", &catalog));
  PageCacheOptions cache_options;
  cache_options.capacity_bytes = options.host_cache_bytes;
  if (gpu::DevicePresent()) {
    // Pinned chunks: host→device copies straight from cache slots. Chunks are large because
    // pinning is slow.
    cache_options.chunk_bytes = 64ull << 20;
    cache_options.alloc_chunk = [](size_t bytes) { return gpu::AllocPinnedHost(bytes); };
    cache_options.free_chunk = [](void* p, size_t) { gpu::FreePinnedHost(p); };
  }
  std::unique_ptr<PageCache> cache;
  SQKV_RETURN_IF_ERROR(PageCache::Open(cache_options, &cache));
  auto impl = std::make_unique<StoreImpl>(options, std::move(catalog), std::move(cache));
  // Nothing runs yet: every garbage version can go, and so can crash leftovers.
  SQKV_RETURN_IF_ERROR(impl->ReclaimGarbage(nullptr));
  SQKV_RETURN_IF_ERROR(impl->RemoveOrphans(nullptr, /*opening=*/true));
  SQKV_RETURN_IF_ERROR(impl->RestorePins());
  *out = std::move(impl);
  return Status::Ok();
}

StoreImpl::StoreImpl(const StoreOptions& options, std::unique_ptr<Catalog> catalog,
                     std::unique_ptr<PageCache> host_cache)
    : Store(options.data_dir),
      options_(options),
      catalog_(std::move(catalog)),
      host_cache_(std::move(host_cache)) {}

StoreImpl::~StoreImpl() = default;

std::string StoreImpl::SegmentPath(const ContextRecord& r) const {
  return segments_dir() + "/" + r.SegmentFileName();
}

Status StoreImpl::List(std::vector<ContextInfo>* out) { return catalog_->ListContexts(out); }

Status StoreImpl::Info(const std::string& name, ContextInfo* out) {
  SQKV_RETURN_IF_ERROR(ValidateContextName(name));
  return catalog_->GetContext(name, out);
}

Status StoreImpl::Remove(const std::string& name) {
  SQKV_RETURN_IF_ERROR(ValidateContextName(name));
  ContextRecord removed;
  SQKV_RETURN_IF_ERROR(catalog_->RemoveContext(name, &removed));
  // Gone for new queries; the files go now unless a query in flight still reads them.
  return ReclaimGarbage(nullptr);
}

bool StoreImpl::PinVersion(uint64_t version) {
  std::lock_guard<std::mutex> lock(cache_mu_);
  if (reclaimed_.count(version)) return false;
  ++pins_[version];
  return true;
}

void StoreImpl::UnpinVersion(uint64_t version) {
  std::lock_guard<std::mutex> lock(cache_mu_);
  if (--pins_[version] == 0) pins_.erase(version);
}

Status SegmentMatchesRecord(const SegmentHeader& h, const ContextRecord& r) {
  if (h.version != r.version || h.layers != static_cast<uint32_t>(r.layers) ||
      h.kv_heads != static_cast<uint32_t>(r.kv_heads) ||
      h.tokens != static_cast<uint32_t>(r.tokens) ||
      h.head_dim != static_cast<uint32_t>(r.head_dim) ||
      h.page_tokens != static_cast<uint32_t>(r.page_tokens) || h.dtype != r.dtype ||
      r.layer_first_page.empty() || h.num_pages != r.layer_first_page.back()) {
    return Status::Corruption("context " + r.name + ": segment header disagrees with the catalog "
                              "record");
  }
  return Status::Ok();
}

Result<std::shared_ptr<SegmentReader>> StoreImpl::GetSegment(const ContextRecord& r) {
  std::lock_guard<std::mutex> lock(cache_mu_);
  auto it = segments_.find(r.version);
  if (it != segments_.end()) return it->second;
  std::unique_ptr<SegmentReader> reader;
  Status opened = SegmentReader::Open(SegmentPath(r), &reader);
  if (opened.IsNotFound()) {
    // The record is live (and pinned by the caller), so its file must exist: damage, as verify
    // reports it, not an unknown context.
    return Status::Corruption("context " + r.name + ": segment file of version " +
                              std::to_string(r.version) + " is missing (" + opened.message() +
                              ")");
  }
  SQKV_RETURN_IF_ERROR(opened.WithContext("context " + r.name));
  SQKV_RETURN_IF_ERROR(SegmentMatchesRecord(reader->header(), r));
  std::shared_ptr<SegmentReader> shared(std::move(reader));
  // Each reader holds three descriptors: keep a bounded set open (queries in flight keep theirs
  // through the shared_ptr).
  if (segments_.size() >= options_.open_segments) segments_.erase(segments_.begin());
  segments_[r.version] = shared;
  return shared;
}

namespace {

template <typename T>
size_t VectorBytes(const std::vector<T>& v) {
  return v.capacity() * sizeof(T);
}

// What a decoded layer holds on the heap: the index cache's charge for it.
size_t LayerDataBytes(const LayerData& d) {
  size_t bytes = sizeof(LayerData) + VectorBytes(d.checksums) + VectorBytes(d.head_first_page) +
                 VectorBytes(d.heads);
  for (const HeadIndex& h : d.heads) {
    bytes += VectorBytes(h.centroids) + VectorBytes(h.cluster_size) +
             VectorBytes(h.cluster_page_begin) + VectorBytes(h.positions) +
             VectorBytes(h.l1_centroids) + VectorBytes(h.l1_size) + VectorBytes(h.l1_child_begin);
  }
  return bytes;
}

}  // namespace

Result<std::shared_ptr<const LayerData>> StoreImpl::GetLayer(const ContextRecord& r, int layer) {
  const LayerKey key{r.version, layer};
  {
    std::lock_guard<std::mutex> lock(cache_mu_);
    auto it = layers_.find(key);
    if (it != layers_.end()) {
      layer_lru_.splice(layer_lru_.begin(), layer_lru_, it->second.second);
      return it->second.first;
    }
  }
  auto data = std::make_shared<LayerData>();
  std::string blob;
  const std::string ctx = "context " + r.name + " layer " + std::to_string(layer);
  SQKV_RETURN_IF_ERROR(catalog_->GetLayerIndex(r.version, layer, &blob).WithContext(ctx));
  SQKV_RETURN_IF_ERROR(DecodeLayerIndex(blob, &data->heads).WithContext(ctx));
  SQKV_RETURN_IF_ERROR(catalog_->GetPageChecksums(r.version, layer, &data->checksums).WithContext(ctx));
  if (data->heads.size() != static_cast<size_t>(r.kv_heads)) {
    return Status::Corruption(ctx + ": index has " + std::to_string(data->heads.size()) +
                              " heads, record says " + std::to_string(r.kv_heads));
  }
  data->head_first_page.resize(r.kv_heads + 1);
  data->head_first_page[0] = r.layer_first_page[layer];
  for (int h = 0; h < r.kv_heads; ++h) {
    const HeadIndex& hi = data->heads[h];
    if (hi.head_dim != r.head_dim || hi.tokens != r.tokens || hi.page_tokens != r.page_tokens) {
      return Status::Corruption(ctx + ": head " + std::to_string(h) + " shape disagrees");
    }
    data->head_first_page[h + 1] = data->head_first_page[h] + hi.num_pages();
  }
  if (data->head_first_page[r.kv_heads] != r.layer_first_page[layer + 1] ||
      data->checksums.size() != r.layer_first_page[layer + 1] - r.layer_first_page[layer]) {
    return Status::Corruption(ctx + ": page counts disagree with the record");
  }
  data->bytes = LayerDataBytes(*data);
  std::lock_guard<std::mutex> lock(cache_mu_);
  auto it = layers_.find(key);
  if (it != layers_.end()) return it->second.first;  // another thread won the race
  ++layers_decoded_;
  layer_lru_.push_front(key);
  layers_[key] = {data, layer_lru_.begin()};
  layer_bytes_ += data->bytes;
  // Evict from the back; the layer just added (front) stays even when it alone is over the bound.
  // Queries holding an evicted layer keep it alive through their shared_ptr.
  while (layers_.size() > 1 && (layers_.size() > options_.index_cache_layers ||
                                layer_bytes_ > options_.index_cache_bytes)) {
    auto victim = layers_.find(layer_lru_.back());
    layer_bytes_ -= victim->second.first->bytes;
    layers_.erase(victim);
    layer_lru_.pop_back();
    ++layers_evicted_;
  }
  return std::shared_ptr<const LayerData>(data);
}

}  // namespace sqkv
