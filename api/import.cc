// Import: safetensors file → K-means index per (layer, kv head) → segment file + catalog entries,
// published atomically.
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <map>

#include "api/store_impl.h"
#include "gpu/device.h"
#include "gpu/kmeans.h"
#include "index/build.h"
#include "index/calibrate.h"
#include "index/serialize.h"
#include "storage/file_util.h"
#include "storage/safetensors.h"

namespace sqkv {
namespace {

constexpr int kMaxPageTokensImport = 4096;

// The tensors of a context file, checked for a consistent shape.
struct ContextTensors {
  int layers = 0, kv_heads = 0, tokens = 0, head_dim = 0;
  DType dtype = DType::kBF16;
  std::vector<const TensorInfo*> k, v, q;  // (layers); q entries may be null
};

std::string ShapeString(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + ")";
}

// Splits "k.12" into ('k', 12). False for any other form.
bool ParseTensorName(const std::string& name, char* kind, int* layer) {
  if (name.size() < 3 || name[1] != '.' || (name[0] != 'k' && name[0] != 'v' && name[0] != 'q')) {
    return false;
  }
  const std::string digits = name.substr(2);
  if (digits.empty() || digits.size() > 6 || (digits.size() > 1 && digits[0] == '0')) return false;
  for (char c : digits) {
    if (c < '0' || c > '9') return false;
  }
  *kind = name[0];
  *layer = std::stoi(digits);
  return true;
}

Status CheckContextTensors(const SafetensorsFile& file, ContextTensors* out) {
  std::map<int, const TensorInfo*> k, v, q;
  for (const TensorInfo& t : file.tensors()) {
    char kind;
    int layer;
    if (!ParseTensorName(t.name, &kind, &layer)) {
      return Status::InvalidArgument("tensor " + t.name +
                                     ": unexpected name (want k.<layer>, v.<layer>, q.<layer>)");
    }
    if (t.shape.size() != 3) {
      return Status::InvalidArgument("tensor " + t.name + ": shape " + ShapeString(t.shape) +
                                     " is not 3-D");
    }
    (kind == 'k' ? k : kind == 'v' ? v : q)[layer] = &t;
  }
  if (k.empty()) return Status::InvalidArgument("no k.<layer> tensors in " + file.path());
  if (k.size() > kMaxContextLayers) {
    return Status::InvalidArgument(std::to_string(k.size()) + " layers in " + file.path() +
                                   ": at most " + std::to_string(kMaxContextLayers));
  }
  out->layers = static_cast<int>(k.size());
  const TensorInfo* first = k.begin()->second;
  out->kv_heads = static_cast<int>(first->shape[0]);
  out->tokens = static_cast<int>(first->shape[1]);
  out->head_dim = static_cast<int>(first->shape[2]);
  out->dtype = first->dtype;
  if (first->shape[0] <= 0 || first->shape[1] <= 0 || first->shape[2] <= 0 ||
      first->shape[1] > (int64_t{1} << 30) || first->shape[0] > 4096 || first->shape[2] > 1024) {
    return Status::InvalidArgument("tensor " + first->name + ": shape " +
                                   ShapeString(first->shape) + " out of range");
  }
  for (int l = 0; l < out->layers; ++l) {
    for (const auto* m : {&k, &v}) {
      const char kind = m == &k ? 'k' : 'v';
      auto it = m->find(l);
      if (it == m->end()) {
        return Status::InvalidArgument(std::string("tensor ") + kind + "." + std::to_string(l) +
                                       " is missing (layers must be 0.." +
                                       std::to_string(out->layers - 1) + ")");
      }
      const TensorInfo* t = it->second;
      if (t->shape != first->shape) {
        return Status::InvalidArgument("tensor " + t->name + ": shape " + ShapeString(t->shape) +
                                       " differs from " + first->name + " " +
                                       ShapeString(first->shape));
      }
      if (t->dtype != out->dtype) {
        return Status::InvalidArgument("tensor " + t->name + ": dtype " + DTypeName(t->dtype) +
                                       " differs from " + first->name + " " +
                                       DTypeName(out->dtype));
      }
    }
  }
  for (const auto* m : {&v, &q}) {
    for (const auto& [layer, t] : *m) {
      if (layer >= out->layers) {
        return Status::InvalidArgument("tensor " + t->name + ": no k." + std::to_string(layer) +
                                       " for it");
      }
    }
  }
  out->k.resize(out->layers);
  out->v.resize(out->layers);
  out->q.assign(out->layers, nullptr);
  for (int l = 0; l < out->layers; ++l) {
    out->k[l] = k[l];
    out->v[l] = v[l];
  }
  int64_t window_shape[2] = {-1, -1};
  for (const auto& [layer, t] : q) {
    if (t->shape[2] != out->head_dim || t->shape[0] <= 0 || t->shape[1] <= 0 ||
        t->shape[0] % out->kv_heads != 0) {
      return Status::InvalidArgument("tensor " + t->name + ": shape " + ShapeString(t->shape) +
                                     " is not (q_heads, window, " + std::to_string(out->head_dim) +
                                     ") with q_heads a multiple of kv_heads " +
                                     std::to_string(out->kv_heads));
    }
    if (window_shape[0] >= 0 &&
        (t->shape[0] != window_shape[0] || t->shape[1] != window_shape[1])) {
      return Status::InvalidArgument("tensor " + t->name + ": window shape differs across layers");
    }
    window_shape[0] = t->shape[0];
    window_shape[1] = t->shape[1];
    out->q[layer] = t;
  }
  if (!q.empty() && static_cast<int>(q.size()) != out->layers) {
    return Status::InvalidArgument("q.<layer> tensors are given for " + std::to_string(q.size()) +
                                   " of " + std::to_string(out->layers) + " layers (all or none)");
  }
  return Status::Ok();
}

// Converts one head's (tokens, head_dim) block to float and checks that every element is finite.
// name: the tensor it came from, for errors.
Status HeadToFloat(DType dtype, const uint8_t* head_bytes, const std::string& name, int head,
                   int tokens, int head_dim, std::vector<float>* out) {
  const size_t n = static_cast<size_t>(tokens) * head_dim;
  out->resize(n);
  ToFloat(dtype, head_bytes, out->data(), n);
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite((*out)[i])) {
      return Status::InvalidArgument("tensor " + name + ": element [" + std::to_string(head) +
                                     ", " + std::to_string(i / head_dim) + ", " +
                                     std::to_string(i % head_dim) + "] is not finite");
    }
  }
  return Status::Ok();
}

// Gathers one head's keys and values into pages in storage order.
// pages: (num_pages, page_bytes) out.
void FillPages(const HeadIndex& index, const uint8_t* k_head, const uint8_t* v_head,
               size_t row_bytes, std::vector<uint8_t>* pages) {
  const size_t block = static_cast<size_t>(index.page_tokens) * row_bytes;
  pages->assign(static_cast<size_t>(index.num_pages()) * 2 * block, 0);
  for (size_t slot = 0; slot < index.positions.size(); ++slot) {
    const int32_t pos = index.positions[slot];
    if (pos < 0) continue;  // padding stays zero
    const size_t page = slot / index.page_tokens, t = slot % index.page_tokens;
    uint8_t* dst = pages->data() + page * 2 * block;
    std::memcpy(dst + t * row_bytes, k_head + pos * row_bytes, row_bytes);
    std::memcpy(dst + block + t * row_bytes, v_head + pos * row_bytes, row_bytes);
  }
}

// The answer of a build stopped by ImportOptions::cancelled after `done` (layer, kv head) units.
Status Cancelled(const VersionSpec& spec, int done) {
  return Status::Cancelled(std::string(spec.replaces_version != 0 ? "rebuild" : "import") +
                           " of '" + spec.name + "' cancelled after " + std::to_string(done) +
                           " of " + std::to_string(spec.layers * spec.kv_heads) +
                           " (layer, kv head) units; nothing was published");
}

}  // namespace

Status StoreImpl::Import(const std::string& name, const std::string& path,
                         const ImportOptions& options, ContextInfo* info) {
  SQKV_RETURN_IF_ERROR(ValidateContextName(name));
  SQKV_RETURN_IF_ERROR(ValidateBuildOptions(options));
  {
    ContextRecord existing;
    Status s = catalog_->GetContext(name, &existing);
    if (s.ok())
      return Status::AlreadyExists("context '" + name + "' already exists (sqkv rm it first)");
    if (!s.IsNotFound()) return s;
  }
  auto file = SafetensorsFile::Open(path);
  if (!file.ok()) return file.status();
  ContextTensors ct;
  SQKV_RETURN_IF_ERROR(CheckContextTensors(**file, &ct).WithContext(path));

  VersionSpec spec;
  spec.name = name;
  spec.layers = ct.layers;
  spec.kv_heads = ct.kv_heads;
  spec.tokens = ct.tokens;
  spec.head_dim = ct.head_dim;
  spec.dtype = ct.dtype;
  spec.source = options.source.empty() ? path : options.source;
  for (int l = 0; l < ct.layers && ct.q[l] != nullptr; ++l) {
    const TensorInfo& t = *ct.q[l];
    WindowQueries w;
    w.q_heads = static_cast<int32_t>(t.shape[0]);
    w.window = static_cast<int32_t>(t.shape[1]);
    w.head_dim = ct.head_dim;
    w.data.resize(t.num_elements());
    SQKV_RETURN_IF_ERROR((*file)->ReadFloat(t, w.data.data()));
    for (size_t i = 0; i < w.data.size(); ++i) {
      if (!std::isfinite(w.data[i])) {
        return Status::InvalidArgument("tensor " + t.name + ": element " + std::to_string(i) +
                                       " is not finite");
      }
    }
    spec.window_queries.push_back(std::move(w));
  }
  // One layer's keys and values at a time, read from the file when the build asks for them.
  auto layer_source = [&](int l, LayerBytes* out) -> Status {
    out->k_own.resize(ct.k[l]->nbytes());
    out->v_own.resize(ct.v[l]->nbytes());
    SQKV_RETURN_IF_ERROR((*file)->Read(*ct.k[l], out->k_own.data()));
    SQKV_RETURN_IF_ERROR((*file)->Read(*ct.v[l], out->v_own.data()));
    out->k = out->k_own.data();
    out->v = out->v_own.data();
    out->k_name = ct.k[l]->name;
    out->v_name = ct.v[l]->name;
    return Status::Ok();
  };
  return BuildVersion(spec, options, layer_source, /*replace=*/false, info);
}

Status ValidateBuildOptions(const ImportOptions& options) {
  if (!(options.centroid_fraction > 0.f && options.centroid_fraction <= 1.f)) {
    return Status::InvalidArgument("--centroids must be in (0, 1]");
  }
  if (options.page_tokens < 1 || options.page_tokens > kMaxPageTokensImport) {
    return Status::InvalidArgument("--page-tokens must be in [1, 4096]");
  }
  if (options.levels != 1 && options.levels != 2) {
    return Status::InvalidArgument("--levels must be 1 or 2");
  }
  if (options.levels == 2 && !(options.l1_fraction > 0.f && options.l1_fraction <= 1.f)) {
    return Status::InvalidArgument("--l1 must be in (0, 1]");
  }
  if (options.kmeans_iterations < 1) return Status::InvalidArgument("--iterations must be >= 1");
  return Status::Ok();
}

Status StoreImpl::BuildVersion(const VersionSpec& spec, const ImportOptions& options,
                               const std::function<Status(int, LayerBytes*)>& layer_source,
                               bool replace, ContextInfo* info) {
  const auto started = std::chrono::steady_clock::now();
  IndexParams params;
  params.centroid_fraction = options.centroid_fraction;
  params.page_tokens = options.page_tokens;
  params.levels = options.levels;
  params.l1_fraction = options.l1_fraction;
  params.niter = options.kmeans_iterations;
  std::string kmeans = "cpu";
  switch (options.kmeans_device) {
    case Device::kCpu:
      break;  // empty hook: FAISS
    case Device::kGpu:
      if (!gpu::DevicePresent()) return Status::Unavailable("--kmeans-device gpu: no CUDA device");
      params.kmeans = gpu::GpuKMeansFn();
      kmeans = "gpu";
      break;
    case Device::kAuto:
      if (gpu::DevicePresent()) {
        params.kmeans = gpu::GpuOrCpuKMeansFn();
        kmeans = "gpu (cpu fallback)";
      }
      break;
  }

  uint64_t version = 0;
  {
    std::lock_guard<std::mutex> lock(build_mu_);
    SQKV_ASSIGN_OR_RETURN(version, catalog_->AllocateVersion());
    building_.insert(version);
  }
  struct Unmark {
    StoreImpl* self;
    uint64_t v;
    ~Unmark() {
      std::lock_guard<std::mutex> lock(self->build_mu_);
      self->building_.erase(v);
    }
  } unmark{this, version};
  ContextPublication pub;
  ContextRecord& r = pub.record;
  r.name = spec.name;
  r.version = version;
  r.layers = spec.layers;
  r.kv_heads = spec.kv_heads;
  r.tokens = spec.tokens;
  r.head_dim = spec.head_dim;
  r.page_tokens = options.page_tokens;
  r.dtype = spec.dtype;
  r.centroid_fraction = options.centroid_fraction;
  r.levels = options.levels;
  r.l1_fraction = options.levels == 2 ? options.l1_fraction : 0.f;
  r.source = spec.source;
  r.kmeans = kmeans;
  pub.window_queries = spec.window_queries;
  pub.replaces_version = spec.replaces_version;
  if (!spec.window_queries.empty()) {
    r.window_q_heads = spec.window_queries[0].q_heads;
    r.window = spec.window_queries[0].window;
  }

  SegmentHeader header;
  header.version = version;
  header.layers = spec.layers;
  header.kv_heads = spec.kv_heads;
  header.tokens = spec.tokens;
  header.head_dim = spec.head_dim;
  header.page_tokens = options.page_tokens;
  header.dtype = spec.dtype;
  header.page_bytes = PageBytes(options.page_tokens, spec.head_dim, spec.dtype);
  std::unique_ptr<SegmentWriter> writer;
  SQKV_RETURN_IF_ERROR(SegmentWriter::Create(SegmentPath(r), header, &writer));

  const size_t row_bytes = static_cast<size_t>(spec.head_dim) * DTypeSize(spec.dtype);
  const size_t head_bytes = static_cast<size_t>(spec.tokens) * row_bytes;
  const int total = spec.layers * spec.kv_heads;
  auto cancelled = [&options] { return options.cancelled && options.cancelled(); };
  std::vector<float> keys, values;
  std::vector<uint8_t> pages;
  r.layer_first_page.push_back(0);
  for (int l = 0; l < spec.layers; ++l) {
    LayerBytes src;
    SQKV_RETURN_IF_ERROR(layer_source(l, &src));
    std::vector<HeadIndex> heads(spec.kv_heads);
    std::vector<uint64_t> sums;
    for (int h = 0; h < spec.kv_heads; ++h) {
      if (cancelled()) return Cancelled(spec, l * spec.kv_heads + h);
      const uint8_t* k_head = src.k + h * head_bytes;
      const uint8_t* v_head = src.v + h * head_bytes;
      SQKV_RETURN_IF_ERROR(
          HeadToFloat(spec.dtype, k_head, src.k_name, h, spec.tokens, spec.head_dim, &keys));
      SQKV_RETURN_IF_ERROR(
          HeadToFloat(spec.dtype, v_head, src.v_name, h, spec.tokens, spec.head_dim, &values));
      SQKV_RETURN_IF_ERROR(
          BuildHeadIndex(keys.data(), spec.tokens, spec.head_dim, params, &heads[h])
              .WithContext("index of layer " + std::to_string(l) + " head " + std::to_string(h)));
      FillPages(heads[h], k_head, v_head, row_bytes, &pages);
      const size_t n = heads[h].num_pages();
      sums.resize(sums.size() + n);
      SQKV_RETURN_IF_ERROR(writer->AppendPages(pages.data(), n, sums.data() + sums.size() - n));
      if (options.progress) options.progress(l * spec.kv_heads + h + 1, total);
      if (options.on_stage) options.on_stage("head_written");
    }
    r.layer_first_page.push_back(writer->pages_written());
    if (!spec.window_queries.empty()) {  // calibrate thresholds while the index is at hand
      const WindowQueries& w = spec.window_queries[l];
      Thresholds t;
      t.sparsity = spec.sparsities.empty() ? DefaultSparsities() : spec.sparsities;
      SQKV_RETURN_IF_ERROR(
          CalibrateThresholds(heads, w.data.data(), w.q_heads, w.window, t.sparsity, &t.threshold)
              .WithContext("calibration of layer " + std::to_string(l)));
      pub.thresholds.push_back(std::move(t));
    }
    pub.layer_index.push_back(EncodeLayerIndex(heads));
    r.index_bytes += pub.layer_index.back().size() + sums.size() * sizeof(uint64_t);
    pub.page_checksums.push_back(std::move(sums));
  }
  if (options.on_stage) options.on_stage("segment_written");
  SQKV_RETURN_IF_ERROR(writer->Finish());
  if (options.on_stage) options.on_stage("segment_published");
  r.segment_bytes = kSegmentHeaderBytes + writer->pages_written() * header.page_bytes;
  r.created_unix = static_cast<int64_t>(std::time(nullptr));
  r.build_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (cancelled()) {  // the last chance: nothing is visible yet
    RemoveFile(SegmentPath(r)).PermitUncheckedError();
    return Cancelled(spec, total);
  }
  Status published = catalog_->Publish(pub, replace);
  if (!published.ok()) {
    RemoveFile(SegmentPath(r)).PermitUncheckedError();  // else the next Open removes it
    return published;
  }
  if (options.on_stage) options.on_stage("published");
  if (info != nullptr) *info = r;
  return Status::Ok();
}

}  // namespace sqkv
