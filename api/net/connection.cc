// The client side of a connection: blocking calls built from Asio operations run on a private
// io_context until the call's deadline, after which the socket is closed (the pattern of Asio's
// blocking client with timeouts).
#include "api/net/connection.h"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include "api/net/codec.h"

namespace sqkv::net {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using asio::as_tuple;
using asio::use_awaitable;

constexpr char kClientName[] = "sqkv-client 0.1.0";
// Frame buffers larger than this are released after the call that needed them.
constexpr size_t kKeepBufferWords = (size_t{4} << 20) / kWordBytes;
// How often a waiting call asks whether it is cancelled.
constexpr auto kCancelPoll = std::chrono::milliseconds(100);

class AsioConnection final : public Connection {
 public:
  AsioConnection(std::string peer, const ClientOptions& options)
      : peer_(std::move(peer)), socket_(io_) {
    limits_.max_message_bytes = options.max_message_bytes;
  }

  Status Connect(const std::string& host, const std::string& port, Clock::time_point deadline) {
    boost::system::error_code ec;
    tcp::resolver resolver(io_);
    auto endpoints = resolver.resolve(host, port, tcp::resolver::numeric_service, ec);
    if (ec) return Status::Unavailable("cannot resolve " + peer_ + ": " + ec.message());
    Status result;
    const bool finished = RunUntil(deadline, nullptr, [&]() -> asio::awaitable<void> {
      auto [cec, ep] = co_await asio::async_connect(socket_, endpoints, as_tuple(use_awaitable));
      result =
          cec ? Status::Unavailable("connect to " + peer_ + ": " + cec.message()) : Status::Ok();
    });
    if (!finished) result = Status::Unavailable("connect to " + peer_ + ": timed out");
    if (!result.ok()) {
      broken_ = true;
      return result;
    }
    socket_.set_option(tcp::no_delay(true), ec);
    return Status::Ok();
  }

  Status Call(const Request& request, Clock::time_point deadline, Response* out,
              const OnProgress& on_progress, const IsCancelled& cancelled) override {
    if (broken_) return Status::Unavailable("connection to " + peer_ + " is closed");
    SQKV_RETURN_IF_ERROR(EncodeRequest(request, &out_));
    Status result = Status::Internal("call to " + peer_ + " ended without a result");
    const bool finished = RunUntil(deadline, cancelled, [&]() -> asio::awaitable<void> {
      auto [wec, wn] = co_await asio::async_write(
          socket_, asio::buffer(out_.data(), out_.size() * kWordBytes), as_tuple(use_awaitable));
      if (wec) {
        result = Lost("sending", wec);
        // The server may have refused the request before reading all of it (a message over its
        // limit, a busy server) and closed: its answer, if it came, says why.
        if (wec == asio::error::broken_pipe || wec == asio::error::connection_reset) {
          const Status read = co_await ReadFrame();
          Response refused;
          if (read.ok() && DecodeResponse(in_.data(), in_.size(), limits_, &refused).ok() &&
              !refused.status.ok() && (refused.id == 0 || refused.id == request.id)) {
            result = refused.status;
          }
        }
        co_return;
      }
      for (;;) {
        Status read = co_await ReadFrame();
        if (!read.ok()) {
          result = read;
          co_return;
        }
        Response response;
        Status decoded = DecodeResponse(in_.data(), in_.size(), limits_, &response);
        if (!decoded.ok()) {
          result = decoded.WithContext("answer from " + peer_);
          co_return;
        }
        if (response.id != request.id) {
          // id 0: the server could not decode our request and says why.
          result = response.id == 0 && !response.status.ok()
                       ? response.status
                       : Status::Internal("server " + peer_ + " answered request " +
                                          std::to_string(response.id) + ", expected " +
                                          std::to_string(request.id));
          co_return;
        }
        if (const auto* p = std::get_if<ProgressReply>(&response.body);
            p != nullptr && response.status.ok()) {
          if (on_progress) on_progress(*p);
          continue;
        }
        *out = std::move(response);
        result = Status::Ok();
        co_return;
      }
    });
    if (!finished) {
      result = cancelled && cancelled()
                   ? Status::Cancelled("cancelled: closed the connection to " + peer_ +
                                       "; the server stops an import or rebuild at its next "
                                       "(layer, kv head) and publishes nothing, unless it was "
                                       "already publishing")
                   : Status::Unavailable("server " + peer_ + ": deadline exceeded");
    }
    if (!result.ok()) broken_ = true;  // the stream position is unknown: never reuse
    if (out_.capacity() > kKeepBufferWords) std::vector<uint64_t>().swap(out_);
    if (in_.capacity() > kKeepBufferWords) std::vector<uint64_t>().swap(in_);
    return result;
  }

  bool broken() const override { return broken_; }

 private:
  Status Lost(const char* what, const boost::system::error_code& ec) const {
    return Status::Unavailable("server " + peer_ + ": connection lost " + what + " (" +
                               ec.message() + ")");
  }

  // Reads one frame into in_.
  asio::awaitable<Status> ReadFrame() {
    in_.resize(1);
    auto [ec, n] = co_await asio::async_read(socket_, asio::buffer(in_.data(), kWordBytes),
                                             as_tuple(use_awaitable));
    if (ec) co_return Lost("reading", ec);
    auto table = FrameTableBytes(in_.data(), limits_);
    if (!table.ok()) co_return table.status().WithContext("answer from " + peer_);
    in_.resize(*table / kWordBytes);
    if (*table > kWordBytes) {
      auto [ec2, n2] = co_await asio::async_read(
          socket_, asio::buffer(in_.data() + 1, *table - kWordBytes), as_tuple(use_awaitable));
      if (ec2) co_return Lost("reading", ec2);
    }
    auto total = FrameBytes(in_.data(), *table, limits_);
    if (!total.ok()) co_return total.status().WithContext("answer from " + peer_);
    in_.resize(*total / kWordBytes);
    if (*total > *table) {
      auto [ec3, n3] = co_await asio::async_read(
          socket_, asio::buffer(reinterpret_cast<uint8_t*>(in_.data()) + *table, *total - *table),
          as_tuple(use_awaitable));
      if (ec3) co_return Lost("reading", ec3);
    }
    co_return Status::Ok();
  }

  // Runs `body` on the private io_context until it ends (true), or `deadline` passes or
  // `cancelled` (asked every kCancelPoll; may be null) says so (false); then the socket is closed,
  // which ends any operation in flight.
  template <typename Body>
  bool RunUntil(Clock::time_point deadline, const IsCancelled& cancelled, Body body) {
    bool finished = false;
    io_.restart();
    asio::co_spawn(io_, body, [&finished](std::exception_ptr) { finished = true; });
    if (!cancelled && deadline == Clock::time_point::max()) {
      io_.run();
    } else {
      for (;;) {
        const auto slice =
            cancelled ? std::min(deadline, Clock::now() + kCancelPoll) : deadline;
        io_.run_until(slice);
        if (finished || io_.stopped() || Clock::now() >= deadline) break;
        if (cancelled && cancelled()) break;
      }
    }
    if (!finished) {
      broken_ = true;
      boost::system::error_code ignored;
      socket_.close(ignored);
      io_.restart();
      io_.run();  // lets the coroutine see the closed socket and end
      return false;
    }
    return true;
  }

  std::string peer_;
  Limits limits_;
  asio::io_context io_{1};
  tcp::socket socket_;
  std::vector<uint64_t> out_, in_;
  bool broken_ = false;
};

}  // namespace

Status Connection::Open(const std::string& host, const std::string& port,
                        const ClientOptions& options, std::unique_ptr<Connection>* out) {
  const std::string peer =
      (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" + port;
  auto conn = std::make_unique<AsioConnection>(peer, options);
  const auto deadline = Clock::now() + std::chrono::milliseconds(options.connect_timeout_ms);
  SQKV_RETURN_IF_ERROR(conn->Connect(host, port, deadline));
  Request hello;
  hello.id = 1;
  hello.call = HelloCall{kProtocolVersion, options.token, kClientName};
  Response reply;
  SQKV_RETURN_IF_ERROR(conn->Call(hello, deadline, &reply, nullptr, nullptr));
  if (!reply.status.ok()) return reply.status.WithContext("server " + peer);
  const auto* h = std::get_if<HelloReply>(&reply.body);
  if (h == nullptr) return Status::Internal("server " + peer + " answered hello with another call");
  *out = std::move(conn);
  return Status::Ok();
}

}  // namespace sqkv::net
