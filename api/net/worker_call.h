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
class WorkerCall {
 public:
  using Channel = boost::asio::experimental::concurrent_channel<void(boost::system::error_code,
                                                                     std::shared_ptr<Outcome>)>;

  // Posts fn() to `pool`; the caller waits on `ex` (its connection's io_context).
  static std::shared_ptr<WorkerCall> Post(boost::asio::thread_pool& pool,
                                          const boost::asio::any_io_executor& ex,
                                          std::function<Outcome()> fn) {
    auto call = std::make_shared<WorkerCall>(ex);
    boost::asio::post(pool, [call, fn = std::move(fn)]() {
      auto out = std::make_shared<Outcome>();
      try {
        *out = fn();
      } catch (const std::exception& e) {  // bad_alloc and the like: answer, don't die
        out->status = Status::Internal(std::string("store call threw: ") + e.what());
      }
      call->channel_.try_send(boost::system::error_code(), std::move(out));
    });
    return call;
  }

  explicit WorkerCall(const boost::asio::any_io_executor& ex) : channel_(ex, 1) {}

  // Waits until the result is there (true; see outcome()) or `until` passes (false). May be
  // called again after false.
  boost::asio::awaitable<bool> WaitUntil(std::chrono::steady_clock::time_point until) {
    using namespace boost::asio::experimental::awaitable_operators;
    if (outcome_) co_return true;
    boost::asio::steady_timer timer(channel_.get_executor(), until);
    auto r = co_await (channel_.async_receive(boost::asio::as_tuple(boost::asio::use_awaitable)) ||
                       timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable)));
    if (r.index() == 0) {
      auto& [ec, out] = std::get<0>(r);
      if (!ec && out) outcome_ = std::move(out);
    }
    co_return outcome_ != nullptr;
  }

  Outcome& outcome() { return *outcome_; }

 private:
  Channel channel_;
  std::shared_ptr<Outcome> outcome_;
};

}  // namespace sqkv::net
