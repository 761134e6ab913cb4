// Helpers of the server tests: a live server on 127.0.0.1 (random port) over an embedded store,
// raw sockets that speak the framing by hand, and a store that answers queries slowly.
#pragma once

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "api/net/client.h"
#include "api/net/codec.h"
#include "api/net/server.h"
#include "api/store.h"
#include "api/synthetic.h"
#include "tests/testing/testing.h"

namespace sqkv::net::testing {

using sqkv::testing::ScratchDir;

// Writes a small synthetic context (with window queries) and imports it as `name`.
// queries: filled with layer-0 user queries (q_heads, n, head_dim) when not null.
inline void ImportSynthetic(Store* store, const std::string& dir, const std::string& name,
                            const SyntheticOptions& options, std::vector<float>* queries) {
  const std::string path = dir + "/" + name + ".safetensors";
  ASSERT_TRUE(WriteSyntheticContext(options, path, queries).ok());
  Status s = store->Import(name, path, ImportOptions(), nullptr);
  ASSERT_TRUE(s.ok()) << s.ToString();
}

// A query call that decodes but is wrong: its q holds 3 values where its shape says 2 × 1 × 8.
inline QueryCall MalformedQuery() {
  QueryCall bad;
  bad.name = "doc";
  bad.q_heads = 2;
  bad.n = 1;
  bad.head_dim = 8;
  bad.q.assign(3, 1.f);
  return bad;
}

inline SyntheticOptions SmallContext(uint64_t seed) {
  SyntheticOptions o;
  o.layers = 2;
  o.kv_heads = 2;
  o.q_heads = 8;
  o.tokens = 512;
  o.head_dim = 64;
  o.n = 2;
  o.window = 8;
  o.seed = seed;
  return o;
}

// An embedded store in a scratch directory served on 127.0.0.1 with a free port.
class LiveServer {
 public:
  explicit LiveServer(ServerOptions options = ServerOptions()) {
    StoreOptions so;
    so.data_dir = dir_.file("data");
    Status s = Store::Open(so, &store_);
    EXPECT_TRUE(s.ok()) << s.ToString();
    Start(std::move(options));
  }
  // Serves `store` (not owned) instead.
  LiveServer(Store* store, ServerOptions options) : borrowed_(store) { Start(std::move(options)); }

  ~LiveServer() { Stop(); }

  void Stop() {
    if (server_) {
      server_->Shutdown();
      EXPECT_TRUE(server_->Wait().ok());
      server_.reset();
    }
  }

  Store* store() { return borrowed_ ? borrowed_ : store_.get(); }
  Server* server() { return server_.get(); }
  std::string address() const { return address_; }
  std::string dir() const { return dir_.path().string(); }

  std::unique_ptr<Store> Connect(const std::string& token = "") {
    std::unique_ptr<Store> remote;
    Status s = ConnectStore(address_, token, &remote);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return remote;
  }

 private:
  void Start(ServerOptions options) {
    options.listen = "127.0.0.1:0";
    if (!options.metrics_listen.empty()) options.metrics_listen = "127.0.0.1:0";
    if (options.upload_dir.empty()) options.upload_dir = dir_.file("uploads");
    Status s = Server::Start(options, store(), &server_);
    ASSERT_TRUE(s.ok()) << s.ToString();
    address_ = server_->address();
  }

  ScratchDir dir_;
  std::unique_ptr<Store> store_;
  Store* borrowed_ = nullptr;
  std::unique_ptr<Server> server_;
  std::string address_;
};

// A blocking TCP socket to 127.0.0.1:port with receive timeouts; closed on destruction.
class RawSocket {
 public:
  explicit RawSocket(const std::string& address) {
    const size_t colon = address.rfind(':');
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(static_cast<uint16_t>(std::stoi(address.substr(colon + 1))));
    ::inet_pton(AF_INET, address.substr(0, colon).c_str(), &sa.sin_addr);
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd_ >= 0 && ::connect(fd_, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
      ::close(fd_);
      fd_ = -1;
    }
    if (fd_ >= 0) {
      const int one = 1;
      ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
  }
  ~RawSocket() {
    if (fd_ >= 0) ::close(fd_);
  }
  RawSocket(const RawSocket&) = delete;
  RawSocket& operator=(const RawSocket&) = delete;

  bool ok() const { return fd_ >= 0; }

  // False when the peer is gone (EPIPE/ECONNRESET), which garbage tests accept.
  bool Send(const void* data, size_t size) {
    const auto* p = static_cast<const char*>(data);
    while (size > 0) {
      const ssize_t n = ::send(fd_, p, size, MSG_NOSIGNAL);
      if (n <= 0) return false;
      p += n;
      size -= static_cast<size_t>(n);
    }
    return true;
  }

  // Tells the server we are done sending (it sees end of stream).
  void ShutdownWrite() { ::shutdown(fd_, SHUT_WR); }

  bool SendRequest(const Request& r) {
    std::vector<uint64_t> frame;
    if (!EncodeRequest(r, &frame).ok()) return false;
    return Send(frame.data(), frame.size() * kWordBytes);
  }

  // Reads exactly `size` bytes within `timeout`; false on EOF, error or timeout.
  bool RecvExactly(void* data, size_t size, std::chrono::milliseconds timeout) {
    auto* p = static_cast<char*>(data);
    const auto until = std::chrono::steady_clock::now() + timeout;
    while (size > 0) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          until - std::chrono::steady_clock::now());
      if (left.count() <= 0) return false;
      pollfd pfd{fd_, POLLIN, 0};
      if (::poll(&pfd, 1, static_cast<int>(left.count())) <= 0) return false;
      const ssize_t n = ::recv(fd_, p, size, 0);
      if (n <= 0) return false;
      p += n;
      size -= static_cast<size_t>(n);
    }
    return true;
  }

  // Reads one answer frame. False when the connection closed (or timed out) first.
  bool ReadResponse(Response* out, std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    const Limits limits;
    std::vector<uint64_t> frame(1);
    if (!RecvExactly(frame.data(), kWordBytes, timeout)) return false;
    auto table = FrameTableBytes(frame.data(), limits);
    if (!table.ok()) return false;
    frame.resize(*table / kWordBytes);
    if (!RecvExactly(frame.data() + 1, *table - kWordBytes, timeout)) return false;
    auto total = FrameBytes(frame.data(), *table, limits);
    if (!total.ok()) return false;
    frame.resize(*total / kWordBytes);
    if (!RecvExactly(reinterpret_cast<char*>(frame.data()) + *table, *total - *table, timeout)) {
      return false;
    }
    return DecodeResponse(frame.data(), frame.size(), limits, out).ok();
  }

  // Everything until the peer closes (at most max_bytes, within timeout).
  std::string ReadUntilClosed(std::chrono::milliseconds timeout, size_t max_bytes = 1 << 20) {
    std::string out;
    const auto until = std::chrono::steady_clock::now() + timeout;
    char buf[4096];
    while (out.size() < max_bytes) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          until - std::chrono::steady_clock::now());
      if (left.count() <= 0) break;
      pollfd pfd{fd_, POLLIN, 0};
      if (::poll(&pfd, 1, static_cast<int>(left.count())) <= 0) break;
      const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n <= 0) break;
      out.append(buf, static_cast<size_t>(n));
    }
    return out;
  }

  // True when the server closed the connection (EOF) within `timeout`.
  bool ClosedByPeer(std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    const auto until = std::chrono::steady_clock::now() + timeout;
    char buf[4096];
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          until - std::chrono::steady_clock::now());
      if (left.count() <= 0) return false;
      pollfd pfd{fd_, POLLIN, 0};
      if (::poll(&pfd, 1, static_cast<int>(left.count())) <= 0) return false;
      const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n <= 0) return true;  // EOF or reset
    }
  }

 private:
  int fd_ = -1;
};

// A store that forwards to another and sleeps `query_delay` in every Query: keeps a request in
// flight long enough to test deadlines and graceful shutdown. With a progress delay, an import
// also sleeps that long after each progress report of the inner import.
class SlowStore final : public Store {
 public:
  SlowStore(Store* inner, std::chrono::milliseconds query_delay,
            std::chrono::milliseconds progress_delay = std::chrono::milliseconds(0))
      : Store(inner->data_dir()),
        inner_(inner),
        delay_(query_delay),
        progress_delay_(progress_delay) {}

  Status Query(const std::string& name, int layer, const float* q, int q_heads, int n, int head_dim,
               const QueryOptions& options, QueryResult* result) override {
    entered_.fetch_add(1);
    const int running = in_flight_.fetch_add(1) + 1;
    int seen = max_in_flight_.load();
    while (running > seen && !max_in_flight_.compare_exchange_weak(seen, running)) {
    }
    std::this_thread::sleep_for(delay_);
    in_flight_.fetch_sub(1);
    Status s = inner_->Query(name, layer, q, q_heads, n, head_dim, options, result);
    {
      std::lock_guard<std::mutex> lock(mu_);
      last_query_ = s;
    }
    returned_.fetch_add(1);
    return s;
  }

  // Queries that have started (on a worker), and that have returned.
  int entered() const { return entered_.load(); }
  int returned() const { return returned_.load(); }
  // What the inner store answered the last query that returned.
  Status last_query() const {
    std::lock_guard<std::mutex> lock(mu_);
    return last_query_;
  }
  // Most queries that were sleeping at once.
  int max_in_flight() const { return max_in_flight_.load(); }
  Status Import(const std::string& name, const std::string& path, const ImportOptions& options,
                ContextInfo* info) override {
    ImportOptions slowed = options;
    if (options.progress && progress_delay_.count() > 0) {
      slowed.progress = [report = options.progress, delay = progress_delay_](int done, int total) {
        report(done, total);
        std::this_thread::sleep_for(delay);
      };
    }
    return inner_->Import(name, path, slowed, info);
  }
  Status List(std::vector<ContextInfo>* out) override { return inner_->List(out); }
  Status Info(const std::string& name, ContextInfo* out) override {
    return inner_->Info(name, out);
  }
  Status Remove(const std::string& name) override { return inner_->Remove(name); }
  Status Rebuild(const std::string& name, const ImportOptions& options,
                 ContextInfo* info) override {
    return inner_->Rebuild(name, options, info);
  }
  Status Calibrate(const std::string& name, const std::vector<WindowQueries>* queries,
                   const std::vector<float>& sparsities) override {
    return inner_->Calibrate(name, queries, sparsities);
  }
  Status GetThresholds(const std::string& name, int layer, Thresholds* out) override {
    return inner_->GetThresholds(name, layer, out);
  }
  Status Verify(const std::string& name, const ProgressFn& progress,
                VerifyReport* report) override {
    return inner_->Verify(name, progress, report);
  }
  Status Compact(CompactReport* report) override { return inner_->Compact(report); }
  Status Stats(StoreStats* out) override { return inner_->Stats(out); }
  Status Pin(const std::string& name, Tier tier) override { return inner_->Pin(name, tier); }
  Status Unpin(const std::string& name) override { return inner_->Unpin(name); }
  Status Preload(const std::string& name, Tier tier) override {
    return inner_->Preload(name, tier);
  }
  Status ListPins(std::vector<std::pair<std::string, Tier>>* out) override {
    return inner_->ListPins(out);
  }
  Status GetTierStats(TierStats* out) override { return inner_->GetTierStats(out); }

 private:
  Store* inner_;
  std::chrono::milliseconds delay_, progress_delay_;
  std::atomic<int> returned_{0};
  mutable std::mutex mu_;
  Status last_query_;
  std::atomic<int> entered_{0}, in_flight_{0}, max_in_flight_{0};
};

// A calibrate request whose queries are a list of `elements` empty structs: such a list costs
// the sender nothing per element (the list is a tag word), so only the decoder's traversal limit
// bounds it. The frame carries about `elements` / 2 unreachable words, for that limit's sake.
inline std::vector<uint64_t> EmptyStructsCalibrateFrame(uint32_t elements) {
  constexpr int kSlackFloats = 1024;  // beyond the traversal the rest of the message costs
  CalibrateCall c;
  c.name = "doc";
  c.use_stored_queries = false;
  WindowQueries w;
  w.q_heads = 1;
  w.window = 1;
  w.head_dim = static_cast<int>(elements) + kSlackFloats;
  w.data.assign(static_cast<size_t>(w.head_dim), 0.f);
  c.queries.push_back(std::move(w));
  c.sparsities = {0.5f};
  std::vector<uint64_t> frame;
  EXPECT_TRUE(EncodeRequest(Request{1, 0, c}, &frame).ok());
  // The list's tag word (1 element of 2 data words and 1 pointer) and its pointer (a list of
  // composite elements, 3 words): both say 0 words per element now, and the tag `elements`.
  constexpr uint64_t kTag = (uint64_t{1} << 2) | (uint64_t{2} << 32) | (uint64_t{1} << 48);
  constexpr uint64_t kListPointer = 1, kComposite = 7, kListWords = 3;
  constexpr int kWordCountShift = 35;
  int tags = 0, pointers = 0;
  for (uint64_t& word : frame) {
    if (word == kTag) {
      word = uint64_t{elements} << 2;
      ++tags;
    } else if ((word & 3) == kListPointer && ((word >> 32) & 7) == kComposite &&
               (word >> kWordCountShift) == kListWords) {
      word &= (uint64_t{1} << kWordCountShift) - 1;
      ++pointers;
    }
  }
  EXPECT_EQ(tags, 1);
  EXPECT_EQ(pointers, 1);
  return frame;
}

}  // namespace sqkv::net::testing
