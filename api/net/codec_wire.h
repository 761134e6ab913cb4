// Private: conversions between the plain messages (api/net/messages.h) and their Cap'n Proto
// form (api/net/sqkv.capnp), shared by codec.cc (framing), codec_calls.cc (requests) and
// codec_replies.cc (responses). Readers may throw kj::Exception on malformed input; codec.cc
// catches it.
#pragma once

#include <capnp/message.h>

#include <string>
#include <vector>

#include "api/net/messages.h"
#include "api/net/sqkv.capnp.h"

namespace sqkv::net::wire_io {

// Longest text fields we accept: names (the store allows 128), tokens, descriptions, messages.
inline constexpr size_t kMaxNameBytes = 1024;
inline constexpr size_t kMaxFileNameBytes = 255;  // an upload's file name (NAME_MAX)
inline constexpr size_t kMaxTokenBytes = 4096;
inline constexpr size_t kMaxMessageText = 64 * 1024;
// Longest lists a request may carry: layers of calibration queries (models have a few hundred at
// most), and target sparsities of one calibration.
inline constexpr size_t kMaxLayers = 4096;
inline constexpr size_t kMaxSparsities = 1024;

Status ReadText(capnp::Text::Reader t, size_t max_bytes, const char* field, std::string* out);
// data: `expected` float32 little-endian → out.
Status ReadFloats(capnp::Data::Reader data, uint64_t expected, const char* field,
                  std::vector<float>* out);
void WriteFloats(const std::vector<float>& v, capnp::Data::Builder data);
// a * b * c as an element count that fits in bytes of float32; false on overflow.
bool ElementCount(int64_t a, int64_t b, int64_t c, uint64_t* out);

wire::Device ToWire(Device d);
Status FromWire(wire::Device d, Device* out);
wire::Tier ToWire(Tier t);
Status FromWire(wire::Tier t, Tier* out);
wire::SelectMode ToWire(SelectOptions::Mode m);
Status FromWire(wire::SelectMode m, SelectOptions::Mode* out);
wire::StatusCode ToWire(Status::Code c);
Status FromWire(wire::StatusCode c, std::string message);

// codec_calls.cc
Status ReadRequest(wire::Request::Reader r, Request* out);
void WriteRequest(const Request& req, wire::Request::Builder b);
// codec_replies.cc
Status ReadResponse(wire::Response::Reader r, Response* out);
void WriteResponse(const Response& resp, wire::Response::Builder b);

}  // namespace sqkv::net::wire_io
