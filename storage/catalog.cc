#include "storage/catalog.h"

#include "storage/file_util.h"

#include <rocksdb/db.h>
#include <rocksdb/env.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>

#include <algorithm>
#include <charconv>
#include <cinttypes>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string_view>
#include <unordered_map>

namespace sqkv {
namespace {

constexpr char kNextVersionKey[] = "m/next_version";

std::string Hex16(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016" PRIx64, v);
  return buf;
}

std::string VersionPrefix(uint64_t version) { return "v/" + Hex16(version) + "/"; }

// The first key after every key of `version` ('0' follows '/'): no version + 1 that could wrap.
std::string VersionEnd(uint64_t version) { return "v/" + Hex16(version) + "0"; }

// A version as keys spell it (Hex16: 16 lowercase hex digits); false for anything else.
bool ParseHex16(std::string_view text, uint64_t* version) {
  if (text.size() != 16) return false;
  for (char c : text) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), *version, 16);
  return ec == std::errc() && end == text.data() + text.size();
}

// The version of "v/<version>/..." or "g/<version>"; false for a malformed key.
bool VersionOfKey(std::string_view key, uint64_t* version) {
  if (key.size() < 18 || !ParseHex16(key.substr(2, 16), version)) return false;
  if (key.starts_with("g/")) return key.size() == 18;
  return key.starts_with("v/") && key.size() > 18 && key[18] == '/';
}

Status FromRocks(const rocksdb::Status& s, const std::string& what) {
  if (s.ok()) return Status::Ok();
  if (s.IsNotFound()) return Status::NotFound(what);
  if (s.IsCorruption()) return Status::Corruption(what + ": " + s.ToString());
  if (s.IsIOError()) return Status::IOError(what + ": " + s.ToString());
  return Status::Internal(what + ": " + s.ToString());
}

std::string EncodeRecord(const ContextRecord& r) {
  nlohmann::json j = {
      {"name", r.name},
      {"version", r.version},
      {"layers", r.layers},
      {"kv_heads", r.kv_heads},
      {"tokens", r.tokens},
      {"head_dim", r.head_dim},
      {"page_tokens", r.page_tokens},
      {"dtype", DTypeName(r.dtype)},
      {"centroid_fraction", r.centroid_fraction},
      {"levels", r.levels},
      {"l1_fraction", r.l1_fraction},
      {"layer_first_page", r.layer_first_page},
      {"segment_bytes", r.segment_bytes},
      {"index_bytes", r.index_bytes},
      {"window_q_heads", r.window_q_heads},
      {"window", r.window},
      {"created_unix", r.created_unix},
      {"build_seconds", r.build_seconds},
      {"source", r.source},
      {"kmeans", r.kmeans},
  };
  return j.dump();
}

Status DecodeRecord(const std::string& bytes, ContextRecord* r) {
  try {
    auto j = nlohmann::json::parse(bytes);
    r->name = j.at("name").get<std::string>();
    r->version = j.at("version").get<uint64_t>();
    r->layers = j.at("layers").get<int32_t>();
    r->kv_heads = j.at("kv_heads").get<int32_t>();
    r->tokens = j.at("tokens").get<int32_t>();
    r->head_dim = j.at("head_dim").get<int32_t>();
    r->page_tokens = j.at("page_tokens").get<int32_t>();
    auto dt = ParseDType(j.at("dtype").get<std::string>());
    if (!dt) return Status::Corruption("context record: unknown dtype");
    r->dtype = *dt;
    r->centroid_fraction = j.at("centroid_fraction").get<float>();
    r->levels = j.at("levels").get<int32_t>();
    r->l1_fraction = j.at("l1_fraction").get<float>();
    r->layer_first_page = j.at("layer_first_page").get<std::vector<uint64_t>>();
    r->segment_bytes = j.at("segment_bytes").get<uint64_t>();
    r->index_bytes = j.at("index_bytes").get<uint64_t>();
    r->window_q_heads = j.at("window_q_heads").get<int32_t>();
    r->window = j.at("window").get<int32_t>();
    r->created_unix = j.at("created_unix").get<int64_t>();
    r->build_seconds = j.at("build_seconds").get<double>();
    r->source = j.at("source").get<std::string>();
    r->kmeans = j.value("kmeans", std::string());  // absent in records of older builds
  } catch (const std::exception& e) {
    return Status::Corruption(std::string("context record: ") + e.what());
  }
  if (r->layers <= 0 || r->kv_heads <= 0 || r->tokens <= 0 || r->head_dim <= 0 ||
      r->page_tokens <= 0 || r->layer_first_page.size() != static_cast<size_t>(r->layers) + 1) {
    return Status::Corruption("context record of " + r->name + ": inconsistent shape");
  }
  return Status::Ok();
}

std::string GarbageKey(uint64_t version) { return "g/" + Hex16(version); }

// The version a record names even when the rest of it does not decode; nullopt when it names
// none (not JSON, no unsigned "version", or 0).
std::optional<uint64_t> RecordVersion(const std::string& bytes) {
  try {
    const auto j = nlohmann::json::parse(bytes);
    const auto& v = j.at("version");
    if (!v.is_number_unsigned() || v.get<uint64_t>() == 0) return std::nullopt;
    return v.get<uint64_t>();
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

std::string EncodeThresholds(const Thresholds& t) {
  return nlohmann::json{{"sparsity", t.sparsity}, {"threshold", t.threshold}}.dump();
}

Status DecodeThresholds(const std::string& bytes, Thresholds* t) {
  try {
    auto j = nlohmann::json::parse(bytes);
    t->sparsity = j.at("sparsity").get<std::vector<float>>();
    t->threshold = j.at("threshold").get<std::vector<float>>();
  } catch (const std::exception& e) {
    return Status::Corruption(std::string("thresholds record: ") + e.what());
  }
  if (t->sparsity.size() != t->threshold.size()) {
    return Status::Corruption("thresholds record: lengths differ");
  }
  // As Calibrate stores them: sparsities ascending without repeats in [0, 1], finite thresholds
  // (a damaged record read otherwise surfaced as the caller's error: "NaN in options", "outside
  // the calibrated range [0.9, 0.5]").
  for (size_t i = 0; i < t->sparsity.size(); ++i) {
    const float s = t->sparsity[i];
    if (!(s >= 0.f && s <= 1.f) || (i > 0 && !(s > t->sparsity[i - 1])) ||
        !std::isfinite(t->threshold[i])) {
      return Status::Corruption("thresholds record: entry " + std::to_string(i) +
                                " (sparsity " + std::to_string(s) + ", threshold " +
                                std::to_string(t->threshold[i]) + ") out of order or range");
    }
  }
  if (t->sparsity.empty()) return Status::Corruption("thresholds record: empty");
  return Status::Ok();
}

std::string EncodeChecksums(const std::vector<uint64_t>& sums) {
  return std::string(reinterpret_cast<const char*>(sums.data()), sums.size() * sizeof(uint64_t));
}

std::string EncodeWindow(const WindowQueries& w) {
  std::string out(12 + w.data.size() * sizeof(float), '\0');
  std::memcpy(out.data(), &w.q_heads, 4);
  std::memcpy(out.data() + 4, &w.window, 4);
  std::memcpy(out.data() + 8, &w.head_dim, 4);
  std::memcpy(out.data() + 12, w.data.data(), w.data.size() * sizeof(float));
  return out;
}

class CatalogImpl : public Catalog {
 public:
  explicit CatalogImpl(std::unique_ptr<rocksdb::DB> db, std::string dir)
      : db_(std::move(db)), dir_(std::move(dir)) {}

  Result<uint64_t> AllocateVersion() override {
    std::lock_guard<std::mutex> lock(version_mu_);
    std::string v;
    uint64_t next = 1;
    rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), kNextVersionKey, &v);
    if (s.ok()) {
      if (v.size() != sizeof(next)) {
        return Status::Corruption(std::string("catalog key ") + kNextVersionKey + " holds " +
                                  std::to_string(v.size()) + " bytes, not 8");
      }
      std::memcpy(&next, v.data(), sizeof(next));
    } else if (!s.IsNotFound()) {
      SQKV_RETURN_IF_ERROR(FromRocks(s, "read next version"));
    }
    // Safety net: a counter set back (by hand, or by a bug) must not hand out a version some key
    // still names, or the next import's segment would be renamed over that version's file.
    SQKV_ASSIGN_OR_RETURN(const uint64_t largest, LargestStoredVersion());
    if (largest == UINT64_MAX || next == UINT64_MAX) {
      return Status::Corruption("catalog: version numbers are exhausted");
    }
    next = std::max(next, largest + 1);
    uint64_t after = next + 1;
    rocksdb::WriteOptions wo;
    wo.sync = true;
    SQKV_RETURN_IF_ERROR(FromRocks(
        db_->Put(wo, kNextVersionKey, rocksdb::Slice(reinterpret_cast<char*>(&after), 8)),
        "persist next version"));
    return next;
  }

  Status Publish(const ContextPublication& pub, bool replace) override {
    const ContextRecord& r = pub.record;
    if (pub.layer_index.size() != static_cast<size_t>(r.layers) ||
        pub.page_checksums.size() != static_cast<size_t>(r.layers) ||
        (!pub.window_queries.empty() && pub.window_queries.size() != static_cast<size_t>(r.layers)) ||
        (!pub.thresholds.empty() && pub.thresholds.size() != static_cast<size_t>(r.layers))) {
      return Status::InvalidArgument("publication of " + r.name + " does not cover every layer");
    }
    std::lock_guard<std::mutex> lock(publish_mu_);
    std::string existing;
    rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), ContextKey(r.name), &existing);
    if (s.ok() && !replace) return Status::AlreadyExists("context " + r.name + " already exists");
    if (!s.ok() && !s.IsNotFound()) return FromRocks(s, "read context " + r.name);
    if (replace && pub.replaces_version != 0 && s.IsNotFound()) {
      return Status::NotFound("context " + r.name + " was removed while version " +
                              std::to_string(r.version) + " was built to replace it");
    }

    rocksdb::WriteBatch batch;
    if (s.ok()) {  // replacing: the old version becomes garbage in the same batch
      ContextRecord old;
      SQKV_RETURN_IF_ERROR(DecodeRecord(existing, &old));
      if (pub.replaces_version != 0 && old.version != pub.replaces_version) {
        return Status::Unavailable("context " + r.name + " changed to version " +
                                   std::to_string(old.version) + " while version " +
                                   std::to_string(r.version) + " was built from version " +
                                   std::to_string(pub.replaces_version));
      }
      batch.Put(GarbageKey(old.version), "");
    }
    for (int32_t l = 0; l < r.layers; ++l) {
      if (!pub.thresholds.empty()) batch.Put(LayerKey(r.version, 't', l), EncodeThresholds(pub.thresholds[l]));
      batch.Put(LayerKey(r.version, 'i', l), pub.layer_index[l]);
      batch.Put(LayerKey(r.version, 's', l), EncodeChecksums(pub.page_checksums[l]));
      if (!pub.window_queries.empty() && pub.window_queries[l].q_heads > 0) {
        batch.Put(LayerKey(r.version, 'q', l), EncodeWindow(pub.window_queries[l]));
      }
    }
    batch.Put(ContextKey(r.name), EncodeRecord(r));  // the record makes it visible
    rocksdb::WriteOptions wo;
    wo.sync = true;
    const Status written = FromRocks(db_->Write(wo, &batch), "publish context " + r.name);
    ForgetRecords();
    return written;
  }

  // Every query reads its context's record: decoded records are kept in memory. This process is
  // the catalog's only writer (RocksDB's lock), and every write of a record key drops the cache
  // after the write (ForgetRecords); a read that raced with such a write does not store what it
  // read (the generation changed), so a cached record is never older than the last write.
  // Reads stay monotonic too (versions only grow): a store never replaces a newer cached version,
  // and a read that could not be stored (the generation moved on while it read) but is newer
  // than what the cache holds evicts that entry and sets the name's floor, below which nothing
  // is stored until the next write's ForgetRecords. Otherwise two readers racing a write, one
  // reading before it lands and one after, could leave the older record cached after the newer
  // one was returned, and a reader would see its version go back.
  Status GetContext(const std::string& name, ContextRecord* out) override {
    uint64_t generation = 0;
    {
      std::lock_guard<std::mutex> lock(cache_mu_);
      auto it = records_.find(name);
      if (it != records_.end()) {
        *out = it->second;
        return Status::Ok();
      }
      generation = generation_;
    }
    std::string v;
    rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), ContextKey(name), &v);
    if (s.IsNotFound()) return Status::NotFound("no context named '" + name + "'");
    SQKV_RETURN_IF_ERROR(FromRocks(s, "read context " + name));
    SQKV_RETURN_IF_ERROR(DecodeRecord(v, out));
    std::lock_guard<std::mutex> lock(cache_mu_);
    if (generation != generation_) {
      auto it = records_.find(name);
      if (it != records_.end() && it->second.version < out->version) records_.erase(it);
      uint64_t& floor = floors_[name];
      floor = std::max(floor, out->version);
      return Status::Ok();
    }
    auto fl = floors_.find(name);
    if (fl != floors_.end() && out->version < fl->second) return Status::Ok();
    if (records_.size() >= kMaxCachedRecords) records_.clear();
    auto [it, fresh] = records_.try_emplace(name, *out);
    if (!fresh && it->second.version < out->version) it->second = *out;
    return Status::Ok();
  }

  using Catalog::ListContexts;
  Status ListContexts(std::vector<ContextRecord>* out,
                      std::vector<UndecodableContext>* undecodable) override {
    out->clear();
    if (undecodable != nullptr) undecodable->clear();
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
    for (it->Seek("c/"); it->Valid() && it->key().starts_with("c/"); it->Next()) {
      ContextRecord r;
      const std::string value = it->value().ToString();
      const Status decoded = DecodeRecord(value, &r);
      if (!decoded.ok()) {
        std::string name = it->key().ToString().substr(2);
        if (undecodable == nullptr) {
          return decoded.WithContext("context '" + name + "' (remove it to repair the catalog)");
        }
        undecodable->push_back({std::move(name), RecordVersion(value).value_or(0), decoded});
        continue;
      }
      out->push_back(std::move(r));
    }
    return FromRocks(it->status(), "list contexts");
  }

  Status GetLayerIndex(uint64_t version, int32_t layer, std::string* blob) override {
    return FromRocks(db_->Get(rocksdb::ReadOptions(), LayerKey(version, 'i', layer), blob),
                     "index of layer " + std::to_string(layer) + " (version " +
                         std::to_string(version) + ")");
  }

  Status GetPageChecksums(uint64_t version, int32_t layer, std::vector<uint64_t>* out) override {
    std::string v;
    SQKV_RETURN_IF_ERROR(
        FromRocks(db_->Get(rocksdb::ReadOptions(), LayerKey(version, 's', layer), &v),
                  "page checksums of layer " + std::to_string(layer)));
    if (v.size() % sizeof(uint64_t) != 0) return Status::Corruption("page checksum record size");
    out->resize(v.size() / sizeof(uint64_t));
    std::memcpy(out->data(), v.data(), v.size());
    return Status::Ok();
  }

  Status GetWindowQueries(uint64_t version, int32_t layer, WindowQueries* out) override {
    std::string v;
    SQKV_RETURN_IF_ERROR(
        FromRocks(db_->Get(rocksdb::ReadOptions(), LayerKey(version, 'q', layer), &v),
                  "window queries of layer " + std::to_string(layer)));
    if (v.size() < 12 || (v.size() - 12) % sizeof(float) != 0) {
      return Status::Corruption("window query record of " + std::to_string(v.size()) + " bytes");
    }
    std::memcpy(&out->q_heads, v.data(), 4);
    std::memcpy(&out->window, v.data() + 4, 4);
    std::memcpy(&out->head_dim, v.data() + 8, 4);
    // The shape must account for the bytes exactly (a product that wraps 64 bits must not pass).
    const uint64_t n = (v.size() - 12) / sizeof(float);
    uint64_t heads_window = 0, shape = 0;
    if (out->q_heads <= 0 || out->window <= 0 || out->head_dim <= 0 ||
        __builtin_mul_overflow(static_cast<uint64_t>(out->q_heads),
                               static_cast<uint64_t>(out->window), &heads_window) ||
        __builtin_mul_overflow(heads_window, static_cast<uint64_t>(out->head_dim), &shape) ||
        shape != n) {
      return Status::Corruption("window query record shape");
    }
    out->data.resize(n);
    std::memcpy(out->data.data(), v.data() + 12, n * sizeof(float));
    return Status::Ok();
  }

  Status GetThresholds(uint64_t version, int32_t layer, Thresholds* out) override {
    std::string v;
    SQKV_RETURN_IF_ERROR(
        FromRocks(db_->Get(rocksdb::ReadOptions(), LayerKey(version, 't', layer), &v),
                  "thresholds of layer " + std::to_string(layer)));
    return DecodeThresholds(v, out);
  }

  Status PutCalibration(const ContextRecord& record, const std::vector<Thresholds>& thresholds,
                        const std::vector<WindowQueries>* queries) override {
    const auto layers = static_cast<size_t>(record.layers);
    if (layers == 0 || thresholds.size() != layers ||
        (queries != nullptr && queries->size() != layers)) {
      return Status::InvalidArgument("calibration of " + record.name + " does not cover every layer");
    }
    std::lock_guard<std::mutex> lock(publish_mu_);  // against Publish and RemoveContext
    std::string bytes;
    rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), ContextKey(record.name), &bytes);
    if (s.IsNotFound()) {
      return Status::Unavailable("context " + record.name + " was removed while calibrated");
    }
    SQKV_RETURN_IF_ERROR(FromRocks(s, "read context " + record.name));
    ContextRecord now;
    SQKV_RETURN_IF_ERROR(DecodeRecord(bytes, &now));
    if (now.version != record.version) {
      return Status::Unavailable("context " + record.name + " changed to version " +
                                 std::to_string(now.version) + " while version " +
                                 std::to_string(record.version) + " was calibrated; run again");
    }
    const uint64_t v = record.version;
    rocksdb::WriteBatch batch;
    for (size_t l = 0; l < layers; ++l) {
      const auto layer = static_cast<int32_t>(l);
      batch.Put(LayerKey(v, 't', layer), EncodeThresholds(thresholds[l]));
      if (queries != nullptr) batch.Put(LayerKey(v, 'q', layer), EncodeWindow((*queries)[l]));
    }
    if (queries != nullptr) {
      now.window_q_heads = (*queries)[0].q_heads;
      now.window = (*queries)[0].window;
      batch.Put(ContextKey(record.name), EncodeRecord(now));
    }
    rocksdb::WriteOptions wo;
    wo.sync = true;
    const Status written = FromRocks(db_->Write(wo, &batch), "store calibration of " + record.name);
    if (queries != nullptr) ForgetRecords();
    return written;
  }

  Status ListGarbage(std::vector<uint64_t>* out) override {
    out->clear();
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
    for (it->Seek("g/"); it->Valid() && it->key().starts_with("g/"); it->Next()) {
      const std::string key = it->key().ToString();
      uint64_t v = 0;
      if (!VersionOfKey(key, &v)) return Status::Corruption("malformed catalog key " + key);
      out->push_back(v);
    }
    return FromRocks(it->status(), "list garbage");
  }

  Status PutPin(const std::string& name, const std::string& tier) override {
    rocksdb::WriteOptions wo;
    wo.sync = true;
    return FromRocks(db_->Put(wo, "p/" + name, tier), "pin " + name);
  }

  Status DeletePin(const std::string& name) override {
    rocksdb::WriteOptions wo;
    wo.sync = true;
    return FromRocks(db_->Delete(wo, "p/" + name), "unpin " + name);
  }

  Status ListPins(std::vector<std::pair<std::string, std::string>>* out) override {
    out->clear();
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
    for (it->Seek("p/"); it->Valid() && it->key().starts_with("p/"); it->Next()) {
      out->emplace_back(it->key().ToString().substr(2), it->value().ToString());
    }
    return FromRocks(it->status(), "list pins");
  }

  Status VerifyChecksums() override {
    return FromRocks(db_->VerifyChecksum(), "catalog checksum scan");
  }

  Status RemoveContext(const std::string& name, ContextRecord* removed) override {
    std::lock_guard<std::mutex> lock(publish_mu_);
    std::string bytes;
    rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), ContextKey(name), &bytes);
    if (s.IsNotFound()) return Status::NotFound("no context named '" + name + "'");
    SQKV_RETURN_IF_ERROR(FromRocks(s, "read context " + name));
    rocksdb::WriteBatch batch;
    batch.Delete(ContextKey(name));
    batch.Delete("p/" + name);
    // An undecodable record is removed all the same: nothing else could take it out of the
    // catalog. A version becomes garbage only when the record names one and no other record
    // claims it (a damaged catalog can hold two records of one version, and removing one had
    // deleted the other's data); otherwise its file and keys are left to compact's orphan pass.
    std::optional<uint64_t> version;
    if (DecodeRecord(bytes, removed).ok()) {
      version = removed->version;
    } else {
      *removed = ContextRecord();
      removed->name = name;
      version = RecordVersion(bytes);
    }
    removed->version = 0;
    if (version) {
      SQKV_ASSIGN_OR_RETURN(const bool claimed, VersionClaimedByAnother(name, *version));
      if (!claimed) {
        removed->version = *version;
        batch.Put(GarbageKey(*version), "");
      }
    }
    rocksdb::WriteOptions wo;
    wo.sync = true;
    const Status written = FromRocks(db_->Write(wo, &batch), "remove context " + name);
    ForgetRecords();
    return written;
  }

  Status DropVersion(uint64_t version) override {
    rocksdb::WriteBatch batch;
    AddVersionDeletes(version, &batch);
    batch.Delete(GarbageKey(version));
    rocksdb::WriteOptions wo;
    wo.sync = true;
    return FromRocks(db_->Write(wo, &batch), "drop version " + std::to_string(version));
  }

  Status GetRaw(const std::string& key, std::string* value) override {
    return FromRocks(db_->Get(rocksdb::ReadOptions(), key, value), "key " + key);
  }

  Status PutRaw(const std::string& key, const std::string& value) override {
    rocksdb::WriteOptions wo;
    wo.sync = true;
    const Status written = FromRocks(db_->Put(wo, key, value), "put " + key);
    ForgetRecords();  // the key may be a record's
    return written;
  }

  Status DeleteRaw(const std::string& key) override {
    rocksdb::WriteOptions wo;
    wo.sync = true;
    const Status deleted = FromRocks(db_->Delete(wo, key), "delete " + key);
    ForgetRecords();
    return deleted;
  }

  Status ListStoredVersions(std::vector<uint64_t>* out) override {
    out->clear();
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
    for (it->Seek("v/"); it->Valid() && it->key().starts_with("v/"); ) {
      const std::string key = it->key().ToString();
      uint64_t v = 0;
      if (!VersionOfKey(key, &v)) return Status::Corruption("malformed catalog key " + key);
      out->push_back(v);
      it->Seek(VersionEnd(v));  // skip the rest of this version
    }
    return FromRocks(it->status(), "list versions");
  }

  Status CompactAll(uint64_t* bytes_before, uint64_t* bytes_after) override {
    *bytes_before = DirectoryBytes(dir_);
    SQKV_RETURN_IF_ERROR(
        FromRocks(db_->CompactRange(rocksdb::CompactRangeOptions(), nullptr, nullptr),
                  "compact catalog"));
    *bytes_after = DirectoryBytes(dir_);
    return Status::Ok();
  }

 private:
  static constexpr size_t kMaxCachedRecords = 65536;

  void AddVersionDeletes(uint64_t version, rocksdb::WriteBatch* batch) {
    batch->DeleteRange(VersionPrefix(version), VersionEnd(version));
  }

  // The largest version a layer key or garbage mark names; 0 when none. Malformed keys name none.
  Result<uint64_t> LargestStoredVersion() {
    uint64_t largest = 0;
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
    for (const std::string prefix : {"v/", "g/"}) {
      // Versions are hex digits and letters, below '\xff': start from the prefix's last key.
      for (it->SeekForPrev(prefix + '\xff'); it->Valid() && it->key().starts_with(prefix);
           it->Prev()) {
        uint64_t v = 0;
        if (VersionOfKey(it->key().ToString(), &v)) {
          largest = std::max(largest, v);
          break;
        }
      }
      SQKV_RETURN_IF_ERROR(FromRocks(it->status(), "find the largest stored version"));
    }
    return largest;
  }

  // Whether a record other than `name`'s names `version` (decodable or not).
  Result<bool> VersionClaimedByAnother(const std::string& name, uint64_t version) {
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
    for (it->Seek("c/"); it->Valid() && it->key().starts_with("c/"); it->Next()) {
      if (it->key().ToString() == ContextKey(name)) continue;
      if (RecordVersion(it->value().ToString()) == version) return true;
    }
    SQKV_RETURN_IF_ERROR(FromRocks(it->status(), "scan context records"));
    return false;
  }

  // After any write that may change a record (whether or not it succeeded).
  void ForgetRecords() {
    std::lock_guard<std::mutex> lock(cache_mu_);
    ++generation_;
    records_.clear();
    floors_.clear();
  }

  std::unique_ptr<rocksdb::DB> db_;
  std::string dir_;
  std::mutex version_mu_;
  std::mutex publish_mu_;
  std::mutex cache_mu_;  // guards records_, floors_ and generation_
  std::unordered_map<std::string, ContextRecord> records_;
  std::unordered_map<std::string, uint64_t> floors_;  // see GetContext
  uint64_t generation_ = 0;
};

}  // namespace

std::string ContextRecord::SegmentFileName() const { return Hex16(version) + ".seg"; }

bool SegmentFileVersion(std::string_view file_name, uint64_t* version) {
  return file_name.size() >= 16 && ParseHex16(file_name.substr(0, 16), version);
}

std::string Catalog::ContextKey(const std::string& name) { return "c/" + name; }

std::string Catalog::LayerKey(uint64_t version, char kind, int32_t layer) {
  char buf[8];
  std::snprintf(buf, sizeof(buf), "%05d", layer);
  return VersionPrefix(version) + kind + "/" + buf;
}

namespace {

// RocksDB's information log, kept out of the data directory: errors to stderr, the rest dropped.
// Its own file logger rotates and writes LOG files on every open, and Debian's librocksdb is built
// with assertions, one of which aborted the process when such a write hit a full disk: every
// command, `rm` and `compact` included, died before it could run (audit, tmpfs at 3.4 MB).
class ErrorsToStderrLogger final : public rocksdb::Logger {
 public:
  ErrorsToStderrLogger() : rocksdb::Logger(rocksdb::InfoLogLevel::ERROR_LEVEL) {}
  using rocksdb::Logger::Logv;
  void Logv(const char* format, va_list ap) override {
    char line[1024];
    std::vsnprintf(line, sizeof(line), format, ap);
    std::fprintf(stderr, "sqkv: catalog (rocksdb): %s\n", line);
  }
};

}  // namespace

Status Catalog::Open(const std::string& dir, std::unique_ptr<Catalog>* out) {
  rocksdb::Options options;
  options.create_if_missing = true;
  options.max_open_files = 256;
  options.info_log = std::make_shared<ErrorsToStderrLogger>();
  // Made here rather than by create_if_missing, which logs the missing directory as an error.
  SQKV_RETURN_IF_ERROR(EnsureDir(dir));
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(options, dir, &raw);
  if (!s.ok()) {
    if (s.IsIOError() && s.ToString().find("lock") != std::string::npos) {
      return Status::Unavailable("catalog " + dir +
                                 " is in use by another process (is a server running? use "
                                 "--server): " + s.ToString());
    }
    return FromRocks(s, "open catalog " + dir);
  }
  out->reset(new CatalogImpl(std::unique_ptr<rocksdb::DB>(raw), dir));
  return Status::Ok();
}

}  // namespace sqkv
