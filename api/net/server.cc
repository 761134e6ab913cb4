// Listeners, threads, signals and graceful shutdown of the server.
#include <algorithm>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <csignal>
#include <filesystem>

#include <sys/resource.h>

#include "api/net/client.h"
#include "api/net/server_impl.h"

namespace sqkv::net {
namespace {

// After a failed accept (e.g. out of file descriptors), wait this long before the next one.
constexpr auto kAcceptBackoff = std::chrono::milliseconds(50);
// A failing accept (say EMFILE) is logged at most this often, with the count of the ones between.
constexpr auto kAcceptLogInterval = std::chrono::seconds(10);
// Descriptors left to the store and the uploads when max_connections is fitted to the process's
// descriptor limit: this many, or a quarter of the limit if that is more.
constexpr rlim_t kFdReserve = 64;

// max_connections, lowered so that open connections cannot use up the descriptors the store and
// uploads need (a connection holds one; at the limit accept and the store's opens fail alike).
int ConnectionsTheFdLimitAllows(int wanted, rlim_t* limit) {
  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY) return wanted;
  *limit = rl.rlim_cur;
  const rlim_t reserve = std::max(kFdReserve, rl.rlim_cur / 4);
  if (rl.rlim_cur <= reserve) return 1;
  return static_cast<int>(std::min<rlim_t>(static_cast<rlim_t>(wanted), rl.rlim_cur - reserve));
}
// Upload directories the server creates are "up-<id>"; only those are removed at start.
constexpr std::string_view kUploadPrefix = "up-";

int WorkerCount(int asked) {
  if (asked > 0) return asked;
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

std::string FormatEndpoint(const tcp::endpoint& ep) {
  const auto a = ep.address();
  const std::string host = a.is_v6() ? "[" + a.to_string() + "]" : a.to_string();
  return host + ":" + std::to_string(ep.port());
}

}  // namespace

Status Server::Start(const ServerOptions& options, Store* store, std::unique_ptr<Server>* out) {
  if (store == nullptr) return Status::InvalidArgument("server: no store");
  if (options.io_threads < 1) return Status::InvalidArgument("--io-threads must be at least 1");
  if (options.max_message_bytes < (uint64_t{1} << 16)) {
    return Status::InvalidArgument("max message size must be at least 64 KiB");
  }
  if (options.chunk_bytes == 0 ||
      options.chunk_bytes + kChunkMessageRoom > options.max_message_bytes) {
    return Status::InvalidArgument("chunk size must be positive and fit in a message");
  }
  auto impl = std::make_unique<ServerImpl>(options, store);
  SQKV_RETURN_IF_ERROR(impl->Start());
  *out = std::move(impl);
  return Status::Ok();
}

namespace {

// Each io_context is run by exactly one thread (other threads only post to it).
constexpr int kOneThreadPerContext = 1;

std::vector<std::unique_ptr<asio::io_context>> MakeContexts(int n) {
  std::vector<std::unique_ptr<asio::io_context>> ios;
  for (int i = 0; i < std::max(1, n); ++i) {
    ios.push_back(std::make_unique<asio::io_context>(kOneThreadPerContext));
  }
  return ios;
}

}  // namespace

ServerImpl::ServerImpl(const ServerOptions& options, Store* store)
    : options_(options),
      store_(store),
      ios_(MakeContexts(options.io_threads)),
      control_(ios_[0]->get_executor()),
      acceptor_(control_),
      metrics_acceptor_(control_),
      workers_(WorkerCount(options.workers)) {
  for (auto& io : ios_) guards_.push_back(std::make_unique<WorkGuard>(io->get_executor()));
  limits_.max_message_bytes = options.max_message_bytes;
  upload_dir_ = options.upload_dir.empty() ? store->data_dir() + "/uploads" : options.upload_dir;
}

ServerImpl::~ServerImpl() {
  Shutdown();
  Wait().PermitUncheckedError();
}

void ServerImpl::Log(const std::string& line) const {
  if (options_.log) options_.log(line);
}

Status ServerImpl::Bind(const std::string& host_port, tcp::acceptor* acceptor, std::string* bound) {
  std::string host, port;
  SQKV_RETURN_IF_ERROR(SplitHostPort(host_port, &host, &port));
  boost::system::error_code ec;
  tcp::resolver resolver(control_);
  auto results = resolver.resolve(host, port, tcp::resolver::numeric_service, ec);
  if (ec || results.empty()) {
    return Status::InvalidArgument("cannot resolve listen address " + host_port + ": " +
                                   ec.message());
  }
  const tcp::endpoint ep = results.begin()->endpoint();
  if (acceptor->open(ep.protocol(), ec); ec) return Status::IOError("socket: " + ec.message());
  acceptor->set_option(tcp::acceptor::reuse_address(true), ec);
  if (acceptor->bind(ep, ec); ec) {
    return Status::Unavailable("cannot listen on " + host_port + ": " + ec.message());
  }
  if (acceptor->listen(asio::socket_base::max_listen_connections, ec); ec) {
    return Status::IOError("listen on " + host_port + ": " + ec.message());
  }
  *bound = FormatEndpoint(acceptor->local_endpoint());
  return Status::Ok();
}

Status ServerImpl::PrepareUploadDir() {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(upload_dir_, ec);
  if (ec) return Status::IOError("create upload directory " + upload_dir_ + ": " + ec.message());
  // Leftovers of a server that died mid-upload.
  for (const auto& entry : fs::directory_iterator(upload_dir_, ec)) {
    if (entry.path().filename().string().rfind(kUploadPrefix, 0) == 0) {
      fs::remove_all(entry.path(), ec);
    }
  }
  return Status::Ok();
}

Status ServerImpl::Start() {
  rlim_t fd_limit = 0;
  const int fitted = ConnectionsTheFdLimitAllows(options_.max_connections, &fd_limit);
  if (fitted < options_.max_connections) {
    Log("max_connections lowered from " + std::to_string(options_.max_connections) + " to " +
        std::to_string(fitted) + ": the process may open " + std::to_string(fd_limit) +
        " descriptors (ulimit -n)");
    options_.max_connections = fitted;
  }
  SQKV_RETURN_IF_ERROR(PrepareUploadDir());
  SQKV_RETURN_IF_ERROR(Bind(options_.listen, &acceptor_, &address_));
  if (!options_.metrics_listen.empty()) {
    SQKV_RETURN_IF_ERROR(Bind(options_.metrics_listen, &metrics_acceptor_, &metrics_address_));
  }
  if (options_.handle_signals) {
    signals_.emplace(control_, SIGINT, SIGTERM);
    signals_->async_wait([this](const boost::system::error_code& ec, int signo) {
      if (ec) return;
      Log("signal " + std::to_string(signo) + ": finishing in-flight requests, then exiting");
      Shutdown();
    });
  }
  asio::co_spawn(control_, AcceptLoop(), asio::detached);
  if (metrics_acceptor_.is_open()) asio::co_spawn(control_, MetricsAcceptLoop(), asio::detached);
  for (auto& io : ios_) io_threads_.emplace_back([ctx = io.get()] { ctx->run(); });
  Log("serving " + store_->data_dir() + " on " + address_ +
      (metrics_address_.empty() ? "" : ", metrics on http://" + metrics_address_ + "/metrics") +
      (options_.auth_token.empty() ? "" : ", token required"));
  return Status::Ok();
}

asio::awaitable<void> ServerImpl::AcceptLoop() {
  asio::steady_timer backoff(control_);
  std::chrono::steady_clock::time_point logged{};
  uint64_t unlogged = 0;  // failed accepts since the last line
  while (!stopping()) {
    auto [ec, socket] =
        co_await acceptor_.async_accept(NextIo(), asio::as_tuple(asio::use_awaitable));
    if (stopping()) break;
    if (ec) {
      const auto now = std::chrono::steady_clock::now();
      if (logged == std::chrono::steady_clock::time_point{} || now - logged >= kAcceptLogInterval) {
        Log("accept: " + ec.message() +
            (unlogged > 0 ? " (and " + std::to_string(unlogged) + " more since the last line)"
                          : ""));
        logged = now;
        unlogged = 0;
      } else {
        ++unlogged;
      }
      backoff.expires_after(kAcceptBackoff);
      co_await backoff.async_wait(asio::as_tuple(asio::use_awaitable));
      continue;
    }
    if (metrics_.connections_open.load() >= options_.max_connections) {
      metrics_.connections_refused.fetch_add(1);
      boost::system::error_code ignored;
      socket.close(ignored);
      continue;
    }
    boost::system::error_code ignored;
    socket.set_option(tcp::no_delay(true), ignored);
    auto state = std::make_shared<SessionState>(std::move(socket));
    uint64_t id;
    {
      std::lock_guard<std::mutex> lock(sessions_mu_);
      id = ++next_session_id_;
      sessions_[id] = state;
    }
    metrics_.connections_opened.fetch_add(1);
    metrics_.connections_open.fetch_add(1);
    auto ex = state->socket.get_executor();
    asio::co_spawn(ex, RunSession(this, id, std::move(state)), [this](std::exception_ptr e) {
      if (!e) return;
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& x) {
        Log(std::string("connection ended by an exception: ") + x.what());
      }
    });
  }
}

asio::awaitable<void> ServerImpl::MetricsAcceptLoop() {
  asio::steady_timer backoff(control_);
  while (!stopping()) {
    auto [ec, socket] =
        co_await metrics_acceptor_.async_accept(NextIo(), asio::as_tuple(asio::use_awaitable));
    if (stopping()) break;
    if (ec) {
      backoff.expires_after(kAcceptBackoff);
      co_await backoff.async_wait(asio::as_tuple(asio::use_awaitable));
      continue;
    }
    auto ex = socket.get_executor();
    asio::co_spawn(ex, RunMetricsSession(this, std::move(socket)), asio::detached);
  }
}

bool ServerImpl::ReserveFrameBytes(uint64_t bytes) {
  uint64_t used = frame_bytes_.load();
  do {
    if (used + bytes > options_.max_inflight_message_bytes) return false;
  } while (!frame_bytes_.compare_exchange_weak(used, used + bytes));
  return true;
}

void ServerImpl::Unregister(uint64_t session_id) {
  std::lock_guard<std::mutex> lock(sessions_mu_);
  sessions_.erase(session_id);
}

void ServerImpl::Shutdown() {
  if (stopping_.exchange(true, std::memory_order_acq_rel)) return;
  asio::post(control_, [this] {
    boost::system::error_code ignored;
    acceptor_.close(ignored);
    metrics_acceptor_.close(ignored);
    if (signals_) {
      signals_->cancel(ignored);
      // A second SIGINT/SIGTERM now has its default effect (ends the process at once).
      signals_->clear(ignored);
    }
  });
  // Each context ends once its connections have (the guard is dropped on its own thread).
  for (size_t i = 0; i < ios_.size(); ++i) {
    asio::post(*ios_[i], [guard = guards_[i].get()] { guard->reset(); });
  }
  std::lock_guard<std::mutex> lock(sessions_mu_);
  for (auto& [id, weak] : sessions_) {
    auto state = weak.lock();
    if (!state) continue;
    auto ex = state->socket.get_executor();
    asio::post(ex, [state] {
      if (state->busy && !state->reading) return;  // it stops after answering its request
      boost::system::error_code ignored;
      state->socket.close(ignored);
    });
  }
}

Status ServerImpl::Wait() {
  std::call_once(joined_, [this] {
    for (auto& t : io_threads_) t.join();
    workers_.join();  // calls that outlived their deadline finish here
    Log("stopped");
  });
  return Status::Ok();
}

}  // namespace sqkv::net
