// A live server on 127.0.0.1 over an embedded store: every Store call through RemoteStore gives
// what the embedded call gives (bit for bit), from 64 connections at once too; deadlines; a
// graceful stop answers the request in flight; metrics; idle connections.
#include <gtest/gtest.h>
#include <mutex>
#include <sys/resource.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <thread>

#include "tests/net/net_testing.h"

namespace sqkv::net {
namespace {

using sqkv::testing::FreshSeed;
using sqkv::testing::RandomNormal;
using testing::ImportSynthetic;
using testing::LiveServer;
using testing::RawSocket;
using testing::SlowStore;
using testing::SmallContext;

void ExpectSameResult(const QueryResult& remote, const QueryResult& local) {
  ASSERT_EQ(remote.output.size(), local.output.size());
  ASSERT_EQ(remote.lse.size(), local.lse.size());
  EXPECT_EQ(
      std::memcmp(remote.output.data(), local.output.data(), local.output.size() * sizeof(float)),
      0);
  EXPECT_EQ(std::memcmp(remote.lse.data(), local.lse.data(), local.lse.size() * sizeof(float)), 0);
  EXPECT_EQ(remote.selected_tokens, local.selected_tokens);
  EXPECT_EQ(remote.stats.device, local.stats.device);
  EXPECT_EQ(remote.stats.tokens_selected, local.stats.tokens_selected);
  EXPECT_EQ(remote.stats.pages_selected, local.stats.pages_selected);
  EXPECT_EQ(remote.stats.centroids_scored, local.stats.centroids_scored);
}

void ExpectSameRecord(const ContextInfo& a, const ContextInfo& b) {
  EXPECT_EQ(a.name, b.name);
  EXPECT_EQ(a.version, b.version);
  EXPECT_EQ(a.layers, b.layers);
  EXPECT_EQ(a.kv_heads, b.kv_heads);
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.dtype, b.dtype);
  EXPECT_EQ(a.layer_first_page, b.layer_first_page);
  EXPECT_EQ(a.segment_bytes, b.segment_bytes);
  EXPECT_EQ(a.source, b.source);
}

TEST(ServerTest, EveryCallMatchesTheEmbeddedStore) {
  LiveServer live;
  const uint64_t seed = FreshSeed();
  std::vector<float> q;
  const SyntheticOptions ctx = SmallContext(seed);
  ImportSynthetic(live.store(), live.dir(), "doc", ctx, &q);
  auto remote = live.Connect();
  ASSERT_NE(remote, nullptr);
  EXPECT_EQ(remote->data_dir(), live.address());

  std::vector<ContextInfo> local_all, remote_all;
  ASSERT_TRUE(live.store()->List(&local_all).ok());
  ASSERT_TRUE(remote->List(&remote_all).ok());
  ASSERT_EQ(remote_all.size(), 1u);
  ExpectSameRecord(remote_all[0], local_all[0]);

  ContextInfo info;
  ASSERT_TRUE(remote->Info("doc", &info).ok());
  ExpectSameRecord(info, local_all[0]);
  EXPECT_TRUE(remote->Info("nope", &info).IsNotFound());
  EXPECT_TRUE(remote->Info("../bad", &info).IsInvalidArgument());

  for (bool dense : {false, true}) {
    QueryOptions o;
    o.want_selection = true;
    o.select.keep_fraction = 0.2f;
    if (dense) o.select.mode = SelectOptions::Mode::kDense;
    QueryResult local, got;
    ASSERT_TRUE(
        live.store()->Query("doc", 1, q.data(), ctx.q_heads, ctx.n, ctx.head_dim, o, &local).ok());
    Status s = remote->Query("doc", 1, q.data(), ctx.q_heads, ctx.n, ctx.head_dim, o, &got);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ExpectSameResult(got, local);
  }
  // Errors carry the store's code and message.
  QueryResult r;
  Status local_err =
      live.store()->Query("doc", 9, q.data(), ctx.q_heads, ctx.n, ctx.head_dim, {}, &r);
  Status remote_err = remote->Query("doc", 9, q.data(), ctx.q_heads, ctx.n, ctx.head_dim, {}, &r);
  EXPECT_EQ(remote_err.code(), local_err.code());
  EXPECT_EQ(remote_err.message(), local_err.message());
  std::vector<float> bad = q;
  bad[3] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(remote->Query("doc", 0, bad.data(), ctx.q_heads, ctx.n, ctx.head_dim, {}, &r)
                  .IsInvalidArgument());
  EXPECT_TRUE(
      remote->Query("doc", 0, q.data(), 3, ctx.n, ctx.head_dim, {}, &r).IsInvalidArgument());

  // Admin calls.
  StoreStats ls, rs;
  ASSERT_TRUE(live.store()->Stats(&ls).ok());
  ASSERT_TRUE(remote->Stats(&rs).ok());
  EXPECT_EQ(rs.contexts, ls.contexts);
  EXPECT_EQ(rs.keys, ls.keys);
  EXPECT_EQ(rs.segment_bytes, ls.segment_bytes);
  VerifyReport vr;
  int progress_calls = 0;
  ASSERT_TRUE(remote
                  ->Verify(
                      "", [&](int, int) { ++progress_calls; }, &vr)
                  .ok());
  EXPECT_EQ(vr.contexts_checked, 1);
  EXPECT_GT(vr.pages_checked, 0);
  EXPECT_TRUE(vr.problems.empty());
  ASSERT_TRUE(remote->Calibrate("doc", nullptr, {0.5f, 0.9f}).ok());
  Thresholds lt, rt;
  ASSERT_TRUE(live.store()->GetThresholds("doc", 1, &lt).ok());
  ASSERT_TRUE(remote->GetThresholds("doc", 1, &rt).ok());
  EXPECT_EQ(rt.sparsity, lt.sparsity);
  EXPECT_EQ(rt.threshold, lt.threshold);
  {
    QueryOptions o;
    o.sparsity = 0.9f;
    QueryResult local, got;
    ASSERT_TRUE(
        live.store()->Query("doc", 1, q.data(), ctx.q_heads, ctx.n, ctx.head_dim, o, &local).ok());
    ASSERT_TRUE(remote->Query("doc", 1, q.data(), ctx.q_heads, ctx.n, ctx.head_dim, o, &got).ok());
    ExpectSameResult(got, local);
  }
  ImportOptions rebuild;
  rebuild.centroid_fraction = 0.1f;
  ContextInfo rebuilt;
  ASSERT_TRUE(remote->Rebuild("doc", rebuild, &rebuilt).ok());
  EXPECT_GT(rebuilt.version, local_all[0].version);
  EXPECT_FLOAT_EQ(rebuilt.centroid_fraction, 0.1f);
  CompactReport cr;
  ASSERT_TRUE(remote->Compact(&cr).ok());

  // Tiers.
  ASSERT_TRUE(remote->Pin("doc", Tier::kHost).ok());
  std::vector<std::pair<std::string, Tier>> lp, rp;
  ASSERT_TRUE(live.store()->ListPins(&lp).ok());
  ASSERT_TRUE(remote->ListPins(&rp).ok());
  EXPECT_EQ(rp, lp);
  ASSERT_EQ(rp.size(), 1u);
  EXPECT_EQ(rp[0].first, "doc");
  {
    QueryResult local, got;
    ASSERT_TRUE(
        live.store()->Query("doc", 0, q.data(), ctx.q_heads, ctx.n, ctx.head_dim, {}, &local).ok());
    ASSERT_TRUE(remote->Query("doc", 0, q.data(), ctx.q_heads, ctx.n, ctx.head_dim, {}, &got).ok());
    ExpectSameResult(got, local);
    EXPECT_EQ(got.stats.pages_from_host, local.stats.pages_from_host);
    EXPECT_EQ(got.stats.pages_from_disk, 0);  // pinned: all in the host tier
  }
  TierStats lts, rts;
  ASSERT_TRUE(remote->GetTierStats(&rts).ok());
  ASSERT_TRUE(live.store()->GetTierStats(&lts).ok());
  EXPECT_EQ(rts.host_capacity_bytes, lts.host_capacity_bytes);
  EXPECT_EQ(rts.host_pinned_bytes, lts.host_pinned_bytes);
  EXPECT_GT(rts.host_pinned_bytes, 0u);
  EXPECT_EQ(rts.index_bytes_cached, lts.index_bytes_cached);
  EXPECT_GT(rts.index_layers_cached, 0u);
  ASSERT_TRUE(remote->Unpin("doc").ok());
  ASSERT_TRUE(remote->ListPins(&rp).ok());
  EXPECT_TRUE(rp.empty());
  ASSERT_TRUE(remote->Preload("doc", Tier::kHost).ok());
  EXPECT_TRUE(remote->Pin("missing", Tier::kHost).IsNotFound());
  Status no_gpu_local = live.store()->Preload("doc", Tier::kDevice);
  Status no_gpu_remote = remote->Preload("doc", Tier::kDevice);
  EXPECT_EQ(no_gpu_remote.code(), no_gpu_local.code());

  ASSERT_TRUE(remote->Remove("doc").ok());
  EXPECT_TRUE(remote->Remove("doc").IsNotFound());
  ASSERT_TRUE(live.store()->List(&local_all).ok());
  EXPECT_TRUE(local_all.empty());
}

TEST(ServerTest, ImportUploadsInChunksAndReportsProgress) {
  testing::ScratchDir data;
  std::unique_ptr<Store> inner;
  ASSERT_TRUE(Store::Open(StoreOptions{.data_dir = data.file("data")}, &inner).ok());
  // The import reports progress once per layer and kv head (4 times here); each report is
  // followed by 150 ms, so the import outlasts the server's 250 ms progress tick.
  constexpr auto kProgressDelay = std::chrono::milliseconds(150);
  SlowStore slow(inner.get(), std::chrono::milliseconds(0), kProgressDelay);
  ServerOptions options;
  options.chunk_bytes = 64 * 1024;  // the file needs many chunks
  LiveServer live(&slow, options);
  const std::string path = live.dir() + "/up.safetensors";
  SyntheticOptions ctx = SmallContext(FreshSeed());
  std::vector<float> q;
  ASSERT_TRUE(WriteSyntheticContext(ctx, path, &q).ok());
  auto remote = live.Connect();
  ImportOptions io;
  int updates = 0, last_done = 0, last_total = 0;
  io.progress = [&](int done, int total) {
    ++updates;
    last_done = done;
    last_total = total;
  };
  ContextInfo info;
  Status s = remote->Import("up", path, io, &info);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(info.tokens, ctx.tokens);
  EXPECT_EQ(info.layers, ctx.layers);
  // The source is the client's file name, not where the server kept the upload.
  EXPECT_EQ(info.source, "up.safetensors");
  ContextInfo again;
  ASSERT_TRUE(remote->Info("up", &again).ok());
  EXPECT_EQ(again.source, "up.safetensors");
  EXPECT_GE(updates, 1);
  EXPECT_EQ(last_total, ctx.layers * ctx.kv_heads);
  EXPECT_GE(last_done, 1);
  EXPECT_LE(last_done, last_total);

  // The same file imported locally gives the same answers (K-means is seeded the same way).
  ASSERT_TRUE(live.store()->Import("local", path, ImportOptions(), nullptr).ok());
  QueryOptions o;
  o.want_selection = true;
  QueryResult a, b;
  ASSERT_TRUE(remote->Query("up", 0, q.data(), ctx.q_heads, ctx.n, ctx.head_dim, o, &a).ok());
  ASSERT_TRUE(
      live.store()->Query("local", 0, q.data(), ctx.q_heads, ctx.n, ctx.head_dim, o, &b).ok());
  ExpectSameResult(a, b);

  EXPECT_TRUE(remote->Import("up", path, io, nullptr).code() == Status::Code::kAlreadyExists);
  EXPECT_TRUE(remote->Import("x", live.dir() + "/missing.safetensors", io, nullptr).IsNotFound());
  const std::string junk = live.dir() + "/junk.safetensors";
  {
    std::ofstream f(junk);
    f << "definitely not safetensors";
  }
  Status bad = remote->Import("junk", junk, io, nullptr);
  EXPECT_TRUE(bad.IsInvalidArgument()) << bad.ToString();
  // The error names the client's file, not the server's copy of it.
  EXPECT_NE(bad.message().find("junk.safetensors"), std::string::npos) << bad.ToString();
  EXPECT_EQ(bad.message().find("uploads/"), std::string::npos) << bad.ToString();
  // Uploads leave nothing behind.
  size_t leftovers = 0;
  for (const auto& e : std::filesystem::directory_iterator(live.dir() + "/uploads")) {
    (void)e;
    ++leftovers;
  }
  EXPECT_EQ(leftovers, 0u);
}

// A request over the server's message limit is refused before it is read (an answer with id 0,
// then the connection closes). The remote store reports that answer, whether its send completed
// or broke off: a 41 MB query against a 1 MiB limit broke off, and the caller heard only
// "connection lost sending (Broken pipe)".
TEST(ServerTest, RefusedMessagesCarryTheServersReason) {
  ServerOptions options;
  options.max_message_bytes = uint64_t{1} << 20;
  options.chunk_bytes = 512 << 10;
  LiveServer live(options);
  const std::string path = live.dir() + "/c.safetensors";
  const SyntheticOptions ctx = SmallContext(FreshSeed());
  ASSERT_TRUE(WriteSyntheticContext(ctx, path, nullptr).ok());
  ASSERT_TRUE(live.store()->Import("c", path, ImportOptions(), nullptr).ok());
  for (int n : {600, 20000}) {  // 1.2 MB and 41 MB of q
    SCOPED_TRACE(n);
    auto remote = live.Connect();
    std::vector<float> q(static_cast<size_t>(ctx.q_heads) * n * ctx.head_dim, 0.f);
    QueryResult r;
    const Status s = remote->Query("c", 0, q.data(), ctx.q_heads, n, ctx.head_dim, QueryOptions(),
                                   &r);
    EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
    EXPECT_NE(s.message().find("exceeds the limit of 1048576"), std::string::npos)
        << s.ToString();
  }
  auto remote = live.Connect();  // the server is fine
  std::vector<ContextInfo> all;
  EXPECT_TRUE(remote->List(&all).ok());
  EXPECT_EQ(all.size(), 1u);
}

// max_connections is fitted to the process's descriptor limit (a quarter of it, at least 64,
// left to the store and uploads), so connections cannot use up the descriptors the store needs:
// under `ulimit -n 256` the default 4,096 let idle sockets make every accept and the store's own
// opens fail with EMFILE. The limit is lowered for the test and restored after.
TEST(ServerTest, MaxConnectionsFitsTheDescriptorLimit) {
  rlimit saved{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &saved), 0);
  if (saved.rlim_cur != RLIM_INFINITY && saved.rlim_cur < 512) GTEST_SKIP() << "limit below 512";
  rlimit low = saved;
  low.rlim_cur = 512;
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &low), 0);
  std::vector<std::string> lines;
  std::mutex mu;
  ServerOptions options;
  options.log = [&](const std::string& line) {
    std::lock_guard<std::mutex> lock(mu);
    lines.push_back(line);
  };
  {
    LiveServer live(options);
    auto remote = live.Connect();
    std::vector<ContextInfo> all;
    EXPECT_TRUE(remote->List(&all).ok());
  }
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &saved), 0);
  std::lock_guard<std::mutex> lock(mu);
  bool fitted = false;
  for (const std::string& l : lines) {
    fitted = fitted || l.find("max_connections lowered from 4096 to 384: the process may open 512 "
                              "descriptors") != std::string::npos;
  }
  EXPECT_TRUE(fitted) << "no line says so; first line: " << (lines.empty() ? "" : lines[0]);
}

// An import stops on the server, publishing nothing, when its remote client cancels it
// (ImportOptions::cancelled: the client closes the connection) and when the server shuts down
// (the client hears Unavailable). Each unit reports and then sleeps 400 ms, so the import outlasts
// the client's 100 ms and the server's 250 ms looks by far.
TEST(ServerTest, ImportCancelledByItsClientOrByShutdownPublishesNothing) {
  testing::ScratchDir data;
  std::unique_ptr<Store> inner;
  ASSERT_TRUE(Store::Open(StoreOptions{.data_dir = data.file("data")}, &inner).ok());
  SlowStore slow(inner.get(), std::chrono::milliseconds(0), std::chrono::milliseconds(400));
  LiveServer live(&slow, ServerOptions());
  const std::string path = live.dir() + "/c.safetensors";
  ASSERT_TRUE(WriteSyntheticContext(SmallContext(FreshSeed()), path, nullptr).ok());
  const std::string uploads = live.dir() + "/uploads";
  auto uploads_gone = [&] {  // an upload goes when the store call importing it has returned
    for (int i = 0; i < 1000; ++i) {  // bounded: 10 s
      if (std::filesystem::is_empty(uploads)) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  };
  auto remote = live.Connect();

  std::atomic<int> updates{0};
  ImportOptions io;
  io.progress = [&](int, int) { ++updates; };
  io.cancelled = [&] { return updates.load() >= 1; };
  Status s = remote->Import("c", path, io, nullptr);
  EXPECT_TRUE(s.IsCancelled()) << s.ToString();
  EXPECT_NE(s.message().find("publishes nothing"), std::string::npos) << s.ToString();
  ASSERT_TRUE(uploads_gone());
  ContextInfo info;
  EXPECT_TRUE(inner->Info("c", &info).IsNotFound());
  // Cancelled before the first chunk: the upload is dropped with the connection.
  io.cancelled = [] { return true; };
  s = remote->Import("c", path, io, nullptr);
  EXPECT_TRUE(s.IsCancelled()) << s.ToString();
  EXPECT_NE(s.message().find("during the upload"), std::string::npos) << s.ToString();

  updates = 0;
  io.cancelled = nullptr;
  Status shut;
  std::thread importer([&] { shut = remote->Import("c", path, io, nullptr); });
  for (int i = 0; i < 1000 && updates.load() == 0; ++i) {  // bounded: 10 s
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_GE(updates.load(), 1);
  live.server()->Shutdown();
  importer.join();
  // Not the client's doing: Unavailable (retry later), saying what happened.
  EXPECT_TRUE(shut.IsUnavailable()) << shut.ToString();
  EXPECT_NE(shut.message().find("server is stopping: import of 'c' cancelled"), std::string::npos)
      << shut.ToString();
  EXPECT_NE(shut.message().find("nothing was published"), std::string::npos) << shut.ToString();
  live.Stop();
  EXPECT_TRUE(inner->Info("c", &info).IsNotFound());
  EXPECT_TRUE(std::filesystem::is_empty(uploads));
}

// A client that half-closes its connection after importEnd (shutdown of its sending side) is not
// gone: it gets its progress and the import's answer, and the context is published.
TEST(ServerTest, AHalfClosedClientKeepsItsImport) {
  testing::ScratchDir data;
  std::unique_ptr<Store> inner;
  ASSERT_TRUE(Store::Open(StoreOptions{.data_dir = data.file("data")}, &inner).ok());
  SlowStore slow(inner.get(), std::chrono::milliseconds(0), std::chrono::milliseconds(300));
  LiveServer live(&slow, ServerOptions());
  const std::string path = live.dir() + "/c.safetensors";
  ASSERT_TRUE(WriteSyntheticContext(SmallContext(FreshSeed()), path, nullptr).ok());
  std::string bytes;
  {
    std::ifstream f(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }
  RawSocket sock(live.address());
  ASSERT_TRUE(sock.ok());
  ImportBeginCall begin;
  begin.name = "c";
  begin.file_name = "c.safetensors";
  begin.total_bytes = bytes.size();
  ASSERT_TRUE(sock.SendRequest(Request{1, 0, begin}));
  Response r;
  ASSERT_TRUE(sock.ReadResponse(&r));
  ASSERT_TRUE(r.status.ok()) << r.status.ToString();
  const auto began = std::get<ImportBeginReply>(r.body);
  uint64_t id = 2;
  for (size_t at = 0; at < bytes.size(); at += began.chunk_bytes) {
    ImportChunkCall chunk{began.upload_id, at, bytes.substr(at, began.chunk_bytes)};
    ASSERT_TRUE(sock.SendRequest(Request{id++, 0, chunk}));
    ASSERT_TRUE(sock.ReadResponse(&r));
    ASSERT_TRUE(r.status.ok()) << r.status.ToString();
  }
  ASSERT_TRUE(sock.SendRequest(Request{id, 0, ImportEndCall{began.upload_id}}));
  sock.ShutdownWrite();
  int progress = 0;
  for (;;) {
    ASSERT_TRUE(sock.ReadResponse(&r));
    if (!std::holds_alternative<ProgressReply>(r.body)) break;
    ++progress;
  }
  EXPECT_TRUE(r.status.ok()) << r.status.ToString();
  EXPECT_GE(progress, 1);
  ContextInfo info;
  EXPECT_TRUE(inner->Info("c", &info).ok());
}

TEST(ServerTest, SixtyFourConcurrentConnectionsGetTheEmbeddedAnswers) {
  constexpr int kClients = 64;
  constexpr int kQueriesPerClient = 3;
  ServerOptions options;
  options.io_threads = 2;
  options.workers = 2;
  LiveServer live(options);
  const uint64_t seed = FreshSeed();
  const SyntheticOptions ctx = SmallContext(seed);
  ImportSynthetic(live.store(), live.dir(), "doc", ctx, nullptr);
  std::mt19937_64 rng(seed);
  const size_t q_size = static_cast<size_t>(ctx.q_heads) * ctx.n * ctx.head_dim;
  std::vector<std::vector<float>> queries(kClients * kQueriesPerClient);
  std::vector<QueryResult> expected(queries.size());
  QueryOptions o;
  o.want_selection = true;
  for (size_t i = 0; i < queries.size(); ++i) {
    queries[i] = RandomNormal(q_size, rng);
    ASSERT_TRUE(live.store()
                    ->Query("doc", static_cast<int>(i % 2), queries[i].data(), ctx.q_heads, ctx.n,
                            ctx.head_dim, o, &expected[i])
                    .ok());
  }
  std::vector<std::unique_ptr<Store>> clients(kClients);
  for (auto& c : clients) {
    c = live.Connect();  // one connection each, opened before any query
    ASSERT_NE(c, nullptr);
  }
  std::vector<QueryResult> got(queries.size());
  std::vector<Status> status(queries.size());
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  for (int c = 0; c < kClients; ++c) {
    threads.emplace_back([&, c] {
      ready.fetch_add(1);
      while (ready.load() < kClients) std::this_thread::yield();
      for (int k = 0; k < kQueriesPerClient; ++k) {
        const size_t i = static_cast<size_t>(c) * kQueriesPerClient + k;
        status[i] = clients[c]->Query("doc", static_cast<int>(i % 2), queries[i].data(),
                                      ctx.q_heads, ctx.n, ctx.head_dim, o, &got[i]);
      }
    });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < queries.size(); ++i) {
    ASSERT_TRUE(status[i].ok()) << i << ": " << status[i].ToString();
    ExpectSameResult(got[i], expected[i]);
  }
}

TEST(ServerTest, OneRemoteStoreIsSafeFromManyThreads) {
  LiveServer live;
  const SyntheticOptions ctx = SmallContext(FreshSeed());
  std::vector<float> q;
  ImportSynthetic(live.store(), live.dir(), "doc", ctx, &q);
  QueryResult expected;
  ASSERT_TRUE(live.store()
                  ->Query("doc", 0, q.data(), ctx.q_heads, ctx.n, ctx.head_dim, {}, &expected)
                  .ok());
  auto remote = live.Connect();
  constexpr int kThreads = 8, kCalls = 10;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kCalls; ++i) {
        QueryResult r;
        if (!remote->Query("doc", 0, q.data(), ctx.q_heads, ctx.n, ctx.head_dim, {}, &r).ok() ||
            std::memcmp(r.output.data(), expected.output.data(),
                        expected.output.size() * sizeof(float)) != 0) {
          failures.fetch_add(1);
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
}

TEST(ServerTest, DeadlineAnswersUnavailableAndTheConnectionStaysUsable) {
  testing::ScratchDir dir;
  std::unique_ptr<Store> inner;
  ASSERT_TRUE(Store::Open(StoreOptions{.data_dir = dir.file("data")}, &inner).ok());
  const SyntheticOptions ctx = SmallContext(FreshSeed());
  std::vector<float> q;
  ImportSynthetic(inner.get(), dir.path().string(), "doc", ctx, &q);
  SlowStore slow(inner.get(), std::chrono::milliseconds(1000));
  ServerOptions options;
  options.default_deadline_ms = 100;
  options.upload_dir = dir.file("uploads");
  LiveServer live(&slow, options);
  RawSocket sock(live.address());
  ASSERT_TRUE(sock.ok());
  QueryCall call;
  call.name = "doc";
  call.q_heads = ctx.q_heads;
  call.n = ctx.n;
  call.head_dim = ctx.head_dim;
  call.q = q;
  ASSERT_TRUE(sock.SendRequest(Request{7, 0, call}));
  Response r;
  const auto started = std::chrono::steady_clock::now();
  ASSERT_TRUE(sock.ReadResponse(&r));
  EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::milliseconds(900));
  EXPECT_EQ(r.id, 7u);
  EXPECT_TRUE(r.status.IsUnavailable()) << r.status.ToString();
  EXPECT_NE(r.status.message().find("deadline"), std::string::npos);
  // The abandoned query is cancelled on the worker (QueryOptions::cancelled) rather than run to
  // its end: the store saw the cancellation once its (test) delay was over.
  for (int i = 0; i < 500 && slow.returned() == 0; ++i) {  // bounded: 5 s
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(slow.returned(), 1);
  EXPECT_TRUE(slow.last_query().IsCancelled()) << slow.last_query().ToString();
  // Same connection, a longer deadline of its own: answered.
  ASSERT_TRUE(sock.SendRequest(Request{8, 5000, call}));
  ASSERT_TRUE(sock.ReadResponse(&r));
  EXPECT_EQ(r.id, 8u);
  EXPECT_TRUE(r.status.ok()) << r.status.ToString();
  EXPECT_TRUE(std::holds_alternative<QueryResult>(r.body));
}

TEST(ServerTest, ShutdownAnswersTheRequestInFlightThenStops) {
  testing::ScratchDir dir;
  std::unique_ptr<Store> inner;
  ASSERT_TRUE(Store::Open(StoreOptions{.data_dir = dir.file("data")}, &inner).ok());
  const SyntheticOptions ctx = SmallContext(FreshSeed());
  std::vector<float> q;
  ImportSynthetic(inner.get(), dir.path().string(), "doc", ctx, &q);
  SlowStore slow(inner.get(), std::chrono::milliseconds(500));
  ServerOptions options;
  options.upload_dir = dir.file("uploads");
  LiveServer live(&slow, options);
  RawSocket busy(live.address()), idle(live.address()), stalled(live.address());
  ASSERT_TRUE(busy.ok() && idle.ok() && stalled.ok());
  QueryCall call;
  call.name = "doc";
  call.q_heads = ctx.q_heads;
  call.n = ctx.n;
  call.head_dim = ctx.head_dim;
  call.q = q;
  // A client that stalls after its frame's first word: nothing of its request runs yet, so the
  // stop does not wait for it (it waited for the 30 s io timeout).
  std::vector<uint64_t> frame;
  ASSERT_TRUE(EncodeRequest(Request{7, 0, call}, &frame).ok());
  ASSERT_TRUE(stalled.Send(frame.data(), kWordBytes));
  ASSERT_TRUE(busy.SendRequest(Request{1, 0, call}));
  for (int i = 0; i < 1000 && slow.entered() == 0; ++i) {  // bounded: 10 s
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(slow.entered(), 1);  // the query is on a worker now
  live.server()->Shutdown();
  Response r;
  ASSERT_TRUE(busy.ReadResponse(&r));
  EXPECT_TRUE(r.status.ok()) << r.status.ToString();
  EXPECT_TRUE(busy.ClosedByPeer());
  EXPECT_TRUE(idle.ClosedByPeer());
  EXPECT_TRUE(stalled.ClosedByPeer(std::chrono::seconds(5)));
  live.Stop();  // Wait() returns
  RawSocket late(live.address());
  EXPECT_FALSE(late.ok());
}

TEST(ServerTest, IdleConnectionsAreClosedAndClientsReconnect) {
  ServerOptions options;
  options.idle_timeout_ms = 150;
  LiveServer live(options);
  const SyntheticOptions ctx = SmallContext(FreshSeed());
  std::vector<float> q;
  ImportSynthetic(live.store(), live.dir(), "doc", ctx, &q);
  RawSocket sock(live.address());
  ASSERT_TRUE(sock.ok());
  EXPECT_TRUE(sock.ClosedByPeer(std::chrono::seconds(5)));
  // A pooled client connection closed by the server: the next read-only call reconnects.
  auto remote = live.Connect();
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  std::vector<ContextInfo> all;
  Status s = remote->List(&all);
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(all.size(), 1u);
}

TEST(ServerTest, MetricsEndpointCountsCallsAndErrors) {
  ServerOptions options;
  options.metrics_listen = "127.0.0.1:0";
  LiveServer live(options);
  const SyntheticOptions ctx = SmallContext(FreshSeed());
  std::vector<float> q;
  ImportSynthetic(live.store(), live.dir(), "doc", ctx, &q);
  auto remote = live.Connect();
  QueryResult r;
  ASSERT_TRUE(remote->Query("doc", 0, q.data(), ctx.q_heads, ctx.n, ctx.head_dim, {}, &r).ok());
  ContextInfo info;
  EXPECT_TRUE(remote->Info("missing", &info).IsNotFound());
  {
    RawSocket junk(live.address());
    const char garbage[16] = "GET / HTTP/1.1";
    junk.Send(garbage, sizeof(garbage));
    EXPECT_TRUE(junk.ClosedByPeer());
  }
  RawSocket http(live.server()->metrics_address());
  ASSERT_TRUE(http.ok());
  const std::string get = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
  ASSERT_TRUE(http.Send(get.data(), get.size()));
  const std::string text = http.ReadUntilClosed(std::chrono::seconds(10));
  EXPECT_NE(text.find("HTTP/1.1 200"), std::string::npos);
  EXPECT_NE(text.find("text/plain; version=0.0.4"), std::string::npos);
  EXPECT_NE(text.find("sqkv_requests_total{call=\"query\",code=\"OK\"} 1"), std::string::npos);
  EXPECT_NE(text.find("sqkv_requests_total{call=\"info\",code=\"NotFound\"} 1"), std::string::npos);
  EXPECT_NE(text.find("sqkv_request_duration_seconds_bucket{call=\"query\",le=\"+Inf\"} 1"),
            std::string::npos);
  EXPECT_NE(text.find("sqkv_protocol_errors_total 1"), std::string::npos);
  EXPECT_NE(text.find("sqkv_contexts 1"), std::string::npos);
  EXPECT_NE(text.find("sqkv_connections_open"), std::string::npos);
  EXPECT_NE(text.find("sqkv_tier_hits_total{tier=\"host\"}"), std::string::npos);
  EXPECT_NE(text.find("sqkv_tier_capacity_bytes{tier=\"host\"}"), std::string::npos);
  EXPECT_NE(text.find("sqkv_disk_read_duration_seconds_bucket{le=\"+Inf\"}"), std::string::npos);
}

}  // namespace
}  // namespace sqkv::net
