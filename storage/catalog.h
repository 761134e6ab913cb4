// The catalog: a RocksDB database holding every context's record and index, keyed by name and
// version. Publishing a context is one synced write batch, so a crash leaves it wholly there or
// wholly absent.
//
// Keys:  c/<name>                      → ContextRecord (JSON)
//        v/<version:016x>/i/<layer:05>  → encoded layer index (index/serialize.h)
//        v/<version:016x>/s/<layer:05>  → page checksums of the layer, u64 each, head-major
//        v/<version:016x>/q/<layer:05>  → calibration queries of the layer (WindowQueries): the
//                                         import's window queries, or the last ones given to
//                                         calibrate
//        v/<version:016x>/t/<layer:05>  → calibrated thresholds of the layer (Thresholds)
//        g/<version:016x>               → a removed or superseded version whose files and keys
//                                         wait to be reclaimed (once no reader uses them)
//        p/<name>                       → the tier a context is pinned in ("host" or "device")
//        m/next_version                 → next version number (u64)
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"

namespace sqkv {

struct ContextRecord {
  std::string name;
  uint64_t version = 0;
  int32_t layers = 0;
  int32_t kv_heads = 0;
  int32_t tokens = 0;
  int32_t head_dim = 0;
  int32_t page_tokens = 0;
  DType dtype = DType::kBF16;
  // Index parameters the version was built with.
  float centroid_fraction = 0.f;
  int32_t levels = 1;
  float l1_fraction = 0.f;
  // layer_first_page: (layers + 1), first segment page of each layer; last entry = total pages.
  std::vector<uint64_t> layer_first_page;
  uint64_t segment_bytes = 0;
  uint64_t index_bytes = 0;
  int32_t window_q_heads = 0;  // shape of the stored (calibration) queries; 0 when none
  int32_t window = 0;
  int64_t created_unix = 0;
  double build_seconds = 0;
  std::string source;  // file it was imported from
  std::string kmeans;  // where the index was clustered: "cpu" (FAISS) or "gpu"; may be empty

  std::string SegmentFileName() const;  // "<version:016x>.seg"
};

// The version a segment file's name starts with ("<version:016x>.seg", or its ".seg.tmp" while
// written); false for a name that does not start with 16 lowercase hex digits.
bool SegmentFileVersion(std::string_view file_name, uint64_t* version);

// The queries of a context's last tokens for one layer, kept for threshold calibration.
struct WindowQueries {
  int32_t q_heads = 0;
  int32_t window = 0;
  int32_t head_dim = 0;
  std::vector<float> data;  // (q_heads, window, head_dim)
};

// Per-key score thresholds of one layer for target sparsities (see index/calibrate.h).
struct Thresholds {
  std::vector<float> sparsity;   // ascending, in (0, 1)
  std::vector<float> threshold;  // same length; non-increasing keep as sparsity falls
};

// A context record that does not decode (damaged, or written by an incompatible build).
struct UndecodableContext {
  std::string name;
  uint64_t version = 0;  // the version the record still names, or 0 when it names none
  Status error;          // why it does not decode
};

// Everything a context version adds to the catalog, written in one batch.
struct ContextPublication {
  ContextRecord record;
  std::vector<std::string> layer_index;               // (layers) encoded layer indexes
  std::vector<std::vector<uint64_t>> page_checksums;  // (layers) checksums of each layer's pages
  std::vector<WindowQueries> window_queries;          // (layers) or empty
  std::vector<Thresholds> thresholds;                 // (layers) or empty
  // With replace: the version the name must still hold when the publication lands (a rebuild's
  // source), so a rebuild never revives a removed context or overwrites a newer import.
  // Default: 0 = whatever version the name holds, or none.
  uint64_t replaces_version = 0;
};

class Catalog {
 public:
  static Status Open(const std::string& dir, std::unique_ptr<Catalog>* out);
  virtual ~Catalog() = default;

  // A fresh version number, persisted before it is handed out (never reused): above the counter
  // and above every version a v/ or g/ key names. Corruption when m/next_version is not 8 bytes.
  virtual Result<uint64_t> AllocateVersion() = 0;

  // Publishes atomically. Fails with AlreadyExists when the name is taken, unless `replace`, in
  // which case the old version's record is swapped for the new one in the same batch and the old
  // version is marked garbage (its keys and file stay until reclaimed). With replace and
  // pub.replaces_version set, fails with NotFound when the name is gone and with Unavailable when
  // it holds another version.
  virtual Status Publish(const ContextPublication& pub, bool replace) = 0;

  virtual Status GetContext(const std::string& name, ContextRecord* out) = 0;
  // Every context, by name. A record that does not decode fails the call with Corruption naming
  // it, unless `undecodable` is given: then it is reported there, left out of *out, and the
  // listing goes on. A caller that deletes the files or keys of versions missing from *out (the
  // orphan pass) must treat each reported version as in use, and a reported version 0 as "any
  // version may be in use".
  virtual Status ListContexts(std::vector<ContextRecord>* out,
                              std::vector<UndecodableContext>* undecodable) = 0;
  Status ListContexts(std::vector<ContextRecord>* out) { return ListContexts(out, nullptr); }
  virtual Status GetLayerIndex(uint64_t version, int32_t layer, std::string* blob) = 0;
  virtual Status GetPageChecksums(uint64_t version, int32_t layer, std::vector<uint64_t>* out) = 0;
  // NotFound when the context was imported without window queries.
  virtual Status GetWindowQueries(uint64_t version, int32_t layer, WindowQueries* out) = 0;

  // NotFound when the layer was never calibrated.
  virtual Status GetThresholds(uint64_t version, int32_t layer, Thresholds* out) = 0;
  // Replaces the calibration of `record`'s version in one batch: the thresholds of every layer
  // ((layers)) and, when `queries` is given ((layers)), the queries they came from, which then
  // replace the stored ones (the record's window shape follows). Unavailable when the name no
  // longer holds that version (rebuilt or removed meanwhile): nothing is written then.
  virtual Status PutCalibration(const ContextRecord& record,
                                const std::vector<Thresholds>& thresholds,
                                const std::vector<WindowQueries>* queries) = 0;

  // Removes the record of `name` (NotFound if absent) and marks its version garbage, in one batch.
  // A record that does not decode is removed too: *removed then holds only the name and the
  // version the record still names (marked garbage), or version 0 when it names none or another
  // record names the same one (its file and keys are then left to compact's orphan pass).
  virtual Status RemoveContext(const std::string& name, ContextRecord* removed) = 0;
  // Versions marked garbage, oldest first. Corruption for a malformed g/ key.
  virtual Status ListGarbage(std::vector<uint64_t>* out) = 0;
  // Deletes every key of a version (and its garbage mark).
  virtual Status DropVersion(uint64_t version) = 0;
  // Pins (`sqkv pin`): name → tier. RemoveContext drops the pin in its batch.
  virtual Status PutPin(const std::string& name, const std::string& tier) = 0;
  virtual Status DeletePin(const std::string& name) = 0;
  virtual Status ListPins(std::vector<std::pair<std::string, std::string>>* out) = 0;

  // Reads every block of the database and checks RocksDB's own checksums.
  virtual Status VerifyChecksums() = 0;

  // Raw access for verification and tests (key → value). NotFound when absent.
  virtual Status GetRaw(const std::string& key, std::string* value) = 0;
  virtual Status PutRaw(const std::string& key, const std::string& value) = 0;
  virtual Status DeleteRaw(const std::string& key) = 0;
  // Versions that have keys under v/ (live or not), ascending. Corruption for a malformed v/ key.
  virtual Status ListStoredVersions(std::vector<uint64_t>* out) = 0;
  // Compacts the whole key range; returns the size of the database files before and after.
  virtual Status CompactAll(uint64_t* bytes_before, uint64_t* bytes_after) = 0;

  static std::string ContextKey(const std::string& name);
  static std::string LayerKey(uint64_t version, char kind, int32_t layer);
};

}  // namespace sqkv
