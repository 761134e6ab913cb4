// Batched reads of one file through io_uring, with direct I/O when the request allows it.
//
// A BatchReader owns two descriptors of one file: a buffered one and, when asked for and the
// filesystem accepts it, an O_DIRECT one. Read() takes a batch of scatter reads (ReadOp), submits
// them all through the calling thread's ring (queue depth 64, refilled as completions arrive) and
// returns when every byte has landed or the first error is known and nothing is in flight any more.
// An op goes through the O_DIRECT descriptor only when its offset, every destination address and
// every destination length are multiples of kDirectIoAlignment; otherwise through the buffered one.
//
// Rings are per thread (created on a thread's first Read, freed when the thread exits) and shared
// by every reader that thread uses, so concurrent queries on different threads never contend on a
// lock. Where io_uring is unavailable (old kernel, seccomp, memlock limit) the thread falls back to
// preadv, and the process logs that once on stderr.
//
// Thread safety: Read() and counters() may be called from any number of threads at once.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"

namespace sqkv {

// Offsets, buffer addresses and lengths of a direct read are multiples of this.
inline constexpr size_t kDirectIoAlignment = 4096;
// Latency buckets: bucket i counts Read() calls that took [2^i, 2^(i+1)) microseconds (bucket 0
// also takes < 1 µs); the last bucket takes everything longer.
inline constexpr int kReadLatencyBuckets = 32;

struct BatchReaderOptions {
  // Open a second descriptor with O_DIRECT for aligned ops. Where the filesystem refuses O_DIRECT
  // the reader still opens, reads everything buffered and reports direct_available() == false.
  // Default: true.
  bool direct = true;
  // Use io_uring. false forces the preadv path (tests; a kernel whose io_uring misbehaves).
  // Default: true.
  bool use_io_uring = true;
  // Tests only: the reader's first direct read completes with EINVAL, as on a filesystem that
  // takes O_DIRECT at open but refuses the reads, so the buffered fallback runs on any filesystem
  // that accepts direct reads. Default: false.
  bool fail_first_direct_read_for_testing = false;
};

// One scatter read: bytes [offset, offset + Σ len) of the file land in iov's buffers, in order.
struct ReadOp {
  uint64_t offset = 0;
  std::vector<std::pair<void*, size_t>> iov;  // (destination, bytes), in file order
};

// What one Read() call did.
struct ReadCallStats {
  uint64_t bytes = 0;         // bytes read
  uint64_t direct_bytes = 0;  // of which through O_DIRECT
  uint64_t micros = 0;        // wall time of the call
};

// Totals since the reader opened. Read from relaxed atomics: each field is exact, the set is not
// one instant.
struct BatchReaderCounters {
  uint64_t reads = 0;                // Read() calls
  uint64_t ops = 0;                  // ReadOps with at least one byte
  uint64_t bytes = 0;                // bytes read
  uint64_t direct_bytes = 0;         // bytes read through O_DIRECT
  uint64_t buffered_ops = 0;         // ops that went through the buffered descriptor
  uint64_t resubmits = 0;            // short reads continued (and EINTR/EAGAIN retried)
  uint64_t sync_fallback_reads = 0;  // Read() calls served by preadv instead of io_uring
  uint64_t errors = 0;               // Read() calls that returned an error
  uint64_t latency_us_log2[kReadLatencyBuckets] = {};  // Read() call latency histogram

  // Upper bound (µs) of the bucket holding quantile q in [0, 1] of the histogram; 0 when empty.
  uint64_t LatencyQuantileMicros(double q) const;
};

class BatchReader {
 public:
  // Opens `path` for reading. A missing file is NotFound, other failures IOError, both naming the
  // path.
  static Status Open(const std::string& path, const BatchReaderOptions& options,
                     std::unique_ptr<BatchReader>* out);
  static Status Open(const std::string& path, bool direct, std::unique_ptr<BatchReader>* out) {
    BatchReaderOptions options;
    options.direct = direct;
    return Open(path, options, out);
  }
  ~BatchReader();
  BatchReader(const BatchReader&) = delete;
  BatchReader& operator=(const BatchReader&) = delete;

  // Reads every op; returns once all bytes are in place, or with the first error once no read is
  // in flight (so the caller's buffers are free again; their contents are then unspecified).
  // Errors: IOError naming the path and offset; a read past the end of the file is Corruption
  // ("... ends at byte N"); a null destination of non-zero length is InvalidArgument.
  // `call` (may be null) receives what this call did.
  Status Read(const std::vector<ReadOp>& ops, ReadCallStats* call = nullptr);

  const std::string& path() const { return path_; }
  // True when aligned ops go through O_DIRECT: asked for, accepted by the filesystem at open and
  // not refused by it at a later read.
  bool direct_available() const { return direct_fd_ >= 0 && !direct_refused_.load(); }
  BatchReaderCounters counters() const;

 private:
  friend class BatchReadRun;  // the per-call state machine in uring_reader.cc
  BatchReader(std::string path, const BatchReaderOptions& options, int fd, int direct_fd)
      : path_(std::move(path)), options_(options), fd_(fd), direct_fd_(direct_fd) {}
  void Record(const ReadCallStats& call, uint64_t ops, uint64_t buffered_ops, uint64_t resubmits,
              bool sync_fallback, bool failed);

  const std::string path_;
  const BatchReaderOptions options_;
  const int fd_;         // buffered descriptor
  const int direct_fd_;  // O_DIRECT descriptor, or -1
  // Set when the filesystem rejects a direct read with EINVAL after accepting O_DIRECT at open;
  // later reads then stay buffered.
  std::atomic<bool> direct_refused_{false};
  // Set once fail_first_direct_read_for_testing has failed a read.
  std::atomic<bool> fault_injected_{false};

  std::atomic<uint64_t> reads_{0}, ops_{0}, bytes_{0}, direct_bytes_{0}, buffered_ops_{0},
      resubmits_{0}, sync_fallback_reads_{0}, errors_{0};
  std::atomic<uint64_t> latency_us_log2_[kReadLatencyBuckets] = {};
};

}  // namespace sqkv
