// WorkerCall: a result is never lost when the waiter's timer fires as the worker finishes (the
// progress loop re-arms a short timer, so every long call races it), and a worker does not start
// a call whose deadline has passed or whose server is stopping.
#include "api/net/worker_call.h"

#include <gtest/gtest.h>

#include <atomic>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/this_coro.hpp>

namespace sqkv::net {
namespace {

namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;

// The race: calls, how long after its start the waiter's first deadline passes, and how far on
// either side of it each call ends.
constexpr int kCalls = 1500;
constexpr auto kRaceBudget = std::chrono::seconds(4);  // fewer calls on a loaded machine
constexpr auto kLead = std::chrono::microseconds(300);
constexpr int kJitterUs = 40;
constexpr auto kSecondWait = std::chrono::seconds(5);

// Runs `body` as a coroutine on a fresh io_context until it ends.
void RunCoroutine(std::function<asio::awaitable<void>(asio::any_io_executor)> body) {
  asio::io_context io;
  std::exception_ptr failed;
  asio::co_spawn(io, body(io.get_executor()), [&](std::exception_ptr e) { failed = e; });
  io.run();
  if (failed) std::rethrow_exception(failed);
}

TEST(WorkerCallTest, AResultIsNeverLostWhenTheTimerFiresAsTheWorkerFinishes) {
  // Each call ends within a few microseconds of the waiter's first deadline, on either side of
  // it; the waiter then waits again, as the progress loop does. A result whose wake-up lost the
  // race must still be found (before the fix it was dropped, and the second wait timed out).
  asio::thread_pool pool(2);
  int calls = 0, answered = 0, lost = 0, first_wait_missed = 0;
  const auto give_up = Clock::now() + kRaceBudget;
  RunCoroutine([&](asio::any_io_executor ex) -> asio::awaitable<void> {
    for (int i = 0; i < kCalls && lost == 0 && Clock::now() < give_up; ++i) {
      ++calls;
      const auto at = Clock::now() + kLead;
      const auto ends = at + std::chrono::microseconds(i % (2 * kJitterUs + 1) - kJitterUs);
      const std::function<Outcome()> spin = [ends, i]() {
        while (Clock::now() < ends) {
        }
        return Outcome{Status::Ok(), ProgressReply{i, kCalls}};
      };
      auto call = WorkerCall::Post(pool, ex, spin, Clock::time_point::max(), nullptr);
      if (!co_await call->WaitUntil(at)) {
        ++first_wait_missed;
        const auto later = Clock::now() + kSecondWait;
        if (!co_await call->WaitUntil(later)) {
          ++lost;
          continue;
        }
      }
      const auto* p = std::get_if<ProgressReply>(&call->outcome().body);
      if (p != nullptr && p->done == i) ++answered;
    }
  });
  EXPECT_EQ(lost, 0) << "after " << answered << " calls";
  EXPECT_EQ(answered, calls);
  EXPECT_GT(first_wait_missed, 0);  // the race was run: some calls outlived the first wait
}

TEST(WorkerCallTest, ACallIsNotStartedAfterItsDeadlineOrWhenDropped) {
  asio::thread_pool pool(1);
  std::atomic<int> ran{0};
  const std::function<Outcome()> count = [&ran]() {
    ran.fetch_add(1);
    return Outcome{};
  };
  RunCoroutine([&](asio::any_io_executor ex) -> asio::awaitable<void> {
    auto late = WorkerCall::Post(pool, ex, count, Clock::now() - std::chrono::seconds(1), nullptr);
    EXPECT_TRUE(co_await late->WaitUntil(Clock::now() + std::chrono::seconds(10)));
    EXPECT_TRUE(late->outcome().status.IsUnavailable());
    EXPECT_NE(late->outcome().status.message().find("deadline"), std::string::npos);

    auto dropped = WorkerCall::Post(pool, ex, count, Clock::time_point::max(), [] { return true; });
    EXPECT_TRUE(co_await dropped->WaitUntil(Clock::now() + std::chrono::seconds(10)));
    EXPECT_TRUE(dropped->outcome().status.IsUnavailable());
    EXPECT_NE(dropped->outcome().status.message().find("stopping"), std::string::npos);

    auto runs = WorkerCall::Post(pool, ex, count, Clock::now() + std::chrono::seconds(10),
                                 [] { return false; });
    EXPECT_TRUE(co_await runs->WaitUntil(Clock::now() + std::chrono::seconds(10)));
    EXPECT_TRUE(runs->outcome().status.ok());
  });
  EXPECT_EQ(ran.load(), 1);
}

}  // namespace
}  // namespace sqkv::net
