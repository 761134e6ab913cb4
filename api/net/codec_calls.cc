// Requests ↔ Cap'n Proto (one function pair per call kind).
#include "api/net/codec_wire.h"

namespace sqkv::net::wire_io {
namespace {

Status ReadQuery(wire::QueryCall::Reader r, QueryCall* out) {
  SQKV_RETURN_IF_ERROR(ReadText(r.getName(), kMaxNameBytes, "query name", &out->name));
  out->layer = r.getLayer();
  out->q_heads = r.getQHeads();
  out->n = r.getN();
  out->head_dim = r.getHeadDim();
  if (out->q_heads <= 0 || out->n <= 0 || out->head_dim <= 0) {
    return Status::InvalidArgument("query shape (" + std::to_string(out->q_heads) + ", " +
                                   std::to_string(out->n) + ", " + std::to_string(out->head_dim) +
                                   ") has a non-positive dim");
  }
  uint64_t elements = 0;
  if (!ElementCount(out->q_heads, out->n, out->head_dim, &elements)) {
    return Status::InvalidArgument("query shape overflows");
  }
  SQKV_RETURN_IF_ERROR(ReadFloats(r.getQ(), elements, "query q", &out->q));
  SelectOptions& s = out->options.select;
  SQKV_RETURN_IF_ERROR(FromWire(r.getMode(), &s.mode));
  s.keep_fraction = r.getKeepFraction();
  s.threshold = r.getThreshold();
  s.l1_keep_fraction = r.getL1KeepFraction();
  SQKV_RETURN_IF_ERROR(FromWire(r.getDevice(), &out->options.device));
  out->options.want_selection = r.getWantSelection();
  out->options.sparsity = r.getSparsity();
  return Status::Ok();
}

void WriteQuery(const QueryCall& c, wire::QueryCall::Builder b) {
  b.setName(c.name);
  b.setLayer(c.layer);
  b.setQHeads(c.q_heads);
  b.setN(c.n);
  b.setHeadDim(c.head_dim);
  WriteFloats(c.q, b.initQ(c.q.size() * sizeof(float)));
  b.setMode(ToWire(c.options.select.mode));
  b.setKeepFraction(c.options.select.keep_fraction);
  b.setThreshold(c.options.select.threshold);
  b.setL1KeepFraction(c.options.select.l1_keep_fraction);
  b.setDevice(ToWire(c.options.device));
  b.setWantSelection(c.options.want_selection);
  b.setSparsity(c.options.sparsity);
}

Status ReadImportOptions(wire::ImportOptions::Reader o, ImportOptions* out) {
  out->centroid_fraction = o.getCentroidFraction();
  out->page_tokens = o.getPageTokens();
  out->levels = o.getLevels();
  out->l1_fraction = o.getL1Fraction();
  out->kmeans_iterations = o.getKmeansIterations();
  return FromWire(o.getKmeansDevice(), &out->kmeans_device);
}

void WriteImportOptions(const ImportOptions& o, wire::ImportOptions::Builder b) {
  b.setCentroidFraction(o.centroid_fraction);
  b.setPageTokens(o.page_tokens);
  b.setLevels(o.levels);
  b.setL1Fraction(o.l1_fraction);
  b.setKmeansIterations(o.kmeans_iterations);
  b.setKmeansDevice(ToWire(o.kmeans_device));
}

Status ReadCalibrate(wire::CalibrateCall::Reader r, CalibrateCall* out) {
  SQKV_RETURN_IF_ERROR(ReadText(r.getName(), kMaxNameBytes, "calibrate name", &out->name));
  out->use_stored_queries = r.getUseStoredQueries();
  if (!out->use_stored_queries) {
    // A list of empty structs costs the sender nothing per element: its length is checked, and
    // every element's shape, before anything is allocated for it.
    auto layers = r.getQueries();
    if (layers.size() > kMaxLayers) {
      return Status::InvalidArgument("calibration queries for " + std::to_string(layers.size()) +
                                     " layers; the limit is " + std::to_string(kMaxLayers));
    }
    std::vector<uint64_t> elements(layers.size());  // (layers)
    for (uint32_t l = 0; l < layers.size(); ++l) {
      auto w = layers[l];
      if (w.getQHeads() <= 0 || w.getWindow() <= 0 || w.getHeadDim() <= 0) {
        return Status::InvalidArgument("calibration queries of layer " + std::to_string(l) +
                                       " have a non-positive dim");
      }
      if (!ElementCount(w.getQHeads(), w.getWindow(), w.getHeadDim(), &elements[l])) {
        return Status::InvalidArgument("calibration query shape overflows");
      }
    }
    out->queries.resize(layers.size());
    for (uint32_t l = 0; l < layers.size(); ++l) {
      auto w = layers[l];
      WindowQueries& q = out->queries[l];
      q.q_heads = w.getQHeads();
      q.window = w.getWindow();
      q.head_dim = w.getHeadDim();
      SQKV_RETURN_IF_ERROR(ReadFloats(w.getData(), elements[l], "calibration queries", &q.data));
    }
  }
  auto sp = r.getSparsities();
  if (sp.size() > kMaxSparsities) {
    return Status::InvalidArgument(std::to_string(sp.size()) + " calibration sparsities; the " +
                                   "limit is " + std::to_string(kMaxSparsities));
  }
  out->sparsities.resize(sp.size());
  for (uint32_t i = 0; i < sp.size(); ++i) out->sparsities[i] = sp[i];
  return Status::Ok();
}

void WriteCalibrate(const CalibrateCall& c, wire::CalibrateCall::Builder b) {
  b.setName(c.name);
  b.setUseStoredQueries(c.use_stored_queries);
  if (!c.use_stored_queries) {
    auto layers = b.initQueries(c.queries.size());
    for (size_t l = 0; l < c.queries.size(); ++l) {
      const WindowQueries& q = c.queries[l];
      auto w = layers[l];
      w.setQHeads(q.q_heads);
      w.setWindow(q.window);
      w.setHeadDim(q.head_dim);
      WriteFloats(q.data, w.initData(q.data.size() * sizeof(float)));
    }
  }
  auto sp = b.initSparsities(c.sparsities.size());
  for (size_t i = 0; i < c.sparsities.size(); ++i) sp.set(i, c.sparsities[i]);
}

Status ReadImportBegin(wire::ImportBegin::Reader r, ImportBeginCall* out) {
  SQKV_RETURN_IF_ERROR(ReadText(r.getName(), kMaxNameBytes, "import name", &out->name));
  // The server keeps the upload under this name: at most a file name's NAME_MAX (255) bytes,
  // else creating it fails as a server I/O error.
  SQKV_RETURN_IF_ERROR(
      ReadText(r.getFileName(), kMaxFileNameBytes, "import file name", &out->file_name));
  if (out->file_name.find('/') != std::string::npos || out->file_name == "." ||
      out->file_name == ".." || out->file_name.find('\0') != std::string::npos) {
    return Status::InvalidArgument("import file name must be a plain base name");
  }
  out->total_bytes = r.getTotalBytes();
  return ReadImportOptions(r.getOptions(), &out->options);
}

void WriteImportBegin(const ImportBeginCall& c, wire::ImportBegin::Builder b) {
  b.setName(c.name);
  b.setFileName(c.file_name);
  b.setTotalBytes(c.total_bytes);
  WriteImportOptions(c.options, b.initOptions());
}

}  // namespace

Status ReadRequest(wire::Request::Reader r, Request* out) {
  out->id = r.getId();
  out->deadline_ms = r.getDeadlineMs();
  switch (r.which()) {
    case wire::Request::HELLO: {
      auto h = r.getHello();
      HelloCall c;
      c.protocol_version = h.getProtocolVersion();
      auto token = h.getToken();
      if (token.size() > kMaxTokenBytes) return Status::InvalidArgument("hello token too long");
      c.token.assign(reinterpret_cast<const char*>(token.begin()), token.size());
      SQKV_RETURN_IF_ERROR(ReadText(h.getClient(), kMaxNameBytes, "hello client", &c.client));
      out->call = std::move(c);
      return Status::Ok();
    }
    case wire::Request::QUERY: {
      QueryCall c;
      SQKV_RETURN_IF_ERROR(ReadQuery(r.getQuery(), &c));
      out->call = std::move(c);
      return Status::Ok();
    }
    case wire::Request::LIST:
      out->call = ListCall{};
      return Status::Ok();
    case wire::Request::INFO: {
      InfoCall c;
      SQKV_RETURN_IF_ERROR(ReadText(r.getInfo(), kMaxNameBytes, "info name", &c.name));
      out->call = std::move(c);
      return Status::Ok();
    }
    case wire::Request::REMOVE: {
      RemoveCall c;
      SQKV_RETURN_IF_ERROR(ReadText(r.getRemove(), kMaxNameBytes, "remove name", &c.name));
      out->call = std::move(c);
      return Status::Ok();
    }
    case wire::Request::IMPORT_BEGIN: {
      ImportBeginCall c;
      SQKV_RETURN_IF_ERROR(ReadImportBegin(r.getImportBegin(), &c));
      out->call = std::move(c);
      return Status::Ok();
    }
    case wire::Request::IMPORT_CHUNK: {
      auto ch = r.getImportChunk();
      ImportChunkCall c;
      c.upload_id = ch.getUploadId();
      c.offset = ch.getOffset();
      auto data = ch.getData();
      c.data.assign(reinterpret_cast<const char*>(data.begin()), data.size());
      out->call = std::move(c);
      return Status::Ok();
    }
    case wire::Request::IMPORT_END:
      out->call = ImportEndCall{r.getImportEnd().getUploadId()};
      return Status::Ok();
    case wire::Request::REBUILD: {
      auto rb = r.getRebuild();
      RebuildCall c;
      SQKV_RETURN_IF_ERROR(ReadText(rb.getName(), kMaxNameBytes, "rebuild name", &c.name));
      SQKV_RETURN_IF_ERROR(ReadImportOptions(rb.getOptions(), &c.options));
      out->call = std::move(c);
      return Status::Ok();
    }
    case wire::Request::CALIBRATE: {
      CalibrateCall c;
      SQKV_RETURN_IF_ERROR(ReadCalibrate(r.getCalibrate(), &c));
      out->call = std::move(c);
      return Status::Ok();
    }
    case wire::Request::GET_THRESHOLDS: {
      auto g = r.getGetThresholds();
      GetThresholdsCall c;
      SQKV_RETURN_IF_ERROR(ReadText(g.getName(), kMaxNameBytes, "thresholds name", &c.name));
      c.layer = g.getLayer();
      out->call = std::move(c);
      return Status::Ok();
    }
    case wire::Request::VERIFY: {
      VerifyCall c;
      SQKV_RETURN_IF_ERROR(ReadText(r.getVerify(), kMaxNameBytes, "verify name", &c.name));
      out->call = std::move(c);
      return Status::Ok();
    }
    case wire::Request::COMPACT:
      out->call = CompactCall{};
      return Status::Ok();
    case wire::Request::STATS:
      out->call = StatsCall{};
      return Status::Ok();
    case wire::Request::PIN: {
      PinCall c;
      SQKV_RETURN_IF_ERROR(ReadText(r.getPin().getName(), kMaxNameBytes, "pin name", &c.name));
      SQKV_RETURN_IF_ERROR(FromWire(r.getPin().getTier(), &c.tier));
      out->call = std::move(c);
      return Status::Ok();
    }
    case wire::Request::UNPIN: {
      UnpinCall c;
      SQKV_RETURN_IF_ERROR(ReadText(r.getUnpin(), kMaxNameBytes, "unpin name", &c.name));
      out->call = std::move(c);
      return Status::Ok();
    }
    case wire::Request::PRELOAD: {
      PreloadCall c;
      SQKV_RETURN_IF_ERROR(
          ReadText(r.getPreload().getName(), kMaxNameBytes, "preload name", &c.name));
      SQKV_RETURN_IF_ERROR(FromWire(r.getPreload().getTier(), &c.tier));
      out->call = std::move(c);
      return Status::Ok();
    }
    case wire::Request::LIST_PINS:
      out->call = ListPinsCall{};
      return Status::Ok();
    case wire::Request::TIER_STATS:
      out->call = TierStatsCall{};
      return Status::Ok();
  }
  return Status::InvalidArgument("unknown call " + std::to_string(static_cast<int>(r.which())) +
                                 " (client newer than server?)");
}

void WriteRequest(const Request& req, wire::Request::Builder b) {
  b.setId(req.id);
  b.setDeadlineMs(req.deadline_ms);
  struct Visitor {
    wire::Request::Builder& b;
    void operator()(const HelloCall& c) {
      auto h = b.initHello();
      h.setProtocolVersion(c.protocol_version);
      h.setToken(
          capnp::Data::Reader(reinterpret_cast<const kj::byte*>(c.token.data()), c.token.size()));
      h.setClient(c.client);
    }
    void operator()(const QueryCall& c) { WriteQuery(c, b.initQuery()); }
    void operator()(const ListCall&) { b.setList(); }
    void operator()(const InfoCall& c) { b.setInfo(c.name); }
    void operator()(const RemoveCall& c) { b.setRemove(c.name); }
    void operator()(const ImportBeginCall& c) { WriteImportBegin(c, b.initImportBegin()); }
    void operator()(const ImportChunkCall& c) {
      auto ch = b.initImportChunk();
      ch.setUploadId(c.upload_id);
      ch.setOffset(c.offset);
      ch.setData(
          capnp::Data::Reader(reinterpret_cast<const kj::byte*>(c.data.data()), c.data.size()));
    }
    void operator()(const ImportEndCall& c) { b.initImportEnd().setUploadId(c.upload_id); }
    void operator()(const RebuildCall& c) {
      auto rb = b.initRebuild();
      rb.setName(c.name);
      WriteImportOptions(c.options, rb.initOptions());
    }
    void operator()(const CalibrateCall& c) { WriteCalibrate(c, b.initCalibrate()); }
    void operator()(const GetThresholdsCall& c) {
      auto g = b.initGetThresholds();
      g.setName(c.name);
      g.setLayer(c.layer);
    }
    void operator()(const VerifyCall& c) { b.setVerify(c.name); }
    void operator()(const CompactCall&) { b.setCompact(); }
    void operator()(const StatsCall&) { b.setStats(); }
    void operator()(const PinCall& c) {
      auto w = b.initPin();
      w.setName(c.name);
      w.setTier(ToWire(c.tier));
    }
    void operator()(const UnpinCall& c) { b.setUnpin(c.name); }
    void operator()(const PreloadCall& c) {
      auto w = b.initPreload();
      w.setName(c.name);
      w.setTier(ToWire(c.tier));
    }
    void operator()(const ListPinsCall&) { b.setListPins(); }
    void operator()(const TierStatsCall&) { b.setTierStats(); }
  };
  std::visit(Visitor{b}, req.call);
}

}  // namespace sqkv::net::wire_io
