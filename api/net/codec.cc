// Framing and the entry points of the codec. Every reader access may throw kj::Exception on a
// malformed message, so decoding copies the whole message into plain values inside one try
// block here; nothing outside the codec files touches a Cap'n Proto reader or builder.
#include "api/net/codec.h"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/io.h>

#include <algorithm>
#include <bit>

#include "api/net/codec_wire.h"

namespace sqkv::net {

static_assert(std::endian::native == std::endian::little,
              "the wire carries little-endian floats and framing; this host is big-endian");
static_assert(kProtocolVersion == wire::PROTOCOL_VERSION, "messages.h and sqkv.capnp disagree");

namespace {

// The traversal limit is this many times the frame's words (plus a little for tiny frames): a
// well-formed message is read once, an aliasing one cannot make the decoder do more than this.
constexpr uint64_t kTraversalFactor = 2;
constexpr uint64_t kTraversalSlackWords = 64;

const char* const kCallKindNames[kNumCallKinds] = {
    "hello",          "query",        "list",       "info",      "remove",
    "import_begin",   "import_chunk", "import_end", "rebuild",   "calibrate",
    "get_thresholds", "verify",       "compact",    "stats",     "pin",
    "unpin",          "preload",      "list_pins",  "tier_stats"};

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
  return DecodeFrame<wire::Request>(frame, words, limits, "request", out, wire_io::ReadRequest);
}

Status PeekRequest(const uint64_t* frame, size_t words, const Limits& limits, RequestHead* out) {
  return DecodeFrame<wire::Request>(frame, words, limits, "request", out,
                                    [](wire::Request::Reader r, RequestHead* head) {
                                      head->id = r.getId();
                                      head->is_hello = r.which() == wire::Request::HELLO;
                                      return Status::Ok();
                                    });
}

Status DecodeResponse(const uint64_t* frame, size_t words, const Limits& limits, Response* out) {
  return DecodeFrame<wire::Response>(frame, words, limits, "response", out, wire_io::ReadResponse);
}

Status EncodeRequest(const Request& request, std::vector<uint64_t>* frame) {
  return EncodeFrame<wire::Request>(request, RequestSizeHint(request), "request", frame,
                                    wire_io::WriteRequest);
}

Status EncodeResponse(const Response& response, std::vector<uint64_t>* frame) {
  return EncodeFrame<wire::Response>(response, ResponseSizeHint(response), "response", frame,
                                     wire_io::WriteResponse);
}

}  // namespace sqkv::net
