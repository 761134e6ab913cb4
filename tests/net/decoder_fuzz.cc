// libFuzzer target for the message decoder (api/net/codec.h): any bytes, read the way the server
// reads a stream (table, then frame) and as one whole frame, must decode or fail cleanly; what
// decodes must encode again and decode to the same call.
//
// Built with clang++ -fsanitize=fuzzer,address,undefined (tests/net/CMakeLists.txt); CI runs it
// for a bounded time from the seeds in tests/net/fuzz_corpus/.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "api/net/codec.h"

namespace {

// Decodes `words` as a request and, if that works, checks encode → decode is stable.
void CheckRequest(const uint64_t* words, size_t n, const sqkv::net::Limits& limits) {
  sqkv::net::Request request;
  if (!sqkv::net::DecodeRequest(words, n, limits, &request).ok()) return;
  std::vector<uint64_t> again;
  if (!sqkv::net::EncodeRequest(request, &again).ok()) std::abort();
  sqkv::net::Request twice;
  sqkv::net::Limits roomy = limits;
  roomy.max_message_bytes = again.size() * sqkv::net::kWordBytes;
  if (!sqkv::net::DecodeRequest(again.data(), again.size(), roomy, &twice).ok()) std::abort();
  if (twice.id != request.id || twice.call.index() != request.call.index()) std::abort();
}

void CheckResponse(const uint64_t* words, size_t n, const sqkv::net::Limits& limits) {
  sqkv::net::Response response;
  if (!sqkv::net::DecodeResponse(words, n, limits, &response).ok()) return;
  std::vector<uint64_t> again;
  if (!sqkv::net::EncodeResponse(response, &again).ok()) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  sqkv::net::Limits limits;
  limits.max_message_bytes = 1 << 20;
  // A stream reader copies what it reads into word-aligned buffers; so do we.
  std::vector<uint64_t> words((size + sqkv::net::kWordBytes - 1) / sqkv::net::kWordBytes);
  if (size > 0) std::memcpy(words.data(), data, size);
  const size_t have = words.size() * sqkv::net::kWordBytes;

  // As the server reads a stream: first word, table, then exactly the frame it announces.
  if (!words.empty()) {
    auto table = sqkv::net::FrameTableBytes(words.data(), limits);
    if (table.ok() && *table <= have) {
      auto total = sqkv::net::FrameBytes(words.data(), *table, limits);
      if (total.ok() && *total <= have) {
        CheckRequest(words.data(), *total / sqkv::net::kWordBytes, limits);
        CheckResponse(words.data(), *total / sqkv::net::kWordBytes, limits);
      }
    }
  }
  // The whole input as one frame (the decoder re-checks the table itself).
  CheckRequest(words.data(), words.size(), limits);
  CheckResponse(words.data(), words.size(), limits);
  return 0;
}
