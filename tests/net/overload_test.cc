// Calls that outlive their deadline, queued calls and long lists: a connection has at most one
// call on the workers (it reads its next request only once an abandoned call has ended); a call
// still queued when its deadline passes, or when the server stops, is never started; a request
// with an over-long list is refused and the server goes on.
#include <gtest/gtest.h>

#include <thread>

#include "tests/net/net_testing.h"

namespace sqkv::net {
namespace {

using sqkv::testing::FreshSeed;
using testing::ImportSynthetic;
using testing::LiveServer;
using testing::RawSocket;
using testing::SlowStore;
using testing::SmallContext;

// How long each query sleeps: short where a test runs several, long where a test needs time to
// line things up while one runs.
constexpr auto kShortQuery = std::chrono::milliseconds(300);
constexpr auto kLongQuery = std::chrono::milliseconds(1000);
constexpr uint32_t kLongDeadlineMs = 20000;

// A store with one small context "doc", served through a SlowStore; query() is a valid query.
class SlowServer {
 public:
  SlowServer(ServerOptions options, std::chrono::milliseconds query_delay) {
    Status s = Store::Open(StoreOptions{.data_dir = dir_.file("data")}, &inner_);
    EXPECT_TRUE(s.ok()) << s.ToString();
    const SyntheticOptions ctx = SmallContext(FreshSeed());
    std::vector<float> q;
    ImportSynthetic(inner_.get(), dir_.path().string(), "doc", ctx, &q);
    query_.name = "doc";
    query_.q_heads = ctx.q_heads;
    query_.n = ctx.n;
    query_.head_dim = ctx.head_dim;
    query_.q = q;
    slow_ = std::make_unique<SlowStore>(inner_.get(), query_delay);
    options.upload_dir = dir_.file("uploads");
    live_ = std::make_unique<LiveServer>(slow_.get(), options);
  }

  LiveServer& live() { return *live_; }
  SlowStore& slow() { return *slow_; }
  const QueryCall& query() const { return query_; }

  // Waits (bounded: 10 s) until `n` queries have started on a worker.
  void WaitForQueries(int n) {
    for (int i = 0; i < 1000 && slow_->entered() < n; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    ASSERT_EQ(slow_->entered(), n);
  }

 private:
  sqkv::testing::ScratchDir dir_;
  std::unique_ptr<Store> inner_;
  std::unique_ptr<SlowStore> slow_;
  std::unique_ptr<LiveServer> live_;
  QueryCall query_;
};

bool IsDeadlineAnswer(const Response& r) {
  return r.status.IsUnavailable() && r.status.message().find("deadline") != std::string::npos;
}

TEST(OverloadTest, AConnectionHasAtMostOneCallOnTheWorkers) {
  ServerOptions options;
  options.workers = 4;
  SlowServer server(options, kShortQuery);
  RawSocket sock(server.live().address());
  ASSERT_TRUE(sock.ok());
  // Each query is answered at its 20 ms deadline; the next one is read only once the one before
  // has ended on its worker (before, they piled up on the workers, one per answer).
  constexpr int kQueries = 5;
  for (int i = 0; i < kQueries; ++i) {
    ASSERT_TRUE(sock.SendRequest(Request{static_cast<uint64_t>(i + 1), 20, server.query()}));
    Response r;
    ASSERT_TRUE(sock.ReadResponse(&r));
    EXPECT_EQ(r.id, static_cast<uint64_t>(i + 1));
    EXPECT_TRUE(IsDeadlineAnswer(r)) << r.status.ToString();
  }
  ASSERT_TRUE(sock.SendRequest(Request{99, kLongDeadlineMs, ListCall{}}));
  Response r;
  ASSERT_TRUE(sock.ReadResponse(&r));
  EXPECT_EQ(r.id, 99u);
  EXPECT_TRUE(r.status.ok()) << r.status.ToString();
  EXPECT_EQ(server.slow().entered(), kQueries);
  EXPECT_EQ(server.slow().max_in_flight(), 1);
}

TEST(OverloadTest, AQueuedCallIsNotStartedAfterItsDeadline) {
  ServerOptions options;
  options.workers = 1;
  SlowServer server(options, kLongQuery);
  RawSocket busy(server.live().address()), late(server.live().address());
  ASSERT_TRUE(busy.ok() && late.ok());
  ASSERT_TRUE(busy.SendRequest(Request{1, kLongDeadlineMs, server.query()}));
  server.WaitForQueries(1);  // the only worker is busy now
  // Queued behind it, and answered at its deadline while still queued.
  ASSERT_TRUE(late.SendRequest(Request{2, 50, server.query()}));
  Response r;
  ASSERT_TRUE(late.ReadResponse(&r));
  EXPECT_TRUE(IsDeadlineAnswer(r)) << r.status.ToString();
  // The next call of that connection runs after the abandoned one left the queue, unstarted.
  ASSERT_TRUE(late.SendRequest(Request{3, kLongDeadlineMs, ListCall{}}));
  ASSERT_TRUE(late.ReadResponse(&r));
  EXPECT_EQ(r.id, 3u);
  EXPECT_TRUE(r.status.ok()) << r.status.ToString();
  EXPECT_EQ(server.slow().entered(), 1);
  ASSERT_TRUE(busy.ReadResponse(&r));
  EXPECT_TRUE(r.status.ok()) << r.status.ToString();
}

TEST(OverloadTest, ShutdownDropsQueuedCallsAndStopsPromptly) {
  ServerOptions options;
  options.workers = 1;
  SlowServer server(options, kLongQuery);
  RawSocket running(server.live().address());
  ASSERT_TRUE(running.SendRequest(Request{1, 0, server.query()}));
  server.WaitForQueries(1);
  // Queued behind the running query, on other connections.
  constexpr int kQueued = 4;
  std::vector<std::unique_ptr<RawSocket>> queued;
  for (int i = 0; i < kQueued; ++i) {
    queued.push_back(std::make_unique<RawSocket>(server.live().address()));
    ASSERT_TRUE(
        queued.back()->SendRequest(Request{static_cast<uint64_t>(10 + i), 0, server.query()}));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // read and queued by now
  const auto stop = std::chrono::steady_clock::now();
  server.live().server()->Shutdown();
  Response r;
  ASSERT_TRUE(running.ReadResponse(&r));
  EXPECT_TRUE(r.status.ok()) << r.status.ToString();  // started: finished and answered
  for (int i = 0; i < kQueued; ++i) {
    ASSERT_TRUE(queued[i]->ReadResponse(&r)) << i;
    EXPECT_EQ(r.id, static_cast<uint64_t>(10 + i));
    EXPECT_TRUE(r.status.IsUnavailable()) << r.status.ToString();
    EXPECT_NE(r.status.message().find("stopping"), std::string::npos) << r.status.ToString();
    EXPECT_TRUE(queued[i]->ClosedByPeer());
  }
  server.live().Stop();
  // Only the running query's rest, not the queue's kQueued more queries.
  EXPECT_LT(std::chrono::steady_clock::now() - stop, kLongQuery * 2);
  EXPECT_EQ(server.slow().entered(), 1);
}

TEST(OverloadTest, AnOverLongListIsRefusedAndTheServerGoesOn) {
  LiveServer live;
  RawSocket sock(live.address());
  ASSERT_TRUE(sock.ok());
  // A million empty structs in 4 MiB: refused on the list's length (before, a vector of a
  // million calibration layers was allocated first; 32 MiB of them cost 360 MB).
  const std::vector<uint64_t> frame = testing::EmptyStructsCalibrateFrame(1 << 20);
  ASSERT_TRUE(sock.Send(frame.data(), frame.size() * kWordBytes));
  Response r;
  ASSERT_TRUE(sock.ReadResponse(&r));
  EXPECT_TRUE(r.status.IsInvalidArgument()) << r.status.ToString();
  EXPECT_NE(r.status.message().find("layers; the limit is"), std::string::npos)
      << r.status.ToString();
  // The frame was read whole: the connection, and the server, go on.
  ASSERT_TRUE(sock.SendRequest(Request{2, 0, ListCall{}}));
  ASSERT_TRUE(sock.ReadResponse(&r));
  EXPECT_EQ(r.id, 2u);
  EXPECT_TRUE(r.status.ok()) << r.status.ToString();
  auto remote = live.Connect();
  ASSERT_NE(remote, nullptr);
  std::vector<ContextInfo> all;
  EXPECT_TRUE(remote->List(&all).ok());
}

}  // namespace
}  // namespace sqkv::net
