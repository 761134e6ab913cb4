// Messages ↔ Cap'n Proto. Every reader access may throw kj::Exception on a malformed message, so
// decoding copies the whole message into plain values inside one try block; nothing outside this
// file touches a Cap'n Proto reader or builder.
#include "api/net/codec.h"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/io.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "api/net/sqkv.capnp.h"

namespace sqkv::net {

static_assert(std::endian::native == std::endian::little,
              "the wire carries little-endian floats and framing; this host is big-endian");
static_assert(kProtocolVersion == wire::PROTOCOL_VERSION, "messages.h and sqkv.capnp disagree");

namespace {

// Longest text fields we accept: names (the store allows 128), tokens, descriptions, messages.
constexpr size_t kMaxNameBytes = 1024;
constexpr size_t kMaxTokenBytes = 4096;
constexpr size_t kMaxMessageText = 64 * 1024;
// The traversal limit is this many times the frame's words (plus a little for tiny frames): a
// well-formed message is read once, an aliasing one cannot make the decoder do more than this.
constexpr uint64_t kTraversalFactor = 2;
constexpr uint64_t kTraversalSlackWords = 64;

const char* const kCallKindNames[kNumCallKinds] = {
    "hello",   "query",     "list",           "info",   "remove",  "import_begin", "import_chunk",
    "import_end", "rebuild", "calibrate", "get_thresholds", "verify", "compact", "stats",
    "pin",     "unpin",     "preload",        "list_pins", "tier_stats"};

// ---- small readers ----

Status ReadText(capnp::Text::Reader t, size_t max_bytes, const char* field, std::string* out) {
  if (t.size() > max_bytes) {
    return Status::InvalidArgument(std::string(field) + " is longer than " +
                                   std::to_string(max_bytes) + " bytes");
  }
  out->assign(t.begin(), t.size());
  return Status::Ok();
}

// data: n float32 little-endian → out.
Status ReadFloats(capnp::Data::Reader data, uint64_t expected, const char* field,
                  std::vector<float>* out) {
  if (data.size() != expected * sizeof(float)) {
    return Status::InvalidArgument(std::string(field) + " holds " + std::to_string(data.size()) +
                                   " bytes, its shape needs " +
                                   std::to_string(expected * sizeof(float)));
  }
  out->resize(expected);
  if (expected > 0) std::memcpy(out->data(), data.begin(), data.size());
  return Status::Ok();
}

void WriteFloats(const std::vector<float>& v, capnp::Data::Builder data) {
  if (!v.empty()) std::memcpy(data.begin(), v.data(), v.size() * sizeof(float));
}

// ---- enums ----

wire::Device ToWire(Device d) {
  switch (d) {
    case Device::kAuto: return wire::Device::AUTO;
    case Device::kCpu: return wire::Device::CPU;
    case Device::kGpu: return wire::Device::GPU;
  }
  return wire::Device::AUTO;
}

Status FromWire(wire::Device d, Device* out) {
  switch (d) {
    case wire::Device::AUTO: *out = Device::kAuto; return Status::Ok();
    case wire::Device::CPU: *out = Device::kCpu; return Status::Ok();
    case wire::Device::GPU: *out = Device::kGpu; return Status::Ok();
  }
  return Status::InvalidArgument("unknown device " + std::to_string(static_cast<int>(d)));
}

wire::Tier ToWire(Tier t) { return t == Tier::kDevice ? wire::Tier::DEVICE : wire::Tier::HOST; }

Status FromWire(wire::Tier t, Tier* out) {
  switch (t) {
    case wire::Tier::HOST: *out = Tier::kHost; return Status::Ok();
    case wire::Tier::DEVICE: *out = Tier::kDevice; return Status::Ok();
  }
  return Status::InvalidArgument("unknown tier " + std::to_string(static_cast<int>(t)));
}

wire::SelectMode ToWire(SelectOptions::Mode m) {
  switch (m) {
    case SelectOptions::Mode::kKeepFraction: return wire::SelectMode::KEEP_FRACTION;
    case SelectOptions::Mode::kThreshold: return wire::SelectMode::THRESHOLD;
    case SelectOptions::Mode::kDense: return wire::SelectMode::DENSE;
  }
  return wire::SelectMode::KEEP_FRACTION;
}

Status FromWire(wire::SelectMode m, SelectOptions::Mode* out) {
  switch (m) {
    case wire::SelectMode::KEEP_FRACTION: *out = SelectOptions::Mode::kKeepFraction; break;
    case wire::SelectMode::THRESHOLD: *out = SelectOptions::Mode::kThreshold; break;
    case wire::SelectMode::DENSE: *out = SelectOptions::Mode::kDense; break;
    default:
      return Status::InvalidArgument("unknown select mode " + std::to_string(static_cast<int>(m)));
  }
  return Status::Ok();
}

wire::StatusCode ToWire(Status::Code c) {
  switch (c) {
    case Status::Code::kOk: return wire::StatusCode::OK;
    case Status::Code::kInvalidArgument: return wire::StatusCode::INVALID_ARGUMENT;
    case Status::Code::kNotFound: return wire::StatusCode::NOT_FOUND;
    case Status::Code::kAlreadyExists: return wire::StatusCode::ALREADY_EXISTS;
    case Status::Code::kCorruption: return wire::StatusCode::CORRUPTION;
    case Status::Code::kIOError: return wire::StatusCode::IO_ERROR;
    case Status::Code::kUnavailable: return wire::StatusCode::UNAVAILABLE;
    case Status::Code::kInternal: return wire::StatusCode::INTERNAL;
  }
  return wire::StatusCode::INTERNAL;
}

Status FromWire(wire::StatusCode c, std::string message) {
  switch (c) {
    case wire::StatusCode::OK: return Status::Ok();
    case wire::StatusCode::INVALID_ARGUMENT: return Status::InvalidArgument(std::move(message));
    case wire::StatusCode::NOT_FOUND: return Status::NotFound(std::move(message));
    case wire::StatusCode::ALREADY_EXISTS: return Status::AlreadyExists(std::move(message));
    case wire::StatusCode::CORRUPTION: return Status::Corruption(std::move(message));
    case wire::StatusCode::IO_ERROR: return Status::IOError(std::move(message));
    case wire::StatusCode::UNAVAILABLE: return Status::Unavailable(std::move(message));
    case wire::StatusCode::INTERNAL: return Status::Internal(std::move(message));
  }
  // A newer server's code: keep the message, call it internal.
  return Status::Internal(std::move(message));
}

// ---- calls ----

Status ReadQuery(wire::QueryCall::Reader r, QueryCall* out) {
  SQKV_RETURN_IF_ERROR(ReadText(r.getName(), kMaxNameBytes, "query name", &out->name));
  out->layer = r.getLayer();
  out->q_heads = r.getQHeads();
  out->n = r.getN();
  out->head_dim = r.getHeadDim();
  if (out->q_heads <= 0 || out->n <= 0 || out->head_dim <= 0) {
    return Status::InvalidArgument("query shape (" + std::to_string(out->q_heads) + ", " +
                                   std::to_string(out->n) + ", " +
                                   std::to_string(out->head_dim) + ") has a non-positive dim");
  }
  uint64_t elements = 0;
  if (__builtin_mul_overflow(static_cast<uint64_t>(out->q_heads), static_cast<uint64_t>(out->n),
                             &elements) ||
      __builtin_mul_overflow(elements, static_cast<uint64_t>(out->head_dim), &elements) ||
      elements > std::numeric_limits<uint64_t>::max() / sizeof(float)) {
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

void ReadImportOptions(wire::ImportOptions::Reader o, ImportOptions* out) {
  out->centroid_fraction = o.getCentroidFraction();
  out->page_tokens = o.getPageTokens();
  out->levels = o.getLevels();
  out->l1_fraction = o.getL1Fraction();
  out->kmeans_iterations = o.getKmeansIterations();
}

void WriteImportOptions(const ImportOptions& o, wire::ImportOptions::Builder b) {
  b.setCentroidFraction(o.centroid_fraction);
  b.setPageTokens(o.page_tokens);
  b.setLevels(o.levels);
  b.setL1Fraction(o.l1_fraction);
  b.setKmeansIterations(o.kmeans_iterations);
}

Status ReadCalibrate(wire::CalibrateCall::Reader r, CalibrateCall* out) {
  SQKV_RETURN_IF_ERROR(ReadText(r.getName(), kMaxNameBytes, "calibrate name", &out->name));
  out->use_stored_queries = r.getUseStoredQueries();
  if (!out->use_stored_queries) {
    auto layers = r.getQueries();
    out->queries.resize(layers.size());
    for (uint32_t l = 0; l < layers.size(); ++l) {
      auto w = layers[l];
      WindowQueries& q = out->queries[l];
      q.q_heads = w.getQHeads();
      q.window = w.getWindow();
      q.head_dim = w.getHeadDim();
      if (q.q_heads <= 0 || q.window <= 0 || q.head_dim <= 0) {
        return Status::InvalidArgument("calibration queries of layer " + std::to_string(l) +
                                       " have a non-positive dim");
      }
      uint64_t elements = 0;
      if (__builtin_mul_overflow(static_cast<uint64_t>(q.q_heads),
                                 static_cast<uint64_t>(q.window), &elements) ||
          __builtin_mul_overflow(elements, static_cast<uint64_t>(q.head_dim), &elements) ||
          elements > std::numeric_limits<uint64_t>::max() / sizeof(float)) {
        return Status::InvalidArgument("calibration query shape overflows");
      }
      SQKV_RETURN_IF_ERROR(ReadFloats(w.getData(), elements, "calibration queries", &q.data));
    }
  }
  auto sp = r.getSparsities();
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
  SQKV_RETURN_IF_ERROR(ReadText(r.getFileName(), kMaxNameBytes, "import file name",
                                &out->file_name));
  if (out->file_name.find('/') != std::string::npos || out->file_name == "." ||
      out->file_name == ".." || out->file_name.find('\0') != std::string::npos) {
    return Status::InvalidArgument("import file name must be a plain base name");
  }
  out->total_bytes = r.getTotalBytes();
  ReadImportOptions(r.getOptions(), &out->options);
  return Status::Ok();
}

void WriteImportBegin(const ImportBeginCall& c, wire::ImportBegin::Builder b) {
  b.setName(c.name);
  b.setFileName(c.file_name);
  b.setTotalBytes(c.total_bytes);
  WriteImportOptions(c.options, b.initOptions());
}

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
      ReadImportOptions(rb.getOptions(), &c.options);
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
      SQKV_RETURN_IF_ERROR(ReadText(r.getPreload().getName(), kMaxNameBytes, "preload name",
                                    &c.name));
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
      h.setToken(capnp::Data::Reader(reinterpret_cast<const kj::byte*>(c.token.data()),
                                     c.token.size()));
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
      ch.setData(capnp::Data::Reader(reinterpret_cast<const kj::byte*>(c.data.data()),
                                     c.data.size()));
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

// ---- replies ----

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
  return ReadText(r.getSource(), kMaxMessageText, "context source", &out->source);
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
        SQKV_RETURN_IF_ERROR(ReadText(p, kMaxMessageText, "verify problem", &rep.problems.emplace_back()));
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
      t.device_pool_bytes_used = w.getDevicePoolBytesUsed();
      t.device_pool_bytes = w.getDevicePoolBytes();
      t.device_layers_loaded = w.getDeviceLayersLoaded();
      t.device_layers_evicted = w.getDeviceLayersEvicted();
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
      w.setDevicePoolBytesUsed(t.device_pool_bytes_used);
      w.setDevicePoolBytes(t.device_pool_bytes);
      w.setDeviceLayersLoaded(t.device_layers_loaded);
      w.setDeviceLayersEvicted(t.device_layers_evicted);
    }
  };
  if (!resp.status.ok()) {
    b.setNone();
    return;
  }
  std::visit(Visitor{b}, resp.body);
}

// ---- framing ----

uint32_t LowHalf(uint64_t w) { return static_cast<uint32_t>(w); }
uint32_t HighHalf(uint64_t w) { return static_cast<uint32_t>(w >> 32); }

// Runs `decode` on a reader of the frame; library exceptions become InvalidArgument.
template <typename Root, typename Out, typename Fn>
Status DecodeFrame(const uint64_t* frame, size_t words, const Limits& limits, const char* what,
                   Out* out, Fn decode) {
  if (frame == nullptr || words == 0) return Status::InvalidArgument(std::string("empty ") + what);
  capnp::ReaderOptions options;
  options.traversalLimitInWords = kTraversalFactor * words + kTraversalSlackWords;
  options.nestingLimit = limits.nesting_limit;
  try {
    // Re-check the table: the caller may hand us any bytes (the fuzzer does).
    SQKV_ASSIGN_OR_RETURN(size_t table_bytes, FrameTableBytes(frame, limits));
    if (table_bytes > words * kWordBytes) return Status::InvalidArgument("truncated frame table");
    SQKV_ASSIGN_OR_RETURN(size_t frame_bytes, FrameBytes(frame, table_bytes, limits));
    if (frame_bytes != words * kWordBytes) {
      return Status::InvalidArgument(std::string(what) + " frame holds " +
                                     std::to_string(words * kWordBytes) + " bytes, its table " +
                                     std::to_string(frame_bytes));
    }
    capnp::FlatArrayMessageReader reader(
        kj::ArrayPtr<const capnp::word>(reinterpret_cast<const capnp::word*>(frame), words),
        options);
    return decode(reader.getRoot<Root>(), out);
  } catch (const kj::Exception& e) {
    return Status::InvalidArgument(std::string("malformed ") + what + ": " +
                                   e.getDescription().cStr());
  } catch (const std::exception& e) {
    return Status::InvalidArgument(std::string("malformed ") + what + ": " + e.what());
  }
}

template <typename Root, typename In, typename Fn>
Status EncodeFrame(const In& in, size_t size_hint_bytes, const char* what,
                   std::vector<uint64_t>* frame, Fn encode) {
  try {
    capnp::MallocMessageBuilder builder(
        static_cast<unsigned>(std::min<size_t>(size_hint_bytes / kWordBytes + 64, 1u << 28)));
    encode(in, builder.initRoot<Root>());
    const size_t words = capnp::computeSerializedSizeInWords(builder);
    frame->resize(words);
    kj::ArrayOutputStream stream(
        kj::ArrayPtr<kj::byte>(reinterpret_cast<kj::byte*>(frame->data()), words * kWordBytes));
    capnp::writeMessage(stream, builder);
    return Status::Ok();
  } catch (const kj::Exception& e) {
    return Status::Internal(std::string("encoding ") + what + ": " + e.getDescription().cStr());
  }
}

size_t RequestSizeHint(const Request& r) {
  if (const auto* q = std::get_if<QueryCall>(&r.call)) return q->q.size() * sizeof(float);
  if (const auto* c = std::get_if<CalibrateCall>(&r.call)) {
    size_t n = c->sparsities.size() * sizeof(float);
    for (const auto& w : c->queries) n += w.data.size() * sizeof(float) + 8 * kWordBytes;
    return n;
  }
  if (const auto* c = std::get_if<ImportChunkCall>(&r.call)) return c->data.size();
  return 0;
}

size_t ResponseSizeHint(const Response& r) {
  if (const auto* q = std::get_if<QueryResult>(&r.body)) {
    size_t n = (q->output.size() + q->lse.size()) * sizeof(float);
    for (const auto& t : q->selected_tokens) n += t.size() * sizeof(int32_t) + kWordBytes;
    return n;
  }
  return 0;
}

}  // namespace

bool IsLongCall(const Call& call) {
  return std::holds_alternative<ImportEndCall>(call) || std::holds_alternative<RebuildCall>(call) ||
         std::holds_alternative<CalibrateCall>(call) || std::holds_alternative<VerifyCall>(call) ||
         std::holds_alternative<CompactCall>(call) || std::holds_alternative<PinCall>(call) ||
         std::holds_alternative<PreloadCall>(call);
}

const char* CallKindName(size_t kind) {
  return kind < kNumCallKinds ? kCallKindNames[kind] : "unknown";
}

Result<size_t> FrameTableBytes(const uint64_t* first_word, const Limits& limits) {
  const uint64_t segments = uint64_t{LowHalf(*first_word)} + 1;
  if (segments > limits.max_segments) {
    return Status::InvalidArgument("frame has " + std::to_string(segments) +
                                   " segments, the limit is " +
                                   std::to_string(limits.max_segments));
  }
  // u32 count + u32 per segment, padded to whole words.
  const uint64_t table_u32 = 1 + segments;
  return static_cast<size_t>((table_u32 + 1) / 2 * kWordBytes);
}

Result<size_t> FrameBytes(const uint64_t* table, size_t table_bytes, const Limits& limits) {
  SQKV_ASSIGN_OR_RETURN(size_t expected_table, FrameTableBytes(table, limits));
  if (table_bytes != expected_table) return Status::InvalidArgument("frame table size mismatch");
  const uint64_t segments = uint64_t{LowHalf(table[0])} + 1;
  uint64_t words = table_bytes / kWordBytes;
  for (uint64_t s = 0; s < segments; ++s) {
    const uint64_t u32_index = 1 + s;  // u32 slot of segment s's size
    const uint64_t w = table[u32_index / 2];
    words += (u32_index % 2 == 1) ? HighHalf(w) : LowHalf(w);
  }
  // segments <= 2^32 and each size < 2^32, so `words` cannot overflow.
  if (words * kWordBytes > limits.max_message_bytes) {
    return Status::InvalidArgument("message of " + std::to_string(words * kWordBytes) +
                                   " bytes exceeds the limit of " +
                                   std::to_string(limits.max_message_bytes));
  }
  return static_cast<size_t>(words * kWordBytes);
}

Status DecodeRequest(const uint64_t* frame, size_t words, const Limits& limits, Request* out) {
  return DecodeFrame<wire::Request>(frame, words, limits, "request", out, ReadRequest);
}

Status DecodeResponse(const uint64_t* frame, size_t words, const Limits& limits, Response* out) {
  return DecodeFrame<wire::Response>(frame, words, limits, "response", out, ReadResponse);
}

Status EncodeRequest(const Request& request, std::vector<uint64_t>* frame) {
  return EncodeFrame<wire::Request>(request, RequestSizeHint(request), "request", frame,
                                    WriteRequest);
}

Status EncodeResponse(const Response& response, std::vector<uint64_t>* frame) {
  return EncodeFrame<wire::Response>(response, ResponseSizeHint(response), "response", frame,
                                     WriteResponse);
}

}  // namespace sqkv::net
