#include "api/net/metrics.h"

#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <fstream>

namespace sqkv::net {
namespace {

constexpr double kNanosPerSecond = 1e9;

void Line(std::string* out, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void Line(std::string* out, const char* fmt, ...) {
  char buf[512];
  va_list args;
  va_start(args, fmt);
  const int n = std::vsnprintf(buf, sizeof(buf), fmt, args);
  va_end(args);
  if (n > 0) out->append(buf, std::min<size_t>(n, sizeof(buf) - 1));
  out->push_back('\n');
}

void Header(std::string* out, const char* name, const char* type, const char* help) {
  Line(out, "# HELP %s %s", name, help);
  Line(out, "# TYPE %s %s", name, type);
}

// A metric without labels, one sample.
void Metric(std::string* out, const char* name, const char* type, const char* help,
            uint64_t value) {
  Header(out, name, type, help);
  Line(out, "%s %" PRIu64, name, value);
}

// A metric with a host and a device sample (label tier).
void TierMetric(std::string* out, const char* name, const char* type, const char* help,
                uint64_t host, uint64_t device) {
  Header(out, name, type, help);
  Line(out, "%s{tier=\"host\"} %" PRIu64, name, host);
  Line(out, "%s{tier=\"device\"} %" PRIu64, name, device);
}

std::string CodeLabel(size_t code) {
  std::string s = Status::CodeName(static_cast<Status::Code>(code));
  return s;
}

// Per-tier counters of the store (TierStats), labelled by tier.
void RenderTiers(const TierStats& t, std::string* out) {
  TierMetric(out, "sqkv_tier_hits_total", "counter", "Pages found in a tier.", t.host_hits,
             t.device_hits);
  TierMetric(out, "sqkv_tier_misses_total", "counter", "Pages a tier had to fetch.", t.host_misses,
             t.device_misses);
  TierMetric(out, "sqkv_tier_evictions_total", "counter", "Pages evicted from a tier.",
             t.host_evictions, t.device_pages_evicted);
  Metric(out, "sqkv_device_uploaded_bytes_total", "counter", "Bytes uploaded to the device pool.",
         t.device_bytes_uploaded);
  Metric(out, "sqkv_device_layers_evicted_total", "counter",
         "Layer indexes evicted from the device.", t.device_layers_evicted);
  TierMetric(out, "sqkv_tier_bytes_in_use", "gauge", "Bytes of a tier holding pages.",
             t.host_bytes_in_use, t.device_pool_bytes_used);
  TierMetric(out, "sqkv_tier_capacity_bytes", "gauge", "Size of a tier.", t.host_capacity_bytes,
             t.device_pool_bytes);
  Header(out, "sqkv_tier_pinned_bytes", "gauge", "Bytes of a tier held by pinned contexts.");
  Line(out, "sqkv_tier_pinned_bytes{tier=\"host\"} %" PRIu64, t.host_pinned_bytes);
  Metric(out, "sqkv_device_layers_resident", "gauge", "Layers resident in the device pool.",
         t.device_layers_resident);
  Metric(out, "sqkv_device_layers_loaded_total", "counter", "Layers loaded into the device pool.",
         t.device_layers_loaded);
  Metric(out, "sqkv_index_layers_cached", "gauge", "Decoded layer indexes in host memory.",
         t.index_layers_cached);
  Metric(out, "sqkv_index_cached_bytes", "gauge", "Bytes of the decoded layer indexes.",
         t.index_bytes_cached);
  Metric(out, "sqkv_index_capacity_bytes", "gauge", "Byte bound of the layer index cache.",
         t.index_capacity_bytes);
  Metric(out, "sqkv_index_layers_decoded_total", "counter",
         "Layer indexes read from the catalog and decoded.", t.index_layers_decoded);
  Metric(out, "sqkv_index_layers_evicted_total", "counter", "Layer indexes dropped from the cache.",
         t.index_layers_evicted);
  Metric(out, "sqkv_disk_reads_total", "counter", "Reads from segment files.", t.disk_reads);
  Metric(out, "sqkv_disk_read_bytes_total", "counter", "Bytes read from segment files.",
         t.disk_bytes);
  Line(out, "sqkv_disk_read_bytes_total{mode=\"direct\"} %" PRIu64, t.disk_direct_bytes);
  // The store's log2 buckets [2^i, 2^(i+1)) us as a cumulative histogram (le = 2^(i+1) us); its
  // sum is not known, so only buckets and count are given.
  Header(out, "sqkv_disk_read_duration_seconds", "histogram", "Latency of segment file reads.");
  uint64_t cumulative = 0;
  for (size_t i = 0; i < t.disk_read_us_log2.size(); ++i) {
    cumulative += t.disk_read_us_log2[i];
    Line(out, "sqkv_disk_read_duration_seconds_bucket{le=\"%g\"} %" PRIu64,
         std::ldexp(1.0, static_cast<int>(i) + 1) * 1e-6, cumulative);
  }
  Line(out, "sqkv_disk_read_duration_seconds_bucket{le=\"+Inf\"} %" PRIu64, cumulative);
  Line(out, "sqkv_disk_read_duration_seconds_count %" PRIu64, cumulative);
}

}  // namespace

void Histogram::Observe(double seconds) {
  size_t i = 0;
  while (i < kLatencyBuckets.size() && seconds > kLatencyBuckets[i]) ++i;
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
  sum_ns_.fetch_add(static_cast<uint64_t>(std::max(0.0, seconds) * kNanosPerSecond),
                    std::memory_order_relaxed);
}

void Histogram::Render(const std::string& name, const std::string& labels, std::string* out) const {
  uint64_t cumulative = 0;
  for (size_t i = 0; i < kLatencyBuckets.size(); ++i) {
    cumulative += buckets_[i].load(std::memory_order_relaxed);
    Line(out, "%s_bucket{%s,le=\"%g\"} %" PRIu64, name.c_str(), labels.c_str(), kLatencyBuckets[i],
         cumulative);
  }
  cumulative += buckets_.back().load(std::memory_order_relaxed);
  Line(out, "%s_bucket{%s,le=\"+Inf\"} %" PRIu64, name.c_str(), labels.c_str(), cumulative);
  Line(out, "%s_sum{%s} %.9f", name.c_str(), labels.c_str(),
       sum_ns_.load(std::memory_order_relaxed) / kNanosPerSecond);
  Line(out, "%s_count{%s} %" PRIu64, name.c_str(), labels.c_str(),
       count_.load(std::memory_order_relaxed));
}

void Metrics::ObserveCall(size_t kind, Status::Code code, double seconds) {
  if (kind >= kNumCallKinds) return;
  const size_t c = static_cast<size_t>(code);
  if (c < kNumStatusCodes) requests_[kind][c].fetch_add(1, std::memory_order_relaxed);
  latency_[kind].Observe(seconds);
}

std::string Metrics::Render(const Gauges& gauges) const {
  std::string out;
  Header(&out, "sqkv_requests_total", "counter", "Requests answered, by call and status code.");
  for (size_t k = 0; k < kNumCallKinds; ++k) {
    for (size_t c = 0; c < kNumStatusCodes; ++c) {
      const uint64_t v = requests_[k][c].load(std::memory_order_relaxed);
      if (v == 0 && c != 0) continue;  // keep the output short; ok is always shown
      Line(&out, "sqkv_requests_total{call=\"%s\",code=\"%s\"} %" PRIu64, CallKindName(k),
           CodeLabel(c).c_str(), v);
    }
  }
  Header(&out, "sqkv_request_duration_seconds", "histogram",
         "Time from a request's last byte read to its answer being ready to write.");
  for (size_t k = 0; k < kNumCallKinds; ++k) {
    latency_[k].Render("sqkv_request_duration_seconds",
                       std::string("call=\"") + CallKindName(k) + "\"", &out);
  }
  auto counter = [&out](const char* name, const char* help, uint64_t v) {
    Header(&out, name, "counter", help);
    Line(&out, "%s %" PRIu64, name, v);
  };
  auto gauge = [&out](const char* name, const char* help, int64_t v) {
    Header(&out, name, "gauge", help);
    Line(&out, "%s %" PRId64, name, v);
  };
  counter("sqkv_connections_total", "Connections accepted.", connections_opened.load());
  gauge("sqkv_connections_open", "Connections open now.", connections_open.load());
  counter("sqkv_connections_refused_total", "Connections closed at once (over the limit).",
          connections_refused.load());
  counter("sqkv_auth_failures_total", "Connections refused for a missing or wrong token.",
          auth_failures.load());
  counter("sqkv_protocol_errors_total", "Frames or messages that could not be decoded.",
          protocol_errors.load());
  counter("sqkv_deadline_exceeded_total", "Requests answered with deadline exceeded.",
          deadline_exceeded.load());
  counter("sqkv_connection_timeouts_total", "Connections closed for idleness or slow I/O.",
          timeouts.load());
  gauge("sqkv_requests_in_flight", "Requests being worked on now.", requests_in_flight.load());
  counter("sqkv_received_bytes_total", "Bytes of messages received.", bytes_received.load());
  counter("sqkv_sent_bytes_total", "Bytes of messages sent.", bytes_sent.load());
  counter("sqkv_upload_bytes_total", "Bytes of import uploads written.", upload_bytes.load());
  if (gauges.have_store_stats) {
    const StoreStats& st = gauges.store;
    gauge("sqkv_contexts", "Contexts in the store.", st.contexts);
    gauge("sqkv_keys", "Keys stored: layers x kv heads x tokens, summed over contexts.", st.keys);
    gauge("sqkv_segment_bytes", "Segment files of live versions.",
          static_cast<int64_t>(st.segment_bytes));
    gauge("sqkv_index_bytes", "Encoded indexes and checksums of live versions.",
          static_cast<int64_t>(st.index_bytes));
    gauge("sqkv_garbage_segment_bytes", "Segment files awaiting compaction.",
          static_cast<int64_t>(st.garbage_segment_bytes));
    gauge("sqkv_catalog_bytes", "Size of the catalog database.",
          static_cast<int64_t>(st.catalog_bytes));
    gauge("sqkv_calibrated_contexts", "Contexts with calibrated thresholds.",
          st.calibrated_contexts);
  }
  if (gauges.have_tier_stats) RenderTiers(gauges.tiers, &out);
  gauge("sqkv_resident_memory_bytes", "Resident set size of the server process.",
        static_cast<int64_t>(ResidentBytes()));
  return out;
}

uint64_t ResidentBytes() {
  std::ifstream f("/proc/self/statm");
  uint64_t size_pages = 0, resident_pages = 0;
  if (!(f >> size_pages >> resident_pages)) return 0;
  const long page = ::sysconf(_SC_PAGESIZE);
  return page > 0 ? resident_pages * static_cast<uint64_t>(page) : 0;
}

}  // namespace sqkv::net
