// Private: Cap'n Proto stream framing and the conversion of messages (api/net/messages.h) to and
// from it. Every input is untrusted: any malformed frame or message is an InvalidArgument, never
// an exception or a crash (api/net/sqkv.capnp describes the wire form).
//
// A frame, in 64-bit words, little-endian:
//   u32 segment_count - 1, u32 size of segment 0 (words), u32 sizes of segments 1.. ,
//   padding to a word boundary, then the segments back to back.
// Reading one from a stream: read 8 bytes, FrameTableBytes(); read the rest of the table,
// FrameBytes(); read the rest of the frame; DecodeRequest() / DecodeResponse() on all of it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "api/net/messages.h"
#include "common/status.h"

namespace sqkv::net {

inline constexpr size_t kWordBytes = 8;

// first_word: the frame's first 8 bytes. Returns the size in bytes of the whole segment table
// (a multiple of 8, at least 8). InvalidArgument if the segment count exceeds the limit.
Result<size_t> FrameTableBytes(const uint64_t* first_word, const Limits& limits);

// table: (table_bytes / 8) words, the whole segment table. Returns the frame's total size in bytes
// (table included). InvalidArgument if it exceeds limits.max_message_bytes.
Result<size_t> FrameBytes(const uint64_t* table, size_t table_bytes, const Limits& limits);

// frame: (words) one whole frame. Decodes and checks every field (shapes against data sizes,
// name lengths); the result owns copies of all it needs.
Status DecodeRequest(const uint64_t* frame, size_t words, const Limits& limits, Request* out);
Status DecodeResponse(const uint64_t* frame, size_t words, const Limits& limits, Response* out);

// Reads only a request's id and whether its call is hello; nothing else of the frame is decoded
// (for connections that have not authenticated yet).
struct RequestHead {
  uint64_t id = 0;
  bool is_hello = false;
};
Status PeekRequest(const uint64_t* frame, size_t words, const Limits& limits, RequestHead* out);

// Writes one whole frame to *frame (replacing its contents). Internal if the message cannot be
// built (e.g. a list longer than Cap'n Proto allows).
Status EncodeRequest(const Request& request, std::vector<uint64_t>* frame);
Status EncodeResponse(const Response& response, std::vector<uint64_t>* frame);

}  // namespace sqkv::net
