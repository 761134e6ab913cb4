// Private: the server's state shared by server.cc (listeners, threads, shutdown), session.cc (one
// coroutine per client connection) and metrics_http.cc (the Prometheus endpoint). Boost.Asio
// lives here and in those files only.
#pragma once

#include <atomic>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "api/net/messages.h"
#include "api/net/metrics.h"
#include "api/net/server.h"

namespace sqkv::net {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

// One client connection. Every field is touched only on the thread of the socket's io_context.
struct SessionState {
  explicit SessionState(tcp::socket s) : socket(std::move(s)), watchdog(socket.get_executor()) {}
  tcp::socket socket;
  // The watchdog closes the connection when `deadline` passes (checked on a tick, session.cc).
  asio::steady_timer watchdog;
  Clock::time_point deadline = Clock::time_point::max();
  // True from a request's first byte to its answer's last: Shutdown() leaves such a connection
  // to finish, and closes idle ones.
  bool busy = false;
  // True while a request's frame is still arriving: nothing has been dispatched, so Shutdown()
  // closes such a connection too (a client that stalled mid-frame held the stop for io_timeout).
  bool reading = false;
};

class ServerImpl final : public Server {
 public:
  ServerImpl(const ServerOptions& options, Store* store);
  ~ServerImpl() override;

  // Binds the listeners, empties the upload directory, starts the threads.
  Status Start();

  std::string address() const override { return address_; }
  std::string metrics_address() const override { return metrics_address_; }
  void Shutdown() override;
  Status Wait() override;

  // For sessions.
  const ServerOptions& options() const { return options_; }
  const Limits& limits() const { return limits_; }
  Store* store() { return store_; }
  Metrics& metrics() { return metrics_; }
  asio::thread_pool& workers() { return workers_; }
  bool stopping() const { return stopping_.load(std::memory_order_acquire); }
  const std::string& upload_dir() const { return upload_dir_; }
  uint64_t NextUploadId() { return next_upload_id_.fetch_add(1) + 1; }
  // Reserves `bytes` of the large-message budget (max_inflight_message_bytes); false when full.
  bool ReserveFrameBytes(uint64_t bytes);
  void ReleaseFrameBytes(uint64_t bytes) { frame_bytes_.fetch_sub(bytes); }
  void Log(const std::string& line) const;
  void Unregister(uint64_t session_id);

 private:
  asio::awaitable<void> AcceptLoop();
  asio::awaitable<void> MetricsAcceptLoop();
  Status Bind(const std::string& host_port, tcp::acceptor* acceptor, std::string* bound);
  Status PrepareUploadDir();
  asio::io_context::executor_type NextIo() {
    return ios_[next_io_++ % ios_.size()]->get_executor();
  }

  ServerOptions options_;
  Limits limits_;
  Store* store_;
  Metrics metrics_;
  std::string address_, metrics_address_, upload_dir_;

  // One io_context per I/O thread (Asio's io_context-per-thread pool): a connection lives on one
  // of them for its whole life, so its completions never hop between I/O threads and need no
  // strand. Context 0 also runs the acceptors and the signal set.
  using WorkGuard = asio::executor_work_guard<asio::io_context::executor_type>;
  std::vector<std::unique_ptr<asio::io_context>> ios_;
  std::vector<std::unique_ptr<WorkGuard>> guards_;  // keep idle contexts running until Shutdown
  size_t next_io_ = 0;                              // round robin; touched by the accept loops
  asio::io_context::executor_type control_;
  tcp::acceptor acceptor_;
  tcp::acceptor metrics_acceptor_;
  std::optional<asio::signal_set> signals_;
  asio::thread_pool workers_;
  std::vector<std::thread> io_threads_;

  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> next_upload_id_{0};
  std::atomic<uint64_t> frame_bytes_{0};
  std::mutex sessions_mu_;
  uint64_t next_session_id_ = 0;  // under sessions_mu_
  std::unordered_map<uint64_t, std::weak_ptr<SessionState>> sessions_;
  std::once_flag joined_;
};

// api/net/session.cc: serves one client connection until it closes, times out, or the server
// stops.
asio::awaitable<void> RunSession(ServerImpl* server, uint64_t session_id,
                                 std::shared_ptr<SessionState> state);

// api/net/metrics_http.cc: answers one HTTP request (GET /metrics) and closes.
asio::awaitable<void> RunMetricsSession(ServerImpl* server, tcp::socket socket);

}  // namespace sqkv::net
