// Rebuild (re-cluster a stored context as a new version) and threshold calibration.
#include <algorithm>
#include <cstring>

#include "api/store_impl.h"
#include "index/calibrate.h"

namespace sqkv {

Status StoreImpl::Rebuild(const std::string& name, const ImportOptions& options,
                          ContextInfo* info) {
  SQKV_RETURN_IF_ERROR(ValidateContextName(name));
  SQKV_RETURN_IF_ERROR(ValidateBuildOptions(options));
  ContextRecord old;
  SQKV_RETURN_IF_ERROR(catalog_->GetContext(name, &old));
  if (!PinVersion(old.version))
    return Status::Unavailable("context " + name + " is being replaced");
  ContextInfo fresh;
  Status built;
  {
    VersionPin pin(this, old.version);
    built = RebuildPinned(old, options, &fresh);
  }
  if (!built.ok()) {
    // The source may have been removed meanwhile (Publish refused then): its files go now that
    // this rebuild no longer reads them.
    ReclaimGarbage(nullptr).PermitUncheckedError();
    return built;
  }
  if (info != nullptr) *info = fresh;
  // A pinned context stays pinned in its new version.
  if (host_cache_->IsVersionPinned(old.version)) {
    SQKV_RETURN_IF_ERROR(host_cache_->PinVersion(fresh.version));
  }
  {
    std::lock_guard<std::mutex> lock(engine_mu_);
    if (gpu_pinned_versions_.count(old.version)) {
      // The old version's device layers let go of their pool pages now; the new version's
      // layers are pinned as they load (EnsureDeviceIndex).
      UnpinDeviceLocked(old);
      gpu_pinned_versions_.insert(fresh.version);
    }
  }
  // The old version is garbage now; its files go at once unless queries still read it.
  return ReclaimGarbage(nullptr);
}

Status StoreImpl::RebuildPinned(const ContextRecord& old, const ImportOptions& options,
                                ContextInfo* info) {
  const std::string& name = old.name;
  SQKV_ASSIGN_OR_RETURN(auto segment, GetSegment(old));

  VersionSpec spec;
  spec.name = name;
  spec.layers = old.layers;
  spec.kv_heads = old.kv_heads;
  spec.tokens = old.tokens;
  spec.head_dim = old.head_dim;
  spec.dtype = old.dtype;
  spec.source = old.source;
  spec.replaces_version = old.version;
  if (old.window_q_heads > 0) {
    spec.window_queries.resize(old.layers);
    for (int l = 0; l < old.layers; ++l) {
      const Status s = catalog_->GetWindowQueries(old.version, l, &spec.window_queries[l]);
      if (s.IsNotFound()) {  // the record says they were stored: damage, not a missing context
        return Status::Corruption("context " + name + ": " + s.message() +
                                  " is missing from the catalog (sqkv verify)");
      }
      SQKV_RETURN_IF_ERROR(s);
    }
    // The new version is calibrated at the levels the old one had (`calibrate --sparsity`).
    Thresholds t;
    if (Status s = catalog_->GetThresholds(old.version, 0, &t); s.ok()) {
      spec.sparsities = t.sparsity;
    } else if (!s.IsNotFound()) {
      return s;
    }
  }
  const size_t row = static_cast<size_t>(old.head_dim) * DTypeSize(old.dtype);
  const size_t page_bytes = segment->header().page_bytes;
  // Each layer's keys and values are read back from the old pages into original token order.
  auto layer_source = [&](int l, LayerBytes* out) -> Status {
    SQKV_ASSIGN_OR_RETURN(auto layer, GetLayer(old, l));
    const uint64_t first = layer->head_first_page[0];
    const uint64_t count = layer->head_first_page.back() - first;
    std::vector<uint8_t> pages(count * page_bytes);
    SQKV_RETURN_IF_ERROR(segment->ReadPages(first, count, pages.data(), layer->checksums.data())
                             .WithContext("context " + name));
    const size_t head_bytes = static_cast<size_t>(old.tokens) * row;
    out->k_own.assign(old.kv_heads * head_bytes, 0);
    out->v_own.assign(old.kv_heads * head_bytes, 0);
    for (int h = 0; h < old.kv_heads; ++h) {
      const HeadIndex& index = layer->heads[h];
      const uint8_t* head_pages = pages.data() + (layer->head_first_page[h] - first) * page_bytes;
      for (size_t slot = 0; slot < index.positions.size(); ++slot) {
        const int32_t pos = index.positions[slot];
        if (pos < 0) continue;
        const uint8_t* page = head_pages + (slot / index.page_tokens) * page_bytes;
        const size_t t = slot % index.page_tokens;
        std::memcpy(out->k_own.data() + h * head_bytes + pos * row, page + t * row, row);
        std::memcpy(out->v_own.data() + h * head_bytes + pos * row, page + page_bytes / 2 + t * row,
                    row);
      }
    }
    out->k = out->k_own.data();
    out->v = out->v_own.data();
    out->k_name = "k." + std::to_string(l) + " (stored)";
    out->v_name = "v." + std::to_string(l) + " (stored)";
    return Status::Ok();
  };
  return BuildVersion(spec, options, layer_source, /*replace=*/true, info);
}

Status StoreImpl::Calibrate(const std::string& name, const std::vector<WindowQueries>* queries,
                            const std::vector<float>& requested) {
  SQKV_RETURN_IF_ERROR(ValidateContextName(name));
  // Stored ascending and without repeats: InterpolateThreshold relies on it.
  std::vector<float> sparsities = requested;
  std::sort(sparsities.begin(), sparsities.end());
  sparsities.erase(std::unique(sparsities.begin(), sparsities.end()), sparsities.end());
  if (sparsities.empty()) return Status::InvalidArgument("calibrate: no target sparsities given");
  ContextRecord r;
  SQKV_RETURN_IF_ERROR(catalog_->GetContext(name, &r));
  if (!PinVersion(r.version)) return Status::Unavailable("context " + name + " is being replaced");
  VersionPin pin(this, r.version);
  if (queries == nullptr && r.window_q_heads == 0) {
    return Status::InvalidArgument("context " + name +
                                   " was imported without window queries (q.<layer>): give "
                                   "calibration queries (--queries FILE)");
  }
  if (queries != nullptr && queries->size() != static_cast<size_t>(r.layers)) {
    return Status::InvalidArgument("calibration queries cover " + std::to_string(queries->size()) +
                                   " layers, context " + name + " has " + std::to_string(r.layers));
  }
  std::vector<Thresholds> all(r.layers);
  for (int l = 0; l < r.layers; ++l) {
    WindowQueries stored;
    const WindowQueries* w = nullptr;
    if (queries != nullptr) {
      w = &(*queries)[l];
    } else {
      SQKV_RETURN_IF_ERROR(catalog_->GetWindowQueries(r.version, l, &stored));
      w = &stored;
    }
    if (w->head_dim != r.head_dim) {
      return Status::InvalidArgument("calibration queries of layer " + std::to_string(l) +
                                     " have head_dim " + std::to_string(w->head_dim) +
                                     ", context has " + std::to_string(r.head_dim));
    }
    SQKV_ASSIGN_OR_RETURN(auto layer, GetLayer(r, l));
    all[l].sparsity = sparsities;
    SQKV_RETURN_IF_ERROR(CalibrateThresholds(layer->heads, w->data.data(), w->q_heads, w->window,
                                             sparsities, &all[l].threshold)
                             .WithContext("layer " + std::to_string(l)));
  }
  // Given queries are kept with the thresholds, so a rebuild can calibrate the new version too.
  return catalog_->PutCalibration(r, all, queries);
}

Status StoreImpl::GetThresholds(const std::string& name, int layer, Thresholds* out) {
  SQKV_RETURN_IF_ERROR(ValidateContextName(name));
  ContextRecord r;
  SQKV_RETURN_IF_ERROR(catalog_->GetContext(name, &r));
  if (layer < 0 || layer >= r.layers) return Status::InvalidArgument("layer out of range");
  return catalog_->GetThresholds(r.version, layer, out);
}

}  // namespace sqkv
