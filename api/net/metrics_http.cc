// The Prometheus endpoint: GET /metrics over HTTP/1.1 (Boost.Beast), one request per connection.
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http.hpp>
#include <chrono>

#include "api/net/server_impl.h"
#include "api/net/worker_call.h"

namespace sqkv::net {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;

// A scrape must be read and answered within this.
constexpr auto kHttpTimeout = std::chrono::seconds(10);
// Store::Stats and GetTierStats (on a worker) may take this long before their gauges are skipped.
constexpr auto kGaugeTimeout = std::chrono::seconds(5);
constexpr char kContentType[] = "text/plain; version=0.0.4; charset=utf-8";

}  // namespace

asio::awaitable<void> RunMetricsSession(ServerImpl* server, tcp::socket socket) {
  beast::tcp_stream stream(std::move(socket));
  beast::flat_buffer buffer;
  http::request<http::string_body> req;
  stream.expires_after(kHttpTimeout);
  auto [ec, n] =
      co_await http::async_read(stream, buffer, req, asio::as_tuple(asio::use_awaitable));
  if (ec) co_return;

  http::response<http::string_body> res;
  res.version(req.version());
  res.keep_alive(false);
  res.set(http::field::server, "sqkv-serve");
  const bool is_metrics = req.target() == "/metrics" || req.target().starts_with("/metrics?");
  if (req.method() != http::verb::get) {
    res.result(http::status::method_not_allowed);
    res.set(http::field::allow, "GET");
  } else if (!is_metrics) {
    res.result(http::status::not_found);
    res.set(http::field::content_type, "text/plain");
    res.body() = "see /metrics\n";
  } else {
    auto gauges = std::make_shared<Gauges>();
    Store* store = server->store();
    auto ex = co_await asio::this_coro::executor;
    const std::function<Outcome()> sample = [store, gauges]() {
      gauges->have_store_stats = store->Stats(&gauges->store).ok();
      gauges->have_tier_stats = store->GetTierStats(&gauges->tiers).ok();
      return Outcome{};
    };
    const auto until = Clock::now() + kGaugeTimeout;
    auto call = WorkerCall::Post(server->workers(), ex, sample, until,
                                 [server] { return server->stopping(); });
    const bool sampled = co_await call->WaitUntil(until);
    // Not sampled in time: the worker may still be writing `gauges`; render without them.
    const Gauges none;
    const std::string text = server->metrics().Render(sampled ? *gauges : none);
    res.result(http::status::ok);
    res.set(http::field::content_type, kContentType);
    res.body() = text;
  }
  res.prepare_payload();
  stream.expires_after(kHttpTimeout);
  co_await http::async_write(stream, res, asio::as_tuple(asio::use_awaitable));
  beast::error_code ignored;
  stream.socket().shutdown(tcp::socket::shutdown_send, ignored);
}

}  // namespace sqkv::net
