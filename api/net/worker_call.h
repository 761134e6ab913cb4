// Private: runs a store call on the worker pool and lets a connection's coroutine wait for it
// with a deadline, without blocking its I/O thread.
#pragma once

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/experimental/concurrent_channel.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "api/net/messages.h"

namespace sqkv::net {

// What a store call produced: a status and, when OK, the reply body.
struct Outcome {
  Status status;
  Body body;
};

// The result slot of one call posted to the workers. The worker keeps it alive, so a caller that
// gave up (deadline) may go away; the call still runs to its end and its result is dropped.
//
// The outcome lives in the slot itself (under a mutex); the channel only wakes the waiter. A
// wake-up may be lost: when the timer of WaitUntil fires as the worker finishes, awaitable
// operator|| drops the receive's completion (Asio issue 1041). So the waiter looks at the slot
// after every wake, and a lost wake-up costs nothing.
class WorkerCall {
 public:
  // Tells a worker, when it picks the call up, not to start it (the server is stopping).
  using ShouldDrop = std::function<bool()>;

  // Posts fn() to `pool`; the caller waits on `ex` (its connection's io_context). A worker that
  // picks the call up after `deadline`, or when drop() is true, does not run fn and answers
  // Unavailable instead (fn is destroyed, and what it holds with it).
  static std::shared_ptr<WorkerCall> Post(boost::asio::thread_pool& pool,
                                          const boost::asio::any_io_executor& ex,
                                          std::function<Outcome()> fn,
                                          std::chrono::steady_clock::time_point deadline,
                                          ShouldDrop drop) {
    auto call = std::make_shared<WorkerCall>(ex);
    boost::asio::post(pool, [call, fn = std::move(fn), deadline, drop = std::move(drop)]() mutable {
      Outcome out;
      if (drop && drop()) {
        out.status = Status::Unavailable("the server is stopping; the call was not started");
      } else if (std::chrono::steady_clock::now() >= deadline) {
        out.status = Status::Unavailable("deadline exceeded before the call started");
      } else {
        try {
          out = fn();
        } catch (const std::exception& e) {  // bad_alloc and the like: answer, don't die
          out.status = Status::Internal(std::string("store call threw: ") + e.what());
        }
      }
      fn = nullptr;  // the call's arguments go now, not when the last owner of the slot does
      call->Finish(std::move(out));
    });
    return call;
  }

  explicit WorkerCall(const boost::asio::any_io_executor& ex) : wake_(ex, 1) {}

  // True once the worker has finished (run the call, or dropped it).
  bool done() const {
    std::lock_guard<std::mutex> lock(mu_);
    return outcome_.has_value();
  }

  // Waits until the result is there (true; see outcome()) or `until` passes (false). May be
  // called again after false.
  boost::asio::awaitable<bool> WaitUntil(std::chrono::steady_clock::time_point until) {
    using namespace boost::asio::experimental::awaitable_operators;
    while (!done()) {
      if (std::chrono::steady_clock::now() >= until) co_return false;
      boost::asio::steady_timer timer(wake_.get_executor(), until);
      co_await (wake_.async_receive(boost::asio::as_tuple(boost::asio::use_awaitable)) ||
                timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable)));
    }
    co_return true;
  }

  // The result; only after WaitUntil returned true (or done()).
  Outcome& outcome() {
    std::lock_guard<std::mutex> lock(mu_);
    return *outcome_;
  }

 private:
  void Finish(Outcome out) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      outcome_ = std::move(out);
    }
    wake_.try_send(boost::system::error_code());
  }

  using WakeChannel =
      boost::asio::experimental::concurrent_channel<void(boost::system::error_code)>;
  WakeChannel wake_;
  mutable std::mutex mu_;
  std::optional<Outcome> outcome_;  // under mu_; set once by the worker
};

}  // namespace sqkv::net
