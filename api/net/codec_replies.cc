// Responses ↔ Cap'n Proto (one function pair per answer kind).
#include "api/net/codec_wire.h"

namespace sqkv::net::wire_io {
namespace {

Status ReadContext(wire::Context::Reader r, ContextInfo* out) {
  SQKV_RETURN_IF_ERROR(ReadText(r.getName(), kMaxNameBytes, "context name", &out->name));
  out->version = r.getVersion();
  out->layers = r.getLayers();
  out->kv_heads = r.getKvHeads();
  out->tokens = r.getTokens();
  out->head_dim = r.getHeadDim();
  out->page_tokens = r.getPageTokens();
  std::string dtype;
  SQKV_RETURN_IF_ERROR(ReadText(r.getDtype(), kMaxNameBytes, "context dtype", &dtype));
  auto parsed = ParseDType(dtype);
  if (!parsed) return Status::InvalidArgument("context dtype '" + dtype + "' unknown");
  out->dtype = *parsed;
  out->centroid_fraction = r.getCentroidFraction();
  out->levels = r.getLevels();
  out->l1_fraction = r.getL1Fraction();
  auto pages = r.getLayerFirstPage();
  out->layer_first_page.resize(pages.size());
  for (uint32_t i = 0; i < pages.size(); ++i) out->layer_first_page[i] = pages[i];
  out->segment_bytes = r.getSegmentBytes();
  out->index_bytes = r.getIndexBytes();
  out->window_q_heads = r.getWindowQHeads();
  out->window = r.getWindow();
  out->created_unix = r.getCreatedUnix();
  out->build_seconds = r.getBuildSeconds();
  SQKV_RETURN_IF_ERROR(ReadText(r.getSource(), kMaxMessageText, "context source", &out->source));
  return ReadText(r.getKmeans(), kMaxMessageText, "context kmeans", &out->kmeans);
}

void WriteContext(const ContextInfo& c, wire::Context::Builder b) {
  b.setName(c.name);
  b.setVersion(c.version);
  b.setLayers(c.layers);
  b.setKvHeads(c.kv_heads);
  b.setTokens(c.tokens);
  b.setHeadDim(c.head_dim);
  b.setPageTokens(c.page_tokens);
  b.setDtype(DTypeName(c.dtype));
  b.setCentroidFraction(c.centroid_fraction);
  b.setLevels(c.levels);
  b.setL1Fraction(c.l1_fraction);
  auto pages = b.initLayerFirstPage(c.layer_first_page.size());
  for (size_t i = 0; i < c.layer_first_page.size(); ++i) pages.set(i, c.layer_first_page[i]);
  b.setSegmentBytes(c.segment_bytes);
  b.setIndexBytes(c.index_bytes);
  b.setWindowQHeads(c.window_q_heads);
  b.setWindow(c.window);
  b.setCreatedUnix(c.created_unix);
  b.setBuildSeconds(c.build_seconds);
  b.setSource(c.source);
  b.setKmeans(c.kmeans);
}

Status ReadQueryReply(wire::QueryReply::Reader r, QueryResult* out) {
  auto output = r.getOutput(), lse = r.getLse();
  if (output.size() % sizeof(float) != 0 || lse.size() % sizeof(float) != 0) {
    return Status::InvalidArgument("query reply tensors are not whole float32s");
  }
  SQKV_RETURN_IF_ERROR(ReadFloats(output, output.size() / sizeof(float), "output", &out->output));
  SQKV_RETURN_IF_ERROR(ReadFloats(lse, lse.size() / sizeof(float), "lse", &out->lse));
  auto sel = r.getSelectedTokens();
  out->selected_tokens.resize(sel.size());
  for (uint32_t h = 0; h < sel.size(); ++h) {
    auto tokens = sel[h];
    auto& dst = out->selected_tokens[h];
    dst.resize(tokens.size());
    for (uint32_t i = 0; i < tokens.size(); ++i) dst[i] = tokens[i];
  }
  auto s = r.getStats();
  SQKV_RETURN_IF_ERROR(ReadText(s.getDevice(), kMaxNameBytes, "stats device", &out->stats.device));
  out->stats.tokens_selected = s.getTokensSelected();
  out->stats.pages_selected = s.getPagesSelected();
  out->stats.centroids_scored = s.getCentroidsScored();
  out->stats.pages_from_disk = s.getPagesFromDisk();
  out->stats.disk_bytes_read = s.getDiskBytesRead();
  out->stats.total_ms = s.getTotalMs();
  out->stats.pages_from_host = s.getPagesFromHost();
  out->stats.pages_from_device = s.getPagesFromDevice();
  return Status::Ok();
}

void WriteQueryReply(const QueryResult& q, wire::QueryReply::Builder b) {
  WriteFloats(q.output, b.initOutput(q.output.size() * sizeof(float)));
  WriteFloats(q.lse, b.initLse(q.lse.size() * sizeof(float)));
  auto sel = b.initSelectedTokens(q.selected_tokens.size());
  for (size_t h = 0; h < q.selected_tokens.size(); ++h) {
    const auto& tokens = q.selected_tokens[h];
    auto list = sel.init(h, tokens.size());
    for (size_t i = 0; i < tokens.size(); ++i) list.set(i, tokens[i]);
  }
  auto s = b.initStats();
  s.setDevice(q.stats.device);
  s.setTokensSelected(q.stats.tokens_selected);
  s.setPagesSelected(q.stats.pages_selected);
  s.setCentroidsScored(q.stats.centroids_scored);
  s.setPagesFromDisk(q.stats.pages_from_disk);
  s.setDiskBytesRead(q.stats.disk_bytes_read);
  s.setTotalMs(q.stats.total_ms);
  s.setPagesFromHost(q.stats.pages_from_host);
  s.setPagesFromDevice(q.stats.pages_from_device);
}

}  // namespace

Status ReadResponse(wire::Response::Reader r, Response* out) {
  out->id = r.getId();
  auto st = r.getStatus();
  std::string message;
  SQKV_RETURN_IF_ERROR(ReadText(st.getMessage(), kMaxMessageText, "status message", &message));
  out->status = FromWire(st.getCode(), std::move(message));
  switch (r.which()) {
    case wire::Response::NONE:
      out->body = std::monostate{};
      return Status::Ok();
    case wire::Response::HELLO: {
      auto h = r.getHello();
      HelloReply reply;
      reply.protocol_version = h.getProtocolVersion();
      SQKV_RETURN_IF_ERROR(ReadText(h.getServer(), kMaxNameBytes, "hello server", &reply.server));
      reply.max_message_bytes = h.getMaxMessageBytes();
      out->body = std::move(reply);
      return Status::Ok();
    }
    case wire::Response::QUERY: {
      QueryResult q;
      SQKV_RETURN_IF_ERROR(ReadQueryReply(r.getQuery(), &q));
      out->body = std::move(q);
      return Status::Ok();
    }
    case wire::Response::CONTEXTS: {
      std::vector<ContextInfo> all;
      for (auto c : r.getContexts()) {
        SQKV_RETURN_IF_ERROR(ReadContext(c, &all.emplace_back()));
      }
      out->body = std::move(all);
      return Status::Ok();
    }
    case wire::Response::CONTEXT: {
      ContextInfo c;
      SQKV_RETURN_IF_ERROR(ReadContext(r.getContext(), &c));
      out->body = std::move(c);
      return Status::Ok();
    }
    case wire::Response::IMPORT_BEGIN: {
      auto b = r.getImportBegin();
      out->body = ImportBeginReply{b.getUploadId(), b.getChunkBytes()};
      return Status::Ok();
    }
    case wire::Response::PROGRESS: {
      auto p = r.getProgress();
      out->body = ProgressReply{p.getDone(), p.getTotal()};
      return Status::Ok();
    }
    case wire::Response::THRESHOLDS: {
      auto t = r.getThresholds();
      Thresholds th;
      auto sp = t.getSparsity(), tv = t.getThreshold();
      th.sparsity.resize(sp.size());
      for (uint32_t i = 0; i < sp.size(); ++i) th.sparsity[i] = sp[i];
      th.threshold.resize(tv.size());
      for (uint32_t i = 0; i < tv.size(); ++i) th.threshold[i] = tv[i];
      out->body = std::move(th);
      return Status::Ok();
    }
    case wire::Response::VERIFY_REPORT: {
      auto v = r.getVerifyReport();
      VerifyReport rep;
      rep.contexts_checked = v.getContextsChecked();
      rep.pages_checked = v.getPagesChecked();
      rep.bytes_checked = v.getBytesChecked();
      for (auto p : v.getProblems()) {
        SQKV_RETURN_IF_ERROR(
            ReadText(p, kMaxMessageText, "verify problem", &rep.problems.emplace_back()));
      }
      out->body = std::move(rep);
      return Status::Ok();
    }
    case wire::Response::COMPACT_REPORT: {
      auto c = r.getCompactReport();
      CompactReport rep;
      rep.versions_reclaimed = c.getVersionsReclaimed();
      rep.versions_in_use = c.getVersionsInUse();
      rep.orphan_files_removed = c.getOrphanFilesRemoved();
      rep.segment_bytes_reclaimed = c.getSegmentBytesReclaimed();
      rep.catalog_bytes_before = c.getCatalogBytesBefore();
      rep.catalog_bytes_after = c.getCatalogBytesAfter();
      out->body = rep;
      return Status::Ok();
    }
    case wire::Response::STATS: {
      auto w = r.getStats();
      StoreStats st;
      st.contexts = w.getContexts();
      st.tokens = w.getTokens();
      st.keys = w.getKeys();
      st.segment_bytes = w.getSegmentBytes();
      st.index_bytes = w.getIndexBytes();
      st.garbage_segment_bytes = w.getGarbageSegmentBytes();
      st.catalog_bytes = w.getCatalogBytes();
      st.live_versions = w.getLiveVersions();
      st.garbage_versions = w.getGarbageVersions();
      st.calibrated_contexts = w.getCalibratedContexts();
      out->body = st;
      return Status::Ok();
    }
    case wire::Response::PINS: {
      PinList pins;
      for (auto p : r.getPins()) {
        auto& [name, tier] = pins.emplace_back();
        SQKV_RETURN_IF_ERROR(ReadText(p.getName(), kMaxNameBytes, "pinned name", &name));
        SQKV_RETURN_IF_ERROR(FromWire(p.getTier(), &tier));
      }
      out->body = std::move(pins);
      return Status::Ok();
    }
    case wire::Response::TIER_STATS: {
      auto w = r.getTierStats();
      TierStats t;
      t.host_hits = w.getHostHits();
      t.host_misses = w.getHostMisses();
      t.host_evictions = w.getHostEvictions();
      t.host_bytes_in_use = w.getHostBytesInUse();
      t.host_pinned_bytes = w.getHostPinnedBytes();
      t.host_capacity_bytes = w.getHostCapacityBytes();
      t.disk_reads = w.getDiskReads();
      t.disk_bytes = w.getDiskBytes();
      t.disk_direct_bytes = w.getDiskDirectBytes();
      auto hist = w.getDiskReadUsLog2();
      t.disk_read_us_log2.resize(hist.size());
      for (uint32_t i = 0; i < hist.size(); ++i) t.disk_read_us_log2[i] = hist[i];
      t.device_layers_resident = w.getDeviceLayersResident();
      t.device_layers_pinned = w.getDeviceLayersPinned();
      t.device_pool_bytes_used = w.getDevicePoolBytesUsed();
      t.device_pool_bytes = w.getDevicePoolBytes();
      t.device_layers_loaded = w.getDeviceLayersLoaded();
      t.device_layers_evicted = w.getDeviceLayersEvicted();
      t.device_hits = w.getDeviceHits();
      t.device_misses = w.getDeviceMisses();
      t.device_pages_uploaded = w.getDevicePagesUploaded();
      t.device_bytes_uploaded = w.getDeviceBytesUploaded();
      t.device_pages_evicted = w.getDevicePagesEvicted();
      t.index_layers_cached = w.getIndexLayersCached();
      t.index_bytes_cached = w.getIndexBytesCached();
      t.index_capacity_bytes = w.getIndexCapacityBytes();
      t.index_layers_decoded = w.getIndexLayersDecoded();
      t.index_layers_evicted = w.getIndexLayersEvicted();
      out->body = std::move(t);
      return Status::Ok();
    }
  }
  return Status::InvalidArgument("unknown reply " + std::to_string(static_cast<int>(r.which())) +
                                 " (server newer than client?)");
}

void WriteResponse(const Response& resp, wire::Response::Builder b) {
  b.setId(resp.id);
  auto st = b.initStatus();
  st.setCode(ToWire(resp.status.code()));
  const std::string& m = resp.status.message();
  st.setMessage(m.size() > kMaxMessageText ? m.substr(0, kMaxMessageText) : m);
  struct Visitor {
    wire::Response::Builder& b;
    void operator()(const std::monostate&) { b.setNone(); }
    void operator()(const HelloReply& h) {
      auto w = b.initHello();
      w.setProtocolVersion(h.protocol_version);
      w.setServer(h.server);
      w.setMaxMessageBytes(h.max_message_bytes);
    }
    void operator()(const QueryResult& q) { WriteQueryReply(q, b.initQuery()); }
    void operator()(const std::vector<ContextInfo>& all) {
      auto list = b.initContexts(all.size());
      for (size_t i = 0; i < all.size(); ++i) WriteContext(all[i], list[i]);
    }
    void operator()(const ContextInfo& c) { WriteContext(c, b.initContext()); }
    void operator()(const ImportBeginReply& r) {
      auto w = b.initImportBegin();
      w.setUploadId(r.upload_id);
      w.setChunkBytes(r.chunk_bytes);
    }
    void operator()(const ProgressReply& p) {
      auto w = b.initProgress();
      w.setDone(p.done);
      w.setTotal(p.total);
    }
    void operator()(const Thresholds& t) {
      auto w = b.initThresholds();
      auto sp = w.initSparsity(t.sparsity.size());
      for (size_t i = 0; i < t.sparsity.size(); ++i) sp.set(i, t.sparsity[i]);
      auto tv = w.initThreshold(t.threshold.size());
      for (size_t i = 0; i < t.threshold.size(); ++i) tv.set(i, t.threshold[i]);
    }
    void operator()(const VerifyReport& v) {
      auto w = b.initVerifyReport();
      w.setContextsChecked(v.contexts_checked);
      w.setPagesChecked(v.pages_checked);
      w.setBytesChecked(v.bytes_checked);
      auto problems = w.initProblems(v.problems.size());
      for (size_t i = 0; i < v.problems.size(); ++i) problems.set(i, v.problems[i]);
    }
    void operator()(const CompactReport& c) {
      auto w = b.initCompactReport();
      w.setVersionsReclaimed(c.versions_reclaimed);
      w.setVersionsInUse(c.versions_in_use);
      w.setOrphanFilesRemoved(c.orphan_files_removed);
      w.setSegmentBytesReclaimed(c.segment_bytes_reclaimed);
      w.setCatalogBytesBefore(c.catalog_bytes_before);
      w.setCatalogBytesAfter(c.catalog_bytes_after);
    }
    void operator()(const StoreStats& st) {
      auto w = b.initStats();
      w.setContexts(st.contexts);
      w.setTokens(st.tokens);
      w.setKeys(st.keys);
      w.setSegmentBytes(st.segment_bytes);
      w.setIndexBytes(st.index_bytes);
      w.setGarbageSegmentBytes(st.garbage_segment_bytes);
      w.setCatalogBytes(st.catalog_bytes);
      w.setLiveVersions(st.live_versions);
      w.setGarbageVersions(st.garbage_versions);
      w.setCalibratedContexts(st.calibrated_contexts);
    }
    void operator()(const PinList& pins) {
      auto list = b.initPins(pins.size());
      for (size_t i = 0; i < pins.size(); ++i) {
        list[i].setName(pins[i].first);
        list[i].setTier(ToWire(pins[i].second));
      }
    }
    void operator()(const TierStats& t) {
      auto w = b.initTierStats();
      w.setHostHits(t.host_hits);
      w.setHostMisses(t.host_misses);
      w.setHostEvictions(t.host_evictions);
      w.setHostBytesInUse(t.host_bytes_in_use);
      w.setHostPinnedBytes(t.host_pinned_bytes);
      w.setHostCapacityBytes(t.host_capacity_bytes);
      w.setDiskReads(t.disk_reads);
      w.setDiskBytes(t.disk_bytes);
      w.setDiskDirectBytes(t.disk_direct_bytes);
      auto hist = w.initDiskReadUsLog2(t.disk_read_us_log2.size());
      for (size_t i = 0; i < t.disk_read_us_log2.size(); ++i) hist.set(i, t.disk_read_us_log2[i]);
      w.setDeviceLayersResident(t.device_layers_resident);
      w.setDeviceLayersPinned(t.device_layers_pinned);
      w.setDevicePoolBytesUsed(t.device_pool_bytes_used);
      w.setDevicePoolBytes(t.device_pool_bytes);
      w.setDeviceLayersLoaded(t.device_layers_loaded);
      w.setDeviceLayersEvicted(t.device_layers_evicted);
      w.setDeviceHits(t.device_hits);
      w.setDeviceMisses(t.device_misses);
      w.setDevicePagesUploaded(t.device_pages_uploaded);
      w.setDeviceBytesUploaded(t.device_bytes_uploaded);
      w.setDevicePagesEvicted(t.device_pages_evicted);
      w.setIndexLayersCached(t.index_layers_cached);
      w.setIndexBytesCached(t.index_bytes_cached);
      w.setIndexCapacityBytes(t.index_capacity_bytes);
      w.setIndexLayersDecoded(t.index_layers_decoded);
      w.setIndexLayersEvicted(t.index_layers_evicted);
    }
  };
  if (!resp.status.ok()) {
    b.setNone();
    return;
  }
  std::visit(Visitor{b}, resp.body);
}

}  // namespace sqkv::net::wire_io
