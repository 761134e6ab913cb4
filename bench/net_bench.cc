// Server benchmark (issue 5): decode-sized queries (1 query token, 32 query heads, head_dim 128,
// 8 kv heads, keep 0.1) against a warm context, over loopback from 1, 8 and 64 concurrent
// clients (one connection each), and the per-request overhead of the server over the embedded
// call, measured side by side in the same run (alternating calls on one thread).
//
//   net_bench [--tokens 4096] [--seconds 3] [--io-threads 2] [--workers 0] [--dir
//   /tmp/sqkv-net-bench]
//
// Everything (store, server, clients) runs in this process on this machine; the server goes
// through its real TCP path on 127.0.0.1.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "api/net/client.h"
#include "api/net/server.h"
#include "api/store.h"
#include "api/synthetic.h"

namespace {

using Clock = std::chrono::steady_clock;

constexpr int kQHeads = 32, kKvHeads = 8, kHeadDim = 128;
constexpr float kKeep = 0.1f;
// Distinct query vectors cycled through (so no answer is a repeat of the previous one).
constexpr int kQueryVariants = 16;

int IntArg(int argc, char** argv, const char* name, int def) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], name) == 0) return std::atoi(argv[i + 1]);
  }
  return def;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5));
  return v[i];
}

double Micros(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }

// The floor under any server: p50 and p99 round trip (us) of 64 bytes between two threads over
// loopback TCP with blocking sockets, measured now (the machine's load moves it a lot).
std::pair<double, double> LoopbackRoundTrip(int rounds) {
  constexpr size_t kBytes = 64;
  const int ls = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  if (ls < 0 || ::bind(ls, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      ::listen(ls, 1) != 0 || ::getsockname(ls, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    return {0, 0};
  }
  const int one = 1;
  std::thread echo([ls, one] {
    const int c = ::accept(ls, nullptr, nullptr);
    ::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    char buf[kBytes];
    while (::recv(c, buf, kBytes, MSG_WAITALL) == static_cast<ssize_t>(kBytes)) {
      ::send(c, buf, kBytes, MSG_NOSIGNAL);
    }
    ::close(c);
  });
  const int c = ::socket(AF_INET, SOCK_STREAM, 0);
  std::vector<double> us;
  if (::connect(c, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0) {
    ::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    char buf[kBytes] = {};
    for (int i = 0; i < rounds; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      if (::send(c, buf, kBytes, MSG_NOSIGNAL) != static_cast<ssize_t>(kBytes) ||
          ::recv(c, buf, kBytes, MSG_WAITALL) != static_cast<ssize_t>(kBytes)) {
        break;
      }
      us.push_back(
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  ::close(c);
  echo.join();
  ::close(ls);
  return {Percentile(us, 0.5), Percentile(us, 0.99)};
}

void Die(const sqkv::Status& s) {
  std::fprintf(stderr, "net_bench: %s\n", s.ToString().c_str());
  std::exit(1);
}

}  // namespace

int main(int argc, char** argv) {
  using namespace sqkv;
  const int tokens = IntArg(argc, argv, "--tokens", 4096);
  const int seconds = IntArg(argc, argv, "--seconds", 3);
  std::string dir = "/tmp/sqkv-net-bench";
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--dir") == 0) dir = argv[i + 1];
  }
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);

  SyntheticOptions so;
  so.layers = 1;
  so.kv_heads = kKvHeads;
  so.q_heads = kQHeads;
  so.tokens = tokens;
  so.head_dim = kHeadDim;
  so.window = 0;
  so.n = 1;
  so.topics = 64;
  const std::string file = dir + "/ctx.safetensors";
  std::vector<std::vector<float>> queries(kQueryVariants);
  if (Status s = WriteSyntheticContext(so, file, &queries[0]); !s.ok()) Die(s);
  // Variant v: the query heads rotated by v (each head still looks at one of its topics).
  for (int v = 1; v < kQueryVariants; ++v) {
    queries[v].resize(queries[0].size());
    for (int h = 0; h < kQHeads; ++h) {
      std::memcpy(queries[v].data() + h * kHeadDim,
                  queries[0].data() + ((h + v) % kQHeads) * kHeadDim, kHeadDim * sizeof(float));
    }
  }
  std::unique_ptr<Store> store;
  StoreOptions opt;
  opt.data_dir = dir + "/data";
  if (Status s = Store::Open(opt, &store); !s.ok()) Die(s);
  if (Status s = store->Import("ctx", file, ImportOptions(), nullptr); !s.ok()) Die(s);

  net::ServerOptions server_options;
  server_options.listen = "127.0.0.1:0";
  server_options.metrics_listen.clear();
  server_options.io_threads = IntArg(argc, argv, "--io-threads", 2);
  server_options.workers = IntArg(argc, argv, "--workers", 0);
  server_options.upload_dir = dir + "/uploads";
  std::unique_ptr<net::Server> server;
  if (Status s = net::Server::Start(server_options, store.get(), &server); !s.ok()) Die(s);

  QueryOptions qo;
  qo.select.keep_fraction = kKeep;
  qo.device = Device::kCpu;
  auto embedded = [&](int v, QueryResult* r) {
    return store->Query("ctx", 0, queries[v].data(), kQHeads, 1, kHeadDim, qo, r);
  };

  // Warm: the layer index, the segment pages and the connections.
  std::unique_ptr<Store> remote;
  if (Status s = net::ConnectStore(server->address(), "", &remote); !s.ok()) Die(s);
  for (int i = 0; i < 50; ++i) {
    QueryResult r;
    if (Status s = embedded(i % kQueryVariants, &r); !s.ok()) Die(s);
    if (Status s = remote->Query("ctx", 0, queries[i % kQueryVariants].data(), kQHeads, 1, kHeadDim,
                                 qo, &r);
        !s.ok()) {
      Die(s);
    }
  }

  std::printf(
      "context: 1 layer x %d kv heads x %d tokens x %d (bf16); query: %d heads x 1 token, "
      "keep %.2f, cpu; server: %d io threads, %d workers; %d s per row\n",
      kKvHeads, tokens, kHeadDim, kQHeads, kKeep, server_options.io_threads,
      server_options.workers > 0 ? server_options.workers
                                 : static_cast<int>(std::thread::hardware_concurrency()),
      seconds);

  // Side by side, one thread: embedded and remote calls alternate, same arguments. The query is
  // the decode-sized one; Info (a catalog read) shows the server's fixed cost per request.
  auto side_by_side = [&](const char* what, auto local_call, auto remote_call) {
    std::vector<double> local_us, remote_us, diff_us;
    const auto until = Clock::now() + std::chrono::seconds(seconds);
    for (int i = 0; Clock::now() < until; ++i) {
      const auto t0 = Clock::now();
      local_call(i);
      const auto t1 = Clock::now();
      remote_call(i);
      const auto t2 = Clock::now();
      local_us.push_back(Micros(t1 - t0));
      remote_us.push_back(Micros(t2 - t1));
      diff_us.push_back(remote_us.back() - local_us.back());
    }
    std::printf("%-6s %8zu %12.1f %12.1f %12.1f %12.1f %14.1f\n", what, local_us.size(),
                Percentile(local_us, 0.5), Percentile(remote_us, 0.5), Percentile(local_us, 0.99),
                Percentile(remote_us, 0.99), Percentile(diff_us, 0.5));
  };
  constexpr int kPingPongs = 20000;
  const auto [rtt50, rtt99] = LoopbackRoundTrip(kPingPongs);
  std::printf(
      "\nloopback TCP round trip of 64 bytes between two threads (the floor): p50 %.1f us, "
      "p99 %.1f us\n",
      rtt50, rtt99);
  std::printf("\nside by side, 1 thread (calls alternate)\n");
  std::printf("%-6s %8s %12s %12s %12s %12s %14s\n", "call", "pairs", "emb p50 us", "srv p50 us",
              "emb p99 us", "srv p99 us", "overhead p50");
  side_by_side(
      "query",
      [&](int i) {
        QueryResult r;
        if (Status s = embedded(i % kQueryVariants, &r); !s.ok()) Die(s);
      },
      [&](int i) {
        QueryResult r;
        if (Status s = remote->Query("ctx", 0, queries[i % kQueryVariants].data(), kQHeads, 1,
                                     kHeadDim, qo, &r);
            !s.ok()) {
          Die(s);
        }
      });
  side_by_side(
      "info",
      [&](int) {
        ContextInfo c;
        if (Status s = store->Info("ctx", &c); !s.ok()) Die(s);
      },
      [&](int) {
        ContextInfo c;
        if (Status s = remote->Info("ctx", &c); !s.ok()) Die(s);
      });
  {  // the two paths agree bit for bit
    QueryResult a, b;
    if (Status s = embedded(3, &a); !s.ok()) Die(s);
    if (Status s = remote->Query("ctx", 0, queries[3].data(), kQHeads, 1, kHeadDim, qo, &b);
        !s.ok()) {
      Die(s);
    }
    if (std::memcmp(a.output.data(), b.output.data(), a.output.size() * sizeof(float)) != 0) {
      std::fprintf(stderr, "net_bench: remote answer differs from the embedded one\n");
      return 1;
    }
  }

  // Concurrent clients, one connection each.
  std::printf("\n%-8s %12s %10s %10s %10s\n", "clients", "queries/s", "p50 us", "p99 us", "errors");
  for (int clients : {1, 8, 64}) {
    std::vector<std::unique_ptr<Store>> conns(clients);
    for (auto& c : conns) {
      if (Status s = net::ConnectStore(server->address(), "", &c); !s.ok()) Die(s);
    }
    std::vector<std::vector<double>> lat(clients);
    std::atomic<int> errors{0};
    std::atomic<bool> go{false};
    const auto start = Clock::now() + std::chrono::milliseconds(50);
    const auto until = start + std::chrono::seconds(seconds);
    std::vector<std::thread> threads;
    for (int c = 0; c < clients; ++c) {
      threads.emplace_back([&, c] {
        while (!go.load()) std::this_thread::yield();
        for (int i = c; Clock::now() < until; ++i) {
          QueryResult r;
          const auto t0 = Clock::now();
          Status s = conns[c]->Query("ctx", 0, queries[i % kQueryVariants].data(), kQHeads, 1,
                                     kHeadDim, qo, &r);
          if (!s.ok()) errors.fetch_add(1);
          lat[c].push_back(Micros(Clock::now() - t0));
        }
      });
    }
    std::this_thread::sleep_until(start);
    go.store(true);
    for (auto& t : threads) t.join();
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    std::vector<double> all;
    for (auto& v : lat) all.insert(all.end(), v.begin(), v.end());
    std::printf("%-8d %12.0f %10.1f %10.1f %10d\n", clients, all.size() / elapsed,
                Percentile(all, 0.5), Percentile(all, 0.99), errors.load());
  }
  server->Shutdown();
  if (Status s = server->Wait(); !s.ok()) Die(s);
  return 0;
}
