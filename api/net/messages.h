// Private: the protocol's messages as plain C++ values (api/net/sqkv.capnp is the wire form;
// api/net/codec.h converts). The server and the client work on these only, so Cap'n Proto
// readers and builders, and the exceptions they throw, stay inside codec.cc.
#pragma once

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include "api/store.h"
#include "common/status.h"

namespace sqkv::net {

// Must equal sqkv.capnp's protocolVersion (checked in codec.cc).
inline constexpr uint32_t kProtocolVersion = 2;

// What a decoder accepts. Both ends apply them to every message they read.
struct Limits {
  // Largest frame (segment table + segments). Default: 256 MiB.
  uint64_t max_message_bytes = uint64_t{256} << 20;
  // Largest segment count in a frame's table. Default: 64 (our writers use a handful).
  uint32_t max_segments = 64;
  // Pointer nesting depth; the schema needs 4. Default: 16.
  int nesting_limit = 16;
};

// ---- Calls (client → server) ----

struct HelloCall {
  uint32_t protocol_version = kProtocolVersion;
  std::string token;   // empty without a token
  std::string client;  // free-form, e.g. "sqkv-cli 0.1.0"
};

struct QueryCall {
  std::string name;
  int32_t layer = 0;
  int32_t q_heads = 0, n = 0, head_dim = 0;
  std::vector<float> q;  // (q_heads, n, head_dim)
  QueryOptions options;
};

struct ListCall {};
struct InfoCall {
  std::string name;
};
struct RemoveCall {
  std::string name;
};

struct ImportBeginCall {
  std::string name;
  std::string file_name;  // base name only
  uint64_t total_bytes = 0;
  ImportOptions options;  // progress and on_stage are not carried
};

struct ImportChunkCall {
  uint64_t upload_id = 0;
  uint64_t offset = 0;
  std::string data;
};

struct ImportEndCall {
  uint64_t upload_id = 0;
};

struct RebuildCall {
  std::string name;
  ImportOptions options;  // progress and on_stage are not carried
};

struct CalibrateCall {
  std::string name;
  bool use_stored_queries = true;      // the window queries kept at import
  std::vector<WindowQueries> queries;  // (layers) when !use_stored_queries
  std::vector<float> sparsities;
};

struct GetThresholdsCall {
  std::string name;
  int32_t layer = 0;
};

struct VerifyCall {
  std::string name;  // empty: every context
};
struct CompactCall {};
struct StatsCall {};

struct PinCall {
  std::string name;
  Tier tier = Tier::kHost;
};
struct UnpinCall {
  std::string name;
};
struct PreloadCall {
  std::string name;
  Tier tier = Tier::kHost;
};
struct ListPinsCall {};
struct TierStatsCall {};

using Call = std::variant<HelloCall, QueryCall, ListCall, InfoCall, RemoveCall, ImportBeginCall,
                          ImportChunkCall, ImportEndCall, RebuildCall, CalibrateCall,
                          GetThresholdsCall, VerifyCall, CompactCall, StatsCall, PinCall, UnpinCall,
                          PreloadCall, ListPinsCall, TierStatsCall>;

// Index of each call kind in Call, for tables (metrics) indexed by kind.
inline constexpr size_t kNumCallKinds = std::variant_size_v<Call>;
// "hello", "query", "list", "info", "remove", "import_begin", "import_chunk", "import_end",
// "rebuild", "calibrate", "get_thresholds", "verify", "compact", "stats", "pin", "unpin",
// "preload", "list_pins", "tier_stats".
const char* CallKindName(size_t kind);

// Calls that may run for minutes (indexing, whole-store scans, loading a context into a tier):
// no default deadline, and they report progress where the store does.
bool IsLongCall(const Call& call);

struct Request {
  uint64_t id = 0;
  uint32_t deadline_ms = 0;  // 0: the server's default
  Call call;
};

// ---- Replies (server → client) ----

struct HelloReply {
  uint32_t protocol_version = kProtocolVersion;
  std::string server;
  uint64_t max_message_bytes = 0;
};

struct ImportBeginReply {
  uint64_t upload_id = 0;
  uint32_t chunk_bytes = 0;
};

struct ProgressReply {
  int32_t done = 0, total = 0;
};

using PinList = std::vector<std::pair<std::string, Tier>>;

using Body = std::variant<std::monostate, HelloReply, QueryResult, std::vector<ContextInfo>,
                          ContextInfo, ImportBeginReply, ProgressReply, Thresholds, VerifyReport,
                          CompactReport, StoreStats, PinList, TierStats>;

struct Response {
  uint64_t id = 0;
  Status status;  // not OK → body is monostate
  Body body;
};

}  // namespace sqkv::net
