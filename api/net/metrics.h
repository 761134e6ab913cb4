// Private: the server's counters and their Prometheus text rendering (exposition format 0.0.4).
// Updates are lock-free atomics: any I/O or worker thread may record at any time.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <string>

#include "api/net/messages.h"
#include "api/store.h"
#include "common/status.h"

namespace sqkv::net {

// Upper bounds (seconds) of the latency histogram buckets; +Inf is implied.
inline constexpr std::array<double, 18> kLatencyBuckets = {
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1,    0.25,    0.5,    1,     2.5,    5,     10,   30,    60};

// Status codes counted per call (common/status.h has 9).
inline constexpr size_t kNumStatusCodes = 9;
static_assert(static_cast<size_t>(Status::Code::kCancelled) + 1 == kNumStatusCodes,
              "a status code the metrics do not count");

class Histogram {
 public:
  void Observe(double seconds);
  // Appends the _bucket/_sum/_count lines of `name` with the given label set ("call=\"query\"").
  void Render(const std::string& name, const std::string& labels, std::string* out) const;

 private:
  std::array<std::atomic<uint64_t>, kLatencyBuckets.size() + 1> buckets_{};  // last: +Inf
  std::atomic<uint64_t> count_{0};
  std::atomic<uint64_t> sum_ns_{0};
};

// Sampled at scrape time from Store::Stats and Store::GetTierStats (each absent when its call
// failed or the sampling timed out).
struct Gauges {
  bool have_store_stats = false;
  StoreStats store;
  bool have_tier_stats = false;
  TierStats tiers;
};

class Metrics {
 public:
  // One request of `kind` (index in Call) answered with `code` after `seconds`.
  void ObserveCall(size_t kind, Status::Code code, double seconds);

  std::atomic<uint64_t> connections_opened{0};
  std::atomic<int64_t> connections_open{0};
  std::atomic<uint64_t> connections_refused{0};  // over max_connections
  std::atomic<uint64_t> auth_failures{0};
  std::atomic<uint64_t> protocol_errors{0};  // undecodable frames or messages
  std::atomic<uint64_t> deadline_exceeded{0};
  std::atomic<uint64_t> timeouts{0};  // connections closed for idleness or slow I/O
  std::atomic<int64_t> requests_in_flight{0};
  std::atomic<uint64_t> bytes_received{0};
  std::atomic<uint64_t> bytes_sent{0};
  std::atomic<uint64_t> upload_bytes{0};

  // The whole exposition, with the gauges sampled by the caller.
  std::string Render(const Gauges& gauges) const;

 private:
  std::array<std::array<std::atomic<uint64_t>, kNumStatusCodes>, kNumCallKinds> requests_{};
  std::array<Histogram, kNumCallKinds> latency_{};
};

// Resident set size of this process in bytes (from /proc/self/statm); 0 if unknown.
uint64_t ResidentBytes();

}  // namespace sqkv::net
