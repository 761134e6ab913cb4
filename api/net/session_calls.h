// Private: the calls a connection serves (everything but hello), each run on the worker pool
// with the request's deadline, and the connection's import uploads.
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string_view>

#include "api/net/messages.h"
#include "api/net/worker_call.h"

namespace sqkv::net {

class ServerImpl;
struct Upload;  // session_calls.cc

struct CallResult {
  Outcome outcome;
  bool keep_open = true;           // false: close the connection after answering
  bool deadline_exceeded = false;  // the answer is the deadline error
  bool connection_lost = false;    // sending progress failed: nothing more can be sent
};

// Writes one progress answer; false when the connection is gone.
using ProgressSender = std::function<boost::asio::awaitable<bool>(const ProgressReply&)>;
// Whether the client has closed its sending side of the connection (end of file; checked without
// blocking). It may still read (a half-close), or be gone.
using PeerEof = std::function<bool()>;

// What a long call (import, rebuild, verify) gets from the session: where its progress goes, and
// whether to stop (ImportOptions::cancelled): true once the client has gone, the call's deadline
// has passed or the server is stopping.
struct LongCallHooks {
  ProgressFn progress;
  // True once the call was abandoned (its deadline passed, its client went away) or the server
  // is stopping; `abandoned` only for the first.
  std::function<bool()> cancelled;
  std::function<bool()> abandoned;
};
using LongCall = std::function<Outcome(const LongCallHooks&)>;

class SessionCalls {
 public:
  // At most this many uploads open at once on one connection.
  static constexpr size_t kMaxUploads = 4;

  SessionCalls(ServerImpl* server, boost::asio::any_io_executor ex);
  ~SessionCalls();  // drops unfinished uploads (their files are removed)

  // Runs `request` (not hello) on the workers; waits at most until `deadline`. The request's
  // arguments are moved out. A call whose deadline passes (or, for a long call, whose client
  // goes away: progress that cannot be sent) is abandoned: answered (unless the client is gone),
  // but still on the workers until it ends; an import or rebuild is told to stop there
  // (LongCallHooks::cancelled) and publishes nothing. One the stopping server cancels is
  // answered Unavailable.
  boost::asio::awaitable<CallResult> Run(Request& request,
                                         std::chrono::steady_clock::time_point deadline,
                                         ProgressSender& progress, const PeerEof& peer_eof);

  // Waits until the call abandoned last (if any) has ended on the workers, or was dropped there.
  // The connection reads its next request only after this, so it has at most one call on the
  // workers at any time (and one decoded request's memory).
  boost::asio::awaitable<void> Settle();

 private:
  // Posts fn to the workers; it is not started once `deadline` has passed or the server stops.
  std::shared_ptr<WorkerCall> Post(std::function<Outcome()> fn,
                                   std::chrono::steady_clock::time_point deadline);
  boost::asio::awaitable<CallResult> Await(const std::function<Outcome()>& fn,
                                           std::chrono::steady_clock::time_point deadline);
  boost::asio::awaitable<CallResult> ImportBegin(ImportBeginCall& call,
                                                 std::chrono::steady_clock::time_point deadline);
  boost::asio::awaitable<CallResult> ImportChunk(ImportChunkCall& call,
                                                 std::chrono::steady_clock::time_point deadline);
  // Like Await, for long calls: sends a progress answer at most every 250 ms (every 250 ms once
  // `peer_eof`, so that a client gone is noticed).
  boost::asio::awaitable<CallResult> AwaitLong(const LongCall& fn,
                                               std::chrono::steady_clock::time_point deadline,
                                               ProgressSender& progress,
                                               const PeerEof& peer_eof);
  boost::asio::awaitable<CallResult> ImportEnd(const ImportEndCall& call,
                                               std::chrono::steady_clock::time_point deadline,
                                               ProgressSender& progress, const PeerEof& peer_eof);

  ServerImpl* server_;
  boost::asio::any_io_executor ex_;
  std::map<uint64_t, std::shared_ptr<Upload>> uploads_;
  std::shared_ptr<WorkerCall> abandoned_;  // the last call answered before it ended, or null
};

// Constant-time comparison of a presented token with the secret (session.cc).
bool TokensEqual(std::string_view presented, std::string_view secret);

}  // namespace sqkv::net
