// One coroutine per client connection: read a frame, decode it, run the call on the workers,
// write the answer; repeat. A watchdog beside it closes the connection when the current I/O
// deadline passes (idle between requests, or a frame or answer that is too slow).
#include <sys/socket.h>

#include <algorithm>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <cerrno>
#include <limits>
#include <memory>

#include "api/net/codec.h"
#include "api/net/server_impl.h"
#include "api/net/session_calls.h"
#include "api/net/worker_call.h"

namespace sqkv::net {
namespace {

using asio::as_tuple;
using asio::use_awaitable;

// The request and answer buffers a connection keeps between messages; larger ones are freed once
// their message is done (4 MiB kept per buffer let 300 idle connections that had each sent one
// 4 MB query hold 2.4 GB).
constexpr size_t kKeepBufferWords = (size_t{64} << 10) / kWordBytes;
// Frames larger than this count against the server's max_inflight_message_bytes.
constexpr uint64_t kLargeFrameBytes = uint64_t{1} << 20;
// Largest frame read before a connection has authenticated (when the server has a token): hello
// needs a few KiB (token and client name are capped at 4 KiB and 1 KiB).
constexpr uint64_t kMaxUnauthenticatedFrameBytes = uint64_t{64} << 10;

constexpr char kServerName[] = "sqkv-serve 0.1.0";

// The watchdog looks at the deadline on a steady tick rather than being re-armed on every change
// (a request moves the deadline four times): a quarter of the shortest timeout, within bounds.
constexpr auto kMinTick = std::chrono::milliseconds(10);
constexpr auto kMaxTick = std::chrono::milliseconds(1000);

Clock::duration WatchdogTick(const ServerOptions& o) {
  uint32_t shortest = std::numeric_limits<uint32_t>::max();
  for (uint32_t ms : {o.idle_timeout_ms, o.io_timeout_ms}) {
    if (ms > 0) shortest = std::min(shortest, ms);
  }
  const auto quarter = std::chrono::milliseconds(shortest / 4);
  return std::clamp<Clock::duration>(quarter, kMinTick, kMaxTick);
}

// Moves the connection's I/O deadline (the watchdog notices within a tick).
void SetDeadline(SessionState& st, Clock::time_point t) { st.deadline = t; }

Clock::time_point After(uint32_t ms) {
  return ms == 0 ? Clock::time_point::max() : Clock::now() + std::chrono::milliseconds(ms);
}

// Closes the connection when its deadline passes. Ends when the session ends (cancellation).
asio::awaitable<void> Watchdog(ServerImpl* server, std::shared_ptr<SessionState> st) {
  const Clock::duration tick = WatchdogTick(server->options());
  for (;;) {
    const auto now = Clock::now();
    if (st->deadline <= now) break;
    st->watchdog.expires_at(std::min(st->deadline, now + tick));
    co_await st->watchdog.async_wait(as_tuple(use_awaitable));
    auto cs = co_await asio::this_coro::cancellation_state;
    if (cs.cancelled() != asio::cancellation_type::none) co_return;  // the session ended
  }
  server->metrics().timeouts.fetch_add(1);
  boost::system::error_code ignored;
  st->socket.close(ignored);
}

class Session {
 public:
  Session(ServerImpl* server, std::shared_ptr<SessionState> st)
      : server_(server),
        st_(std::move(st)),
        calls_(server, st_->socket.get_executor()),
        authenticated_(server->options().auth_token.empty()) {}

  ~Session() { ReleaseBudget(); }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  asio::awaitable<void> Serve() {
    for (;;) {
      st_->busy = false;
      ReleaseBudget();  // the last request's call has ended, on the workers too (Settle)
      if (server_->stopping()) co_return;
      SetDeadline(*st_, After(server_->options().idle_timeout_ms));
      Request request;
      Status decoded;
      bool framing_ok = false;
      const bool read = co_await ReadFrame(&decoded, &framing_ok);
      st_->reading = false;
      if (!read) co_return;  // closed, timed out, stopped
      const auto started = Clock::now();
      if (decoded.ok() && !authenticated_) {
        // Before hello only hello is decoded: another call is refused on its id alone.
        RequestHead head;
        decoded = PeekRequest(frame_.get(), frame_words_, server_->limits(), &head);
        if (decoded.ok() && !head.is_hello) {
          server_->metrics().auth_failures.fetch_add(1);
          const Response refusal{head.id,
                                 Status::Unavailable("authentication required: the server has a "
                                                     "token; send hello with it first"),
                                 {}};
          co_await Send(refusal);
          co_return;
        }
      }
      if (decoded.ok())
        decoded = DecodeRequest(frame_.get(), frame_words_, server_->limits(), &request);
      ShrinkBuffer();
      if (!decoded.ok()) {
        // The frame was read whole: its framing is intact, so the connection can go on unless
        // the table itself was bad.
        server_->metrics().protocol_errors.fetch_add(1);
        const Response error{0, decoded, {}};
        const bool sent = co_await Send(error);
        if (!sent || !framing_ok || !authenticated_) co_return;  // strangers get one chance
        continue;
      }
      bool keep_open = true;
      co_await Dispatch(request, started, &keep_open);
      if (!keep_open) co_return;
      co_await Settle();
    }
  }

  // Waits until a call this connection abandoned at its deadline has ended on the workers (see
  // SessionCalls::Settle): the next request is read only then. The connection counts as idle
  // meanwhile (Shutdown may close it), but reads nothing.
  asio::awaitable<void> Settle() {
    st_->busy = false;
    SetDeadline(*st_, Clock::time_point::max());
    co_await calls_.Settle();
  }

 private:
  // Reads one frame into frame_. False when the connection is gone (or the server stops before
  // a request began). A bad table is answered with an error and *framing_ok false.
  asio::awaitable<bool> ReadFrame(Status* status, bool* framing_ok) {
    EnsureBuffer(1);
    auto [ec, n] = co_await asio::async_read(st_->socket, asio::buffer(frame_.get(), kWordBytes),
                                             as_tuple(use_awaitable));
    if (ec) co_return false;
    st_->busy = true;
    st_->reading = true;  // until Serve has the whole frame (or gives up on it)
    SetDeadline(*st_, After(server_->options().io_timeout_ms));
    server_->metrics().bytes_received.fetch_add(n);
    auto table = FrameTableBytes(frame_.get(), server_->limits());
    if (!table.ok()) {
      *status = table.status();
      co_return true;
    }
    EnsureBuffer(*table / kWordBytes);
    if (*table > kWordBytes) {
      auto [ec2, n2] = co_await asio::async_read(
          st_->socket, asio::buffer(frame_.get() + 1, *table - kWordBytes),
          as_tuple(use_awaitable));
      if (ec2) co_return false;
      server_->metrics().bytes_received.fetch_add(n2);
    }
    auto total = FrameBytes(frame_.get(), *table, server_->limits());
    if (!total.ok()) {
      *status = total.status();
      co_return true;
    }
    if (!authenticated_ && *total > kMaxUnauthenticatedFrameBytes) {
      server_->metrics().auth_failures.fetch_add(1);
      *status = Status::Unavailable(
          "authentication required: a message of " + std::to_string(*total) +
          " bytes before hello (the limit before hello is " +
          std::to_string(kMaxUnauthenticatedFrameBytes) + "); send hello with the token first");
      co_return true;  // answered unread, then closed (framing_ok stays false)
    }
    EnsureBuffer(*total / kWordBytes);
    // A large message holds the budget for what has arrived and the step being read, not for what
    // it announces: four clients that each announced 256 MiB and sent nothing more held the whole
    // 1 GiB budget for their io timeout, and every large request meanwhile was refused.
    const bool large = *total > kLargeFrameBytes;
    const uint64_t step = large ? BudgetStep() : *total;
    for (uint64_t at = *table; at < *total;) {
      const uint64_t n = std::min(step, *total - at);
      if (large) {
        if (!server_->ReserveFrameBytes(n)) {
          *status = Status::Unavailable("server busy: too many large messages in flight");
          co_return true;  // answered, then closed (framing_ok stays false)
        }
        reserved_ += n;
      }
      auto [ec3, n3] = co_await asio::async_read(
          st_->socket, asio::buffer(reinterpret_cast<uint8_t*>(frame_.get()) + at, n),
          as_tuple(use_awaitable));
      if (ec3) co_return false;
      server_->metrics().bytes_received.fetch_add(n3);
      at += n;
    }
    frame_words_ = *total / kWordBytes;
    *framing_ok = true;
    co_return true;
  }

  // Bytes of a large message read (and counted against the budget) at a time: a sixteenth of the
  // budget, from 64 KiB to 1 MiB.
  uint64_t BudgetStep() const {
    return std::clamp<uint64_t>(server_->options().max_inflight_message_bytes / 16,
                                uint64_t{64} << 10, uint64_t{1} << 20);
  }

  // Keeps the first `words` of frame_ and makes room for `words`.
  void EnsureBuffer(size_t words) {
    if (words <= capacity_) return;
    const size_t grown = std::max(words, capacity_ * 2);
    auto bigger = std::make_unique_for_overwrite<uint64_t[]>(grown);
    if (frame_) std::copy_n(frame_.get(), capacity_, bigger.get());  // what was read so far
    frame_ = std::move(bigger);
    capacity_ = grown;
  }

  // Returns the large-message budget held for the last request. It is held until that request's
  // call has ended, since the decoded request (as large as its frame) lives that long.
  void ReleaseBudget() {
    if (reserved_ > 0) server_->ReleaseFrameBytes(reserved_);
    reserved_ = 0;
  }

  void ShrinkBuffer() {
    if (capacity_ > kKeepBufferWords) {
      frame_.reset();
      capacity_ = 0;
    }
    frame_words_ = 0;
  }

  // Encodes and writes one answer. False when the connection is gone.
  asio::awaitable<bool> Send(const Response& response) {
    Status s = EncodeResponse(response, &out_);
    if (s.ok() && out_.size() * kWordBytes > server_->limits().max_message_bytes) {
      s = Status::InvalidArgument("answer of " + std::to_string(out_.size() * kWordBytes) +
                                  " bytes exceeds the message limit");
    }
    if (!s.ok() && !EncodeResponse(Response{response.id, s, {}}, &out_).ok()) co_return false;
    // The write has its own deadline; the one before it (a request's: none) comes back after.
    const Clock::time_point before = st_->deadline;
    SetDeadline(*st_, After(server_->options().io_timeout_ms));
    auto [ec, n] = co_await asio::async_write(
        st_->socket, asio::buffer(out_.data(), out_.size() * kWordBytes), as_tuple(use_awaitable));
    SetDeadline(*st_, before);
    server_->metrics().bytes_sent.fetch_add(n);
    if (out_.capacity() > kKeepBufferWords) std::vector<uint64_t>().swap(out_);
    co_return !ec;
  }

  // Runs one decoded request (its arguments are moved out) and writes its answer(s); counts it
  // in the metrics just before the answer goes out (so a client that got its answer sees it
  // counted). Arguments of co_await expressions are named variables: GCC 12 mishandles some
  // temporaries that live across a suspension.
  asio::awaitable<void> Dispatch(Request& request, Clock::time_point started, bool* keep_open) {
    const uint64_t id = request.id;
    const size_t kind = request.call.index();
    const Clock::time_point deadline = RequestDeadline(request);
    CallResult r;
    if (const auto* hello = std::get_if<HelloCall>(&request.call)) {
      r = Hello(*hello);
    } else {
      server_->metrics().requests_in_flight.fetch_add(1);
      SetDeadline(*st_, Clock::time_point::max());  // the request's deadline governs now
      ProgressSender progress = [this, id](const ProgressReply& p) -> asio::awaitable<bool> {
        const Response update{id, Status::Ok(), p};
        const bool sent = co_await Send(update);
        co_return sent;
      };
      const PeerEof peer_eof = [this] { return PeerClosedItsSide(); };
      r = co_await calls_.Run(request, deadline, progress, peer_eof);
      server_->metrics().requests_in_flight.fetch_sub(1);
    }
    if (r.deadline_exceeded) server_->metrics().deadline_exceeded.fetch_add(1);
    *keep_open = r.keep_open && !r.connection_lost;
    const Response answer{id, r.outcome.status, std::move(r.outcome.body)};
    server_->metrics().ObserveCall(kind, answer.status.code(),
                                   std::chrono::duration<double>(Clock::now() - started).count());
    if (!r.connection_lost) {
      const bool sent = co_await Send(answer);
      if (!sent) *keep_open = false;
    }
  }

  // Whether the client has closed its sending side (or reset the connection): a peek that does
  // not block. Bytes waiting (a client sending its next request early) do not count.
  bool PeerClosedItsSide() {
    if (!st_->socket.is_open()) return true;
    char byte;
    const ssize_t n = ::recv(st_->socket.native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n >= 0) return n == 0;
    return errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
  }

  Clock::time_point RequestDeadline(const Request& request) const {
    if (request.deadline_ms > 0) return After(request.deadline_ms);
    if (IsLongCall(request.call)) return Clock::time_point::max();
    return After(server_->options().default_deadline_ms);
  }

  CallResult Hello(const HelloCall& hello) {
    CallResult r;
    if (hello.protocol_version != kProtocolVersion) {
      r.outcome.status =
          Status::InvalidArgument("protocol version " + std::to_string(hello.protocol_version) +
                                  " not supported (server "
                                  "speaks " +
                                  std::to_string(kProtocolVersion) + ")");
      r.keep_open = false;
      return r;
    }
    const std::string& want = server_->options().auth_token;
    if (!want.empty() && !TokensEqual(hello.token, want)) {
      server_->metrics().auth_failures.fetch_add(1);
      server_->Log("refused a connection: " +
                   std::string(hello.token.empty() ? "no token" : "wrong token"));
      r.outcome.status = Status::Unavailable("authentication failed: wrong or missing token");
      r.keep_open = false;
      return r;
    }
    authenticated_ = true;
    r.outcome.body = HelloReply{kProtocolVersion, kServerName, server_->limits().max_message_bytes};
    return r;
  }

  ServerImpl* server_;
  std::shared_ptr<SessionState> st_;
  SessionCalls calls_;
  bool authenticated_;
  std::unique_ptr<uint64_t[]> frame_;
  size_t capacity_ = 0, frame_words_ = 0;
  uint64_t reserved_ = 0;  // of the server's large-message budget, held by the current request
  std::vector<uint64_t> out_;
};

}  // namespace

bool TokensEqual(std::string_view presented, std::string_view secret) {
  // Time depends on the presented token's length only, never on the secret's content or on
  // where the two first differ.
  if (secret.empty()) return presented.empty();
  unsigned diff = presented.size() == secret.size() ? 0u : 1u;
  for (size_t i = 0; i < presented.size(); ++i) {
    diff |= static_cast<unsigned char>(presented[i]) ^
            static_cast<unsigned char>(secret[i % secret.size()]);
  }
  return diff == 0;
}

asio::awaitable<void> RunSession(ServerImpl* server, uint64_t session_id,
                                 std::shared_ptr<SessionState> st) {
  using namespace asio::experimental::awaitable_operators;
  {
    Session session(server, st);
    co_await (session.Serve() || Watchdog(server, st));
    // A call abandoned at its deadline ends (or is dropped) before the connection is gone: it
    // counts against max_connections, and holds its budget, until then.
    co_await session.Settle();
  }  // uploads of this connection are dropped (and their files removed) here
  boost::system::error_code ignored;
  st->socket.shutdown(tcp::socket::shutdown_both, ignored);
  st->socket.close(ignored);
  server->Unregister(session_id);
  server->metrics().connections_open.fetch_sub(1);
}

}  // namespace sqkv::net
