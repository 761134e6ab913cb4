// Authentication: with a token, a connection must say hello with it before any call; a missing
// or wrong token gets an error and a closed connection; the comparison is constant-time.
#include <gtest/gtest.h>

#include "api/net/session_calls.h"
#include "tests/net/net_testing.h"

namespace sqkv::net {
namespace {

using testing::LiveServer;
using testing::MalformedQuery;
using testing::RawSocket;

constexpr char kToken[] = "s3cret-token-0123456789";

ServerOptions WithToken() {
  ServerOptions o;
  o.auth_token = kToken;
  return o;
}

TEST(AuthTest, RightTokenWorksWrongOrMissingTokenIsRefused) {
  LiveServer live(WithToken());
  std::unique_ptr<Store> remote;
  ASSERT_TRUE(ConnectStore(live.address(), kToken, &remote).ok());
  std::vector<ContextInfo> all;
  EXPECT_TRUE(remote->List(&all).ok());

  for (const std::string& bad : {std::string(""), std::string("s3cret-token-0123456788"),
                                 std::string("s3cret"), std::string(kToken) + "x"}) {
    std::unique_ptr<Store> refused;
    Status s = ConnectStore(live.address(), bad, &refused);
    EXPECT_TRUE(s.IsUnavailable()) << bad << ": " << s.ToString();
    EXPECT_NE(s.message().find("authentication"), std::string::npos) << s.ToString();
    EXPECT_EQ(refused, nullptr);
  }
}

TEST(AuthTest, CallsBeforeHelloAreRefusedAndTheConnectionClosed) {
  LiveServer live(WithToken());
  RawSocket sock(live.address());
  ASSERT_TRUE(sock.ok());
  ASSERT_TRUE(sock.SendRequest(Request{5, 0, ListCall{}}));
  Response r;
  ASSERT_TRUE(sock.ReadResponse(&r));
  EXPECT_EQ(r.id, 5u);
  EXPECT_TRUE(r.status.IsUnavailable());
  EXPECT_NE(r.status.message().find("authentication required"), std::string::npos);
  EXPECT_TRUE(sock.ClosedByPeer());

  // Refused on its id and kind alone: the rest is not decoded (this query's shape is wrong).
  RawSocket undecoded(live.address());
  ASSERT_TRUE(undecoded.SendRequest(Request{6, 0, MalformedQuery()}));
  ASSERT_TRUE(undecoded.ReadResponse(&r));
  EXPECT_EQ(r.id, 6u);
  EXPECT_TRUE(r.status.IsUnavailable()) << r.status.ToString();
  EXPECT_NE(r.status.message().find("authentication required"), std::string::npos);
  EXPECT_TRUE(undecoded.ClosedByPeer());

  RawSocket wrong(live.address());
  ASSERT_TRUE(wrong.SendRequest(Request{1, 0, HelloCall{kProtocolVersion, "nope", "test"}}));
  ASSERT_TRUE(wrong.ReadResponse(&r));
  EXPECT_TRUE(r.status.IsUnavailable());
  EXPECT_TRUE(wrong.ClosedByPeer());

  RawSocket right(live.address());
  ASSERT_TRUE(right.SendRequest(Request{1, 0, HelloCall{kProtocolVersion, kToken, "test"}}));
  ASSERT_TRUE(right.ReadResponse(&r));
  ASSERT_TRUE(r.status.ok()) << r.status.ToString();
  EXPECT_TRUE(std::holds_alternative<HelloReply>(r.body));
  ASSERT_TRUE(right.SendRequest(Request{2, 0, ListCall{}}));
  ASSERT_TRUE(right.ReadResponse(&r));
  EXPECT_TRUE(r.status.ok());
  EXPECT_EQ(r.id, 2u);
}

TEST(AuthTest, ALargeMessageBeforeHelloIsRefusedUnread) {
  LiveServer live(WithToken());
  RawSocket sock(live.address());
  ASSERT_TRUE(sock.ok());
  // A segment table announcing 1 MiB, and nothing more: answered at once, without waiting for
  // (or reserving room for) the body.
  const uint32_t header[2] = {0, (1u << 20) / 8};
  ASSERT_TRUE(sock.Send(header, sizeof(header)));
  Response r;
  ASSERT_TRUE(sock.ReadResponse(&r, std::chrono::seconds(5)));
  EXPECT_TRUE(r.status.IsUnavailable()) << r.status.ToString();
  EXPECT_NE(r.status.message().find("before hello"), std::string::npos) << r.status.ToString();
  EXPECT_TRUE(sock.ClosedByPeer());
  // Without a token the same header is simply read on.
  LiveServer open_server;
  RawSocket open_sock(open_server.address());
  ASSERT_TRUE(open_sock.Send(header, sizeof(header)));
  EXPECT_FALSE(open_sock.ReadResponse(&r, std::chrono::milliseconds(300)));
  // The token holder is served as before.
  std::unique_ptr<Store> remote;
  ASSERT_TRUE(ConnectStore(live.address(), kToken, &remote).ok());
  std::vector<ContextInfo> all;
  EXPECT_TRUE(remote->List(&all).ok());
}

TEST(AuthTest, WrongProtocolVersionIsRefused) {
  LiveServer live;
  RawSocket sock(live.address());
  ASSERT_TRUE(sock.SendRequest(Request{1, 0, HelloCall{kProtocolVersion + 1, "", "future"}}));
  Response r;
  ASSERT_TRUE(sock.ReadResponse(&r));
  EXPECT_TRUE(r.status.IsInvalidArgument());
  EXPECT_TRUE(sock.ClosedByPeer());
}

TEST(AuthTest, WithoutATokenHelloIsOptional) {
  LiveServer live;
  RawSocket sock(live.address());
  ASSERT_TRUE(sock.SendRequest(Request{3, 0, ListCall{}}));
  Response r;
  ASSERT_TRUE(sock.ReadResponse(&r));
  EXPECT_TRUE(r.status.ok());
}

TEST(AuthTest, TokenComparison) {
  EXPECT_TRUE(TokensEqual("abc", "abc"));
  EXPECT_FALSE(TokensEqual("abd", "abc"));
  EXPECT_FALSE(TokensEqual("ab", "abc"));
  EXPECT_FALSE(TokensEqual("abcabc", "abc"));  // a repeat of the secret is not the secret
  EXPECT_FALSE(TokensEqual("", "abc"));
  EXPECT_TRUE(TokensEqual("", ""));
  EXPECT_FALSE(TokensEqual("x", ""));
}

}  // namespace
}  // namespace sqkv::net
