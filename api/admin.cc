// Lifecycle operations: reclaiming removed/superseded versions, crash leftovers, verification,
// compaction and statistics.
#include <algorithm>
#include <filesystem>
#include <map>
#include <set>

#include "api/store_impl.h"
#include "gpu/engine.h"
#include "index/serialize.h"
#include "storage/file_util.h"

namespace sqkv {
namespace {

constexpr size_t kMaxProblems = 100;  // a badly damaged store need not list every page
constexpr uint64_t kVerifyChunkPages = 256;

std::string SegmentName(uint64_t version) {
  ContextRecord r;
  r.version = version;
  return r.SegmentFileName();
}

}  // namespace

Status StoreImpl::ReclaimGarbage(CompactReport* report) {
  std::vector<uint64_t> garbage;
  SQKV_RETURN_IF_ERROR(catalog_->ListGarbage(&garbage));
  std::vector<uint64_t> go;
  {
    std::lock_guard<std::mutex> lock(cache_mu_);
    for (uint64_t v : garbage) {
      if (pins_.count(v)) {
        if (report) ++report->versions_in_use;
        continue;
      }
      reclaimed_.insert(v);  // from now on no query can pin it
      segments_.erase(v);
      for (auto it = layers_.begin(); it != layers_.end();) {
        if (it->first.first == v) {
          layer_lru_.erase(it->second.second);
          layer_bytes_ -= it->second.first->bytes;
          it = layers_.erase(it);
        } else {
          ++it;
        }
      }
      go.push_back(v);
    }
  }
  if (go.empty()) return Status::Ok();
  {
    std::lock_guard<std::mutex> lock(engine_mu_);
    for (auto it = gpu_lru_.begin(); it != gpu_lru_.end();) {
      if (std::find(go.begin(), go.end(), *it >> 16) != go.end()) {
        if (engine_) engine_->EvictLayer(*it);
        it = gpu_lru_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (uint64_t v : go) {
    host_cache_->EraseVersion(v);
    const std::string path = segments_dir() + "/" + SegmentName(v);
    auto size = FileSize(path);
    SQKV_RETURN_IF_ERROR(RemoveFile(path));
    SQKV_RETURN_IF_ERROR(catalog_->DropVersion(v));
    if (report) {
      ++report->versions_reclaimed;
      if (size.ok()) report->segment_bytes_reclaimed += *size;
    }
  }
  return Status::Ok();
}

Status StoreImpl::RemoveOrphans(CompactReport* report, bool opening) {
  // Builds racing this pass: every version allocated from here on is at least `watermark` (a
  // number allocated for this pass alone), and builds under way below it are in `in_flight`.
  // Neither is judged: a build's segment and keys exist before its record is published.
  uint64_t watermark = UINT64_MAX;
  std::set<uint64_t> in_flight;
  if (!opening) {
    std::lock_guard<std::mutex> lock(build_mu_);
    SQKV_ASSIGN_OR_RETURN(watermark, catalog_->AllocateVersion());
    in_flight = building_;
  }
  auto racing = [&](uint64_t v) { return v >= watermark || in_flight.count(v) > 0; };
  std::vector<ContextRecord> live;
  std::vector<UndecodableContext> undecodable;
  SQKV_RETURN_IF_ERROR(catalog_->ListContexts(&live, &undecodable));
  std::vector<uint64_t> garbage;
  SQKV_RETURN_IF_ERROR(catalog_->ListGarbage(&garbage));
  std::set<std::string> keep;
  std::set<uint64_t> known;
  // A record this build cannot read (damaged; `sqkv rm` removes it) still owns the version it
  // names; one that names none might own any, so nothing is judged until it is gone.
  for (const auto& u : undecodable) {
    if (u.version == 0) return Status::Ok();
    keep.insert(SegmentName(u.version));
    known.insert(u.version);
  }
  for (const auto& r : live) {
    keep.insert(r.SegmentFileName());
    known.insert(r.version);
  }
  for (uint64_t v : garbage) {
    keep.insert(SegmentName(v));
    known.insert(v);
  }
  std::vector<std::string> files;
  SQKV_RETURN_IF_ERROR(ListFiles(segments_dir(), &files));
  for (const auto& f : files) {
    if (keep.count(f)) continue;
    uint64_t v = 0;
    if (SegmentFileVersion(f, &v) && racing(v)) continue;
    const std::string path = segments_dir() + "/" + f;
    auto size = FileSize(path);
    SQKV_RETURN_IF_ERROR(RemoveFile(path));
    if (report) {
      ++report->orphan_files_removed;
      if (size.ok()) report->segment_bytes_reclaimed += *size;
    }
  }
  // Catalog keys of versions that are neither live nor garbage (cannot arise from one batch;
  // kept as a safety net for catalogs written by older code).
  std::vector<uint64_t> stored;
  SQKV_RETURN_IF_ERROR(catalog_->ListStoredVersions(&stored));
  for (uint64_t v : stored) {
    if (!known.count(v) && !racing(v)) SQKV_RETURN_IF_ERROR(catalog_->DropVersion(v));
  }
  return Status::Ok();
}

Status StoreImpl::Compact(CompactReport* report) {
  *report = CompactReport();
  SQKV_RETURN_IF_ERROR(ReclaimGarbage(report));
  SQKV_RETURN_IF_ERROR(RemoveOrphans(report));
  return catalog_->CompactAll(&report->catalog_bytes_before, &report->catalog_bytes_after);
}

Status StoreImpl::Stats(StoreStats* out) {
  *out = StoreStats();
  std::vector<ContextRecord> live;
  SQKV_RETURN_IF_ERROR(catalog_->ListContexts(&live));
  for (const auto& r : live) {
    ++out->contexts;
    ++out->live_versions;
    out->tokens += r.tokens;
    out->keys += static_cast<int64_t>(r.layers) * r.kv_heads * r.tokens;
    out->segment_bytes += r.segment_bytes;
    out->index_bytes += r.index_bytes;
    Thresholds t;
    if (catalog_->GetThresholds(r.version, 0, &t).ok()) ++out->calibrated_contexts;
  }
  std::vector<uint64_t> garbage;
  SQKV_RETURN_IF_ERROR(catalog_->ListGarbage(&garbage));
  for (uint64_t v : garbage) {
    ++out->garbage_versions;
    auto size = FileSize(segments_dir() + "/" + SegmentName(v));
    if (size.ok()) out->garbage_segment_bytes += *size;
  }
  out->catalog_bytes = DirectoryBytes(data_dir() + "/catalog");
  return Status::Ok();
}

Status StoreImpl::Verify(const std::string& name, const ProgressFn& progress,
                         VerifyReport* report) {
  *report = VerifyReport();
  auto problem = [report](std::string what) {
    if (report->problems.size() < kMaxProblems) report->problems.push_back(std::move(what));
  };
  std::vector<ContextRecord> contexts;
  if (name.empty()) {
    std::vector<UndecodableContext> undecodable;
    SQKV_RETURN_IF_ERROR(catalog_->ListContexts(&contexts, &undecodable));
    for (const auto& u : undecodable) {
      problem("context " + u.name + ": record does not decode (" + u.error.ToString() +
              "); `sqkv rm " + u.name + "` removes it");
    }
  } else {
    ContextRecord r;
    SQKV_RETURN_IF_ERROR(Info(name, &r));
    contexts.push_back(r);
  }
  if (Status s = catalog_->VerifyChecksums(); !s.ok()) problem("catalog: " + s.ToString());
  if (name.empty()) {
    // One version named by two records (a damaged catalog).
    std::map<uint64_t, std::string> owner;
    for (const auto& r : contexts) {
      auto [it, first] = owner.emplace(r.version, r.name);
      if (!first) {
        problem("contexts " + it->second + " and " + r.name + " name the same version " +
                std::to_string(r.version) + " (a damaged catalog; removing one keeps the other)");
      }
    }
    // Pins the store skipped when it opened (RestorePins).
    std::vector<std::pair<std::string, std::string>> pins;
    SQKV_RETURN_IF_ERROR(catalog_->ListPins(&pins));
    for (const auto& [pinned, tier_name] : pins) {
      Tier tier;
      ContextRecord r;
      if (!ParseTier(tier_name, &tier)) {
        problem("pin of " + pinned + ": unknown tier '" + tier_name + "'; `sqkv unpin " + pinned +
                "` removes it");
      } else if (Status s = catalog_->GetContext(pinned, &r); s.IsCorruption()) {
        problem("pin of " + pinned + ": its context record does not decode; `sqkv rm " + pinned +
                "` removes both");
      }
    }
  }
  int total = 0, done = 0;
  for (const auto& r : contexts) total += r.layers;
  for (const auto& r : contexts) {
    ++report->contexts_checked;
    const std::string ctx = "context " + r.name;
    std::unique_ptr<SegmentReader> segment;
    if (Status s = SegmentReader::Open(SegmentPath(r), &segment); !s.ok()) {
      problem(ctx + ": " + s.ToString());
      done += r.layers;
      continue;
    }
    const SegmentHeader& h = segment->header();
    if (!SegmentMatchesRecord(h, r).ok()) {
      problem(ctx + ": segment header disagrees with the catalog record");
    }
    std::vector<uint8_t> buffer;
    for (int l = 0; l < r.layers; ++l) {
      const std::string where = ctx + " layer " + std::to_string(l);
      // The calibration records: window queries of the record's shape where it has them, and
      // thresholds that decode where they exist (GetThresholds checks their order and range).
      if (r.window_q_heads > 0) {
        WindowQueries w;
        const Status ws = catalog_->GetWindowQueries(r.version, l, &w);
        if (!ws.ok()) {
          problem(where + ": window queries: " + ws.ToString());
        } else if (w.q_heads != r.window_q_heads || w.window != r.window ||
                   w.head_dim != r.head_dim) {
          problem(where + ": window queries of shape (" + std::to_string(w.q_heads) + ", " +
                  std::to_string(w.window) + ", " + std::to_string(w.head_dim) +
                  "), the record says (" + std::to_string(r.window_q_heads) + ", " +
                  std::to_string(r.window) + ", " + std::to_string(r.head_dim) + ")");
        }
      }
      Thresholds t;
      if (const Status ts = catalog_->GetThresholds(r.version, l, &t);
          !ts.ok() && !ts.IsNotFound()) {
        problem(where + ": thresholds: " + ts.ToString());
      }
      std::string blob;
      std::vector<HeadIndex> heads;
      std::vector<uint64_t> sums;
      Status s = catalog_->GetLayerIndex(r.version, l, &blob);
      if (s.ok()) s = DecodeLayerIndex(blob, &heads);
      if (s.ok()) s = catalog_->GetPageChecksums(r.version, l, &sums);
      const uint64_t first = r.layer_first_page[l], count = r.layer_first_page[l + 1] - first;
      if (s.ok()) {
        uint64_t pages = 0;
        for (const auto& hi : heads) pages += hi.num_pages();
        if (heads.size() != static_cast<size_t>(r.kv_heads) || pages != count ||
            sums.size() != count) {
          s = Status::Corruption("index covers " + std::to_string(pages) + " pages, " +
                                 std::to_string(sums.size()) + " checksums, record says " +
                                 std::to_string(count));
        }
      }
      if (!s.ok()) {
        problem(where + ": " + s.ToString());
      } else if (first + count <= h.num_pages) {
        for (uint64_t p = 0; p < count; p += kVerifyChunkPages) {
          const uint64_t n = std::min(kVerifyChunkPages, count - p);
          buffer.resize(n * h.page_bytes);
          // Check page by page so every damaged page is named.
          Status rs = segment->ReadPages(first + p, n, buffer.data(), nullptr);
          if (!rs.ok()) {
            problem(where + ": " + rs.ToString());
            break;
          }
          for (uint64_t i = 0; i < n; ++i) {
            if (Checksum64(buffer.data() + i * h.page_bytes, h.page_bytes) != sums[p + i]) {
              problem(where + ": page " + std::to_string(first + p + i) + " checksum mismatch");
            }
          }
          report->pages_checked += static_cast<int64_t>(n);
          report->bytes_checked += static_cast<int64_t>(n * h.page_bytes);
        }
      }
      if (progress) progress(++done, total);
    }
  }
  return Status::Ok();
}

}  // namespace sqkv
