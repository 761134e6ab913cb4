// Untrusted bytes against a live server on 127.0.0.1: random bytes, random frames, truncated
// frames, oversized headers and valid frames with flipped bits get an error answer or a closed
// connection, never a crash; a client connected all along keeps getting right answers.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <random>
#include <thread>

#include "tests/net/net_testing.h"

namespace sqkv::net {
namespace {

using sqkv::testing::FreshSeed;
using sqkv::testing::RandomNormal;
using testing::ImportSynthetic;
using testing::LiveServer;
using testing::MalformedQuery;
using testing::RawSocket;
using testing::SmallContext;

// Bounded: each round is one connection; the whole test is a few seconds.
constexpr int kRounds = 300;
constexpr auto kAnswerTimeout = std::chrono::seconds(5);
// The bystander asks its query every this many rounds.
constexpr int kBystanderEvery = 10;

ServerOptions Hardened() {
  ServerOptions o;
  o.max_message_bytes = 1 << 20;
  o.chunk_bytes = 1 << 16;
  o.io_timeout_ms = 300;  // a frame that stops halfway is dropped quickly
  return o;
}

TEST(GarbageTest, RandomBytesNeverHurtTheServerOrOtherConnections) {
  LiveServer live(Hardened());
  const uint64_t seed = FreshSeed();
  std::mt19937_64 rng(seed);
  const SyntheticOptions ctx = SmallContext(seed);
  std::vector<float> q;
  ImportSynthetic(live.store(), live.dir(), "doc", ctx, &q);
  QueryResult expected;
  ASSERT_TRUE(live.store()
                  ->Query("doc", 0, q.data(), ctx.q_heads, ctx.n, ctx.head_dim, {}, &expected)
                  .ok());
  auto bystander = live.Connect();  // connected during the whole attack

  QueryCall valid;
  valid.name = "doc";
  valid.q_heads = ctx.q_heads;
  valid.n = ctx.n;
  valid.head_dim = ctx.head_dim;
  valid.q = q;
  std::vector<uint64_t> valid_frame;
  ASSERT_TRUE(EncodeRequest(Request{1, 0, valid}, &valid_frame).ok());

  int answered = 0, bystander_answers = 0;
  for (int round = 0; round < kRounds; ++round) {
    RawSocket sock(live.address());
    ASSERT_TRUE(sock.ok()) << "round " << round << ": the server stopped accepting";
    std::vector<uint8_t> bytes;
    switch (round % 5) {
      case 0: {  // pure noise
        bytes.resize(1 + rng() % 4096);
        for (auto& b : bytes) b = static_cast<uint8_t>(rng());
        break;
      }
      case 1: {  // a plausible table, random segments
        const uint32_t words = 1 + static_cast<uint32_t>(rng() % 256);
        bytes.resize(8 + words * 8);
        const uint32_t zero = 0;
        std::memcpy(bytes.data(), &zero, 4);
        std::memcpy(bytes.data() + 4, &words, 4);
        for (size_t i = 8; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(rng());
        break;
      }
      case 2: {  // a valid request with flipped bits
        bytes.resize(valid_frame.size() * 8);
        std::memcpy(bytes.data(), valid_frame.data(), bytes.size());
        for (int f = 0; f < 1 + static_cast<int>(rng() % 8); ++f) {
          const size_t bit = rng() % (bytes.size() * 8);
          bytes[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
        }
        break;
      }
      case 3: {  // a valid request cut short (the server sees the end, or times out)
        bytes.resize(valid_frame.size() * 8);
        std::memcpy(bytes.data(), valid_frame.data(), bytes.size());
        bytes.resize(rng() % bytes.size());
        break;
      }
      case 4: {  // a header announcing far more than the limit
        const uint32_t header[2] = {0, 0x7fffffff};
        bytes.resize(8);
        std::memcpy(bytes.data(), header, 8);
        break;
      }
    }
    sock.Send(bytes.data(), bytes.size());  // may fail when the server already hung up
    // Mostly the sender then goes away; every 50th round it stays silent instead, so the server's
    // I/O deadline has to drop it (that costs io_timeout_ms, hence not every round).
    if (round % 50 != 3) sock.ShutdownWrite();
    // Otherwise an error, or the answer to a request a bit flip left valid (id included), or
    // a closed connection: any is fine, as long as the server goes on (next round, bystander).
    Response r;
    const bool got_answer = sock.ReadResponse(&r, kAnswerTimeout);
    if (got_answer) ++answered;
    if (round % 5 == 4) {  // an oversized header is always answered, then the connection closed
      ASSERT_TRUE(got_answer) << "round " << round;
      EXPECT_TRUE(r.status.IsInvalidArgument()) << r.status.ToString();
      EXPECT_NE(r.status.message().find("exceeds the limit"), std::string::npos)
          << r.status.ToString();
      EXPECT_TRUE(sock.ClosedByPeer());
    }
    if (round % kBystanderEvery == kBystanderEvery - 1) {
      QueryResult got;
      Status s = bystander->Query("doc", 0, q.data(), ctx.q_heads, ctx.n, ctx.head_dim, {}, &got);
      ASSERT_TRUE(s.ok()) << "round " << round << ": " << s.ToString();
      ASSERT_EQ(got.output.size(), expected.output.size());
      EXPECT_EQ(std::memcmp(got.output.data(), expected.output.data(),
                            expected.output.size() * sizeof(float)),
                0);
      ++bystander_answers;
    }
  }
  EXPECT_EQ(bystander_answers, kRounds / kBystanderEvery);
  EXPECT_GE(answered, kRounds / 5);  // at least the oversized headers
}

TEST(GarbageTest, ADecodableButWrongRequestKeepsTheConnection) {
  LiveServer live(Hardened());
  RawSocket sock(live.address());
  // Shape and data disagree: decoded, refused, connection kept.
  ASSERT_TRUE(sock.SendRequest(Request{4, 0, MalformedQuery()}));
  Response r;
  ASSERT_TRUE(sock.ReadResponse(&r));
  EXPECT_EQ(r.id, 0u);
  EXPECT_TRUE(r.status.IsInvalidArgument());
  ASSERT_TRUE(sock.SendRequest(Request{5, 0, ListCall{}}));
  ASSERT_TRUE(sock.ReadResponse(&r));
  EXPECT_EQ(r.id, 5u);
  EXPECT_TRUE(r.status.ok());
}

TEST(GarbageTest, UploadsRefuseGapsOverrunsAndStrangers) {
  LiveServer live(Hardened());
  RawSocket sock(live.address());
  ImportBeginCall begin;
  begin.name = "doc";
  begin.file_name = "doc.safetensors";
  begin.total_bytes = 100;
  ASSERT_TRUE(sock.SendRequest(Request{1, 0, begin}));
  Response r;
  ASSERT_TRUE(sock.ReadResponse(&r));
  ASSERT_TRUE(r.status.ok()) << r.status.ToString();
  const uint64_t id = std::get<ImportBeginReply>(r.body).upload_id;
  // A chunk with a gap breaks the upload.
  ASSERT_TRUE(sock.SendRequest(Request{2, 0, ImportChunkCall{id, 10, std::string(5, 'x')}}));
  ASSERT_TRUE(sock.ReadResponse(&r));
  EXPECT_TRUE(r.status.IsInvalidArgument());
  ASSERT_TRUE(sock.SendRequest(Request{3, 0, ImportEndCall{id}}));
  ASSERT_TRUE(sock.ReadResponse(&r));
  EXPECT_TRUE(r.status.IsNotFound());
  // Past the announced size.
  begin.total_bytes = 4;
  ASSERT_TRUE(sock.SendRequest(Request{4, 0, begin}));
  ASSERT_TRUE(sock.ReadResponse(&r));
  const uint64_t id2 = std::get<ImportBeginReply>(r.body).upload_id;
  ASSERT_TRUE(sock.SendRequest(Request{5, 0, ImportChunkCall{id2, 0, std::string(5, 'x')}}));
  ASSERT_TRUE(sock.ReadResponse(&r));
  EXPECT_TRUE(r.status.IsInvalidArgument());
  // Another connection cannot touch this connection's uploads.
  ASSERT_TRUE(sock.SendRequest(Request{6, 0, begin}));
  ASSERT_TRUE(sock.ReadResponse(&r));
  const uint64_t id3 = std::get<ImportBeginReply>(r.body).upload_id;
  RawSocket other(live.address());
  ASSERT_TRUE(other.SendRequest(Request{7, 0, ImportEndCall{id3}}));
  ASSERT_TRUE(other.ReadResponse(&r));
  EXPECT_TRUE(r.status.IsNotFound());
  // An announced size over the server's limit, and a bad name.
  begin.total_bytes = uint64_t{1} << 62;
  ASSERT_TRUE(sock.SendRequest(Request{8, 0, begin}));
  ASSERT_TRUE(sock.ReadResponse(&r));
  EXPECT_TRUE(r.status.IsInvalidArgument());
  begin.total_bytes = 4;
  begin.name = "-x";
  ASSERT_TRUE(sock.SendRequest(Request{9, 0, begin}));
  ASSERT_TRUE(sock.ReadResponse(&r));
  EXPECT_TRUE(r.status.IsInvalidArgument());
}

}  // namespace
}  // namespace sqkv::net

namespace sqkv::net {
namespace {

TEST(GarbageTest, LargeMessagesShareABudget) {
  ServerOptions o;
  o.max_message_bytes = 4 << 20;
  o.chunk_bytes = 1 << 16;
  o.max_inflight_message_bytes = 2 << 20;  // read and counted 128 KiB at a time
  LiveServer live(o);
  constexpr uint32_t kWords = (3 << 20) / 2 / 8;  // 1.5 MiB announced
  const uint32_t header[2] = {0, kWords};
  const std::vector<char> body(size_t{kWords} * 8, '\x01');
  // A hog that sent 1 MiB of its message and stalls holds that and the step it waits on.
  RawSocket hog(live.address());
  ASSERT_TRUE(hog.Send(header, sizeof(header)));
  ASSERT_TRUE(hog.Send(body.data(), (1 << 20) + 4096));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));

  // A second 1.5 MiB message does not fit beside it: refused once the budget runs out (its
  // sending may break off there), then closed.
  RawSocket second(live.address());
  ASSERT_TRUE(second.Send(header, sizeof(header)));
  second.Send(body.data(), body.size());
  Response r;
  ASSERT_TRUE(second.ReadResponse(&r));
  EXPECT_TRUE(r.status.IsUnavailable()) << r.status.ToString();
  EXPECT_NE(r.status.message().find("busy"), std::string::npos);
  EXPECT_TRUE(second.ClosedByPeer());

  hog.ShutdownWrite();  // the hog goes away: its reservation is returned
  EXPECT_TRUE(hog.ClosedByPeer());

  // Clients that announce large messages and send nothing more hold one step each, not what they
  // announce (four such held the whole budget, and the message below was refused).
  std::vector<std::unique_ptr<RawSocket>> idle;
  for (int i = 0; i < 4; ++i) {
    idle.push_back(std::make_unique<RawSocket>(live.address()));
    ASSERT_TRUE(idle.back()->Send(header, sizeof(header)));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  RawSocket third(live.address());
  ASSERT_TRUE(third.Send(header, sizeof(header)));
  third.Send(body.data(), body.size());
  ASSERT_TRUE(third.ReadResponse(&r));
  EXPECT_TRUE(r.status.IsInvalidArgument()) << r.status.ToString();  // read, then undecodable
}

}  // namespace
}  // namespace sqkv::net
